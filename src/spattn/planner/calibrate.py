"""Calibration inputs: token chunks of a text at each length, and each layer's queries, keys (and values).

Queries and keys come from :func:`spattn.capture` (after rotary embeddings, GQA key heads not repeated).
Values, needed only by the ``"output_error"`` objective, are read from the value projection of each
attention module (``v_proj`` in Llama-style models, ``value`` in BERT-style ones) with forward hooks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spattn.integrations.capture import capture
from spattn.integrations.hf import attention_modules


def calibration_chunks(text: Any, tokenizer: Any, length: int, samples: int, *,
                       split: str = "calibration") -> torch.Tensor:
    """Token chunks int64 ``[samples, length]`` of ``text``.

    ``text`` is token ids (int ``[N]`` or ``[C, L]``), a corpus name (``"austen"``, ``"kjv"``), a text file,
    or the text itself. Chunks come from the ``split`` of :func:`spattn.data.chunk` (``"calibration"`` by
    default: the held-out tail of the text stays out of the plan).
    """
    from spattn.data import chunk, text_chunks, tokenize
    from spattn.data.corpora import CORPORA

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if isinstance(text, torch.Tensor):
        if text.dtype.is_floating_point or text.dim() not in (1, 2):
            raise ValueError(f"token ids must be int [N] or [C, L], got {text.dtype} {tuple(text.shape)}")
        ids = text.flatten()
        out = chunk(ids, length, split=split, max_chunks=samples)
    elif isinstance(text, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("text given as a string needs tokenizer= (or pass token ids)")
        if isinstance(text, str) and (text in CORPORA or (len(text) < 4096 and Path(text).is_file())):
            out = text_chunks(text, tokenizer, length, split=split, max_chunks=samples)
        else:
            out = chunk(tokenize(str(text), tokenizer), length, split=split, max_chunks=samples)
    else:
        raise TypeError(f"text must be token ids, a corpus name, a file or a str, got {type(text).__name__}")
    if out.shape[0] < samples:
        raise ValueError(f"the text gives only {out.shape[0]} chunk(s) of {length} tokens in its {split!r} split; "
                         f"{samples} asked")
    return out


def _value_module(module: torch.nn.Module) -> torch.nn.Module | None:
    for name in ("v_proj", "value"):
        sub = getattr(module, name, None)
        if isinstance(sub, torch.nn.Module):
            return sub
    return None


@contextlib.contextmanager
def value_hooks(model: torch.nn.Module, heads_kv: int, head_dim: int) -> Iterator[dict[int, torch.Tensor]]:
    """Record every layer's values ``[B, Hkv, L, D]`` (float32, CPU) while the block runs."""
    modules = attention_modules(model)
    found = {m.layer_idx: _value_module(m) for m in modules}
    missing = [i for i, v in found.items() if v is None]
    if missing:
        raise ValueError(f"objective='output_error' needs the value projection of each layer; layers {missing} of "
                         f"{type(model).__name__} have neither v_proj nor value")
    out: dict[int, torch.Tensor] = {}
    handles = []
    for layer, sub in found.items():
        def hook(_mod, _inp, output, layer=layer):
            B, L, _ = output.shape
            out[layer] = output.detach().float().cpu().view(B, L, heads_kv, head_dim).transpose(1, 2).contiguous()
        handles.append(sub.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _capture_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward reaches every attention layer: the base model of a ``...ForCausalLM`` (its
    language-model head, about a fifth of SmolLM2-135M's forward at 1k tokens, is not needed to capture queries and
    keys), or the model itself when it is a base model or already patched (its plan lives on the outer model)."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, torch.nn.Module) or base is model or hasattr(model, "_spattn_original_attn"):
        return model
    return base if hasattr(base, "config") and hasattr(base, "set_attn_implementation") else model


def capture_sample(model: torch.nn.Module, ids: torch.Tensor, *, values: bool) -> tuple[Any, dict[int, torch.Tensor]]:
    """``(Capture, values)`` of chunks ``[S, L]`` (``S = 1`` for one chunk), in one batched forward:
    queries/keys per layer ``[S, H(kv), L, D]``, and values when asked."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be token ids int [S, L], got {getattr(ids, 'shape', type(ids))}")
    device = next(model.parameters()).device
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    ctx = value_hooks(model, kv_heads, head_dim) if values else contextlib.nullcontext({})
    with ctx as vals:
        cap = capture(_capture_target(model), ids.to(device), mode="full")
    return cap, dict(vals)


def capture_batches(model: torch.nn.Module, chunks: torch.Tensor, *, values: bool,
                    max_bytes: int = 1 << 30) -> Iterator[tuple[Any, dict[int, torch.Tensor]]]:
    """:func:`capture_sample` over the chunks ``[S, L]`` in as few forwards as fit ``max_bytes`` of captured
    float32 queries, keys (and values) per forward (default 1 GiB; SmolLM2-135M at 1k tokens: 3 chunks in one)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = len(attention_modules(model))
    per_chunk = layers * (heads + kv_heads * (2 if values else 1)) * chunks.shape[1] * head_dim * 4
    step = max(1, int(max_bytes // max(1, per_chunk)))
    for s in range(0, chunks.shape[0], step):
        yield capture_sample(model, chunks[s : s + step], values=values)
