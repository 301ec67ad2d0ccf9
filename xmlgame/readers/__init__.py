"""Readers for the dataset layouts users bring, each writing xmlgame's prepared format.

=============  ===========================================================================
layout         files (in one folder unless said otherwise)
=============  ===========================================================================
pecos          X.trn.txt, X.tst.txt, Y.trn.npz, Y.tst.npz [tfidf-attnxml/X.*.npz,
               output-items.txt]
attentionxml   train_texts.txt, train_labels.txt, test_texts.txt, test_labels.txt
xc-bow         train.txt, test.txt (header ``N D L``, lines ``l1,l2 f:v f:v``) [labels.txt]
lf             trn_X.txt, tst_X.txt, Y.txt, trn_X_Y.txt, tst_X_Y.txt [Y.ids.txt]
jsonl          train.jsonl, test.jsonl (or .gz) [label_texts.jsonl], or one .jsonl file
=============  ===========================================================================

Each layout's module documents how it treats what real files hold (blank lines, CRLF, empty
label lists, ids out of range, ...). Every malformed input raises
:class:`xmlgame.errors.DataFormatError` naming the file and the 1-based line, and nothing is
left on disk: :class:`xmlgame.dataset.DatasetWriter` only renames its finished folder into place.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from xmlgame.dataset import PreparedDataset, load_dataset
from xmlgame.errors import XmlgameError
from xmlgame.readers import attentionxml, jsonl, lf, pecos, xc_bow
from xmlgame.readers.common import WriterOptions

logger = logging.getLogger(__name__)

_READERS = {module.LAYOUT: module for module in (pecos, attentionxml, xc_bow, lf, jsonl)}
LAYOUTS: tuple[str, ...] = tuple(_READERS)


def detect_layout(source: Path) -> str:
    """The layout of ``source`` (a folder, or a single JSON lines file), from its file names.

    Raises:
        XmlgameError: nothing matches (the message lists what each layout needs and what a
            partly matching layout lacks), or several layouts match.
    """
    source = Path(source)
    if not source.exists():
        raise XmlgameError(f"{source} does not exist; give a folder or a .jsonl file")
    found = [name for name, module in _READERS.items() if not module.missing(source)]
    if len(found) == 1:
        return found[0]
    if found:
        raise XmlgameError(
            f"{source} matches several layouts ({', '.join(found)}); choose one with --layout"
        )
    lines = [f"  {name:<13} {module.DESCRIPTION}" for name, module in _READERS.items()]
    partial = [
        f"{name} lacks {', '.join(module.missing(source))}"
        for name, module in _READERS.items()
        if source.is_dir() and len(module.missing(source)) < len(module.REQUIRED)
    ]
    hint = f" (closest: {'; '.join(partial)})" if partial else ""
    inside = _layouts_of_subfolders(source)
    if inside:
        hint += f" (a folder inside matches: {', '.join(inside)}; give that folder)"
    raise XmlgameError(
        f"cannot tell the layout of {source}{hint}. Supported layouts and their files:\n"
        + "\n".join(lines)
    )


def _layouts_of_subfolders(source: Path) -> list[str]:
    """Each immediate subfolder that matches one layout, as ``"name (layout)"``."""
    if not source.is_dir():
        return []
    found = []
    for sub in sorted(p for p in source.iterdir() if p.is_dir()):
        layouts = [name for name, module in _READERS.items() if not module.missing(sub)]
        if len(layouts) == 1:
            found.append(f"{sub.name} ({layouts[0]})")
    return found


def prepare_from(
    source: Path,
    out: Path,
    *,
    name: str,
    layout: str | None = None,
    propensity_a: float = 0.55,
    propensity_b: float = 1.5,
    source_label: str = "",
) -> PreparedDataset:
    """Read ``source`` in ``layout`` (default: detected) and write a prepared dataset to ``out``.

    The files are streamed through :class:`xmlgame.dataset.DatasetWriter`, which records their
    checksum and the propensity constants A and B in ``meta.json``; ``source_label`` (default:
    the source path) is stored as the dataset's source. On any error ``out`` is left as it was.

    Returns:
        The prepared dataset, loaded from ``out``.
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if layout is None:
        layout = detect_layout(source)
    elif layout not in _READERS:
        raise XmlgameError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    elif not source.exists():
        raise XmlgameError(f"{source} does not exist; give a folder or a .jsonl file")
    options = WriterOptions(
        name=name, source_label=source_label or str(source),
        propensity_a=propensity_a, propensity_b=propensity_b,
    )
    start = time.perf_counter()
    _READERS[layout].prepare(source, out, options)
    dataset = load_dataset(out)
    logger.info("prepared %r from %s (%s) in %.1fs", dataset, source, layout,
                time.perf_counter() - start)
    return dataset
