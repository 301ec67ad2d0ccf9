"""The FAISS shortlister against brute force, on small seeded clustered label sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlgame import shortlist
from xmlgame.errors import XmlgameError
from xmlgame.shortlist import (
    CentroidAccumulator,
    IndexConfig,
    LabelIndex,
    exact_search,
    label_vectors_from_embeddings,
    recall_at_k,
)


def clustered(n: int, dim: int = 32, n_centres: int = 60, seed: int = 0) -> np.ndarray:
    """float32 (n, dim): points around random unit centres, as label vectors tend to be."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return centres[rng.integers(0, n_centres, size=n)] + 0.7 * noise


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return clustered(3000)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(200, seed=1) * 3.0  # scaled: search must normalise


@pytest.fixture(scope="module")
def exact(labels, queries):
    return exact_search(labels, queries, k=10)


# --------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_search_agrees_with_brute_force(labels, queries, exact, kind):
    index = LabelIndex.build(labels, IndexConfig(kind=kind))
    assert index.kind == kind and index.n_labels == 3000 and index.dim == 32

    scores, label_ids = index.search(queries, k=10)
    exact_scores, exact_ids = exact
    assert scores.dtype == np.float32 and label_ids.dtype == np.int64
    assert scores.shape == label_ids.shape == (200, 10)
    assert recall_at_k(label_ids, exact_ids) >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    same = label_ids[:, 0] == exact_ids[:, 0]
    assert same.mean() >= 0.95
    np.testing.assert_allclose(scores[same, 0], exact_scores[same, 0], rtol=1e-5, atol=1e-6)


def test_flat_equals_exact(labels, queries, exact):
    index = LabelIndex.build(labels, IndexConfig(kind="flat"))
    scores, label_ids = index.search(queries, k=10, batch_size=64)
    exact_scores, exact_ids = exact
    np.testing.assert_array_equal(label_ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


def test_exact_search_is_the_cosine_top_k():
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    scores, label_ids = exact_search(vectors, np.array([[5.0, 0.0]]), k=3)
    np.testing.assert_array_equal(label_ids, [[0, 3, 1]])
    np.testing.assert_allclose(scores, [[1.0, np.sqrt(0.5), 0.0]], atol=1e-6)


def test_search_accepts_torch_tensors(labels, queries):
    index = LabelIndex.build(labels[:500], IndexConfig(kind="flat"))
    from_numpy = index.search(queries[:5], k=4)
    from_torch = index.search(torch.from_numpy(queries[:5]).double().requires_grad_(), k=4)
    np.testing.assert_array_equal(from_numpy[1], from_torch[1])
    np.testing.assert_allclose(from_numpy[0], from_torch[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_k_beyond_the_labels_pads_with_minus_one_and_minus_inf(kind):
    vectors = clustered(7, dim=8)
    index = LabelIndex.build(vectors, IndexConfig(kind=kind))
    queries = vectors[:3]
    for scores, label_ids in (index.search(queries, k=10), exact_search(vectors, queries, k=10)):
        assert label_ids.shape == scores.shape == (3, 10)
        assert np.all(label_ids[:, 7:] == -1) and np.all(scores[:, 7:] == -np.inf)
        assert all(sorted(row[:7]) == list(range(7)) for row in label_ids.tolist())
        np.testing.assert_array_equal(label_ids[:, 0], [0, 1, 2])  # each vector finds itself


def test_zero_label_vectors_keep_their_ids():
    vectors = np.eye(4, dtype=np.float32)
    vectors[2] = 0.0
    index = LabelIndex.build(vectors, IndexConfig(kind="flat"))
    scores, label_ids = index.search(np.array([[0.0, 0.0, 1.0, 1.0]]), k=4)
    assert index.n_labels == 4
    assert label_ids[0, 0] == 3 and set(label_ids[0, 1:]) == {0, 1, 2}  # the zero row scores 0
    np.testing.assert_allclose(scores[0], [np.sqrt(0.5), 0.0, 0.0, 0.0], atol=1e-6)


def test_set_search_params_changes_the_search_and_the_config(labels, queries):
    index = LabelIndex.build(labels, IndexConfig(kind="ivf", ivf_nprobe=1))
    narrow = index.search(queries, k=10)[1]
    index.set_search_params(nprobe=1000, ef_search=7)
    assert index.config.ivf_nprobe == 1000 and index.config.ef_search == 7
    assert index.index.nprobe == index.index.nlist  # capped at the number of cells
    wide = index.search(queries, k=10)[1]
    exact_ids = exact_search(labels, queries, k=10)[1]
    assert recall_at_k(wide, exact_ids) == 1.0 > recall_at_k(narrow, exact_ids)
    with pytest.raises(XmlgameError, match="ef_search"):
        index.set_search_params(ef_search=0)


def test_recall_at_k_ignores_missing_ids():
    approx = np.array([[1, 2, 3], [4, -1, -1]])
    exact = np.array([[3, 2, 9], [4, 5, -1]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert recall_at_k(np.array([[-1]]), np.array([[-1]])) == 1.0


# --------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_then_load_searches_the_same(tmp_path, labels, queries, kind):
    index = LabelIndex.build(labels, IndexConfig(kind=kind, ef_search=40, ivf_nprobe=3))
    path = tmp_path / "run" / "labels.faiss"
    index.save(path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.faiss", "labels.json"]

    loaded = LabelIndex.load(path)
    assert (loaded.kind, loaded.n_labels, loaded.dim) == (kind, 3000, 32)
    assert loaded.config == index.config and loaded.build_seconds == index.build_seconds
    for before, after in zip(index.search(queries, k=10), loaded.search(queries, k=10)):
        np.testing.assert_array_equal(before, after)


def test_load_a_missing_index_names_the_path(tmp_path):
    path = tmp_path / "nowhere.faiss"
    with pytest.raises(XmlgameError, match="nowhere.faiss"):
        LabelIndex.load(path)


def test_load_rejects_a_sidecar_from_another_index(tmp_path):
    small, large = tmp_path / "small.faiss", tmp_path / "large.faiss"
    LabelIndex.build(clustered(50, dim=8), IndexConfig(kind="flat")).save(small)
    LabelIndex.build(clustered(60, dim=8), IndexConfig(kind="flat")).save(large)
    small.with_suffix(".json").replace(large.with_suffix(".json"))
    with pytest.raises(XmlgameError, match="large.faiss"):
        LabelIndex.load(large)

    LabelIndex.build(clustered(60, dim=8), IndexConfig(kind="flat")).save(large)
    sidecar = large.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["n_labels"] = 61
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(XmlgameError, match="n_labels = 60 but its sidecar says 61"):
        LabelIndex.load(large)


# --------------------------------------------------------------------------------------------
# label vectors


def test_centroids_by_hand():
    # three documents, three labels; label 2 has no documents
    h = np.array([[3.0, 0.0], [0.0, 1.0], [4.0, 3.0]], dtype=np.float32)
    Y = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32))
    accumulator = CentroidAccumulator(n_labels=3, dim=2)
    accumulator.add(h[:2], Y[:2])
    accumulator.add(torch.from_numpy(h[2:]), Y[2:])

    np.testing.assert_array_equal(accumulator.counts, [2, 2, 0])
    # normalised documents: (1, 0), (0, 1), (0.8, 0.6)
    # label 0: (1, 0) + (0, 1) = (1, 1); label 1: (1, 0) + (0.8, 0.6) = 0.6 * (3, 1)
    expected = np.array([[1.0, 1.0], [3.0, 1.0], [0.0, 0.0]]) / [[np.sqrt(2)], [np.sqrt(10)], [1]]
    np.testing.assert_allclose(accumulator.vectors(), expected, atol=1e-6)

    fallback = np.array([[9.0, 9.0], [9.0, 9.0], [-2.0, 0.0]], dtype=np.float32)
    with_fallback = accumulator.vectors(fallback)
    np.testing.assert_allclose(with_fallback[:2], expected[:2], atol=1e-6)  # only empty labels
    np.testing.assert_allclose(with_fallback[2], [-1.0, 0.0], atol=1e-6)


def test_centroids_count_each_stored_label_once():
    h = np.array([[1.0, 0.0]], dtype=np.float32)
    duplicated = sp.csr_matrix(([1.0, 1.0, 0.0], [0, 0, 1], [0, 3]), shape=(1, 2))
    accumulator = CentroidAccumulator(n_labels=2, dim=2)
    accumulator.add(h, duplicated)
    np.testing.assert_array_equal(accumulator.counts, [1, 0])


def test_a_label_without_documents_is_found_through_its_fallback():
    rng = np.random.default_rng(0)
    n_docs, n_labels, dim = 400, 30, 16
    h = clustered(n_docs, dim=dim, n_centres=n_labels - 1, seed=2)
    Y = sp.random(n_docs, n_labels - 1, density=0.1, format="csr", random_state=rng)
    Y = sp.hstack([Y, sp.csr_matrix((n_docs, 1))], format="csr")  # the last label has no docs
    Y.data[:] = 1.0
    fallback = rng.standard_normal((n_labels, dim)).astype(np.float32)

    vectors = label_vectors_from_embeddings(h, Y, fallback=fallback, chunk_size=64)
    expected = CentroidAccumulator(n_labels, dim)
    expected.add(h, Y)
    np.testing.assert_allclose(vectors, expected.vectors(fallback), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    index = LabelIndex.build(vectors)
    scores, label_ids = index.search(fallback[-1:], k=3)
    assert label_ids[0, 0] == n_labels - 1 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_accumulator_rejects_mismatched_shapes():
    accumulator = CentroidAccumulator(n_labels=3, dim=2)
    with pytest.raises(XmlgameError, match=r"\(B, 2\)"):
        accumulator.add(np.zeros((2, 4)), sp.csr_matrix((2, 3)))
    with pytest.raises(XmlgameError, match="fallback"):
        accumulator.vectors(np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# configuration


def test_auto_kind_follows_the_label_count():
    config = IndexConfig(flat_max=100)
    assert config.resolved_kind(100) == "flat"
    assert config.resolved_kind(101) == "ivf"
    assert IndexConfig(kind="hnsw").resolved_kind(10) == "hnsw"
    assert LabelIndex.build(clustered(200, dim=4), config).kind == "ivf"
    assert LabelIndex.build(clustered(100, dim=4), config).kind == "flat"


def test_an_hnsw_graph_gets_all_labels_in_one_add(monkeypatch):
    # FAISS builds a far worse graph from several add calls (see _add_in_chunks)
    import faiss

    calls = []

    class CountingHNSW(faiss.IndexHNSWFlat):
        def add(self, x):
            calls.append(len(x))
            super().add(x)

    monkeypatch.setattr(faiss, "IndexHNSWFlat", CountingHNSW)
    monkeypatch.setattr(shortlist, "ADD_CHUNK", 100)
    index = LabelIndex.build(clustered(1000, dim=8), IndexConfig(kind="hnsw"))
    assert calls == [1000] and index.n_labels == 1000


def test_auto_nprobe_scans_at_least_64_cells_and_a_25th():
    assert IndexConfig().resolved_nprobe(10) == 10
    assert IndexConfig().resolved_nprobe(572) == 64
    assert IndexConfig().resolved_nprobe(3274) == 131
    assert IndexConfig(ivf_nprobe=5).resolved_nprobe(3274) == 5


def test_auto_nlist_grows_with_the_labels_and_keeps_39_points_per_cell():
    config = IndexConfig()
    assert config.resolved_nlist(670_091) == round(4 * np.sqrt(670_091))
    assert config.resolved_nlist(3000) == 3000 // 39
    assert config.resolved_nlist(10) == 1
    assert IndexConfig(ivf_nlist=50).resolved_nlist(10_000) == 50


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kind": "annoy"}, "annoy.*auto, flat, hnsw, ivf"),
        ({"hnsw_m": 1}, "hnsw_m must be >= 2, got 1"),
        ({"ef_search": 0}, "ef_search must be >= 1"),
        ({"ef_construction": -5}, "ef_construction"),
        ({"ivf_nprobe": -1}, "ivf_nprobe"),
        ({"ivf_nlist": -1}, "ivf_nlist"),
        ({"flat_max": -1}, "flat_max"),
        ({"seed": -1}, "seed"),
        ({"hnsw_m": 16.5}, "hnsw_m must be an integer"),
        ({"ef_search": True}, "ef_search must be an integer"),
    ],
)
def test_index_config_rejects_bad_values(bad, message):
    with pytest.raises(XmlgameError, match=message):
        IndexConfig(**bad)


def test_search_rejects_bad_arguments(labels):
    index = LabelIndex.build(labels[:100], IndexConfig(kind="flat"))
    with pytest.raises(XmlgameError, match="dimension 5; the labels have 32"):
        index.search(np.zeros((2, 5)), k=3)
    with pytest.raises(XmlgameError, match="k must be a positive integer"):
        index.search(np.zeros((2, 32)), k=0)
    with pytest.raises(XmlgameError, match="2-D"):
        index.search(np.zeros(32), k=3)
    with pytest.raises(XmlgameError, match="empty"):
        LabelIndex.build(np.zeros((0, 32)))
