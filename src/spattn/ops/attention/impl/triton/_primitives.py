"""Small ``triton.jit`` helpers shared by every kernel: pointer offsets from stride tuples, row-tile loads and
stores with the tail masks, and the table-row addresses of a Layout.

Notation as in ``_forward.py``. A stride tuple is ``(batch, head, row)`` for a [B, H, L, D] tensor (the last
dimension has stride 1), with 0 in a broadcast dimension. Table strides (``[Bl, Hl, N(, W)]``) are passed as
separate integers (``row_ptr``), which the kernels do not specialise on.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Note [one compile per length]: Triton specialises every integer argument on "== 1" and "divisible by 16"
# (tuple elements included, whatever ``do_not_specialize`` says), and each combination is a new compile
# (seconds each on an H200 host). Lengths, tile counts, band offsets and table strides change with the sequence
# length and the pattern, so the kernels list them in ``do_not_specialize`` and take table strides as separate
# integers; tensor strides stay specialised (multiples of the head dim: their divisibility never changes and
# it is what lets K/V tiles load as wide vectors).
TABLE_STRIDES = ("st_num_b", "st_num_h", "st_idx_b", "st_idx_h", "st_idx_n", "st_full_b", "st_full_h", "st_full_n")


@triton.jit
def dot(a, b):
    """``tl.dot`` in the precision of the inputs. Note [fp32 dot]: Triton's default for float32 operands is TF32
    (10-bit mantissa), which silently gives float32 callers ~1e-3 errors; float32 tiles use IEEE products instead
    (slower; bf16 / fp16 tiles are unchanged)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def head_ptr(ptr, strides, b, h):
    """The [L, D] (or [N, W]) slice of batch ``b``, head ``h``."""
    return ptr + b * strides[0] + h * strides[1]


@triton.jit
def row_ptr(ptr, stride_b, stride_h, stride_n, b, h, n):
    """Row ``n`` of a [Bl, Hl, N, W] table. Table strides are plain (unspecialised) integers, not a tuple:
    they change with the length (Note [one compile per length] in ``_launch.py``)."""
    return ptr + b * stride_b + h * stride_h + n * stride_n


@triton.jit
def load_rows(base, rows, stride, limit, offs_d, D: tl.constexpr, DP: tl.constexpr, EVEN: tl.constexpr):
    """[len(rows), DP] tile ``base[rows, :D]``, zero-padded past ``limit`` rows and past ``D`` columns.
    ``EVEN``: every row is < limit (no row mask)."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if EVEN:
        if D == DP:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[:, None] < limit) & (offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def store_rows(base, rows, stride, limit, offs_d, value, D: tl.constexpr):
    """``base[rows, :D] = value`` for rows < limit, cast to the destination dtype."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(rows[:, None] < limit) & (offs_d < D)[None, :])


@triton.jit
def band_keep(d, col, Lk, band_left, band_right, n_sinks, sink_min_d):
    """The closed-form mask of banded layouts (Note [band] in ``_forward.py``), for a tile of ``d = i - j``
    (absolute query position minus key position) and key positions ``col`` (either orientation): kept when
    ``-right <= d <= left``, or ``j < n_sinks`` and ``d >= sink_min_d``; never past ``Lk``."""
    in_band = (d <= band_left) & (d >= -band_right)
    sink = (col < n_sinks) & (d >= sink_min_d)
    return (in_band | sink) & (col < Lk)
