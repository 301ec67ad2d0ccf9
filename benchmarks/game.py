"""CD-GTMLL against its plain-BCE baseline, with ablations, on real long-tailed datasets.

For each dataset folder (prepared once into ``--work``), trains:

- ``game``: N = 6 players, overlap 0.2, the default alpha and beta;
- ``baseline``: N = 1, alpha = 0 (plain BCE), through the same code, encoder and candidates;
- ablations of the game: ``alpha=0``, ``beta=0``, ``rho=0``, ``N=1``, ``N=3`` and ``negatives=1``
  (curiosity weighing negative candidates as much as positives; run only where the default
  weighs them less, that is where every label is a candidate).

``game`` and ``baseline`` run with every seed in ``--seeds``; ablations with ``--ablation-seeds``.
Every run uses the same encoder, batch size, candidate count and epoch budget, and selects its
epoch on a validation split carved from the training data; the test split is scored once.

Prints one line per run, then per dataset a table of means (and standard deviations over seeds),
the differences from the baseline, whether the goals hold (higher PSP@5 and Rare-F1 than the
baseline, P@1 no more than 0.5 points lower), and the game's time per epoch as a ratio of the
baseline's. Writes ``game.json`` (every run) and ``game.md`` to ``--out``.

    python benchmarks/game.py --data-dir ../shared/data --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

DATASETS = ("debtags", "wordnet-hypernyms", "gutenberg-lcsh")
METRICS = ("p@1", "p@3", "p@5", "psp@1", "psp@3", "psp@5", "rare-f1@5")


def configs(base) -> dict:
    """Name -> TrainConfig for the compared settings, all derived from ``base`` (the game)."""
    game = base.game
    return {
        "game": base,
        "baseline": replace(base, players=1, overlap=0.0, game=replace(game, alpha=0.0)),
        "alpha=0": replace(base, game=replace(game, alpha=0.0)),
        "beta=0": replace(base, game=replace(game, beta=0.0)),
        "rho=0": replace(base, overlap=0.0),
        "N=1": replace(base, players=1, overlap=0.0),
        "N=3": replace(base, players=3),
        "negatives=1": replace(base, game=replace(game, curiosity_negatives=1.0)),
    }


def settled(config, dataset):
    """``config`` with the game's weights as training settles them on ``dataset``."""
    every_label = dataset.n_labels <= config.full_candidates_max
    return replace(config, game=config.game.for_candidates(every_label))


def prepare(name: str, data_dir: Path) -> Path:
    from xmlgame import recipes
    from xmlgame.paths import datasets_dir

    path = datasets_dir() / name
    if (path / "meta.json").exists():
        return path
    return recipes.prep(name, source=data_dir / name).path


def one_run(dataset, config, run_dir: Path) -> dict:
    from xmlgame.train import train

    started = time.time()
    results = train(dataset, config, run_dir, progress=False)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epoch_seconds = [entry["train_seconds"] for entry in log]
    return {
        "test": {m: results["test"][m] for m in METRICS},
        "best_epoch": results["best_epoch"],
        "epochs_run": results["epochs_run"],
        "epoch_seconds": statistics.median(epoch_seconds),
        "train_seconds": round(sum(epoch_seconds), 1),
        "wall_seconds": round(time.time() - started, 1),
        "phi_first_last": [log[0]["Phi"], log[-1]["Phi"]],
        "tail_labels_led": log[-1]["tail_labels_led"],
        "grad_norm_head_tail": [log[-1]["grad_norm_head"], log[-1]["grad_norm_tail"]],
        "peak_rss_mb": log[-1]["peak_rss_mb"],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], dataset: str) -> tuple[list[str], dict]:
    """Markdown lines and the goal checks for one dataset."""
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        if run["dataset"] == dataset:
            by_name.setdefault(run["config"], []).append(run)
    if "baseline" not in by_name or "game" not in by_name:
        return [], {}
    base = {m: mean_std([100 * r["test"][m] for r in by_name["baseline"]])[0] for m in METRICS}
    head = "| setting | seeds | " + " | ".join(m.upper() for m in METRICS)
    lines = [head + " | s/epoch | epochs |", "|---|---:|" + "---:|" * (len(METRICS) + 2)]
    for name, group in by_name.items():
        cells = []
        for m in METRICS:
            mean, std = mean_std([100 * r["test"][m] for r in group])
            delta = "" if name == "baseline" else f" ({mean - base[m]:+.2f})"
            spread = f" ± {std:.2f}" if len(group) > 1 else ""
            cells.append(f"{mean:.2f}{spread}{delta}")
        seconds = statistics.fmean(r["epoch_seconds"] for r in group)
        epochs = "/".join(f"{r['best_epoch']}of{r['epochs_run']}" for r in group)
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells)
                     + f" | {seconds:.1f} | {epochs} |")
    game = {m: mean_std([100 * r["test"][m] for r in by_name["game"]])[0] for m in METRICS}
    ratio = (statistics.fmean(r["epoch_seconds"] for r in by_name["game"])
             / statistics.fmean(r["epoch_seconds"] for r in by_name["baseline"]))
    checks = {
        "psp@5 higher": game["psp@5"] > base["psp@5"],
        "rare-f1@5 higher": game["rare-f1@5"] > base["rare-f1@5"],
        "p@1 within 0.5": game["p@1"] >= base["p@1"] - 0.5,
        "epoch time ratio": round(ratio, 3),
        "epoch time within 1.25x": ratio <= 1.25,
    }
    lines.append("")
    lines.append("Goals (game vs baseline, means over seeds): " + ", ".join(
        f"{k}: {'yes' if v is True else 'no' if v is False else v}" for k, v in checks.items()))
    return lines, checks


def write_report(runs: list[dict], args, out: Path, settings: dict) -> None:
    lines = [
        "# CD-GTMLL against the plain-BCE baseline",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Made by `python benchmarks/game.py` "
        f"(seeds {args.seeds}, ablation seeds {args.ablation_seeds}).",
        "",
        f"Settings shared by every run: {json.dumps(settings)}.",
        "Metrics in %, on the test split, of the epoch chosen on validation; "
        "(+x) is the difference from the baseline's mean.",
        "",
    ]
    checks = {}
    for dataset in args.datasets:
        table, check = summarise(runs, dataset)
        if table:
            lines += [f"## {dataset}", "", *table, ""]
            checks[dataset] = check
    (out / "game.md").write_text("\n".join(lines) + "\n")
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "settings": settings, "runs": runs, "checks": checks}
    tmp = out / "game.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out / "game.json")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a script that trains the game and the baseline on the shared sets."""
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"),
                        help="XMLGAME_HOME for prepared data, caches and runs")
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--ablation-seeds", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[0])
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="run only these settings (e.g. game,baseline)")
    args = parser.parse_args()

    os.environ["XMLGAME_HOME"] = str(args.work.resolve())
    from xmlgame.dataset import load_dataset
    from xmlgame.train import TrainConfig

    # sampled negatives only, as when results/game.md was made (benchmarks/shortlist.py
    # measures mined ones)
    base = TrainConfig(epochs=args.epochs, shortlist_k=0)
    settings = {"epochs": base.epochs, "batch_size": base.batch_size,
                "encoder": base.encoder.kind, "dim": base.encoder.dim,
                "alpha": base.game.alpha, "beta": base.game.beta,
                "curiosity_negatives": ("auto" if base.game.curiosity_negatives is None
                                        else base.game.curiosity_negatives),
                "full_candidates_max": base.full_candidates_max, "negatives": base.negatives,
                "shortlist_k": base.shortlist_k}
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for name in args.datasets:
        dataset = load_dataset(prepare(name, args.data_dir))
        compared = {setting: settled(config, dataset) for setting, config in configs(base).items()}
        for setting, config in compared.items():
            if args.only and setting not in args.only:
                continue
            if setting not in ("game", "baseline") and config == compared["game"]:
                print(f"{name:18s} {setting:9s} is the game itself here: not run", flush=True)
                continue
            main_setting = setting in ("game", "baseline")
            for seed in args.seeds if main_setting else args.ablation_seeds:
                run_dir = args.work / "runs" / f"{name}-{setting}-seed{seed}-{int(time.time())}"
                result = one_run(dataset, replace(config, seed=seed), run_dir)
                runs.append({"dataset": name, "config": setting, "seed": seed,
                             "run_dir": str(run_dir), **result})
                t = result["test"]
                print(f"{name:18s} {setting:9s} seed {seed}  P@1 {100 * t['p@1']:.2f}  "
                      f"P@5 {100 * t['p@5']:.2f}  PSP@5 {100 * t['psp@5']:.2f}  Rare-F1 "
                      f"{100 * t['rare-f1@5']:.2f}  {result['epoch_seconds']:.1f} s/epoch",
                      flush=True)
                write_report(runs, args, args.out, settings)
    print((args.out / "game.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
