"""``torch.library.custom_op`` registration: forward and backward ops with fake implementations and autograd,
so ``torch.compile(fullgraph=True)`` traces through them as single opaque nodes.

Note [few arguments]: the eleven Layout tables travel as one ``list[Tensor]`` (order: ``TABLES``). The
custom-op machinery walks the schema per call with a cost quadratic in the argument count (about half a
millisecond of host time with the tables as separate arguments), which dominated short calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _launch

TABLES = (
    "kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "q_mask_ids", "full_q_num_blocks", "full_q_indices", "masks",
)


@torch.library.custom_op("spattn::triton_attention_forward", mutates_args=())
def attention_forward_op(
    query: Tensor, key: Tensor, value: Tensor, tables: list[Tensor], scale: float, band: list[int], use_decode: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    fn = _launch.decode if use_decode else _launch.forward
    return fn(query, key, value, *tables[:5], tables[10], scale, band)


@attention_forward_op.register_fake
def _(query, key, value, *args, **kwargs):
    B, H, Lq, _ = query.shape
    return (
        torch.empty(query.shape, dtype=query.dtype, device=query.device),
        torch.empty(B, H, Lq, dtype=torch.float32, device=query.device),
    )


@torch.library.custom_op("spattn::triton_attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor, grad_lse: Tensor | None, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    tables: list[Tensor], scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # Note [no atomics] / [atomic backward] in _backward.py: `deterministic` takes the split backward
    return _launch.backward(grad_out, query, key, value, out, lse, grad_lse, *tables, scale,
                            deterministic=deterministic)


@attention_backward_op.register_fake
def _(grad_out, grad_lse, query, key, value, *args, **kwargs):
    return (
        torch.empty(query.shape, dtype=query.dtype, device=query.device),
        torch.empty(key.shape, dtype=key.dtype, device=key.device),
        torch.empty(value.shape, dtype=value.dtype, device=value.device),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, tables, scale, band, _use_decode, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, *tables)
    ctx.scale, ctx.band, ctx.deterministic = scale, band, deterministic


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    query, key, value, out, lse = saved[:5]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(
        grad_out, grad_lse, query, key, value, out, lse, list(saved[5:]), ctx.scale, ctx.deterministic
    )
    return dq, dk, dv, [None] * (len(saved) - 5), None, [None] * len(ctx.band), None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


class EagerAttention(torch.autograd.Function):
    """The same computation for eager autograd without the custom-op machinery (Note [eager path]: the
    custom op's Python dispatch, pytree and schema handling cost ~0.3 ms of host time per call, longer than
    the kernels of a short sparse call; under ``torch.compile`` the custom op is used instead)."""

    @staticmethod
    def forward(ctx, query, key, value, scale, band, use_decode, deterministic, *tables):
        fn = _launch.decode if use_decode else _launch.forward
        out, lse = fn(query, key, value, *tables[:5], tables[10], scale, band)
        ctx.save_for_backward(query, key, value, out, lse, *tables)
        ctx.scale, ctx.band, ctx.deterministic = scale, band, deterministic
        ctx.mark_non_differentiable(*tables)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient (and no extra kernel)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        saved = ctx.saved_tensors
        query, key, value, out, lse = saved[:5]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _launch.backward(grad_out, query, key, value, out, lse, grad_lse, *saved[5:], ctx.scale,
                                      deterministic=ctx.deterministic)
        return (dq, dk, dv) + (None,) * (4 + len(saved) - 5)
