"""Training end to end on tiny toy sets: learning, resuming, predicting, and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import xmlgame.train as train_module
from xmlgame.cli import app
from xmlgame.encoders import EncoderConfig, batch_inputs
from xmlgame.game import AUTO_NEGATIVES, GameConfig, payoffs
from xmlgame.model import load
from xmlgame.optim import step_table_rows
from xmlgame.parallel import BatchShare, EncoderPass
from xmlgame.predictions import load_predictions
from xmlgame.train import TrainConfig, Trainer, train

runner = CliRunner()

VAL_KEYS = {"p@1", "p@3", "p@5", "psp@1", "psp@3", "psp@5", "rare-f1@5"}


def toy_config(**changes) -> TrainConfig:
    """Small and quick: every batch scores all six labels."""
    settings = dict(
        players=3, overlap=0.34, encoder=EncoderConfig(dim=32, min_df=1), epochs=8,
        batch_size=16, lr_players=0.01, val_fraction=0.4,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# learning


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"players": 1, "overlap": 0.0, "game": GameConfig(alpha=0.0)},
        {"game": GameConfig(schedule="joint")},
    ],
    ids=["cyclic-game", "baseline", "joint-game"],
)
def test_tiny_run_learns_a_separable_set(toy, tmp_path, changes):
    results = train(toy, toy_config(**changes), tmp_path / "run", progress=False)
    assert results["test"]["p@1"] == 1.0
    log = read_log(tmp_path / "run")
    assert log[-1]["Phi"] > log[0]["Phi"]  # the potential rises
    assert log[-1]["val"]["p@1"] == 1.0


@pytest.mark.parametrize("overlap", [0.34, 0.0])
def test_the_cyclic_step_is_block_coordinate_ascent_on_the_players(toy, tmp_path, overlap):
    """Each player steps on the gradient of its own J_i at the logits its predecessors left:
    train_step's closed forms and shortcuts against plain autograd, one player at a time."""
    (tmp_path / "run").mkdir()
    trainer = Trainer(toy, toy_config(overlap=overlap), tmp_path / "run", progress=False)
    trainer.setup()
    rows = np.arange(16)
    pairs, targets = trainer.candidates.select(trainer.data.Y_train[rows],
                                               np.random.default_rng(0), rows)
    assert (pairs.peer >= 0).any() == (overlap > 0)
    model, opt = copy.deepcopy((trainer.model, trainer.opt))  # the same start, apart
    before = [table.weight.detach().clone() for table in model.players.tables]
    torch.manual_seed(0)
    trainer.step(rows, pairs, targets, None)

    torch.manual_seed(0)  # the same dropout draws
    h = EncoderPass(model.encoder, batch_inputs(model.encoder, trainer.data.train, rows),
                    BatchShare(len(rows))).h.detach()
    rarity, game, players = trainer.rarity[pairs.labels], trainer.game, model.players
    for i, table in enumerate(players.tables):
        j = payoffs(players.logits(h, pairs), targets, rarity, pairs, players, game).J(
            i, game.alpha)
        (grad,) = torch.autograd.grad(-j, table.weight)
        own = pairs.player_rows[i]
        step_table_rows(opt.players[i], table, own, grad[own])
    for stepped, expected, start in zip(trainer.model.players.tables, players.tables, before):
        assert (stepped.weight != start).any()
        torch.testing.assert_close(stepped.weight, expected.weight, rtol=1e-5, atol=1e-7)
    for stepped, expected in zip(trainer.opt.players, opt.players):  # each moment moved once
        (stepped,), (expected,) = stepped.state.values(), expected.state.values()
        assert stepped["step"] == expected["step"] == 1
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(stepped[moment], expected[moment], rtol=1e-3, atol=1e-12)


def test_untrained_model_does_not_score_perfectly(toy, tmp_path, monkeypatch):
    """The P@1 = 1 above comes from training: without player steps the same run misses."""

    def frozen_step(model, opt, inputs, pairs, targets, rarity, game, probe, **extra):
        with torch.no_grad():
            h = model.encoder(inputs)
            logits = model.players.logits(h, pairs)
            return train_module.payoffs(logits, targets, rarity, pairs, model.players, game)

    monkeypatch.setattr(train_module, "train_step", frozen_step)
    results = train(toy, toy_config(epochs=1), tmp_path / "run", progress=False)
    assert results["test"]["p@1"] < 0.9


# --------------------------------------------------------------------------------------------
# resuming


class Interrupted(KeyboardInterrupt):
    pass


def interrupt_mid_epoch(monkeypatch, after_steps: int) -> None:
    """Ctrl-C inside a batch, after ``after_steps`` finished batches."""
    real = train_module.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_steps:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step)


def interrupt_before_checkpoint(monkeypatch, saved: int) -> None:
    """Ctrl-C after an epoch was logged but before its checkpoint was written."""
    real = Trainer.save_checkpoint
    calls = {"n": 0}

    def save(self, state):
        calls["n"] += 1
        if calls["n"] > saved:
            raise Interrupted
        return real(self, state)

    monkeypatch.setattr(Trainer, "save_checkpoint", save)


@pytest.mark.parametrize("where", ["mid-epoch", "before-checkpoint"])
def test_resume_reproduces_an_uninterrupted_run(small_toy, tmp_path, monkeypatch, where):
    config = toy_config(encoder=EncoderConfig(dim=16, min_df=1), epochs=4, patience=100)
    straight = tmp_path / "straight"
    expected = train(small_toy, config, straight, progress=False)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        if where == "mid-epoch":
            train_rows, _ = train_module.split_validation(len(small_toy.train), config)
            batches = -(-len(train_rows) // config.batch_size)
            interrupt_mid_epoch(patch, after_steps=2 * batches + 1)
        else:
            interrupt_before_checkpoint(patch, saved=2)
        with pytest.raises(Interrupted):
            train(small_toy, config, resumed, progress=False)
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["epoch"] == 2
    assert len(read_log(resumed)) == (2 if where == "mid-epoch" else 3)

    results = train(small_toy, config, resumed, resume=True, progress=False)
    def untimed(r):
        return {key: value for key, value in r.items() if not key.endswith("_seconds")}

    assert untimed(results) == untimed(expected)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a, log_b = read_log(straight), read_log(resumed)
    assert len(log_b) == 4
    for entry_a, entry_b in zip(log_a, log_b):
        for key in ("epoch", "Phi", "R", "C", "val", "tail_labels_led"):
            assert entry_a[key] == entry_b[key], key
    assert json.loads((resumed / "run.json").read_text())["status"] == "done"


def test_resume_needs_a_finished_epoch(small_toy, tmp_path, monkeypatch):
    from xmlgame.errors import XmlgameError

    config = toy_config(encoder=EncoderConfig(dim=16, min_df=1), epochs=2)
    with monkeypatch.context() as patch:
        interrupt_mid_epoch(patch, after_steps=1)
        with pytest.raises(Interrupted):
            train(small_toy, config, tmp_path / "run", progress=False)
    with pytest.raises(XmlgameError, match="no finished epoch"):
        train(small_toy, config, tmp_path / "run", resume=True, progress=False)


def test_train_config_needs_predictions_for_the_reported_metrics():
    from xmlgame.errors import XmlgameError

    with pytest.raises(XmlgameError, match="predict_k"):
        TrainConfig(predict_k=4)


@pytest.mark.parametrize("saved, weight", [("all", 1.0), ("positives", 0.0)])
def test_a_run_saved_with_curiosity_targets_loads_as_the_same_weight(saved, weight):
    """Runs written before negatives could be weighted apart named the two ends."""
    from dataclasses import asdict

    game = {k: v for k, v in asdict(GameConfig()).items() if k != "curiosity_negatives"}
    config = TrainConfig(game={**game, "curiosity_targets": saved})
    assert config.game == GameConfig(curiosity_negatives=weight)


# --------------------------------------------------------------------------------------------
# prediction and evaluation of a finished run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(home, run folder, dataset): one small run under its own $XMLGAME_HOME/runs."""
    from conftest import write_toy

    home = tmp_path_factory.mktemp("home")
    dataset = write_toy(home / "datasets" / "toy", n_train=200, n_test=20, seed=2)
    run_dir = home / "runs" / "toy-run"
    train(dataset, toy_config(epochs=4, predict_k=5), run_dir, progress=False)
    return home, run_dir, dataset


def test_predict_features_matches_the_saved_predictions(finished):
    _, run_dir, dataset = finished
    model = load(run_dir)
    texts = list(dataset.test.texts)
    prediction = model.predict_features(model.featurize(texts, progress=False), k=5)
    saved = load_predictions(run_dir / "predictions.npz")
    assert saved.label_ids.shape == (len(texts), 5)
    assert np.array_equal(prediction.label_ids, saved.label_ids)
    np.testing.assert_allclose(prediction.scores, saved.scores, rtol=1e-6)
    # and they are the test labels the run scored: P@1 from the file equals metrics.json
    hits = [saved.label_ids[i, 0] in dataset.test.Y[i].indices for i in range(len(texts))]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.mean(hits) == pytest.approx(metrics["test"]["p@1"])


def test_cli_predict_returns_the_names_of_the_saved_labels(finished, monkeypatch):
    home, run_dir, dataset = finished
    monkeypatch.setenv("XMLGAME_HOME", str(home))
    saved = load_predictions(run_dir / "predictions.npz")
    names = list(dataset.label_names)
    for doc in (0, 7):
        text = dataset.test.texts[doc]
        result = runner.invoke(app, ["predict", str(run_dir), text, "--json", "-k", "3"])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["text"] == text
        expected = [names[i] for i in saved.label_ids[doc, :3]]
        assert [x["label"] for x in record["labels"]] == expected
        scores = [x["score"] for x in record["labels"]]
        np.testing.assert_allclose(scores, saved.scores[doc, :3], atol=1e-5)


def test_model_predict_api(finished):
    _, run_dir, dataset = finished
    ranked = load(run_dir).predict(dataset.test.texts[0], k=2)
    saved = load_predictions(run_dir / "predictions.npz")
    expected = [dataset.label_names[i] for i in saved.label_ids[0, :2]]
    assert [name for name, _ in ranked[0]] == expected


def test_cli_eval_of_a_run_and_of_the_latest_run(finished, monkeypatch, tmp_path):
    home, run_dir, _ = finished
    monkeypatch.setenv("XMLGAME_HOME", str(home))
    expected = json.loads((run_dir / "metrics.json").read_text())["test"]
    for args in (["eval", str(run_dir)], ["eval"]):
        out = tmp_path / "eval.json"
        result = runner.invoke(app, [*args, "--metric", "p@1,psp@3", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert str(run_dir / "predictions.npz") in result.stdout
        assert f"{100 * expected['p@1']:.2f}" in result.stdout
        results = json.loads(out.read_text())
        assert Path(results["run"]) == run_dir
        assert results["metrics"]["p@1"] == pytest.approx(expected["p@1"])
        assert results["metrics"]["psp@3"] == pytest.approx(expected["psp@3"])


# --------------------------------------------------------------------------------------------
# the train command


def test_cli_train_writes_a_complete_run(small_toy, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", str(small_toy.path), "--players", "2", "--epochs", "2",
            "--dim", "16", "--no-progress", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and "P@1" in result.stdout
    for name in ("run.json", "shards.npz", "model.safetensors", "log.jsonl", "predictions.npz",
                 "metrics.json", "label_names.txt"):
        assert (out / name).exists(), name

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done"
    assert run["config"]["players"] == 2 and run["config"]["encoder"]["dim"] == 16
    assert Path(run["dataset"]["path"]) == small_toy.path.resolve()
    # the game's weights as settled for this set, where every label is a candidate
    assert run["config"]["game"]["curiosity_negatives"] == AUTO_NEGATIVES[True]
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [1, 2]
    for entry in log:
        for key in ("Phi", "R", "grad_norm_head", "grad_norm_tail", "train_seconds",
                    "peak_rss_mb"):
            assert isinstance(entry[key], float), key
        assert len(entry["C"]) == 2 and len(entry["tail_labels_led"]) == 2
        assert set(entry["val"]) == VAL_KEYS
        alpha = run["config"]["game"]["alpha"]
        assert entry["Phi"] == pytest.approx(entry["R"] + alpha * sum(entry["C"]), abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and 1 <= metrics["best_epoch"] <= 2
    assert {"p@1", "psp@5", "rare-f1@5"} <= set(metrics["test"])

    # resuming a finished run trains no more and keeps its results
    weights = load_file(str(out / "model.safetensors"))
    result = runner.invoke(app, ["train", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(read_log(out)) == 2
    again = json.loads((out / "metrics.json").read_text())
    assert again["test"] == metrics["test"] and again["epochs_run"] == 2
    for name, tensor in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(tensor, weights[name])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--players", "0", "--players"),
        ("--overlap", "1.5", "--overlap"),
        ("--schedule", "foo", "--schedule"),
        ("--encoder", "foo", "--encoder"),
        ("--alpha", "-1", "--alpha"),
        ("--curiosity-negatives", "1.5", "--curiosity-negatives"),
        ("--epochs", "0", "--epochs"),
        ("--shortlist-frequent", "-1", "--shortlist-frequent"),
        ("--index-vectors", "weights", "--index-vectors"),
    ],
)
def test_cli_train_rejects_bad_values(small_toy, tmp_path, option, value, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", str(small_toy.path), option, value,
                                 "--no-progress", "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (out / "run.json").exists()  # nothing half-made is left to trip a retry


def test_cli_train_rejects_an_unknown_dataset(home):
    result = runner.invoke(app, ["train", "--dataset", "nope", "--no-progress"])
    assert result.exit_code == 2 and "no prepared dataset 'nope'" in result.stderr
    assert "Traceback" not in result.output
