"""Amazon-670K scale on one machine: prep, one training epoch, the label index, prediction.

A synthetic set of Amazon-670K's shape (670,091 labels, 490,449 training and 153,025 test
documents, text inputs, Zipf-distributed labels) goes through the whole product as a user runs
it, each stage a child process whose peak RSS is read from ``os.wait4``:

1. ``xmlgame prep synthetic ...``
2. ``xmlgame train --epochs 1`` with the bag-of-words encoder and the default game (N = 6,
   rho = 0.2): vocabulary, featurizing, the first index refresh (encode, build, mine hard
   negatives), the epoch, the refresh after it (the index saved with the model), validation and
   the test-set prediction; the stage times come from the run's ``log.jsonl`` and
   ``metrics.json``.
3. a prediction child (this script with ``--child``): loads the run, streams the test texts
   through ``predict_stream`` and scores them; times ``model.predict([text])`` one document at
   a time (p50, p99) with its parts (featurize, encoder, index search, scoring); measures the
   index's recall@K against exact search over the same label vectors (and that of a head
   index built for the purpose when the run holds none, to show why it holds none), and P@k
   on a sample of test documents through the approximate index, an exact (flat) one, the
   approximate index without the frequent labels, and scoring every label; and times the
   transformer encoder alone on single texts, for comparison.

Writes ``scale.json`` and ``scale.md`` (with the memory model: bytes per label and per
document) to ``--out``.

    python benchmarks/scale.py                       # the full size, about an hour on 2 cores
    python benchmarks/scale.py --scale 0.02 --out /tmp/scale   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MIB = 1024 * 1024
SHAPE = {"labels": 670_091, "train_docs": 490_449, "test_docs": 153_025}


def run_child(command: list[str], env: dict, log: Path) -> dict:
    """Run a command to completion: wall seconds, CPU seconds and peak RSS (MiB)."""
    with open(log, "wb") as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"`{' '.join(command)}` failed with exit code {code}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def xmlgame_command() -> list[str]:
    script = Path(sys.executable).with_name("xmlgame")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "xmlgame.cli"]


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


# --------------------------------------------------------------------------------------------
# the prediction child


def child(run_dir: Path, dataset_path: Path, out: Path, latency_docs: int,
          recall_docs: int, exact_docs: int, default_search: bool = False) -> None:
    import numpy as np
    import torch

    from xmlgame.dataset import load_dataset
    from xmlgame.encoders import TransformerEncoder, batch_inputs, default_transformer
    from xmlgame.metrics import TopK, compute_metrics
    from xmlgame.mining import Shortlister, encode_all, head_queries
    from xmlgame.model import few_threads, load
    from xmlgame.runs import concatenate_predictions, predict_stream
    from xmlgame.shortlist import IndexConfig, LabelIndex, exact_search, recall_at_k

    results: dict = {}
    dataset = load_dataset(dataset_path)
    start = time.perf_counter()
    model = load(run_dir)
    results["load_seconds"] = round(time.perf_counter() - start, 2)
    if default_search:  # search as this code's defaults would, not as the run saved
        for index in model.shortlister.indexes().values():
            index.set_search_params(ef_search=IndexConfig().ef_search, nprobe=0)
    results["search_params"] = {
        name: {"kind": index.kind, "nprobe": int(index.index.nprobe)} if index.kind == "ivf"
        else {"kind": index.kind} for name, index in model.shortlister.indexes().items()
    }
    texts = dataset.test.texts
    n_test = len(texts)
    counts, n_train = dataset.train_counts, dataset.meta["counts"]["train_docs"]
    a, b = dataset.propensity_ab

    def metrics_of(prediction, Y):  # noqa: N803
        found = compute_metrics(TopK(prediction.label_ids, prediction.scores), Y, counts,
                                n_train, a, b)
        return {m: round(100 * found[m], 2) for m in ("p@1", "p@3", "p@5", "psp@1", "psp@5")}

    # the whole test set, streamed in chunks as `xmlgame predict --input` does
    start = time.perf_counter()
    parts = [p for _, _, p in predict_stream(model, (texts[i] for i in range(n_test)), k=5)]
    seconds = time.perf_counter() - start
    prediction = concatenate_predictions(parts, 5)
    results["test_prediction"] = {
        "docs": n_test, "seconds": round(seconds, 1), "docs_per_second": round(n_test / seconds, 1),
        "shortlist_k": model.shortlist_k, "index": model.shortlister.kind,
        **metrics_of(prediction, dataset.test.Y),
    }
    print("test prediction", results["test_prediction"], flush=True)

    # single documents, one at a time, through the public API and by part
    rng = np.random.default_rng(0)
    sample = rng.choice(n_test, size=min(latency_docs, n_test), replace=False)
    model.predict([texts[int(sample[0])]], k=5)  # warm-up
    total, parts_ms = [], {"featurize": [], "encoder": [], "search": [], "score": []}
    with torch.no_grad(), few_threads(1):
        for i in sample:
            text = texts[int(i)]
            t0 = time.perf_counter()
            model.predict([text], k=5)
            total.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            features = model.featurize([text], progress=False)
            t1 = time.perf_counter()
            h = model.encoder(batch_inputs(model.encoder, features, np.arange(1)))
            t2 = time.perf_counter()
            labels = model.shortlister.search(h, model.shortlist_k)
            t3 = time.perf_counter()
            model.players.predict_proba_each(h, torch.from_numpy(labels)).topk(5)
            t4 = time.perf_counter()
            for name, value in zip(parts_ms, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts_ms[name].append(1000 * value)
    results["single_document_ms"] = {
        "docs": len(sample), "p50": round(percentile(total, 50), 2),
        "p99": round(percentile(total, 99), 2),
        "parts_p50": {name: round(percentile(v, 50), 3) for name, v in parts_ms.items()},
    }
    print("single document", results["single_document_ms"], flush=True)

    # the approximate indexes against exact search over the same label vectors
    shortlister = model.shortlister
    vectors = {name: index.index.reconstruct_n(0, index.n_labels)
               for name, index in shortlister.indexes().items()}
    probed = dict(shortlister.indexes())
    if "heads" not in probed:  # not used at this size by default; measured to show why
        from xmlgame.mining import head_vectors

        heads = head_vectors(model)
        probed["heads (not used)"] = LabelIndex.build(heads, IndexConfig())
        vectors["heads (not used)"] = heads
    docs = rng.choice(n_test, size=min(recall_docs, n_test), replace=False)
    features = model.featurize([texts[int(i)] for i in docs], progress=False)
    h = encode_all(model, features)
    k = model.shortlist_k
    results["recall"] = {"docs": len(docs), "k": k, "index": shortlister.kind}
    for name, index in probed.items():
        queries = head_queries(h) if name.startswith("heads") else h
        start = time.perf_counter()
        _, approx = index.search(queries, k)
        approx_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _, exact = exact_search(vectors[name], queries, k)
        exact_seconds = time.perf_counter() - start
        results["recall"][name] = {
            "recall_at_k": round(recall_at_k(approx, exact), 4),
            "approximate_ms_per_doc": round(1000 * approx_seconds / len(docs), 3),
            "exact_ms_per_doc": round(1000 * exact_seconds / len(docs), 3),
        }
        if index.kind == "ivf":  # how recall and time move with the cells scanned
            default = index.config.ivf_nprobe
            sweep = {}
            for nprobe in (16, 32, 64, 128, 256):
                index.set_search_params(nprobe=nprobe)
                start = time.perf_counter()
                _, approx = index.search(queries, k)
                sweep[nprobe] = {
                    "recall_at_k": round(recall_at_k(approx, exact), 4),
                    "ms_per_doc": round(1000 * (time.perf_counter() - start) / len(docs), 3),
                }
            index.set_search_params(nprobe=default)
            results["recall"][name]["nprobe_sweep"] = sweep
    print("recall", results["recall"], flush=True)

    # P@k through the approximate indexes and through exact ones, on the same documents
    docs = np.sort(rng.choice(n_test, size=min(exact_docs, n_test), replace=False))
    features = model.featurize([texts[int(i)] for i in docs], progress=False)
    Y = dataset.test.Y[docs]  # noqa: N806
    approximate = metrics_of(model.predict_features(features, k=5), Y)
    model.shortlister = Shortlister(**{
        name: LabelIndex.build(vectors[name], IndexConfig(kind="flat"))
        for name in shortlister.indexes()
    })
    exact_metrics = metrics_of(model.predict_features(features, k=5), Y)
    model.shortlister = shortlister
    frequent, model.frequent_labels = model.frequent_labels, None
    without_frequent = metrics_of(model.predict_features(features, k=5), Y)
    model.frequent_labels = frequent
    model.shortlister = None  # every label scored, in blocks
    start = time.perf_counter()
    every_label = metrics_of(model.predict_features(features, k=5), Y)
    every_seconds = time.perf_counter() - start
    model.shortlister = shortlister
    results["approximate_vs_exact"] = {
        "docs": len(docs), "frequent_labels": 0 if frequent is None else len(frequent),
        "approximate": approximate, "exact": exact_metrics,
        "approximate_without_frequent": without_frequent,
        "every_label": every_label, "every_label_ms_per_doc": round(
            1000 * every_seconds / len(docs), 2),
    }
    print("approximate vs exact", results["approximate_vs_exact"], flush=True)

    # the transformer encoder's own single-text time, for comparison
    transformer = TransformerEncoder(default_transformer(), 128, finetune=False)
    transformer.eval()
    ms = []
    with torch.no_grad():
        for i in sample[:100]:
            t0 = time.perf_counter()
            transformer.embed([texts[int(i)]], progress=False)
            ms.append(1000 * (time.perf_counter() - t0))
    results["transformer_encoder_ms"] = {"docs": len(ms), "p50": round(percentile(ms, 50), 2),
                                         "p99": round(percentile(ms, 99), 2)}
    out.write_text(json.dumps(results, indent=1))


# --------------------------------------------------------------------------------------------
# the parent: stages, memory model, report


def memory_model(run_dir: Path, meta: dict, config: dict) -> dict:
    """Bytes per label and per document, from the run's files and configuration."""
    n_labels = meta["counts"]["labels"]
    n_train = meta["counts"]["train_docs"]
    dim = config["encoder"]["dim"]
    overlap = config["overlap"]
    index_bytes = sum((run_dir / f).stat().st_size for f in ("label_index.faiss",
                                                             "head_index.faiss")
                      if (run_dir / f).exists())
    per_label = {
        # weights + Adam's two moments, (D + 1) floats per owner, 1 + rho owners on average
        "player rows + Adam": round(3 * 4 * (dim + 1) * (1 + overlap), 1),
        "fusion logits + Adam": 3 * 4 * 2,
        "label indexes (measured files)": round(index_bytes / n_labels, 1),
        "centroid sums during a refresh": 4 * dim,
    }
    per_label["total"] = round(sum(per_label.values()), 1)
    per_doc = {
        "TF-IDF row (measured mean nnz x 8 bytes)": None,
        "h during a refresh": 4 * dim,
        "mined negatives": 4 * config["shortlist_k"],
    }
    return {"per_label": per_label, "per_document": per_doc, "n_labels": n_labels,
            "n_train": n_train, "index_bytes": index_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/scale"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of the full shape.")
    parser.add_argument("--latency-docs", type=int, default=1000)
    parser.add_argument("--recall-docs", type=int, default=1000)
    parser.add_argument("--exact-docs", type=int, default=5000)
    parser.add_argument("--child", nargs=3, metavar=("RUN", "DATASET", "OUT"))
    parser.add_argument(
        "--default-search", action="store_true",
        help="With --redo-predict: search the run's indexes with this code's default search "
        "parameters (nprobe, ef_search) instead of those saved with the run.",
    )
    parser.add_argument(
        "--redo-predict", action="store_true",
        help="Run stage 3 again on the run of the last full benchmark (its scale.json in "
        "--out), e.g. when the machine was busy while it was measured.",
    )
    args = parser.parse_args()
    if args.child:
        run_dir, dataset, out = map(Path, args.child)
        child(run_dir, dataset, out, args.latency_docs, args.recall_docs, args.exact_docs,
              args.default_search)
        return 0
    if args.redo_predict:
        return redo_predict(args)

    shape = {k: max(1, int(round(v * args.scale))) for k, v in SHAPE.items()}
    work = args.work.resolve()
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XMLGAME_HOME": str(home)}
    program = xmlgame_command()
    stages = {}

    print(f"1/3 prep: {shape}", flush=True)
    stages["prep"] = run_child(
        [*program, "prep", "synthetic", "--labels", str(shape["labels"]), "--train-docs",
         str(shape["train_docs"]), "--test-docs", str(shape["test_docs"])], env, work / "prep.log")
    dataset = next(p for p in (home / "datasets").iterdir() if p.name.startswith("synthetic-")
                   and f"{shape['labels']}labels" in p.name)
    meta = json.loads((dataset / "meta.json").read_text())

    print("2/3 train one epoch", flush=True)
    run_dir = work / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    stages["train"] = run_child(
        [*program, "train", "--dataset", str(dataset), "--epochs", "1", "--out", str(run_dir),
         "--no-progress"], env, work / "train.log")
    run = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]

    print("3/3 predict", flush=True)
    stages["predict"], predicted = predict_stage(run_dir, dataset, work, env, args)

    import numpy as np
    import scipy.sparse as sp

    from xmlgame.dataset import load_dataset

    memory = memory_model(run_dir, meta, run["config"])
    texts = load_dataset(dataset).train.texts
    sample = [texts[i] for i in range(0, len(texts), max(1, len(texts) // 2000))]
    from xmlgame.encoders import TfidfVocabulary

    vocab = TfidfVocabulary.load(run_dir / "vocab")
    nnz = sp.csr_matrix(vocab.transform_texts(sample)).getnnz(axis=1)
    key = "TF-IDF row (measured mean nnz x 8 bytes)"
    memory["per_document"][key] = round(8 * float(np.mean(nnz)), 1)
    memory["per_document"]["total"] = round(sum(memory["per_document"].values()), 1)

    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
        "machine": platform.machine(), "shape": shape, "stages": stages,
        "train_log": log, "train_metrics": metrics, "predict": predicted, "memory": memory,
        "config": run["config"], "dataset": str(dataset),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    (args.out / "scale.md").write_text(report(results))
    print(report(results))
    return 0


def predict_stage(run_dir: Path, dataset: Path, work: Path, env: dict, args) -> tuple:
    child_out = work / "predict.json"
    stage = run_child(
        [sys.executable, __file__, "--child", str(run_dir), str(dataset), str(child_out),
         "--latency-docs", str(args.latency_docs), "--recall-docs", str(args.recall_docs),
         "--exact-docs", str(args.exact_docs),
         *(["--default-search"] if args.default_search else [])], env, work / "predict.log")
    return stage, json.loads(child_out.read_text())


def redo_predict(args) -> int:
    results = json.loads((args.out / "scale.json").read_text())
    work = args.work.resolve()
    env = {**os.environ, "XMLGAME_HOME": str(work / "home")}
    print("3/3 predict (again)", flush=True)
    results["stages"]["predict"], results["predict"] = predict_stage(
        work / "run", Path(results.get("dataset") or next(
            (work / "home" / "datasets").glob("synthetic-*"))), work, env, args)
    results["predict_date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["default_search"] = args.default_search
    (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    (args.out / "scale.md").write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    s, epoch, m = r["stages"], r["train_log"][0], r["train_metrics"]
    p = r["predict"]
    shape = r["shape"]
    lines = [
        "# Amazon-670K scale on one machine",
        "",
        f"{r['date']}, {r['cpus']} CPUs. Made by `python benchmarks/scale.py`"
        + (f" (stage 3 again at {r['predict_date']}, `--redo-predict`)" if "predict_date" in r
           else "") + ". Synthetic set of "
        f"{shape['labels']:,} labels, {shape['train_docs']:,} training and "
        f"{shape['test_docs']:,} test documents (text); bag-of-words encoder (D = "
        f"{r['config']['encoder']['dim']}), N = {r['config']['players']}, rho = "
        f"{r['config']['overlap']}, batch {r['config']['batch_size']}, "
        f"{r['config']['shortlist_k']} mined + {r['config']['negatives']} sampled negatives "
        f"per batch, shortlist {r['config']['predict_shortlist']} per index at prediction"
        + (f" + the {r['config']['shortlist_frequent']:,} labels most frequent in training"
           if r["config"].get("shortlist_frequent") else "") + ".",
        "",
        "| stage | wall s | peak RSS MiB | throughput |",
        "|---|---:|---:|---|",
        f"| prep (child process) | {s['prep']['wall_seconds']} | {s['prep']['peak_rss_mib']} | "
        f"{(shape['train_docs'] + shape['test_docs']) / s['prep']['wall_seconds']:,.0f} docs/s |",
        f"| train: whole process | {s['train']['wall_seconds']} | "
        f"{s['train']['peak_rss_mib']} | |",
        f"| - vocabulary | {m['vocabulary_seconds']} | | |",
        f"| - featurize train + test | {m['featurize_seconds']} | | |",
    ]
    for when, prefix in (("before the epoch", "initial_"), ("after the epoch", "")):
        for stage in ("encode", "build", "mine"):
            value = epoch.get(f"{prefix}refresh_{stage}_seconds")
            if value is not None:
                lines.append(f"| - index refresh {when}: {stage} | {value} | | |")
    lines += [
        f"| - one epoch | {epoch['train_seconds']} | | {epoch['docs_per_second']:,} docs/s |",
        f"| - test prediction in training | {m['test_predict_seconds']} | | |",
        f"| predict (child process): load | {p['load_seconds']} | {s['predict']['peak_rss_mib']} "
        "| |",
        f"| - stream the test set | {p['test_prediction']['seconds']} | | "
        f"{p['test_prediction']['docs_per_second']:,} docs/s |",
        "",
        f"Single-document prediction (`model.predict([text])`, {p['single_document_ms']['docs']} "
        f"test documents one at a time): p50 **{p['single_document_ms']['p50']} ms**, p99 "
        f"{p['single_document_ms']['p99']} ms. Parts (p50, ms): " + ", ".join(
            f"{k} {v}" for k, v in p["single_document_ms"]["parts_p50"].items()
        ) + f". The transformer encoder alone (all-MiniLM-L6-v2, one text): p50 "
        f"{p['transformer_encoder_ms']['p50']} ms, p99 {p['transformer_encoder_ms']['p99']} ms.",
        "",
        f"Shortlist recall@{p['recall']['k']} of each index ({p['recall']['index']}) against "
        f"exact search over the same label vectors ({p['recall']['docs']} test documents): "
        + ", ".join(
            f"{name} **{v['recall_at_k']}** ({v['approximate_ms_per_doc']} ms per document, "
            f"exact {v['exact_ms_per_doc']} ms)"
            for name, v in p["recall"].items() if isinstance(v, dict)
        ) + ".",
    ]
    if "search_params" in p:
        lines[-1] += " Stage 3 searched " + ", ".join(
            f"{name} ({v['kind']}" + (f", nprobe {v['nprobe']})" if "nprobe" in v else ")")
            for name, v in p["search_params"].items()
        ) + (" with this code's defaults (`--default-search`), not the parameters saved with "
             "the run" if r.get("default_search") else "") + "."
    sweeps = {name: v["nprobe_sweep"] for name, v in p["recall"].items()
              if isinstance(v, dict) and "nprobe_sweep" in v}
    if sweeps:
        probes = list(next(iter(sweeps.values())))
        lines += ["", "IVF cells scanned per query (nprobe) against recall@K and time per "
                  "document (batched):", "",
                  "| index | " + " | ".join(f"nprobe {n}" for n in probes) + " |",
                  "|---|" + "---:|" * len(probes)]
        for name, sweep in sweeps.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{sweep[n]['recall_at_k']} ({sweep[n]['ms_per_doc']} ms)" for n in probes) + " |")
    lines += [
        "",
        "| test metrics (%) | P@1 | P@3 | P@5 | PSP@1 | PSP@5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    t = p["test_prediction"]
    ave = p["approximate_vs_exact"]
    frequent = ave.get("frequent_labels", 0)
    lines.append(f"| whole test set, {t['index']} index"
                 f"{f' + {frequent} frequent labels' if frequent else ''} | {t['p@1']} | "
                 f"{t['p@3']} | {t['p@5']} | {t['psp@1']} | {t['psp@5']} |")
    rows = {
        "approximate": f"approximate index{f' + {frequent} frequent labels' if frequent else ''}",
        "exact": f"exact index{f' + {frequent} frequent labels' if frequent else ''}",
        "approximate_without_frequent": "approximate index alone",
        "every_label": "every label scored"
        + (f" ({ave['every_label_ms_per_doc']} ms per document)"
           if "every_label_ms_per_doc" in ave else ""),
    }
    for name, label in rows.items():
        if name in ave:
            v = ave[name]
            lines.append(f"| {ave['docs']} test documents, {label} | {v['p@1']} | {v['p@3']} | "
                         f"{v['p@5']} | {v['psp@1']} | {v['psp@5']} |")
    mem = r["memory"]
    lines += [
        "",
        "Memory model (bytes):",
        "",
        "| per label | bytes |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in mem["per_label"].items()],
        "",
        "| per training document | bytes |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in mem["per_document"].items()],
        "",
        f"At {mem['n_labels']:,} labels and {mem['n_train']:,} training documents that is "
        f"{mem['per_label']['total'] * mem['n_labels'] / 2**30:.2f} GiB for the labels and "
        f"{mem['per_document']['total'] * mem['n_train'] / 2**30:.2f} GiB for the documents, "
        f"plus the encoder (vocabulary x D x 3 floats with Adam) and the framework.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
