"""The CD-GTMLL model: an encoder, its featurizer, and the players; saved and loaded as a run.

:class:`XmlModel` bundles what prediction needs. A run folder holds::

    run.json             the full configuration, the dataset it was trained on, its status
    shards.npz           the label-to-player assignment
    vocab.json/.idf.npy  the bag-of-words vocabulary (bag-of-words encoders)
    label_names.txt      the label names, so a run predicts without its dataset
    model.safetensors    the selected (best validation) weights
    label_index.faiss    the label shortlist of those weights (+ .json), for label sets too
    head_index.faiss     large to score every label: label centroids and/or the players'
                         heads (see :mod:`xmlgame.mining`)
    frequent_labels.npy  the labels scored for every document besides its shortlist

Use :func:`load` and :meth:`XmlModel.predict`::

    model = xmlgame.load("~/xmlgame/runs/20261203-debtags")
    model.predict(["a text editor for programmers"], k=5)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xmlgame.dataset import PreparedDataset
from xmlgame.encoders import (
    DocumentEncoder,
    EncoderConfig,
    SplitFeatures,
    TfidfVocabulary,
    batch_inputs,
    embedding_cache_key,
)
from xmlgame.errors import XmlgameError
from xmlgame.mining import Shortlister, join_label_lists
from xmlgame.paths import home
from xmlgame.players import Players
from xmlgame.shards import Shards

logger = logging.getLogger(__name__)

FREQUENT_FILE = "frequent_labels.npy"


@dataclass
class Prediction:
    """Top-k labels of each document: ids and fused probabilities, best first."""

    label_ids: np.ndarray  # int64 (n, k), -1 where fewer than k labels exist
    scores: np.ndarray  # float32 (n, k)


class XmlModel(torch.nn.Module):
    """Encoder + players, with the featurizer that turns texts into encoder inputs."""

    def __init__(
        self,
        encoder_config: EncoderConfig,
        shards: Shards,
        vocab: TfidfVocabulary | None,
        label_prior: np.ndarray | None = None,
        sparse_players: bool = True,
        held_players: range | None = None,
    ):
        """``held_players``: in label-parallel training, the players whose tables this process
        holds (see :class:`~xmlgame.players.Players`); all of them by default."""
        super().__init__()
        self.encoder_config = encoder_config
        self.shards = shards
        self.vocab = vocab
        self.encoder = DocumentEncoder(encoder_config, len(vocab) if vocab is not None else 0)
        self.players = Players(shards, self.encoder.dim, label_prior, sparse_players,
                               held=held_players)
        self.label_names: Sequence[str] | None = None
        # prediction through a label shortlist: used when one is set and shortlist_k > 0
        self.shortlister: Shortlister | None = None
        self.shortlist_k = 0  # labels shortlisted per document by each index
        self.shortlist_weight = 0.0  # weight of the shortlist's similarity in the final score
        # labels scored for every document besides its shortlist: the most frequent in training
        self.frequent_labels: np.ndarray | None = None

    @property
    def n_labels(self) -> int:
        return self.shards.n_labels

    # featurizing

    def featurize(
        self,
        texts: Sequence[str] | None = None,
        features=None,
        cache_fingerprint: str | None = None,
        progress: bool = True,
    ) -> SplitFeatures:
        """Encoder inputs for documents given as texts and/or the source's sparse features.

        With a frozen transformer, embeddings are computed once and cached on disk under
        ``$XMLGAME_HOME/cache/embeddings`` when ``cache_fingerprint`` names the documents.
        """
        out = SplitFeatures(texts=texts)
        if self.encoder.bow is not None:
            if self.vocab.terms is None:
                if features is None:
                    raise XmlgameError(
                        "this run's bag-of-words encoder reads the source's sparse features; "
                        "texts alone cannot be encoded by it"
                    )
                out.tfidf = self.vocab.weigh(features)
            else:
                if texts is None:
                    raise XmlgameError("this run's encoder reads texts; the input has none")
                out.tfidf = self.vocab.transform_texts(texts)
        if self.encoder.uses_cached_embeddings:
            if texts is None:
                raise XmlgameError("the transformer encoder needs texts; this dataset has none")
            out.embeddings = self._cached_embeddings(texts, cache_fingerprint, progress)
        return out

    def _cached_embeddings(self, texts, fingerprint: str | None, progress: bool) -> np.ndarray:
        transformer = self.encoder.transformer
        if fingerprint is None:
            return transformer.embed(texts, progress=progress)
        key = embedding_cache_key(transformer.name_or_path, transformer.max_length, fingerprint)
        path = home() / "cache" / "embeddings" / f"{key}.npy"
        if path.exists():
            logger.info("using cached embeddings %s", path)
            return np.load(path)
        embeddings = transformer.embed(texts, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, embeddings)
        tmp.replace(path)
        return embeddings

    # prediction

    @property
    def shortlisting(self) -> bool:
        """Whether prediction scores a per-document shortlist rather than every label."""
        return self.shortlister is not None and self.shortlist_k > 0

    @torch.no_grad()
    def predict_features(
        self, features: SplitFeatures, k: int = 10, batch_size: int = 512,
        label_block: int = 65_536, progress: bool = False,
    ) -> Prediction:
        """Top-k fused labels for featurized documents.

        With a shortlist (:attr:`shortlisting`), each document's ``shortlist_k`` nearest labels
        in each label index are scored, and the :attr:`frequent_labels`; otherwise every label
        is, in blocks of ``label_block``.
        """
        from tqdm.auto import tqdm

        self.eval()
        n = len(features)
        ids = np.full((n, k), -1, dtype=np.int64)
        scores = np.zeros((n, k), dtype=np.float32)
        if self.shortlisting:
            batch_size = min(batch_size, 256)  # B x K weight rows are gathered per batch
            score_batch = self._shortlist_batch
        else:
            blocks = [
                self.players.pairs(torch.arange(s, min(s + label_block, self.n_labels)))
                for s in range(0, self.n_labels, label_block)
            ]
            score_batch = functools.partial(self._exhaustive_batch, blocks=blocks)
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress):
            rows = np.arange(start, min(start + batch_size, n))
            h = self.encoder(batch_inputs(self.encoder, features, rows))
            best_i, best_s = score_batch(h, k)
            ids[rows, : best_i.shape[1]] = best_i.cpu().numpy()
            scores[rows, : best_s.shape[1]] = best_s.cpu().numpy()
        return Prediction(ids, scores)

    def _exhaustive_batch(self, h: torch.Tensor, k: int, blocks) -> tuple:
        k_eff = min(k, self.n_labels)
        best_s = h.new_full((h.shape[0], 0), -1.0)
        best_i = torch.zeros((h.shape[0], 0), dtype=torch.long, device=h.device)
        for pairs in blocks:
            probs = self.players.predict_proba(h, pairs)  # (B, C)
            s, i = torch.topk(probs, min(k_eff, probs.shape[1]), dim=1)
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, pairs.labels[i]], dim=1)
            best_s, order = torch.topk(best_s, min(k_eff, best_s.shape[1]), dim=1)
            best_i = torch.gather(best_i, 1, order)
        return best_i, best_s

    def shortlist(self, h: torch.Tensor, k: int) -> np.ndarray:
        """The labels scored for each document (int64 (B, K), -1 on empty slots): each label
        index's top ``k`` and the :attr:`frequent_labels`, each label once."""
        found = self.shortlister.search(h, k)
        if self.frequent_labels is not None and len(self.frequent_labels):
            every = np.broadcast_to(self.frequent_labels, (len(found), len(self.frequent_labels)))
            found = join_label_lists([found, every])
        return found

    def _shortlist_batch(self, h: torch.Tensor, k: int) -> tuple:
        labels = torch.from_numpy(self.shortlist(h, max(self.shortlist_k, k))).to(h.device)
        score = self.players.predict_proba_each(h, labels)  # (B, K), -1 on empty slots
        if self.shortlist_weight > 0:
            w = self.shortlist_weight
            similarity = self.shortlister.centroid_similarity(h, labels).clamp(min=0)
            score = torch.where(labels >= 0, (1 - w) * score + w * similarity, score)
        best_s, order = torch.topk(score, min(k, score.shape[1]), dim=1)
        best_i = torch.gather(labels, 1, order)
        best_i[best_s < 0] = -1  # empty slots when fewer labels exist than k
        best_s = best_s.clamp(min=0)
        return best_i, best_s

    def predict(self, texts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """The top-k (label name, probability) pairs of each text."""
        if isinstance(texts, str):
            texts = [texts]
        with few_threads(len(texts)):
            prediction = self.predict_features(self.featurize(list(texts), progress=False), k=k)
        names = self.label_names
        return [
            [(names[i] if names is not None else str(i), float(s))
             for i, s in zip(row_ids, row_scores) if i >= 0]
            for row_ids, row_scores in zip(prediction.label_ids, prediction.scores)
        ]

    # saving

    def save_static(self, run_dir: Path, label_names: Sequence[str]) -> None:
        """Everything but the weights: shards, vocabulary, label names."""
        self.shards.save(run_dir / "shards.npz")
        if self.vocab is not None:
            self.vocab.save(run_dir / "vocab")
        tmp = run_dir / "label_names.txt.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for name in label_names:
                f.write(name.replace("\n", " ") + "\n")
        tmp.replace(run_dir / "label_names.txt")

    def save_shortlister(self, run_dir: Path) -> None:
        """The label indexes and the frequent labels scored besides them."""
        if self.shortlister is not None:
            self.shortlister.save(run_dir)
        if self.frequent_labels is not None:
            tmp = run_dir / f"{FREQUENT_FILE}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, self.frequent_labels)
            tmp.replace(run_dir / FREQUENT_FILE)

    def frozen_prefix(self) -> str | None:
        """State-dict prefix of weights loaded from the transformer's folder, not trained."""
        return "encoder.transformer." if self.encoder.uses_cached_embeddings else None

    def save_weights(self, path: Path, state: dict | None = None) -> None:
        """The trained weights as safetensors; a frozen transformer stays in its own folder.

        ``state`` replaces this model's state dict (a label-parallel run's, gathered from the
        processes that hold each player: see :meth:`xmlgame.parallel.Parallel.state_dict`).
        """
        frozen = self.frozen_prefix()
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in (self.state_dict() if state is None else state).items()
            if frozen is None or not k.startswith(frozen)
        }
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(path)

    def load_weights(self, path: Path) -> None:
        """Load saved weights; tables this process does not hold (empty placeholders in
        label-parallel training) are left unread."""
        placeholders = {k for k, v in self.state_dict().items() if v.numel() == 0}
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k not in placeholders}
        missing, unexpected = self.load_state_dict(state, strict=False)
        frozen = self.frozen_prefix()
        missing = [k for k in missing if (frozen is None or not k.startswith(frozen))
                   and k not in placeholders]
        if missing or unexpected:
            raise XmlgameError(
                f"{path} does not match this model: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; was it written by another run or xmlgame version?"
            )


@contextlib.contextmanager
def few_threads(n_texts: int, small: int = 16):
    """One intra-op thread while predicting a handful of texts: their kernels are tiny, and a
    second OpenMP thread only adds synchronisation (measured: a single document took 224 ms
    with 2 threads on a busy 2-core machine and 12 ms with 1)."""
    if n_texts > small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def label_prior(dataset_counts: np.ndarray, n_docs: int) -> np.ndarray:
    """Smoothed fraction of training documents carrying each label."""
    return (dataset_counts + 0.1) / (n_docs + 1.0)


def load(run_dir: str | Path, weights: str = "model.safetensors") -> XmlModel:
    """Load a trained run for prediction."""
    run_dir = Path(run_dir).expanduser()
    config_path = run_dir / "run.json"
    if not config_path.exists():
        raise XmlgameError(f"{run_dir} is not a run folder (no run.json); train one first")
    if not (run_dir / weights).exists():
        raise XmlgameError(
            f"{run_dir} has no {weights}: the run did not finish an epoch; "
            "resume it with `xmlgame train --resume RUN`"
        )
    run = json.loads(config_path.read_text())
    encoder_config = EncoderConfig(**run["config"]["encoder"])
    vocab = None
    if encoder_config.kind != "transformer":
        vocab = TfidfVocabulary.load(run_dir / "vocab")
    model = XmlModel(encoder_config, Shards.load(run_dir / "shards.npz"), vocab)
    model.load_weights(run_dir / weights)
    model.shortlister = Shortlister.load(run_dir)
    if model.shortlister is not None:
        model.shortlist_k = run["config"].get("predict_shortlist", 0)
        model.shortlist_weight = run["config"].get("shortlist_weight", 0.0)
        if (run_dir / FREQUENT_FILE).exists():
            model.frequent_labels = _load_frequent(run_dir / FREQUENT_FILE, model.n_labels)
    names_path = run_dir / "label_names.txt"
    model.label_names = names_path.read_text(encoding="utf-8").split("\n")[:-1]
    model.run = run
    model.eval()
    return model


def _load_frequent(path: Path, n_labels: int) -> np.ndarray:
    """A run's frequent labels: distinct label ids below ``n_labels``, or a clear error."""
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise XmlgameError(
            f"{path} is not a readable .npy file ({error}); delete it to predict without "
            "the frequent labels, or train the run again"
        ) from None
    if (labels.ndim != 1 or labels.dtype.kind not in "iu" or len(np.unique(labels)) != len(labels)
            or (len(labels) and (labels.min() < 0 or labels.max() >= n_labels))):
        raise XmlgameError(
            f"{path} does not hold distinct label ids below {n_labels}; was it written by "
            "another run? Delete it to predict without the frequent labels"
        )
    return labels.astype(np.int64)


def dataset_fingerprint(dataset: PreparedDataset, split: str) -> str:
    return f"{dataset.meta['input_checksum']}|{dataset.name}|{split}"
