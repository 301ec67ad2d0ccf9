"""Malformed inputs: each raises DataFormatError naming the file and the 1-based line, and leaves
nothing on disk (no output folder, no hidden temporary folder beside it)."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmlgame.errors import DataFormatError
from xmlgame.readers import prepare_from


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def xc_bow(folder: Path, train: list[str], test: list[str] | None = None) -> Path:
    write(folder / "train.txt", train)
    write(folder / "test.txt", test or ["1 4 3", "0 0:1"])
    return folder


def lf(folder: Path, train_labels: list[str], train_texts: list[str] | None = None,
       label_texts: list[str] | None = None) -> Path:
    write(folder / "trn_X.txt", train_texts or ["one", "two"])
    write(folder / "trn_X_Y.txt", train_labels)
    write(folder / "tst_X.txt", ["three"])
    write(folder / "tst_X_Y.txt", ["1 3", "2:1.0"])
    write(folder / "Y.txt", label_texts or ["a", "b", "c"])
    return folder


def attentionxml(folder: Path, train_texts: list[str], train_labels: list[str]) -> Path:
    write(folder / "train_texts.txt", train_texts)
    write(folder / "train_labels.txt", train_labels)
    write(folder / "test_texts.txt", ["a test text"])
    write(folder / "test_labels.txt", ["x"])
    return folder


def jsonl(folder: Path, train: list[str]) -> Path:
    write(folder / "train.jsonl", train)
    write(folder / "test.jsonl", [json.dumps({"text": "t", "labels": ["x"]})])
    return folder


def pecos(folder: Path, train_texts: list[str], names: list[str] | None = None) -> Path:
    write(folder / "X.trn.txt", train_texts)
    write(folder / "X.tst.txt", ["test"])
    sp.save_npz(folder / "Y.trn.npz", sp.csr_matrix(np.eye(3, 2, dtype=np.float32)))
    sp.save_npz(folder / "Y.tst.npz", sp.csr_matrix(np.ones((1, 2), dtype=np.float32)))
    if names is not None:
        write(folder / "output-items.txt", names)
    return folder


GOOD = '{"text": "fine", "labels": ["x"]}'

# (case id, builder of the source folder, file named in the error, line named in the error)
CASES = [
    # XC repository BoW
    ("bow-label-not-integer", lambda d: xc_bow(d, ["2 4 3", "0 0:1", "1,b 2:1"]), "train.txt", 3),
    ("bow-label-out-of-range", lambda d: xc_bow(d, ["2 4 3", "0,3 0:1", "1 2:1"]), "train.txt", 2),
    ("bow-bad-pair", lambda d: xc_bow(d, ["2 4 3", "0 0:1", "1 2:1 3=1"]), "train.txt", 3),
    ("bow-bad-value", lambda d: xc_bow(d, ["2 4 3", "0 0:1 1:x", "1 2:1"]), "train.txt", 2),
    ("bow-nan-value", lambda d: xc_bow(d, ["1 4 3", "0 0:nan"]), "train.txt", 2),
    ("bow-feature-out-of-range", lambda d: xc_bow(d, ["2 4 3", "0 0:1", "1 4:1"]), "train.txt", 3),
    ("bow-header-too-few", lambda d: xc_bow(d, ["3 4 3", "0 0:1", "1 2:1"]), "train.txt", 4),
    ("bow-header-too-many", lambda d: xc_bow(d, ["1 4 3", "0 0:1", "1 2:1"]), "train.txt", 3),
    ("bow-bad-header", lambda d: xc_bow(d, ["2 4", "0 0:1", "1 2:1"]), "train.txt", 1),
    ("bow-headers-disagree", lambda d: xc_bow(d, ["1 4 3", "0 0:1"], ["1 4 9", "0 0:1"]),
     "test.txt", 1),
    # LF
    ("lf-label-out-of-range", lambda d: lf(d, ["2 3", "0:1.0", "3:1.0"]), "trn_X_Y.txt", 3),
    ("lf-label-not-integer", lambda d: lf(d, ["2 3", "a:1.0", "1:1.0"]), "trn_X_Y.txt", 2),
    ("lf-bad-pair", lambda d: lf(d, ["2 3", "0:1.0", "1:1.0 2"]), "trn_X_Y.txt", 3),
    ("lf-header-too-few", lambda d: lf(d, ["3 3", "0:1", "1:1"], ["a", "b"]), "trn_X_Y.txt", 4),
    ("lf-header-too-many",
     lambda d: lf(d, ["1 3", "0:1", "1:1"], ["a", "b"]), "trn_X_Y.txt", 3),
    ("lf-texts-longer", lambda d: lf(d, ["2 3", "0:1", "1:1"], ["a", "b", "c"]),
     "trn_X_Y.txt", 4),
    ("lf-no-label-lines", lambda d: lf(d, ["2 3"]), "trn_X_Y.txt", 2),
    ("lf-texts-shorter", lambda d: lf(d, ["2 3", "0:1", "1:1"], ["a"]), "trn_X.txt", 2),
    ("lf-label-texts-short", lambda d: lf(d, ["2 3", "0:1", "1:1"], None, ["a", "b"]),
     "Y.txt", 3),
    # AttentionXML
    ("axml-labels-shorter", lambda d: attentionxml(d, ["a", "", "c"], ["x", "y"]),
     "train_labels.txt", 3),
    ("axml-texts-shorter", lambda d: attentionxml(d, ["a"], ["x", "y", "z"]),
     "train_texts.txt", 2),
    # PECOS
    ("pecos-texts-longer", lambda d: pecos(d, ["a", "b", "c", "d"]), "X.trn.txt", 4),
    ("pecos-texts-shorter", lambda d: pecos(d, ["a", "b"]), "X.trn.txt", 3),
    ("pecos-names-longer", lambda d: pecos(d, ["a", "b", "c"], ["x", "y", "z"]),
     "output-items.txt", 3),
    # JSON lines
    ("jsonl-invalid-json", lambda d: jsonl(d, [GOOD, "", '{"text": "a", "labels": [}']),
     "train.jsonl", 3),
    ("jsonl-no-labels", lambda d: jsonl(d, [GOOD, '{"text": "a"}']), "train.jsonl", 2),
    ("jsonl-labels-not-list", lambda d: jsonl(d, ['{"text": "a", "labels": "x"}']),
     "train.jsonl", 1),
    ("jsonl-labels-not-strings", lambda d: jsonl(d, [GOOD, GOOD, '{"text": "a", "labels": [1]}']),
     "train.jsonl", 3),
    ("jsonl-empty-label", lambda d: jsonl(d, ['{"text": "a", "labels": ["x", ""]}']),
     "train.jsonl", 1),
    ("jsonl-no-text", lambda d: jsonl(d, ['{"labels": ["x"]}']), "train.jsonl", 1),
    ("jsonl-not-an-object", lambda d: jsonl(d, [GOOD, '["a", ["x"]]']), "train.jsonl", 2),
]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "build, filename, line", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_malformed_input_is_located(tmp_path, build, filename, line):
    source = build(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as info:
        prepare_from(source, out, name="bad")
    error = info.value
    assert error.path.name == filename
    assert error.line == line
    assert f"{filename}, line {line}: " in str(error)
    assert "expected" in str(error)
    assert_nothing_written(out)


def test_truncated_gzip_names_the_line_reached(tmp_path):
    rng = random.Random(0)
    lines = [
        json.dumps({"text": " ".join(rng.choice("abcdefgh") * 3 for _ in range(40)),
                    "labels": ["x"]})
        for _ in range(400)
    ]
    data = gzip.compress("\n".join(lines).encode() + b"\n")
    truncated = data[: len(data) // 2]
    source = tmp_path / "src"
    jsonl(source, [GOOD])
    (source / "train.jsonl").unlink()
    (source / "train.jsonl.gz").write_bytes(truncated)
    # the complete lines a reader can get out of the truncated stream
    readable = zlib.decompressobj(wbits=31).decompress(truncated).count(b"\n")
    assert 0 < readable < 400

    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="truncated or corrupt") as info:
        prepare_from(source, out, name="bad")
    assert info.value.path.name == "train.jsonl.gz"
    assert info.value.line == readable + 1
    assert_nothing_written(out)


def test_invalid_utf8_names_its_line(tmp_path):
    source = attentionxml(tmp_path / "src", ["a", "b"], ["x", "y"])
    (source / "train_texts.txt").write_bytes(b"fine\ncaf\xe9\n")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="train_texts.txt, line 2: invalid UTF-8"):
        prepare_from(source, out, name="bad")
    assert_nothing_written(out)


def test_unreadable_label_matrix(tmp_path):
    source = pecos(tmp_path / "src", ["a", "b", "c"])
    (source / "Y.tst.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataFormatError, match="Y.tst.npz: cannot read it as a sparse matrix"):
        prepare_from(source, tmp_path / "out", name="bad")
    assert_nothing_written(tmp_path / "out")


def test_failed_prepare_keeps_the_older_dataset(tmp_path):
    out = tmp_path / "out"
    good = xc_bow(tmp_path / "good", ["1 4 3", "0 0:1"])
    prepare_from(good, out, name="good")
    bad = xc_bow(tmp_path / "bad", ["1 4 3", "0 9:1"])
    with pytest.raises(DataFormatError):
        prepare_from(bad, out, name="bad")
    assert json.loads((out / "meta.json").read_text())["name"] == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]
