"""What every reader shares: line reading, ``id:value`` parsing, file sets, writer options.

Line reading follows one set of rules for every layout:

- Files are read as bytes and split on ``\\n`` only, so a stray ``\\r`` inside a text can never
  split a document in two and shift the line count of a texts file against its labels file.
- A line ending ``\\r\\n`` (CRLF, files from Windows) loses its ``\\r``; a UTF-8 byte-order mark
  at the start of a file is dropped. Nothing else is stripped from a line here.
- A file starting with the gzip magic bytes is decompressed, whatever its name. A truncated or
  corrupt gzip stream raises :class:`DataFormatError` at the line being read when it broke.
- Invalid UTF-8 raises :class:`DataFormatError` at its line.
- Line numbers are 1-based and count every physical line, headers and blank lines included, so
  they match what ``sed -n Np`` or an editor shows.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from xmlgame.dataset import DatasetWriter
from xmlgame.errors import DataFormatError, XmlgameError

GZIP_MAGIC = b"\x1f\x8b"

# "id:value id:value ...": every token is digits, one colon, a colon-free value
_PAIRS = re.compile(r"\s*(?:\d+:[^\s:]+(?:\s+|$))*")
# "l1,l2,l3": a comma-separated list of non-negative integers
_ID_LIST = re.compile(r"\d+(?:,\d+)*")


# --------------------------------------------------------------------------------------------
# reading lines


def open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing it when it starts like a gzip file."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` for each line of ``path``, line ending removed."""
    lineno = 0
    with open_binary(path) as f:
        try:
            for raw in f:
                lineno += 1
                if raw.endswith(b"\n"):
                    raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataFormatError(
                        path, lineno, f"invalid UTF-8 at byte {exc.start} of the line",
                        "UTF-8 text",
                    ) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield lineno, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataFormatError(
                path, lineno + 1, f"the gzip stream is truncated or corrupt ({exc})",
                "a complete gzip file (download or compress it again)",
            ) from None


def count_lines(path: Path) -> int:
    """The number of lines ``read_lines`` yields for ``path``."""
    return sum(1 for _ in read_lines(path))


class LineColumn:
    """The lines of a file as a lazy column: ``len()`` and iteration, read from disk on demand.

    Passed to :meth:`DatasetWriter.set_label_names` so that millions of label names or texts
    stream from the input file into the prepared dataset instead of living in a Python list.
    """

    def __init__(self, path: Path, expected: int | None = None, what: str = "line"):
        self.path = path
        self.n = count_lines(path)
        if expected is not None and self.n != expected:
            line = expected + 1 if self.n > expected else self.n + 1
            raise DataFormatError(
                path, line, f"the file has {self.n:,} lines", f"{expected:,} lines, one {what} each"
            )

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        return (line for _, line in read_lines(self.path))


class IdNames:
    """Label names ``"0", "1", ...`` for sources that give no names, without a list of them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        return (str(i) for i in range(self.n))


def paired_lines(
    path_a: Path, lines_a: Iterator[tuple[int, str]],
    path_b: Path, lines_b: Iterator[tuple[int, str]], header_b: int = 0,
) -> Iterator[tuple[int, str, str]]:
    """Walk two line streams in step, yielding ``(line number in b, line a, line b)``.

    The streams must hold the same number of records; when one ends first, the error names
    that file and the line where its next record was expected. ``header_b`` counts the lines
    of ``b`` already consumed (a header).
    """
    last_a, last_b = 0, header_b
    while True:
        a = next(lines_a, None)
        b = next(lines_b, None)
        if a is None and b is None:
            return
        if a is None or b is None:
            short, short_last = (path_a, last_a) if a is None else (path_b, last_b)
            other, other_line = (path_b, b[0]) if a is None else (path_a, a[0])
            raise DataFormatError(
                short, short_last + 1,
                f"the file ends here, but {other.name} continues (its line {other_line})",
                f"one record in {short.name} for each record in {other.name}",
            )
        last_a, last_b = a[0], b[0]
        yield b[0], a[1], b[1]


# --------------------------------------------------------------------------------------------
# parsing


def parse_header(path: Path, line: str | None, names: tuple[str, ...]) -> tuple[int, ...]:
    """Parse a header line of non-negative integers, e.g. ``N D L``."""
    fields = (line or "").split()
    if len(fields) != len(names) or not all(f.isdigit() for f in fields):
        raise DataFormatError(
            path, 1, f"bad header {line!r}" if line is not None else "the file is empty",
            f"a header of {len(names)} integers: {' '.join(names)}",
        )
    return tuple(int(f) for f in fields)


def parse_pairs(
    text: str, path: Path, lineno: int, limit: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``id:value id:value ...`` into int64 ids in ``[0, limit)`` and float32 values.

    ``what`` names the ids in errors ("label", "feature"). One regular-expression check and
    one numpy conversion per line: no Python loop over the pairs.
    """
    if not _PAIRS.fullmatch(text):
        raise _bad_pair(text, path, lineno, what)
    try:
        flat = np.array(text.replace(":", " ").split(), dtype=np.float64)
    except ValueError:
        raise _bad_pair(text, path, lineno, what) from None
    ids = flat[0::2].astype(np.int64)
    values = flat[1::2]
    if not np.isfinite(values).all():
        bad = text.split()[int(np.flatnonzero(~np.isfinite(values))[0])]
        raise DataFormatError(
            path, lineno, f"non-finite value in {bad!r}", f"{what}_id:value with a finite value"
        )
    check_ids(ids, path, lineno, limit, what)
    return ids, values.astype(np.float32)


def parse_id_list(text: str, path: Path, lineno: int, limit: int, what: str) -> np.ndarray:
    """Parse a comma-separated list of ids (``3,17,42``; empty text: no ids)."""
    if not text:
        return np.zeros(0, dtype=np.int64)
    if not _ID_LIST.fullmatch(text):
        raise DataFormatError(
            path, lineno, f"bad {what} list {_clip(text)!r}",
            f"comma-separated {what} ids (non-negative integers, no spaces), e.g. 3,17,42",
        )
    ids = np.array(text.split(","), dtype=np.int64)
    check_ids(ids, path, lineno, limit, what)
    return ids


def header_lies(path: Path, lineno: int, n_docs: int, problem: str) -> DataFormatError:
    """The error for a file whose document lines disagree with its header's N."""
    return DataFormatError(
        path, lineno, f"{problem}, but the header (line 1) says N = {n_docs:,}",
        "as many document lines as the header's N (fix N or the file)",
    )


def check_ids(ids: np.ndarray, path: Path, lineno: int, limit: int, what: str) -> None:
    if len(ids) and ids.max() >= limit:
        raise DataFormatError(
            path, lineno, f"{what} id {int(ids.max())} is out of range",
            f"{what} ids in [0, {limit}) as the header declares (ids are 0-based)",
        )


def _bad_pair(text: str, path: Path, lineno: int, what: str) -> DataFormatError:
    """Locate the first malformed ``id:value`` token of a line for the error message."""
    for token in text.split():
        key, sep, value = token.partition(":")
        if not (sep and key.isdigit() and _is_number(value)):
            return DataFormatError(
                path, lineno, f"bad {what} pair {_clip(token)!r}",
                f"{what}_id:value pairs separated by spaces, e.g. 12:1.0",
            )
    return DataFormatError(path, lineno, f"bad line {_clip(text)!r}", f"{what}_id:value pairs")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------------------------
# file sets and writer options


def missing_files(source: Path, names: tuple[str, ...]) -> list[str]:
    """The names in ``names`` that are not files in the folder ``source``."""
    if not source.is_dir():
        return list(names)
    return [name for name in names if not (source / name).is_file()]


def require_files(source: Path, layout: str, names: tuple[str, ...]) -> None:
    missing = missing_files(source, names)
    if missing:
        raise XmlgameError(
            f"{source} is not a complete {layout} folder: missing {', '.join(missing)} "
            f"(the layout needs {', '.join(names)})"
        )


@dataclass
class WriterOptions:
    """What :func:`xmlgame.readers.prepare_from` passes on to every :class:`DatasetWriter`."""

    name: str
    source_label: str = ""
    propensity_a: float = 0.55
    propensity_b: float = 1.5
    extra_meta: dict = field(default_factory=dict)

    def open(
        self, out: Path, layout: str, *, with_texts: bool, with_features: bool = False,
        input_files: list[Path], extra_meta: dict | None = None,
    ) -> DatasetWriter:
        return DatasetWriter(
            out, name=self.name, layout=layout, with_texts=with_texts,
            with_features=with_features, source=self.source_label,
            propensity_a=self.propensity_a, propensity_b=self.propensity_b,
            input_files=input_files, extra_meta={**self.extra_meta, **(extra_meta or {})},
        )
