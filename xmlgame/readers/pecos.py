"""PECOS xmc-base layout: texts in ``X.{trn,tst}.txt``, labels in ``Y.{trn,tst}.npz``.

The PECOS mirror of EURLex-4K, Wiki10-31K, AmazonCat-13K, Amazon-670K, Wiki-500K and Amazon-3M
ships, per dataset::

    X.trn.txt, X.tst.txt                  one text per line
    Y.trn.npz, Y.tst.npz                  scipy CSR (documents, L) label matrices
    tfidf-attnxml/X.trn.npz, X.tst.npz    optional: scipy CSR (documents, F) TF-IDF features
    output-items.txt                      optional: label names, one per line, in id order

Decisions on what real files hold:

- A blank line in a texts file is an empty text, not a skipped line: line ``i`` belongs to
  row ``i`` of the label matrix. A texts file with more or fewer lines than the matrix has
  rows is an error at the first line that does not fit.
- A stored entry of ``Y`` is a relevant label when its value is positive; stored zeros (and
  negative values) are dropped, so a matrix with explicit zeros does not invent labels.
- Without ``output-items.txt`` the label names are the ids as strings (``"0"``, ``"1"``, ...);
  with it, it must have exactly one line per column of ``Y``.
- The features are read only when both ``tfidf-attnxml`` matrices are present; one without
  the other is an error, and each must have one row per text.
- Rows of ``Y`` without any entry are documents without labels and are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmlgame.errors import DataFormatError, XmlgameError
from xmlgame.readers.common import (
    IdNames,
    LineColumn,
    WriterOptions,
    missing_files,
    read_lines,
    require_files,
)

logger = logging.getLogger(__name__)

LAYOUT = "pecos"
REQUIRED = ("X.trn.txt", "X.tst.txt", "Y.trn.npz", "Y.tst.npz")
FEATURES = ("tfidf-attnxml/X.trn.npz", "tfidf-attnxml/X.tst.npz")
NAMES = "output-items.txt"
DESCRIPTION = (
    "X.trn.txt, X.tst.txt, Y.trn.npz, Y.tst.npz (optional: tfidf-attnxml/X.trn.npz, "
    "tfidf-attnxml/X.tst.npz, output-items.txt)"
)
SPLITS = {"train": "trn", "test": "tst"}


def missing(source: Path) -> list[str]:
    return missing_files(source, REQUIRED)


def load_matrix(path: Path) -> sp.csr_matrix:
    """Load a scipy sparse ``.npz`` as float32 CSR, or raise :class:`DataFormatError`."""
    try:
        matrix = sp.load_npz(path)
    except Exception as exc:  # np.load raises many exception types for a bad file
        raise DataFormatError(
            path, None, f"cannot read it as a sparse matrix ({type(exc).__name__}: {exc})",
            "a matrix saved by scipy.sparse.save_npz",
        ) from None
    if not np.issubdtype(matrix.dtype, np.number):
        raise DataFormatError(path, None, f"matrix of {matrix.dtype}", "a numeric matrix")
    return sp.csr_matrix(matrix, dtype=np.float32)


def relevant(labels: sp.csr_matrix) -> sp.csr_matrix:
    """Keep the positive entries of a label matrix, as 1.0."""
    labels.data = (labels.data > 0).astype(np.float32)
    labels.eliminate_zeros()
    return labels


def feature_paths(source: Path) -> list[Path]:
    present = [source / f for f in FEATURES if (source / f).is_file()]
    if len(present) == 1:
        raise XmlgameError(
            f"{source} has {present[0].relative_to(source)} but not its other split; "
            f"give both {' and '.join(FEATURES)}, or neither"
        )
    return present


def prepare(source: Path, out: Path, options: WriterOptions) -> None:
    require_files(source, LAYOUT, REQUIRED)
    features = feature_paths(source)
    names_path = source / NAMES
    inputs = [source / f for f in REQUIRED] + features
    if names_path.is_file():
        inputs.append(names_path)

    # label matrices (and features) first: their shapes check everything else
    labels = {s: relevant(load_matrix(source / f"Y.{tag}.npz")) for s, tag in SPLITS.items()}
    n_labels = labels["train"].shape[1]
    _check_columns(source / "Y.tst.npz", labels["test"], n_labels, "labels", "Y.trn.npz")
    matrices = {}
    if features:
        matrices = {s: load_matrix(path) for s, path in zip(SPLITS, features, strict=True)}
        n_features = matrices["train"].shape[1]
        _check_columns(features[1], matrices["test"], n_features, "features", FEATURES[0])
    names = LineColumn(names_path, n_labels, "label name") if names_path.is_file() else None

    with options.open(
        out, LAYOUT, with_texts=True, with_features=bool(features), input_files=inputs
    ) as writer:
        for split, tag in SPLITS.items():
            texts_path = source / f"X.{tag}.txt"
            n_docs = labels[split].shape[0]
            if split in matrices:
                _check_rows(features[0 if split == "train" else 1], matrices[split], n_docs)
            target = writer.split(split)
            _stream_texts(texts_path, target.texts, n_docs, f"Y.{tag}.npz")
            target.labels.add_block(labels[split])
            if split in matrices:
                target.features.add_block(matrices[split])
        if features:
            writer.n_features = n_features
        writer.set_label_names(names if names is not None else IdNames(n_labels))


def _stream_texts(path: Path, column, n_docs: int, matrix_name: str) -> None:
    """Append each line of ``path`` to ``column``; it must have one line per matrix row."""
    count = 0
    for count, text in read_lines(path):
        if count > n_docs:
            raise DataFormatError(
                path, count, f"more lines than the {n_docs:,} rows of {matrix_name}",
                f"one text per row of {matrix_name}",
            )
        column.append(text)
    if count < n_docs:
        raise DataFormatError(
            path, count + 1, f"the file ends after {count:,} texts",
            f"{n_docs:,} texts, one per row of {matrix_name}",
        )


def _check_columns(path: Path, matrix, n_cols: int, what: str, reference: str) -> None:
    if matrix.shape[1] != n_cols:
        raise DataFormatError(
            path, None, f"{matrix.shape[1]:,} columns ({what})",
            f"{n_cols:,} columns, as in {reference}",
        )


def _check_rows(path: Path, matrix, n_docs: int) -> None:
    if matrix.shape[0] != n_docs:
        raise DataFormatError(
            path, None, f"{matrix.shape[0]:,} rows", f"{n_docs:,} rows, one per document"
        )
