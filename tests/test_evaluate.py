"""Predictions files and `xmlgame eval`, on a tiny prepared dataset made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from xmlgame.cli import app
from xmlgame.dataset import DatasetWriter, PreparedDataset
from xmlgame.errors import XmlgameError
from xmlgame.evaluate import evaluate, evaluate_command, format_table
from xmlgame.metrics import TopK, inverse_propensity, parse_metric_names
from xmlgame.predictions import (
    load_predictions,
    save_predictions,
    stored_dataset_name,
    topk_from_scores,
)

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("XMLGAME_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def toy(home):
    """Labels a, b, c, d (ids 0..3) with 3, 2, 1, 0 training documents; three test documents."""
    path = home / "datasets" / "toy"
    with DatasetWriter(path, name="toy", layout="jsonl", with_texts=True) as writer:
        ids = {name: writer.vocab.add(name) for name in "abcd"}
        for labels in ("ab", "a", "ac", "b"):
            writer.train.add([ids[x] for x in labels], text=f"train {labels}")
        for labels in ("a", "d", "bc"):
            writer.test.add([ids[x] for x in labels], text=f"test {labels}")
    return PreparedDataset(path)


def toy_predictions() -> TopK:
    # doc 0 (truth a): a, b | doc 1 (truth d): a | doc 2 (truth b, c): c, a -- padded to 5
    ids = np.array([[0, 1, -1, -1, -1], [0, -1, -1, -1, -1], [2, 0, -1, -1, -1]])
    scores = np.array([[0.9, 0.5, 0, 0, 0], [0.7, 0, 0, 0, 0], [0.8, 0.6, 0, 0, 0]])
    return TopK(ids, scores.astype(np.float32))


def toy_psp5() -> float:
    # hits: a (doc 0) and c (doc 2); the best ranking finds a, d, b and c
    q = inverse_propensity(np.array([3, 2, 1, 0]), 4, 0.55, 1.5)
    return (q[0] + q[2]) / (q[0] + q[3] + q[1] + q[2])


# --------------------------------------------------------------------------------------------
# predictions files


def test_save_load_round_trip(tmp_path):
    preds = toy_predictions()
    path = save_predictions(tmp_path / "preds.npz", preds, dataset_name="toy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.npz"]  # no temporary left
    loaded = load_predictions(path)
    np.testing.assert_array_equal(loaded.label_ids, preds.label_ids)
    np.testing.assert_array_equal(loaded.scores, preds.scores)
    assert loaded.label_ids.dtype == np.int64 and loaded.scores.dtype == np.float32
    assert stored_dataset_name(path) == "toy"
    assert load_predictions(path, k=2).k == 2


def test_load_sorts_rows_by_score_then_label_id(tmp_path):
    ids = np.array([[4, 1, 3, -1]])
    scores = np.array([[0.5, 0.5, 0.9, 1.0]], dtype=np.float32)
    save_predictions(tmp_path / "p.npz", TopK(ids, scores))
    assert load_predictions(tmp_path / "p.npz").label_ids.tolist() == [[3, 1, 4, -1]]
    assert stored_dataset_name(tmp_path / "p.npz") is None


def test_csr_scores_become_top_k(tmp_path):
    # row 0: labels 2 (0.5), 5 (0.9), 7 (0.5) -> 5, then the tie 2 before 7; row 1: nothing
    matrix = sp.csr_matrix(([0.5, 0.9, 0.5], [2, 5, 7], [0, 3, 3]), shape=(2, 10))
    sp.save_npz(tmp_path / "pecos.npz", matrix)
    loaded = load_predictions(tmp_path / "pecos.npz", k=4)
    assert loaded.label_ids.tolist() == [[5, 2, 7, -1], [-1, -1, -1, -1]]
    np.testing.assert_allclose(loaded.scores[0, :3], [0.9, 0.5, 0.5])
    assert load_predictions(tmp_path / "pecos.npz").k == 3  # the widest row
    dense = topk_from_scores(matrix.toarray(), 2)
    assert dense.label_ids.tolist() == [[5, 2], [0, 1]]  # dense: every label is a candidate


def test_bad_files_are_named(tmp_path):
    with pytest.raises(XmlgameError, match="does not exist"):
        load_predictions(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(XmlgameError, match="junk.npz"):
        load_predictions(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(XmlgameError, match="other.npz holds arrays foo"):
        load_predictions(tmp_path / "other.npz")
    np.savez(tmp_path / "shape.npz", label_ids=np.zeros((3, 2)), scores=np.zeros((3, 4)))
    with pytest.raises(XmlgameError, match="shape.npz"):
        load_predictions(tmp_path / "shape.npz")


def test_bad_metric_name_lists_valid_names():
    with pytest.raises(XmlgameError) as error:
        parse_metric_names(["p@5", "precision@5"])
    assert "'precision@5'" in str(error.value)
    assert "psp@K" in str(error.value) and "coverage@K" in str(error.value)


# --------------------------------------------------------------------------------------------
# evaluation


def test_evaluate_results_and_table(toy):
    results = evaluate(toy, toy_predictions(), ["p@1", "psp@5", "rare-f1@5", "p@5[tail]"])
    assert results["n_test"] == 3
    assert results["unseen_label_test_assignments"] == 1  # label d
    assert results["metrics"]["p@1"] == pytest.approx(2 / 3)
    assert results["metrics"]["psp@5"] == pytest.approx(toy_psp5())
    # rare (1..10 training docs): a, b, c. TP: a (doc 0), c (doc 2);
    # FP: b (doc 0), a (doc 1), a (doc 2); FN: b (doc 2) -> F1 = 4 / (4 + 3 + 1)
    assert results["counts"]["rare-f1@5"] == {"tp": 2, "fp": 3, "fn": 1}
    assert results["metrics"]["rare-f1@5"] == pytest.approx(0.5)
    json.dumps(results)  # JSON-ready
    table = format_table(results)
    assert "66.67" in table and f"{100 * toy_psp5():.2f}" in table and "p[tail]" in table


def test_evaluate_row_count_mismatch(toy):
    preds = TopK(np.zeros((2, 5), dtype=np.int64) - 1, np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(XmlgameError, match="2 rows .* 3 test documents"):
        evaluate(toy, preds)


def test_cli_eval_predictions_file(toy, tmp_path):
    preds = save_predictions(tmp_path / "preds.npz", toy_predictions())
    out = tmp_path / "out.json"
    args = ["eval", str(preds), "--dataset", str(toy.path), "--metric", "psp@5"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert list(written["metrics"]) == ["psp@5"]
    assert written["metrics"]["psp@5"] == pytest.approx(toy_psp5())
    assert written["predictions"] == str(preds) and written["dataset"] == "toy"
    assert f"{100 * toy_psp5():.2f}" in result.output


def test_cli_bad_metric_exits_2(toy, tmp_path):
    preds = save_predictions(tmp_path / "preds.npz", toy_predictions())
    result = runner.invoke(app, ["eval", str(preds), "--dataset", "toy", "--metric", "f1@5"])
    assert result.exit_code == 2
    assert "psndcg@K" in result.output


def test_dataset_name_stored_in_predictions(toy, tmp_path):
    preds = save_predictions(tmp_path / "preds.npz", toy_predictions(), dataset_name="toy")
    results, _ = evaluate_command(preds, metrics=["p@1"])
    assert results["dataset"] == "toy" and results["metrics"]["p@1"] == pytest.approx(2 / 3)


def test_no_runs_yet(home):
    with pytest.raises(XmlgameError, match="no runs yet; train one with `xmlgame train`"):
        evaluate_command(None)
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "no runs yet" in result.output


def test_latest_run_and_run_folder(toy, home):
    run = home / "runs" / "run-1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"dataset": "toy"}))
    with pytest.raises(XmlgameError, match="has predictions.npz yet"):
        evaluate_command(None)
    save_predictions(run / "predictions.npz", toy_predictions())
    results, table = evaluate_command(None, metrics=["p@1,psp@5"])
    assert results["run"] == str(run) and results["dataset"] == "toy"
    assert results["metrics"]["psp@5"] == pytest.approx(toy_psp5())
    assert evaluate_command(run, metrics=["p@1"])[0]["metrics"] == {"p@1": pytest.approx(2 / 3)}


def test_eval_a_pecos_csr_file(toy, tmp_path):
    # the toy predictions as a (3, 4) sparse score matrix, as PECOS saves them
    matrix = sp.csr_matrix(([0.9, 0.5, 0.7, 0.6, 0.8], [0, 1, 0, 0, 2], [0, 2, 3, 5]), shape=(3, 4))
    sp.save_npz(tmp_path / "pecos.npz", matrix)
    results, _ = evaluate_command(tmp_path / "pecos.npz", dataset="toy", metrics=["p@1", "psp@5"])
    assert results["metrics"]["p@1"] == pytest.approx(2 / 3)
    assert results["metrics"]["psp@5"] == pytest.approx(toy_psp5())
