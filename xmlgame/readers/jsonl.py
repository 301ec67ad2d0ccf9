"""JSON lines: a user's own data, one ``{"text": ..., "labels": [...]}`` object per line.

Two ways to give it:

- a folder with ``train.jsonl`` and ``test.jsonl`` (each may be ``.jsonl.gz``), and optionally
  ``label_texts.jsonl`` with one ``{"label": ..., "text": ...}`` per label;
- a single ``.jsonl`` (or ``.jsonl.gz``, ``.ndjson``) file, split deterministically: a document
  goes to test when the first 8 bytes of the BLAKE2b hash of its key, read as a big-endian
  integer, are 0-19 modulo 100 (about 20% test). The key is the record's ``"id"`` field as a
  string when it has one, else its 1-based line number. The same file always gives the same
  split, and a record keeps its side when others are added, as long as records carry ids.

Decisions on what real files hold:

- Blank (or all-space) lines are skipped: a JSON lines file has no line alignment to keep.
- Every other line must be a JSON object with ``"text"`` (a string) and ``"labels"`` (a list
  of non-empty strings; an empty list is a document without labels and is kept). Invalid JSON,
  a missing field, a wrong type or an empty label name is an error at its line. Other fields
  are ignored, except ``"id"`` for the single-file split.
- A label repeated in one list counts once. Texts are stored exactly as decoded (a ``\\r``
  inside a JSON string stays); a CRLF line ending is removed before decoding.
- Label ids follow first appearance, training file first; a label seen only in test keeps an
  id with a training count of 0 (the label space is the union of both splits).
- ``label_texts.jsonl``: entries for labels that no document uses are ignored (the label space
  is what the documents use), a label without an entry gets its name as its text, and a label
  given twice is an error (which text is meant is ambiguous). Both counts are logged.
- A gzip file is recognised by its first bytes; a truncated one is an error at the line reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from xmlgame.errors import DataFormatError, XmlgameError
from xmlgame.readers.common import WriterOptions, read_lines

logger = logging.getLogger(__name__)

LAYOUT = "jsonl"
REQUIRED = ("train.jsonl", "test.jsonl")
DESCRIPTION = (
    "train.jsonl, test.jsonl (or .jsonl.gz; optional: label_texts.jsonl), or a single .jsonl "
    'file; one {"text": ..., "labels": [...]} per line'
)
SINGLE_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
TEST_PERCENT = 20
EXAMPLE = 'one JSON object per line, e.g. {"text": "a cat", "labels": ["cats", "pets"]}'


def find(source: Path, stem: str) -> Path | None:
    """``stem.jsonl`` or ``stem.jsonl.gz`` in the folder ``source``."""
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (source / name).is_file():
            return source / name
    return None


def is_single_file(source: Path) -> bool:
    return source.is_file() and source.name.lower().endswith(SINGLE_FILE_SUFFIXES)


def missing(source: Path) -> list[str]:
    if source.is_file():
        return [] if is_single_file(source) else ["a .jsonl or .jsonl.gz file"]
    return [name for name in REQUIRED if find(source, name[: -len(".jsonl")]) is None]


def is_test(key: str) -> bool:
    """The single-file split: about TEST_PERCENT% of keys, fixed by their hash."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < TEST_PERCENT


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for each document line, checked."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        record = parse_object(path, lineno, line)
        labels = record.get("labels")
        if "labels" not in record:
            raise DataFormatError(path, lineno, 'no "labels" field', EXAMPLE)
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise DataFormatError(
                path, lineno, f'"labels" is {_clip(labels)}',
                'a list of non-empty label strings, e.g. "labels": ["cats", "pets"] '
                "(or [] for none)",
            )
        if not isinstance(record.get("text"), str):
            problem = 'no "text" field' if "text" not in record else '"text" is not a string'
            raise DataFormatError(path, lineno, problem, EXAMPLE)
        yield lineno, record


def parse_object(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})", EXAMPLE
        ) from None
    if not isinstance(record, dict):
        raise DataFormatError(path, lineno, f"a JSON {type(record).__name__}", EXAMPLE)
    return record


def prepare(source: Path, out: Path, options: WriterOptions) -> None:
    if source.is_file():
        _prepare_single(source, out, options)
        return
    train, test = find(source, "train"), find(source, "test")
    if train is None or test is None:
        raise XmlgameError(f"{source} is not a JSON lines folder: it needs {DESCRIPTION}")
    label_texts = find(source, "label_texts")
    inputs = [train, test] + ([label_texts] if label_texts else [])
    with options.open(out, LAYOUT, with_texts=True, input_files=inputs) as writer:
        for split, path in (("train", train), ("test", test)):
            add, label_id = writer.split(split).add, writer.vocab.add
            for _, record in read_records(path):
                add([label_id(label) for label in record["labels"]], text=record["text"])
        if label_texts is not None:
            writer.set_label_texts(read_label_texts(label_texts, writer.vocab))


def _prepare_single(source: Path, out: Path, options: WriterOptions) -> None:
    split_rule = (
        f"single file: test when blake2b-64(id, else line number) % 100 < {TEST_PERCENT}"
    )
    with options.open(
        out, LAYOUT, with_texts=True, input_files=[source], extra_meta={"split": split_rule}
    ) as writer:
        label_id = writer.vocab.add
        for lineno, record in read_records(source):
            key = str(record["id"]) if "id" in record else str(lineno)
            target = writer.test if is_test(key) else writer.train
            target.add([label_id(label) for label in record["labels"]], text=record["text"])
    logger.info("split %s by hash: %s", source.name, split_rule)


def read_label_texts(path: Path, vocab) -> list[str]:
    """One text per label id in ``vocab``; a label without an entry gets its name."""
    texts: list[str | None] = [None] * len(vocab)
    seen_at: dict[int, int] = {}
    unused = 0
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        entry = parse_object(path, lineno, line)
        label, text = entry.get("label"), entry.get("text")
        if not isinstance(label, str) or not isinstance(text, str):
            raise DataFormatError(
                path, lineno, 'no string "label" and "text" fields',
                'one {"label": "cats", "text": "domestic cats"} per line',
            )
        label_id = vocab.get(label)
        if label_id is None:
            unused += 1
            continue
        if label_id in seen_at:
            raise DataFormatError(
                path, lineno, f"label {label!r} already has a text (line {seen_at[label_id]})",
                "one entry per label",
            )
        seen_at[label_id] = lineno
        texts[label_id] = text
    without = sum(text is None for text in texts)
    if unused or without:
        logger.warning(
            "%s: %d entries name labels no document uses (ignored); %d labels have no entry "
            "(their name is their text)", path.name, unused, without,
        )
    return [name if text is None else text for name, text in zip(vocab.names, texts, strict=True)]


def _clip(value, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."
