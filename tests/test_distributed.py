"""Training and evaluation on two CPU processes (gloo) against one process.

Two processes take the steps one process takes on the same global batches (same seed), up to
the order in which floats are summed: parameters agree within ``PARAMETER_TOLERANCE`` (max
absolute difference; up to 2e-6 is seen after three epochs) and, as no test document's ranking
is that close to a tie, the metrics are equal. Dropout stays on (0.3): its masks are drawn for
the whole batch from the shared seed and sliced by rows, so it does not make the runs differ.
Evaluation over two processes is exact by construction (each process scores whole batches of
one process's run), so it is compared with ``==``.

The two-process side runs once per module: ``tests/distributed_jobs.py`` under torchrun, with
``PYTHONPATH`` set to the xmlgame being tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

import xmlgame
from xmlgame.cli import app
from xmlgame.distributed import Communicator, check_world_size, split_sizes
from xmlgame.encoders import EncoderConfig
from xmlgame.errors import XmlgameError
from xmlgame.game import GameConfig
from xmlgame.parallel import BatchShare, check_launch
from xmlgame.synthetic import SyntheticConfig, prepare_synthetic
from xmlgame.train import TrainConfig, Trainer, split_validation, train

PARAMETER_TOLERANCE = 1e-5
JOBS = Path(__file__).with_name("distributed_jobs.py")
REPO = Path(xmlgame.__file__).resolve().parents[1]  # the xmlgame under test, for subprocesses
runner = CliRunner()


def subprocess_env() -> dict:
    """The environment of launched processes: this xmlgame first, one thread per process."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files' tensors."""
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic set with sampled candidates and sparse tables, a one-process reference
    run, a one-process run interrupted after epoch 2, and the two-process jobs' results."""
    folder = tmp_path_factory.mktemp("distributed")
    dataset = prepare_synthetic(
        SyntheticConfig(n_labels=300, n_train=600, n_test=31, seed=5), out=folder / "syn"
    )
    config = TrainConfig(
        players=3, overlap=0.3, encoder=EncoderConfig(dim=16, min_df=1), epochs=3,
        batch_size=49, val_fraction=0.1, full_candidates_max=100, negatives=40, patience=100,
        lr_players=0.01,
    )
    reference = folder / "reference"
    expected = train(dataset, config, reference, progress=False)

    interrupted = folder / "interrupted-alone"
    real = Trainer.save_checkpoint
    calls = {"n": 0}

    def save(self, state):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Interrupted
        return real(self, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", save)
        with pytest.raises(Interrupted):
            train(dataset, config, interrupted, progress=False)

    interrupted_copy = folder / "interrupted-alone-copy"
    shutil.copytree(interrupted, interrupted_copy)
    hard_negatives = np.load(interrupted / "checkpoint" / "hard_negatives.npy")

    out = folder / "two"
    out.mkdir()
    spec = {"out": str(out), "dataset": str(dataset.path), "config": asdict(config),
            "interrupted": str(interrupted), "interrupted_copy": str(interrupted_copy),
            "reference": str(reference), "eval_batch": 4}
    (folder / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(JOBS), str(folder / "spec.json")]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return SimpleNamespace(dataset=dataset, config=config, reference=reference,
                           expected=expected, interrupted=interrupted,
                           interrupted_copy=interrupted_copy, out=out, ranks=ranks,
                           hard_negatives_after_2=hard_negatives)


# --------------------------------------------------------------------------------------------
# the communicator


def test_split_rule_gives_contiguous_blocks_differing_by_at_most_one():
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(1, 2) == [1, 0]
    assert split_sizes(0, 2) == [0, 0]
    share = BatchShare(5, 3, 5, micro=2)
    assert [(offset, rows.tolist()) for offset, rows in share.parts(np.arange(3, 5))] == \
        [(0, [3]), (1, [4])]
    assert share.parts(np.arange(0)) == []


def test_collectives_line_up_with_a_process_holding_nothing(world):
    seen = [rank["communicator"] for rank in world.ranks]
    assert seen[0]["block_of_1"] == [0, 1] and seen[1]["block_of_1"] == [1, 1]
    for checks in seen:
        assert checks["gather_one_and_none"] == [[0.0, 1.0, 2.0]]
        assert checks["gather_none"] == [0, 2]
        assert checks["gather_uneven"] == [0, 1, 10, 11, 12]
        expected = np.zeros((6, 2))
        expected[1] = 1
        expected[3] = 2 + 3 + 10
        expected[5] = 20
        assert checks["sparse_sum"] == expected.tolist()
        assert checks["sparse_one_sided"] == [[0, 0], [0, 0], [5, 5], [0, 0]]
        assert checks["dense_sum"] == [3.0, 3.0]
        assert checks["broadcast"] == "from 0"
        assert checks["on_main_error"] == "main says no"


# --------------------------------------------------------------------------------------------
# training


def test_last_batch_leaves_the_second_process_without_rows(world):
    """The data are sized so that the collectives are tested with an empty share."""
    train_rows, _ = split_validation(len(world.dataset.train), world.config)
    assert len(train_rows) % world.config.batch_size == 1


@pytest.mark.parametrize("mode", ["data-parallel", "label-parallel"])
def test_two_processes_train_as_one(world, mode):
    """Same global batch and seed: parameters within PARAMETER_TOLERANCE, equal metrics, the
    same mined negatives. (label-parallel also runs two micro-batches per batch.)"""
    run = world.out / mode
    for weights in ("model.safetensors", "checkpoint/model.safetensors"):
        assert max_difference(world.reference / weights, run / weights) < PARAMETER_TOLERANCE
    for rank in world.ranks:
        results = rank[mode.replace("-", "_")]
        assert results["best_epoch"] == world.expected["best_epoch"]
        assert results["test"] == pytest.approx(world.expected["test"], abs=1e-9)
    # one log line per epoch, written by the main process, as one process's
    log, expected = read_log(run), read_log(world.reference)
    assert len(log) == len(expected) == world.config.epochs
    for entry, alone in zip(log, expected):
        assert entry["val"] == pytest.approx(alone["val"], abs=1e-9)
        assert entry["tail_labels_led"] == alone["tail_labels_led"]
        for key in ("Phi", "R", "grad_norm_head", "grad_norm_tail"):
            assert entry[key] == pytest.approx(alone[key], rel=1e-4), key
        assert entry["C"] == pytest.approx(alone["C"], rel=1e-4)
    # the label indexes were rebuilt each epoch by the main process and their hard negatives
    # shared: after epoch 2, the same as one process mined (a flat index: exact search)
    assert all(entry["index"] == "centroids (flat)+heads (flat)" for entry in log + expected)
    for rank in world.ranks:
        name = "interrupted" if mode == "data-parallel" else "interrupted-label-parallel"
        mined = np.array(rank["hard_negatives_after_2"][name])
        assert mined.shape == world.hard_negatives_after_2.shape
        assert np.array_equal(mined, world.hard_negatives_after_2)
    assert (run / "label_index.faiss").exists() and (run / "head_index.faiss").exists()
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["processes"] == 2 and run_json["status"] == "done"
    assert run_json["config"]["label_parallel"] == (mode == "label-parallel")


def test_label_parallel_holds_one_block_of_players_per_process(world):
    """Each process allocates only its players' tables (and their optimizer states): with four
    players over two processes, about half the head each."""
    alone = world.ranks[0]["head_data_parallel"]
    total_rows = sum(alone["rows"])
    width = (alone["dim"] + 1) * 4  # float32 weights and bias
    assert alone["head_bytes"] == 3 * total_rows * width  # table, exp_avg, exp_avg_sq
    held = [rank["head"] for rank in world.ranks]
    assert [h["held"] for h in held] == [[0, 1], [2, 3]]
    for h in held:
        for player, rows in enumerate(h["rows"]):
            assert (rows > 0) == (player in h["held"])
        assert h["head_bytes"] == 3 * sum(h["rows"]) * width
        assert abs(h["head_bytes"] / alone["head_bytes"] - 0.5) < 0.05
    assert sum(h["rows"][p] for h in held for p in h["held"]) == total_rows


def test_checkpoints_move_between_one_and_two_processes(world):
    """One-process checkpoints resumed on two processes (data- and label-parallel), and
    two-process checkpoints (data- and label-parallel) resumed in one, reach the uninterrupted
    run's weights and metrics."""
    runs = [(world.interrupted, world.ranks[0]["resumed"], 2),
            (world.interrupted_copy, world.ranks[0]["resumed_label_parallel"], 2)]
    assert world.ranks[0]["interrupted_here"] == world.ranks[1]["interrupted_here"] == \
        ["interrupted", "interrupted-label-parallel"]
    for name in world.ranks[0]["interrupted_here"]:
        written_by_two = world.out / name
        state = json.loads((written_by_two / "checkpoint" / "state.json").read_text())
        assert state["epoch"] == 2
        results = train(world.dataset, replace(world.config, label_parallel=False),
                        written_by_two, resume=True, progress=False)
        runs.append((written_by_two, results, 1))
    for run, results, processes in runs:
        for weights in ("model.safetensors", "checkpoint/model.safetensors"):
            assert max_difference(world.reference / weights, run / weights) \
                < PARAMETER_TOLERANCE, (run, weights)
        assert results["test"] == pytest.approx(world.expected["test"], abs=1e-9), run
        assert len(read_log(run)) == world.config.epochs
        assert json.loads((run / "run.json").read_text())["processes"] == processes


# --------------------------------------------------------------------------------------------
# evaluation


def test_evaluation_over_two_processes_equals_one_process_exactly(world):
    """31 test documents in batches of 4: 4 batches for one process, 4 (the last of 3
    documents) for the other; and 3 documents, leaving one process none."""
    from xmlgame.metrics import TopK, compute_metrics
    from xmlgame.model import load

    dataset = world.dataset
    model = load(world.reference)
    features = model.featurize(list(dataset.test.texts), progress=False)
    assert len(features) == 31
    for name, subset in (("all", np.arange(31)), ("first3", np.arange(3))):
        alone = model.predict_features(features.subset(subset), k=5, batch_size=4)
        metrics = compute_metrics(
            TopK(alone.label_ids, alone.scores), dataset.test.Y[subset], dataset.train_counts,
            dataset.meta["counts"]["train_docs"], *dataset.propensity_ab,
        )
        for rank in world.ranks:
            for mode in ("data", "label"):
                shared = rank["evaluation"][f"{mode}_{name}"]
                assert np.array_equal(np.array(shared["ids"]), alone.label_ids), (mode, name)
                assert np.array_equal(np.array(shared["scores"], dtype=np.float32),
                                      alone.scores), (mode, name)
                assert shared["metrics"] == metrics, (mode, name)
    rows = [rank["evaluation"]["label_rows"] for rank in world.ranks]
    assert [r > 0 for r in rows[0]] == [True, True, False]  # players 0, 1 on the first process
    assert [r > 0 for r in rows[1]] == [False, False, True]


# --------------------------------------------------------------------------------------------
# one process: gradient accumulation, checks of the options


def test_gradient_accumulation_takes_the_steps_of_one_batch(world, tmp_path):
    """Three micro-batches per batch (dropout on) against one: the same run within tolerance."""
    config = replace(world.config, epochs=2, grad_accum=3)
    results = train(world.dataset, config, tmp_path / "accumulated", progress=False)
    straight = train(world.dataset, replace(config, grad_accum=1), tmp_path / "straight",
                     progress=False)
    assert max_difference(tmp_path / "straight" / "model.safetensors",
                          tmp_path / "accumulated" / "model.safetensors") < PARAMETER_TOLERANCE
    assert results["test"] == pytest.approx(straight["test"], abs=1e-9)


def test_options_that_do_not_fit_the_launch_are_refused():
    two = Communicator(rank=0, world_size=2)
    with pytest.raises(XmlgameError, match="--players 2 or more"):
        check_launch(TrainConfig(players=1, label_parallel=True), two)
    with pytest.raises(XmlgameError, match="needs a GPU"):
        check_launch(TrainConfig(mixed_precision="bf16"), Communicator())
    with pytest.raises(XmlgameError, match="cyclic schedule only"):
        TrainConfig(label_parallel=True, game=GameConfig(schedule="joint"))
    with pytest.raises(XmlgameError, match="--grad-accum"):
        TrainConfig(grad_accum=0)


def test_cli_refuses_bf16_on_cpu_and_a_wrong_process_count(small_toy, tmp_path, monkeypatch):
    base = ["train", "--dataset", str(small_toy.path), "--no-progress", "--out",
            str(tmp_path / "run")]
    result = runner.invoke(app, [*base, "--mixed-precision", "bf16"])
    assert result.exit_code == 2 and "needs a GPU" in result.stderr
    result = runner.invoke(app, [*base, "--mixed-precision", "fp8"])
    assert result.exit_code == 2 and "--mixed-precision 'fp8'" in result.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under a launcher of two processes
    result = runner.invoke(app, [*base, "--num-processes", "3"])
    assert result.exit_code == 2 and "started 2 processes" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()
    with pytest.raises(XmlgameError, match="at least 1"):
        check_world_size(0)


def test_cli_num_processes_trains_on_two_processes(small_toy, tmp_path):
    """`xmlgame train --num-processes 2` relaunches itself as two processes: one result line,
    one log line per epoch, and the run one process makes (dense tables, all labels)."""
    args = ["train", "--dataset", str(small_toy.path), "--players", "2", "--epochs", "2",
            "--dim", "16", "--batch-size", "25", "--no-progress"]
    alone = tmp_path / "alone"
    result = runner.invoke(app, [*args, "--out", str(alone)])
    assert result.exit_code == 0, result.output

    two = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "xmlgame.cli", *args, "--num-processes", "2", "--out", str(two)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("selected  epoch") == 1  # results printed by the main process
    assert done.stderr.count("epoch  1 ") == 1 and done.stderr.count("epoch  2 ") == 1
    assert "2 processes, data-parallel on cpu" in done.stderr
    assert max_difference(alone / "model.safetensors", two / "model.safetensors") \
        < PARAMETER_TOLERANCE
    expected = json.loads((alone / "metrics.json").read_text())["test"]
    assert json.loads((two / "metrics.json").read_text())["test"] == \
        pytest.approx(expected, abs=1e-9)
    assert len(read_log(two)) == 2
