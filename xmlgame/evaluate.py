"""Score predictions against a prepared dataset's test split (the ``xmlgame eval`` command).

What ``xmlgame eval [PREDICTIONS]`` scores:

- a predictions file (see :mod:`xmlgame.predictions`), against ``--dataset``, else the dataset
  name stored in the file, else the latest prepared dataset;
- a run folder, i.e. one holding ``run.json`` (or ``config.json``) and ``predictions.npz``: its
  predictions, against ``--dataset`` or else the ``"dataset"`` entry of its ``run.json`` (a name
  or folder, or a ``{"path": ..., "name": ...}`` object);
- nothing: the latest run under ``$XMLGAME_HOME/runs`` that has ``predictions.npz``.

Metric conventions are those of :mod:`xmlgame.metrics` (pyxclib's). Results are a JSON-ready dict
of fractions; :func:`format_table` prints them as percentages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from xmlgame import paths
from xmlgame.dataset import PreparedDataset
from xmlgame.errors import XmlgameError
from xmlgame.metrics import (
    BUCKETS,
    DEFAULT_RARE_THRESHOLD,
    TopK,
    compute_report,
    label_buckets,
    parse_metric,
    parse_metric_names,
)
from xmlgame.predictions import load_predictions, stored_dataset_name

logger = logging.getLogger(__name__)

RUN_MARKERS = ("run.json", "config.json")
RUN_PREDICTIONS = "predictions.npz"


def evaluate(
    dataset: PreparedDataset,
    topk: TopK,
    metrics: list[str] | None = None,
    rare_threshold: int = DEFAULT_RARE_THRESHOLD,
    score_threshold: float | None = None,
) -> dict:
    """Score ``topk`` (one row per test document) on ``dataset``'s test split.

    Propensities use the dataset's training label counts, training document count and A, B.

    Returns:
        ``{"dataset", "metrics": {name: fraction}, "n_test", "unseen_label_test_assignments",
        "counts": {...}, "propensity": {"A", "B"}, "rare_threshold"}`` and, when bucket metrics
        are asked, ``"buckets"``: labels and training-count range of each bucket.
    """
    names = parse_metric_names(metrics)
    Y = dataset.test.Y  # noqa: N806 (the usual name of a label matrix)
    if topk.n_docs != Y.shape[0]:
        raise XmlgameError(
            f"the predictions have {topk.n_docs:,} rows but dataset {dataset.name!r} "
            f"({dataset.path}) has {Y.shape[0]:,} test documents; were they made for another "
            "dataset? Give the right one with --dataset"
        )
    A, B = dataset.propensity_ab  # noqa: N806 (the paper's names)
    n_train = int(dataset.meta["counts"]["train_docs"])
    report = compute_report(
        topk, Y, dataset.train_counts, n_train, A, B, names, rare_threshold, score_threshold
    )
    results = {
        "dataset": dataset.name,
        "dataset_path": str(dataset.path),
        "metrics": report.metrics,
        "n_test": int(Y.shape[0]),
        "unseen_label_test_assignments": report.counts["unseen_label_assignments"],
        "counts": report.counts,
        "propensity": {"A": float(A), "B": float(B)},
        "rare_threshold": int(rare_threshold),
    }
    buckets = bucket_summary(dataset.train_counts, names)
    if buckets:
        results["buckets"] = buckets
    return results


def bucket_summary(train_counts: np.ndarray, names: list[str]) -> dict:
    """For each bucket named in ``names``: its number of labels and training-count range."""
    summary = {}
    for bucket in dict.fromkeys(parse_metric(name).bucket for name in names):
        if bucket is None:
            continue
        n_buckets, index = BUCKETS[bucket]
        counts = np.asarray(train_counts)[label_buckets(train_counts, n_buckets) == index]
        summary[bucket] = {
            "labels": int(len(counts)),
            "train_counts": [int(counts.min()), int(counts.max())] if len(counts) else None,
        }
    return summary


def format_table(results: dict) -> str:
    """A readable summary: a header, then one row per metric family and one column per k."""
    lines = []
    if "dataset" in results:
        lines.append(f"dataset      {results['dataset']}")
    if "predictions" in results:
        lines.append(f"predictions  {results['predictions']}")
    counts = results.get("counts", {})
    if "docs" in counts:
        lines.append(
            f"test         {counts['docs']:,} documents ({counts['docs_without_labels']:,} "
            f"without labels), {counts['test_assignments']:,} label assignments, "
            f"{counts['unseen_label_assignments']:,} held by labels unseen in training"
        )
        lines.append(
            f"rare labels  {counts['rare_labels']:,} with 1..{results.get('rare_threshold', '?')} "
            f"training documents, {counts['rare_assignments']:,} test assignments"
        )
    for bucket, info in results.get("buckets", {}).items():
        low, high = info["train_counts"] or ("-", "-")
        lines.append(
            f"bucket       {bucket}: {info['labels']:,} labels with {low}..{high} training docs"
        )
    if lines:
        lines.append("")
    lines.extend(_metric_grid(results["metrics"]))
    return "\n".join(lines)


def _metric_grid(metrics: dict[str, float]) -> list[str]:
    rows: dict[str, dict[int, float]] = {}
    for name, value in metrics.items():
        spec = parse_metric(name)
        label = spec.family + (f"[{spec.bucket}]" if spec.bucket else "")
        rows.setdefault(label, {})[spec.k] = value
    ks = sorted({k for row in rows.values() for k in row})
    width = max(len(label) for label in [*rows, "metric (%)"])
    header = "metric (%)".ljust(width) + "".join(f"{'@' + str(k):>9}" for k in ks)
    out = [header]
    for label, row in rows.items():
        cells = "".join(f"{100 * row[k]:9.2f}" if k in row else " " * 9 for k in ks)
        out.append((label.ljust(width) + cells).rstrip())
    return out


# --------------------------------------------------------------------------------------------
# the command


def _run_dataset(run_dir: Path) -> str | None:
    """The dataset recorded in a run folder's run.json (or config.json), if any."""
    for marker in RUN_MARKERS:
        if (run_dir / marker).exists():
            entry = paths.read_json(run_dir / marker).get("dataset")
            if isinstance(entry, dict):
                entry = entry.get("path") or entry.get("name")
            return None if entry is None else str(entry)
    return None


def _latest_run() -> Path:
    runs = paths.runs_dir()
    found = paths.latest(runs, RUN_PREDICTIONS)
    if found is not None:
        return found
    started = [p for p in runs.glob("*") if any((p / m).exists() for m in RUN_MARKERS)]
    if started:
        raise XmlgameError(
            f"no run in {runs} has {RUN_PREDICTIONS} yet; let a run finish or give a "
            "predictions file"
        )
    raise XmlgameError(
        f"no runs yet; train one with `xmlgame train` or give a predictions file (looked in {runs})"
    )


def _locate(predictions: Path | None) -> tuple[Path, Path | None]:
    """The predictions file to score and the run folder it came from (None for a bare file)."""
    run_dir = _latest_run() if predictions is None else None
    if predictions is not None and predictions.is_dir():
        if not any((predictions / m).exists() for m in RUN_MARKERS):
            raise XmlgameError(
                f"{predictions} is a folder but not a run (no {' or '.join(RUN_MARKERS)}); "
                "give a run folder or a predictions .npz file"
            )
        run_dir = predictions
    if run_dir is None:
        return predictions, None
    file = run_dir / RUN_PREDICTIONS
    if not file.exists():
        raise XmlgameError(f"run {run_dir} has no {RUN_PREDICTIONS} yet")
    return file, run_dir


def evaluate_command(
    predictions: Path | None,
    dataset: str | None = None,
    metrics: list[str] | None = None,
    rare_threshold: int = DEFAULT_RARE_THRESHOLD,
) -> tuple[dict, str]:
    """What ``xmlgame eval`` does: find predictions and dataset, score, and format a table.

    Returns:
        The results dict (see :func:`evaluate`, plus ``"predictions"`` and ``"run"``) and the
        table text.
    """
    names = parse_metric_names(metrics)
    file, run_dir = _locate(None if predictions is None else Path(predictions))
    if dataset is None:
        dataset = _run_dataset(run_dir) if run_dir is not None else None
    if dataset is None:
        dataset = stored_dataset_name(file)
    if dataset is None:
        logger.info("no --dataset given and none recorded; using the latest prepared dataset")
    data = PreparedDataset(paths.resolve_dataset(dataset))
    logger.info("scoring %s on %s (%s)", file, data.name, data.path)

    topk = load_predictions(file, k=max(parse_metric(name).k for name in names))
    scored = evaluate(data, topk, names, rare_threshold=rare_threshold)
    results = {"dataset": scored.pop("dataset"), "predictions": str(file)}
    if run_dir is not None:
        results["run"] = str(run_dir)
    results.update(scored)
    return results, format_table(results)
