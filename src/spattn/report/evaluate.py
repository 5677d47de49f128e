"""Per-candidate measurements on captured attention inputs: cost, FLOPs, recall per layer and head,
reachability through the stack, measured attention latency, and a block picture."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

import spattn
from spattn.report.candidates import Candidate, causal_pairs, layout_cost

Captures = list[list[tuple[torch.Tensor, torch.Tensor]]]  # [chunk][layer] -> (query, key)


def _coverage():
    try:
        from spattn.coverage import measure, reachability
    except ImportError:
        from spattn.coverage.measure import measure
        from spattn.coverage.reach import reachability
    return measure, reachability


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


def dense_latency(captures: Captures, backend: str, repeats: int, seed: int) -> dict[str, Any]:
    q, k, v = latency_inputs(captures, seed)
    rep = q.shape[1] // k.shape[1]
    ms_spattn = time_call(lambda: spattn.attention(q, k, v, spattn.Causal(), causal=True, backend=backend,
                                                   block_size=64), repeats, q.device)
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ms_sdpa = time_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                        repeats, q.device)
    return {"backend": backend, "spattn_causal_ms": sig(ms_spattn, 4), "sdpa_ms": sig(ms_sdpa, 4),
            "shape": [list(q.shape), list(k.shape)]}


def measure_candidate(cand: Candidate, captures: Captures, *, block_size: int, head_dim: int,
                      latency_backend: str, repeats: int, seed: int, progress=None) -> dict[str, Any]:
    """Coverage, cost and latency of one fitted candidate on the calibration captures."""
    measure, reachability = _coverage()
    pattern = cand.pattern
    n_layers = len(captures[0])
    L = captures[0][0][0].shape[2]
    H = captures[0][0][0].shape[1]
    static = None if cand.dynamic else spattn.compile(pattern, L, L, causal=True, block_size=block_size)
    recalls: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    keys_cost, block_cost, flops_tok, flops_blk = [], [], [], []
    chunk0_layouts: list[spattn.Layout] = []
    for c, layers in enumerate(captures):
        for layer, (q, k) in enumerate(layers):
            lay = static if static is not None else spattn.compile(
                pattern, L, L, causal=True, block_size=block_size, query=q, key=k)
            kc, bc = layout_cost(lay)
            keys_cost.append(kc)
            block_cost.append(bc)
            flops_tok.append(lay.flops(head_dim, heads=H))
            flops_blk.append(lay.flops(head_dim, heads=H, level="block"))
            rep = measure(q, k, lay, causal=True, topk=0)
            recalls[layer].append(rep.recall[0].double())  # [H, L]
            if c == 0:
                chunk0_layouts.append(lay)
            if progress is not None:
                progress()
    per_layer = [torch.cat(r, dim=-1) for r in recalls]  # [H, C*L] each
    allr = torch.stack(per_layer)  # [layers, H, C*L]
    head_mean = allr.mean(-1)
    head_p5 = torch.stack([torch.stack([torch.tensor(_p5(allr[i, h])) for h in range(H)]) for i in range(n_layers)])
    reach = reachability(static if static is not None else chunk0_layouts, causal=True, max_layers=n_layers)
    mid = chunk0_layouts[len(chunk0_layouts) // 2]
    picture = mid.block_status()[0, 0].tolist()
    q, k, v = latency_inputs(captures, seed)
    lat = time_call(lambda: spattn.attention(q, k, v, pattern, causal=True, backend=latency_backend,
                                             block_size=block_size), repeats, q.device)
    dense_flops = 4.0 * causal_pairs(L) * head_dim * H
    return {
        "cost": {
            "keys_fraction": sig(statistics.fmean(keys_cost)),
            "keys_fraction_max": sig(max(keys_cost)),
            "block_fraction": sig(statistics.fmean(block_cost)),
            "attention_gflops": sig(sum(flops_tok) / len(captures) / 1e9),
            "attention_gflops_block": sig(sum(flops_blk) / len(captures) / 1e9),
            "dense_attention_gflops": sig(dense_flops * n_layers / 1e9),
        },
        "recall": {
            "mean": sig(float(allr.mean())),
            "p5": sig(_p5(allr)),
            "min": sig(float(allr.min())),
            "per_layer_mean": [sig(float(x)) for x in allr.mean(dim=(1, 2))],
            "per_layer_head_mean": [[sig(float(x), 4) for x in row] for row in head_mean],
            "per_layer_head_p5": [[sig(float(x), 4) for x in row] for row in head_p5],
        },
        "reach": {
            "fraction": [sig(float(x)) for x in reach.fraction],
            "layers_to_full": reach.layers_to_full,
        },
        "latency": {"backend": latency_backend, "median_ms": sig(lat, 4)},
        "picture": {"layer": len(chunk0_layouts) // 2, "head": 0, "block_status": picture},
    }
