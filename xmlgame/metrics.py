"""Ranking metrics for extreme multi-label classification, with pyxclib's conventions.

Predictions come as a :class:`TopK`: for each of ``n`` documents the ``k`` best label ids and
their scores. Ground truth is a CSR ``(n, L)`` matrix; any stored non-zero marks a relevant label.
Every metric is computed in chunks of documents, so the work is ``O(k + true labels)`` per document
and 150k test documents over 670k labels fit in memory.

Conventions (those of pyxclib's ``xclib/evaluation/xc_metrics.py``, the Extreme Classification
Repository's reference code, unless said otherwise). Notation: ``r_i1, r_i2, ...`` is document
``i``'s ranking, ``y_il`` its truth, ``n_i`` its number of true labels, ``n`` documents in all.

- **Ranking and ties.** A row is ranked by score, highest first; equal scores are broken by the
  lower label id; padding (id ``-1``) ranks last and never counts as a hit.
- **Inverse propensity** ``q_l = 1 + C (n_l + B)^-A`` with ``C = (ln N - 1)(B + 1)^A``, ``n_l``
  the *training* documents carrying label ``l`` and ``N`` all training documents. Labels never seen
  in training (``n_l = 0``) still get a (large) ``q_l``.
- **P@k** ``= 1/n sum_i 1/k sum_{j<=k} y_i,r_ij``: every document counts, also one with no true
  label or fewer than ``k`` predictions.
- **nDCG@k** ``= 1/n sum_i DCG_i@k / IDCG_i@k`` with ``DCG_i@k = sum_{j<=k} y_i,r_ij / log2(j+1)``
  and ``IDCG_i@k = sum_{j<=min(k, n_i)} 1 / log2(j+1)``. A document with no true label scores 0
  and stays in the mean (pyxclib indexes its normaliser past the end of a cumulative table, which
  gives a non-zero divisor over a zero gain).
- **PSP@k** is a *ratio of sums*: ``sum_i sum_{j<=k} q_r_ij y_i,r_ij`` divided by the same sum for
  the best achievable ranking, each document's true labels sorted by ``q_l`` descending (at most
  ``k`` of them). pyxclib divides two means over the same documents, which is the same ratio.
- **PSnDCG@k** divides ``sum_i PSDCG_i@k / IDCG_i@k`` (gains weighted by ``q_l``) by the same sum
  for the best achievable ranking; ``IDCG_i@k`` is the *unweighted* normaliser of nDCG@k.
- **Recall@k** ``= 1/n sum_i hits_i@k / max(n_i, 1)``: documents with no true label count as 0.
- **Coverage@k** (not in pyxclib): the fraction of labels present in the test truth that are
  correctly predicted in the top ``k`` of at least one document.
- **Rare-F1@k** (not in pyxclib): micro-F1 over rare labels, ``1 <= n_l <= tau``. The predicted
  set of a document is its top ``k`` (optionally only scores ``>= score_threshold``). Over all
  documents, TP = predicted rare labels that are true, FP = predicted rare labels that are not,
  FN = true rare labels not predicted; ``F1 = 2 TP / (2 TP + FP + FN)``. Labels never seen in
  training are not rare; :func:`compute_report` counts their test assignments instead.
- **Buckets** ``p@k[B]`` and ``psp@k[B]`` are the *contribution* of the labels of bucket ``B`` to
  P@k and PSP@k: the same formula and the same denominator, with hits outside ``B`` not counted,
  so the buckets of one scheme add up to the overall value. Labels are ranked by training count;
  ``head``/``torso``/``tail`` each hold about a third of the training label assignments (``d1`` to
  ``d10``, a tenth each, ``d1`` the most frequent), labels with equal counts share a bucket, and
  labels never seen in training fall in the last bucket.
- A metric whose denominator is zero (for instance PSP@k on a test split with no labels) is 0.

Values are fractions in ``[0, 1]``; tables print them as percentages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)

FAMILIES = ("p", "ndcg", "psp", "psndcg", "recall", "coverage", "rare-f1")
BUCKETED_FAMILIES = ("p", "psp")
# bucket name -> (number of buckets in its scheme, index within the scheme, 0 = most frequent)
BUCKETS = {
    "head": (3, 0),
    "torso": (3, 1),
    "tail": (3, 2),
    **{f"d{i}": (10, i - 1) for i in range(1, 11)},
}
STANDARD = (
    "p@1", "p@3", "p@5",
    "ndcg@1", "ndcg@3", "ndcg@5",
    "psp@1", "psp@3", "psp@5",
    "psndcg@1", "psndcg@3", "psndcg@5",
    "recall@5", "coverage@5", "rare-f1@5",
    "p@5[head]", "p@5[torso]", "p@5[tail]",
    "psp@5[head]", "psp@5[torso]", "psp@5[tail]",
)  # fmt: skip
DEFAULT_RARE_THRESHOLD = 10
CHUNK_ENTRIES = 1 << 21  # top-k entries handled at once (rows per chunk = this // k)

_NAME = re.compile(r"^(p|ndcg|psp|psndcg|recall|coverage|rare-f1)@([0-9]+)(?:\[([a-z0-9]+)\])?$")


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class TopK:
    """The ``k`` best labels of ``n`` documents.

    Attributes:
        label_ids: int64 (n, k) label ids, ``-1`` for padding (fewer than k predictions).
        scores: float32 (n, k) scores of those labels (any value for padding).
    """

    label_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        label_ids = np.asarray(self.label_ids)
        scores = np.asarray(self.scores)
        if label_ids.ndim != 2 or label_ids.shape != scores.shape:
            raise XmlgameError(
                f"top-k label_ids {label_ids.shape} and scores {scores.shape} must be two "
                "arrays of the same (documents, k) shape"
            )
        if label_ids.size and not np.issubdtype(label_ids.dtype, np.integer):
            raise XmlgameError(f"top-k label_ids must be integers, not {label_ids.dtype}")
        object.__setattr__(self, "label_ids", label_ids.astype(np.int64, copy=False))
        object.__setattr__(self, "scores", scores.astype(np.float32, copy=False))

    @property
    def n_docs(self) -> int:
        return self.label_ids.shape[0]

    @property
    def k(self) -> int:
        return self.label_ids.shape[1]


def rank_rows(label_ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, ties by lower label id, padding (-1) last."""
    if label_ids.shape[1] <= 1:
        return label_ids, scores
    order = np.lexsort((label_ids, -scores, label_ids < 0), axis=-1)
    return (
        np.take_along_axis(label_ids, order, axis=-1),
        np.take_along_axis(scores, order, axis=-1),
    )


def inverse_propensity(
    train_counts: np.ndarray, n_train: int, A: float, B: float  # noqa: N803 (paper's names)
) -> np.ndarray:
    """Inverse propensities ``q_l = 1 + C (n_l + B)^-A``, ``C = (ln N - 1)(B + 1)^A``.

    Args:
        train_counts: int (L,) training documents per label (``n_l``).
        n_train: ``N``, the number of training documents (with or without labels).
        A, B: the dataset's propensity constants (Jain et al., 2016).

    Returns:
        float64 (L,) ``q_l``; labels with ``n_l = 0`` get ``1 + C B^-A``.
    """
    if n_train < 1:
        raise XmlgameError(
            f"inverse propensities need at least one training document, not {n_train}"
        )
    counts = np.asarray(train_counts, dtype=np.float64)
    c = (np.log(n_train) - 1.0) * (B + 1.0) ** A
    return 1.0 + c * np.power(counts + B, -A)


def label_buckets(train_counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """int64 (L,) bucket of each label, 0 = most frequent, by equal shares of training assignments.

    A label's bucket is ``floor(n_buckets * S / total)`` (capped at ``n_buckets - 1``) with ``S``
    the training assignments of all labels strictly more frequent than it, so labels with equal
    counts share a bucket and unseen labels land in the last one.
    """
    counts = np.asarray(train_counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.full(len(counts), n_buckets - 1, dtype=np.int64)
    values, inverse = np.unique(-counts, return_inverse=True)  # most frequent first
    per_value = np.bincount(inverse, weights=counts.astype(np.float64))
    before = np.concatenate([[0.0], np.cumsum(per_value)[:-1]])
    bucket_of_value = np.minimum((n_buckets * before) // total, n_buckets - 1).astype(np.int64)
    return bucket_of_value[inverse.ravel()]


# --------------------------------------------------------------------------------------------
# metric names


@dataclass(frozen=True)
class MetricSpec:
    """One metric: a family, a cut-off ``k`` and, for p/psp, an optional label bucket."""

    family: str
    k: int
    bucket: str | None = None

    @property
    def name(self) -> str:
        return f"{self.family}@{self.k}" + (f"[{self.bucket}]" if self.bucket else "")


def _valid_names_hint() -> str:
    return (
        "valid metrics are p@K, ndcg@K, psp@K, psndcg@K, recall@K, coverage@K, rare-f1@K "
        "(K a positive integer), p@K[B] and psp@K[B] with bucket B one of "
        f"{', '.join(BUCKETS)}, or 'standard' for {', '.join(STANDARD)}"
    )


def parse_metric(name: str) -> MetricSpec:
    """A :class:`MetricSpec` from one name such as ``"PSP@5"`` or ``"p@5[tail]"``."""
    text = name.strip().lower().replace("_", "-").replace(" ", "")
    match = _NAME.match(text)
    if match is None:
        raise XmlgameError(f"unknown metric {name!r}; {_valid_names_hint()}")
    family, k, bucket = match.group(1), int(match.group(2)), match.group(3)
    if k < 1:
        raise XmlgameError(f"metric {name!r} has cut-off k = 0 (k >= 1); {_valid_names_hint()}")
    if bucket is not None and (family not in BUCKETED_FAMILIES or bucket not in BUCKETS):
        raise XmlgameError(f"unknown metric {name!r}; {_valid_names_hint()}")
    return MetricSpec(family, k, bucket)


def parse_metric_names(names: Iterable[str] | None) -> list[str]:
    """Canonical metric names from user input (repeats and comma lists, any case).

    ``None`` gives :data:`STANDARD`; ``"standard"`` expands in place; duplicates are dropped.
    Raises :class:`XmlgameError`, listing the valid names, for an unknown one.
    """
    if names is None:
        return list(STANDARD)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for entry in names:
        for raw in entry.split(","):
            if not raw.strip():
                continue
            if raw.strip().lower() == "standard":
                expanded = list(STANDARD)
            else:
                expanded = [parse_metric(raw).name]
            out.extend(name for name in expanded if name not in out)
    if not out:
        raise XmlgameError(f"no metric names given; {_valid_names_hint()}")
    return out


# --------------------------------------------------------------------------------------------
# computation


@dataclass
class MetricsReport:
    """Metric values (fractions) and the counts behind them.

    ``counts`` holds ``docs``, ``docs_without_labels``, ``test_assignments``,
    ``unseen_label_assignments`` (test assignments of labels with no training document),
    ``rare_labels`` and ``rare_assignments`` (test assignments of rare labels), and for each
    Rare-F1 metric a ``{"tp", "fp", "fn"}`` dict under its name.
    """

    metrics: dict[str, float]
    counts: dict[str, object] = field(default_factory=dict)


def _chunk_truth(Y: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of Y with sorted, unique, non-zero entries."""
    chunk = Y[start:stop]
    chunk.sum_duplicates()
    chunk.eliminate_zeros()
    return chunk


def _check_ids(ids: np.ndarray, n_labels: int, row0: int) -> None:
    bad = (ids < -1) | (ids >= n_labels)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise XmlgameError(
            f"predicted label id {ids[row, col]} in document {row0 + row} is outside "
            f"[0, {n_labels}) (use -1 for padding); were the predictions made for another dataset?"
        )
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = int(np.argwhere(repeated)[0, 0])
        raise XmlgameError(
            f"document {row0 + row} lists a label id twice in its top-k predictions; "
            "each label may appear once per document"
        )


def _hits(truth: sp.csr_matrix, ids: np.ndarray) -> np.ndarray:
    """bool (b, k): whether each predicted id is a true label of its document."""
    if truth.nnz == 0:
        return np.zeros(ids.shape, dtype=bool)
    b, stride = ids.shape[0], truth.shape[1] + 1  # stride L + 1: padding -1 never matches
    rows = np.repeat(np.arange(b, dtype=np.int64), np.diff(truth.indptr))
    true_keys = rows * stride + truth.indices  # sorted: rows ascending, indices sorted
    query = np.arange(b, dtype=np.int64)[:, None] * stride + ids
    pos = np.minimum(np.searchsorted(true_keys, query), len(true_keys) - 1)
    return (true_keys[pos] == query) & (ids >= 0)


def _idcg(cum_discount: np.ndarray, n_true: np.ndarray, k: int) -> np.ndarray:
    """nDCG normaliser per document; a document without labels gets the full ``k`` (pyxclib)."""
    depth = np.where(n_true == 0, k, np.minimum(n_true, k))
    return cum_discount[depth - 1]


class _Accumulator:
    """Numerators and denominators of every metric, summed over document chunks."""

    def __init__(self, specs, q, buckets, rare, n_labels, score_threshold):
        self.specs = specs
        self.q_ext = np.append(q, 0.0)  # index -1 (padding) weighs 0
        self.buckets = {n: np.append(b, -1) for n, b in buckets.items()}
        self.rare_ext = np.append(rare, False)
        self.score_threshold = score_threshold
        self.num = dict.fromkeys((s.name for s in specs), 0.0)
        self.den = dict.fromkeys((s.name for s in specs), 0.0)
        coverage_ks = {s.k for s in specs if s.family == "coverage"}
        self.covered = {k: np.zeros(n_labels, dtype=bool) for k in coverage_ks}
        self.tp = {s.k: 0 for s in specs if s.family == "rare-f1"}
        self.fp = dict.fromkeys(self.tp, 0)

    def add(self, truth: sp.csr_matrix, ids: np.ndarray, scores: np.ndarray) -> None:
        kmax = ids.shape[1]
        hits = _hits(truth, ids)  # (b, kmax)
        q_hits = self.q_ext[ids] * hits  # (b, kmax)
        n_true = np.diff(truth.indptr)  # (b,)
        depth = max(kmax, int(n_true.max(initial=0)))
        discount = 1.0 / np.log2(np.arange(depth) + 2.0)
        cum_discount = np.cumsum(discount)

        # best achievable ranking: each document's true labels by q descending
        rows = np.repeat(np.arange(len(n_true)), n_true)
        q_true = self.q_ext[truth.indices]
        order = np.lexsort((-q_true, rows))
        rank = np.arange(len(rows)) - truth.indptr[:-1][rows]
        q_best = q_true[order]

        for spec in self.specs:
            k, name = spec.k, spec.name
            top_hits, top_q = hits[:, :k], q_hits[:, :k]
            if spec.family == "p":
                in_bucket = self._in_bucket(spec, ids[:, :k])
                self.num[name] += float((top_hits & in_bucket).sum())
                self.den[name] += float(top_hits.shape[0] * k)
            elif spec.family == "psp":
                in_bucket = self._in_bucket(spec, ids[:, :k])
                self.num[name] += float((top_q * in_bucket).sum())
                self.den[name] += float(q_best[rank < k].sum())
            elif spec.family == "ndcg":
                gain = top_hits @ discount[:k]
                self.num[name] += float((gain / _idcg(cum_discount, n_true, k)).sum())
                self.den[name] += float(len(n_true))
            elif spec.family == "psndcg":
                idcg = _idcg(cum_discount, n_true, k)
                self.num[name] += float(((top_q @ discount[:k]) / idcg).sum())
                best = rank < k
                best_gain = q_best[best] * discount[rank[best]] / idcg[rows[best]]
                self.den[name] += float(best_gain.sum())
            elif spec.family == "recall":
                self.num[name] += float((top_hits.sum(axis=1) / np.maximum(n_true, 1)).sum())
                self.den[name] += float(len(n_true))
            elif spec.family == "coverage":
                self.covered[k][ids[:, :k][top_hits]] = True
            elif spec.family == "rare-f1":
                predicted = self.rare_ext[ids[:, :k]]
                if self.score_threshold is not None:
                    predicted &= scores[:, :k] >= self.score_threshold
                self.tp[k] += int((predicted & top_hits).sum())
                self.fp[k] += int((predicted & ~top_hits).sum())

    def _in_bucket(self, spec: MetricSpec, ids: np.ndarray) -> np.ndarray | bool:
        if spec.bucket is None:
            return True
        n_buckets, index = BUCKETS[spec.bucket]
        return self.buckets[n_buckets][ids] == index


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def compute_report(
    topk: TopK,
    Y_true: sp.spmatrix,  # noqa: N803 (the usual name of a label matrix)
    train_counts: np.ndarray,
    n_train: int,
    A: float,  # noqa: N803
    B: float,  # noqa: N803
    names: Sequence[str] | None = None,
    rare_threshold: int = DEFAULT_RARE_THRESHOLD,
    score_threshold: float | None = None,
) -> MetricsReport:
    """Metric values and the counts behind them; see :func:`compute_metrics`."""
    specs = [parse_metric(name) for name in parse_metric_names(names)]
    Y = sp.csr_matrix(Y_true)
    n, n_labels = Y.shape
    train_counts = np.asarray(train_counts, dtype=np.int64)
    if len(train_counts) != n_labels:
        raise XmlgameError(
            f"{len(train_counts)} training label counts for a label matrix with {n_labels} labels"
        )
    if topk.n_docs != n:
        raise XmlgameError(f"predictions cover {topk.n_docs} documents, the truth has {n}")
    kmax = max(spec.k for spec in specs)
    if topk.k < kmax:
        needs = ", ".join(s.name for s in specs if s.k > topk.k)
        raise XmlgameError(
            f"the predictions hold {topk.k} labels per document, too few for {needs}; "
            f"save at least {kmax} predictions per document or choose k <= {topk.k}"
        )
    if rare_threshold < 1:
        raise XmlgameError(f"rare_threshold must be at least 1, not {rare_threshold}")

    # per-label tables
    q = inverse_propensity(train_counts, n_train, A, B)
    schemes = {BUCKETS[s.bucket][0] for s in specs if s.bucket is not None}
    buckets = {n_buckets: label_buckets(train_counts, n_buckets) for n_buckets in schemes}
    rare = (train_counts >= 1) & (train_counts <= rare_threshold)
    acc = _Accumulator(specs, q, buckets, rare, n_labels, score_threshold)

    # documents, a chunk at a time
    step = max(1, CHUNK_ENTRIES // topk.k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        ids, scores = topk.label_ids[start:stop], topk.scores[start:stop]
        if np.isnan(scores).any():
            raise XmlgameError(f"predicted scores of documents {start}..{stop - 1} contain NaN")
        _check_ids(ids, n_labels, start)
        ids, scores = rank_rows(ids, scores)  # rank whole rows, then cut at the largest k
        acc.add(_chunk_truth(Y, start, stop), ids[:, :kmax], scores[:, :kmax])

    return _finish(acc, specs, Y, train_counts, rare)


def _finish(acc, specs, Y, train_counts, rare) -> MetricsReport:
    truth = Y.copy()
    truth.sum_duplicates()
    truth.eliminate_zeros()
    present = np.zeros(Y.shape[1], dtype=bool)
    present[truth.indices] = True
    rare_assignments = int(rare[truth.indices].sum())
    counts: dict[str, object] = {
        "docs": int(Y.shape[0]),
        "docs_without_labels": int((np.diff(truth.indptr) == 0).sum()),
        "test_assignments": int(truth.nnz),
        "unseen_label_assignments": int((train_counts[truth.indices] == 0).sum()),
        "rare_labels": int(rare.sum()),
        "rare_assignments": rare_assignments,
    }
    metrics: dict[str, float] = {}
    for spec in specs:
        if spec.family == "coverage":
            metrics[spec.name] = _ratio(acc.covered[spec.k].sum(), present.sum())
        elif spec.family == "rare-f1":
            tp, fp = acc.tp[spec.k], acc.fp[spec.k]
            fn = rare_assignments - tp
            metrics[spec.name] = _ratio(2 * tp, 2 * tp + fp + fn)
            counts[spec.name] = {"tp": tp, "fp": fp, "fn": fn}
        else:
            metrics[spec.name] = _ratio(acc.num[spec.name], acc.den[spec.name])
    return MetricsReport(metrics, counts)


def compute_metrics(
    topk: TopK,
    Y_true: sp.spmatrix,  # noqa: N803
    train_counts: np.ndarray,
    n_train: int,
    A: float,  # noqa: N803
    B: float,  # noqa: N803
    names: Sequence[str] | None = None,
    rare_threshold: int = DEFAULT_RARE_THRESHOLD,
    score_threshold: float | None = None,
) -> dict[str, float]:
    """Score top-k predictions against the truth, with the conventions of this module's docstring.

    Args:
        topk: predictions for the ``n`` documents, at least as wide as the largest requested k.
        Y_true: (n, L) sparse truth; any stored non-zero is a relevant label.
        train_counts: int (L,) training documents per label (for propensities, rarity, buckets).
        n_train: training documents, for the propensity constant ``C``.
        A, B: propensity constants.
        names: metric names (see :func:`parse_metric_names`); None for :data:`STANDARD`.
        rare_threshold: ``tau`` of Rare-F1: rare labels have 1..tau training documents.
        score_threshold: Rare-F1 only: predicted labels must also score at least this.

    Returns:
        ``{name: value}`` in the order asked, values fractions in ``[0, 1]``.
    """
    report = compute_report(
        topk, Y_true, train_counts, n_train, A, B, names, rare_threshold, score_threshold
    )
    return report.metrics
