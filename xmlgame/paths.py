"""Where xmlgame keeps prepared datasets and runs.

Everything lives under one home folder: ``$XMLGAME_HOME`` if set, else ``~/xmlgame``::

    datasets/NAME/         prepared datasets (see xmlgame.dataset)
    runs/RUN_ID/           training runs (see xmlgame.train)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xmlgame.errors import XmlgameError


def home() -> Path:
    return Path(os.environ.get("XMLGAME_HOME", Path.home() / "xmlgame")).expanduser()


def datasets_dir() -> Path:
    return home() / "datasets"


def runs_dir() -> Path:
    return home() / "runs"


def _created(folder: Path, marker: str) -> float:
    return (folder / marker).stat().st_mtime


def latest(folder: Path, marker: str) -> Path | None:
    """The most recently completed child of ``folder`` holding ``marker``, or None."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if not p.name.startswith(".") and (p / marker).exists()]
    return max(done, key=lambda p: _created(p, marker), default=None)


def resolve_dataset(name_or_path: str | None) -> Path:
    """A dataset folder from a path, a name under ``datasets/``, or (None) the latest prepared."""
    if name_or_path is None:
        found = latest(datasets_dir(), "meta.json")
        if found is None:
            raise XmlgameError(
                f"no prepared dataset in {datasets_dir()}; run `xmlgame prep debtags` first"
            )
        return found
    path = Path(name_or_path).expanduser()
    if (path / "meta.json").exists():
        return path
    named = datasets_dir() / str(name_or_path)
    if (named / "meta.json").exists():
        return named
    known = sorted(p.parent.name for p in datasets_dir().glob("*/meta.json"))
    raise XmlgameError(
        f"no prepared dataset {name_or_path!r} (looked for {path}/meta.json and "
        f"{named}/meta.json); prepared here: {', '.join(known) or 'none'}"
    )


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename: never a half-written
    file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data) -> None:
    """Write JSON as :func:`write_text` does."""
    write_text(path, json.dumps(data, indent=2) + "\n")
