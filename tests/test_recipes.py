"""Dataset recipes, the download path and `xmlgame prep`, end to end on data the tests make."""

from __future__ import annotations

import dataclasses
import functools
import io
import socket
import tarfile
import threading
import time
import urllib.error
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from xmlgame import download, recipes
from xmlgame.cli import app
from xmlgame.dataset import load_dataset
from xmlgame.errors import XmlgameError

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """An empty XMLGAME_HOME for every test."""
    folder = tmp_path / "home"
    monkeypatch.setenv("XMLGAME_HOME", str(folder))
    return folder


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def with_recipe(monkeypatch, recipe: recipes.Recipe) -> None:
    """Add ``recipe`` to the registry, replacing a recipe of the same name."""
    others = tuple(r for r in recipes.all_recipes() if r.name != recipe.name)
    monkeypatch.setattr(recipes, "all_recipes", lambda: (*others, recipe))


def write_pecos(folder: Path, train_labels: list[list[int]], test_labels: list[list[int]],
                n_labels: int) -> Path:
    """A miniature PECOS xmc-base folder: texts, label matrices and label names."""
    folder.mkdir(parents=True)
    for split, rows in (("trn", train_labels), ("tst", test_labels)):
        texts = [f"document {i} about " + " ".join(f"topic{j}" for j in row)
                 for i, row in enumerate(rows)]
        (folder / f"X.{split}.txt").write_text("\n".join(texts) + "\n")
        indptr = np.cumsum([0] + [len(row) for row in rows])
        indices = np.array([j for row in rows for j in row], dtype=np.int32)
        matrix = sp.csr_matrix(
            (np.ones(len(indices), dtype=np.float32), indices, indptr),
            shape=(len(rows), n_labels),
        )
        sp.save_npz(folder / f"Y.{split}.npz", matrix)
    (folder / "output-items.txt").write_text("".join(f"item{j}\n" for j in range(n_labels)))
    return folder


TRAIN = [[0, 1], [1], [2, 3], [0]]
TEST = [[1], [3, 0]]


# --------------------------------------------------------------------------------------------
# the registry and --list


def test_list_shows_every_recipe_with_counts_and_source():
    result = runner.invoke(app, ["prep", "--list"])
    assert result.exit_code == 0, result.output
    for name in ("eurlex-4k", "wiki10-31k", "amazoncat-13k", "amazon670k", "wiki-500k",
                 "amazon-3m", "lf-amazontitles-131k", "debtags", "reuters21578",
                 "wordnet-hypernyms", "gutenberg-lcsh", "bibtex", "delicious"):
        assert name in result.output
    assert "490,449" in result.output and "670,091" in result.output
    assert "0.6/2.6" in result.output and "0.5/0.4" in result.output
    assert "https://archive.org/download/pecos-dataset/xmc-base/amazon-670k.tar.gz" in (
        result.output
    )
    assert "bundled" in result.output


def test_names_and_aliases_resolve():
    assert recipes.find("amazon-670k").name == "amazon670k"
    assert recipes.find("Amazon-670K").name == "amazon670k"
    assert recipes.find("EURLex-4K").name == "eurlex-4k"
    assert recipes.find("LF-AmazonTitles-131K").name == "lf-amazontitles-131k"
    assert recipes.find("no-such-set") is None
    wiki = recipes.find("wiki-500k")
    assert (wiki.propensity_a, wiki.propensity_b) == (0.5, 0.4)
    names = [r.name for r in recipes.all_recipes()]
    assert len(names) == len(set(names))


def test_unknown_name_lists_recipes(home):
    result = runner.invoke(app, ["prep", "no-such-set"])
    assert result.exit_code == 2
    assert "no recipe called 'no-such-set'" in result.output
    assert "amazon670k" in result.output and "--from" in result.output
    assert "Traceback" not in result.output
    assert files_under(home) == []


def test_local_recipe_without_from_says_where_to_get_it(home):
    result = runner.invoke(app, ["prep", "reuters21578"])
    assert result.exit_code == 2
    assert "xmlgame prep reuters21578 --from DIR" in result.output
    assert "research use only" in result.output
    result = runner.invoke(app, ["prep", "lf-amazontitles-131k"])
    assert result.exit_code == 2
    assert "XMLRepository.html" in result.output and "--from DIR" in result.output
    assert files_under(home) == []


# --------------------------------------------------------------------------------------------
# no network


def test_offline_prep_fails_with_what_to_download(home, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(download, "urlopen", no_network)
    result = runner.invoke(app, ["prep", "amazon670k"])
    assert result.exit_code == 2
    assert "https://archive.org/download/pecos-dataset/xmc-base/amazon-670k.tar.gz" in (
        result.output
    )
    assert "xmlgame prep amazon670k --from DIR" in result.output
    assert "Traceback" not in result.output
    assert files_under(home) == []


def test_offline_real_code_path_fails_fast(home, monkeypatch):
    url = "http://invalid.invalid/amazon-670k.tar.gz"  # .invalid never resolves (RFC 2606)
    with_recipe(monkeypatch, dataclasses.replace(recipes.find("amazon670k"), urls=(url,)))
    start = time.perf_counter()
    result = runner.invoke(app, ["prep", "amazon670k"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2
    assert url in result.output and "--from DIR" in result.output
    assert "Traceback" not in result.output
    assert elapsed < download.CONNECT_TIMEOUT + 5
    assert files_under(home) == []


# --------------------------------------------------------------------------------------------
# --from


def test_from_with_wrong_counts_is_refused(home, tmp_path):
    source = write_pecos(tmp_path / "mini", TRAIN, TEST, n_labels=4)
    result = runner.invoke(app, ["prep", "amazon670k", "--from", str(source)])
    assert result.exit_code == 2
    assert "train documents: expected 490,449, found 4" in result.output
    assert "labels: expected 670,091, found 4" in result.output
    assert "xmlgame prep my-amazon670k --from" in result.output
    assert "--A 0.6 --B 2.6" in result.output
    assert "Traceback" not in result.output
    assert files_under(home) == []  # the checked copy was not kept


def test_from_with_another_layout_hints_at_layout_option(home, tmp_path):
    source = tmp_path / "jsonl"
    source.mkdir()
    for split in ("train", "test"):
        (source / f"{split}.jsonl").write_text('{"text": "a cat", "labels": ["cats"]}\n')
    result = runner.invoke(app, ["prep", "amazon670k", "--from", str(source)])
    assert result.exit_code == 2
    assert "--layout jsonl" in result.output and "MY-NAME" in result.output
    assert files_under(home) == []


def test_from_with_matching_counts_keeps_recipe_settings(home, tmp_path, monkeypatch):
    write_pecos(tmp_path / "outer" / "mini", TRAIN, TEST, n_labels=4)
    recipe = dataclasses.replace(
        recipes.find("amazon670k"), name="mini-pecos", aliases=(), train_docs=4, test_docs=2,
        labels=4,
    )
    with_recipe(monkeypatch, recipe)
    # the folder above the data is found too (as a tarball unpacks)
    dataset = recipes.prep("mini-pecos", source=tmp_path / "outer")
    assert dataset.path == home / "datasets" / "mini-pecos"
    assert dataset.propensity_ab == (0.6, 2.6)
    assert dataset.meta["layout"] == "pecos"
    summary = recipes.format_summary(dataset)
    for text in ("mini-pecos", "4 (0 without labels)", "2 (0 without labels)", "labels", "4 ",
                 "A = 0.6, B = 2.6", str(dataset.path)):
        assert text in summary


def test_own_data_name_detects_layout(home, tmp_path):
    source = tmp_path / "mine"
    source.mkdir()
    (source / "train.jsonl").write_text(
        '{"text": "a cat", "labels": ["cats"]}\n{"text": "a dog", "labels": ["dogs"]}\n'
    )
    (source / "test.jsonl").write_text('{"text": "cats", "labels": ["cats"]}\n')
    result = runner.invoke(app, ["prep", "my-pets", "--from", str(source)])
    assert result.exit_code == 0, result.output
    dataset = load_dataset(home / "datasets" / "my-pets")
    assert dataset.meta["layout"] == "jsonl"
    assert dataset.propensity_ab == (0.55, 1.5)


def test_bundled_debtags_prepares_offline(home, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled recipe must not touch the network")

    monkeypatch.setattr(download, "urlopen", no_network)
    result = runner.invoke(app, ["prep", "debtags"])
    assert result.exit_code == 0, result.output
    counts = load_dataset(home / "datasets" / "debtags").meta["counts"]
    assert (counts["train_docs"], counts["test_docs"], counts["labels"]) == (24_294, 6_005, 598)
    assert "24,294" in result.output and "598" in result.output


# --------------------------------------------------------------------------------------------
# downloads against a local server


def make_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / 'www'``; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_unpack_and_prepare_from_local_server(home, tmp_path, server, monkeypatch):
    root, base = server
    source = write_pecos(tmp_path / "src", TRAIN, TEST, n_labels=4)
    members = {f"xmc-base/mini/{p.name}": p.read_bytes() for p in source.iterdir()}
    make_tarball(root / "mini.tar.gz", members)
    recipe = dataclasses.replace(
        recipes.find("eurlex-4k"), name="mini-pecos", aliases=(), urls=(f"{base}/mini.tar.gz",),
        train_docs=4, test_docs=2, labels=4,
    )
    with_recipe(monkeypatch, recipe)

    dataset = recipes.prep("mini-pecos")
    assert dataset.meta["counts"]["train_docs"] == 4
    assert dataset.train.texts[0] == "document 0 about topic0 topic1"
    cache = home / "downloads" / "mini-pecos"
    assert (cache / "files" / "mini" / "xmc-base" / "mini" / "Y.trn.npz").is_file()
    assert not (cache / "mini.tar.gz").exists()  # unpacked, then dropped
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]

    # a second prep reuses the unpacked files without the network
    monkeypatch.setattr(download, "urlopen", lambda *a, **k: pytest.fail("network used"))
    assert recipes.prep("mini-pecos").meta["counts"]["test_docs"] == 2


def test_fetch_reports_http_errors_and_leaves_nothing(tmp_path, server):
    _, base = server
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.fetch(f"{base}/missing.tar.gz", tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_fetch_file_url(tmp_path):
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 3000)
    path = download.fetch(source.as_uri(), tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "data.bin"
    assert path.read_bytes() == b"x" * 3000
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["data.bin"]


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_extract_refuses_paths_outside_the_target(tmp_path, name):
    archive = make_tarball(tmp_path / "bad.tar.gz", {"ok.txt": b"fine", name: b"bad"})
    with pytest.raises(download.UnsafeArchiveError, match="outside the target"):
        download.extract(archive, tmp_path / "out" / "files")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_extract_refuses_links(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(download.UnsafeArchiveError, match="link"):
        download.extract(archive, tmp_path / "files")
    assert not (tmp_path / "files").exists()


def test_extract_rejects_a_broken_archive(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"not a tarball")
    with pytest.raises(XmlgameError, match="not a readable tar archive"):
        download.extract(archive, tmp_path / "files")
    assert [p.name for p in tmp_path.iterdir()] == ["broken.tar.gz"]


def test_synthetic_options_are_refused_for_other_datasets(tmp_path, monkeypatch):
    """Options that only shape generated data must not be silently ignored elsewhere."""
    monkeypatch.setenv("XMLGAME_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["prep", "debtags", "--labels", "50", "--seed", "3"])
    assert result.exit_code == 2
    assert "--labels, --seed" in result.output and "synthetic" in result.output
    assert not (tmp_path / "datasets").exists()
