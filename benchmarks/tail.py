"""Where along the label-frequency spectrum the game gains or loses against its baseline.

Trains the game (N = 6, rho = 0.2) and the baseline (N = 1, alpha = 0) as ``benchmarks/game.py``
does (same settings, same seeds), keeps each run's test predictions, and splits P@5 and PSP@5
into the contributions of ten label deciles: labels ranked by training count, ``d1`` the most
frequent, each decile holding a tenth of the training label assignments (so ``d10`` holds the
many rarest labels). A decile's contribution counts only hits on its labels, over the same
denominator, so the ten add up to the overall metric.

With ``--reuse game.json`` it trains nothing: it scores the test predictions that the game and
baseline runs of a ``benchmarks/game.py`` report left in their run folders, so that both reports
speak of the same runs.

Writes ``tail.json`` (every run's contributions), ``tail.md`` (means over seeds, and the mean
and spread of the game's difference from the baseline) and ``tail.png`` (those differences,
decile by decile).

    pip install -e ".[bench]"    # matplotlib, for the plot
    python benchmarks/tail.py --data-dir ../shared/data --out benchmarks/results
    python benchmarks/tail.py --reuse benchmarks/results/game.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# benchmarks/game.py, next to this script (its folder is on the path when run as a script)
from game import add_run_arguments, configs, one_run, prepare

from xmlgame.errors import XmlgameError
from xmlgame.paths import write_json, write_text

DECILES = [f"d{i}" for i in range(1, 11)]
FAMILIES = ("p@5", "psp@5")
SETTINGS = ("game", "baseline")


def decile_metrics() -> list[str]:
    return [*FAMILIES, *(f"{family}[{d}]" for family in FAMILIES for d in DECILES)]


def differences(runs: list[dict], dataset: str, metric: str) -> tuple[float, float, list]:
    """Mean and standard deviation over seeds of the game's ``metric`` minus the baseline's
    (seed by seed: both see the same split and batches), in points, and the seeds' values."""
    by_seed = {}
    for run in runs:
        if run["dataset"] == dataset:
            by_seed.setdefault(run["seed"], {})[run["config"]] = run["metrics"][metric]
    diffs = [100 * (v["game"] - v["baseline"]) for v in by_seed.values() if len(v) == 2]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return (statistics.fmean(diffs) if diffs else float("nan")), spread, diffs


def mean_of(runs: list[dict], dataset: str, setting: str, metric: str) -> float:
    values = [100 * r["metrics"][metric] for r in runs
              if r["dataset"] == dataset and r["config"] == setting]
    return statistics.fmean(values) if values else float("nan")


def report(runs: list[dict], buckets: dict, datasets: list[str], seeds: list[int],
           source: str) -> list[str]:
    lines = [
        "# Where the game gains: P@5 and PSP@5 by label-frequency decile",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {os.cpu_count()} CPUs. Made by "
        f"`python benchmarks/tail.py` (seeds {seeds}; {source}).",
        "",
        "Each decile's contribution to P@5 and PSP@5, in points (the ten add up to the overall "
        "value); labels ranked by training count, d1 the most frequent, each decile a tenth of "
        "the training label assignments. Means over seeds; diff: the game minus the baseline, "
        "seed by seed, mean ± standard deviation.",
        "",
    ]
    for dataset in datasets:
        if dataset not in buckets:
            continue
        lines += [
            f"## {dataset}", "",
            "| decile | labels | training docs per label | P@5 game | P@5 baseline | diff "
            "| PSP@5 game | PSP@5 baseline | diff |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for bucket in [*DECILES, None]:
            cells = []
            for family in FAMILIES:
                metric = family if bucket is None else f"{family}[{bucket}]"
                mean, spread, _ = differences(runs, dataset, metric)
                cells += [f"{mean_of(runs, dataset, s, metric):.2f}" for s in SETTINGS]
                cells.append(f"{mean:+.2f} ± {spread:.2f}")
            if bucket is None:
                lines.append("| all | | | " + " | ".join(cells) + " |")
            else:
                info = buckets[dataset][bucket]
                low, high = info["train_counts"] or ("-", "-")
                lines.append(f"| {bucket} | {info['labels']:,} | {low} to {high} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(runs: list[dict], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), sharey=False,
                             squeeze=False)
    x = list(range(len(DECILES)))
    width = 0.4
    for ax, dataset in zip(axes[0], datasets):
        for offset, family, color in ((-width / 2, "p@5", "#8c8c8c"),
                                      (width / 2, "psp@5", "#1f77b4")):
            stats = [differences(runs, dataset, f"{family}[{d}]") for d in DECILES]
            ax.bar([i + offset for i in x], [s[0] for s in stats], width,
                   yerr=[s[1] for s in stats], color=color, label=family.upper(), capsize=2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, DECILES)
        ax.set_title(dataset)
        ax.set_xlabel("label decile (d1 most frequent)")
    axes[0][0].set_ylabel("game minus baseline, points")
    axes[0][0].legend(loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def reused_runs(report: Path, datasets: list[str], seeds: list[int]) -> dict:
    """(dataset, setting, seed) -> (run folder, selected epoch) of a game.py report's game and
    baseline runs; every one asked for must be there, with its predictions."""
    try:
        listed = json.loads(report.read_text())["runs"]
    except (OSError, ValueError, KeyError) as error:
        raise XmlgameError(f"{report}: not a benchmarks/game.py report ({error})") from None
    found = {(r["dataset"], r["config"], r["seed"]): r for r in listed}
    chosen = {}
    for key in ((d, s, seed) for d in datasets for s in SETTINGS for seed in seeds):
        run = found.get(key)
        if run is None or "run_dir" not in run:
            raise XmlgameError(f"{report} has no {key[1]} run of {key[0]} with seed {key[2]} "
                               "and a run folder: run benchmarks/game.py with these datasets "
                               "and seeds, or drop --reuse to train them here")
        predictions = Path(run["run_dir"]) / "predictions.npz"
        if not predictions.exists():
            raise XmlgameError(f"{predictions} (listed in {report}) is missing: run "
                               "benchmarks/game.py again, or drop --reuse to train here")
        chosen[key] = Path(run["run_dir"]), run["best_epoch"]
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)  # the same runs as benchmarks/game.py
    parser.add_argument("--reuse", type=Path, default=None, metavar="GAME_JSON",
                        help="score the runs of this benchmarks/game.py report, training none")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401  (checked first: the plot comes last)
    except ImportError:
        parser.error('the plot needs matplotlib: pip install -e ".[bench]"')

    os.environ["XMLGAME_HOME"] = str(args.work.resolve())
    from xmlgame.dataset import load_dataset
    from xmlgame.evaluate import evaluate
    from xmlgame.predictions import load_predictions
    from xmlgame.train import TrainConfig

    settings = configs(TrainConfig(epochs=args.epochs, shortlist_k=0))  # as benchmarks/game.py
    try:
        reused = reused_runs(args.reuse, args.datasets, args.seeds) if args.reuse else None
    except XmlgameError as error:
        parser.error(str(error))
    source = (f"the game and baseline runs of `{args.reuse}`" if reused
              else "settings as `benchmarks/game.py`")
    args.out.mkdir(parents=True, exist_ok=True)
    runs, buckets = [], {}
    for name in args.datasets:
        dataset = load_dataset(prepare(name, args.data_dir))
        for seed in args.seeds:
            for setting in SETTINGS:
                if reused:
                    run_dir, best_epoch = reused[name, setting, seed]
                else:
                    stamp = int(time.time())
                    run_dir = args.work / "runs" / f"tail-{name}-{setting}-seed{seed}-{stamp}"
                    result = one_run(dataset, replace(settings[setting], seed=seed), run_dir)
                    best_epoch = result["best_epoch"]
                scored = evaluate(dataset, load_predictions(run_dir / "predictions.npz"),
                                  decile_metrics())
                buckets[name] = scored["buckets"]
                runs.append({"dataset": name, "config": setting, "seed": seed,
                             "best_epoch": best_epoch, "metrics": scored["metrics"]})
                m = scored["metrics"]
                print(f"{name:18s} {setting:8s} seed {seed}  P@5 {100 * m['p@5']:.2f}  PSP@5 "
                      f"{100 * m['psp@5']:.2f}  PSP@5[d10] {100 * m['psp@5[d10]']:.2f}", flush=True)
        lines = report(runs, buckets, args.datasets, args.seeds, source)
        write_text(args.out / "tail.md", "\n".join(lines) + "\n")
        write_json(args.out / "tail.json", {"seeds": args.seeds, "buckets": buckets, "runs": runs})
    plot(runs, [d for d in args.datasets if d in buckets], args.out / "tail.png")
    print((args.out / "tail.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
