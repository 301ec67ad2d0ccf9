"""Extreme Classification Repository bag-of-words layout (Bibtex, Delicious, EURLex, ...).

Files, in one folder: ``train.txt`` and ``test.txt`` (or one pair ``NAME_train.txt`` and
``NAME_test.txt``), each a header ``N D L`` (documents, features, labels) followed by one line
per document::

    l1,l2,l3 f:v f:v f:v

with 0-based label ids ``l`` and feature ids ``f``. Optional ``labels.txt`` names the L labels,
one per line; ``features.txt`` (feature names) is not read, as the prepared format keeps no
feature names. The documents have no texts, only sparse features (``train.X.npz``).

Decisions on what real files hold:

- A document without labels starts with a space or directly with a feature (``4:1.0 ...``); a
  line whose first token holds a colon has no label list. A fully blank line is a document with
  neither labels nor features: the header's N counts it, so it is kept.
- A feature id ``>= D`` is an error, like a label id ``>= L``: the header is the file's only
  declaration of its feature space, train and test must agree on it, and the usual cause is a
  1-based file or a header that lies, either of which would silently shift every feature. The
  message says to fix the header (or the ids). Both headers must give the same D and L.
- A header that lies (more or fewer document lines than N) is an error at the first line that
  does not fit. Trailing spaces and tabs between pairs are accepted.
- A label listed twice on one line counts once; a feature listed twice has its values summed.
- Non-finite feature values (``nan``, ``inf``) are errors.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xmlgame.errors import DataFormatError, XmlgameError
from xmlgame.readers.common import (
    IdNames,
    LineColumn,
    WriterOptions,
    header_lies,
    parse_header,
    parse_id_list,
    parse_pairs,
    read_lines,
)

logger = logging.getLogger(__name__)

LAYOUT = "xc-bow"
REQUIRED = ("train.txt", "test.txt")
DESCRIPTION = (
    "train.txt, test.txt (or NAME_train.txt, NAME_test.txt) with header 'N D L' "
    "(optional: labels.txt)"
)
HEADER = ("N", "D", "L")


def split_files(source: Path) -> tuple[Path, Path] | None:
    """The (train, test) files of ``source``, or None when it has no such pair."""
    if not source.is_dir():
        return None
    if (source / "train.txt").is_file() and (source / "test.txt").is_file():
        return source / "train.txt", source / "test.txt"
    pairs = [
        (train, train.with_name(train.name[: -len("_train.txt")] + "_test.txt"))
        for train in sorted(source.glob("*_train.txt"))
    ]
    pairs = [(train, test) for train, test in pairs if test.is_file()]
    return pairs[0] if len(pairs) == 1 else None


def missing(source: Path) -> list[str]:
    if split_files(source) is not None:
        return []
    return [name for name in REQUIRED if not (source / name).is_file()]


def prepare(source: Path, out: Path, options: WriterOptions) -> None:
    files = split_files(source)
    if files is None:
        raise XmlgameError(f"{source} is not an {LAYOUT} folder: it needs {DESCRIPTION}")
    names_path = source / "labels.txt"
    inputs = list(files) + ([names_path] if names_path.is_file() else [])

    # headers first: they fix D and L, which every line is checked against
    streams, headers = [], []
    for path in files:
        lines = read_lines(path)
        first = next(lines, None)
        streams.append(lines)
        headers.append(parse_header(path, first and first[1], HEADER))
    (_, n_features, n_labels), (_, test_features, test_labels) = headers
    if (test_features, test_labels) != (n_features, n_labels):
        raise DataFormatError(
            files[1], 1, f"the header gives D = {test_features:,}, L = {test_labels:,}",
            f"D = {n_features:,}, L = {n_labels:,} as in {files[0].name} "
            "(both splits share one feature and label space)",
        )
    names = LineColumn(names_path, n_labels, "label name") if names_path.is_file() else None

    with options.open(
        out, LAYOUT, with_texts=False, with_features=True, input_files=inputs
    ) as writer:
        splits = zip(("train", "test"), files, streams, headers, strict=True)
        for split, path, lines, header in splits:
            _read_split(path, lines, writer.split(split), header[0], n_features, n_labels)
        writer.n_features = n_features
        writer.set_label_names(names if names is not None else IdNames(n_labels))


def _read_split(path: Path, lines, target, n_docs: int, n_features: int, n_labels: int):
    count = 0
    for lineno, line in lines:
        count += 1
        if count > n_docs:
            raise header_lies(path, lineno, n_docs, f"document {count:,} found")
        head, rest = (line.split(None, 1) + ["", ""])[:2]
        if ":" in head:  # no label list: the line starts with a feature
            head, rest = "", line
        labels = parse_id_list(head, path, lineno, n_labels, "label")
        ids, values = parse_pairs(rest, path, lineno, n_features, "feature")
        target.add(labels.tolist(), feature_ids=ids.tolist(), feature_values=values.tolist())
    if count < n_docs:
        raise header_lies(path, count + 2, n_docs, f"the file ends after {count:,} documents")
