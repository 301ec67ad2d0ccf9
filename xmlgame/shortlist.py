"""The label shortlister: top-K labels for a document by cosine similarity, searched with FAISS.

With L = 670,000 labels, scoring every label for every document is too slow for training and for
prediction. The shortlister gives each label one vector in the encoder's space R^D and, for a
document embedding ``h``, returns the K labels whose vectors are closest to ``h`` in cosine
similarity: mined hard negatives for training, and the only candidates prediction scores.

Label vectors. ``CentroidAccumulator`` sums the L2-normalised embeddings of each label's training
documents, one batch at a time, with one sparse product ``Y.T @ h`` per batch; a label's vector is
the normalised mean of its documents. A label without training documents takes the matching row
of a *fallback* matrix when one is given (for example its classifier weights, or an embedding of
its name); otherwise its vector stays zero, which scores 0 against every query, so it reaches a
shortlist only when fewer than K labels score above 0.

The index. ``LabelIndex`` stores the normalised label vectors in a FAISS index with the inner
product metric, so a score is a cosine similarity in [-1, 1]. Three kinds:

- ``flat`` (``IndexFlatIP``): exact search, a dense product with all L vectors per query. Best up
  to tens of thousands of labels.
- ``hnsw`` (``IndexHNSWFlat``): a navigable small-world graph, searched greedily from a coarse
  top layer down to level 0, keeping the ``ef_search`` best candidates seen. No training; a
  larger ``hnsw_m`` (graph degree) or ``ef_construction`` builds a better graph more slowly, a
  larger ``ef_search`` searches more of it. The default for more than ``flat_max`` labels.
- ``ivf`` (``IndexIVFFlat``): k-means cuts the space into ``nlist`` cells (trained on a seeded
  sample of the label vectors); a query scans the labels of its ``nprobe`` nearest cells. Less
  memory than HNSW and a faster build, but lower recall at the same latency on harder data.

``IndexConfig(kind="auto")`` picks ``flat`` up to ``flat_max`` labels and ``ivf`` above.

Why IVF by default. On the label vectors of a trained model HNSW does worse than on the clustered
test sets below. A synthetic set of 67,009 labels (one tenth of Amazon-670K's shape, one epoch of
the bag-of-words model), 1,000 test queries, recall@100 against exact search:

    index                               centroids  heads   test P@5 (3,000 docs; exact 26.40)
    ivf, 1,035 cells, nprobe 32         0.960      0.868   26.40
    ivf, 1,035 cells, nprobe 64         0.995      0.940
    hnsw M=32, ef_construction 80/128   0.879      0.630   23.50
    hnsw M=64, ef_construction 80/128   0.986      0.886   26.33

The head vectors are the hard part: a tail label's bias (about -10.7) dwarfs its weights (norm
about 0.2), so after the inner-product-to-cosine augmentation the tail labels sit in a tight
bundle that a graph search leaves early. IVF scans whole cells and copes better at this size; it
also builds in less time (4.5 s against 7 s for both indexes there, M = 32). At the full
670,091 labels neither copes with the heads: an IVF head index recalled 0.11 (0.25 with 256
cells scanned) while the centroid index recalled 0.95 (``benchmarks/results/scale.md``). So by
default a model indexes its heads only while search is exact, and scores the most frequent
training labels for every document instead (see :mod:`xmlgame.mining`); with that, P@5 through
the approximate centroid index is within 0.05 points of exact search at 670k labels.

Conventions. ``search`` returns ``(scores, label_ids)``: float32 cosine similarities and int64
label ids, both (B, K), best first. Queries and label vectors are normalised inside, so callers
pass raw embeddings (numpy arrays or torch tensors). A slot with no label (K > L, or an
approximate search that found fewer than K labels, which HNSW can do as K nears L) holds id -1
and score -inf. ``exact_search`` is the brute-force reference with the same conventions, and
``recall_at_k`` compares the two.

Memory, per label, for float32 vectors (D = 256 gives 1,024 bytes of vectors):

- flat: 4*D bytes, the vectors alone.
- hnsw: 4*D + 8*M bytes, plus about 12. FAISS keeps the flat vectors, and for the graph 2*M
  neighbour ids of 4 bytes at level 0, M more for each upper level a label reaches (on average
  1/(M-1) levels), a 4-byte level and an 8-byte offset. Measured (serialised size, 20,000 random
  vectors, D = 256, faiss 1.15.1): 1,168 bytes per label at M = 16, 1,296 at M = 32 (predicted
  1,024 + 256 + 4 + 12), 1,424 at M = 48. At L = 670,091 and M = 32 that is 869 MB.
- ivf: 4*D + 8 bytes (the vectors and an int64 id in their cell), plus the nlist*D*4 bytes of
  cell centroids shared by all labels. Measured: 1,061 bytes per label at L = 20,000 and
  nlist = 565 (the centroids add 29 bytes per label there, 5 at L = 670,091).

Speed at the full scale, measured once with the defaults (faiss 1.15.1, 2 CPU cores shared with
other work, load average 3-5, so times are pessimistic). L = 670,091 label vectors, D = 256: 5,000
random unit centres plus Gaussian noise of norm sigma; 1,000 queries drawn the same way; recall@100
against ``exact_search`` (4-8 s for the 1,000 queries). Latency is per query, alone or in batches
of 256:

    kind  sigma  build   size     alone    batched  recall@100
    hnsw  1.0    212 s   869 MB   0.58 ms  0.59 ms  0.9999
    hnsw  1.5    578 s   869 MB   0.77 ms  0.77 ms  0.963   (ef_search 512: 0.975, 3.4 ms)
    hnsw  2.0    450 s   869 MB   1.17 ms  1.21 ms  0.44    (ef_search 256: 0.49, 2.4 ms)
    ivf   1.0     60 s   695 MB   0.76 ms  0.71 ms  0.9999
    ivf   1.5     88 s   695 MB   0.79 ms  1.08 ms  0.79    (nprobe 128: 0.84, 2.6 ms)

At sigma = 2 the clusters barely stand out (a query's best label scores 0.34, its 100th 0.23):
the vectors are close to structureless in 256 dimensions, where no graph or cell structure helps.
Where real label vectors fall shows only by measuring: check recall on a sample of real queries
with ``exact_search`` and ``recall_at_k`` before trusting a setting.

Threads. FAISS runs its loops with OpenMP on ``faiss.omp_get_max_threads()`` threads (all cores
by default); ``faiss.omp_set_num_threads(n)`` limits it. An HNSW graph built with more than one
thread is not bit-for-bit reproducible (threads insert labels in a racing order); its recall is.

Files. ``LabelIndex.save(path)`` writes the FAISS index at ``path`` and a JSON sidecar at
``path.with_suffix(".json")`` (kind, sizes, config, build time, the index file's size), each
first under a temporary name and then renamed, so a crash never leaves a half-written file;
``load`` checks that the two come from the same save (the sidecar records the index file's size),
which also catches a crash between the two renames.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp
import torch

from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
FORMAT = "xmlgame-label-index"
FORMAT_VERSION = 1
ADD_CHUNK = 50_000  # labels added to an index per call (one progress-bar step)
ACCUMULATE_CHUNK = 65_536  # documents per accumulator pass in label_vectors_from_embeddings
EXACT_SCORE_BYTES = 1 << 28  # at most 256 MiB of (batch, L) scores at once in exact_search
MAX_AUTO_NLIST = 65_536
AUTO_NPROBE_MIN = 64  # cells an IVF search scans by default: at least this many,
AUTO_NPROBE_DIVISOR = 25  # and at least 1/25 of them
MIN_POINTS_PER_CELL = 39  # FAISS k-means warns below 39 training points per centroid
IVF_TRAIN_MIN = 100_000  # IVF training sample: max(64 * nlist, this), at most L
IVF_TRAIN_PER_CELL = 64
FAISS_CLASSES = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf": faiss.IndexIVF}


@dataclass
class IndexConfig:
    """Which FAISS index holds the label vectors, and how it is built and searched.

    Past ``flat_max`` labels the default is IVF with about 4*sqrt(L) cells (3,274 at
    L = 670,091), of which ``max(64, nlist / 25)`` are scanned (131 at that L): on trained label
    vectors it recalls more than HNSW at the same cost and builds faster (module docstring). A
    larger ``ivf_nprobe`` trades latency for recall linearly: each cell holds about L/nlist
    labels. On the synthetic 670,091-label run of ``benchmarks/scale.py`` the centroid index
    recalled 0.88 of the exact top 100 with 64 cells scanned, 0.96 with 128 (1.5 ms per
    document) and 0.99 with 256; the 4% floor keeps the scanned share of a growing index from
    shrinking.
    The HNSW parameters apply to ``kind="hnsw"``: on the clustered test sets of the module
    docstring its defaults reach recall@100 >= 0.96 at L = 670,091 in under 1 ms per query,
    after a build of 3.5-10 minutes on 2 shared cores.
    """

    kind: str = "auto"  # "auto": flat up to flat_max labels, ivf above
    flat_max: int = 50_000
    hnsw_m: int = 32  # graph degree M: each label keeps 2*M neighbours at level 0, M above
    ef_construction: int = 80  # candidates kept while inserting a label
    ef_search: int = 128  # candidates kept while searching; FAISS uses max(ef_search, K)
    ivf_nlist: int = 0  # k-means cells; 0: about 4*sqrt(L), at most L/39 and 65,536
    ivf_nprobe: int = 0  # cells scanned per query; 0: max(64, nlist / 25), at most nlist
    seed: int = 0  # the IVF training sample and k-means initialisation

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise XmlgameError(
                f"index kind {self.kind!r} is not known; choose one of {', '.join(INDEX_KINDS)}"
            )
        minimums = {
            "flat_max": 0,
            "hnsw_m": 2,
            "ef_construction": 1,
            "ef_search": 1,
            "ivf_nlist": 0,
            "ivf_nprobe": 0,
            "seed": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise XmlgameError(f"index {name} must be an integer, got {value!r}")
            if value < minimum:
                raise XmlgameError(f"index {name} must be >= {minimum}, got {value}")
            setattr(self, name, int(value))
        if self.seed >= 2**31:
            raise XmlgameError(f"index seed must be below 2**31, got {self.seed}")

    def resolved_kind(self, n_labels: int) -> str:
        """The kind built for ``n_labels`` labels: ``kind``, or auto's choice."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n_labels <= self.flat_max else "ivf"

    def resolved_nprobe(self, nlist: int) -> int:
        """The IVF cells scanned per query in an index of ``nlist`` cells: ``ivf_nprobe``, or
        ``max(64, ceil(nlist / 25))``; never more than ``nlist``."""
        wanted = self.ivf_nprobe or max(AUTO_NPROBE_MIN, -(-nlist // AUTO_NPROBE_DIVISOR))
        return min(wanted, nlist)

    def resolved_nlist(self, n_labels: int) -> int:
        """The IVF cell count for ``n_labels`` labels: ``ivf_nlist``, or about 4*sqrt(L).

        Capped so that every cell has at least 39 training points (FAISS's k-means minimum).
        """
        cap = max(1, n_labels // MIN_POINTS_PER_CELL)
        if self.ivf_nlist:
            if self.ivf_nlist > cap:
                logger.warning(
                    "ivf_nlist %d is too many cells for %d labels; using %d",
                    self.ivf_nlist, n_labels, cap,
                )
            return min(self.ivf_nlist, cap)
        return max(1, min(round(4 * math.sqrt(n_labels)), cap, MAX_AUTO_NLIST))


# --------------------------------------------------------------------------------------------
# the index


class LabelIndex:
    """Inner-product search over L2-normalised label vectors (cosine similarity).

    Attributes:
        index: the FAISS index; ids 0..L-1 are the label ids.
        kind: ``"flat"``, ``"hnsw"`` or ``"ivf"`` (never ``"auto"``).
        n_labels: L, the number of indexed label vectors.
        dim: D, their dimension.
        config: the configuration it was built with, kept in step by ``set_search_params``.
        build_seconds: wall time of the build (training included).
    """

    def __init__(self, index: faiss.Index, kind: str, config: IndexConfig, build_seconds: float):
        self.index = index
        self.kind = kind
        self.n_labels = int(index.ntotal)
        self.dim = int(index.d)
        self.config = config
        self.build_seconds = float(build_seconds)
        self.set_search_params(config.ef_search, config.ivf_nprobe)

    def __repr__(self) -> str:
        return f"LabelIndex(kind={self.kind!r}, n_labels={self.n_labels}, dim={self.dim})"

    # pickling (sending an index to the other processes of a launch): FAISS's own bytes
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update(state)
        self.set_search_params(self.config.ef_search, self.config.ivf_nprobe)

    @classmethod
    def build(
        cls, vectors: np.ndarray, config: IndexConfig | None = None, progress: bool = False
    ) -> LabelIndex:
        """Index the label vectors, row i as label i.

        Args:
            vectors: float (L, D); rows are L2-normalised here (all-zero rows stay zero and are
                still indexed, so ids stay 0..L-1).
            config: the index to build; ``IndexConfig()`` when None.
            progress: show a progress bar while adding labels.
        """
        config = config or IndexConfig()
        vectors = _as_matrix(vectors, "label vectors")
        n_labels, dim = vectors.shape
        if n_labels == 0 or dim == 0:
            raise XmlgameError(f"cannot index label vectors of shape {vectors.shape}: it is empty")
        kind = config.resolved_kind(n_labels)

        start = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
        else:
            index = _trained_ivf(vectors, config)
        _add_in_chunks(index, vectors, progress, desc=f"indexing labels ({kind})")
        build_seconds = time.perf_counter() - start

        logger.info(
            "label index: %s over %d labels (D=%d) built in %.1f s",
            kind, n_labels, dim, build_seconds,
        )
        return cls(index, kind, config, build_seconds)

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, batch_size: int = 8192
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best labels of each query, best first.

        Args:
            queries: float (B, D) document embeddings; normalised here.
            k: labels per query (K); slots beyond what the index found hold id -1, score -inf.
            batch_size: queries per FAISS call.

        Returns:
            (scores float32 (B, k), label_ids int64 (B, k)).
        """
        queries = _as_matrix(queries, "queries")
        _check_search_args(queries, self.dim, k, batch_size)
        n_queries = queries.shape[0]
        scores = np.empty((n_queries, k), dtype=np.float32)
        label_ids = np.empty((n_queries, k), dtype=np.int64)
        for start in range(0, n_queries, batch_size):
            stop = min(start + batch_size, n_queries)
            scores[start:stop], label_ids[start:stop] = self.index.search(
                _normalised(queries[start:stop]), k
            )
        scores[label_ids < 0] = -np.inf
        return scores, label_ids

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change how hard searches look: ``ef_search`` for HNSW, ``nprobe`` for IVF (0: the
        automatic value of :meth:`IndexConfig.resolved_nprobe`).

        Both are recorded in ``config`` (and saved with it); a parameter of another kind of
        index has no effect on this one.
        """
        changes = {}
        if ef_search is not None:
            changes["ef_search"] = ef_search
        if nprobe is not None:
            changes["ivf_nprobe"] = nprobe
        self.config = dataclasses.replace(self.config, **changes)  # validates
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.config.ef_search
        elif self.kind == "ivf":
            self.index.nprobe = self.config.resolved_nprobe(self.index.nlist)

    def save(self, path: Path) -> None:
        """Write the index at ``path`` and its description at ``path.with_suffix(".json")``."""
        path = Path(path)
        meta_path = _meta_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_index = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        try:
            faiss.write_index(self.index, str(tmp_index))
            _fsync(tmp_index)
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "n_labels": self.n_labels,
                "dim": self.dim,
                "config": dataclasses.asdict(self.config),
                "build_seconds": self.build_seconds,
                "index_bytes": tmp_index.stat().st_size,
                "faiss_version": faiss.__version__,
            }
            tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
            _fsync(tmp_meta)
            os.replace(tmp_index, path)
            os.replace(tmp_meta, meta_path)
        finally:
            tmp_index.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> LabelIndex:
        """Read an index written by ``save``, checking it against its JSON description."""
        path = Path(path)
        meta_path = _meta_path(path)
        for needed in (path, meta_path):
            if not needed.is_file():
                raise XmlgameError(
                    f"label index {path}: {needed} does not exist; build the index again "
                    "(LabelIndex.build, then save)"
                )
        meta = _read_meta(meta_path)
        if meta["index_bytes"] != path.stat().st_size:
            raise XmlgameError(
                f"label index {path} has {path.stat().st_size} bytes but {meta_path} describes "
                f"one of {meta['index_bytes']} bytes: the pair comes from different saves; "
                "save the index again"
            )
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise XmlgameError(f"label index {path} cannot be read by faiss: {error}") from error
        _check_loaded(index, meta, path)
        try:
            config = IndexConfig(**meta["config"])
        except TypeError as error:
            raise XmlgameError(f"{meta_path}: unknown index config: {error}") from None
        return cls(index, meta["kind"], config, meta["build_seconds"])


def _trained_ivf(vectors: np.ndarray, config: IndexConfig) -> faiss.IndexIVFFlat:
    """An empty IVF index whose cells are trained on a seeded sample of the label vectors."""
    n_labels, dim = vectors.shape
    nlist = config.resolved_nlist(n_labels)
    n_train = min(n_labels, max(IVF_TRAIN_PER_CELL * nlist, IVF_TRAIN_MIN))
    rows = np.random.default_rng(config.seed).choice(n_labels, size=n_train, replace=False)
    sample = _normalised(vectors[np.sort(rows)])  # (n_train, D)

    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = config.seed
    logger.info("label index: training %d IVF cells on %d label vectors", nlist, n_train)
    index.train(sample)
    return index


def _add_in_chunks(index: faiss.Index, vectors: np.ndarray, progress: bool, desc: str) -> None:
    """Normalise and add the vectors ``ADD_CHUNK`` rows at a time (one normalised copy of a chunk
    at a time, not of the whole matrix), or all at once into an HNSW graph.

    HNSW gets one ``add`` call: FAISS builds a much worse graph when the labels arrive in several
    calls. Measured on the 67,009 head vectors of a trained synthetic run (M = 32,
    ef_construction 80, ef_search 128): recall@100 0.64 from one call, 0.02 from two calls of
    50,000 and 17,009.
    """
    from tqdm.auto import tqdm

    n_labels = vectors.shape[0]
    if isinstance(index, faiss.IndexHNSW):
        logger.info("%s: building the graph over %d labels in one call", desc, n_labels)
        index.add(_normalised(vectors))
        return
    with tqdm(total=n_labels, desc=desc, unit="label", disable=not progress) as bar:
        for start in range(0, n_labels, ADD_CHUNK):
            chunk = vectors[start : start + ADD_CHUNK]
            index.add(_normalised(chunk))
            bar.update(chunk.shape[0])


def _meta_path(path: Path) -> Path:
    meta_path = path.with_suffix(".json")
    if meta_path == path:
        raise XmlgameError(f"label index path {path} ends in .json, the suffix of its sidecar")
    return meta_path


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise XmlgameError(f"{meta_path} is not a readable JSON file: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise XmlgameError(f"{meta_path} does not describe an xmlgame label index")
    if meta.get("format_version") != FORMAT_VERSION:
        raise XmlgameError(
            f"{meta_path} has format version {meta.get('format_version')!r}; this xmlgame reads "
            f"version {FORMAT_VERSION}; build the index again"
        )
    required = ("kind", "n_labels", "dim", "config", "build_seconds", "index_bytes")
    missing = [key for key in required if key not in meta]
    if missing:
        raise XmlgameError(f"{meta_path} lacks {', '.join(missing)}; build the index again")
    return meta


def _check_loaded(index: faiss.Index, meta: dict, path: Path) -> None:
    """Raise if the FAISS index read from ``path`` is not the one its sidecar describes."""
    expected = {
        "n_labels": (meta["n_labels"], index.ntotal),
        "dim": (meta["dim"], index.d),
    }
    for name, (described, actual) in expected.items():
        if described != actual:
            raise XmlgameError(
                f"label index {path} holds {name} = {actual} but its sidecar says {described}; "
                "build and save the index again"
            )
    faiss_class = FAISS_CLASSES.get(meta["kind"])
    if faiss_class is None or not isinstance(index, faiss_class):
        raise XmlgameError(
            f"label index {path} is a {type(index).__name__}, not the {meta['kind']!r} index its "
            "sidecar describes; build and save the index again"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise XmlgameError(f"label index {path} does not use the inner-product metric")


# --------------------------------------------------------------------------------------------
# label vectors


class CentroidAccumulator:
    """Sums of L2-normalised document embeddings per label, accumulated batch by batch.

    Memory: float32 sums (L, D) (686 MB at L = 670,091, D = 256) and int64 counts (L,). The sums
    are float32: a label's vector is only a direction, which float32 holds well beyond the
    document counts of a training set.
    """

    def __init__(self, n_labels: int, dim: int):
        if n_labels < 1 or dim < 1:
            raise XmlgameError(f"need at least one label and one dimension, got {n_labels}, {dim}")
        self.n_labels = n_labels
        self.dim = dim
        self.sums = np.zeros((n_labels, dim), dtype=np.float32)  # (L, D)
        self._counts = np.zeros(n_labels, dtype=np.int64)  # (L,)

    def add(self, h: np.ndarray | torch.Tensor, Y: sp.csr_matrix) -> None:
        """Add a batch: ``h`` float (B, D) embeddings, ``Y`` (B, L) their binary label rows.

        Every stored non-zero of ``Y`` counts as one relevant label. The work is one sparse
        product over the labels the batch touches, not a loop over labels.
        """
        h = _as_matrix(h, "embeddings")
        Y = _binary_rows(Y)
        if h.shape != (Y.shape[0], self.dim) or Y.shape[1] != self.n_labels:
            raise XmlgameError(
                f"embeddings {h.shape} and labels {Y.shape} do not fit an accumulator of "
                f"{self.n_labels} labels in {self.dim} dimensions: expected (B, {self.dim}) "
                f"and (B, {self.n_labels})"
            )
        if Y.nnz == 0:
            return
        # compact the batch's columns to the U labels it touches: (B, U)
        labels, columns = np.unique(Y.indices, return_inverse=True)
        Y_touched = sp.csr_matrix(
            (np.ones(Y.nnz, dtype=np.float32), columns.ravel(), Y.indptr),
            shape=(Y.shape[0], labels.size),
        )
        self.sums[labels] += Y_touched.T @ _normalised(h)  # (U, D)
        self._counts[labels] += np.bincount(columns.ravel(), minlength=labels.size)

    @property
    def counts(self) -> np.ndarray:
        """int64 (L,): documents seen per label (read-only view)."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    def vectors(self, fallback: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """float32 (L, D) normalised mean vectors.

        Labels with no documents take the matching row of ``fallback`` (L, D), normalised, when
        it is given; otherwise they stay zero.
        """
        vectors = _normalised(self.sums)  # a direction: normalising the sum normalises the mean
        if fallback is not None:
            fallback = _as_matrix(fallback, "fallback vectors")
            if fallback.shape != (self.n_labels, self.dim):
                raise XmlgameError(
                    f"fallback vectors have shape {fallback.shape}; expected "
                    f"({self.n_labels}, {self.dim}), one row per label"
                )
            empty = np.flatnonzero(self._counts == 0)
            vectors[empty] = _normalised(fallback[empty])
        return vectors


def label_vectors_from_embeddings(
    h: np.ndarray | torch.Tensor,
    Y: sp.csr_matrix,
    fallback: np.ndarray | torch.Tensor | None = None,
    chunk_size: int = ACCUMULATE_CHUNK,
) -> np.ndarray:
    """float32 (L, D) label vectors from all documents' embeddings ``h`` (n, D) and labels ``Y``
    (n, L), accumulated ``chunk_size`` documents at a time; see ``CentroidAccumulator``."""
    h = _as_matrix(h, "embeddings")
    if h.shape[0] != Y.shape[0]:
        raise XmlgameError(f"{h.shape[0]} embeddings but {Y.shape[0]} label rows")
    accumulator = CentroidAccumulator(Y.shape[1], h.shape[1])
    Y = sp.csr_matrix(Y)
    for start in range(0, h.shape[0], chunk_size):
        accumulator.add(h[start : start + chunk_size], Y[start : start + chunk_size])
    return accumulator.vectors(fallback)


# --------------------------------------------------------------------------------------------
# the exact reference


def exact_search(
    vectors: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by cosine similarity, with ``LabelIndex.search``'s conventions.

    A dense product with every label vector (torch ``matmul`` and ``topk``, independent of
    FAISS, so it can check it). Batches are also cut so that one batch's (batch, L) scores stay
    under 256 MiB.

    Returns:
        (scores float32 (B, k), label_ids int64 (B, k)), best first; -1 / -inf beyond L.
    """
    vectors = torch.from_numpy(_normalised(_as_matrix(vectors, "label vectors")))  # (L, D)
    queries = _as_matrix(queries, "queries")
    n_labels, dim = vectors.shape
    _check_search_args(queries, dim, k, batch_size)
    n_queries = queries.shape[0]
    batch_size = max(1, min(batch_size, EXACT_SCORE_BYTES // (4 * max(n_labels, 1))))
    k_found = min(k, n_labels)

    scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    label_ids = np.full((n_queries, k), -1, dtype=np.int64)
    for start in range(0, n_queries, batch_size):
        stop = min(start + batch_size, n_queries)
        q = torch.from_numpy(_normalised(queries[start:stop]))  # (b, D)
        top = torch.topk(q @ vectors.T, k_found, dim=1, sorted=True)  # (b, k_found)
        scores[start:stop, :k_found] = top.values.numpy()
        label_ids[start:stop, :k_found] = top.indices.numpy()
    return scores, label_ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact|, counting only valid (>= 0) exact ids.

    Both are int (B, k) id arrays (the k may differ). A query with no valid exact id has nothing
    to miss and counts as 1.
    """
    approx_ids = np.asarray(approx_ids)
    exact_ids = np.asarray(exact_ids)
    if approx_ids.ndim != 2 or exact_ids.ndim != 2 or approx_ids.shape[0] != exact_ids.shape[0]:
        raise XmlgameError(
            f"recall needs two (B, k) id arrays with the same B, got {approx_ids.shape} "
            f"and {exact_ids.shape}"
        )
    recalls = []
    for start in range(0, exact_ids.shape[0], 1024):  # (1024, k_approx, k_exact) at most
        approx = approx_ids[start : start + 1024]
        exact = exact_ids[start : start + 1024]
        valid = exact >= 0  # (b, k_exact)
        found = (approx[:, :, None] == exact[:, None, :]).any(axis=1) & valid
        n_valid = valid.sum(axis=1)
        recalls.append(np.where(n_valid > 0, found.sum(axis=1) / np.maximum(n_valid, 1), 1.0))
    return float(np.concatenate(recalls).mean()) if recalls else 1.0


# --------------------------------------------------------------------------------------------
# helpers


def _as_matrix(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """A 2-D float32 numpy view or copy of an array or tensor (any device)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise XmlgameError(f"{what} must be a 2-D (rows, D) array, got shape {x.shape}")
    return x


def _normalised(x: np.ndarray) -> np.ndarray:
    """A new C-contiguous float32 copy of ``x`` (n, D) with unit rows; zero rows stay zero."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)  # (n, 1)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _binary_rows(Y) -> sp.csr_matrix:
    """``Y`` as CSR with sorted, unique column indices and no stored zeros."""
    Y = sp.csr_matrix(Y)
    if not Y.has_canonical_format or (Y.data == 0).any():
        Y = Y.copy()
        Y.sum_duplicates()
        Y.eliminate_zeros()
    return Y


def _check_search_args(queries: np.ndarray, dim: int, k: int, batch_size: int) -> None:
    if queries.shape[1] != dim:
        raise XmlgameError(f"queries have dimension {queries.shape[1]}; the labels have {dim}")
    for name, value in (("k", k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise XmlgameError(f"search {name} must be a positive integer, got {value!r}")
