"""Benchmark ``xmlgame prep``: wall time, CPU time and peak memory of each dataset's preparation.

Each measurement runs the real command line in a child process, with ``XMLGAME_HOME`` pointing at
a fresh temporary folder, and reads the child's own resource usage from ``os.wait4`` (peak RSS is
the child's high-water mark, not the benchmark's). The cases:

- ``import xmlgame.cli``: the floor every command pays, and ``prep imports``: the modules
  (numpy, scipy) every ``prep`` loads;
- each real dataset folder in ``--data-dir``: ``xmlgame prep NAME --from DIR``, whose prepared
  ``meta.json`` counts are checked against the recipe (``xmlgame.recipes.find(NAME)``);
- ``synthetic``: an Amazon-670K-sized generated set with text inputs (``--skip-synthetic`` to
  leave it out; ``--quick`` generates a tenth of it and runs every case once).

Run from the repository root::

    python benchmarks/prep.py --data-dir ../shared/data --out benchmarks/results

It prints one line per run and a table, and writes ``prep.json`` and ``prep.md`` to ``--out``
(``prep-quick.*`` with ``--quick``, so a smoke run does not overwrite the recorded results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATASETS = (
    "debtags", "reuters21578", "wordnet-hypernyms", "gutenberg-lcsh", "bibtex", "delicious",
)
AMAZON_670K = {"labels": 670_091, "train_docs": 490_449, "test_docs": 153_025}
MIB = 1024 * 1024
IMPORT_CLI = "import xmlgame.cli"
IMPORT_PREP = "import xmlgame.recipes, xmlgame.readers, xmlgame.synthetic"  # what prep loads


@dataclass
class Case:
    """One thing to measure: a command and the counts its prepared dataset should have."""

    name: str
    command: list[str]
    shown: str  # the command as the reports print it
    expected: dict[str, int] | None = None  # train_docs, test_docs, labels
    prepared: str = ""  # folder name under $XMLGAME_HOME/datasets
    input_bytes: int = 0
    layout: str = ""


@dataclass
class Result:
    name: str
    layout: str
    command: str
    runs: int
    wall_s: float  # best of `runs`
    cpu_s: float  # user + system of the best run
    peak_rss_mib: float  # highest over the runs
    input_mib: float
    prepared_mib: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] | None = None
    counts_match: bool | None = None

    @property
    def docs(self) -> int:
        return self.counts.get("train_docs", 0) + self.counts.get("test_docs", 0)


# --------------------------------------------------------------------------------------------
# measuring one child process


def xmlgame_command() -> list[str]:
    """The ``xmlgame`` script of this interpreter (not a shell shim), else ``python -m``."""
    script = Path(sys.executable).with_name("xmlgame")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "xmlgame.cli"]


def run_child(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Run ``command`` to completion: (wall seconds, CPU seconds, peak RSS in MiB).

    Raises:
        SystemExit: the command failed; the tail of its output is printed.
    """
    with open(log, "wb") as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"`{' '.join(command)}` failed with exit code {child.returncode}:\n{tail}")
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * rss_unit / MIB


def measure(case: Case, runs: int) -> Result:
    """Run ``case`` ``runs`` times, each in a fresh XMLGAME_HOME, and check what it prepared."""
    best, peak, counts, prepared_mib = None, 0.0, {}, None
    for attempt in range(runs):
        with tempfile.TemporaryDirectory(prefix="xmlgame-bench-") as home:
            env = {**os.environ, "XMLGAME_HOME": home}
            wall, cpu, rss = run_child(case.command, env, Path(home) / "output.log")
            print(f"  {case.name} run {attempt + 1}/{runs}: {wall:.2f}s wall, {cpu:.2f}s CPU, "
                  f"{rss:.0f} MiB peak RSS", flush=True)
            best = (wall, cpu) if best is None or wall < best[0] else best
            peak = max(peak, rss)
            if case.prepared:
                folder = Path(home) / "datasets" / case.prepared
                counts = json.loads((folder / "meta.json").read_text())["counts"]
                prepared_mib = folder_bytes(folder) / MIB
    counts = {key: counts[key] for key in ("train_docs", "test_docs", "labels") if key in counts}
    return Result(
        name=case.name, layout=case.layout, command=case.shown, runs=runs,
        wall_s=best[0], cpu_s=best[1], peak_rss_mib=peak,
        input_mib=case.input_bytes / MIB, prepared_mib=prepared_mib, counts=counts,
        expected=case.expected,
        counts_match=None if case.expected is None else counts == case.expected,
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# the cases


def dataset_cases(data_dir: Path, program: list[str]) -> list[Case]:
    """``xmlgame prep NAME --from DIR`` for each known dataset folder found in ``data_dir``."""
    from xmlgame import recipes

    cases = []
    for name in DATASETS:
        folder = data_dir / name
        if not folder.is_dir():
            print(f"skipping {name}: no folder {folder}")
            continue
        recipe = recipes.find(name)
        expected = {"train_docs": recipe.train_docs, "test_docs": recipe.test_docs,
                    "labels": recipe.labels}
        args = ["prep", name, "--from", str(folder)]
        cases.append(Case(
            name=name, command=[*program, "-q", *args], shown=" ".join(["xmlgame", *args]),
            expected=expected, prepared=recipe.name, input_bytes=folder_bytes(folder),
            layout=recipe.layout,
        ))
    return cases


def synthetic_case(program: list[str], scale: float) -> Case:
    """The Amazon-670K-sized synthetic set (times ``scale``), text inputs."""
    from xmlgame.synthetic import SyntheticConfig

    sizes = {key: max(1, round(value * scale)) for key, value in AMAZON_670K.items()}
    config = SyntheticConfig(
        n_labels=sizes["labels"], n_train=sizes["train_docs"], n_test=sizes["test_docs"]
    )
    args = ["prep", "synthetic", "--labels", str(sizes["labels"]),
            "--train-docs", str(sizes["train_docs"]), "--test-docs", str(sizes["test_docs"])]
    return Case(
        name="synthetic", command=[*program, "-q", *args], shown=" ".join(["xmlgame", *args]),
        expected=sizes, prepared=config.name, layout="synthetic (text)",
    )


def import_cases() -> list[Case]:
    """The floors: starting the command line, and the modules (numpy, scipy) prep loads."""
    return [
        Case(name=name, command=[sys.executable, "-c", code], shown=f"python -c '{code}'",
             layout="-")
        for name, code in (("import xmlgame.cli", IMPORT_CLI), ("prep imports", IMPORT_PREP))
    ]


# --------------------------------------------------------------------------------------------
# reports


def machine_info() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(total_kib / 1024 / 1024, 1)
    for package in ("xmlgame", "numpy", "scipy"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001 (a missing version is only left out of the report)
            pass
    return info


HEADER = ("case", "layout", "train docs", "test docs", "labels", "counts", "wall s", "CPU s",
          "peak RSS MiB", "RSS - imports", "docs/s", "input MiB", "MiB/s")


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    """Formatted cells, one row per result; ratios are over wall time of the best run."""
    baseline = next((r.peak_rss_mib for r in results if r.name == "prep imports"), None)
    rows = []
    for r in results:
        check = {None: "-", True: "as recipe", False: f"expected {r.expected}"}[r.counts_match]
        over = r.peak_rss_mib - baseline if baseline is not None and r.counts else None
        rows.append((
            r.name, r.layout,
            *(f"{r.counts[k]:,}" if k in r.counts else "-"
              for k in ("train_docs", "test_docs", "labels")),
            check, f"{r.wall_s:.2f}", f"{r.cpu_s:.2f}", f"{r.peak_rss_mib:.0f}",
            "-" if over is None else f"{over:+.0f}",
            f"{r.docs / r.wall_s:,.0f}" if r.docs else "-",
            f"{r.input_mib:.1f}" if r.input_mib else "-",
            f"{r.input_mib / r.wall_s:.1f}" if r.input_mib else "-",
        ))
    return rows


def text_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [HEADER, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def flags(args: argparse.Namespace) -> str:
    """The options that change what is measured, as typed."""
    shown = [" --quick" if args.quick else "", " --skip-synthetic" if args.skip_synthetic else ""]
    if args.runs != 3 and not args.quick:
        shown.append(f" --runs {args.runs}")
    return "".join(shown)


def markdown(results: list[Result], info: dict, args: argparse.Namespace) -> str:
    rows = table_rows(results)
    runs = "1 run" if args.runs == 1 else f"the fastest of {args.runs} runs"
    align = ["---", "---"] + ["---:"] * 3 + ["---"] + ["---:"] * 7
    intro = (
        f"{info['date']}, {info['cpu_count']} CPUs, {info.get('memory_gib', '?')} GiB, "
        f"Python {info['python']}, xmlgame {info.get('xmlgame', '?')}; load average at start "
        f"{info['load_average_at_start']}. Made by `python benchmarks/prep.py{flags(args)}`."
    )
    notes = (
        f"Wall and CPU time are of {runs} (synthetic: 1 run); peak RSS "
        "is the child process's high-water mark (`os.wait4`), the highest over the runs. "
        "`RSS - imports` subtracts the `prep imports` floor (`python -c "
        f"'{IMPORT_PREP}'`: numpy and scipy), leaving what the data costs. docs/s and MiB/s "
        "divide train + test documents and the input folder's size by wall time. Each run "
        "prepares into a fresh `XMLGAME_HOME`, checks the counts against the recipe, and is "
        "deleted."
    )
    lines = [
        "# `xmlgame prep` benchmark",
        "",
        textwrap.fill(intro, 100, break_on_hyphens=False, break_long_words=False),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        textwrap.fill(notes, 100, break_on_hyphens=False, break_long_words=False),
        "",
    ]
    return "\n".join(lines)


def write_reports(results: list[Result], info: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "prep-quick" if args.quick else "prep"
    payload = {
        "machine": info,
        "settings": {"runs": args.runs, "quick": args.quick,
                     "skip_synthetic": args.skip_synthetic},
        "results": [{**asdict(r), "docs_per_s": r.docs / r.wall_s if r.docs else None}
                    for r in results],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results, info, args))
    print(f"wrote {out / stem}.json and {out / stem}.md")


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data",
                        help="folder holding the real dataset folders (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="where prep.json and prep.md go (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of each small case; the fastest counts (default: %(default)s)")
    parser.add_argument("--skip-synthetic", action="store_true",
                        help="leave out the Amazon-670K-sized synthetic set (minutes)")
    parser.add_argument("--quick", action="store_true",
                        help="one run each, a synthetic set a tenth the size; writes prep-quick.*")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.quick:
        args.runs = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"--data-dir {data_dir}: no such folder (it should hold {', '.join(DATASETS)})")
    info = machine_info()
    print(f"{info['date']}: {info['cpu_count']} CPUs, load {info['load_average_at_start']}")

    program = xmlgame_command()
    results = [measure(case, args.runs) for case in import_cases()]
    for case in dataset_cases(data_dir, program):
        results.append(measure(case, args.runs))
    if not args.skip_synthetic:
        results.append(measure(synthetic_case(program, 0.1 if args.quick else 1.0), 1))

    print(text_table(table_rows(results)))
    write_reports(results, info, args)
    if any(r.counts_match is False for r in results):
        sys.exit("some prepared counts differ from their recipe (see the counts column)")


if __name__ == "__main__":
    main()
