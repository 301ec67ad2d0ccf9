"""Shared fixtures: a home folder per test and tiny, seeded, separable datasets made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xmlgame.dataset import DatasetWriter, PreparedDataset

# The tensors of these tests are tiny: a second OpenMP thread only adds synchronisation, which
# costs tens of milliseconds per kernel when the other core is busy.
torch.set_num_threads(1)

N_TOY_LABELS = 6
TOY_WORDS = [[f"w{label}{part}" for part in "abcd"] for label in range(N_TOY_LABELS)]
TOY_FILLER = ["the", "and", "of", "data", "some", "with", "about", "this"]


def toy_text(labels, rng: np.random.Generator, words_per_label: int = 5) -> str:
    """Words drawn from each label's own four words, mixed with shared filler words."""
    words = [w for label in labels for w in rng.choice(TOY_WORDS[label], size=words_per_label)]
    words += list(rng.choice(TOY_FILLER, size=3))
    rng.shuffle(words)
    return " ".join(words)


def write_toy(path: Path, n_train: int = 300, n_test: int = 30, seed: int = 0) -> PreparedDataset:
    """Six labels ``topic0``..``topic5``; each document carries one or two, read off its words."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, name=path.name, layout="jsonl", with_texts=True) as writer:
        for label in range(N_TOY_LABELS):
            writer.vocab.add(f"topic{label}")
        for split, n_docs in ((writer.train, n_train), (writer.test, n_test)):
            for _ in range(n_docs):
                labels = sorted(rng.choice(N_TOY_LABELS, size=rng.integers(1, 3), replace=False))
                split.add([int(x) for x in labels], text=toy_text(labels, rng))
    return PreparedDataset(path)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $XMLGAME_HOME for one test."""
    monkeypatch.setenv("XMLGAME_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def toy(home) -> PreparedDataset:
    """The separable toy set (300 train / 30 test documents) under ``home``."""
    return write_toy(home / "datasets" / "toy")


@pytest.fixture
def small_toy(home) -> PreparedDataset:
    """A smaller toy set (120 train / 20 test documents) for runs whose accuracy is not tested."""
    return write_toy(home / "datasets" / "small-toy", n_train=120, n_test=20, seed=1)


@pytest.fixture
def write_toy_set():
    """``write_toy`` itself, for tests that place or size their own toy sets."""
    return write_toy
