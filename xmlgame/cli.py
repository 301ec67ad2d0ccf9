"""The ``xmlgame`` command line: prep, train, eval, predict.

A thin layer: each command parses its options, calls the library, and prints. User mistakes
(:class:`xmlgame.errors.XmlgameError`) are printed as one clear message with exit code 2, never as
a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import typer

from xmlgame.errors import XmlgameError
from xmlgame.paths import write_json

app = typer.Typer(
    help="Extreme multi-label text classification with a curiosity-driven cooperative game.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(command):
    """Turn XmlgameError into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except XmlgameError as error:
            typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; nothing half-written was kept", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if os.environ.get("RANK", "0") != "0":  # one of several processes: the main one talks
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


@app.command()
@user_errors
def prep(
    name: str | None = typer.Argument(
        None,
        help="A recipe (see --list), 'synthetic', or a name for your own data given with --from.",
    ),
    source: Path | None = typer.Option(
        None, "--from", help="A local file or folder in a supported layout, instead of a download."
    ),
    layout: str | None = typer.Option(
        None, help="Force the layout: pecos, attentionxml, xc-bow, lf, jsonl (default: detect)."
    ),
    out: Path | None = typer.Option(
        None, help="Where to write the prepared dataset (default: $XMLGAME_HOME/datasets/NAME)."
    ),
    list_recipes: bool = typer.Option(False, "--list", help="List the dataset recipes and exit."),
    propensity_a: float | None = typer.Option(None, "--A", help="Propensity constant A."),
    propensity_b: float | None = typer.Option(None, "--B", help="Propensity constant B."),
    labels: int | None = typer.Option(None, help="synthetic: number of labels [10000]."),
    train_docs: int | None = typer.Option(None, help="synthetic: training documents [20000]"),
    test_docs: int | None = typer.Option(None, help="synthetic: test documents [5000]."),
    features: str | None = typer.Option(None, help="synthetic: 'text' or 'sparse' [text]."),
    seed: int | None = typer.Option(None, help="synthetic: random seed [0]."),
) -> None:
    """Prepare a dataset: download or convert it into xmlgame's format.

    \b
    xmlgame prep --list                       the known recipes
    xmlgame prep debtags                      the bundled Debian debtags set (offline)
    xmlgame prep amazon670k --from DIR        convert files you downloaded
    xmlgame prep my-data --from data.jsonl    your own data (any supported layout)
    xmlgame prep synthetic --labels 670091 --train-docs 490449 --test-docs 153025
    """
    from xmlgame import recipes

    if list_recipes:
        typer.echo(recipes.format_recipe_table())
        return
    if name is None:
        raise XmlgameError("give a dataset name (see `xmlgame prep --list`) or --list")
    if name == "synthetic":
        from xmlgame.dataset import DEFAULT_A, DEFAULT_B
        from xmlgame.synthetic import SyntheticConfig, prepare_synthetic

        ignored = [flag for flag, value in (("--from", source), ("--layout", layout))
                   if value is not None]
        if ignored:
            raise XmlgameError(
                f"xmlgame prep synthetic generates its data and reads no files: remove "
                f"{' and '.join(ignored)}. To prepare your own files, give them a name: "
                "xmlgame prep MY-NAME --from FILE_OR_DIR"
            )
        config = SyntheticConfig(
            n_labels=10_000 if labels is None else labels,
            n_train=20_000 if train_docs is None else train_docs,
            n_test=5_000 if test_docs is None else test_docs,
            inputs=features or "text",
            seed=0 if seed is None else seed,
        )
        dataset = prepare_synthetic(
            config, out=out,
            propensity_a=DEFAULT_A if propensity_a is None else propensity_a,
            propensity_b=DEFAULT_B if propensity_b is None else propensity_b,
        )
    else:
        synthetic_only = {"--labels": labels, "--train-docs": train_docs,
                          "--test-docs": test_docs, "--features": features, "--seed": seed}
        given = [flag for flag, value in synthetic_only.items() if value is not None]
        if given:
            raise XmlgameError(
                f"{', '.join(given)}: for `xmlgame prep synthetic` only; remove to "
                f"prepare {name!r}"
            )
        dataset = recipes.prep(
            name, source=source, out=out, layout=layout,
            propensity_a=propensity_a, propensity_b=propensity_b,
        )
    typer.echo(recipes.format_summary(dataset))


@app.command()
@user_errors
def train(
    dataset: str | None = typer.Option(
        None, help="Prepared dataset name or folder (default: the latest prepared; with none, "
        "the bundled debtags set is prepared first)."
    ),
    players: int = typer.Option(6, help="Number of players N (label shards)."),
    overlap: float = typer.Option(0.2, help="Fraction rho of labels given to a second player."),
    alpha: float = typer.Option(16.0, help="Weight of curiosity (0: no game, plain BCE)."),
    beta: float = typer.Option(0.1, help="Weight of disagreement with peers inside curiosity."),
    curiosity_negatives: float | None = typer.Option(
        None, help="Weight of negative candidates in curiosity's rarity-weighted "
        "log-likelihood, a positive's being 1 (0: positives only). Default: 0.3 when every "
        "label is a candidate, 1 when negatives are sampled or mined."
    ),
    schedule: str = typer.Option("cyclic", help="cyclic (player by player) or joint."),
    encoder: str = typer.Option("bow", help="bow, transformer, or both (concatenated)."),
    transformer: str | None = typer.Option(
        None, help="Hugging Face model folder or name (default: packaged all-MiniLM-L6-v2)."
    ),
    finetune: bool = typer.Option(False, help="Fine-tune the transformer (slow on a CPU)."),
    dim: int = typer.Option(256, help="Hidden size D of the bag-of-words encoder."),
    epochs: int = typer.Option(8, help="Most epochs; early stopping may end sooner."),
    batch_size: int = typer.Option(256, help="Documents per batch."),
    negatives: int = typer.Option(
        2048, help="Sampled negative labels per batch when not all labels are candidates."
    ),
    shortlist_k: int = typer.Option(
        8, help="Hard negatives mined per training document from each label index, when "
        "not all labels are candidates (0: sampled negatives only)."
    ),
    predict_shortlist: int = typer.Option(
        100, help="Labels each index shortlists per document for prediction, when not all "
        "labels are candidates (0: score every label)."
    ),
    shortlist_weight: float = typer.Option(
        0.0, help="Weight in [0, 1] of the index's similarity in prediction scores."
    ),
    shortlist_frequent: int = typer.Option(
        1000, help="The labels most frequent in training scored for every document at "
        "prediction, besides its shortlist (0: none)."
    ),
    index_vectors: str = typer.Option(
        "auto", help="What the label index holds: centroids (mean document embedding), heads "
        "(the players' weights), both, their shortlists joined, or auto (both while the index "
        "is exact, centroids once it is approximate)."
    ),
    index: str = typer.Option(
        "auto", help="Label index: flat (exact), hnsw, ivf, or auto (flat up to 50,000 "
        "labels, IVF above)."
    ),
    hnsw_m: int = typer.Option(32, help="HNSW graph degree M."),
    ef_construction: int | None = typer.Option(None, help="HNSW efConstruction."),
    ef_search: int | None = typer.Option(None, help="HNSW efSearch."),
    ivf_nlist: int = typer.Option(0, help="IVF lists (0: chosen from the label count)."),
    nprobe: int | None = typer.Option(
        None, help="IVF lists searched per query (default: max(64, lists / 25))."
    ),
    seed: int = typer.Option(0, help="Seed of shards, splits, initialisation and batches."),
    out: Path | None = typer.Option(None, help="Run folder (default: $XMLGAME_HOME/runs/...)."),
    resume: Path | None = typer.Option(
        None, help="Resume this run folder from its last finished epoch."
    ),
    progress: bool = typer.Option(True, help="Show progress bars."),
    num_processes: int | None = typer.Option(
        None, help="Train as this many processes on this machine (one per GPU, or CPU "
        "processes); under accelerate launch or torchrun, the count they started."
    ),
    label_parallel: bool | None = typer.Option(
        None, "--label-parallel/--data-parallel",
        help="With several processes: split the players over them (head memory / P) instead "
        "of every process holding all (default: data-parallel).",
    ),
    grad_accum: int | None = typer.Option(
        None, help="Micro-batches per batch: the encoder holds one's activations at a time, "
        "the steps are those of the whole batch (default: 1).",
    ),
    mixed_precision: str | None = typer.Option(
        None, help="bf16: run the encoder's forward in bfloat16, GPUs only (default: no)."
    ),
) -> None:
    """Train a CD-GTMLL model on a prepared dataset.

    \b
    xmlgame train                                   the latest prepared dataset, defaults
    xmlgame train --players 6 --overlap 0.2         the game with six players
    xmlgame train --players 1 --alpha 0             the plain BCE baseline, same code path
    xmlgame train --resume ~/xmlgame/runs/RUN       continue an interrupted run
    xmlgame train --num-processes 4                 four processes on this machine
    accelerate launch --multi_gpu --num_processes 8 -m xmlgame.cli train --label-parallel
    """
    from xmlgame import distributed, runs

    execution = runs.execution_options(label_parallel, grad_accum, mixed_precision)
    if resume is not None:
        runs.resolve_run(resume)  # a mistake stops here, before any process starts
    else:
        config = runs.make_config(
            players=players, overlap=overlap, alpha=alpha, beta=beta, schedule=schedule,
            curiosity_negatives=curiosity_negatives,
            encoder=encoder, transformer=transformer, finetune=finetune, dim=dim,
            epochs=epochs, batch_size=batch_size, negatives=negatives, seed=seed,
            shortlist_k=shortlist_k, predict_shortlist=predict_shortlist,
            shortlist_weight=shortlist_weight, shortlist_frequent=shortlist_frequent,
            index_vectors=index_vectors, index=index,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction, ef_search=ef_search, ivf_nlist=ivf_nlist,
            nprobe=nprobe, **execution,
        )
    if num_processes is not None:
        if num_processes > 1 and distributed.launched_world_size() is None:
            raise typer.Exit(code=distributed.relaunch(num_processes, sys.argv[1:]))
        distributed.check_world_size(num_processes)
    if resume is not None:
        results, run_dir = runs.resume_run(resume, progress=progress, **execution)
    else:
        results, run_dir = runs.start_run(dataset, config, out=out, progress=progress)
    if distributed.Communicator.current().is_main:
        typer.echo(runs.format_results(results, run_dir))


@app.command(name="eval")
@user_errors
def evaluate_command(
    predictions: Path | None = typer.Argument(
        None, help="A predictions file (.npz: top-k ids and scores, or a PECOS CSR), or a run."
    ),
    dataset: str | None = typer.Option(
        None, help="Prepared dataset name or folder the predictions are for."
    ),
    metric: list[str] | None = typer.Option(
        None, "--metric", "-m", help="Metric(s), e.g. psp@5 or 'p@1,p@3'. Repeatable."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write results as JSON."),
    rare_threshold: int = typer.Option(10, help="Rare-F1: labels with 1..N training documents."),
) -> None:
    """Score predictions against a prepared dataset's test split.

    \b
    xmlgame eval                                  the most recent run
    xmlgame eval preds.npz --dataset debtags      a predictions file
    xmlgame eval --metric psp@5 --metric p@1,p@3  chosen metrics only
    """
    from xmlgame.evaluate import evaluate_command as run

    results, table = run(
        predictions, dataset=dataset, metrics=metric, rare_threshold=rare_threshold
    )
    typer.echo(table)
    if json_out is not None:
        write_json(json_out, results)


@app.command()
@user_errors
def predict(
    run: Path = typer.Argument(..., help="A run folder (or 'latest')."),
    text: list[str] | None = typer.Argument(None, help="Text(s) to label."),
    input_file: Path | None = typer.Option(
        None, "--input", "-i", help="A file of texts, one per line, or JSON lines with 'text'."
    ),
    k: int = typer.Option(5, "-k", help="How many labels per text."),
    json_lines: bool = typer.Option(False, "--json", help="Print JSON lines, not a table."),
    out: Path | None = typer.Option(
        None, help="Also write the predictions file that `xmlgame eval` reads (.npz)."
    ),
) -> None:
    """Rank labels for new texts with a trained run.

    \b
    xmlgame predict latest "a text editor for the terminal"
    xmlgame predict RUN --input texts.txt --json
    xmlgame predict RUN --input test.jsonl --out preds.npz -k 10
    """
    from xmlgame import runs

    model = runs.load_run(run, k)
    parts = []
    for texts, ranked, prediction in runs.predict_stream(
        model, runs.iter_texts(text, input_file), k
    ):
        if out is not None:
            parts.append(prediction)
        if json_lines:
            for t, labels in zip(texts, ranked):
                record = {
                    "text": t, "labels": [{"label": n, "score": round(s, 6)} for n, s in labels]
                }
                typer.echo(json.dumps(record, ensure_ascii=False))
        else:
            typer.echo(runs.format_ranked(texts, ranked))
    if out is not None:
        runs.save_prediction_file(out, runs.concatenate_predictions(parts, k), model)


if __name__ == "__main__":
    app()
