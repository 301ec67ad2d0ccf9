"""Time per training epoch of the game (N = 6, rho = 0.2) against the baseline (N = 1, alpha = 0).

Both use the same encoder, batch size, candidates and data; only the game differs. A third
setting, the game without overlap (rho = 0: every label has one owner), separates what the game's
machinery costs (six players, curiosity, the cyclic step) from what the overlap costs (a fifth
of the labels scored by two players, and the two-owner terms of their gradients). For each
dataset the settings alternate for ``--repeats`` epochs each (so a slow moment of the machine
hits all), after one warm-up epoch each, and the script reports the median seconds per epoch and
the ratios to the baseline (the target for the game is at most 1.25x). Writes
``epoch_time.json`` and ``epoch_time.md``.

    python benchmarks/epoch_time.py --data-dir ../shared/data --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

DATASETS = ("debtags", "wordnet-hypernyms", "gutenberg-lcsh")
SETTINGS = ("game", "baseline", "rho=0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    os.environ["XMLGAME_HOME"] = str(args.work.resolve())
    sys.path.insert(0, str(Path(__file__).parent))
    from game import configs, prepare

    from xmlgame.dataset import load_dataset
    from xmlgame.paths import write_json, write_text
    from xmlgame.train import TrainConfig, Trainer

    base = TrainConfig(shortlist_k=0)  # sampled negatives only, as in results/epoch_time.md
    settings = configs(base)
    rows = []
    for name in args.datasets:
        dataset = load_dataset(prepare(name, args.data_dir))
        trainers = {}
        for setting in SETTINGS:
            run_dir = Path(tempfile.mkdtemp(prefix=f"epoch-time-{setting}-"))
            trainer = Trainer(dataset, replace(settings[setting], seed=0), run_dir,
                              progress=False)
            trainer.setup()
            trainer.run_epoch(0)  # warm-up
            trainers[setting] = trainer
        seconds = {setting: [] for setting in SETTINGS}
        for repeat in range(args.repeats):
            for setting, trainer in trainers.items():
                start = time.perf_counter()
                trainer.run_epoch(repeat + 1)
                seconds[setting].append(time.perf_counter() - start)
        for trainer in trainers.values():
            shutil.rmtree(trainer.run_dir, ignore_errors=True)  # checkpoints nobody reads
        game, baseline, single = (statistics.median(seconds[s]) for s in SETTINGS)
        candidates = trainers["game"].candidates
        rows.append({
            "dataset": name, "game_seconds": game, "baseline_seconds": baseline,
            "ratio": game / baseline, "no_overlap_seconds": single,
            "no_overlap_ratio": single / baseline, "epochs_each": args.repeats,
            "batches": -(-trainers["game"].n_train // base.batch_size),
            "candidates": "all" if candidates.full else f"positives + {base.negatives}",
            "curiosity_negatives": trainers["game"].game.curiosity_negatives,
            "seconds": seconds,
        })
        print(f"{name:18s} game {game:6.1f} s  baseline {baseline:6.1f} s  ratio "
              f"{game / baseline:.2f}x  (rho = 0: {single:6.1f} s, {single / baseline:.2f}x)",
              flush=True)

    lines = [
        "# Time per epoch: the game against the baseline",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {os.cpu_count()} CPUs. Made by "
        "`python benchmarks/epoch_time.py`. Median of "
        f"{args.repeats} epochs each, alternating, after a warm-up epoch; bag-of-words encoder, "
        f"batch {base.batch_size}. Game: N = 6, rho = 0.2, alpha = {base.game.alpha}, "
        f"beta = {base.game.beta}, cyclic; baseline: N = 1, alpha = 0, the same code; "
        "rho = 0: the game with no label owned twice.",
        "",
        "| dataset | candidates | batches | game s/epoch | baseline s/epoch | ratio "
        "| rho = 0 s/epoch | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['candidates']} | {r['batches']} | "
                     f"{r['game_seconds']:.1f} | {r['baseline_seconds']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['no_overlap_seconds']:.1f} | "
                     f"{r['no_overlap_ratio']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "epoch_time.md", "\n".join(lines) + "\n")
    write_json(args.out / "epoch_time.json", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
