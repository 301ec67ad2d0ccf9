"""The prepared dataset: xmlgame's on-disk format and its atomic writer.

A prepared dataset is a folder; every later command reads only this folder::

    meta.json                     name, source layout, counts, propensity A/B, input checksum,
                                  format version (written last: no meta.json, no dataset)
    train.texts.bin               UTF-8 texts, concatenated (absent for feature-only sources)
    train.texts.offsets.npy       int64 (n + 1,): text i is bin[offsets[i]:offsets[i + 1]]
    train.Y.npz                   scipy CSR (n, L) float32, 1.0 per relevant label
    train.X.npz                   scipy CSR (n, F) float32 features (when the source has them)
    test.*                        the same for the test split
    labels.names.bin/.offsets.npy label names, in label-id order
    labels.texts.bin/.offsets.npy label texts (when the source has them)
    labels.counts.npy             int64 (2, L): training and test documents per label

Texts and label names are memory-mapped string columns: loading a dataset with 3M labels costs
two small arrays, not millions of Python strings. The label space is the union of the labels seen
in training and in test; a label seen only in test keeps its id with a training count of 0 (it is
a guaranteed miss for every method and still gets a propensity).

Writes are atomic: :class:`DatasetWriter` fills a hidden temporary folder beside the target and
renames it into place only after every file, ``meta.json`` last, is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmlgame.errors import XmlgameError

FORMAT_VERSION = 1
SPLITS = ("train", "test")
DEFAULT_A, DEFAULT_B = 0.55, 1.5


# --------------------------------------------------------------------------------------------
# string columns


class TextColumn(Sequence):
    """A read-only, memory-mapped column of UTF-8 strings (``column[i] -> str``)."""

    def __init__(self, bin_path: Path, offsets_path: Path):
        self.offsets = np.load(offsets_path, mmap_mode="r")
        size = int(self.offsets[-1]) if len(self.offsets) else 0
        # np.memmap cannot map an empty file
        self._bytes = np.memmap(bin_path, dtype=np.uint8, mode="r") if size else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self._bytes[start:end]).decode("utf-8")


class TextColumnWriter:
    """Appends strings to a ``.bin`` file and records their offsets."""

    def __init__(self, bin_path: Path):
        self.bin_path = bin_path
        self._file = open(bin_path, "wb")
        self._offsets = array("q", [0])

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.append(text)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def close(self) -> None:
        self._file.close()
        offsets_path = self.bin_path.with_suffix(".offsets.npy")
        np.save(offsets_path, np.frombuffer(self._offsets, dtype=np.int64))


def write_text_column(bin_path: Path, texts: Iterable[str]) -> None:
    writer = TextColumnWriter(bin_path)
    writer.extend(texts)
    writer.close()


def read_text_column(folder: Path, stem: str) -> TextColumn | None:
    bin_path = folder / f"{stem}.bin"
    if not bin_path.exists():
        return None
    return TextColumn(bin_path, folder / f"{stem}.offsets.npy")


# --------------------------------------------------------------------------------------------
# label vocabulary


class LabelVocab:
    """Maps label names to ids in order of first appearance (used while preparing only)."""

    def __init__(self, names: Iterable[str] = ()):
        self.names: list[str] = []
        self._ids: dict[str, int] = {}
        for name in names:
            self.add(name)

    def add(self, name: str) -> int:
        label_id = self._ids.get(name)
        if label_id is None:
            label_id = self._ids[name] = len(self.names)
            self.names.append(name)
        return label_id

    def get(self, name: str) -> int | None:
        return self._ids.get(name)

    def __len__(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------------------------
# split accumulation


class CsrBuilder:
    """Builds a CSR matrix row by row (or block by block) in compact growing arrays."""

    def __init__(self, binary: bool):
        self.binary = binary
        self.indptr = array("q", [0])
        self.indices = array("q")
        self.data = array("f")

    def add_row(self, ids: Sequence[int], values: Sequence[float] | None = None) -> None:
        self.indices.extend(ids)
        if values is None or self.binary:
            self.data.extend([1.0] * len(ids))
        else:
            self.data.extend(values)
        self.indptr.append(len(self.indices))

    def add_block(self, block: sp.csr_matrix) -> None:
        block = sp.csr_matrix(block)
        base = self.indptr[-1]
        self.indices.extend(block.indices.astype(np.int64))
        self.data.extend(block.data.astype(np.float32))
        self.indptr.extend(block.indptr[1:].astype(np.int64) + base)

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    def build(self, n_cols: int) -> sp.csr_matrix:
        indices = np.frombuffer(self.indices, dtype=np.int64)
        index_dtype = np.int32 if n_cols < 2**31 and len(indices) < 2**31 else np.int64
        matrix = sp.csr_matrix(
            (
                np.frombuffer(self.data, dtype=np.float32),
                indices.astype(index_dtype),
                np.frombuffer(self.indptr, dtype=np.int64).astype(index_dtype),
            ),
            shape=(self.rows, n_cols),
        )
        matrix.sum_duplicates()
        if self.binary:  # a label listed twice on one line counts once
            matrix.data[:] = 1.0
        return matrix


@dataclass
class SplitWriter:
    """Collects one split's documents: text, label ids and optional sparse features."""

    folder: Path
    name: str
    with_texts: bool
    with_features: bool
    labels: CsrBuilder = field(default_factory=lambda: CsrBuilder(binary=True))
    features: CsrBuilder = field(default_factory=lambda: CsrBuilder(binary=False))
    texts: TextColumnWriter | None = None

    def __post_init__(self):
        if self.with_texts:
            self.texts = TextColumnWriter(self.folder / f"{self.name}.texts.bin")

    def add(
        self,
        label_ids: Sequence[int],
        text: str | None = None,
        feature_ids: Sequence[int] | None = None,
        feature_values: Sequence[float] | None = None,
    ) -> None:
        if self.with_texts:
            self.texts.append(text if text is not None else "")
        if self.with_features:
            self.features.add_row(
                () if feature_ids is None else feature_ids,
                () if feature_values is None else feature_values,
            )
        self.labels.add_row(label_ids)

    def add_block(
        self, labels: sp.csr_matrix, texts: Sequence[str] | None = None,
        features: sp.csr_matrix | None = None,
    ) -> None:
        """Add many documents at once (used by the synthetic generator)."""
        if self.with_texts:
            self.texts.extend(texts)
        if self.with_features:
            self.features.add_block(features)
        self.labels.add_block(labels)

    @property
    def n_docs(self) -> int:
        return self.labels.rows


class DatasetWriter:
    """Writes a prepared dataset atomically.

    Use as a context manager; on a clean exit the temporary folder is renamed to ``path``,
    replacing an older dataset of that name. On an exception (or Ctrl-C) it is deleted::

        with DatasetWriter(path, name="toy", layout="jsonl", with_texts=True) as writer:
            label_id = writer.vocab.add("cats")
            writer.train.add([label_id], text="a cat")
            ...
            writer.set_label_names(writer.vocab.names)
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        layout: str,
        with_texts: bool,
        with_features: bool = False,
        source: str = "",
        propensity_a: float = DEFAULT_A,
        propensity_b: float = DEFAULT_B,
        input_files: Sequence[Path] = (),
        extra_meta: dict | None = None,
    ):
        self.path = Path(path)
        self.name = name
        self.layout = layout
        self.source = source
        self.propensity = {"A": float(propensity_a), "B": float(propensity_b)}
        self.input_files = [Path(p) for p in input_files]
        self.extra_meta = dict(extra_meta or {})
        self.with_texts = with_texts
        self.with_features = with_features
        self.vocab = LabelVocab()
        self.n_features: int | None = None
        self._label_names: Sequence[str] | None = None
        self._label_texts: Sequence[str] | None = None
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> DatasetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        self.train = SplitWriter(self.tmp, "train", self.with_texts, self.with_features)
        self.test = SplitWriter(self.tmp, "test", self.with_texts, self.with_features)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
                self._commit()
        finally:
            for split in (self.train, self.test):
                if split.texts is not None:
                    split.texts._file.close()
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    def split(self, name: str) -> SplitWriter:
        return {"train": self.train, "test": self.test}[name]

    def set_label_names(self, names: Sequence[str]) -> None:
        self._label_names = names

    def set_label_texts(self, texts: Sequence[str]) -> None:
        self._label_texts = texts

    # finishing

    def _finish(self) -> None:
        names = self._label_names if self._label_names is not None else self.vocab.names
        n_labels = len(names)
        counts = np.zeros((2, n_labels), dtype=np.int64)
        meta_counts: dict[str, int] = {"labels": n_labels}
        for row, split in enumerate((self.train, self.test)):
            if split.texts is not None:
                split.texts.close()
            labels = split.labels.build(n_labels)
            sp.save_npz(self.tmp / f"{split.name}.Y.npz", labels, compressed=False)
            counts[row] = np.bincount(labels.indices, minlength=n_labels)
            meta_counts[f"{split.name}_docs"] = labels.shape[0]
            meta_counts[f"{split.name}_label_assignments"] = int(labels.nnz)
            meta_counts[f"{split.name}_docs_without_labels"] = int(
                (np.diff(labels.indptr) == 0).sum()
            )
            if self.with_features:
                features = split.features.build(self._feature_count())
                sp.save_npz(self.tmp / f"{split.name}.X.npz", features, compressed=False)
        meta_counts["labels_in_train"] = int((counts[0] > 0).sum())
        meta_counts["labels_only_in_test"] = int(((counts[0] == 0) & (counts[1] > 0)).sum())
        meta_counts["test_assignments_of_unseen_labels"] = int(counts[1][counts[0] == 0].sum())
        if self.with_features:
            meta_counts["features"] = self._feature_count()
        np.save(self.tmp / "labels.counts.npy", counts)
        write_text_column(self.tmp / "labels.names.bin", names)
        if self._label_texts is not None:
            if len(self._label_texts) != n_labels:
                raise XmlgameError(
                    f"{len(self._label_texts)} label texts for {n_labels} labels; "
                    "give one text per label"
                )
            write_text_column(self.tmp / "labels.texts.bin", self._label_texts)
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "layout": self.layout,
            "source": self.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": meta_counts,
            "propensity": self.propensity,
            "has_texts": self.with_texts,
            "has_features": self.with_features,
            "has_label_texts": self._label_texts is not None,
            "input_checksum": checksum_files(self.input_files),
            **self.extra_meta,
        }
        # meta.json last: its presence marks a complete dataset
        with open(self.tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)

    def _feature_count(self) -> int:
        if self.n_features is not None:
            return self.n_features
        largest = max(
            (max(s.features.indices) + 1 if len(s.features.indices) else 0)
            for s in (self.train, self.test)
        )
        self.n_features = int(largest)
        return self.n_features

    def _commit(self) -> None:
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def checksum_files(paths: Sequence[Path]) -> str:
    """BLAKE2b over the names and bytes of the input files, in the given order."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return "blake2b:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------
# loading


class Split:
    """One split of a prepared dataset; matrices load on first use."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.name = name
        self.texts: TextColumn | None = read_text_column(folder, f"{name}.texts")
        self._Y: sp.csr_matrix | None = None
        self._X: sp.csr_matrix | None = None

    @property
    def Y(self) -> sp.csr_matrix:  # noqa: N802 (the field's usual name)
        """(n, L) float32 CSR label matrix."""
        if self._Y is None:
            self._Y = sp.load_npz(self.folder / f"{self.name}.Y.npz").tocsr()
        return self._Y

    @property
    def X(self) -> sp.csr_matrix | None:  # noqa: N802
        """(n, F) float32 CSR features, or None when the source has none."""
        path = self.folder / f"{self.name}.X.npz"
        if self._X is None and path.exists():
            self._X = sp.load_npz(path).tocsr()
        return self._X

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return self.Y.shape[0]


class PreparedDataset:
    """A prepared dataset folder, opened for reading.

    Attributes:
        path: the folder.
        meta: the parsed ``meta.json``.
        train, test: :class:`Split` objects (``texts``, ``Y``, ``X``).
        label_names: memory-mapped :class:`TextColumn` of the L label names.
        label_texts: label texts, or None.
        train_counts, test_counts: int64 (L,) documents per label.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise XmlgameError(
                f"{self.path} is not a prepared dataset (no meta.json); "
                "prepare it with `xmlgame prep NAME --from DIR`"
            )
        with open(meta_path) as f:
            self.meta = json.load(f)
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise XmlgameError(
                f"{self.path} has dataset format version {version}, this xmlgame reads version "
                f"{FORMAT_VERSION}; prepare the dataset again with `xmlgame prep`"
            )
        self.train = Split(self.path, "train")
        self.test = Split(self.path, "test")
        self.label_names = read_text_column(self.path, "labels.names")
        self.label_texts = read_text_column(self.path, "labels.texts")
        counts = np.load(self.path / "labels.counts.npy")
        self.train_counts, self.test_counts = counts[0], counts[1]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def n_labels(self) -> int:
        return int(self.meta["counts"]["labels"])

    @property
    def propensity_ab(self) -> tuple[float, float]:
        return self.meta["propensity"]["A"], self.meta["propensity"]["B"]

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise XmlgameError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return self.train if name == "train" else self.test

    def __repr__(self) -> str:
        c = self.meta["counts"]
        return (
            f"PreparedDataset({self.name!r}: {c['train_docs']:,} train / {c['test_docs']:,} test "
            f"documents, {c['labels']:,} labels)"
        )


def load_dataset(path: str | Path) -> PreparedDataset:
    return PreparedDataset(path)
