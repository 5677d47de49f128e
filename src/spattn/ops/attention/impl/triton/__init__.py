"""Triton block-sparse attention (forward, backward, split-K decode) over a :class:`spattn.Layout`.

Entry points for ``spattn.attention(..., backend="triton")``: :func:`attention_triton` and :func:`supports`.
Triton is imported lazily (the ``gpu`` extra); kernels never see patterns, only the Layout's block tables.
CUDA tensors run through compiled kernels; tests run the same kernels on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported; see ``tests/test_triton_kernels.py``).
Modules: ``_primitives`` (loads, stores, pointer offsets), ``_forward`` (the one block step, prefill and
decode kernels), ``_backward`` (dQ and dK/dV bodies), ``_plan`` (band check, heaviest-first order, tuner
facts, SM count), ``_tuning`` (configs), ``_launch`` (grids and strides), ``_op`` (custom op, autograd).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import Tensor

DECODE_MAX_QUERIES = 16
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # without importing it (and dynamo-friendly)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(query: Tensor, key: Tensor, value: Tensor, layout: Any) -> str | None:
    """None when the triton path can run these inputs, else a human-readable reason."""
    if not _HAS_TRITON:
        return "triton is not installed (pip install 'spattn[gpu]')"
    if query.device.type != "cuda":
        return f"the triton backend needs CUDA tensors (query is on {query.device.type})"
    return _check(query, key, value, layout)


def _check(query: Tensor, key: Tensor, value: Tensor, layout: Any) -> str | None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query, key and value must be 4-D [B, H, L, D]"
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes must match and be one of fp16/bf16/fp32 (got {query.dtype}, {key.dtype}, {value.dtype})"
    B, H, Lq, D = query.shape
    if key.shape != value.shape or key.shape[0] != B or key.shape[3] != D:
        return f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} do not match query {tuple(query.shape)}"
    if H % key.shape[1]:
        return f"query heads ({H}) must be a multiple of key heads ({key.shape[1]})"
    if D > 256 or D < 1:
        return f"head dim {D} is not supported (1..256)"
    bs = layout.block_size
    if bs < 16 or bs & (bs - 1):
        return f"layout block_size {bs} must be a power of two >= 16"
    if layout.q_len != Lq or layout.kv_len != key.shape[2]:
        return f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but inputs have {Lq}, {key.shape[2]}"
    if layout.batch not in (1, B) or layout.heads not in (1, H):
        return f"layout tables [{layout.batch}, {layout.heads}] do not broadcast to batch {B}, heads {H}"
    if layout.device != query.device:
        return f"layout is on {layout.device}, inputs on {query.device}"
    return None


def _band(layout: Any) -> list[int]:
    """The banded fast path's parameters (Note [band] in ``_forward.py``), [] when it does not apply."""
    from . import _plan

    found = _plan.band(layout)
    return [] if found is None else [int(x) for x in found]


def attention_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Any,
    *,
    scale: float,
    return_lse: bool,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Block-sparse attention with the Triton kernels.

    Args:
        query: [B, H, Lq, D]; key, value: [B, Hkv, Lk, D] with H % Hkv == 0 (GQA reads K/V in place).
        layout: a :class:`spattn.Layout` for (Lq, Lk); tables [Bl, Hl, ...] with Bl in (1, B), Hl in (1, H).
        scale: softmax scale. return_lse: also return the log-sum-exp. deterministic: bitwise reproducible
            gradients (default False): takes the split backward even when ``SPATTN_TRITON_BACKWARD=atomic``
            selects the one-pass atomic one (Note [atomic backward] in ``_backward.py``).

    Returns:
        (out [B, H, Lq, D] in the input dtype, lse float32 [B, H, Lq] natural log or None). Rows with no
        allowed key give out 0, lse -inf, and finite (zero) gradients. Lq <= 16 uses the split-K decode kernel.
    """
    use_decode = query.shape[2] <= DECODE_MAX_QUERIES and query.shape[2] <= layout.block_size
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    eager_inference = not needs_grad and not torch.compiler.is_compiling()
    if eager_inference:
        # the launch plan cached for this layout and input signature (Note [decode host cost], Note [forward
        # host cost] in _launch.py) skips the checks below, which ran when it was made
        from . import _launch

        done = (_launch.cached_decode if use_decode else _launch.cached_forward)(query, key, value, layout, scale)
        if done is not None:
            return done[0], (done[1] if return_lse else None)
    reason = _check(query, key, value, layout)
    if reason is not None:
        raise ValueError(f"triton attention cannot run: {reason}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 for the triton kernels, got {scale}")
    if eager_inference:
        # eager inference: call the launcher directly (the custom op's dispatch costs tens of microseconds,
        # which is the whole budget of a decode step)
        from . import _launch

        if use_decode:
            out, lse = _launch.decode_layout(query, key, value, layout, float(scale), _band(layout))
        else:
            out, lse = _launch.forward_layout(query, key, value, layout, float(scale), _band(layout))
        return out, (lse if return_lse else None)
    from ._op import TABLES, EagerAttention, attention_forward_op

    tables = [getattr(layout, name) for name in TABLES]
    if torch.compiler.is_compiling():
        # the band check reads the tables (a host synchronisation): traced graphs take the general path
        out, lse = attention_forward_op(query, key, value, tables, float(scale), [], use_decode, deterministic)
    else:
        out, lse = EagerAttention.apply(
            query, key, value, float(scale), _band(layout), use_decode, deterministic, *tables
        )
    return out, (lse if return_lse else None)


def decode_tables(query: Tensor, key: Tensor, value: Tensor, tables: tuple[Tensor, ...], *, scale: float,
                  grouped: bool = False) -> tuple[Tensor, Tensor]:
    """One split-K decode launch on block tables built by the caller (e.g. on the device, no host sync).

    Args:
        query: [B, H, Lq, D] with Lq <= 16 (CUDA, or CPU under ``TRITON_INTERPRET=1``); key, value
            [B, Hkv, Lk, D]. tables: ``(kv_num, kv_idx, kv_mid, full_kv_num, full_kv_idx, masks)`` in the Layout's
            format (``[B, Ht, 1]`` counts, ``[B, Ht, 1, W]`` indices, ``masks`` bool/uint8 ``[M, BS, BS]``),
            ``Ht`` in (1, H). scale: softmax scale (> 0). grouped: the tables are per query head and equal within
            each key/value group (GQA heads packed, K/V read once per group; default False).

    Returns:
        (out [B, H, Lq, D], lse float32 [B, H, Lq]); the launch plan is cached per shape signature.
    """
    from . import _launch

    return _launch.decode_tables(query, key, value, *tables, float(scale), grouped=grouped)


__all__ = ["attention_triton", "supports", "decode_tables", "DECODE_MAX_QUERIES"]
