"""AttentionXML layout: ``{train,test}_texts.txt`` with ``{train,test}_labels.txt``.

Line ``i`` of a texts file is one document; line ``i`` of the matching labels file holds its
labels as space-separated strings (``earn acq``). This is how AttentionXML, LightXML and
CascadeXML ship EUR-Lex, Wiki10 and AmazonCat.

Decisions on what real files hold:

- A blank line in a texts file is an empty text, not a skipped line: the two files are matched
  by line number, so skipping would shift every later document onto the wrong labels.
- A blank (or all-space) labels line is a document without labels; it is kept.
- Labels are split on any run of whitespace, so trailing spaces and tabs make no empty labels.
- A label repeated on one line counts once.
- Texts keep their content as is; only the line ending (``\\n`` or ``\\r\\n``) is removed.
- A texts file and its labels file with different line counts is an error naming the shorter
  file and the line where its next document was expected.
- Label ids follow first appearance, training files first; a label seen only in test keeps an
  id with a training count of 0 (the label space is the union of both splits).
- When ``train_raw_texts.txt`` and ``test_raw_texts.txt`` are also present (LightXML ships
  both), the raw texts are read: a transformer wants the untokenised text.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xmlgame.readers.common import (
    WriterOptions,
    missing_files,
    paired_lines,
    read_lines,
    require_files,
)

logger = logging.getLogger(__name__)

LAYOUT = "attentionxml"
REQUIRED = ("train_texts.txt", "train_labels.txt", "test_texts.txt", "test_labels.txt")
DESCRIPTION = "train_texts.txt, train_labels.txt, test_texts.txt, test_labels.txt"


def missing(source: Path) -> list[str]:
    return missing_files(source, REQUIRED)


def texts_file(source: Path, split: str) -> Path:
    """``{split}_raw_texts.txt`` when both splits have raw texts, else ``{split}_texts.txt``."""
    if all((source / f"{s}_raw_texts.txt").is_file() for s in ("train", "test")):
        return source / f"{split}_raw_texts.txt"
    return source / f"{split}_texts.txt"


def prepare(source: Path, out: Path, options: WriterOptions) -> None:
    require_files(source, LAYOUT, REQUIRED)
    pairs = [(texts_file(source, s), source / f"{s}_labels.txt") for s in ("train", "test")]
    if pairs[0][0].name.endswith("_raw_texts.txt"):
        logger.info("reading *_raw_texts.txt rather than the tokenised *_texts.txt")
    inputs = [path for pair in pairs for path in pair]
    with options.open(out, LAYOUT, with_texts=True, input_files=inputs) as writer:
        for split, (texts, labels) in zip(("train", "test"), pairs, strict=True):
            add, label_id = writer.split(split).add, writer.vocab.add
            lines = paired_lines(texts, read_lines(texts), labels, read_lines(labels))
            for _, text, names in lines:
                add([label_id(label) for label in names.split()], text=text)
