"""Host-side launchers: shapes, stride tuples, grids and config choice for the kernels (flat tensors in/out).

``band`` is ``_plan.band``'s tuple as a list (empty: stored masks, table walk); see Note [band] in ``_forward.py``.

Note [decode host cost]: a decode step's kernel runs for ~0.09 ms at 131072 tokens (H200), so every host
microsecond counts (eager decode was host-bound: 0.198 ms per call). ``decode_layout`` caches, per Layout and
per input shapes/strides/dtype/scale, everything the launch needs that depends only on those (int32 tables, the
uint8 mask view, grid, split sizes, stride tuples, the tuned config, the split-K scratch buffers), so a cached
call validates nothing twice, allocates only ``out`` and ``lse`` and calls the kernel. Host integer maths uses
plain Python (``_cdiv``): ``triton.cdiv`` is a decorated function in recent triton releases and costs a
dispatch per call. The scratch buffers are reused like the combine counter: launches on one stream run in
order; under CUDA-graph capture fresh ones are made, owned by the graph.

Note [forward host cost]: the prefill forward is the same story at model shapes. On the H200 (session 7, commit
ded742c, ``benchmarks/results/h200/planner/``) a patched SmolLM2 forward at 8192 tokens ran 28 ms of device work
in 48 ms of host time, and the one-layer kernel table put spattn at ~0.7x Flex on short shapes: host work per
call. ``forward_layout`` makes a :class:`ForwardPlan` per Layout and input signature (int32 tables, the uint8
mask view, stride tuples, the band's scalars, the config and the grid) and keeps it; ``cached_forward`` finds it,
so a repeated call (every layer of every later forward) allocates ``out`` and ``lse`` and launches. A cache hit
skips ``_check`` too: the signature (shapes, strides, dtypes, devices, scale) is everything it reads, and the
Layout is immutable by contract. ``forward`` (no Layout: the custom op, the autograd path) builds the same plan
and drops it, so both paths launch with the same arguments (``tests/test_host_overhead.py``).
"""

from __future__ import annotations

import os

import torch

from . import _plan, _tuning
from ._backward import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_fused_kernel, attn_bwd_preprocess_kernel
from ._forward import attn_fwd_kernel, decode_kernel

LOG2E = 1.4426950408889634
PERSISTENT_WAVES = 2  # programs per SM of the persistent forward
BACKWARD_METHODS = ("split", "atomic")
HEADS_FIRST = True  # backward grids issue every head's heaviest tile first (Note [heads first] in _backward.py)


def _bwd_grid(tiles: int, heads: int) -> tuple[tuple[int, int], int]:
    """(grid, HEADS_FIRST) of a backward kernel with ``tiles`` row/column tiles per (batch, head)."""
    return ((heads, tiles), 1) if HEADS_FIRST else ((tiles, heads), 0)


def backward_method() -> str:
    """The backward kernels used when the caller does not ask for determinism: ``SPATTN_TRITON_BACKWARD``
    ("split": dQ and dK/dV kernels, deterministic; "atomic": the one-pass kernel, Note [atomic backward] in
    ``_backward.py``); default "split"."""
    method = os.environ.get("SPATTN_TRITON_BACKWARD", "split")
    if method not in BACKWARD_METHODS:
        raise ValueError(f"SPATTN_TRITON_BACKWARD must be one of {BACKWARD_METHODS}, got {method!r}")
    return method


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a tensor or table, 0 where broadcast."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0, t.stride(2))


def _table_strides(num: torch.Tensor, idx: torch.Tensor, full_idx: torch.Tensor) -> tuple[int, ...]:
    """The 8 table strides the kernels take as plain integers (Note [one compile per length] in
    ``_primitives.py``): (batch, head) of the counts, (batch, head, row) of the partial and the full lists."""
    return (*_s3(num)[:2], *_s3(idx), *_s3(full_idx))


def _masks(masks: torch.Tensor) -> torch.Tensor:
    if masks.numel() == 0:
        return torch.zeros(1, dtype=torch.uint8, device=masks.device)
    masks = masks.contiguous()
    return masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _dp(D: int) -> int:
    return max(16, _pow2(D))


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _tables(*tabs: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() if t.dtype == torch.int32 else t.to(torch.int32).contiguous() for t in tabs]


def _band_args(band: list[int] | tuple, Lk: int, Lq: int) -> tuple[tuple[int, ...], bool, bool]:
    """(offset, left, right, sinks, sink_min_d), BAND, FULL_RUN."""
    if not band:
        return (Lk - Lq, 0, 0, 0, 0), False, False
    left, right, sinks, sink_min_d, run = band
    return (Lk - Lq, int(left), int(right), int(sinks), int(sink_min_d)), True, bool(run)


def _num_sms(device: torch.device) -> int:
    """The device's SM count (4 for the CPU interpreter, so persistent grids still stride)."""
    if device.type != "cuda":
        return 4
    return _plan.sm_count(device.index if device.index is not None else torch.cuda.current_device())


class ForwardPlan:
    """What a tiled forward launch needs besides q, k, v, out and lse (Note [forward host cost])."""

    __slots__ = ("shape", "lse_shape", "tables", "dims", "offsets", "strides", "meta", "persistent_sms", "cfg",
                 "geometry", "tried")

    def __init__(self, q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, band=()):
        B, H, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        bs = masks.shape[-1]
        kv_num, kv_idx, kv_mid, fkv_num, fkv_idx = _tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx)
        self.tables = (kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, _masks(masks))
        self.shape, self.lse_shape = q.shape, (B, H, Lq)
        offsets, BAND, FULL_RUN = _band_args(band, Lk, Lq)
        self.dims, self.offsets = (B, H, Lq, bs, scale * LOG2E, Lk, H // Hkv), offsets
        o_strides = (H * Lq * D if B > 1 else 0, Lq * D if H > 1 else 0, D)  # out: a fresh contiguous q.shape
        self.strides = (_s3(q), _s3(k), _s3(v), o_strides, *_table_strides(kv_num, kv_idx, fkv_idx))
        self.meta = dict(D=D, DP=_dp(D), BS=bs, EVEN=Lk % bs == 0, BAND=BAND, FULL_RUN=FULL_RUN)
        self.persistent_sms = PERSISTENT_WAVES * _num_sms(q.device)
        self.geometry = None
        key = _plan.facts(kv_idx, fkv_idx, _cdiv(Lk, bs), bs, H // Hkv) + ("|band" if BAND else "")
        self.cfg = _tuning.choose("fwd", D, q.dtype, key, q.device, bs, pairs=Lq * Lk, even=Lk % bs == 0,
                                  banded=BAND, bench=lambda c: _bench(lambda: self._launch(c, q, k, v, *self._outputs(q))))
        self.tried = False

    def _outputs(self, q) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(self.shape, dtype=q.dtype, device=q.device),
                torch.empty(self.lse_shape, dtype=torch.float32, device=q.device))

    def _geometry(self, cfg: _tuning.Config) -> tuple:
        """(cfg, grid, NM, total, work order) of a launch with ``cfg``, kept for the plan's current config."""
        if self.geometry is not None and self.geometry[0] is cfg:
            return self.geometry
        B, H, Lq, bs = self.dims[:4]
        kv_num, fkv_num = self.tables[0], self.tables[3]
        NM = _cdiv(Lq, cfg.block_m)
        total = B * H * NM
        if cfg.persistent:
            work = _plan.order(kv_num, fkv_num, B, H, cfg.block_m, bs, Lq)
            grid = (min(total, self.persistent_sms),)
        else:
            work, grid = kv_num, (total,)  # ORDER is unused
        geometry = (cfg, grid, NM, total, work)
        if not _plan.capturing(kv_num.device):
            self.geometry = geometry
        return geometry

    def _launch(self, cfg: _tuning.Config, q, k, v, o, lse) -> None:
        _, grid, NM, total, work = self._geometry(cfg)
        B, H, Lq, bs, scale2, Lk, G = self.dims
        attn_fwd_kernel[grid](
            q, k, v, o, lse, *self.tables, work, scale2, Lq, Lk, H, G, NM, total, *self.offsets, *self.strides,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PERSISTENT=cfg.persistent,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **self.meta,
        )

    def run(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) for inputs of the shapes and strides this plan was made for (last dims contiguous)."""
        o, lse = self._outputs(q)
        if self.tried:
            self._launch(self.cfg, q, k, v, o, lse)
        else:  # first run: fewer stages / smaller tiles if the chosen config does not fit
            self.cfg = _tuning.run_with_fallback(lambda c: self._launch(c, q, k, v, o, lse), self.cfg)
            self.tried = True
        return o, lse


def forward(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, band=()):
    """out [B, H, Lq, D] (q's dtype), lse fp32 [B, H, Lq] (natural log) through the tiled kernel."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    return ForwardPlan(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale, band).run(q, k, v)


_counters: dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` counters; the decode kernel leaves it zeroed (Note [fused
    combine]). Under CUDA-graph capture a fresh one is made, owned by the graph."""
    if _plan.capturing(device):
        return torch.zeros(n, dtype=torch.int32, device=device)
    have = _counters.get(device)
    if have is None or have.numel() < n:
        have = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _counters[device] = have
    return have


class DecodePlan:
    """What a split-K decode launch needs besides q, k, v, out and lse (Note [decode host cost])."""

    __slots__ = ("shape", "lse_shape", "tables", "grid", "progs", "scratch_shapes", "scratch", "scalars",
                 "strides", "meta", "cfg", "tried")

    def __init__(self, q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, band=(),
                 grouped: bool = False):
        B, H, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = masks.shape[-1]
        kv_num, kv_idx, kv_mid, fkv_num, fkv_idx = _tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx)
        self.tables = (kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, _masks(masks))
        # grouped: per-head tables whose G heads of a key/value group are equal (the caller says so), read at
        # the group's first head, so the group is packed like a head-shared table
        pack = (kv_num.shape[1] == 1 or grouped) and G * Lq <= 128
        GP, HP = (G, Hkv) if pack else (1, H)
        total = fkv_idx.shape[-1] + kv_idx.shape[-1]
        progs = B * HP
        S = max(1, min(total, _cdiv(2 * _num_sms(q.device), progs)))
        PER = _cdiv(total, S)
        S = _cdiv(total, PER)
        DP = _dp(D)
        self.shape, self.lse_shape = q.shape, (B, H, Lq)
        self.grid, self.progs = (S, progs), progs
        self.scratch_shapes = ((B, H, S, Lq, DP), (B, H, S, Lq))
        self.scratch = None
        offsets, BAND, FULL_RUN = _band_args(band, Lk, Lq)
        self.scalars = (scale * LOG2E, Lq, Lk, H, HP, G, GP, S, PER, *offsets)
        o_strides = (H * Lq * D if B > 1 else 0, Lq * D if H > 1 else 0, D)  # out: a fresh contiguous q.shape
        self.strides = (_s3(q), _s3(k), _s3(v), o_strides, *_table_strides(kv_num, kv_idx, fkv_idx))
        self.meta = dict(D=D, DP=DP, BS=bs, BLOCK_M=max(16, _pow2(GP * Lq)), EVEN=Lk % bs == 0, BAND=BAND,
                         FULL_RUN=FULL_RUN)
        key = _plan.facts(kv_idx, fkv_idx, _cdiv(Lk, bs), bs, G) + ("|band" if BAND else "")
        self.cfg = _tuning.choose("decode", D, q.dtype, key, q.device, bs, pairs=Lq * Lk, even=Lk % bs == 0,
                                  bench=lambda c: _bench(lambda: self._launch(c, q, k, v, *self._buffers(q))))
        self.tried = False

    def _buffers(self, q) -> tuple:
        """(out, lse, partial outputs, partial lse, counter) for one call."""
        dev = q.device
        scratch = self.scratch
        if scratch is None or _plan.capturing(dev):
            scratch = (torch.empty(self.scratch_shapes[0], dtype=torch.float32, device=dev),
                       torch.empty(self.scratch_shapes[1], dtype=torch.float32, device=dev))
            if not _plan.capturing(dev):
                self.scratch = scratch
        o = torch.empty(self.shape, dtype=q.dtype, device=dev)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=dev)
        return (o, lse, *scratch, _counter(dev, self.progs))

    def _launch(self, cfg: _tuning.Config, q, k, v, o, lse, op, lp, count) -> None:
        decode_kernel[self.grid](
            q, k, v, o, lse, op, lp, count, *self.tables, *self.scalars, *self.strides,
            BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **self.meta,
        )

    def run(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) for inputs of the shapes and strides this plan was made for (last dims contiguous)."""
        bufs = self._buffers(q)
        if self.tried:
            self._launch(self.cfg, q, k, v, *bufs)
        else:  # first run: fewer stages / smaller tiles if the chosen config does not fit
            self.cfg = _tuning.run_with_fallback(lambda c: self._launch(c, q, k, v, *bufs), self.cfg)
            self.tried = True
        return bufs[0], bufs[1]


def decode(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, band=()):
    """Split-K forward for Lq <= 16 (all queries in query block 0), one launch. Same outputs as :func:`forward`."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    return DecodePlan(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale, band).run(q, k, v)


_table_plans: dict[tuple, DecodePlan] = {}
_TABLE_PLANS = 16


def decode_tables(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, *, grouped: bool = False):
    """:func:`decode` on block tables the caller built (e.g. on the device from a decode step's selected pages,
    with no host synchronisation): tables ``[B, Ht, 1(, W)]`` int32 with ``Ht`` in (1, H), ``masks`` ``[M, BS, BS]``
    (only row 0 of a tile is read when Lq == 1). ``grouped``: the tables are per query head and equal within each
    key/value group (GQA packing, K/V read once per group). The launch plan is cached per input and table
    signature (shapes, strides, dtype, scale), so steps and layers of one shape share it; each call only swaps
    the tables in."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    key = (_decode_key(q, k, v, scale), kv_num.shape, kv_idx.shape, kv_mid.shape, fkv_num.shape, fkv_idx.shape,
           masks.shape, bool(grouped))
    plan = _table_plans.get(key)
    if plan is None:
        plan = DecodePlan(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale, (), grouped)
        if not _plan.capturing(q.device):
            if len(_table_plans) >= _TABLE_PLANS:
                _table_plans.pop(next(iter(_table_plans)))
            _table_plans[key] = plan
        return plan.run(q, k, v)
    plan.tables = (*_tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx), _masks(masks))
    return plan.run(q, k, v)


_decode_plans = _plan.PerObject()
_forward_plans = _plan.PerObject()
_PLANS_PER_LAYOUT = 8


def _decode_key(q, k, v, scale: float) -> tuple:
    """The input signature a cached launch plan is valid for (a cache hit skips every check)."""
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, scale)


def _cached(store: _plan.PerObject, q, k, v, layout, scale: float):
    plans = store.get(layout)
    if plans is None:
        return None
    plan = plans.get(_decode_key(q, k, v, scale))
    if plan is None:
        return None
    return plan.run(_lastdim(q), _lastdim(k), _lastdim(v))


def _keep(store: _plan.PerObject, layout, key: tuple, plan, device: torch.device) -> None:
    """Keep ``plan`` for ``layout`` and input signature ``key`` (not while a CUDA graph is captured or traced)."""
    if _plan.capturing(device) or torch.compiler.is_compiling():
        return
    plans = store.get(layout)
    if plans is None:
        plans = {}
        store[layout] = plans
    if len(plans) >= _PLANS_PER_LAYOUT:  # one layout seen with many input signatures: keep the newest
        plans.pop(next(iter(plans)))
    plans[key] = plan


def cached_decode(q, k, v, layout, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`decode` through the plan cached for this layout and input signature; None when there is none yet
    (then :func:`decode_layout` makes it). The inputs were validated when the plan was made."""
    return _cached(_decode_plans, q, k, v, layout, scale)


def decode_layout(q, k, v, layout, scale: float, band=()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode` on a Layout's tables; the plan is cached (not while a CUDA graph is captured: its
    tuning and band check are skipped there) for :func:`cached_decode`."""
    key = _decode_key(q, k, v, scale)
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    plan = DecodePlan(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.kv_mask_ids,
                      layout.full_kv_num_blocks, layout.full_kv_indices, layout.masks, scale, band)
    _keep(_decode_plans, layout, key, plan, q.device)
    return plan.run(q, k, v)


def cached_forward(q, k, v, layout, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`forward` through the plan cached for this layout and input signature (Note [forward host cost]);
    None when there is none yet (then :func:`forward_layout` makes it)."""
    return _cached(_forward_plans, q, k, v, layout, scale)


def forward_layout(q, k, v, layout, scale: float, band=()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward` on a Layout's tables; the launch plan is kept for :func:`cached_forward`."""
    key = _decode_key(q, k, v, scale)
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    plan = ForwardPlan(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.kv_mask_ids,
                       layout.full_kv_num_blocks, layout.full_kv_indices, layout.masks, scale, band)
    _keep(_forward_plans, layout, key, plan, q.device)
    return plan.run(q, k, v)


def _tma_modes(q: torch.Tensor, do: torch.Tensor, dq32: torch.Tensor) -> tuple[bool, bool]:
    """(TMA loads of q / dO, TMA reduction of dQ) for the atomic backward, from ``SPATTN_TRITON_TMA`` ("0": off,
    the default; "load": loads only; "1": both, CUDA only: the interpreter has no descriptor reductions), where
    the head dim is a power of two >= 16 and the tensors' strides are 16-byte aligned. Off by default: compiled
    for sm_90 on the CPU (triton 3.9) the TMA variants spilled more (64x128: 472 bytes of stack with TMA loads,
    424 with loads + reduction, against 264) and the reduction needed 241 KB of shared memory, above the 227 KB
    limit (``benchmarks/NOTES-kernels.md``, v6; ``benchmarks/results/cpu/kernels-regs*.json``)."""
    mode = os.environ.get("SPATTN_TRITON_TMA", "0")
    if mode not in ("0", "load", "1"):
        raise ValueError(f"SPATTN_TRITON_TMA must be 0, load or 1, got {mode!r}")
    if mode == "1" and q.device.type != "cuda":
        mode = "load"
    D = q.shape[-1]
    ok = D == _dp(D) and all(
        t.stride(-1) == 1 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
        for t in (q, do, dq32))
    if mode == "0" or not ok:
        return False, False
    return True, mode == "1"


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def backward(do, q, k, v, o, lse, dlse, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx,
             q_num, q_idx, q_mid, fq_num, fq_idx, masks, scale: float, method: str | None = None,
             deterministic: bool = False):
    """(dq, dk, dv) in the input dtypes; ``dlse`` (or None) is the gradient flowing into lse. ``method``:
    "split" or "atomic" (Note [atomic backward] in ``_backward.py``; None: :func:`backward_method`);
    ``deterministic`` always takes "split". Always the stored masks (Note [no band in backward])."""
    if deterministic:
        method = "split"
    elif method is None:
        method = backward_method()
    elif method not in BACKWARD_METHODS:
        raise ValueError(f"method must be one of {BACKWARD_METHODS}, got {method!r}")
    atomic = method == "atomic"
    q, k, v, o, do = _lastdim(q), _lastdim(k), _lastdim(v), _lastdim(o), _lastdim(do)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    bs = masks.shape[-1]
    q_num, q_idx, q_mid, fq_num, fq_idx = _tables(q_num, q_idx, q_mid, fq_num, fq_idx)
    m8 = _masks(masks)
    DP = _dp(D)
    lse = lse.contiguous()
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    dlse32 = None if dlse is None else dlse.to(torch.float32).contiguous()
    dq32 = torch.empty(B, H, Lq, D, dtype=torch.float32, device=q.device) if atomic else delta
    PB = 64
    attn_bwd_preprocess_kernel[(_cdiv(Lq, PB), B * H)](
        o, do, lse, delta if dlse32 is None else dlse32, delta, lse2, dq32, Lq, H, _s3(o), _s3(do), _s3(dq32)
        if atomic else (0, 0, 0), D=D, DP=DP, BLOCK_M=PB, HAS_DLSE=dlse32 is not None, ZERO_DQ=atomic)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    even = Lk % bs == 0 and Lq % bs == 0

    if atomic:
        tma, tma_dq = _tma_modes(q, do, dq32)

        def launch_fused(cfg: _tuning.Config, dq_acc: torch.Tensor = dq32) -> None:
            block = [1, 1, cfg.block_m, D]
            descs = (_descriptor(q, block) if tma else None, _descriptor(do, block) if tma else None,
                     _descriptor(dq_acc, block) if tma_dq else None)
            grid, first = _bwd_grid(_cdiv(Lk, cfg.block_n), B * Hkv)
            attn_bwd_fused_kernel[grid](
                q, k, v, do, dk, dv, dq_acc, lse2, delta, q_num, q_idx, q_mid, fq_num, fq_idx, m8, *descs,
                scale * LOG2E, scale, Lq, Lk, H, Hkv, G, first,
                _s3(q), _s3(k), _s3(v), _s3(do), _s3(dk), _s3(dv), _s3(dq_acc),
                *_table_strides(q_num, q_idx, fq_idx),
                D=D, DP=DP, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma, TMA_DQ=tma_dq,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

        def bench_fused(cfg: _tuning.Config) -> float:  # tuning accumulates into a scratch buffer, not dq32
            scratch = torch.zeros_like(dq32)
            return _bench(lambda: (scratch.zero_(), launch_fused(cfg, scratch)))

        key = _plan.facts(q_idx, fq_idx, _cdiv(Lq, bs), bs, G)
        cfg = _tuning.choose("bwd", D, q.dtype, key, q.device, bs, bench=bench_fused, pairs=Lq * Lk, even=even)
        _tuning.run_with_fallback(launch_fused, cfg)
        torch.mul(dq32, scale, out=dq)
        return dq, dk, dv

    kv_num, kv_idx, kv_mid, fkv_num, fkv_idx = _tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx)

    def launch_dq(cfg: _tuning.Config) -> None:
        grid, first = _bwd_grid(_cdiv(Lq, cfg.block_m), B * H)
        attn_bwd_dq_kernel[grid](
            q, k, v, do, dq, lse2, delta, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, m8,
            scale * LOG2E, scale, Lq, Lk, H, G, first,
            _s3(q), _s3(k), _s3(v), _s3(do), _s3(dq), *_table_strides(kv_num, kv_idx, fkv_idx),
            D=D, DP=DP, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN=Lk % bs == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def launch_dkdv(cfg: _tuning.Config) -> None:
        grid, first = _bwd_grid(_cdiv(Lk, cfg.block_n), B * Hkv)
        attn_bwd_dkdv_kernel[grid](
            q, k, v, do, dk, dv, lse2, delta, q_num, q_idx, q_mid, fq_num, fq_idx, m8,
            scale * LOG2E, scale, Lq, Lk, H, Hkv, G, first,
            _s3(q), _s3(k), _s3(v), _s3(do), _s3(dk), _s3(dv), *_table_strides(q_num, q_idx, fq_idx),
            D=D, DP=DP, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    key = _plan.facts(kv_idx, fkv_idx, _cdiv(Lk, bs), bs, G)
    cfg = _tuning.choose("dq", D, q.dtype, key, q.device, bs, bench=lambda c: _bench(lambda: launch_dq(c)),
                         pairs=Lq * Lk, even=even)
    _tuning.run_with_fallback(launch_dq, cfg)
    key = _plan.facts(q_idx, fq_idx, _cdiv(Lq, bs), bs, G)
    cfg = _tuning.choose("dkdv", D, q.dtype, key, q.device, bs, bench=lambda c: _bench(lambda: launch_dkdv(c)),
                         pairs=Lq * Lk, even=even)
    _tuning.run_with_fallback(launch_dkdv, cfg)
    return dq, dk, dv
