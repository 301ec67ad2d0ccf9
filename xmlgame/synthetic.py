"""Synthetic XMC data: learnable, long-tailed, seeded, and as large as Amazon-670K.

The generator draws each document's labels from a Zipf distribution over the L labels, then writes
the document from them:

- **labels.** A document has ``1 + Poisson(labels_per_doc - 1)`` label draws (duplicates merged),
  label ``l`` drawn with probability proportional to ``(rank(l) + 1) ** -zipf_exponent``. Ranks
  are a seeded permutation of the label ids, so ``label-000000`` is not the most frequent label.
- **coverage.** With ``cover_all_labels`` (the default) every label is also given to one random
  training document, and the Zipf draws of training documents are reduced to keep
  ``labels_per_doc`` the mean. So every label has at least one training document, as in the
  benchmark sets this mimics, and the tail is made of labels with one or a few documents. With
  it off, tail labels may have no training document at all (a pure Zipf sample; some appear in
  test only).
- **text.** Each label owns ``signature_size`` signature words; for each of its labels a document
  gets ``tokens_per_label`` words drawn from that label's signature, plus ``Poisson(noise_tokens)``
  noise words drawn Zipf-like (exponent 1) from the whole vocabulary, shuffled together. Words are
  written ``w123``. A label is thus predictable from its signature words, while signatures
  overlap between labels and noise words blur them, as real vocabulary does.
- **sparse inputs.** With ``inputs='sparse'`` the same words become an L2-normalised term-count
  vector over the vocabulary (``train.X`` / ``test.X``), and no texts are written.

Documents are generated in chunks with numpy and streamed into :class:`DatasetWriter`, so memory
stays bounded by the label matrices and one chunk: an Amazon-670K-sized set (670,091 labels,
490,449 + 153,025 documents) takes a few minutes and well under 1 GiB.
Output depends only on the config: chunk ``i`` of a split draws from its own seeded stream.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from xmlgame import paths
from xmlgame.dataset import DEFAULT_A, DEFAULT_B, DatasetWriter, PreparedDataset, load_dataset
from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)

INPUTS = ("text", "sparse")
CHUNK_DOCS = 8192
MAX_LABEL_DRAWS = 64  # per document, before duplicates merge
_SPLIT_STREAM = {"train": 1, "test": 2}


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; validated at construction and saved in the dataset's ``meta.json``.

    Attributes:
        n_labels: L, the number of labels.
        n_train, n_test: documents in each split.
        inputs: ``'text'`` (documents as words) or ``'sparse'`` (term-count feature vectors).
        labels_per_doc: mean labels per document (>= 1).
        zipf_exponent: label frequency falls as ``rank ** -zipf_exponent``; 0 is uniform.
        vocab_size: words in the vocabulary (default: ``max(1000, n_labels // 2)``).
        signature_size: signature words each label owns.
        tokens_per_label: signature words a document draws for each of its labels.
        noise_tokens: mean number of noise words per document.
        cover_all_labels: give every label at least one training document.
        seed: the random seed; equal configs give byte-identical data.
    """

    n_labels: int = 10_000
    n_train: int = 20_000
    n_test: int = 5_000
    inputs: str = "text"
    labels_per_doc: float = 4.0
    zipf_exponent: float = 1.0
    vocab_size: int | None = None
    signature_size: int = 4
    tokens_per_label: int = 3
    noise_tokens: float = 20.0
    cover_all_labels: bool = True
    seed: int = 0

    def __post_init__(self):
        _at_least("n_labels", self.n_labels, 1)
        _at_least("n_train", self.n_train, 1)
        _at_least("n_test", self.n_test, 0)
        if self.inputs not in INPUTS:
            raise XmlgameError(
                f"inputs={self.inputs!r} is not a synthetic input kind; choose one of "
                f"{', '.join(INPUTS)}"
            )
        _at_least("labels_per_doc", self.labels_per_doc, 1)
        _at_least("zipf_exponent", self.zipf_exponent, 0)
        if self.vocab_size is not None:
            _at_least("vocab_size", self.vocab_size, 2)
        _at_least("signature_size", self.signature_size, 1)
        _at_least("tokens_per_label", self.tokens_per_label, 1)
        _at_least("noise_tokens", self.noise_tokens, 0)

    @property
    def vocab(self) -> int:
        """The vocabulary size in effect."""
        return self.vocab_size if self.vocab_size is not None else max(1000, self.n_labels // 2)

    @property
    def name(self) -> str:
        """The default dataset name, e.g. ``synthetic-670091labels-text-seed0``."""
        return f"synthetic-{self.n_labels}labels-{self.inputs}-seed{self.seed}"


def _at_least(name: str, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise XmlgameError(f"{name}={value!r} is not allowed; it must be a number >= {low}")


# --------------------------------------------------------------------------------------------
# the generator


class _World:
    """The seeded structures every chunk shares: label and word frequencies, signatures."""

    def __init__(self, config: SyntheticConfig):
        rng = np.random.default_rng([config.seed, 0])
        L, V = config.n_labels, config.vocab  # noqa: N806 (the glossary's names)
        self.config = config
        self.label_cdf = _zipf_cdf(L, config.zipf_exponent)  # (L,) over frequency ranks
        self.label_of_rank = rng.permutation(L)
        self.word_cdf = _zipf_cdf(V, 1.0)  # (V,)
        self.word_of_rank = rng.permutation(V)
        self.signatures = rng.integers(0, V, size=(L, config.signature_size))  # (L, S)
        # coverage: each label's one guaranteed training document, sorted by document
        cover_docs = rng.integers(0, config.n_train, size=L)
        self.cover_labels = np.argsort(cover_docs, kind="stable")
        self.cover_docs = cover_docs[self.cover_labels]
        cover_rate = L / config.n_train if config.cover_all_labels else 0.0
        self.extra_draws = {
            "train": max(config.labels_per_doc - 1 - cover_rate, 0.0),
            "test": config.labels_per_doc - 1,
        }
        if config.cover_all_labels and cover_rate > config.labels_per_doc - 1:
            logger.warning(
                "covering %s labels with %s training documents gives them %.1f labels each on "
                "average, more than labels_per_doc=%g", f"{L:,}", f"{config.n_train:,}",
                1 + cover_rate, config.labels_per_doc,
            )
        self.words = _word_table(V)

    def chunk(self, split: str, index: int, start: int, n: int):
        """Documents ``start .. start + n`` of a split: (labels CSR (n, L), tokens, token_ptr)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, _SPLIT_STREAM[split], index])
        labels = self._labels(rng, split, start, n)  # (n, L) CSR, sorted, no duplicates
        pair_docs = np.repeat(np.arange(n), np.diff(labels.indptr))

        # signature words: tokens_per_label draws from each (document, label) pair's signature
        picks = rng.integers(0, cfg.signature_size, size=(labels.nnz, cfg.tokens_per_label))
        signal = self.signatures[labels.indices[:, None], picks].ravel()
        signal_docs = np.repeat(pair_docs, cfg.tokens_per_label)

        # noise words, Zipf-distributed over the vocabulary
        noise_counts = rng.poisson(cfg.noise_tokens, size=n)
        noise = self.word_of_rank[_sample(rng, self.word_cdf, int(noise_counts.sum()))]
        noise_docs = np.repeat(np.arange(n), noise_counts)

        # shuffle the words within each document
        tokens = np.concatenate([signal, noise])
        docs = np.concatenate([signal_docs, noise_docs])
        order = np.lexsort((rng.random(len(tokens)), docs))
        token_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(docs, minlength=n), out=token_ptr[1:])
        return labels, tokens[order], token_ptr

    def _labels(self, rng, split: str, start: int, n: int) -> sp.csr_matrix:
        draws = 1 + rng.poisson(self.extra_draws[split], size=n)
        draws = np.minimum(draws, min(MAX_LABEL_DRAWS, self.config.n_labels))
        ranks = _sample(rng, self.label_cdf, int(draws.sum()))
        rows, cols = np.repeat(np.arange(n), draws), self.label_of_rank[ranks]
        if split == "train" and self.config.cover_all_labels:
            lo, hi = np.searchsorted(self.cover_docs, [start, start + n])
            rows = np.concatenate([rows, self.cover_docs[lo:hi] - start])
            cols = np.concatenate([cols, self.cover_labels[lo:hi]])
        labels = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(n, self.config.n_labels),
        )
        labels.sum_duplicates()
        labels.data[:] = 1.0
        return labels

    def texts(self, tokens: np.ndarray, token_ptr: np.ndarray) -> list[str]:
        """Documents as space-separated words, assembled with numpy byte gathers."""
        word_bytes, word_start, word_len = self.words
        lengths = word_len[tokens]  # each word with its trailing space
        ends = np.cumsum(lengths)
        gather = np.repeat(word_start[tokens] - (ends - lengths), lengths)
        gather += np.arange(len(gather))
        joined = word_bytes[gather].tobytes().decode("ascii")
        doc_end = np.concatenate([[0], ends])[token_ptr]
        return [
            joined[doc_end[i] : doc_end[i + 1] - 1] for i in range(len(token_ptr) - 1)
        ]

    def features(self, tokens: np.ndarray, token_ptr: np.ndarray) -> sp.csr_matrix:
        """(n, V) float32 L2-normalised term counts."""
        n = len(token_ptr) - 1
        docs = np.repeat(np.arange(n), np.diff(token_ptr))
        counts = sp.csr_matrix(
            (np.ones(len(tokens), dtype=np.float32), (docs, tokens)),
            shape=(n, self.config.vocab),
        )
        counts.sum_duplicates()
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        counts.data /= np.repeat(np.maximum(norms, 1e-12), np.diff(counts.indptr))
        return counts


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _sample(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """``size`` ranks drawn from the distribution with cumulative probabilities ``cdf``."""
    ranks = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(ranks, len(cdf) - 1)


def _word_table(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bytes of ``"w0 w1 w2 ..."`` with each word's start and length (trailing space included)."""
    lengths = np.array([len(f"w{i} ") for i in range(vocab)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    data = np.frombuffer(" ".join(f"w{i}" for i in range(vocab)).encode() + b" ", np.uint8)
    return data, starts, lengths


# --------------------------------------------------------------------------------------------
# writing


def prepare_synthetic(
    config: SyntheticConfig,
    out: str | Path | None = None,
    *,
    propensity_a: float = DEFAULT_A,
    propensity_b: float = DEFAULT_B,
) -> PreparedDataset:
    """Generate a synthetic dataset and write it as a prepared dataset.

    Args:
        config: what to generate.
        out: the dataset folder (default ``$XMLGAME_HOME/datasets/<config.name>``).
        propensity_a, propensity_b: the PSP@k constants A and B stored in ``meta.json``; they
            do not change the generated data.

    Returns:
        The prepared dataset, opened. Its ``meta.json`` holds the full config under
        ``"synthetic"``, so the folder alone says how to regenerate it.
    """
    out = Path(out) if out is not None else paths.datasets_dir() / config.name
    world = _World(config)
    text_inputs = config.inputs == "text"
    logger.info(
        "generating %s: %s labels, %s train / %s test documents, %s inputs",
        config.name, f"{config.n_labels:,}", f"{config.n_train:,}", f"{config.n_test:,}",
        config.inputs,
    )
    writer = DatasetWriter(
        out, name=out.name, layout="synthetic", with_texts=text_inputs,
        with_features=not text_inputs, source="xmlgame synthetic generator",
        propensity_a=propensity_a, propensity_b=propensity_b,
        extra_meta={"synthetic": {**asdict(config), "vocab_size": config.vocab}},
    )
    total = config.n_train + config.n_test
    with writer, tqdm(total=total, unit="doc", desc=f"generating {out.name}") as bar:
        for split, n_docs in (("train", config.n_train), ("test", config.n_test)):
            for index, start in enumerate(range(0, n_docs, CHUNK_DOCS)):
                n = min(CHUNK_DOCS, n_docs - start)
                labels, tokens, token_ptr = world.chunk(split, index, start, n)
                if text_inputs:
                    writer.split(split).add_block(labels, texts=world.texts(tokens, token_ptr))
                else:
                    features = world.features(tokens, token_ptr)
                    writer.split(split).add_block(labels, features=features)
                bar.update(n)
        writer.n_features = None if text_inputs else config.vocab
        writer.set_label_names(_label_names(config.n_labels))
    return load_dataset(out)


def _label_names(n_labels: int) -> list[str]:
    width = max(6, len(str(n_labels - 1)))
    return [f"label-{i:0{width}d}" for i in range(n_labels)]
