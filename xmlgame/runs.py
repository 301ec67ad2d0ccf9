"""Runs as the command line sees them: start, resume, find, predict, and report.

The library pieces (:mod:`xmlgame.train`, :mod:`xmlgame.model`) know nothing of
``$XMLGAME_HOME``; this module chooses folders and names, and formats results for people.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from xmlgame.dataset import load_dataset
from xmlgame.encoders import EncoderConfig
from xmlgame.errors import XmlgameError
from xmlgame.game import GameConfig
from xmlgame.paths import datasets_dir, latest, resolve_dataset, runs_dir
from xmlgame.shortlist import IndexConfig
from xmlgame.train import TrainConfig, train

logger = logging.getLogger(__name__)

REPORTED = ("p@1", "p@3", "p@5", "psp@1", "psp@3", "psp@5", "ndcg@5", "rare-f1@5")


def make_config(
    *, players: int, overlap: float, alpha: float, beta: float, schedule: str,
    curiosity_negatives: float | None, encoder: str,
    transformer: str | None, finetune: bool, dim: int, epochs: int, batch_size: int,
    negatives: int, seed: int, shortlist_k: int = 8, predict_shortlist: int = 100,
    shortlist_weight: float = 0.0, shortlist_frequent: int = 1000,
    index_vectors: str = "auto", index: str = "auto",
    hnsw_m: int = 32,
    ef_construction: int | None = None, ef_search: int | None = None, ivf_nlist: int = 0,
    nprobe: int | None = None,
    label_parallel: bool | None = None, grad_accum: int | None = None,
    mixed_precision: str | None = None,
) -> TrainConfig:
    """A validated TrainConfig from command-line values (None: the default)."""
    execution = execution_options(label_parallel, grad_accum, mixed_precision)
    index_settings = {"kind": index, "hnsw_m": hnsw_m, "ivf_nlist": ivf_nlist}
    for name, value in (("ef_construction", ef_construction), ("ef_search", ef_search),
                        ("ivf_nprobe", nprobe)):
        if value is not None:
            index_settings[name] = value
    return TrainConfig(
        encoder=EncoderConfig(
            kind=encoder, dim=dim, transformer=transformer or "", finetune=finetune
        ),
        game=GameConfig(
            alpha=alpha, beta=beta, schedule=schedule, curiosity_negatives=curiosity_negatives
        ),
        players=players, overlap=overlap, epochs=epochs, batch_size=batch_size,
        negatives=negatives, seed=seed, shortlist_k=shortlist_k,
        predict_shortlist=predict_shortlist, shortlist_weight=shortlist_weight,
        shortlist_frequent=shortlist_frequent, index_vectors=index_vectors,
        index=IndexConfig(seed=seed, **index_settings), **execution,
    )


def execution_options(label_parallel: bool | None = None, grad_accum: int | None = None,
                      mixed_precision: str | None = None) -> dict:
    """The execution options given (not None), as TrainConfig fields."""
    given = {"label_parallel": label_parallel, "grad_accum": grad_accum,
             "mixed_precision": mixed_precision}
    return {name: value for name, value in given.items() if value is not None}


def default_dataset() -> Path:
    """The latest prepared dataset, or the bundled debtags set prepared now."""
    found = latest(datasets_dir(), "meta.json")
    if found is not None:
        return found
    from xmlgame import recipes

    logger.info("no prepared dataset yet: preparing the bundled debtags set")
    return recipes.prep("debtags").path


def new_run_dir(dataset_name: str, config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = runs_dir() / f"{stamp}-{dataset_name}-N{config.players}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def start_run(dataset: str | None, config: TrainConfig, out: Path | None = None,
              progress: bool = True) -> tuple[dict, Path]:
    """Train a new run. Under a launcher the main process picks the dataset (preparing the
    bundled one if need be) and the run folder (named from the clock), and tells the others."""
    from xmlgame.distributed import Communicator

    comm = Communicator.current()
    path = comm.on_main(lambda: default_dataset() if dataset is None else resolve_dataset(dataset))
    data = load_dataset(path)
    run_dir = comm.on_main(lambda: check_new_run_dir(
        out if out is not None else new_run_dir(data.name, config)
    ))
    return train(data, config, run_dir, progress=progress), run_dir


def check_new_run_dir(run_dir: Path) -> Path:
    if (run_dir / "run.json").exists():
        raise XmlgameError(
            f"{run_dir} already holds a run; choose another --out or resume it with --resume"
        )
    return run_dir


def resume_run(run_dir: Path, progress: bool = True, **execution) -> tuple[dict, Path]:
    """Resume a run from its last finished epoch; ``execution`` options (see
    :func:`execution_options`) replace the saved ones."""
    run_dir = resolve_run(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    data = load_dataset(info["dataset"]["path"])
    if data.meta["input_checksum"] != info["dataset"]["input_checksum"]:
        raise XmlgameError(
            f"the dataset at {data.path} changed since {run_dir} started (checksum differs); "
            "start a new run instead of resuming"
        )
    config = TrainConfig(**{**info["config"], **execution_options(**execution)})
    return train(data, config, run_dir, resume=True, progress=progress), run_dir


def resolve_run(run: str | Path) -> Path:
    """A run folder from a path or 'latest'."""
    if str(run) == "latest":
        found = latest(runs_dir(), "model.safetensors")
        if found is None:
            raise XmlgameError(f"no trained run in {runs_dir()}; train one with `xmlgame train`")
        return found
    path = Path(run).expanduser()
    if not (path / "run.json").exists():
        named = runs_dir() / str(run)
        if (named / "run.json").exists():
            return named
        raise XmlgameError(f"{run} is not a run folder (no run.json)")
    return path


def format_results(results: dict, run_dir: Path) -> str:
    test = results["test"]
    lines = [
        f"run       {run_dir}",
        f"selected  epoch {results['best_epoch']} of {results['epochs_run']} (validation)",
        "test      " + "  ".join(f"{m.upper()} {100 * test[m]:.2f}" for m in REPORTED if m in test),
        f"next      xmlgame eval {run_dir}   |   xmlgame predict {run_dir} \"some text\"",
    ]
    return "\n".join(lines)


# prediction


def iter_texts(texts: Sequence[str] | None, input_file: Path | None) -> Iterator[str]:
    """Texts from the command line, or streamed from a file: plain lines or JSON lines with
    'text'. Arguments are checked before the first text is yielded."""
    if texts and input_file is not None:
        raise XmlgameError("give texts as arguments or with --input, not both")
    if input_file is None:
        if not texts:
            raise XmlgameError('give a text to label, e.g. xmlgame predict RUN "some text"')
        return iter(list(texts))
    if not input_file.exists():
        raise XmlgameError(f"{input_file}: no such file")
    return _file_texts(input_file)


def _file_texts(input_file: Path) -> Iterator[str]:
    with open(input_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                    yield str(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise XmlgameError(
                        f"{input_file}, line {number}: expected a JSON object with a 'text' field"
                    ) from None
            else:
                yield line


def read_texts(texts: Sequence[str] | None, input_file: Path | None) -> list[str]:
    """All of :func:`iter_texts` as a list."""
    return list(iter_texts(texts, input_file))


def ranked_labels(model, prediction) -> list[list[tuple[str, float]]]:
    names = model.label_names
    return [
        [(names[i], float(s)) for i, s in zip(ids, scores) if i >= 0]
        for ids, scores in zip(prediction.label_ids, prediction.scores)
    ]


def predict_texts(run: str | Path, texts: list[str], k: int):
    """(ranked (name, score) lists, the raw Prediction, the model) for some texts."""
    model = load_run(run, k)
    from xmlgame.model import few_threads

    with few_threads(len(texts)):
        prediction = model.predict_features(model.featurize(texts, progress=False), k=k)
    return ranked_labels(model, prediction), prediction, model


def load_run(run: str | Path, k: int):
    from xmlgame.model import load

    if k < 1:
        raise XmlgameError(f"-k must be at least 1, got {k}")
    return load(resolve_run(run))


def predict_stream(model, texts: Iterable[str], k: int, chunk: int = 4096):
    """Predict texts in chunks, yielding (texts, ranked lists, Prediction) per chunk, so that
    a large input never sits in memory featurized all at once."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            yield batch, *_predict_chunk(model, batch, k)
            batch = []
    if batch:
        yield batch, *_predict_chunk(model, batch, k)


def _predict_chunk(model, texts: list[str], k: int):
    from xmlgame.model import few_threads

    with few_threads(len(texts)):
        prediction = model.predict_features(model.featurize(texts, progress=False), k=k)
    return ranked_labels(model, prediction), prediction


def concatenate_predictions(parts: list, k: int):
    """One Prediction from the chunks of :func:`predict_stream`, in order."""
    import numpy as np

    from xmlgame.model import Prediction

    if not parts:
        return Prediction(np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32))
    return Prediction(np.concatenate([p.label_ids for p in parts]),
                      np.concatenate([p.scores for p in parts]))


def save_prediction_file(path: Path, prediction, model) -> None:
    from xmlgame.metrics import TopK
    from xmlgame.predictions import save_predictions

    dataset = model.run["dataset"]["name"] if hasattr(model, "run") else None
    save_predictions(path, TopK(prediction.label_ids, prediction.scores), dataset_name=dataset)


def format_ranked(texts: Sequence[str], ranked) -> str:
    blocks = []
    for text, labels in zip(texts, ranked):
        head = text if len(text) <= 80 else text[:77] + "..."
        rows = [f"  {score:6.3f}  {name}" for name, score in labels]
        blocks.append("\n".join([head, *rows]))
    return "\n\n".join(blocks)


