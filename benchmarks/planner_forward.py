"""Where a patched plan's forward spends its time (SmolLM2-135M): the latency plan and the FLOP plan against dense.

Session 5 measured, on the H200 at 8192 tokens, a patched forward of the latency plan at 51.1 ms against 33.1 ms
for dense, while the plan's attention (summed over layers, timed alone) was 8.7 ms. This script re-measures that
forward after the integration keeps every layout per plan (Note [plan layout cache] in ``integrations/hf.py``)
and splits it up. Steps, most important first, each written to the JSON as soon as it exists; ``--time-budget``
skips what would not fit and records it:

1. plans: session 5's pair, committed (``--plans``, default ``benchmarks/results/h200/planner/s5/``): the latency
   plan at half the dense attention milliseconds (8.50 ms predicted) and the FLOP plan with the largest tile
   budget whose predicted time fits the same milliseconds. ``--solve`` re-solves them from ``--table`` with a
   cost table timed on this device instead (the FLOP plan's bisection solves the knapsack 14 times).
2. gate: one sparse layer of the latency plan through the backend against the float64 oracle on its exact mask
   (``spattn.testing`` tolerance rule), in the model's dtype at 2048 tokens (the kernels the timing reuses).
3. forward: median milliseconds of one forward with the plan patched in once (the deployment case), for the
   model's own SDPA, spattn dense (``Full`` through the backend), the latency plan and the FLOP plan; beside it
   the host milliseconds (until ``model(...)`` returns, before the device finishes), the ``spattn.compile``
   calls made by the timed forwards (0 after the first forward), and whether a forward synchronises with the
   host (``torch.cuda.set_sync_debug_mode``); then the two plans again with contiguous attention inputs.
4. attention alone, per plan: every layer's layout timed on random contiguous inputs (session 5's
   ``measured_attention_ms``) and on inputs strided like the model's (``[B, L, H, D]`` transposed).
5. session 5's forward timing (``patched`` entered and left inside every timed call), for comparison.
6. profile: one forward per configuration under ``torch.profiler``: device and host milliseconds per op, the
   top ops by device time.

    # H200 (alone on the card, ~100 device seconds)
    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src python benchmarks/planner_forward.py --device cuda \\
        --table benchmarks/results/h200/planner/planner_heldout_8192.table.npz --time-budget 90 \\
        --out $OUT/planner_forward.json
    # CPU dry run (tiny: 256 tokens, the committed 8192 plans scaled down, reference backend)
    PYTHONPATH=src python benchmarks/planner_forward.py --quick --out /tmp/planner_forward.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the session-5 helpers

from planner_h200 import attention_ms, flop_plan_within_ms, forward_ms, gate  # noqa: E402
from planner_heldout import Clock, phase, save  # noqa: E402

import spattn  # noqa: E402
import spattn.patterns  # noqa: E402
from spattn.bench.env import machine_info  # noqa: E402
from spattn.bench.record import finish, record_error
from spattn.data import text_chunks  # noqa: E402
from spattn.integrations.models import load_smollm2  # noqa: E402
from spattn.patterns import Full  # noqa: E402
from spattn.planner import CandidateTable, InfeasibleBudget, LatencyTable, make_plan  # noqa: E402

S5_PLANS = "benchmarks/results/h200/planner/s5/planner_latency_latency_{}_0.5.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ContiguousInputs:
    """Inside the block, the integration hands ``spattn.attention`` contiguous query/key/value (one copy each)
    instead of the model's strided views: whether the kernels lose time on the strides in a real forward."""

    def __init__(self) -> None:
        import spattn.ops.attention.api as api

        self._api, self._real = api, api.attention

    def __enter__(self) -> ContiguousInputs:
        real = self._real

        def contiguous(query, key, value, *args, **kwargs):
            return real(query.contiguous(), key.contiguous(), value.contiguous(), *args, **kwargs)

        self._api.attention = contiguous
        return self

    def __exit__(self, *exc) -> None:
        self._api.attention = self._real


class CompileCalls:
    """Counts ``spattn.compile`` calls made through ``spattn.patterns.compile`` (what the integration calls)."""

    def __init__(self) -> None:
        self.n = 0
        self._real = spattn.patterns.compile

    def __enter__(self) -> CompileCalls:
        def counting(*args, **kwargs):
            self.n += 1
            return self._real(*args, **kwargs)

        spattn.patterns.compile = counting
        return self

    def __exit__(self, *exc) -> None:
        spattn.patterns.compile = self._real


def timed_forwards(model, ids, plan, backend, block_size, repeats, device) -> dict:
    """One patch, a warm-up forward, then ``repeats`` timed forwards: median total and host milliseconds, the
    compile calls of the timed forwards, and the first host synchronisation of one forward (None: none)."""
    total, host = [], []
    context = spattn.patched(model, plan, backend=backend, block_size=block_size) if plan is not False else None
    with torch.no_grad():
        if context is not None:
            context.__enter__()
        try:
            model(input_ids=ids)  # compiles this plan's layouts (and JITs what they need)
            _sync(device)
            with CompileCalls() as calls:
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids)
                    t1 = time.perf_counter()
                    _sync(device)
                    t2 = time.perf_counter()
                    host.append((t1 - t0) * 1e3)
                    total.append((t2 - t0) * 1e3)
            sync = None
            if device.type == "cuda":
                from spattn.bench.timing import host_sync

                err = host_sync(lambda: model(input_ids=ids))
                sync = None if err is None else str(err).splitlines()[0][:300]
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    return {"forward_ms": statistics.median(total), "host_ms": statistics.median(host),
            "forward_ms_all": [round(x, 3) for x in total], "compile_calls_in_timed_forwards": calls.n,
            "host_sync": sync, "repeats": repeats}


def model_shaped_attention_ms(plan, table, length, block_size, device, repeats, backend, dtype) -> float:
    """Like ``planner_h200.attention_ms`` but with query/key/value strided as the model hands them over
    (projections ``[B, L, H, D]`` viewed as ``[B, H, L, D]``)."""
    from spattn.planner.cost import time_ms

    H, Hkv, D = table.heads, table.kv_heads, table.head_dim
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, length, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    k = torch.randn(1, length, Hkv, D, generator=gen).to(device, dtype).transpose(1, 2)
    v = torch.randn(1, length, Hkv, D, generator=gen).to(device, dtype).transpose(1, 2)
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


def profile_forward(model, ids, plan, backend, block_size, device, top: int = 12) -> dict:
    """One forward (after a warm-up) under ``torch.profiler``: total device and host milliseconds and the ``top``
    ops by device time (self), with their host time and call counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    context = spattn.patched(model, plan, backend=backend, block_size=block_size) if plan is not False else None
    with torch.no_grad():
        if context is not None:
            context.__enter__()
        try:
            model(input_ids=ids)
            _sync(device)
            with profile(activities=activities) as prof:
                model(input_ids=ids)
                _sync(device)
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    rows = sorted(events, key=lambda e: (device_us(e), e.self_cpu_time_total), reverse=True)[:top]
    return {
        "device_ms_total": sum(device_us(e) for e in events) / 1e3,
        "host_ms_total": sum(e.self_cpu_time_total for e in events) / 1e3,
        "top": [{"name": e.key[:90], "calls": e.count, "device_ms": round(device_us(e) / 1e3, 3),
                 "host_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in rows],
    }


def make_plans(args, table, latency, out) -> dict:
    """The (latency, FLOP) plan pair: from ``--plans``, else solved from the table at ``--fraction`` of dense ms."""
    if not args.solve:
        names = ("latency", "flops")
        paths = [p.strip() for p in args.plans.split(",")]
        out["plans"] = {n: {"file": p} for n, p in zip(names, paths, strict=True)}
        return {n: spattn.Plan.load(p) for n, p in zip(names, paths, strict=True)}
    make_plan(None, None, budget=1.0, cost="latency", table=table, latency=latency)  # times every candidate
    dense_ms = float(table.latency_ms[..., table.index("dense")].sum())
    budget_ms = args.fraction * dense_ms
    out["plans"] = {"dense_attention_ms_predicted": dense_ms, "budget_ms": budget_ms, "fraction": args.fraction}
    plans = {}
    try:
        lat = make_plan(None, None, budget=f"{budget_ms:.6f}ms", cost="latency", table=table, latency=latency)
        plans["latency"] = lat.plan
        out["plans"]["latency"] = {"predicted_ms": float(lat.solution.cost),
                                   "tile_fraction": lat.plan.meta["planner"]["mean_tile_fraction"]}
    except InfeasibleBudget as err:
        out["plans"]["latency"] = {"note": str(err)}
    flop = flop_plan_within_ms(table, budget_ms)
    if flop is not None:
        plans["flops"] = flop[0].plan
        out["plans"]["flops"] = {"predicted_ms": flop[1], "tile_budget": flop[2],
                                 "tile_fraction": flop[0].plan.meta["planner"]["mean_tile_fraction"]}
    for name, plan in plans.items():
        plan.save(Path(args.out).with_name(Path(args.out).stem + f"_{name}_plan.json"))
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="default triton on CUDA, reference on the CPU")
    ap.add_argument("--table", default="benchmarks/results/h200/planner/planner_heldout_8192.table.npz")
    ap.add_argument("--plans", default=",".join(S5_PLANS.format(n) for n in ("latency", "flops")),
                    help="'latency.json,flops.json': the plans to measure (default: session 5's committed pair)")
    ap.add_argument("--solve", action="store_true", help="solve the pair from --table at --fraction of the dense "
                    "attention ms (a cost table timed on this device) instead of loading --plans")
    ap.add_argument("--length", type=int, default=None, help="forward length (default the table's)")
    ap.add_argument("--fraction", type=float, default=0.5, help="ms budget as a fraction of dense attention ms")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (model load "
                    "included); steps that would not fit are skipped and recorded")
    ap.add_argument("--quick", action="store_true", help="tiny CPU dry run (256 tokens, 2 repeats)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.quick:
        args.length, args.repeats = args.length or 256, 2
        args.dtype = "float32" if args.device == "cpu" else args.dtype
    clock = Clock(args.time_budget)
    device = torch.device(args.device)
    backend = args.backend or ("triton" if device.type == "cuda" else "reference")
    dtype = getattr(torch, args.dtype)
    path = Path(args.out)
    out = {"what": "patched-plan forward split up: latency plan vs FLOP plan vs dense (SmolLM2-135M)",
           "machine": machine_info(device), "args": vars(args), "backend": backend, "skipped": [],
           "note": "CPU timings come from a shared machine" if device.type == "cpu" else None}
    save(out, path)
    status = "complete"
    try:
        table = CandidateTable.load(args.table)
        L = args.length or table.length
        bs = table.block_size
        model, tokenizer = load_smollm2(device=device, dtype=dtype)
        phase(out, "model_load", clock.start)
        clock.setup_done()
        t0 = time.perf_counter()
        latency = LatencyTable(path.with_name(path.stem + "_latency.json"), device=device, backend=backend,
                               repeats=max(3, args.repeats // 2), dtype=dtype) if args.solve else None
        plans = make_plans(args, table, latency, out)
        if L != table.length:  # a plan states its budget as a rule: keep it at the forward's length
            plans = {n: p.at_length(L) if p.budget is not None else p for n, p in plans.items()}
        phase(out, "plans", t0)
        save(out, path)
        t0 = time.perf_counter()
        sparse = plans.get("latency") or plans.get("flops")
        if sparse is not None:
            out["gate"] = gate(sparse, table, bs, device, backend, length=min(2048, L), dtype=dtype)
        phase(out, "gate", t0)
        save(out, path)
        print("gate", json.dumps(out.get("gate"))[:300], flush=True)
        ids = text_chunks("austen", tokenizer, L, split="held_out", max_chunks=1)[:1].to(device)
        configs = [("sdpa", False), ("spattn_dense", None)] + [(n, p) for n, p in plans.items()]
        out["forward"] = {}
        for name, plan in configs:  # 3. the deployment forward
            if not clock.fits("forward", L, out, f"forward {name}", default=5.0):
                continue
            t0 = time.perf_counter()
            out["forward"][name] = timed_forwards(model, ids, plan, backend, bs, args.repeats, device)
            clock.record("forward", L, time.perf_counter() - t0)
            phase(out, f"forward_{name}", t0)
            save(out, path)
            print("forward", name, json.dumps(out["forward"][name])[:300], flush=True)
        for name, plan in plans.items():  # 3b. the same forwards with contiguous attention inputs
            if not clock.fits("forward", L, out, f"forward {name} (contiguous inputs)", default=5.0):
                continue
            t0 = time.perf_counter()
            with ContiguousInputs():
                out["forward"][name + "_contiguous_inputs"] = timed_forwards(model, ids, plan, backend, bs,
                                                                             args.repeats, device)
            clock.record("forward", L, time.perf_counter() - t0)
            save(out, path)
            print("forward contiguous", name, json.dumps(out["forward"][name + "_contiguous_inputs"])[:200],
                  flush=True)
        out["attention"] = {}
        for name, plan in [("spattn_dense", spattn.Plan())] + list(plans.items()):  # 4. attention alone
            if not clock.fits("attention", L, out, f"attention {name}", default=5.0):
                continue
            t0 = time.perf_counter()
            out["attention"][name] = {
                "contiguous_ms": attention_ms(plan, table, L, bs, device, args.repeats, backend, dtype=dtype),
                "model_strided_ms": model_shaped_attention_ms(plan, table, L, bs, device, args.repeats, backend,
                                                              dtype),
            }
            clock.record("attention", L, time.perf_counter() - t0)
            phase(out, f"attention_{name}", t0)
            save(out, path)
            print("attention", name, out["attention"][name], flush=True)
        out["forward_s5_style"] = {}
        for name, plan in [("spattn_dense", None)] + list(plans.items()):  # 5. patched inside the timing
            if not clock.fits("forward_s5", L, out, f"session-5 forward {name}", default=5.0):
                continue
            t0 = time.perf_counter()
            out["forward_s5_style"][name] = forward_ms(model, ids, plan, bs, max(3, args.repeats // 2), backend)
            clock.record("forward_s5", L, time.perf_counter() - t0)
            phase(out, f"forward_s5_{name}", t0)
            save(out, path)
        out["profile"] = {}
        for name, plan in configs:  # 6. where the time goes
            if not clock.fits("profile", L, out, f"profile {name}", default=5.0):
                continue
            t0 = time.perf_counter()
            try:
                out["profile"][name] = profile_forward(model, ids, plan, backend, bs, device)
            except Exception as err:  # the profiler (CUPTI) is a diagnostic: keep the timings above
                out["profile"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            clock.record("profile", L, time.perf_counter() - t0)
            phase(out, f"profile_{name}", t0)
            save(out, path)
            print("profile", name, json.dumps(out["profile"][name])[:400], flush=True)
        if latency is not None:
            latency.save()
    except Exception as err:  # keep the partial JSON, say what broke
        status = record_error(out, err)
    finish(out, path, status, time.perf_counter() - clock.start, save)


if __name__ == "__main__":
    main()
