"""Per-candidate measurements on captured attention inputs: cost, FLOPs, recall per layer and head,
reachability through the stack, measured attention latency, and a block picture."""

from __future__ import annotations

import math
import os
import statistics
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import spattn
from spattn.coverage import measure, reachability
from spattn.hierarchical import describe as hierarchical_view
from spattn.hierarchical import fine_layout, hierarchical_attention
from spattn.layout.dense import to_dense
from spattn.report.candidates import Candidate, causal_pairs, layout_cost

Captures = list[list[tuple[torch.Tensor, torch.Tensor]]]  # [chunk][layer] -> (query, key)


def sig(x: float, digits: int = 6) -> float:
    """Round to ``digits`` significant digits (keeps results.json readable and stable)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def _p5(values: torch.Tensor) -> float:
    flat = values.double().flatten()
    k = max(1, math.ceil(0.05 * flat.numel()))  # nearest-rank 5th percentile
    return float(flat.kthvalue(k).values)


LATENCY_MAX_REPEATS = 25  # interleaved (dense, candidate) pairs at most
LATENCY_MAX_SECONDS = 1.0  # ... or this much timing past the minimum repeats (a default run times ~30 rows)
SPREAD_TARGET = 0.10  # stop once both spreads (IQR / median) are at most this
SPREAD_NOISY = 0.25  # a row whose spread is larger is flagged and not ranked by latency


def _once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def spread(samples: list[float]) -> float:
    """Relative spread of timings: interquartile range over the median."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med if med > 0 else 0.0


def time_call(fn, repeats: int, device: torch.device) -> float:
    """Median wall time in milliseconds over ``repeats`` calls after one warm-up call."""
    _once(fn, device)
    return statistics.median(_once(fn, device) for _ in range(repeats))


def interleaved_latency(fn, baseline, *, repeats: int, device: torch.device) -> dict[str, Any]:
    """Time ``fn`` against ``baseline`` in alternation (baseline, fn, baseline, fn, ...), so that a load change on
    the machine hits both alike; repeat until both spreads are at most ``SPREAD_TARGET`` (at least ``repeats``
    pairs, at most ``LATENCY_MAX_REPEATS`` or ``LATENCY_MAX_SECONDS`` past the minimum).

    Returns medians (ms), the median of the paired ratios ``baseline / fn`` (``speedup_vs_dense``), both spreads,
    the number of pairs, the machine's 1-minute load average, and ``noisy`` when a spread exceeds ``SPREAD_NOISY``
    (such a row is shown but not ranked)."""
    _once(baseline, device)
    _once(fn, device)
    a: list[float] = []
    b: list[float] = []
    t0 = None
    while True:
        b.append(_once(baseline, device))
        a.append(_once(fn, device))
        if len(a) == repeats:
            t0 = time.perf_counter()
        if len(a) >= repeats:
            settled = spread(a) <= SPREAD_TARGET and spread(b) <= SPREAD_TARGET
            if settled or len(a) >= LATENCY_MAX_REPEATS or time.perf_counter() - t0 > LATENCY_MAX_SECONDS:
                break
    ratios = [y / x for x, y in zip(a, b, strict=True) if x > 0]
    worst = max(spread(a), spread(b))
    return {
        "median_ms": sig(statistics.median(a), 4),
        "dense_ms": sig(statistics.median(b), 4),
        "speedup_vs_dense": sig(statistics.median(ratios), 4) if ratios else None,
        "spread": sig(spread(a), 3),
        "dense_spread": sig(spread(b), 3),
        "repeats": len(a),
        "load_average": sig(os.getloadavg()[0], 3) if hasattr(os, "getloadavg") else None,
        "noisy": worst > SPREAD_NOISY,
    }


class _LiveTensors(TorchDispatchMode):
    """Bytes of the tensors the dispatched ops allocate, alive at once; ``peak`` is the high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in self._seen:
                size = t.untyped_storage().nbytes()
                self._seen.add(id(t))
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, id(t), size)
        return out


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak memory one call of ``fn`` allocates beyond its inputs: ``torch.cuda.max_memory_allocated`` on CUDA,
    else the high-water mark of the tensors its ops create (dispatch-level accounting)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with _LiveTensors() as mode:
        fn()
    return int(mode.peak)


def latency_inputs(captures: Captures, seed: int, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query and key of the middle layer of the first calibration chunk, and a seeded random value of the key's
    shape (latency does not depend on the values), on ``device`` (captures are kept on the CPU), cast to ``dtype``
    (a torch dtype or its name, e.g. ``"bfloat16"``; default None: the captured dtype; Note [latency dtype])."""
    layers = captures[0]
    q, k = layers[len(layers) // 2]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(k.shape, generator=gen)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or q.dtype
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _dense_call(q, k, v, backend: str, block_size: int):
    return lambda: spattn.attention(q, k, v, spattn.Causal(), causal=True, backend=backend, block_size=block_size)


def dense_latency(captures: Captures, backend: str, repeats: int, seed: int, block_size: int,
                  device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """Dense causal attention on the timing inputs (:func:`latency_inputs`, in ``dtype``): spattn on ``backend``
    and SDPA, medians; peak memory of both."""
    q, k, v = latency_inputs(captures, seed, device, dtype)
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # noqa: E731
    causal = _dense_call(q, k, v, backend, block_size)
    ms_spattn = time_call(causal, repeats, q.device)
    ms_sdpa = time_call(sdpa, repeats, q.device)
    return {"backend": backend, "spattn_causal_ms": sig(ms_spattn, 4), "sdpa_ms": sig(ms_sdpa, 4),
            "shape": [list(q.shape), list(k.shape)], "dtype": str(q.dtype).removeprefix("torch."),
            "peak_memory_mb": sig(peak_memory_bytes(causal, q.device) / 2**20, 4),
            "sdpa_peak_memory_mb": sig(peak_memory_bytes(sdpa, q.device) / 2**20, 4)}


_DENSE_PROBS_MAX_LEN = 4096  # above this, recall goes through spattn.coverage.measure (never L x L)


def dense_probs(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """float32 [H, L, L]: the dense causal attention probabilities of one layer (query [1, H, L, D], key
    [1, Hkv, L, D]). Computed once per layer and shared by every candidate (short chunks only)."""
    H, Hkv, L, D = query.shape[1], key.shape[1], query.shape[2], query.shape[3]
    k = key[0].repeat_interleave(H // Hkv, 0)
    scores = (query[0] @ k.transpose(-1, -2)) * D**-0.5
    future = torch.ones(L, L, dtype=torch.bool, device=query.device).triu_(1)
    return torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)


class _Accumulator:
    """Cost, FLOPs and per-query recall of one candidate, gathered layer by layer."""

    def __init__(self, cand: Candidate, n_layers: int) -> None:
        self.cand = cand
        self.recalls: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.keys: list[float] = []
        self.blocks: list[float] = []
        self.flops_tok: list[float] = []
        self.flops_blk: list[float] = []
        self.layouts: list[spattn.Layout] = []  # chunk 0, one per layer
        self.static: spattn.Layout | None = None
        self.per_layer: list[spattn.Layout] | None = None  # a static plan's layout of each layer


def coverage_pass(cands: list[Candidate], captures: Captures, *, block_size: int, head_dim: int,
                  progress=None, device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """Cost, recall per layer and head, reachability and a block picture of every candidate, on the
    calibration captures (moved to ``device`` one layer at a time). Layers outer, candidates inner: the dense
    attention of a layer is computed once."""
    n_layers = len(captures[0])
    L = captures[0][0][0].shape[2]
    H = captures[0][0][0].shape[1]
    accs = [_Accumulator(c, n_layers) for c in cands]
    for acc in accs:
        if not acc.cand.dynamic and acc.cand.plan is None:
            acc.static = spattn.compile(acc.cand.pattern, L, L, causal=True, block_size=block_size, device=device)
        elif acc.cand.plan is not None and not acc.cand.dynamic:  # a static plan: one layout per layer
            acc.per_layer = [spattn.compile(acc.cand.pattern_for(i), L, L, causal=True, block_size=block_size,
                                            heads=H, device=device) for i in range(n_layers)]
    small = L <= _DENSE_PROBS_MAX_LEN
    for c, layers in enumerate(captures):
        for layer, (q, k) in enumerate(layers):
            q, k = q.to(device), k.to(device)
            probs = dense_probs(q, k) if small else None
            for acc in accs:
                view = None
                if acc.static is not None:
                    lay = acc.static
                elif acc.per_layer is not None:
                    lay = acc.per_layer[layer]
                elif isinstance(acc.cand.pattern, spattn.Hierarchical):  # recall on its fine keys, cost of all
                    view = hierarchical_view(q, k, acc.cand.pattern, block_size=block_size)
                    lay = view.layout
                else:
                    lay = spattn.compile(acc.cand.pattern_for(layer), L, L, causal=True, block_size=block_size,
                                         heads=H, query=q, key=k)
                if view is None:
                    kc, bc = layout_cost(lay)
                    ftok, fblk = lay.flops(head_dim, heads=H), lay.flops(head_dim, heads=H, level="block")
                else:
                    kc, bc = view.cost["keys_fraction"], view.cost["block_fraction"]
                    ftok, fblk = view.cost["attention_flops"], view.cost["attention_flops_block"]
                acc.keys.append(kc)
                acc.blocks.append(bc)
                acc.flops_tok.append(ftok)
                acc.flops_blk.append(fblk)
                if probs is not None:
                    recall = (probs * to_dense(lay)[0].to(probs.device)).sum(-1).double().clamp_(max=1.0).cpu()
                else:
                    recall = measure(q, k, lay, causal=True, topk=0).recall[0].double().cpu()  # [H, L]
                acc.recalls[layer].append(recall)
                if c == 0:
                    acc.layouts.append(lay)
            del probs
            if progress is not None:
                progress(f"chunk {c + 1}, layer {layer + 1}/{n_layers}")
    dense_flops = 4.0 * causal_pairs(L) * head_dim * H
    out = {}
    for acc in accs:
        allr = torch.stack([torch.cat(r, dim=-1) for r in acc.recalls])  # [layers, H, C*L]
        head_p5 = [[sig(_p5(allr[i, h]), 4) for h in range(H)] for i in range(n_layers)]
        reach = reachability(acc.static if acc.static is not None else acc.layouts, causal=True, max_layers=n_layers)
        mid = acc.layouts[len(acc.layouts) // 2]
        n_chunks = len(captures)
        out[acc.cand.id] = {
            "cost": {
                "keys_fraction": sig(statistics.fmean(acc.keys)),
                "keys_fraction_max": sig(max(acc.keys)),
                "block_fraction": sig(statistics.fmean(acc.blocks)),
                "attention_gflops": sig(sum(acc.flops_tok) / n_chunks / 1e9),
                "attention_gflops_block": sig(sum(acc.flops_blk) / n_chunks / 1e9),
                "dense_attention_gflops": sig(dense_flops * n_layers / 1e9),
            },
            "recall": {
                "mean": sig(float(allr.mean())),
                "p5": sig(_p5(allr)),
                "min": sig(float(allr.min())),
                "per_layer_mean": [sig(float(x)) for x in allr.mean(dim=(1, 2))],
                "per_layer_head_mean": [[sig(float(x), 4) for x in row] for row in allr.mean(-1)],
                "per_layer_head_p5": head_p5,
            },
            "reach": {"fraction": [sig(float(x)) for x in reach.fraction], "layers_to_full": reach.layers_to_full},
            "picture": {"layer": len(acc.layouts) // 2, "head": 0, "block_status": mid.block_status()[0, 0].tolist()},
        }
    return out


def layout_fingerprint(layout: spattn.Layout) -> str:
    """A digest of a layout's tables: two candidates that compile to the same layout get one timing."""
    import hashlib

    h = hashlib.sha256()
    for t in (layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
              layout.kv_mask_ids, layout.masks):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def candidate_latency(pattern, captures: Captures, *, block_size: int, backend: str, repeats: int,
                      seed: int, memo: dict[str, dict[str, Any]] | None = None,
                      device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """Time ``spattn.attention`` with ``pattern`` on the middle layer of the first calibration chunk, interleaved
    with dense causal attention on the same backend (:func:`interleaved_latency`), and its peak memory.

    A static pattern is compiled once outside the timed call (a layout is reused for every input of that
    shape) and timed once per distinct layout (``memo``, keyed by :func:`layout_fingerprint`); a dynamic pattern
    is timed with its selection, which runs for every input. ``compile_ms`` is the compile (and selection) time
    alone. The inputs are cast to ``dtype`` (default None: the captured dtype; Note [latency dtype])."""
    q, k, v = latency_inputs(captures, seed, device, dtype)
    if isinstance(pattern, spattn.Hierarchical):
        return hierarchical_latency(pattern, q, k, v, block_size=block_size, backend=backend, repeats=repeats)
    dynamic = pattern.contains_dynamic()

    def build():
        return spattn.compile(pattern, q.shape[2], k.shape[2], causal=True, block_size=block_size, device=q.device,
                              heads=q.shape[1], query=q if dynamic else None, key=k if dynamic else None)

    notes = []
    try:
        build()
    except (RuntimeError, TypeError) as exc:  # a selection that cannot run in the latency dtype: say so
        if dtype is None or q.dtype == captures[0][0][0].dtype:
            raise
        notes.append(f"compiling in {str(q.dtype).removeprefix('torch.')} failed ({str(exc)[:200]}); timed in the "
                     "captured dtype")
        q, k, v = latency_inputs(captures, seed, device)
    compile_ms = time_call(build, repeats, q.device)
    target = pattern if dynamic else build()
    key = None if dynamic else layout_fingerprint(target)
    if memo is not None and key in memo:
        return dict(memo[key], compile_ms=sig(compile_ms, 4), shared_timing=True)
    try:
        spattn.attention(q, k, v, target, causal=True, backend=backend, block_size=block_size)
    except RuntimeError as exc:  # e.g. a kernel that does not support this shape: say so, time what auto runs
        notes.append(f"{backend} could not run ({exc}); timed backend='auto'")
        backend = "auto"
    call = lambda: spattn.attention(q, k, v, target, causal=True, backend=backend,  # noqa: E731
                                    block_size=block_size)
    out = interleaved_latency(call, _dense_call(q, k, v, backend, block_size), repeats=repeats, device=q.device)
    out.update({"backend": backend, "dtype": str(q.dtype).removeprefix("torch."), "compile_ms": sig(compile_ms, 4),
                "includes_selection": dynamic,
                "peak_memory_mb": sig(peak_memory_bytes(call, q.device) / 2**20, 4), "shared_timing": False})
    if notes:
        out["note"] = "; ".join(notes)
    if memo is not None and key is not None:
        memo[key] = out
    return out


def hierarchical_latency(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                         backend: str, repeats: int) -> dict[str, Any]:
    """:func:`candidate_latency` of a ``spattn.Hierarchical``: the whole call
    (``spattn.hierarchical.hierarchical_attention``: pooling, the compressed branch, the selection, the branch
    attentions and the mix; every branch on ``backend``) against dense causal attention on the same backend;
    ``compile_ms`` is the selection alone (the compressed branch's scores and the chosen blocks' tables)."""
    from spattn.hierarchical import branch_layouts

    compile_ms = time_call(lambda: branch_layouts(q, k, pattern), repeats, q.device)
    call = lambda: hierarchical_attention(q, k, v, pattern, backend=backend)  # noqa: E731
    out = interleaved_latency(call, _dense_call(q, k, v, backend, block_size), repeats=repeats, device=q.device)
    out.update({"backend": backend, "dtype": str(q.dtype).removeprefix("torch."), "compile_ms": sig(compile_ms, 4),
                "includes_selection": True,
                "peak_memory_mb": sig(peak_memory_bytes(call, q.device) / 2**20, 4), "shared_timing": False})
    return out


def dropped_threads(pattern, layers: list[tuple[torch.Tensor, torch.Tensor]], *, block_size: int,
                    top: int = 5, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Which threads a pattern (or a :class:`~spattn.Plan`: each layer's own pattern) cuts on one chunk: per
    query token, the share of its dense attention the pattern drops (mean over layers and heads), and the ``top``
    key tokens whose dropped mass is largest.

    ``layers``: per layer ``(query [1, H, L, D], key [1, Hkv, L, D])`` of one chunk (causal self-attention).
    Returns ``dropped`` ``[L]``, ``lost_keys`` / ``lost_mass`` ``[L][top]`` and ``per_layer_head`` ``[layers][H]``
    (mean dropped share per layer and head)."""
    L = layers[0][0].shape[2]
    acc = torch.zeros(L, L, dtype=torch.float32)
    per_layer_head = []
    from spattn.integrations.plan import Plan

    plan = pattern if isinstance(pattern, Plan) else Plan.uniform(pattern)
    for i, (q, k) in enumerate(layers):  # each layer moved to ``device`` in turn
        q, k = q.to(device), k.to(device)
        probs = dense_probs(q, k)  # [H, L, L]
        pattern = plan.pattern_for(i) or spattn.Full()
        dynamic = pattern.contains_dynamic()
        if isinstance(pattern, spattn.Hierarchical):  # the keys it reads at full resolution
            lay = fine_layout(q, k, pattern)
        else:
            lay = spattn.compile(pattern, L, L, causal=True, block_size=block_size, heads=q.shape[1],
                                 query=q if dynamic else None, key=k if dynamic else None)
        dropped = probs * ~lay.to_dense()[0].to(probs.device)  # [H, L, L]
        acc += dropped.mean(0).cpu()
        per_layer_head.append([sig(float(x), 4) for x in dropped.sum(-1).mean(-1)])
        del probs, dropped
    acc /= len(layers)
    share = acc.sum(-1)
    mass, keys = acc.topk(min(top, L), dim=-1)
    return {"dropped": [sig(float(x), 4) for x in share], "lost_keys": keys.tolist(),
            "lost_mass": [[sig(float(x), 3) for x in row] for row in mass], "per_layer_head": per_layer_head}


KERNEL_ROUNDS = 15  # interleaved rounds of the kernel references on CUDA (each call timed per round)
KERNEL_ROUNDS_CPU = 5  # on the CPU (a dry run of the GPU path: eager Flex is slow there)
_KERNEL_INNER_CUDA = 10  # calls per timed round on CUDA (CUDA events around them: launch overhead amortised)


def _timed_rounds(calls: dict[str, Any], rounds: int, device: torch.device
                  ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Milliseconds per call of every ``calls[name]()``, round-robin (a, b, c, a, b, c, ...) so that a change of
    load or clock hits all alike, and the wall milliseconds of each one's first (warm-up, JIT) call. On CUDA each
    round times ``_KERNEL_INNER_CUDA`` back-to-back calls with CUDA events; on the CPU one call with the wall
    clock."""
    first = {name: _once(fn, device) for name, fn in calls.items()}
    inner = _KERNEL_INNER_CUDA if device.type == "cuda" else 1
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                out[name].append(start.elapsed_time(end) / inner)
            else:
                out[name].append(_once(fn, device))
    return out, first


def kernel_references(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                      backend: str, rounds: int | None = None) -> dict[str, Any]:
    """spattn on ``backend`` against FlexAttention and SDPA on the same inputs: one layer's
    ``query [1, H, L, D]``, ``key / value [1, Hkv, L, D]``, in their own dtype (the model's: the same kernels the
    report's latency column has compiled).

    The layout is compiled once outside the timed calls (a dynamic pattern's selection runs on these inputs
    first), so the three rows compare attention kernels alone: spattn and Flex on the same block tables
    (``Layout.to_block_mask()``, Flex compiled with ``torch.compile`` on CUDA, eager on the CPU), SDPA dense
    causal (key and value expanded to the query heads once; torch picks the kernel). Timed round-robin
    (:func:`_timed_rounds`, ``rounds`` default 15 on CUDA, 5 on the CPU); returns medians (ms), spreads
    (IQR / median), the ratios against SDPA and spattn against Flex, the first call of each (JIT included),
    ``noisy`` when a spread exceeds ``SPREAD_NOISY`` and ``max_abs_difference_vs_flex``, the largest difference
    between spattn's and Flex's outputs (the same run's correctness check: both compute the same masked
    attention)."""
    from spattn.bench.selection import flex_fn

    device = q.device
    if isinstance(pattern, spattn.Hierarchical):
        raise ValueError("Hierarchical is three attention calls mixed by gates, not one block mask: it has no "
                         "Flex reference (its latency column times spattn.hierarchical.hierarchical_attention)")
    if rounds is None:
        rounds = KERNEL_ROUNDS if device.type == "cuda" else KERNEL_ROUNDS_CPU
    dynamic = pattern.contains_dynamic()
    layout = spattn.compile(pattern, q.shape[2], k.shape[2], causal=True, block_size=block_size, device=device,
                            heads=q.shape[1], query=q if dynamic else None, key=k if dynamic else None)
    block_mask = layout.to_block_mask()
    flex = flex_fn(device)
    # Note [Flex tile and block size]: inductor's Flex kernel needs its tiles (BLOCK_M x BLOCK_N) to divide the
    # BlockMask's block size; with autotune off it has one config, whose tile (128 in fp32 on the H200) does not
    # divide a 64-token block (session 5's CUDA report: "Q and KV block size must be divisible by BLOCK_M and
    # BLOCK_N"), so on CUDA the tile is the layout's block size, at most 128.
    tile = min(block_size, 128)
    options = {"kernel_options": {"BLOCK_M": tile, "BLOCK_N": tile}} if device.type == "cuda" else {}
    gqa = k.shape[1] != q.shape[1]
    scale = q.shape[-1] ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rep = q.shape[1] // k.shape[1]  # key/value expanded once: every SDPA kernel (fp32 included) takes it
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    calls = {
        "spattn": lambda: spattn.attention(q, k, v, layout, causal=True, backend=backend, block_size=block_size),
        "flex": lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **options),
        "sdpa": lambda: sdpa(q, kr, vr, is_causal=True, scale=scale),
    }
    t0 = time.perf_counter()
    times, first = _timed_rounds(calls, rounds, device)
    # the correctness check of the same run: spattn and Flex compute the same masked attention (float32 difference)
    out_spattn, out_flex = calls["spattn"](), calls["flex"]()
    difference = float((out_spattn.float() - out_flex.float()).abs().max())
    med = {name: statistics.median(x) for name, x in times.items()}
    spreads = {name: spread(x) for name, x in times.items()}
    return {
        "backend": backend, "dtype": str(q.dtype).removeprefix("torch."), "shape": [list(q.shape), list(k.shape)],
        "rounds": rounds, "flex_kernel_options": options.get("kernel_options"),
        "keys_fraction": sig(layout.density()), "block_fraction": sig(layout.density("block")),
        "spattn_ms": sig(med["spattn"], 4), "flex_ms": sig(med["flex"], 4), "sdpa_ms": sig(med["sdpa"], 4),
        "spreads": {name: sig(s, 3) for name, s in spreads.items()},
        "spattn_vs_sdpa": sig(med["sdpa"] / med["spattn"], 4) if med["spattn"] > 0 else None,
        "flex_vs_sdpa": sig(med["sdpa"] / med["flex"], 4) if med["flex"] > 0 else None,
        "spattn_vs_flex": sig(med["flex"] / med["spattn"], 4) if med["spattn"] > 0 else None,
        "noisy": max(spreads.values()) > SPREAD_NOISY,
        "max_abs_difference_vs_flex": sig(difference, 3),
        "first_call_ms": {name: sig(ms, 4) for name, ms in first.items()},
        "timing_s": sig(time.perf_counter() - t0, 3),
        "load_average": sig(os.getloadavg()[0], 3) if hasattr(os, "getloadavg") else None,
    }
