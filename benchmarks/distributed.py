"""Time per epoch and memory per process of training on 1 and 2 processes (CPU, gloo).

Settings, each launched fresh (torchrun for two processes) on the same prepared dataset, with
the default game (N = 6, rho = 0.2), bag-of-words encoder (D = 256) and batch 256:

- 1 process, 2 threads, and 1 process, 1 thread (on a machine whose cores other work shares, a
  second OpenMP thread mostly waits for the busy core, so both are shown);
- 2 processes, 1 thread each, data-parallel;
- 2 processes, 1 thread each, label-parallel (each holds 3 of the 6 players).

Each process runs one warm-up epoch, then ``--epochs`` timed ones (the median is reported; an
epoch ends when every process has finished it), and reports its peak RSS and its head memory:
the bytes of the player tables it holds and of their optimizer state. Ratios are against the
1-process runs measured in the same invocation. ``--baseline-code DIR`` also times the
1-process, 1-thread run with another checkout's xmlgame (e.g. the commit before multi-process
training), alternating launches with this one, to check that the single-process path did not
slow down. Writes ``distributed.json`` and ``distributed.md`` to ``--out``.

    python benchmarks/distributed.py --home /tmp/lead-home --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "1 process": {"processes": 1, "threads": 2, "label_parallel": False},
    "1 process, 1 thread": {"processes": 1, "threads": 1, "label_parallel": False},
    "2 processes, data-parallel": {"processes": 2, "threads": 1, "label_parallel": False},
    "2 processes, label-parallel": {"processes": 2, "threads": 1, "label_parallel": True},
}


# --------------------------------------------------------------------------------------------
# one process of a setting


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from xmlgame.dataset import load_dataset
    from xmlgame.train import TrainConfig, Trainer

    dataset = load_dataset(args.dataset_path)
    options = {"label_parallel": True} if args.label_parallel else {}
    config = TrainConfig(seed=0, **options)
    run_dir = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    trainer = Trainer(dataset, config, run_dir, progress=False)
    comm = getattr(trainer, "comm", None)  # absent in the single-process baseline code
    barrier = comm.barrier if comm is not None else (lambda: None)
    start = time.perf_counter()
    trainer.setup()
    setup_seconds = time.perf_counter() - start
    trainer.run_epoch(0)  # warm-up
    seconds = []
    for epoch in range(1, args.epochs + 1):
        barrier()
        start = time.perf_counter()
        trainer.run_epoch(epoch)
        barrier()  # the epoch ends when every process has finished it
        seconds.append(time.perf_counter() - start)
    parallel = getattr(trainer, "parallel", None)
    report = {
        "rank": comm.rank if comm is not None else 0,
        "epoch_seconds": seconds,
        "setup_seconds": setup_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "head_bytes": parallel.head_bytes(trainer.model, trainer.opt) if parallel else None,
        "held_players": list(parallel.players) if parallel else None,
        "batches": -(-trainer.n_train // config.batch_size),
        "n_train": trainer.n_train,
    }
    Path(args.report).with_suffix(f".{report['rank']}.json").write_text(json.dumps(report))


# --------------------------------------------------------------------------------------------
# launching the settings


def launch(setting: dict, args, code: Path, report: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(setting["threads"])}
    worker_args = [str(Path(__file__).resolve()), "--worker", "--dataset-path",
                   str(args.dataset_path), "--epochs", str(args.epochs), "--threads",
                   str(setting["threads"]), "--report", str(report)]
    if setting["label_parallel"]:
        worker_args.append("--label-parallel")
    if setting["processes"] == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={setting['processes']}", *worker_args]
    subprocess.run(command, env=env, check=True, cwd=tempfile.gettempdir())
    return [json.loads(report.with_suffix(f".{rank}.json").read_text())
            for rank in range(setting["processes"])]


def summarize(name: str, setting: dict, reports: list[dict]) -> dict:
    # an epoch's time is the slowest process's (they wait for each other at every step)
    per_epoch = [max(r["epoch_seconds"][i] for r in reports)
                 for i in range(len(reports[0]["epoch_seconds"]))]
    heads = [r["head_bytes"] for r in reports]
    return {
        "setting": name, **setting,
        "epoch_seconds": statistics.median(per_epoch), "epochs_timed": per_epoch,
        "setup_seconds": max(r["setup_seconds"] for r in reports),
        "peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in reports],
        "head_mib": [None if h is None else round(h / 2**20, 2) for h in heads],
        "held_players": [r["held_players"] for r in reports],
        "batches": reports[0]["batches"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path("~/xmlgame"),
                        help="an $XMLGAME_HOME holding the prepared dataset (only read)")
    parser.add_argument("--dataset", default="wordnet-hypernyms")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after a warm-up")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--baseline-code", type=Path, default=None,
                        help="a checkout whose 1-process epoch time to compare with")
    parser.add_argument("--baseline-repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--label-parallel", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    args.dataset_path = args.home.expanduser() / "datasets" / args.dataset
    if not (args.dataset_path / "meta.json").exists():
        parser.error(f"no prepared dataset at {args.dataset_path}; give --home and --dataset")
    reports = Path(tempfile.mkdtemp(prefix="distributed-bench-reports-"))
    rows = []
    for name, setting in SETTINGS.items():
        row = summarize(name, setting, launch(setting, args, REPO, reports / name.replace(" ", "")))
        rows.append(row)
        print(f"{name:30s} {row['epoch_seconds']:6.1f} s/epoch  peak RSS {row['peak_rss_mib']} "
              f"MiB  head {row['head_mib']} MiB", flush=True)
    for row in rows:
        row["ratio"] = row["epoch_seconds"] / rows[0]["epoch_seconds"]
        row["ratio_1_thread"] = row["epoch_seconds"] / rows[1]["epoch_seconds"]
        row["head_ratio"] = [h / rows[0]["head_mib"][0] for h in row["head_mib"]]

    baseline = None
    if args.baseline_code is not None:  # alternate, so that a busy moment hits both
        setting = SETTINGS["1 process, 1 thread"]
        times = {"this code": [], "baseline code": []}
        for repeat in range(args.baseline_repeats):
            for label, code in (("baseline code", args.baseline_code), ("this code", REPO)):
                report = reports / f"regression-{label.replace(' ', '')}-{repeat}"
                times[label].append(summarize(label, setting,
                                              launch(setting, args, code, report))["epoch_seconds"])
        baseline = {k: statistics.median(v) for k, v in times.items()}
        baseline["runs"] = times
        baseline["code"] = str(args.baseline_code)
        print(f"single process: this code {baseline['this code']:.1f} s/epoch, baseline "
              f"{baseline['baseline code']:.1f} s/epoch", flush=True)

    write(args, rows, baseline)
    return 0


def write(args, rows: list[dict], baseline: dict | None) -> None:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "load_average": os.getloadavg()}
    lines = [
        "# Training on 1 and 2 processes (CPU, gloo)",
        "",
        f"{machine['date']}, {machine['cpus']} CPUs (load average at the end "
        f"{machine['load_average'][0]:.1f}). Made by `python benchmarks/distributed.py`. "
        f"Dataset {args.dataset}, bag-of-words encoder (D = 256), N = 6 players, rho = 0.2, "
        f"batch 256, cyclic schedule; median of {args.epochs} epochs after a warm-up epoch. "
        "Peak RSS and head memory are per process (one value per process); head memory is the "
        "player tables a process holds plus their RowAdam state.",
        "",
        "**This machine's two cores were shared with other work while this ran: re-run on a "
        "quiet machine before quoting the times.** With two cores, two processes of one "
        "thread each have no more compute than one process of two threads, so no speed-up is "
        "expected here; what these rows show is the cost of the exchanges and the memory "
        "per process.",
        "",
        "| setting | processes x threads | s/epoch | vs 1 x 2 | vs 1 x 1 | peak RSS MiB per "
        "process | head MiB per process | head vs 1 process |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['processes']} x {r['threads']} | {r['epoch_seconds']:.1f} | "
            f"{r['ratio']:.2f}x | {r['ratio_1_thread']:.2f}x | "
            f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} | "
            f"{', '.join(f'{h:.1f}' for h in r['head_mib'])} | "
            f"{', '.join(f'{h:.2f}' for h in r['head_ratio'])} |"
        )
    if baseline is not None:
        lines += [
            "",
            "Single-process (1 thread) epoch time against the code before multi-process "
            f"training (`{baseline['code']}`), alternating launches, median of "
            f"{args.baseline_repeats} launches each: this code "
            f"{baseline['this code']:.1f} s, baseline {baseline['baseline code']:.1f} s "
            f"({baseline['this code'] / baseline['baseline code']:.2f}x).",
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.md").write_text("\n".join(lines) + "\n")
    (args.out / "distributed.json").write_text(json.dumps(
        {"machine": machine, "dataset": args.dataset, "rows": rows, "baseline": baseline},
        indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
