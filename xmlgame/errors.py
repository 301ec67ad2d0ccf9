"""User-facing errors: each says what was wrong, where, and how to fix it.

The CLI prints these without a traceback; anything else escaping is a bug in xmlgame.
"""

from __future__ import annotations

from pathlib import Path


class XmlgameError(Exception):
    """A mistake the user can fix: bad input, a missing file, a wrong option."""


class DataFormatError(XmlgameError):
    """A malformed input file, located by file and (1-based) line number."""

    def __init__(self, path: str | Path, line: int | None, problem: str, expected: str = ""):
        self.path = Path(path)
        self.line = line
        self.problem = problem
        self.expected = expected
        where = f"{self.path}" + (f", line {line}" if line is not None else "")
        message = f"{where}: {problem}"
        if expected:
            message += f"; expected {expected}"
        super().__init__(message)
