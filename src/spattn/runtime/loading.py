"""Load what ``spattn generate`` / ``spattn serve`` run: a causal LM with its tokenizer, and a plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spattn._optional import require
from spattn.integrations.plan import Plan

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "auto": None}


def load_model(model: str = "smollm2", *, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """``(model in eval mode, tokenizer)``: ``"smollm2"`` (SmolLM2-135M-Instruct, offline) or a local Hugging
    Face folder with a causal LM and its tokenizer. ``dtype``: ``"auto"`` (the checkpoint's), ``"float32"``,
    ``"float16"``, ``"bfloat16"``; ``device``: e.g. ``"cuda"`` (default CPU)."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = None if _DTYPES[dtype] is None else getattr(torch, _DTYPES[dtype])
    if model == "smollm2":
        from spattn.integrations.models import load_smollm2

        return load_smollm2(dtype=torch_dtype, device=device)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model must be 'smollm2' or a Hugging Face model folder with config.json, got {model!r}")
    transformers = require("transformers", extra="hf")
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if device is not None:
        lm = lm.to(device)
    return lm.eval(), tokenizer


def load_plan(plan: str | None) -> Plan:
    """A :class:`~spattn.Plan` from a JSON file (``Plan.save``), or ``"dense"`` / ``None`` for full attention."""
    if plan is None or plan == "dense":
        return Plan()
    return Plan.load(plan)
