"""The model side of the report: load the model and the text, and run dense and patched forwards (capture is
:func:`spattn.integrations.capture.capture`; scoring is :mod:`spattn.eval.lm`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from spattn._optional import require


def load_model(name: str, device: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, description)`` for ``"smollm2"`` or a local Hugging Face model directory."""
    require("transformers", extra="hf")
    if name == "smollm2":
        from spattn.integrations.models import load_smollm2

        model, tokenizer = load_smollm2(device=device)
        return model, tokenizer, "SmolLM2-135M-Instruct"
    path = Path(name).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"unknown model {name!r}: give 'smollm2' (the embedded default) or a local Hugging Face model directory "
            "holding config.json, the weights and a tokenizer (this machine cannot download from the hub)"
        )
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer, path.name


def preflight(model: str, text: str) -> None:
    """Cheap checks before anything is written: the model path and the text source exist."""
    if model != "smollm2":
        path = Path(model).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"unknown model {model!r}: give 'smollm2' (the embedded default) or a local Hugging Face model "
                "directory holding config.json, the weights and a tokenizer (this machine cannot download from the hub)"
            )
    from spattn.data.corpora import CORPORA

    if text not in CORPORA and not text.startswith("hf:"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path} (or give a corpus name: {sorted(CORPORA)})")


def model_facts(model: Any) -> dict[str, Any]:
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    return {
        "layers": int(cfg.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "architecture": type(model).__name__,
    }


def load_chunks(text: str, tokenizer: Any, chunk_length: int, calibration: int,
                held_out: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Calibration chunks (the first ones) and held-out chunks (from the held-out tail, never overlapping),
    int64 ``[C, chunk_length]`` / ``[E, chunk_length]``."""
    from spattn.data.chunks import chunk, tokenize
    from spattn.data.corpora import CORPORA, load_text

    body = load_text(text)
    ids = tokenize(body, tokenizer, cache=text in CORPORA)
    need = (calibration + held_out) * chunk_length
    if ids.numel() < need:
        raise ValueError(
            f"text too short: {text!r} has {ids.numel()} tokens but {calibration} calibration + {held_out} held-out "
            f"chunks of {chunk_length} tokens need {need}; use a longer text, a shorter --chunk-length or fewer chunks"
        )
    chunks = chunk(ids, chunk_length, split="all")
    total = chunks.shape[0]
    start = max(calibration, total - max(held_out, round(0.1 * total)))
    info = {"tokens": int(ids.numel()), "chunks_available": int(total), "calibration_indices": list(range(calibration)),
            "held_out_indices": list(range(start, start + held_out))}
    return chunks[:calibration].clone(), chunks[start : start + held_out].clone(), info


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor, plan: Any = None, *, backend: str = "dense",
           block_size: int = 64) -> torch.Tensor:
    """float32 logits ``[L, V]`` of one chunk ``ids`` ``[L]`` (or ``[B, L, V]`` of a batch ``[B, L]`` of
    equal-length chunks, one forward): the model's own attention when ``plan`` is None, else patched."""
    batch = ids if ids.dim() == 2 else ids[None]
    # use_cache=False: a scoring forward never decodes, so building the key/value cache is wasted work
    if plan is None:
        out = model(batch.to(model.device), use_cache=False).logits.float()
    else:
        from spattn.integrations import hf

        with hf.patched(model, plan, backend=backend, block_size=block_size):
            out = model(batch.to(model.device), use_cache=False).logits.float()
    return out if ids.dim() == 2 else out[0]


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)
