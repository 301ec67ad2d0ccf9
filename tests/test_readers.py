"""Each supported layout, built in miniature by hand, read back through prepare_from.

Every folder holds the same small world, so one set of expectations checks all five readers:

    train  "a cat"           cats, pets
           ""                (no labels; an empty text where the layout has texts)
           "a dog"           dogs, pets, pets      (a label repeated on one line counts once)
    test   "a fish"          fish                  (a label seen only in test)
           "a cat again"     cats
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmlgame.errors import XmlgameError
from xmlgame.readers import LAYOUTS, detect_layout, prepare_from
from xmlgame.readers.jsonl import is_test

TRAIN = [("a cat", ["cats", "pets"]), ("", []), ("a dog", ["dogs", "pets", "pets"])]
TEST = [("a fish", ["fish"]), ("a cat again", ["cats"])]
NAMES = ["cats", "pets", "dogs", "fish"]  # id order of the files that use ids


def write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def ids(labels: list[str]) -> list[int]:
    return [NAMES.index(label) for label in labels]


def label_sets(dataset, split: str) -> list[set[str]]:
    labels = dataset.split(split).Y
    return [{dataset.label_names[j] for j in row.indices} for row in labels]


def check_world(dataset, *, texts: bool = True) -> None:
    """The miniature world came through: documents, labels, names, counts."""
    for split, docs in (("train", TRAIN), ("test", TEST)):
        assert label_sets(dataset, split) == [set(labels) for _, labels in docs]
        assert set(dataset.split(split).Y.data) <= {1.0}
        if texts:
            assert list(dataset.split(split).texts) == [text for text, _ in docs]
    counts = dict(zip(dataset.label_names, dataset.train_counts.tolist(), strict=True))
    assert counts == {"cats": 1, "pets": 2, "dogs": 1, "fish": 0}
    meta = dataset.meta["counts"]
    assert (meta["train_docs"], meta["test_docs"], meta["labels"]) == (3, 2, 4)
    assert meta["train_docs_without_labels"] == 1
    assert meta["labels_only_in_test"] == 1
    assert dataset.meta["input_checksum"].startswith("blake2b:")


# --------------------------------------------------------------------------------------------
# one folder per layout


def make_attentionxml(folder: Path, newline: str = "\n") -> Path:
    for split, docs in (("train", TRAIN), ("test", TEST)):
        write(folder / f"{split}_texts.txt", [text for text, _ in docs], newline)
        # trailing spaces and a blank labels line on purpose
        write(folder / f"{split}_labels.txt", [" ".join(ls) + "  " for _, ls in docs], newline)
    return folder


def make_pecos(folder: Path, with_names: bool = True) -> Path:
    for tag, docs in (("trn", TRAIN), ("tst", TEST)):
        write(folder / f"X.{tag}.txt", [text for text, _ in docs], "\r\n")
        labels = sp.lil_matrix((len(docs), len(NAMES)), dtype=np.float32)
        for i, (_, names) in enumerate(docs):
            for j in ids(names):
                labels[i, j] = 1.0
        labels = labels.tocsr()
        if tag == "trn":  # a stored zero is no label
            labels = sp.csr_matrix((np.r_[labels.data, 0.0], np.r_[labels.indices, 3],
                                    np.r_[labels.indptr[:-1], labels.nnz + 1]), labels.shape)
        sp.save_npz(folder / f"Y.{tag}.npz", labels)
        features = sp.random(len(docs), 7, density=0.5, format="csr", random_state=0)
        (folder / "tfidf-attnxml").mkdir(exist_ok=True)
        sp.save_npz(folder / "tfidf-attnxml" / f"X.{tag}.npz", features)
    if with_names:
        write(folder / "output-items.txt", NAMES)
    return folder


def make_xc_bow(folder: Path, train: str = "train.txt", test: str = "test.txt") -> Path:
    write(folder / train, ["3 5 4", "0,1 0:1.0 3:0.5", " 2:1.000000", "2,1,1 1:2.0 4:1"])
    write(folder / test, ["2 5 4", "3 4:1.0", "0\t0:0.25 0:0.25  "], "\r\n")
    write(folder / "labels.txt", NAMES)
    return folder


def make_lf(folder: Path, with_ids: bool = True) -> Path:
    for tag, docs in (("trn", TRAIN), ("tst", TEST)):
        write(folder / f"{tag}_X.txt", [text for text, _ in docs])
    write(folder / "trn_X_Y.txt", ["3 4", "0:1.0 1:1.0", "", "2:1.0 1:1.0 1:1"])
    write(folder / "tst_X_Y.txt", ["2 4", "3:1.0", "0:1.0 2:0"], "\r\n")  # 2:0 is no label
    write(folder / "Y.txt", ["cat", "pet", "dog", "fish"])
    if with_ids:
        write(folder / "Y.ids.txt", NAMES)
    return folder


def jsonl_lines(docs, extra: bool = True) -> list[str]:
    lines = [json.dumps({"id": i, "text": text, "labels": labels}) for i, (text, labels) in
             enumerate(docs)]
    return lines[:1] + ["", "   "] + lines[1:] if extra else lines  # blank lines are skipped


def make_jsonl(folder: Path) -> Path:
    write(folder / "train.jsonl", jsonl_lines(TRAIN), "\r\n")
    folder.joinpath("test.jsonl.gz").write_bytes(
        gzip.compress("\n".join(jsonl_lines(TEST)).encode())  # no final newline either
    )
    entries = [{"label": "cats", "text": "small felines"}, {"label": "unused", "text": "x"},
               {"label": "fish", "text": "animals that swim"}]
    write(folder / "label_texts.jsonl", [json.dumps(e) for e in entries])
    return folder


MAKERS = {
    "pecos": make_pecos, "attentionxml": make_attentionxml, "xc-bow": make_xc_bow,
    "lf": make_lf, "jsonl": make_jsonl,
}


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_the_world(tmp_path, layout):
    source = MAKERS[layout](tmp_path / "src")
    assert detect_layout(source) == layout
    dataset = prepare_from(source, tmp_path / "out", name="mini", source_label="hand-made")
    check_world(dataset, texts=layout != "xc-bow")
    assert dataset.meta["layout"] == layout
    assert dataset.meta["source"] == "hand-made"
    assert dataset.name == "mini"


def test_pecos_features_and_label_names(tmp_path):
    source = make_pecos(tmp_path / "src")
    dataset = prepare_from(source, tmp_path / "out", name="p", propensity_a=0.6)
    for tag, split in (("trn", dataset.train), ("tst", dataset.test)):
        expected = sp.load_npz(source / "tfidf-attnxml" / f"X.{tag}.npz").toarray()
        np.testing.assert_allclose(split.X.toarray(), expected, rtol=1e-6)
    assert dataset.meta["counts"]["features"] == 7
    assert dataset.propensity_ab == (0.6, 1.5)


def test_pecos_without_output_items_names_labels_by_id(tmp_path):
    source = make_pecos(tmp_path / "src", with_names=False)
    dataset = prepare_from(source, tmp_path / "out", name="p")
    assert list(dataset.label_names) == ["0", "1", "2", "3"]


def test_attentionxml_crlf_lines(tmp_path):
    source = make_attentionxml(tmp_path / "src", newline="\r\n")
    check_world(prepare_from(source, tmp_path / "out", name="a"))


def test_xc_bow_features_and_single_file_pair(tmp_path):
    source = make_xc_bow(tmp_path / "src", "bibtex_train.txt", "bibtex_test.txt")
    assert detect_layout(source) == "xc-bow"
    dataset = prepare_from(source, tmp_path / "out", name="b")
    check_world(dataset, texts=False)
    assert dataset.train.texts is None
    np.testing.assert_allclose(
        dataset.train.X.toarray(),
        [[1, 0, 0, 0.5, 0], [0, 0, 1, 0, 0], [0, 2, 0, 0, 1]],
    )
    np.testing.assert_allclose(dataset.test.X.toarray(), [[0, 0, 0, 0, 1], [0.5, 0, 0, 0, 0]])
    assert dataset.meta["counts"]["features"] == 5  # D from the header, not the largest id


def test_xc_bow_blank_line_is_an_empty_document(tmp_path):
    source = tmp_path / "src"
    write(source / "train.txt", ["2 3 2", "", "1 2:1"])
    write(source / "test.txt", ["1 3 2", "0 0:1"])
    dataset = prepare_from(source, tmp_path / "out", name="b")
    assert dataset.train.Y.toarray().tolist() == [[0, 0], [0, 1]]
    assert dataset.train.X.nnz == 1
    assert list(dataset.label_names) == ["0", "1"]


def test_lf_names_and_label_texts(tmp_path):
    dataset = prepare_from(make_lf(tmp_path / "src"), tmp_path / "out", name="l")
    assert list(dataset.label_names) == NAMES
    assert list(dataset.label_texts) == ["cat", "pet", "dog", "fish"]


def test_lf_without_ids_uses_label_texts_as_names(tmp_path):
    dataset = prepare_from(make_lf(tmp_path / "src", with_ids=False), tmp_path / "out", name="l")
    assert list(dataset.label_names) == ["cat", "pet", "dog", "fish"]


def test_jsonl_label_texts(tmp_path):
    dataset = prepare_from(make_jsonl(tmp_path / "src"), tmp_path / "out", name="j")
    texts = dict(zip(dataset.label_names, dataset.label_texts, strict=True))
    # "unused" names no document's label: ignored; "pets" has no entry: its name is its text
    assert texts == {"cats": "small felines", "pets": "pets", "dogs": "dogs",
                     "fish": "animals that swim"}


def test_jsonl_single_file_is_split_by_hash_of_id(tmp_path):
    records = [{"id": f"doc{i}", "text": f"text {i}", "labels": [f"l{i % 7}"]}
               for i in range(200)]
    source = write(tmp_path / "all.jsonl", [json.dumps(r) for r in records])
    assert detect_layout(source) == "jsonl"
    dataset = prepare_from(source, tmp_path / "out", name="s")
    expected_test = [r["text"] for r in records if is_test(r["id"])]
    assert list(dataset.test.texts) == expected_test
    assert len(dataset.train) + len(dataset.test) == 200
    assert 20 <= len(dataset.test) <= 60  # about 20% of 200
    assert "split" in dataset.meta
    again = prepare_from(source, tmp_path / "again", name="s")
    assert list(again.test.texts) == expected_test


def test_prepare_replaces_an_older_dataset(tmp_path):
    out = tmp_path / "out"
    prepare_from(make_lf(tmp_path / "lf"), out, name="old")
    dataset = prepare_from(make_attentionxml(tmp_path / "ax"), out, name="new")
    assert dataset.name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ax", "lf", "out"]


def test_forced_layout(tmp_path):
    source = make_attentionxml(tmp_path / "src")
    dataset = prepare_from(source, tmp_path / "out", name="a", layout="attentionxml")
    assert dataset.meta["layout"] == "attentionxml"
    with pytest.raises(XmlgameError, match="unknown layout 'csv'; choose one of pecos"):
        prepare_from(source, tmp_path / "out2", name="a", layout="csv")
    with pytest.raises(XmlgameError, match="not a complete pecos folder: missing X.trn.txt"):
        prepare_from(source, tmp_path / "out2", name="a", layout="pecos")


def test_detect_layout_explains_what_is_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XmlgameError) as info:
        detect_layout(empty)
    for layout in LAYOUTS:
        assert layout in str(info.value)
    assert "trn_X_Y.txt" in str(info.value)

    partial = make_attentionxml(tmp_path / "partial")
    (partial / "test_labels.txt").unlink()
    with pytest.raises(XmlgameError, match="closest: attentionxml lacks test_labels.txt"):
        detect_layout(partial)

    both = make_lf(make_attentionxml(tmp_path / "both"))
    with pytest.raises(XmlgameError, match="several layouts"):
        detect_layout(both)

    make_lf(tmp_path / "outer" / "wordnet")
    with pytest.raises(XmlgameError, match=r"a folder inside matches: wordnet \(lf\)"):
        detect_layout(tmp_path / "outer")

    with pytest.raises(XmlgameError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    with pytest.raises(XmlgameError, match="cannot tell"):
        detect_layout(write(tmp_path / "data.csv", ["a,b"]))


def test_lf_warns_about_repeated_names_without_ids(tmp_path, caplog):
    source = make_lf(tmp_path / "src", with_ids=False)
    write(source / "Y.txt", ["cat", "pet", "cat", "fish"])
    with caplog.at_level("WARNING", logger="xmlgame.readers"):
        dataset = prepare_from(source, tmp_path / "out", name="l")
    assert "1 label names repeat" in caplog.text
    assert dataset.n_labels == 4  # ids stay distinct
