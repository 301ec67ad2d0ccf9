"""Dataset recipes: how to get a named dataset and what it must look like once read.

A :class:`Recipe` declares where a dataset's files live (download URLs, a bundled folder, or a
note on where to get them), the layout they come in, and the counts a correct copy has. The
recipes themselves live in ``xmlgame.data_prep`` (the repository's ``data_prep/`` folder), one
module per dataset.

``prep(name)`` resolves the files (download, bundled copy, or ``source``), converts them with
:func:`xmlgame.readers.prepare_from`, and checks the documents and labels against the recipe
before the prepared dataset is put in place: a copy with other counts is refused with a message
saying what was expected, what was found, and how to prepare it anyway under another name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from xmlgame import paths
from xmlgame.dataset import DEFAULT_A, DEFAULT_B, PreparedDataset, load_dataset
from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)

PECOS_URL = "https://archive.org/download/pecos-dataset/xmc-base/{}.tar.gz"
PECOS_PAGE = "https://github.com/amzn/pecos (README: 'Download and prepare datasets')"
PECOS_FILES = (
    "X.trn.txt", "X.tst.txt", "Y.trn.npz", "Y.tst.npz", "output-items.txt",
    "tfidf-attnxml/X.trn.npz", "tfidf-attnxml/X.tst.npz",
)
XC_REPOSITORY = "http://manikvarma.org/downloads/XC/XMLRepository.html"
DATA_README = "the xmlgame data README (data/README.md)"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Recipe:
    """One named dataset.

    Attributes:
        name: canonical name; also the prepared dataset's folder name.
        description: one line, ``input -> labels``.
        layout: the layout its files come in (one of ``xmlgame.readers.LAYOUTS``).
        train_docs, test_docs, labels: the counts a correct copy has.
        aliases: other accepted spellings (case, ``-`` and ``_`` are ignored anyway).
        urls: public download URLs; empty when the files cannot be fetched directly.
        files: the files (relative to the dataset folder) the layout reads.
        page: where the dataset is documented or offered by hand.
        origin: where the data comes from, for datasets without a download.
        bundled: a folder under ``xmlgame/bundled/`` holding the files, if they ship with xmlgame.
        propensity_a, propensity_b: the PSP@k constants A and B for this dataset.
    """

    name: str
    description: str
    layout: str
    train_docs: int
    test_docs: int
    labels: int
    aliases: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    page: str = ""
    origin: str = ""
    bundled: str = ""
    propensity_a: float = DEFAULT_A
    propensity_b: float = DEFAULT_B


# --------------------------------------------------------------------------------------------
# the registry


def all_recipes() -> tuple[Recipe, ...]:
    """Every known recipe, in display order."""
    from xmlgame.data_prep import RECIPES

    return RECIPES


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find(name: str) -> Recipe | None:
    """The recipe called ``name`` or one of its aliases (ignoring case, ``-`` and ``_``)."""
    wanted = _key(name)
    for recipe in all_recipes():
        if wanted in {_key(n) for n in (recipe.name, *recipe.aliases)}:
            return recipe
    return None


def names() -> list[str]:
    return [recipe.name for recipe in all_recipes()]


# --------------------------------------------------------------------------------------------
# prep


def prep(
    name: str,
    source: str | Path | None = None,
    out: str | Path | None = None,
    layout: str | None = None,
    propensity_a: float | None = None,
    propensity_b: float | None = None,
) -> PreparedDataset:
    """Prepare dataset ``name`` into ``out`` (default ``$XMLGAME_HOME/datasets/NAME``).

    Args:
        name: a recipe name or alias; any other name is the user's own data (needs ``source``).
        source: a local file or folder to convert instead of downloading.
        out: the prepared dataset folder.
        layout: force the input layout (default: the recipe's, or detected for own data).
        propensity_a, propensity_b: PSP constants (default: the recipe's, else 0.55 / 1.5).

    Raises:
        XmlgameError: unknown name without ``source``, no network (with what to download by
            hand), unreadable files, or counts that do not match the recipe.
    """
    recipe = find(name)
    if recipe is None:
        if source is None:
            raise XmlgameError(
                f"no recipe called {name!r}; known recipes: {', '.join(names())}. "
                f"To prepare your own data under this name: xmlgame prep {name} --from FILE_OR_DIR"
            )
        return _prep_own(name, Path(source), out, layout, propensity_a, propensity_b)

    out = Path(out) if out is not None else paths.datasets_dir() / recipe.name
    a = recipe.propensity_a if propensity_a is None else propensity_a
    b = recipe.propensity_b if propensity_b is None else propensity_b
    with ExitStack() as stack:
        if source is not None:
            folder, label = Path(source).expanduser(), str(source)
        elif recipe.bundled:
            folder = stack.enter_context(resources.as_file(_bundled(recipe.bundled)))
            label = f"xmlgame bundled copy ({recipe.bundled})"
        elif recipe.urls:
            folder, label = _download(recipe), " ".join(recipe.urls)
        else:
            raise XmlgameError(_how_to_get(recipe))
        folder = _locate(folder, recipe.files[:1])
        return _convert_and_check(recipe, folder, out, layout, a, b, label)


def _prep_own(name, source, out, layout, propensity_a, propensity_b) -> PreparedDataset:
    from xmlgame.readers import prepare_from

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise XmlgameError(
            f"{name!r} cannot be a dataset name; use letters, digits, '.', '_', '+' and '-' "
            "(it becomes a folder name)"
        )
    source = source.expanduser()
    if not source.exists():
        raise XmlgameError(f"--from {source}: no such file or folder")
    out = Path(out) if out is not None else paths.datasets_dir() / name
    return prepare_from(
        source, out, name=name, layout=layout,
        propensity_a=DEFAULT_A if propensity_a is None else propensity_a,
        propensity_b=DEFAULT_B if propensity_b is None else propensity_b,
        source_label=str(source),
    )


def _bundled(folder: str):
    return resources.files("xmlgame").joinpath("bundled", folder)


def _how_to_get(recipe: Recipe) -> str:
    lines = [f"{recipe.name} has no download xmlgame can fetch by itself."]
    if recipe.origin:
        lines.append(f"It comes from: {recipe.origin}.")
    if recipe.page:
        lines.append(f"Get it from: {recipe.page}")
    lines += [
        f"It is read in the {recipe.layout!r} layout ({', '.join(recipe.files)}), with "
        f"{recipe.train_docs:,} train / {recipe.test_docs:,} test documents and "
        f"{recipe.labels:,} labels.",
        f"Put those files in a folder DIR and run: xmlgame prep {recipe.name} --from DIR",
    ]
    return "\n".join(lines)


def _convert_and_check(
    recipe: Recipe, folder: Path, out: Path, layout: str | None, a: float, b: float, label: str
) -> PreparedDataset:
    """Convert into a hidden folder beside ``out``, check the counts, then move it into place."""
    from xmlgame.readers import prepare_from

    if not folder.exists():
        raise XmlgameError(f"--from {folder}: no such file or folder")
    if layout is None:
        _check_layout(recipe, folder)
    staging = out.parent / f".{out.name}.check-{uuid.uuid4().hex[:8]}"
    new_folders = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        dataset = prepare_from(
            folder, staging, name=recipe.name, layout=layout or recipe.layout,
            propensity_a=a, propensity_b=b, source_label=label,
        )
        _check_counts(recipe, dataset, folder, layout)
        _replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not out.exists():  # failed: drop the (empty) folders made for it
            for path in new_folders:
                if path.exists() and not any(path.iterdir()):
                    path.rmdir()
    return load_dataset(out)


def _check_layout(recipe: Recipe, folder: Path) -> None:
    """Refuse a folder that is plainly another layout, saying how to read it anyway."""
    from xmlgame.readers import detect_layout

    try:
        detected = detect_layout(folder)
    except XmlgameError:  # no layout or several: the reader's own message says more
        return
    if detected != recipe.layout:
        raise XmlgameError(
            f"{folder} holds the {detected!r} layout, while {recipe.name} comes in the "
            f"{recipe.layout!r} layout ({', '.join(recipe.files)}). If it is {recipe.name} in "
            f"another layout, add --layout {detected} (the counts are still checked); if it is "
            f"other data, give it its own name: xmlgame prep MY-NAME --from {folder}"
        )


def _check_counts(
    recipe: Recipe, dataset: PreparedDataset, folder: Path, layout: str | None
) -> None:
    counts = dataset.meta["counts"]
    found = {"train documents": counts["train_docs"], "test documents": counts["test_docs"],
             "labels": counts["labels"]}
    expected = {"train documents": recipe.train_docs, "test documents": recipe.test_docs,
                "labels": recipe.labels}
    wrong = [key for key in expected if found[key] != expected[key]]
    fewer_labels = found["labels"] < expected["labels"]
    if wrong == ["labels"] and fewer_labels and layout not in (None, recipe.layout):
        # label-list layouts only know labels that some document carries
        logger.warning(
            "%s: %s labels carry documents in this %s copy, of the %s the recipe lists",
            recipe.name, f"{found['labels']:,}", layout, f"{recipe.labels:,}",
        )
        return
    if wrong:
        detail = "; ".join(
            f"{key}: expected {expected[key]:,}, found {found[key]:,}" for key in wrong
        )
        raise XmlgameError(
            f"{folder} does not match the {recipe.name} recipe ({detail}). Check that the "
            f"files are complete and are the {recipe.layout!r} layout (another layout of the same "
            f"data: add --layout NAME). If this is a different version of {recipe.name}, "
            f"prepare it under your own name, which skips this check: xmlgame prep "
            f"my-{recipe.name} --from {folder} --A {recipe.propensity_a:g} "
            f"--B {recipe.propensity_b:g}"
        )


def _replace(staging: Path, out: Path) -> None:
    """Move a complete dataset folder to ``out``, replacing an older one there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _locate(folder: Path, markers: Sequence[str]) -> Path:
    """The folder holding ``markers[0]``: ``folder`` itself or a single subfolder up to 3 deep."""
    if not markers or not folder.is_dir() or (folder / markers[0]).exists():
        return folder
    marker = Path(markers[0]).name
    found = sorted(
        {p.parent for depth in ("*/", "*/*/", "*/*/*/") for p in folder.glob(depth + marker)}
    )
    if len(found) == 1:
        logger.info("found the %s files in %s", markers[0], found[0])
        return found[0]
    return folder


# --------------------------------------------------------------------------------------------
# downloads


def downloads_dir() -> Path:
    return paths.home() / "downloads"


def _download(recipe: Recipe) -> Path:
    """Fetch and unpack a recipe's files into the download cache; return the unpacked folder.

    The cache keeps ``downloads/NAME/files/`` (complete, renamed into place at the end); archives
    are deleted once unpacked. A failed download raises with what to fetch by hand.
    """
    from xmlgame import download

    root = downloads_dir() / recipe.name
    files = root / "files"
    if files.is_dir():
        logger.info("using the files downloaded earlier in %s", files)
        return files
    try:
        fetched = [download.fetch(url, root) for url in recipe.urls]
    except download.DownloadError as error:
        raise XmlgameError(_offline_message(recipe, error)) from None
    staging = root / f".files-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        for path in fetched:
            if path.name.endswith(ARCHIVE_SUFFIXES):
                download.extract(path, staging / _strip_archive_suffix(path.name))
            else:
                shutil.copy2(path, staging / path.name)
        os.replace(staging, files)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for path in fetched:
        path.unlink(missing_ok=True)  # the unpacked copy is what gets reused
    return files


def _strip_archive_suffix(filename: str) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def _offline_message(recipe: Recipe, error: Exception) -> str:
    urls = "\n".join(f"  {url}" for url in recipe.urls)
    return (
        f"{error}\n"
        f"Nothing was written. To prepare {recipe.name} without downloading here, fetch\n"
        f"{urls}\n"
        f"on a machine with network access, unpack it into a folder DIR holding "
        f"{', '.join(recipe.files)}, then run:\n"
        f"  xmlgame prep {recipe.name} --from DIR"
    )


# --------------------------------------------------------------------------------------------
# reports


def format_recipe_table() -> str:
    """The known recipes: name, layout, counts, propensity A/B and source."""
    header = ("name", "layout", "train", "test", "labels", "A/B", "source")
    rows = [
        (
            recipe.name, recipe.layout, f"{recipe.train_docs:,}", f"{recipe.test_docs:,}",
            f"{recipe.labels:,}", f"{recipe.propensity_a:g}/{recipe.propensity_b:g}",
            _short_source(recipe),
        )
        for recipe in all_recipes()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    right = {2, 3, 4}

    def line(row):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        return "  ".join([*cells, row[-1]]).rstrip()

    lines = [line(header), *(line(row) for row in rows)]
    lines += [
        "",
        "Also: `xmlgame prep synthetic --labels L --train-docs N --test-docs M` (generated data "
        "of any size),",
        "and `xmlgame prep MY-NAME --from FILE_OR_DIR` for your own data (layout detected).",
    ]
    return "\n".join(lines)


def _short_source(recipe: Recipe) -> str:
    if recipe.bundled:
        return "bundled (offline)"
    if recipe.urls:
        return recipe.urls[0] + (f" (+{len(recipe.urls) - 1})" if len(recipe.urls) > 1 else "")
    page = recipe.page.split()[0] if recipe.page else "see data/README.md"
    return f"--from DIR: {page}"


def format_summary(dataset: PreparedDataset) -> str:
    """A short report on a prepared dataset: sizes, label coverage, features and path."""
    meta, counts = dataset.meta, dataset.meta["counts"]
    rows = [
        ("dataset", f"{dataset.name} (from {meta.get('layout', '?')} layout)"),
        ("train docs", _docs(counts, "train")),
        ("test docs", _docs(counts, "test")),
        (
            "labels",
            f"{counts['labels']:,} ({counts['labels_in_train']:,} seen in train, "
            f"{counts['labels_only_in_test']:,} only in test holding "
            f"{counts['test_assignments_of_unseen_labels']:,} test assignments)",
        ),
        (
            "assignments",
            f"train {counts['train_label_assignments']:,} "
            f"({_ratio(counts['train_label_assignments'], counts['train_docs'])} labels/doc), "
            f"test {counts['test_label_assignments']:,} "
            f"({_ratio(counts['test_label_assignments'], counts['test_docs'])} labels/doc)",
        ),
        ("inputs", _inputs(meta, counts)),
        ("propensity", f"A = {meta['propensity']['A']:g}, B = {meta['propensity']['B']:g}"),
        ("path", str(dataset.path)),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


def _docs(counts: dict, split: str) -> str:
    empty = counts[f"{split}_docs_without_labels"]
    return f"{counts[f'{split}_docs']:,} ({empty:,} without labels)"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


def _inputs(meta: dict, counts: dict) -> str:
    parts = []
    if meta.get("has_texts"):
        parts.append("texts")
    if meta.get("has_features"):
        parts.append(f"{counts.get('features', 0):,} sparse features")
    if meta.get("has_label_texts"):
        parts.append("label texts")
    return ", ".join(parts) or "labels only"
