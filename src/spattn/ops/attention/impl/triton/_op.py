"""``torch.library.custom_op`` registration: forward and backward ops with fake implementations and autograd,
so ``torch.compile(fullgraph=True)`` traces through them as single opaque nodes."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _launch


@torch.library.custom_op("spattn::triton_attention_forward", mutates_args=())
def attention_forward_op(
    query: Tensor, key: Tensor, value: Tensor,
    kv_num: Tensor, kv_idx: Tensor, kv_mid: Tensor, fkv_num: Tensor, fkv_idx: Tensor,
    q_num: Tensor, q_idx: Tensor, q_mid: Tensor, fq_num: Tensor, fq_idx: Tensor,
    masks: Tensor, scale: float, kind: str, use_decode: bool, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    fn = _launch.decode if use_decode else _launch.forward
    return fn(query, key, value, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale, kind)


@attention_forward_op.register_fake
def _(query, key, value, *args, **kwargs):
    B, H, Lq, _ = query.shape
    return (
        torch.empty(query.shape, dtype=query.dtype, device=query.device),
        torch.empty(B, H, Lq, dtype=torch.float32, device=query.device),
    )


@torch.library.custom_op("spattn::triton_attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor, grad_lse: Tensor | None,
    query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    kv_num: Tensor, kv_idx: Tensor, kv_mid: Tensor, fkv_num: Tensor, fkv_idx: Tensor,
    q_num: Tensor, q_idx: Tensor, q_mid: Tensor, fq_num: Tensor, fq_idx: Tensor,
    masks: Tensor, scale: float, kind: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # Note [no atomics] in _backward.py: every configuration is deterministic, so `deterministic` only
    # documents the request (a faster atomic variant would have to honour it).
    return _launch.backward(
        grad_out, query, key, value, out, lse, grad_lse, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx,
        q_num, q_idx, q_mid, fq_num, fq_idx, masks, scale, kind,
    )


@attention_backward_op.register_fake
def _(grad_out, grad_lse, query, key, value, *args, **kwargs):
    return (
        torch.empty(query.shape, dtype=query.dtype, device=query.device),
        torch.empty(key.shape, dtype=key.dtype, device=key.device),
        torch.empty(value.shape, dtype=value.dtype, device=value.device),
    )


def _setup_context(ctx, inputs, output):
    (query, key, value, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx,
     q_num, q_idx, q_mid, fq_num, fq_idx, masks, scale, kind, _use_decode, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx,
                          q_num, q_idx, q_mid, fq_num, fq_idx, masks)
    ctx.scale, ctx.kind, ctx.deterministic = scale, kind, deterministic


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    query, key, value, out, lse = saved[:5]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(
        grad_out, grad_lse, query, key, value, out, lse, *saved[5:], ctx.scale, ctx.kind, ctx.deterministic
    )
    return (dq, dk, dv) + (None,) * 15


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)
