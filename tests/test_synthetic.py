"""The synthetic generator: deterministic, long-tailed, learnable, and the right shapes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from xmlgame.cli import app
from xmlgame.errors import XmlgameError
from xmlgame.synthetic import SyntheticConfig, prepare_synthetic

SMALL = dict(n_labels=300, n_train=3000, n_test=600, vocab_size=2000)


def folder_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a dataset except meta.json (which holds a timestamp)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "meta.json"}


def bag_of_words(texts, vocab: int) -> sp.csr_matrix:
    """(n, vocab) term counts of ``w123``-style texts."""
    rows, cols = [], []
    for i, text in enumerate(texts):
        ids = [int(word[1:]) for word in text.split()]
        rows += [i] * len(ids)
        cols += ids
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), vocab))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    config = SyntheticConfig(**SMALL, seed=3)
    a = prepare_synthetic(config, out=tmp_path / "a")
    b = prepare_synthetic(config, out=tmp_path / "b")
    c = prepare_synthetic(SyntheticConfig(**SMALL, seed=4), out=tmp_path / "c")
    assert folder_bytes(a.path) == folder_bytes(b.path)
    assert a.train.texts[0] != c.train.texts[0]
    assert (a.train.Y != c.train.Y).nnz > 0


def test_shapes_names_and_meta(tmp_path):
    config = SyntheticConfig(**SMALL)
    dataset = prepare_synthetic(config, out=tmp_path / "ds")
    counts = dataset.meta["counts"]
    assert (counts["train_docs"], counts["test_docs"], counts["labels"]) == (3000, 600, 300)
    assert dataset.train.Y.shape == (3000, 300) and dataset.test.Y.shape == (600, 300)
    assert counts["train_docs_without_labels"] == counts["test_docs_without_labels"] == 0
    assert len(dataset.train.texts) == 3000 and dataset.train.X is None
    assert dataset.label_names[0] == "label-000000" and dataset.label_names[299] == "label-000299"
    assert re.fullmatch(r"(w\d+ )*w\d+", dataset.train.texts[0])
    assert set(dataset.train.Y.data) == {1.0}
    assert dataset.meta["synthetic"]["seed"] == 0
    assert dataset.meta["synthetic"]["vocab_size"] == 2000
    assert dataset.meta["layout"] == "synthetic"
    # labels_per_doc is the mean in both splits, coverage included
    for split in (dataset.train, dataset.test):
        assert abs(split.Y.nnz / split.Y.shape[0] - config.labels_per_doc) < 0.3


def test_sparse_inputs(tmp_path):
    dataset = prepare_synthetic(SyntheticConfig(**SMALL, inputs="sparse"), out=tmp_path / "ds")
    X = dataset.train.X  # noqa: N806
    assert X.shape == (3000, 2000) and dataset.test.X.shape == (600, 2000)
    assert dataset.train.texts is None
    assert dataset.meta["counts"]["features"] == 2000
    np.testing.assert_allclose(sp.linalg.norm(X, axis=1), 1.0, rtol=1e-5)


def test_zipf_long_tail_and_coverage(tmp_path):
    config = SyntheticConfig(n_labels=2000, n_train=4000, n_test=500)
    covered = prepare_synthetic(config, out=tmp_path / "covered")
    counts = np.sort(covered.train_counts)[::-1]
    assert counts.min() >= 1  # every label has a training document
    assert counts[:20].sum() > 0.25 * counts.sum()  # 1% of labels hold a quarter of assignments
    assert (counts <= 5).mean() > 0.5  # most labels are tail labels
    # labels ranked by frequency in train follow a falling power law
    slope = np.polyfit(np.log(np.arange(1, 201)), np.log(counts[:200]), 1)[0]
    assert -1.3 < slope < -0.6

    bare = prepare_synthetic(
        SyntheticConfig(n_labels=2000, n_train=4000, n_test=500, cover_all_labels=False),
        out=tmp_path / "bare",
    )
    assert (bare.train_counts == 0).sum() > 100  # pure Zipf: unseen tail labels exist


def test_text_predicts_labels(tmp_path):
    """A label-token co-occurrence model learnt on train ranks the test labels well."""
    dataset = prepare_synthetic(SyntheticConfig(**SMALL), out=tmp_path / "ds")
    x_train = bag_of_words(dataset.train.texts, 2000)
    x_test = bag_of_words(dataset.test.texts, 2000)
    idf = np.log(x_train.shape[0] / (1 + np.asarray((x_train > 0).sum(axis=0)).ravel()))
    profile = (dataset.train.Y.T @ x_train).toarray() * idf  # (L, V)
    profile /= np.linalg.norm(profile, axis=1, keepdims=True) + 1e-9
    scores = x_test @ profile.T  # (n_test, L)
    y_test = dataset.test.Y.toarray()
    top = np.argmax(scores, axis=1)
    assert y_test[np.arange(len(top)), top].mean() > 0.9  # P@1

    # the tail too: test labels outside the 30 most frequent are found in the top 5
    tail = np.argsort(dataset.train_counts)[:-30]
    top5 = np.argsort(-scores, axis=1)[:, :5]
    hits = np.zeros_like(y_test)
    np.put_along_axis(hits, top5, 1.0, axis=1)
    recall_tail = (hits * y_test)[:, tail].sum() / y_test[:, tail].sum()
    assert recall_tail > 0.6


def test_config_is_validated():
    with pytest.raises(XmlgameError, match="inputs='dense'.*text, sparse"):
        SyntheticConfig(inputs="dense")
    with pytest.raises(XmlgameError, match="n_labels=0"):
        SyntheticConfig(n_labels=0)
    with pytest.raises(XmlgameError, match="labels_per_doc"):
        SyntheticConfig(labels_per_doc=0.5)
    assert SyntheticConfig(n_labels=670_091).name == "synthetic-670091labels-text-seed0"


def test_cli_synthetic_default_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XMLGAME_HOME", str(tmp_path))
    result = CliRunner().invoke(
        app, ["prep", "synthetic", "--labels", "50", "--train-docs", "200", "--test-docs", "40",
              "--features", "sparse", "--seed", "2"],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "datasets" / "synthetic-50labels-sparse-seed2" / "meta.json").is_file()
    assert "200 (0 without labels)" in result.output
    result = CliRunner().invoke(app, ["prep", "synthetic", "--features", "dense"])
    assert result.exit_code == 2 and "text, sparse" in result.output
