"""LF (label features) layout of the Extreme Classification Repository: LF-AmazonTitles-131K & kin.

Files, in one folder::

    trn_X.txt, tst_X.txt        one document text per line
    Y.txt                       one label text per line, in label-id order
    trn_X_Y.txt, tst_X_Y.txt    header "N L", then per document "label:value label:value ..."
    Y.ids.txt                   optional: a unique name per label, in label-id order

Decisions on what real files hold:

- ``Y.txt`` always becomes the label texts. The label names are ``Y.ids.txt`` when present,
  else ``Y.txt`` again; ``Y.txt`` may repeat a title (two WordNet senses of "bank"), which is
  why ``Y.ids.txt`` exists, and a warning says how many names repeat when it is absent. Both
  files must have exactly ``L`` lines.
- Line ``i`` of ``trn_X.txt`` belongs to line ``i + 1`` of ``trn_X_Y.txt`` (after its header).
  A blank texts line is an empty text, a blank labels line a document without labels: both
  are kept, because skipping either would shift every later document onto the wrong labels.
- A header that lies (more or fewer documents than ``N``), a label id that is not an integer
  or is ``>= L``, and a bad ``label:value`` pair are errors at their line. Both headers must
  give the same ``L``.
- A listed label is relevant when its value is positive (``5:1.0``); ``5:0`` is dropped. A
  label listed twice on one line counts once.
- ``trn_X_Xf.txt`` / ``Y_Yf.txt`` (bag-of-words features some LF sets add) are not read: the
  texts carry the same words.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from xmlgame.errors import DataFormatError
from xmlgame.readers.common import (
    LineColumn,
    WriterOptions,
    header_lies,
    missing_files,
    paired_lines,
    parse_header,
    parse_pairs,
    read_lines,
    require_files,
)

logger = logging.getLogger(__name__)

LAYOUT = "lf"
REQUIRED = ("trn_X.txt", "tst_X.txt", "Y.txt", "trn_X_Y.txt", "tst_X_Y.txt")
DESCRIPTION = "trn_X.txt, tst_X.txt, Y.txt, trn_X_Y.txt, tst_X_Y.txt (optional: Y.ids.txt)"
SPLITS = {"train": "trn", "test": "tst"}


def missing(source: Path) -> list[str]:
    return missing_files(source, REQUIRED)


def prepare(source: Path, out: Path, options: WriterOptions) -> None:
    require_files(source, LAYOUT, REQUIRED)
    ids_path = source / "Y.ids.txt"
    inputs = [source / f for f in REQUIRED] + ([ids_path] if ids_path.is_file() else [])

    # headers first: they fix L, which the label files are checked against
    streams, headers = {}, {}
    for split, tag in SPLITS.items():
        path = source / f"{tag}_X_Y.txt"
        streams[split] = read_lines(path)
        first = next(streams[split], None)
        headers[split] = parse_header(path, first and first[1], ("N", "L"))
    n_labels, test_labels = headers["train"][1], headers["test"][1]
    if test_labels != n_labels:
        raise DataFormatError(
            source / "tst_X_Y.txt", 1, f"the header gives L = {test_labels:,}",
            f"L = {n_labels:,} as in trn_X_Y.txt (both splits share one label space)",
        )
    label_texts = LineColumn(source / "Y.txt", n_labels, "label text")
    if ids_path.is_file():
        names = LineColumn(ids_path, n_labels, "label name")
    else:
        names = label_texts
        _warn_repeated_names(label_texts)

    with options.open(out, LAYOUT, with_texts=True, input_files=inputs) as writer:
        for split, tag in SPLITS.items():
            _read_split(
                source / f"{tag}_X.txt", source / f"{tag}_X_Y.txt", streams[split],
                writer.split(split), headers[split][0], n_labels,
            )
        writer.set_label_names(names)
        writer.set_label_texts(label_texts)


def _read_split(texts_path, labels_path, label_lines, target, n_docs: int, n_labels: int):
    """Stream one split: text line ``i`` with labels line ``i + 1``."""
    count = 0
    pairs = paired_lines(texts_path, read_lines(texts_path), labels_path, label_lines, 1)
    for lineno, text, line in pairs:
        count += 1
        if count > n_docs:
            raise header_lies(labels_path, lineno, n_docs, f"document {count:,} found")
        ids, values = parse_pairs(line, labels_path, lineno, n_labels, "label")
        target.add(ids[values > 0].tolist(), text=text)
    if count < n_docs:
        problem = f"the file ends after {count:,} documents"
        raise header_lies(labels_path, count + 2, n_docs, problem)


def _warn_repeated_names(names: LineColumn) -> None:
    hashes = np.fromiter((hash(name) for name in names), dtype=np.int64, count=len(names))
    repeats = len(hashes) - len(np.unique(hashes))
    if repeats:
        logger.warning(
            "%s: %d label names repeat an earlier one; label ids stay distinct. Add Y.ids.txt "
            "(one unique name per line) to tell them apart", names.path, repeats,
        )
