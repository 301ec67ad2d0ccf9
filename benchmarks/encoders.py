"""Throughput of xmlgame's encoders on this machine, on real texts (the bundled debtags set).

Measures, each on the same texts:

- ``bow`` featurizing (vocabulary fit, TF-IDF transform) in documents per second;
- ``bow`` training (one epoch of the game, N = 6) in documents per second;
- the packaged all-MiniLM-L6-v2, frozen: encoding texts per second at ``--max-length`` tokens;
- the same transformer fine-tuned: training texts per second (forward, backward, step).

Prints a table with each rate and its ratio to the bag-of-words training rate; writes
``encoders.json`` and ``encoders.md`` to ``--out``.

    python benchmarks/encoders.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--texts", type=int, default=256, help="texts for the transformer runs")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    os.environ["XMLGAME_HOME"] = tempfile.mkdtemp(prefix="xmlgame-bench-")
    from xmlgame import recipes
    from xmlgame.encoders import TransformerEncoder, default_transformer
    from xmlgame.train import TrainConfig, Trainer

    dataset = recipes.prep("debtags")
    texts = list(dataset.train.texts)
    rows = []

    # bag of words: featurizing and one training epoch of the game
    trainer = Trainer(dataset, TrainConfig(epochs=1), Path(os.environ["XMLGAME_HOME"]) / "run",
                      progress=False)
    trainer.run_dir.mkdir(parents=True)
    _, seconds = timed(trainer.setup)
    n_docs = len(dataset.train) + len(dataset.test)
    rows.append(("bow featurize (fit + transform)", n_docs / seconds, n_docs))
    entry, _ = timed(lambda: trainer.run_epoch(0))
    bow_train = entry["docs_per_second"]
    rows.append(("bow train, N = 6 (one epoch)", bow_train, trainer.n_train))

    # transformer, frozen: encoding
    sample = [texts[i] for i in np.random.default_rng(0).choice(len(texts), args.texts, False)]
    encoder = TransformerEncoder(default_transformer(), args.max_length, finetune=False)
    encoder.embed(sample[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm
    _, seconds = timed(lambda: encoder.embed(sample, batch_size=args.batch_size, progress=False))
    rows.append((f"transformer encode ({args.max_length} tokens)", len(sample) / seconds,
                 len(sample)))

    # transformer, fine-tuned: forward, backward and an optimizer step per batch
    tuned = TransformerEncoder(default_transformer(), args.max_length, finetune=True)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=3e-5)
    tune_texts = sample[: max(args.batch_size * 4, 1)]

    def finetune():
        for start in range(0, len(tune_texts), args.batch_size):
            h = tuned(**tuned.tokenize(tune_texts[start : start + args.batch_size]))
            loss = h.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    _, seconds = timed(finetune)
    rows.append((f"transformer fine-tune ({args.max_length} tokens)", len(tune_texts) / seconds,
                 len(tune_texts)))

    lines = [
        "# Encoder throughput",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, fp32. Made by "
        "`python benchmarks/encoders.py` on debtags texts.",
        "",
        "| what | documents/s | documents | vs bow training |",
        "|---|---:|---:|---:|",
    ]
    for name, rate, count in rows:
        lines.append(f"| {name} | {rate:,.1f} | {count:,} | {rate / bow_train:.3f}x |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoders.md").write_text(text)
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "rows": [{"what": n, "docs_per_second": r, "docs": c} for n, r, c in rows]}
    (args.out / "encoders.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
