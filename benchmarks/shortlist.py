"""Mined hard negatives against random negatives, and the approximate label index against exact
search, on the two shared datasets too large to score every label in training.

For each dataset (wordnet-hypernyms, gutenberg-lcsh), trains the default game (N = 6, rho = 0.2)
twice with the same seed, encoder, epochs and prediction path:

- ``random``: positives + 2,048 labels sampled uniformly per batch (``--shortlist-k 0``);
- ``mined``: the same, plus each document's top ``--shortlist-k`` labels from each label index
  (centroids and heads), refreshed after every epoch.

Both predict through the same shortlist (``predict_shortlist`` labels from each index, scored by
the players), and also by scoring every label, so the two effects can be told apart.

Then, for the ``mined`` run's model, measures the approximate indexes against exact search over
the same label vectors: recall@K of an IVF index (the default kind past 50,000 labels; forced
here, as these sets are smaller) and of an HNSW index against a flat one, for the centroid and
head vectors, and the test P@k/PSP@k when predicting through them instead of flat ones.

Writes ``shortlist.json`` and ``shortlist.md`` to ``--out``.

    python benchmarks/shortlist.py --data-dir ../shared/data --out benchmarks/results
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

DATASETS = ("wordnet-hypernyms", "gutenberg-lcsh")
WEIGHTS = (0.0, 0.1, 0.2, 0.4)
METRICS = ("p@1", "p@3", "p@5", "psp@1", "psp@3", "psp@5", "rare-f1@5")


def test_metrics(model, dataset, features) -> dict:
    from xmlgame.metrics import TopK, compute_metrics

    prediction = model.predict_features(features, k=5)
    found = compute_metrics(
        TopK(prediction.label_ids, prediction.scores), dataset.test.Y, dataset.train_counts,
        dataset.meta["counts"]["train_docs"], *dataset.propensity_ab,
    )
    return {m: round(100 * found[m], 2) for m in METRICS}


def approximate_against_exact(model, dataset, features) -> dict:
    """Recall@K of IVF and HNSW against flat on the same vectors, and test metrics through
    each (default parameters of each kind)."""
    from xmlgame.mining import Shortlister, encode_all, head_queries
    from xmlgame.shortlist import IndexConfig, LabelIndex, exact_search, recall_at_k

    exact = model.shortlister
    vectors = {name: index.index.reconstruct_n(0, index.n_labels)
               for name, index in exact.indexes().items()}
    h = encode_all(model, features)
    k = model.shortlist_k
    exact_ids = {name: exact_search(vectors[name], head_queries(h) if name == "heads" else h,
                                    k)[1] for name in vectors}
    results = {"k": k, "exact": test_metrics(model, dataset, features), "kinds": {}}
    for kind in ("ivf", "hnsw"):
        start = time.time()
        approximate = Shortlister(**{
            name: LabelIndex.build(v, IndexConfig(kind=kind)) for name, v in vectors.items()
        })
        build_seconds = time.time() - start
        recall = {}
        for name, index in approximate.indexes().items():
            _, approx_ids = index.search(head_queries(h) if name == "heads" else h, k)
            recall[name] = round(recall_at_k(approx_ids, exact_ids[name]), 4)
        model.shortlister = approximate
        results["kinds"][kind] = {"build_seconds": round(build_seconds, 1),
                                  "recall_at_k": recall,
                                  "metrics": test_metrics(model, dataset, features)}
        model.shortlister = exact
    return results


def one_run(dataset, config, run_dir: Path, compare_index: bool) -> dict:
    from xmlgame.model import load
    from xmlgame.train import train

    started = time.time()
    results = train(dataset, config, run_dir, progress=False)
    wall = time.time() - started
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    refresh = [sum(v for k, v in entry.items() if k.startswith("refresh_") or
                   k.startswith("initial_refresh_")) for entry in log]
    model = load(run_dir)
    features = model.featurize(list(dataset.test.texts), progress=False)
    out = {
        "shortlisted": {m: round(100 * results["test"][m], 2) for m in METRICS},
        "best_epoch": results["best_epoch"],
        "epochs_run": results["epochs_run"],
        "epoch_seconds": statistics.median(entry["train_seconds"] for entry in log),
        "refresh_seconds": round(statistics.median(refresh), 1),
        "wall_seconds": round(wall, 1),
    }
    shortlister = model.shortlister
    model.shortlister = None  # every label scored
    out["every_label"] = test_metrics(model, dataset, features)
    model.shortlister = shortlister
    if compare_index:
        out["index"] = approximate_against_exact(model, dataset, features)
        out["weight_sweep"] = {}
        for weight in WEIGHTS:
            model.shortlist_weight = weight
            out["weight_sweep"][str(weight)] = test_metrics(model, dataset, features)
        model.shortlist_weight = config.shortlist_weight
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--resume", action="store_true",
        help="Keep the runs already in --out/shortlist.json and do only the missing ones.",
    )
    args = parser.parse_args()

    os.environ["XMLGAME_HOME"] = str(args.work.resolve())
    sys.path.insert(0, str(Path(__file__).parent))
    from game import prepare

    from xmlgame.dataset import load_dataset
    from xmlgame.train import TrainConfig

    base = TrainConfig(seed=args.seed)
    if args.epochs:
        base = replace(base, epochs=args.epochs)
    settings = {"random": replace(base, shortlist_k=0), "mined": base}
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
               "shortlist_k": base.shortlist_k, "negatives": base.negatives,
               "predict_shortlist": base.predict_shortlist, "seed": args.seed, "runs": {}}
    if args.resume and (args.out / "shortlist.json").exists():
        results["runs"] = json.loads((args.out / "shortlist.json").read_text())["runs"]
    for name in args.datasets:
        dataset = load_dataset(prepare(name, args.data_dir))
        for setting, config in settings.items():
            if f"{name}/{setting}" in results["runs"]:
                continue
            run_dir = args.work / "runs" / f"shortlist-{name}-{setting}-{int(time.time())}"
            row = one_run(dataset, config, run_dir, compare_index=setting == "mined")
            results["runs"][f"{name}/{setting}"] = row
            print(name, setting, json.dumps(row), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "shortlist.json").write_text(json.dumps(results, indent=1))
    (args.out / "shortlist.md").write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    lines = [
        "# Mined against random negatives; the approximate index against exact search",
        "",
        f"{r['date']}, {r['cpus']} CPUs, seed {r['seed']}. Made by `python "
        "benchmarks/shortlist.py`. Default game (N = 6, rho = 0.2), bag-of-words encoder. "
        f"`random`: positives + {r['negatives']} sampled labels per batch; `mined`: also each "
        f"document's top {r['shortlist_k']} labels from each index (centroids, heads). Test "
        f"metrics (%) through the shortlist ({r['predict_shortlist']} labels from each index) "
        "and by scoring every label.",
        "",
        "| dataset | negatives | predicted | P@1 | P@3 | P@5 | PSP@1 | PSP@3 | PSP@5 | Rare-F1 "
        "| epochs | s/epoch | s/refresh |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in r["runs"].items():
        name, setting = key.split("/")
        for predicted in ("shortlisted", "every_label"):
            v = row[predicted]
            lines.append(
                f"| {name} | {setting} | {predicted.replace('_', ' ')} | "
                + " | ".join(f"{v[m]:.2f}" for m in METRICS)
                + f" | {row['best_epoch']}/{row['epochs_run']} | {row['epoch_seconds']:.1f} | "
                f"{row['refresh_seconds']:.1f} |"
            )
    lines += ["", "Approximate (IVF and HNSW, default parameters) against exact (flat) label "
              "indexes, same vectors, the `mined` model, whole test set:", "",
              "| dataset | index | K | recall@K centroids | recall@K heads | build s | P@1 "
              "| P@5 | PSP@5 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in r["runs"].items():
        if "kinds" not in row.get("index", {}):
            continue
        x = row["index"]
        e = x["exact"]
        lines.append(f"| {key.split('/')[0]} | flat (exact) | {x['k']} | 1 | 1 | - | "
                     f"{e['p@1']:.2f} | {e['p@5']:.2f} | {e['psp@5']:.2f} |")
        for kind, v in x["kinds"].items():
            m = v["metrics"]
            lines.append(
                f"| {key.split('/')[0]} | {kind} | {x['k']} | "
                f"{v['recall_at_k'].get('centroids', '-')} | {v['recall_at_k'].get('heads', '-')}"
                f" | {v['build_seconds']} | {m['p@1']:.2f} | {m['p@5']:.2f} | {m['psp@5']:.2f} |"
            )
    lines += ["", "Mixing the centroid similarity s into the score, (1 - w) p + w max(s, 0), the "
              "`mined` model through its shortlist, test set:", "",
              "| dataset | w | P@1 | P@3 | P@5 | PSP@1 | PSP@3 | PSP@5 | Rare-F1 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in r["runs"].items():
        for weight, v in row.get("weight_sweep", {}).items():
            lines.append(f"| {key.split('/')[0]} | {weight} | "
                         + " | ".join(f"{v[m]:.2f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
