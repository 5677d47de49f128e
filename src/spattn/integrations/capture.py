"""``capture(model, inputs)``: the attention queries and keys a transformers model really uses, per layer.

The model runs once (no gradients) through the spattn attention implementation with a hook that records
``query [B, H, L, D]`` and ``key [B, Hkv, L, D]`` as the attention function receives them: after the
projections and rotary embeddings, key/value heads not repeated. When full tensors would exceed
``max_bytes``, only pooled per-block statistics are kept (mean vector and largest norm per block of
``block_size`` tokens). A :class:`Capture` saves to / loads from one safetensors file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spattn._optional import require

MODES = ("auto", "full", "pooled")
_FORMAT = "spattn.capture/1"


@dataclass(eq=False)
class Capture:
    """Per-layer attention inputs of one model run.

    Attributes:
        mode: ``"full"`` or ``"pooled"``.
        queries / keys (full mode): ``{layer: [B, H, L, D]}`` / ``{layer: [B, Hkv, L, D]}`` float32 on CPU.
        query_mean / key_mean (pooled mode): ``{layer: [B, H(kv), NB, D]}``, the mean over each block of
            ``block_size`` tokens (padding excluded; the last block may be short).
        query_norm_max / key_norm_max (pooled mode): ``{layer: [B, H(kv), NB]}``, the largest L2 norm in a block.
        attention_mask: bool ``[B, L]`` (True = token, False = padding) or None when nothing was padded.
        causal: whether the layers attend causally; scale: the softmax scale; block_size: pooling block.
        meta: model facts (name, layers, heads, head_dim...).
    """

    mode: str
    causal: bool
    scale: float | None
    block_size: int
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    query_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    key_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    query_norm_max: dict[int, torch.Tensor] = field(default_factory=dict)
    key_norm_max: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    _TABLES = ("queries", "keys", "query_mean", "key_mean", "query_norm_max", "key_norm_max")

    @property
    def layers(self) -> list[int]:
        """Captured layer indices, ascending."""
        source = self.queries if self.mode == "full" else self.query_mean
        return sorted(source)

    def segment_ids(self) -> torch.Tensor | None:
        """int64 ``[B, L]`` for ``spattn.Document`` (0 = token, -1 = padding), or None without padding."""
        if self.attention_mask is None:
            return None
        return torch.where(self.attention_mask, 0, -1).long()

    def __repr__(self) -> str:
        layers = self.layers
        if not layers:
            return f"Capture(mode={self.mode!r}, empty)"
        first = (self.queries if self.mode == "full" else self.query_mean)[layers[0]]
        return (
            f"Capture(mode={self.mode!r}, layers={len(layers)}, query shape={tuple(first.shape)}, "
            f"causal={self.causal}, scale={self.scale})"
        )

    # ------------------------------------------------------------------ safetensors
    def save(self, path: str | os.PathLike) -> Path:
        """Write every tensor and the metadata to one ``.safetensors`` file; returns the path."""
        st = require("safetensors.torch", extra="hf")
        tensors: dict[str, torch.Tensor] = {}
        for name in self._TABLES:
            for layer, t in getattr(self, name).items():
                tensors[f"{name}.{layer}"] = t.contiguous()
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask.to(torch.uint8).contiguous()
        header = {
            "format": _FORMAT,
            "mode": self.mode,
            "causal": self.causal,
            "scale": self.scale,
            "block_size": self.block_size,
            "meta": self.meta,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        st.save_file(tensors, str(path), metadata={"spattn": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Capture:
        """Read a file written by :meth:`save`."""
        st = require("safetensors", extra="hf")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"capture file not found: {path}")
        with st.safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("spattn")
            if raw is None:
                raise ValueError(f"{path} is not a spattn capture (no 'spattn' metadata)")
            header = json.loads(raw)
            if header.get("format") != _FORMAT:
                raise ValueError(f"{path}: capture format {header.get('format')!r}, expected {_FORMAT!r}")
            out = cls(header["mode"], header["causal"], header["scale"], header["block_size"], meta=header["meta"])
            for name in f.keys():
                t = f.get_tensor(name)
                if name == "attention_mask":
                    out.attention_mask = t.bool()
                    continue
                table, layer = name.rsplit(".", 1)
                getattr(out, table)[int(layer)] = t
        return out


def _pool(x: torch.Tensor, valid: torch.Tensor | None, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] -> (mean [B, H, NB, D], norm max [B, H, NB]) over blocks of valid tokens."""
    B, H, L, D = x.shape
    NB = math.ceil(L / block_size)
    pad = NB * block_size - L
    w = torch.ones(B, L, dtype=x.dtype, device=x.device) if valid is None else valid.to(x.dtype)
    w = torch.nn.functional.pad(w, (0, pad)).view(B, 1, NB, block_size, 1)
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, NB, block_size, D)
    count = w.sum(3).clamp_min(1)
    mean = (xp * w).sum(3) / count
    norm = (xp.norm(dim=-1) * w[..., 0]).amax(-1)
    return mean, norm


def _as_inputs(inputs: Any) -> dict[str, Any]:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 1:
            inputs = inputs[None]
        if inputs.dim() != 2 or inputs.dtype.is_floating_point:
            raise ValueError(f"inputs must be token ids [B, L] (or a dict of model inputs), got {tuple(inputs.shape)}")
        return {"input_ids": inputs}
    if isinstance(inputs, Mapping):
        return dict(inputs)
    raise TypeError(f"inputs must be token ids [B, L] or a dict of model inputs, got {type(inputs).__name__}")


def capture(
    model: torch.nn.Module,
    inputs: Any,
    *,
    layers: list[int] | None = None,
    mode: str = "auto",
    max_bytes: int = 2 << 30,
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> Capture:
    """Run ``model`` once on ``inputs`` and record each layer's attention queries and keys.

    Args:
        model: a transformers model (Llama, BERT, ...). It runs with full attention through spattn (or with
            its current plan if already :func:`~spattn.patch`-ed); its previous state is restored afterwards.
        inputs: token ids int ``[B, L]`` or a dict such as a tokenizer's output (``input_ids``,
            ``attention_mask``...).
        layers: which layers to keep (default all).
        mode: ``"full"`` (tensors ``[B, H, L, D]``), ``"pooled"`` (per-block mean and max norm) or ``"auto"``
            (full unless the tensors would exceed ``max_bytes``).
        block_size: tokens per block for pooled statistics.
        dtype: dtype of the stored tensors (float32 by default).

    Returns:
        A :class:`Capture`; ``capture.queries[layer]`` is ``[B, H, L, D]`` and ``capture.keys[layer]``
        ``[B, Hkv, L, D]`` in full mode.

    Example:
        >>> cap = spattn.capture(model, tokenizer("some text", return_tensors="pt"))  # doctest: +SKIP
        >>> cap.queries[0].shape  # doctest: +SKIP
        torch.Size([1, 9, 3, 64])
    """
    from spattn.integrations import hf

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    kwargs = _as_inputs(inputs)
    device = next((p.device for p in model.parameters()), None)
    if device is not None:  # token ids and masks made on the host follow the model, as the model's own call expects
        kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    modules = hf.attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")
    n_layers = len(modules)
    wanted = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in wanted if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // heads if heads and hasattr(config, "hidden_size") else None
    )
    ids = kwargs.get("input_ids")
    if mode == "auto":
        if ids is not None and heads and head_dim:
            B, L = ids.shape
            need = len(wanted) * B * (heads + kv_heads) * L * head_dim * torch.finfo(dtype).bits // 8
            mode = "full" if need <= max_bytes else "pooled"
        else:
            mode = "full"
    mask = kwargs.get("attention_mask")
    valid = None if mask is None else torch.as_tensor(mask).bool()
    if valid is not None and bool(valid.all()):
        valid = None

    facts: dict[str, Any] = {}
    result = Capture(mode, causal=False, scale=None, block_size=block_size)
    keep = set(wanted)

    def record(module: Any, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        if layer not in keep:
            return
        facts.setdefault("causal", bool(getattr(module, "is_causal", False)))
        facts.setdefault("scale", getattr(module, "scaling", None))
        q = query.detach().to("cpu", dtype)
        k = key.detach().to("cpu", dtype)
        if mode == "full":
            result.queries[layer] = q.clone()
            result.keys[layer] = k.clone()
        else:
            v = None if valid is None else valid.to("cpu")
            result.query_mean[layer], result.query_norm_max[layer] = _pool(q, v, block_size)
            result.key_mean[layer], result.key_norm_max[layer] = _pool(k, v, block_size)

    was_patched = hasattr(model, "_spattn_original_attn")
    with torch.no_grad(), hf.hook(record):
        if was_patched:
            model(**kwargs)
        else:
            # full attention: the dense backend (SDPA with the mask) is the fast way on any device
            length = 0 if ids is None else int(ids.shape[1])
            backend = "dense" if 0 < length * length <= 1 << 24 else "auto"
            with hf.patched(model, None, backend=backend):
                model(**kwargs)
    missing = keep - set(result.layers)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} never reached the attention function: is the model supported?")
    result.causal = facts.get("causal", False)
    scale = facts.get("scale")
    result.scale = float(scale) if isinstance(scale, (int, float)) else None
    result.attention_mask = None if valid is None else valid.cpu()
    result.meta = {
        "model": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "model_type": getattr(config, "model_type", None),
        "num_layers": n_layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "batch": None if ids is None else int(ids.shape[0]),
        "length": None if ids is None else int(ids.shape[1]),
    }
    return result
