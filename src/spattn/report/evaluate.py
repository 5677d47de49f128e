"""Per-candidate measurements on captured attention inputs: cost, FLOPs, recall per layer and head,
reachability through the stack, measured attention latency, and a block picture."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

import spattn
from spattn.coverage import measure, reachability
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


def time_call(fn, repeats: int, device: torch.device) -> float:
    """Median wall time in milliseconds over ``repeats`` calls after one warm-up call."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    once()
    return statistics.median(once() for _ in range(repeats))


def latency_inputs(captures: Captures, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query and key of the middle layer of the first calibration chunk, and a seeded random value of the key's
    shape (latency does not depend on the values)."""
    layers = captures[0]
    q, k = layers[len(layers) // 2]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(k.shape, generator=gen).to(k.device)
    return q, k, v


def dense_latency(captures: Captures, backend: str, repeats: int, seed: int, block_size: int) -> dict[str, Any]:
    q, k, v = latency_inputs(captures, seed)
    rep = q.shape[1] // k.shape[1]
    ms_spattn = time_call(lambda: spattn.attention(q, k, v, spattn.Causal(), causal=True, backend=backend,
                                                   block_size=block_size), repeats, q.device)
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ms_sdpa = time_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                        repeats, q.device)
    return {"backend": backend, "spattn_causal_ms": sig(ms_spattn, 4), "sdpa_ms": sig(ms_sdpa, 4),
            "shape": [list(q.shape), list(k.shape)]}


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


def coverage_pass(cands: list[Candidate], captures: Captures, *, block_size: int, head_dim: int,
                  progress=None) -> dict[str, dict[str, Any]]:
    """Cost, recall per layer and head, reachability and a block picture of every candidate, on the
    calibration captures. Layers outer, candidates inner: the dense attention of a layer is computed once."""
    n_layers = len(captures[0])
    L = captures[0][0][0].shape[2]
    H = captures[0][0][0].shape[1]
    accs = [_Accumulator(c, n_layers) for c in cands]
    for acc in accs:
        if not acc.cand.dynamic:
            acc.static = spattn.compile(acc.cand.pattern, L, L, causal=True, block_size=block_size)
    small = L <= _DENSE_PROBS_MAX_LEN
    for c, layers in enumerate(captures):
        for layer, (q, k) in enumerate(layers):
            probs = dense_probs(q, k) if small else None
            for acc in accs:
                lay = acc.static if acc.static is not None else spattn.compile(
                    acc.cand.pattern, L, L, causal=True, block_size=block_size, query=q, key=k)
                kc, bc = layout_cost(lay)
                acc.keys.append(kc)
                acc.blocks.append(bc)
                acc.flops_tok.append(lay.flops(head_dim, heads=H))
                acc.flops_blk.append(lay.flops(head_dim, heads=H, level="block"))
                if probs is not None:
                    recall = (probs * to_dense(lay)[0]).sum(-1).double().clamp_(max=1.0)  # [H, L]
                else:
                    recall = measure(q, k, lay, causal=True, topk=0).recall[0].double()
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


def candidate_latency(pattern, captures: Captures, *, block_size: int, backend: str, repeats: int,
                      seed: int) -> dict[str, Any]:
    """Median time of ``spattn.attention`` on the middle layer of the first calibration chunk.

    A static pattern is compiled once outside the timed call (a layout is reused for every input of that
    shape); a dynamic pattern is timed with its selection, which runs for every input. ``compile_ms`` is the
    compile (and selection) time alone."""
    q, k, v = latency_inputs(captures, seed)
    dynamic = pattern.contains_dynamic()

    def build():
        return spattn.compile(pattern, q.shape[2], k.shape[2], causal=True, block_size=block_size,
                              query=q if dynamic else None, key=k if dynamic else None)

    compile_ms = time_call(build, repeats, q.device)
    target = pattern if dynamic else build()
    note = None
    try:
        ms = time_call(lambda: spattn.attention(q, k, v, target, causal=True, backend=backend,
                                                block_size=block_size), repeats, q.device)
    except RuntimeError as exc:  # e.g. a kernel that does not support this shape: say so, time what auto runs
        note = f"{backend} could not run ({exc}); timed backend='auto'"
        backend = "auto"
        ms = time_call(lambda: spattn.attention(q, k, v, target, causal=True, backend="auto",
                                                block_size=block_size), repeats, q.device)
    out = {"backend": backend, "median_ms": sig(ms, 4), "compile_ms": sig(compile_ms, 4),
           "includes_selection": dynamic}
    if note:
        out["note"] = note
    return out
