"""The predictions file: each test document's top-k labels and scores.

An xmlgame predictions file is an uncompressed NumPy ``.npz`` holding::

    label_ids   int64 (n, k)    label ids, best first; -1 pads rows with fewer than k labels
    scores      float32 (n, k)  their scores, descending (any value under padding)
    format      str             "xmlgame-topk/1"
    dataset     str             optional: the prepared dataset the rows belong to

Row ``i`` is the ``i``-th document of the dataset's test split. Equal scores are ranked by the
lower label id (see :mod:`xmlgame.metrics`); :func:`load_predictions` re-sorts each row that way,
so a file written by other tools need not be sorted.

:func:`load_predictions` also reads a scipy sparse ``.npz`` of shape ``(n, L)`` holding scores, as
PECOS (``smat_util.save_matrix``) and many XMC tools write; its stored entries are the predicted
labels and are turned into top-k arrays by :func:`topk_from_scores`.
"""

from __future__ import annotations

import logging
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmlgame.errors import XmlgameError
from xmlgame.metrics import TopK, rank_rows

logger = logging.getLogger(__name__)

FORMAT = "xmlgame-topk/1"
DEFAULT_SPARSE_K = 100  # widest top-k read from a sparse score matrix when k is not given
_SPARSE_KEYS = {"data", "indices", "indptr", "shape", "format"}


def save_predictions(path: str | Path, topk: TopK, dataset_name: str | None = None) -> Path:
    """Write ``topk`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"label_ids": topk.label_ids, "scores": topk.scores, "format": np.array(FORMAT)}
    if dataset_name is not None:
        arrays["dataset"] = np.array(str(dataset_name))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def topk_from_scores(scores: sp.spmatrix | np.ndarray, k: int) -> TopK:
    """The ``k`` best labels of each row of an (n, L) score matrix.

    For a sparse matrix only stored entries are candidates (rows with fewer pad with -1 and
    score -inf); for a dense one every label is. Ties go to the lower label id.
    """
    if k < 1:
        raise XmlgameError(f"k must be at least 1, not {k}")
    if sp.issparse(scores):
        return _topk_sparse(sp.csr_matrix(scores), k)
    dense = np.asarray(scores, dtype=np.float32)
    if dense.ndim != 2:
        raise XmlgameError(f"a score matrix must be 2-D (documents, labels), not {dense.shape}")
    width = min(k, dense.shape[1])
    order = np.argsort(-dense, axis=1, kind="stable")[:, :width]  # stable: lower id first
    label_ids = np.full((dense.shape[0], k), -1, dtype=np.int64)
    top = np.full((dense.shape[0], k), -np.inf, dtype=np.float32)
    label_ids[:, :width] = order
    top[:, :width] = np.take_along_axis(dense, order, axis=1)
    return TopK(label_ids, top)


def _topk_sparse(matrix: sp.csr_matrix, k: int) -> TopK:
    matrix.sum_duplicates()  # also sorts the ids within each row
    n = matrix.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(matrix.indptr))
    values = matrix.data.astype(np.float32)
    order = np.lexsort((matrix.indices, -values, rows))  # by row, then score, then id
    rank = np.arange(len(order)) - matrix.indptr[:-1][rows]
    keep = rank < k
    label_ids = np.full((n, k), -1, dtype=np.int64)
    top = np.full((n, k), -np.inf, dtype=np.float32)
    label_ids[rows[keep], rank[keep]] = matrix.indices[order][keep]
    top[rows[keep], rank[keep]] = values[order][keep]
    return TopK(label_ids, top)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.exists():
        raise XmlgameError(f"predictions file {path} does not exist")
    if path.is_dir():
        raise XmlgameError(f"{path} is a folder; give a predictions .npz file or a run folder")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise XmlgameError(
            f"cannot read predictions file {path}: {error}; expected an .npz written by "
            "xmlgame (label_ids, scores) or a scipy sparse score matrix"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise XmlgameError(
            f"{path} holds a single array; expected an .npz with label_ids and scores"
        )
    return npz


def stored_dataset_name(path: str | Path) -> str | None:
    """The dataset name saved in an xmlgame predictions file, or None."""
    path = Path(path)
    with _open_npz(path) as npz:
        if "dataset" in npz.files:
            return str(npz["dataset"])
    return None


def load_predictions(path: str | Path, k: int | None = None) -> TopK:
    """Read a predictions file (xmlgame top-k or scipy sparse scores) as a :class:`TopK`.

    Args:
        path: the ``.npz`` file.
        k: keep the ``k`` best labels per document. An xmlgame file narrower than ``k`` is
            returned as it is (metrics that need more then say so); a sparse matrix is padded to
            ``k``. None keeps an xmlgame file whole and takes from a sparse matrix its widest row,
            at most :data:`DEFAULT_SPARSE_K`.
    """
    path = Path(path)
    with _open_npz(path) as npz:
        files = set(npz.files)
        if {"label_ids", "scores"} <= files:
            try:
                label_ids, scores = npz["label_ids"], npz["scores"]
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                raise XmlgameError(f"cannot read predictions file {path}: {error}") from None
        elif {"data", "indices", "indptr", "shape"} <= files:
            return _load_sparse(path, k)
        else:
            raise XmlgameError(
                f"{path} holds arrays {', '.join(sorted(files)) or 'none'}; expected label_ids "
                "and scores (an xmlgame predictions file) or a scipy sparse matrix "
                f"({', '.join(sorted(_SPARSE_KEYS))})"
            )
    try:
        topk = TopK(label_ids, scores)  # checks shapes and dtypes
    except XmlgameError as error:
        raise XmlgameError(f"{path}: {error}") from None
    label_ids, scores = rank_rows(topk.label_ids, topk.scores)
    if k is not None:
        label_ids, scores = label_ids[:, :k], scores[:, :k]
    return TopK(label_ids, scores)


def _load_sparse(path: Path, k: int | None) -> TopK:
    try:
        matrix = sp.load_npz(path).tocsr()
    except (OSError, ValueError) as error:
        raise XmlgameError(f"cannot read sparse predictions {path}: {error}") from None
    if k is None:
        widest = int(np.diff(matrix.indptr).max(initial=0))
        k = max(1, min(widest, DEFAULT_SPARSE_K))
    logger.debug("read %s: sparse (%d, %d) scores, keeping top %d", path, *matrix.shape, k)
    return topk_from_scores(matrix, k)
