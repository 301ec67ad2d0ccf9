"""The ``xmlgame`` command line: prep, train, eval, predict.

A thin layer: each command parses its options, calls the library, and prints. User mistakes
(:class:`xmlgame.errors.XmlgameError`) are printed as one clear message with exit code 2, never as
a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from xmlgame.errors import XmlgameError

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
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


@app.command()
@user_errors
def prep(
    name: Optional[str] = typer.Argument(
        None,
        help="A recipe (see --list), 'synthetic', or a name for your own data given with --from.",
    ),
    source: Optional[Path] = typer.Option(
        None, "--from", help="A local file or folder in any supported layout, instead of a download."
    ),
    layout: Optional[str] = typer.Option(
        None, help="Force the layout: pecos, attentionxml, xc-bow, lf, jsonl (default: detect)."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Where to write the prepared dataset (default: $XMLGAME_HOME/datasets/NAME)."
    ),
    list_recipes: bool = typer.Option(False, "--list", help="List the dataset recipes and exit."),
    propensity_a: Optional[float] = typer.Option(None, "--A", help="Propensity constant A."),
    propensity_b: Optional[float] = typer.Option(None, "--B", help="Propensity constant B."),
    labels: int = typer.Option(10_000, help="synthetic: number of labels."),
    train_docs: int = typer.Option(20_000, help="synthetic: training documents."),
    test_docs: int = typer.Option(5_000, help="synthetic: test documents."),
    features: str = typer.Option("text", help="synthetic: 'text' or 'sparse' inputs."),
    seed: int = typer.Option(0, help="synthetic: random seed."),
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
            n_labels=labels, n_train=train_docs, n_test=test_docs, inputs=features, seed=seed
        )
        dataset = prepare_synthetic(
            config, out=out,
            propensity_a=DEFAULT_A if propensity_a is None else propensity_a,
            propensity_b=DEFAULT_B if propensity_b is None else propensity_b,
        )
    else:
        dataset = recipes.prep(
            name, source=source, out=out, layout=layout,
            propensity_a=propensity_a, propensity_b=propensity_b,
        )
    typer.echo(recipes.format_summary(dataset))


@app.command()
@user_errors
def train(
    dataset: Optional[str] = typer.Option(
        None, help="Prepared dataset name or folder (default: the latest prepared, else debtags)."
    ),
    players: int = typer.Option(6, help="Number of players N (label shards)."),
    overlap: float = typer.Option(0.2, help="Fraction rho of labels given to a second player."),
) -> None:
    """Train a CD-GTMLL model on a prepared dataset."""
    raise XmlgameError("`xmlgame train` arrives with the model; it is not implemented yet")


@app.command(name="eval")
@user_errors
def evaluate_command(
    predictions: Optional[Path] = typer.Argument(
        None, help="A predictions file (.npz: top-k ids and scores, or a PECOS CSR), or a run."
    ),
    dataset: Optional[str] = typer.Option(
        None, help="Prepared dataset name or folder the predictions are for."
    ),
    metric: Optional[list[str]] = typer.Option(
        None, "--metric", "-m", help="Metric(s), e.g. psp@5 or 'p@1,p@3'. Repeatable."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON."),
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
        json_out.write_text(json.dumps(results, indent=2) + "\n")


@app.command()
@user_errors
def predict(
    run: Path = typer.Argument(..., help="A run folder."),
    text: Optional[str] = typer.Argument(None, help="A text to label."),
) -> None:
    """Rank labels for new texts with a trained run."""
    raise XmlgameError("`xmlgame predict` arrives with the model; it is not implemented yet")


if __name__ == "__main__":
    app()
