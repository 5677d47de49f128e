"""Planner on an H200: measured-latency plans against FLOP plans at the same millisecond budget (SmolLM2, 8k).

1. Correctness gate: one planned layer (a PerHead layout) through the triton backend against the float64
   dense oracle on the same mask (spattn.testing tolerance rule), before any timing.
2. Calibrate once on Austen at ``--length`` (default 8192); build the latency table on this GPU (triton,
   float16; cached at ~/.cache/spattn/planner/latency.json).
3. For each budget fraction f of the dense attention time: the latency plan (cost="latency", budget f x dense
   ms) and the FLOP plan (cost="flops", the largest tile fraction whose predicted time fits the same ms).
   Both are then *measured*: attention time summed over layers with the deployed PerHead layouts (random
   fp16 inputs of the model's shape; static layouts compiled outside the timing, dynamic selection inside),
   the whole-model forward time with the plan patched in, calibration recall, and held-out perplexity / KL.

    python benchmarks/planner_h200.py --out $OUT/planner_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.env import machine_info
from spattn.data import text_chunks
from spattn.integrations.models import load_smollm2
from spattn.patterns import Full
from spattn.planner import LatencyTable, make_plan
from spattn.planner.cost import time_ms
from spattn.testing import assert_within, dense_attention, plain_attention


def gate(plan, table, block_size, device, backend="triton", layer=None, length=2048, dtype=None):
    """One sparse layer of ``plan`` (default the first) through ``backend`` vs the float64 oracle on its exact
    mask, in ``dtype`` (default float16 on CUDA, float32 on the CPU; pass the model's dtype so that the gate
    compiles the kernels the measurement then reuses)."""
    if layer is None:
        layer = next((i for i in range(table.layers) if plan.pattern_for(i) is not None), None)
    if layer is None:
        return {"layer": None, "note": "dense plan"}
    H, Hkv, D, L = table.heads, table.kv_heads, table.head_dim, length
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, L, D, generator=gen).to(device, dtype)
    k = torch.randn(1, Hkv, L, D, generator=gen).to(device, dtype)
    v = torch.randn(1, Hkv, L, D, generator=gen).to(device, dtype)
    pattern = plan.at_length(L).pattern_for(layer)
    layout = spattn.compile(pattern, L, causal=True, block_size=block_size, heads=H, query=q, key=k)
    allowed = layout.to_dense().to(device)
    fast = spattn.attention(q, k, v, layout, causal=True, backend=backend)
    golden, _ = dense_attention(q, k, v, allowed)
    base, _ = plain_attention(q, k, v, allowed)
    assert_within(fast, golden, base, what=f"{backend} vs float64 oracle, layer {layer}")
    return {"layer": layer, "pattern": pattern.to_dict(), "passed": True, "backend": backend, "length": L,
            "max_error": float((fast.double() - golden).abs().max())}


def attention_ms(plan, table, length, block_size, device, repeats, backend="triton", dtype=None):
    """Attention time of every layer of ``plan`` at ``length`` (sum over layers, each timed on its own), in
    ``dtype`` (default float16 on CUDA, float32 on the CPU)."""
    H, Hkv, D = table.heads, table.kv_heads, table.head_dim
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, length, D, generator=gen).to(device, dtype)
    k = torch.randn(1, Hkv, length, D, generator=gen).to(device, dtype)
    v = torch.randn(1, Hkv, length, D, generator=gen).to(device, dtype)
    total = 0.0
    for layer in range(table.layers):
        pattern = plan.pattern_for(layer) or Full()
        if pattern.contains_dynamic():
            run = lambda p=pattern: spattn.attention(q, k, v, p, causal=True, backend=backend,  # noqa: E731
                                                     block_size=block_size)
        else:
            layout = spattn.compile(pattern, length, causal=True, block_size=block_size, heads=H, device=device)
            run = lambda lay=layout: spattn.attention(q, k, v, lay, causal=True, backend=backend)  # noqa: E731
        with torch.no_grad():
            total += time_ms(run, device, repeats)
    return total


def held_out(model, chunks, plan, block_size, cache):
    nll = kl = 0.0
    for n, row in enumerate(chunks):
        ids = row[None].to("cuda")
        with torch.no_grad():
            if n not in cache:
                with spattn.patched(model, None, backend="triton", block_size=block_size):
                    cache[n] = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            with spattn.patched(model, plan, backend="triton", block_size=block_size):
                log_s = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        log_d = cache[n]
        nll += float(F.nll_loss(log_s, ids[0, 1:]))
        kl += float((log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0).mean())
    return {"perplexity": math.exp(nll / len(chunks)), "mean_kl": kl / len(chunks), "chunks": len(chunks)}


def forward_ms(model, ids, plan, block_size, repeats, backend="triton"):
    """Median milliseconds of one forward of ``model`` on ``ids`` with ``plan`` patched in (``None``: dense
    through ``backend``)."""
    def run():
        with torch.no_grad(), spattn.patched(model, plan, backend=backend, block_size=block_size):
            model(input_ids=ids)
    return time_ms(run, ids.device, repeats)


def flop_plan_within_ms(table, budget_ms, steps=14):
    """The FLOP plan (``cost="flops"``) with the largest tile fraction whose *predicted* time (the latency
    table's per-head shares) fits ``budget_ms`` (bisection); ``(PlanResult, predicted_ms, tile_fraction)`` or
    None when none fits."""
    lo, hi, found = 0.01, 1.0, None
    flat = table.latency_ms.reshape(-1, len(table.candidates))
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            cand = make_plan(None, None, budget=mid, cost="flops", table=table)
        except ValueError:
            lo = mid
            continue
        predicted = float(sum(flat[g, cand.solution.choice[g]] for g in range(flat.shape[0])))
        if predicted <= budget_ms:
            lo, found = mid, (cand, predicted, mid)
        else:
            hi = mid
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--fractions", default="0.2,0.35,0.5")
    ap.add_argument("--eval-chunks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this script measures on a CUDA GPU"
    device = torch.device("cuda")
    out = {"machine": machine_info(), "args": vars(args)}
    model, tokenizer = load_smollm2(device="cuda")
    L, bs = args.length, args.block_size
    latency = LatencyTable(device=device, backend="triton", repeats=args.repeats, dtype=torch.float16)
    started = time.perf_counter()
    base = make_plan(model, "austen", tokenizer=tokenizer, budget=0.5, lengths=(L,), samples=args.samples,
                     block_size=bs, cost="latency", latency=latency, device=device)
    out["planning_seconds"] = time.perf_counter() - started
    table = base.table
    dense_ms = float(table.latency_ms[..., table.index("dense")].sum())
    out["dense_attention_ms_predicted"] = dense_ms
    ids = text_chunks("austen", tokenizer, L, split="held_out", max_chunks=args.eval_chunks)
    cache: dict = {}
    out["dense_forward_ms"] = forward_ms(model, ids[:1].to(device), None, bs, max(3, args.repeats // 4))
    out["dense_attention_ms_measured"] = attention_ms(spattn.Plan(), table, L, bs, device, args.repeats)
    out["rows"] = []
    for f in (float(x) for x in args.fractions.split(",")):
        budget_ms = f * dense_ms
        lat = make_plan(None, None, budget=f"{budget_ms:.6f}ms", cost="latency", table=table, latency=latency)
        flop = flop_plan_within_ms(table, budget_ms)
        row = {"fraction_of_dense_ms": f, "budget_ms": budget_ms}
        if not out["rows"]:  # the correctness gate runs before the first timings are kept
            row["gate"] = gate(lat.plan, table, bs, device)
        for name, res, predicted, tiles in (("latency", lat, lat.solution.cost, None),
                                            ("flops", *(flop if flop else (None, None, None)))):
            if res is None:
                row[name] = {"note": "no FLOP plan fits the budget"}
                continue
            row[name] = {
                "predicted_ms": float(predicted), "tile_budget": tiles,
                "measured_attention_ms": attention_ms(res.plan, table, L, bs, device, args.repeats),
                "forward_ms": forward_ms(model, ids[:1].to(device), res.plan, bs, max(3, args.repeats // 4)),
                "recall": res.plan.meta["planner"]["mean_recall"],
                "tile_fraction": res.plan.meta["planner"]["mean_tile_fraction"],
                "held_out": held_out(model, ids, res.plan, bs, cache),
            }
            res.plan.save(Path(args.out).with_name(f"planner_h200_{name}_{f:g}.json"))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    latency.save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
