"""Seconds per training epoch with and without the malloc thresholds training sets.

``xmlgame.allocator.keep_batch_buffers`` fixes glibc's mmap and trim thresholds when training
starts. This script measures what that buys: for each dataset and setting (the game, N = 6 and
rho = 0.2, and the baseline, N = 1 and alpha = 0), a fresh process sets up a trainer with the
thresholds fixed or left to glibc, runs a warm-up epoch and then ``--epochs`` timed ones, and
reports their median. Each (setting, thresholds) pair runs in its own process because what
glibc does depends on what the process did before; the pairs alternate, ``--repeats`` rounds.
Writes ``allocator.json`` and ``allocator.md``.

    python benchmarks/allocator.py --data-dir ../shared/data --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from xmlgame.paths import write_json, write_text

SETTINGS = ("game", "baseline")


def child(args) -> int:
    """One fresh process: time ``args.epochs`` epochs of one setting, print JSON."""
    import shutil
    import tempfile
    from dataclasses import replace

    os.environ["XMLGAME_HOME"] = str(args.work.resolve())
    sys.path.insert(0, str(Path(__file__).parent))
    from game import configs, prepare

    import xmlgame.train
    from xmlgame.dataset import load_dataset
    from xmlgame.train import TrainConfig, Trainer

    if not args.thresholds:
        xmlgame.train.keep_batch_buffers = lambda: False  # glibc decides, as before
    dataset = load_dataset(prepare(args.dataset, args.data_dir))
    config = replace(configs(TrainConfig(shortlist_k=0))[args.setting], seed=0)
    run_dir = Path(tempfile.mkdtemp(prefix="allocator-"))
    try:
        trainer = Trainer(dataset, config, run_dir, progress=False)
        trainer.setup()
        trainer.run_epoch(0)  # warm-up
        seconds = []
        for epoch in range(1, args.epochs + 1):
            start = time.perf_counter()
            trainer.run_epoch(epoch)
            seconds.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps({"seconds": seconds}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=["debtags"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("DATASET", "SETTING", "THRESHOLDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.dataset, args.setting, thresholds = args.child
        args.thresholds = thresholds == "fixed"
        return child(args)

    rows = []
    for name in args.datasets:
        seconds: dict[tuple[str, str], list[float]] = {}
        for repeat in range(args.repeats):
            for setting in SETTINGS:
                for thresholds in ("glibc", "fixed"):
                    done = subprocess.run(
                        [sys.executable, __file__, "--data-dir", str(args.data_dir),
                         "--work", str(args.work), "--epochs", str(args.epochs),
                         "--child", name, setting, thresholds],
                        capture_output=True, text=True,
                    )
                    if done.returncode != 0:
                        sys.exit(f"the {setting} process on {name} failed:\n{done.stderr}")
                    epochs = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                    seconds.setdefault((setting, thresholds), []).extend(epochs)
                    print(f"{name:18s} {setting:9s} {thresholds:6s} round {repeat + 1}: "
                          + " ".join(f"{s:.2f}" for s in epochs), flush=True)
        for setting in SETTINGS:
            left, fixed = (statistics.median(seconds[setting, t]) for t in ("glibc", "fixed"))
            rows.append({"dataset": name, "setting": setting, "glibc_seconds": left,
                         "fixed_seconds": fixed, "speedup": left / fixed,
                         "glibc_range": [min(seconds[setting, "glibc"]),
                                         max(seconds[setting, "glibc"])],
                         "fixed_range": [min(seconds[setting, "fixed"]),
                                         max(seconds[setting, "fixed"])]})

    lines = [
        "# Seconds per epoch with glibc's malloc thresholds left alone or fixed",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {os.cpu_count()} CPUs. Made by "
        f"`python benchmarks/allocator.py`. Median (and range) of {args.epochs} epochs after a "
        f"warm-up, in {args.repeats} fresh processes per cell, alternating; bag-of-words "
        "encoder, batch 256. Game: N = 6, rho = 0.2; baseline: N = 1, alpha = 0.",
        "",
        "| dataset | setting | thresholds left to glibc s/epoch | fixed s/epoch | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["glibc_range"]
        flo, fhi = r["fixed_range"]
        lines.append(f"| {r['dataset']} | {r['setting']} | {r['glibc_seconds']:.2f} "
                     f"({lo:.2f} to {hi:.2f}) | {r['fixed_seconds']:.2f} ({flo:.2f} to "
                     f"{fhi:.2f}) | {r['speedup']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "allocator.md", "\n".join(lines) + "\n")
    write_json(args.out / "allocator.json", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
