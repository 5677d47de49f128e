"""Issue 11, items 8 and 9: no traceback for user mistakes in the CLI, text files checked and bounded, the model
cache keyed on content, the test suite on a temporary cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spattn.cli.main import app
from spattn.data.cache import cache_dir
from spattn.data.corpora import load_text
from spattn.integrations import models

runner = CliRunner()


@pytest.mark.parametrize("length, code", [(0, 2), (-5, 2), (3, 0)])
def test_demo_short_lengths(length, code):
    result = runner.invoke(app, ["demo", "--length", str(length)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    if code == 0:
        assert "block density" in result.output


def test_binary_and_non_utf8_text_are_refused(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"GGUF\x00\x01\x02" * 100)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    for path, words in ((binary, "binary"), (latin, "not UTF-8")):
        with pytest.raises(ValueError, match=words):
            load_text(path)
        result = runner.invoke(app, ["data", "prepare", "--text", str(path)])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_huge_text_is_read_only_as_far_as_needed(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 2000)
    with pytest.warns(UserWarning, match="read only its first 1,000 characters"):
        text = load_text(path, max_chars=1000)
    assert len(text) == 1000
    assert len(load_text(path, max_chars=None)) == 10000
    with pytest.raises(ValueError, match="max_chars"):
        load_text(path, max_chars=0)


def test_hf_source_names_the_package_it_needs():
    pytest.importorskip("pytest")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_text("hf:harden")
    else:  # pragma: no cover - depends on the machine
        pytest.skip("datasets is installed")


def _fake_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    target = tmp_path / "converted"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")
    (target / "spattn-source.json").write_text(json.dumps(models._source_stamp(gguf)))
    return gguf, target


def test_model_cache_is_keyed_on_content_not_mtime(tmp_path):
    gguf, target = _fake_checkpoint(tmp_path)
    assert models._is_fresh(target, gguf)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**12))  # touched / copied: the same content
    assert models._is_fresh(target, gguf)
    data = bytearray(gguf.read_bytes())
    data[100] ^= 0xFF  # same size, different header
    gguf.write_bytes(bytes(data))
    assert not models._is_fresh(target, gguf)
    assert "mtime_ns" not in models._source_stamp(gguf)


def test_model_cache_accepts_an_old_stamp_of_the_same_file(tmp_path):
    gguf, target = _fake_checkpoint(tmp_path)
    st = gguf.stat()
    old = {"file": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": 1}
    (target / "spattn-source.json").write_text(json.dumps(old))
    assert models._is_fresh(target, gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**12))
    assert not models._is_fresh(target, gguf)


def test_the_suite_runs_on_a_temporary_cache():
    home = (Path.home() / ".cache" / "spattn").resolve()
    root = cache_dir().resolve()
    assert root != home and os.environ["SPATTN_TEST_CACHE"] == os.environ["SPATTN_CACHE"]
    assert not str(root).startswith(str(home))


def test_smollm2_gguf_path_can_come_from_the_environment(tmp_path, monkeypatch):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(b"GGUF")
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(copy))
    assert models.smollm2_gguf_path() == copy
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="SPATTN_SMOLLM2_GGUF"):
        models.smollm2_gguf_path()
