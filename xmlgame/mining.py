"""Keeping the label shortlist current while the model trains.

When a label set is too large to score every label, training and prediction both lean on FAISS
label indexes (:mod:`xmlgame.shortlist`). There are two, chosen with ``index_vectors``:

- **centroids**: a label's vector is the normalised mean of its training documents' normalised
  ``h(x)``; a label with no training document takes the encoder's embedding of its *name*, and
  where the name has no known word either, the weight row of its first owning player, so every
  label can be shortlisted and predicted. It finds labels whose documents look like the query.
- **heads**: a label's vector is its players' classifier ``[w, b]``, turned into a unit vector
  so that cosine order is logit order (:func:`head_vectors`). It finds what the players
  themselves rank first, so a shortlist holding it loses almost nothing against scoring every
  label; the centroid index alone misses many of those (on wordnet-hypernyms its top 100 held
  62% of the exhaustive top 5, the head index's top 100 all of them).

``both`` joins the two lists. The default, ``auto``, takes both while the index is exact (flat)
and the centroids alone once it is approximate: a label's bias dominates its head vector, the
vectors of the many rarely-seen labels are close to their random start, and approximate
search does not find their exact top K (an IVF index of them recalls 0.11 of it at 670k labels
after one epoch, against 0.95 for the centroids: ``benchmarks/results/scale.md``). What the
head index contributed there, the frequent labels a document is likely to carry, prediction
gets from :attr:`~xmlgame.model.XmlModel.frequent_labels` instead: the most frequent training
labels are scored for every document besides its shortlist (:func:`frequent_labels`).

A *refresh* rebuilds the indexes from the model as it is now, in three timed stages:

1. **encode**: one pass of the encoder (evaluation mode, no gradients) over the training
   documents;
2. **build**: the label vectors and their indexes (exact or approximate by size);
3. **mine**: each training document's top ``K`` labels from each index are its *hard
   negatives* (its own positives among them are harmless: they stay positives when the batch
   is assembled).

The trainer refreshes before the first epoch and after every epoch, so the negatives of epoch
``e`` come from the model after epoch ``e - 1``, and the indexes saved with the selected model
are built from that model's own weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from xmlgame.encoders import SplitFeatures, batch_inputs
from xmlgame.errors import XmlgameError
from xmlgame.shortlist import CentroidAccumulator, IndexConfig, LabelIndex

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_all(model, features: SplitFeatures, batch_size: int = 2048,
               progress: bool = False, desc: str = "encoding") -> np.ndarray:
    """``h(x)`` of every document of a featurized split, (n, D) float32, in evaluation mode."""
    was_training = model.training
    model.eval()
    n = len(features)
    out = np.empty((n, model.encoder.dim), dtype=np.float32)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = np.arange(start, min(start + batch_size, n))
        out[rows] = model.encoder(batch_inputs(model.encoder, features, rows)).cpu().numpy()
    model.train(was_training)
    return out


@torch.no_grad()
def fallback_vectors(model, labels: np.ndarray, label_names: Sequence[str] | None,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """Vectors (len(labels), D) for labels that no training document carries.

    The encoder's embedding of the label's name where the encoder reads texts and the name
    has a known word; otherwise the label's classifier direction, its fused weight row ``w``
    (from ``rows``, :func:`label_rows` of the model, computed here when not given).
    """
    out = np.zeros((len(labels), model.encoder.dim), dtype=np.float32)
    if len(labels) == 0:
        return out
    named = np.zeros(len(labels), dtype=bool)
    vocab = model.vocab
    readable = label_names is not None and (
        model.encoder.bow is None or (vocab is not None and vocab.terms is not None)
    )
    if readable:
        names = [name_to_text(label_names[int(label)]) for label in labels]
        features = model.featurize(names, progress=False)
        out[:] = encode_all(model, features)
        if features.tfidf is not None and model.encoder.transformer is None:
            named = np.diff(features.tfidf.indptr) > 0  # a name with no known word is noise
        else:
            named[:] = True
    unnamed = np.nonzero(~named)[0]
    if len(unnamed):
        rows = label_rows(model) if rows is None else rows
        out[unnamed] = rows[labels[unnamed], :-1]
    return out


def name_to_text(name: str) -> str:
    """A label name as words: ``Category:Science_fiction`` -> ``Category Science fiction``."""
    return name.replace("_", " ").replace(":", " ").replace("/", " ")


VECTORS = ("centroids", "heads", "both")


@torch.no_grad()
def label_rows(model) -> np.ndarray:
    """Each label's fused classifier row ``[w, b]`` (L, D + 1): the fusion-weighted sum of its
    owners' weight rows, so that ``[w, b] . [h, 1]`` is (exactly, for one owner; nearly, for
    two) the logit its players give ``h``.

    In label-parallel training each process adds its own players' rows and the parts are
    summed over processes, so every process must call this.
    """
    players = model.players
    owners = players.owner_player
    fusion = players.fusion.weight.detach().masked_fill(owners < 0, float("-inf")).softmax(-1)
    rows = torch.zeros(model.n_labels, players.dim + 1, device=fusion.device)
    for position in (0, 1):
        for player in players.held:
            labels = torch.nonzero(owners[:, position] == player).squeeze(1)
            if labels.numel():
                weight = players.tables[player].weight[players.owner_row[labels, position]]
                rows[labels] += fusion[labels, position, None] * weight
    if players.combine is not None:  # label-parallel: the other processes' players
        rows = players.combine(rows)
    return rows.cpu().numpy()


def head_vectors(model, rows: np.ndarray | None = None) -> np.ndarray:
    """Each label's classifier as a unit vector (L, D + 2) whose cosine with
    :func:`head_queries` ranks labels by their fused logit.

    From the rows ``[w, b]`` of :func:`label_rows` (computed here when not given), inner
    products become cosines by the usual augmentation: rows are divided by the largest norm
    ``m`` and given one more coordinate, ``sqrt(1 - |x|^2 / m^2)``, so every row has norm 1 and
    the order by cosine with ``[h, 1, 0]`` is the order by ``[w, b] . [h, 1]``.
    """
    rows = label_rows(model) if rows is None else rows
    norms = np.linalg.norm(rows, axis=1)
    scale = max(float(norms.max()), 1e-12)
    extra = np.sqrt(np.clip(1 - (norms / scale) ** 2, 0, None))[:, None]
    return np.ascontiguousarray(np.hstack([rows / scale, extra]), dtype=np.float32)


def head_queries(h: np.ndarray) -> np.ndarray:
    """Queries ``[h, 1, 0]`` for the index of :func:`head_vectors`."""
    n = len(h)
    return np.hstack([h, np.ones((n, 1), np.float32), np.zeros((n, 1), np.float32)])


def frequent_labels(train_counts: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` labels with the most training documents, most frequent first (ties by id);
    labels no training document has are left out. int64."""
    seen = np.flatnonzero(train_counts > 0)
    order = seen[np.argsort(-train_counts[seen], kind="stable")]
    return order[:n].astype(np.int64)


def join_label_lists(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Per-document label lists (each int64 (B, k_i), -1 for an empty slot) side by side, each
    label kept once: sorted, with repeats set to -1."""
    if len(parts) == 1:
        return parts[0]
    ids = np.sort(np.concatenate(parts, axis=1), axis=1)
    ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = -1
    return ids


class Shortlister:
    """The label shortlist of a model: an index of label centroids, of the players' heads, or
    both, whose per-document lists are joined.

    The centroid index finds labels whose documents resemble the query (it knows rare labels
    as soon as they have one document, or a name); the head index finds the labels the players
    themselves score highest, so a shortlist holding it misses almost nothing that scoring
    every label would rank first.
    """

    FILES = {"centroids": "label_index.faiss", "heads": "head_index.faiss"}

    def __init__(self, centroids: LabelIndex | None = None, heads: LabelIndex | None = None):
        if centroids is None and heads is None:
            raise ValueError("a shortlister needs at least one index")
        self.centroids = centroids
        self.heads = heads

    @property
    def kind(self) -> str:
        return "+".join(f"{name} ({index.kind})" for name, index in self.indexes().items())

    def indexes(self) -> dict[str, LabelIndex]:
        found = {"centroids": self.centroids, "heads": self.heads}
        return {name: index for name, index in found.items() if index is not None}

    def search(self, h, k: int) -> np.ndarray:
        """int64 (B, k per index) label ids: each index's top k, joined; repeats and empty
        slots are -1."""
        h = h.detach().cpu().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, np.float32)
        parts = []
        if self.centroids is not None:
            parts.append(self.centroids.search(h, k)[1])
        if self.heads is not None:
            parts.append(self.heads.search(head_queries(h), k)[1])
        return join_label_lists(parts)

    def centroid_similarity(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cosine of each document with its listed labels' centroids, (B, K); 0 on empty slots."""
        if self.centroids is None:
            raise XmlgameError("mixing in the shortlist's similarity needs the centroid index")
        safe = labels.clamp(min=0).reshape(-1).cpu().numpy()
        vectors = torch.from_numpy(self.centroids.index.reconstruct_batch(safe)).to(h.device)
        vectors = vectors.reshape(*labels.shape, -1)
        unit = torch.nn.functional.normalize(h, dim=1)
        return torch.einsum("bd,bkd->bk", unit, vectors).masked_fill(labels < 0, 0.0)

    def save(self, run_dir: Path) -> None:
        for name, index in self.indexes().items():
            index.save(run_dir / self.FILES[name])

    @classmethod
    def load(cls, run_dir: Path) -> Shortlister | None:
        """The shortlister saved in a folder, or None if it holds none."""
        found = {name: LabelIndex.load(run_dir / file) for name, file in cls.FILES.items()
                 if (run_dir / file).exists()}
        return cls(**found) if found else None


@dataclass
class Refresh:
    """A rebuilt label index, the hard negatives it gave, and what each stage cost."""

    shortlister: Shortlister
    hard_negatives: np.ndarray | None  # int32 (n_train, K per index), -1: none
    seconds: dict = field(default_factory=dict)

    def log_entry(self) -> dict:
        return {
            "index": self.shortlister.kind,
            **{f"refresh_{stage}_seconds": round(s, 2) for stage, s in self.seconds.items()},
        }


def refresh(model, features: SplitFeatures, Y: sp.csr_matrix, config: IndexConfig,
            mine_k: int, label_names: Sequence[str] | None = None, vectors: str = "both",
            progress: bool = False, rows: np.ndarray | None = None) -> Refresh:
    """Rebuild the label index(es) from the current model and mine ``mine_k`` negatives per
    training document from each (none when ``mine_k`` is 0). ``vectors``: which indexes, one
    of :data:`VECTORS`. ``rows``: the model's :func:`label_rows`, if already computed (it must
    be in label-parallel training, where computing them takes every process)."""
    if vectors not in VECTORS:
        raise XmlgameError(f"index vectors {vectors!r}: choose one of {', '.join(VECTORS)}")
    seconds = {}
    start = time.time()
    h = encode_all(model, features, progress=progress, desc="shortlist: encoding")
    seconds["encode"] = time.time() - start

    start = time.time()
    indexes = {}
    if vectors in ("centroids", "both"):
        centroids = CentroidAccumulator(model.n_labels, model.encoder.dim)
        for first in range(0, len(h), 65_536):
            centroids.add(h[first : first + 65_536], Y[first : first + 65_536])
        missing = np.nonzero(centroids.counts == 0)[0]
        fallback = None
        if len(missing):
            fallback = np.zeros((model.n_labels, model.encoder.dim), dtype=np.float32)
            fallback[missing] = fallback_vectors(model, missing, label_names, rows)
        indexes["centroids"] = LabelIndex.build(centroids.vectors(fallback), config,
                                                progress=progress)
    if vectors in ("heads", "both"):
        indexes["heads"] = LabelIndex.build(head_vectors(model, rows), config,
                                            progress=progress)
    shortlister = Shortlister(**indexes)
    seconds["build"] = time.time() - start

    hard = None
    if mine_k > 0:
        start = time.time()
        hard = np.concatenate([
            shortlister.search(h[first : first + 65_536], mine_k).astype(np.int32)
            for first in range(0, len(h), 65_536)
        ])
        seconds["mine"] = time.time() - start
    return Refresh(shortlister, hard, seconds)
