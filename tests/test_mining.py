"""Training and predicting through the label shortlist, on toy sets made to need it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

import xmlgame.train as train_module
from xmlgame.dataset import DatasetWriter, PreparedDataset
from xmlgame.encoders import EncoderConfig
from xmlgame.errors import XmlgameError
from xmlgame.mining import Shortlister, encode_all, frequent_labels, refresh
from xmlgame.model import load
from xmlgame.runs import predict_stream
from xmlgame.shortlist import IndexConfig
from xmlgame.train import Candidates, TrainConfig, train


def shortlist_config(**changes) -> TrainConfig:
    """The toy settings, with the six labels counted as too many to score all of them."""
    settings = dict(
        players=3, overlap=0.34, encoder=EncoderConfig(dim=32, min_df=1), epochs=8,
        batch_size=16, lr_players=0.01, val_fraction=0.4,
        full_candidates_max=3, negatives=1, shortlist_k=3, predict_shortlist=4,
        shortlist_frequent=0,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shortlisted(tmp_path_factory):
    """One finished run on the toy set that trains on mined negatives and predicts through
    the index (module scope: several tests read it)."""
    from tests.conftest import write_toy

    root = tmp_path_factory.mktemp("mining")
    dataset = write_toy(root / "toy")
    run_dir = root / "run"
    results = train(dataset, shortlist_config(patience=100, shortlist_frequent=2), run_dir,
                    progress=False)
    return dataset, run_dir, results


def load_listing_only(run_dir):
    """The run's model, predicting through its label indexes alone (no frequent labels)."""
    model = load(run_dir)
    model.frequent_labels = None
    return model


def test_a_run_on_mined_negatives_learns_and_saves_its_index(shortlisted):
    _, run_dir, results = shortlisted
    assert results["test"]["p@1"] == 1.0
    for name in ("label_index", "head_index"):
        assert (run_dir / f"{name}.faiss").exists() and (run_dir / f"{name}.json").exists()
    log = read_log(run_dir)
    assert log[0]["initial_index"] == "centroids (flat)"  # untrained heads would rank by prior
    assert "initial_refresh_mine_seconds" in log[0]
    for entry in log:
        assert entry["index"] == "centroids (flat)+heads (flat)"
        assert {"refresh_encode_seconds", "refresh_build_seconds"} <= entry.keys()
    assert all("refresh_mine_seconds" in entry for entry in log[:-1])
    assert len(log) == 8 and "refresh_mine_seconds" not in log[-1]  # none after the last
    model = load(run_dir)
    assert model.shortlisting and model.shortlist_k == 4
    saved = np.load(run_dir / "frequent_labels.npy")
    assert len(saved) == 2 and len(set(saved.tolist())) == 2
    np.testing.assert_array_equal(model.frequent_labels, saved)


def test_shortlist_prediction_equals_exhaustive_when_it_lists_every_label(shortlisted):
    dataset, run_dir, _ = shortlisted
    model = load(run_dir)
    features = model.featurize(list(dataset.test.texts), progress=False)
    model.shortlist_k = model.n_labels
    listed = model.predict_features(features, k=5)
    model.shortlister = None
    exhaustive = model.predict_features(features, k=5)
    np.testing.assert_allclose(listed.scores, exhaustive.scores, rtol=1e-5, atol=1e-6)
    # ids agree wherever scores are not tied
    distinct = np.abs(np.diff(exhaustive.scores, axis=1)) > 1e-6
    assert (listed.label_ids[:, :-1][distinct] == exhaustive.label_ids[:, :-1][distinct]).all()


def test_a_short_shortlist_scores_only_its_labels(shortlisted):
    """Three of six labels listed, three predicted: the same three, reordered by the players;
    asking for more labels than the shortlist holds widens it to k."""
    dataset, run_dir, _ = shortlisted
    model = load_listing_only(run_dir)
    model.shortlister = Shortlister(centroids=model.shortlister.centroids)
    model.shortlist_k = 3
    features = model.featurize(list(dataset.test.texts), progress=False)
    prediction = model.predict_features(features, k=3)
    _, listed = model.shortlister.centroids.search(encode_all(model, features), 3)
    for row, ids in enumerate(prediction.label_ids):
        assert set(ids) == set(listed[row])
    assert (model.predict_features(features, k=5).label_ids >= 0).all()


def test_the_frequent_labels_are_scored_besides_each_shortlist(shortlisted):
    """One label listed per document, and one frequent label: the model scores those two."""
    dataset, run_dir, _ = shortlisted
    model = load(run_dir)
    model.shortlister = Shortlister(centroids=model.shortlister.centroids)
    h = torch.from_numpy(encode_all(model, model.featurize(list(dataset.test.texts),
                                                           progress=False)))
    _, listed = model.shortlister.centroids.search(h, 1)
    frequent = int(model.frequent_labels[0])
    model.frequent_labels = np.array([frequent])
    assert (listed[:, 0] != frequent).any()  # some documents get a label they did not list
    for row, ids in enumerate(model.shortlist(h, 1)):
        assert set(ids[ids >= 0].tolist()) == {int(listed[row, 0]), frequent}
    model.shortlist_k = 1  # predicting k labels lists k per index, then adds the frequent
    features = model.featurize(list(dataset.test.texts), progress=False)
    prediction = model.predict_features(features, k=2)
    for ids, scored in zip(prediction.label_ids, model.shortlist(h, 2)):
        assert set(ids.tolist()) <= set(scored.tolist()) - {-1}
    assert (prediction.label_ids == frequent).any()


@pytest.mark.parametrize(("content", "message"), [
    (b"not a numpy file", "not a readable .npy file"),
    (np.array([0, 9]), "distinct label ids below 6"),
    (np.array([1, 1]), "distinct label ids below 6"),
])
def test_a_bad_frequent_labels_file_is_refused_by_name(shortlisted, tmp_path, content, message):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(shortlisted[1], run_dir)
    path = run_dir / "frequent_labels.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(XmlgameError, match=message) as caught:
        load(run_dir)
    assert str(path) in str(caught.value)


def test_frequent_labels_by_hand():
    counts = np.array([3, 0, 7, 3, 1, 7])
    np.testing.assert_array_equal(frequent_labels(counts, 4), [2, 5, 0, 3])
    np.testing.assert_array_equal(frequent_labels(counts, 10), [2, 5, 0, 3, 4])  # 1 unseen
    assert frequent_labels(counts, 0).size == 0


@pytest.mark.parametrize(("kind", "vectors", "expected"), [
    ("flat", "auto", "both"), ("hnsw", "auto", "centroids"), ("ivf", "auto", "centroids"),
    ("hnsw", "heads", "heads"), ("flat", "centroids", "centroids"),
])
def test_auto_index_vectors_drop_the_heads_once_the_index_is_approximate(
        shortlisted, tmp_path, kind, vectors, expected):
    dataset = PreparedDataset(shortlisted[0].path)
    config = shortlist_config(index=IndexConfig(kind=kind), index_vectors=vectors)
    trainer = train_module.Trainer(dataset, config, tmp_path, progress=False)
    assert trainer.index_vectors() == expected


def test_the_head_index_lists_what_the_players_rank_first(shortlisted):
    dataset, run_dir, _ = shortlisted
    model = load(run_dir)
    features = model.featurize(list(dataset.test.texts), progress=False)
    exhaustive = model.predict_features(features, k=2)
    listed = Shortlister(heads=model.shortlister.heads).search(encode_all(model, features), 2)
    for row, ids in enumerate(exhaustive.label_ids):
        assert set(ids) == set(listed[row])


def test_joined_shortlists_hold_no_repeats():
    class Fixed:
        def __init__(self, ids):
            self.ids = np.array(ids)

        def search(self, queries, k):
            return None, self.ids

    joined = Shortlister(centroids=Fixed([[4, 1, 2]]), heads=Fixed([[2, 4, -1]])).search(
        np.zeros((1, 3), np.float32), 3)
    assert sorted(joined[0].tolist()) == [-1, -1, -1, 1, 2, 4]


def test_predict_proba_each_equals_the_batch_scoring(shortlisted):
    dataset, run_dir, _ = shortlisted
    model = load(run_dir)
    features = model.featurize(list(dataset.test.texts)[:7], progress=False)
    h = torch.from_numpy(encode_all(model, features))
    everything = model.players.predict_proba(h, model.players.pairs(torch.arange(6)))
    labels = torch.tensor([[5, 0, -1, 3]] * 7)
    each = model.players.predict_proba_each(h, labels)
    torch.testing.assert_close(each[:, [0, 1, 3]], everything[:, [5, 0, 3]])
    assert (each[:, 2] == -1).all()


def test_streamed_prediction_equals_one_call(shortlisted):
    dataset, run_dir, _ = shortlisted
    model = load(run_dir)
    texts = list(dataset.test.texts)[:9]
    whole = model.predict_features(model.featurize(texts, progress=False), k=5)
    chunks = list(predict_stream(model, iter(texts), k=5, chunk=4))
    assert [len(c[0]) for c in chunks] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([c[2].label_ids for c in chunks]),
                                  whole.label_ids)


def test_candidates_join_positives_mined_and_sampled_labels():
    class FakePlayers:
        def pairs(self, labels):
            return labels

    config = TrainConfig(full_candidates_max=3, negatives=2, shortlist_k=2)
    candidates = Candidates(FakePlayers(), 20, config)
    candidates.hard = np.array([[7, 8], [9, -1], [1, 2]], dtype=np.int32)
    Y = sp.csr_matrix(np.eye(20, dtype=np.float32)[[3, 4]])  # noqa: N806
    rng = np.random.default_rng(0)
    sampled = np.random.default_rng(0).integers(0, 20, size=2)
    labels, targets = candidates.select(Y, rng, rows=np.array([0, 1]))
    expected = np.unique(np.concatenate([[3, 4, 7, 8, 9], sampled]))
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert targets.shape == (2, len(expected))
    assert targets[0, list(expected).index(3)] == 1 and targets[1, list(expected).index(4)] == 1
    assert targets.sum() == 2


def test_a_label_without_training_documents_is_shortlisted_by_its_name(home):
    """Label 'zebra crossing' has test documents only: its vector is its name's embedding."""
    rng = np.random.default_rng(0)
    path = home / "datasets" / "unseen"
    with DatasetWriter(path, name="unseen", layout="jsonl", with_texts=True) as writer:
        for name in ("apple", "river", "zebra crossing"):
            writer.vocab.add(name)
        for _ in range(60):
            label = int(rng.integers(0, 2))
            words = ["apple fruit tree"] if label == 0 else ["river water boat"]
            writer.train.add([label], text=" ".join(words + ["zebra"] * int(rng.integers(0, 2))
                                                    + ["crossing"] * int(rng.integers(0, 2))))
        for _ in range(5):
            writer.test.add([2], text="zebra crossing")
    dataset = PreparedDataset(path)
    assert dataset.train_counts[2] == 0
    config = shortlist_config(full_candidates_max=1, shortlist_k=2, predict_shortlist=2,
                              players=2, epochs=1)
    (home / "run").mkdir()
    trainer = train_module.Trainer(dataset, config, home / "run", progress=False)
    trainer.setup()
    done = refresh(trainer.model, trainer.data.train, trainer.data.Y_train, IndexConfig(), 2,
                   label_names=list(dataset.label_names))
    name = trainer.model.featurize(["zebra crossing"], progress=False)
    query = encode_all(trainer.model, name)
    scores, ids = done.shortlister.centroids.search(query, 1)
    assert ids[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    trainer.model.shortlister = done.shortlister
    trainer.model.shortlist_k = 1
    assert 2 in trainer.model.shortlister.search(query, 1)[0]
    prediction = trainer.model.predict_features(name, k=3)
    assert 2 in prediction.label_ids[0]  # scored by its (untrained) players, so ranked low
    trainer.model.shortlist_weight = 1.0  # ranked by the shortlist alone: first
    assert trainer.model.predict_features(name, k=1).label_ids[0, 0] == 2


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_resume_with_a_shortlist_reproduces_an_uninterrupted_run(small_toy, tmp_path,
                                                                 monkeypatch, kind):
    config = shortlist_config(encoder=EncoderConfig(dim=16, min_df=1), epochs=3, patience=100,
                              index=IndexConfig(kind=kind))
    straight = tmp_path / "straight"
    expected = train(small_toy, config, straight, progress=False)

    resumed = tmp_path / "resumed"
    real = train_module.Trainer.save_checkpoint
    calls = {"n": 0}

    def save(self, state):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(self, state)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "save_checkpoint", save)
        with pytest.raises(KeyboardInterrupt):
            train(small_toy, config, resumed, progress=False)
    assert (resumed / "checkpoint" / "hard_negatives.npy").exists()
    results = train(small_toy, config, resumed, resume=True, progress=False)
    assert results["test"] == expected["test"]
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
