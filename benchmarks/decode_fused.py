"""Captured decode with the fused page selection against a FAIR captured dense step, on one GPU, alone.

    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src timeout 58 python benchmarks/decode_fused.py --time-budget 50 \
        --skip controller real --rows dense-kernel sparse-16-fused null sparse-16-torch --big-batch 16 32 \
        --out $OUT/decode_fused.json                                           # H200, alone on the card
    PYTHONPATH=src python benchmarks/decode_fused.py --quick --device cpu --out /tmp/decode_fused.json  # CPU smoke

Model: a random-weight Llama of SmolLM2-135M's shape (``decode_generate.smollm2_shape``: 30 layers, 9 / 3 heads,
head dim 64), bfloat16; the cache is built as in ``decode_generate.py`` (the first 32768 tokens prefilled by the
model, longer contexts tile that prefix). Every row decodes with ``Runtime(cuda_graph=True)``: the whole model's
static decode step recorded once in a CUDA graph and replayed; ``--steps`` timed steps after 3 warm-up steps.

Rows per (context, batch), most important first:

* ``dense-kernel``: the fair dense step -- spattn's split-K decode kernel over exactly each sequence's valid keys
  (``Runtime(dense_decode="kernel")``: full pages without masks, the page being filled with its mask);
* ``sparse-16-fused``: ``Sinks(64) | Window(1024) | TopK("bounds", 16)``, selection by the fused triton kernels
  (``decode_selection="fused"``: scores, safeguards, top-k, block tables in two launches per layer);
* ``dense-sdpa``: the old captured dense step (torch's masked SDPA over the whole capacity), labelled;
* ``null``: every attention call replaced by zeros (the cache is still written): the step outside attention,
  whence ``outside_attention_share`` = null / row and the Amdahl bound ``1 / outside share`` of each row;
* ``sparse-16-torch``: the same plan with the torch selection (about 100 small ops per layer), for the fused
  selection's own gain.

Gate first (fatal), at the first context on layer 0 of the cache, in the kernels the rows reuse: the fused
tables equal the torch selection's on a real cache (share of (sequence, head) rows with equal pages), the
decode kernel on the fused tables within the tolerance rule of the float64 oracle on the torch selection's
mask, and the dense kernel within the rule of the float64 dense oracle.

Then the controller under captured decode (32k, batch 8, sparse-16-fused): target 1.5 x the measured step;
from step 16 to 40 a synthetic stall proportional to the current budget is added to every step (a kernel whose
cost grows with the pages it reads: 1.5 x the base step at budget 16); reported: steps / seconds until the
controller's p95 is back under the target, the budget trace, and the sampled recall against a floor of half the
recall measured before the spike. Then the larger batches of ``--big-batch`` (default 16 then 32) at 128k when
the free memory allows it (the estimate: the cache's exact bytes plus a fixed headroom, against the free memory
after the earlier caches are collected; both recorded under ``memory``; rows: fair dense, sparse-16-fused and
null). Then, when
``SPATTN_SMOLLM2_GGUF`` is set, the real SmolLM2-135M: sampled decode recall of the fused selection at 8k, 16k
and 32k (cache prefilled dense by the model on Austen; positions past 8192 are beyond its training).

Each result is written to the JSON as soon as it exists; a task whose estimated cost does not fit in what is
left of ``--time-budget`` is skipped and recorded. ``phase_seconds`` gives the seconds each phase took.
"""

# ruff: noqa: E402 - src/ and benchmarks/ are put on the import path first
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))
sys.path.insert(0, _HERE)

import torch
from decode_generate import build_cache, decode, percentile, recovery, smollm2_shape, sync

import spattn
from spattn.bench.env import git_commit, machine_info
from spattn.runtime import ControllerConfig, Runtime
from spattn.runtime import engine as runtime_engine
from spattn.runtime.decode import block_tables, decode_plan, select_from_row, static_rows
from spattn.runtime.fused import dense_tables, flag_nonfinite, fused_tables, partial_page_bound, tables_attention
from spattn.testing import assert_within, dense_attention, plain_attention

ROWS = ["dense-kernel", "sparse-16-fused", "dense-sdpa", "null", "sparse-16-torch"]


def pattern(quick: bool, k: int = 16):
    window, sinks = (64, 8) if quick else (1024, 64)
    return spattn.Sinks(sinks) | spattn.Window(window) | spattn.TopK("bounds", k)


def runtime_for(model, row: str, quick: bool, page: int, **extra) -> Runtime:
    sparse = row.startswith("sparse")
    plan = spattn.Plan.uniform(pattern(quick)) if sparse else spattn.Plan()
    return Runtime(model, plan, min_sparse_tokens=0, block_size=page, cuda_graph=True,
                   decode_selection="torch" if row.endswith("torch") else "fused",
                   dense_decode="sdpa" if row in ("dense-sdpa", "null") else "kernel", **extra)


class NullAttention:
    """Within the block, the static step's dense attention returns zeros (the step outside attention)."""

    def __enter__(self):
        self.original = runtime_engine._dense_static

        def zeros(module, query, key, value, valid, kwargs):
            B, H, _, D = query.shape
            return query.new_zeros(B, 1, H, value.shape[-1]), None

        runtime_engine._dense_static = zeros
        return self

    def __exit__(self, *exc):
        runtime_engine._dense_static = self.original


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


def write(report: dict, path: str) -> None:
    report["seconds"] = round(time.time() - report["_started"], 2)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in report.items() if not k.startswith("_")}, f, indent=2, default=str)
    os.replace(tmp, path)


def phase(report: dict, name: str, started: float) -> None:
    report["phase_seconds"].append([name, round(time.time() - started, 2), round(time.time() - report["_started"], 1)])
    print(f"[phase] {name}: {time.time() - started:.1f} s", flush=True)


# ---------------------------------------------------------------------------------------------- gate
def graph_ms(fn, device, reps: int = 20) -> float | None:
    """Mean GPU ms of ``fn`` recorded once in a CUDA graph and replayed ``reps`` times back to back (None off
    CUDA, where the call runs once): what the call costs inside the captured decode step."""
    if device.type != "cuda":
        fn()  # the dry run still runs the call once
        return None
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def gate(cache, length: int, args, device, page: int) -> dict:
    """Layer 0 of the cache: fused tables vs the torch selection, decode on them vs the float64 oracle, the dense
    kernel vs the float64 dense oracle (bf16, the rows' dtype and shapes)."""
    layer = cache.layers[0]
    B, Hkv, _, D = layer.keys.shape
    H, G = 3 * Hkv, 3
    C = -(-(length + 1) // page) * page
    kbuf = torch.zeros(B, Hkv, C, D, dtype=layer.keys.dtype, device=device)
    vbuf = torch.zeros_like(kbuf)
    kbuf[:, :, :length], vbuf[:, :, :length] = layer.keys, layer.values
    NP = C // page
    from spattn.selectors.common import pool

    kmin, kmax = pool(kbuf, page, "amin").contiguous(), pool(kbuf, page, "amax").contiguous()
    g = torch.Generator(device="cpu").manual_seed(11)
    # a query like the keys (scaled to give a peaked page distribution)
    q = (torch.randn(B, H, 1, D, generator=g).to(device) * layer.keys.float().std() * 3).to(kbuf.dtype)
    valid = torch.zeros(B, C, dtype=torch.bool, device=device)
    valid[:, :length] = True
    dp = decode_plan(pattern(args.quick))
    rows, pages = static_rows(dp, C, range(length, length + 1), batch=B, heads=H, page_size=page, device=device,
                              group=G)
    width = min(NP, pages + 16 + 1)
    slot = torch.tensor([length - 1], device=device)
    budget = torch.tensor([16], device=device)
    scale = D ** -0.5
    sizes = (slot + 1 - torch.arange(NP, device=device) * page).clamp(1, page)
    sel = select_from_row(q, valid, dp, budget, rows[0], width, kv_heads=Hkv, page_size=page, scale=scale,
                          key_min=kmin, key_max=kmax, page_sizes=sizes)
    ref = [t.clone() for t in block_tables(sel, heads=H, page_size=page)]
    tables, pt = fused_tables(q, kmin, kmax, rows, torch.zeros(1, dtype=torch.long, device=device), valid, slot,
                              budget, width=width, page_size=page, scale=scale)
    same_rows = (pt.kv_idx == ref[1]).all(-1).all(-1) & (pt.kv_num == ref[0]).all(-1)
    out = {"context": length, "batch": B, "width": width, "rows_equal_share": float(same_rows.float().mean()),
           "masks_equal": bool(torch.equal(pt.masks[:, 0], ref[5][:, 0]))}
    fast = tables_attention(q, kbuf, vbuf, tables, scale=scale, grouped=True)
    tokens = (sel.pages.clamp_min(0)[..., None] * page + torch.arange(page, device=device)).flatten(2)
    allowed = torch.zeros(B, Hkv, C + page, dtype=torch.bool, device=device)
    m = sel.mask.view(B, Hkv, G, -1)[:, :, 0] & (sel.pages >= 0).repeat_interleave(page, -1)
    allowed.scatter_(-1, torch.where(m, tokens, C), m)
    allowed = allowed[..., :C].repeat_interleave(G, 1)[:, :, None, :]
    kr, vr = kbuf.repeat_interleave(G, 1), vbuf.repeat_interleave(G, 1)
    golden, _ = dense_attention(q, kr, vr, allowed, scale)
    baseline, _ = plain_attention(q, kr, vr, allowed, scale)
    assert_within(fast, golden, baseline, what="decode on the fused tables")
    out["sparse_max_err"] = float((fast.double() - golden.double()).abs().max())
    dense = tables_attention(q, kbuf, vbuf, dense_tables(valid, page_size=page,
                                                         partial_width=partial_page_bound(valid[:, :length], page)),
                             scale=scale, grouped=False)
    full = valid[:, None, None, :].expand(B, H, 1, C)
    golden, _ = dense_attention(q, kr, vr, full, scale)
    baseline, _ = plain_attention(q, kr, vr, full, scale)
    assert_within(dense, golden, baseline, what="split-K dense decode over the valid keys")
    out["dense_max_err"] = float((dense.double() - golden.double()).abs().max())
    if out["rows_equal_share"] < 0.95 or not torch.isfinite(fast).all():
        raise AssertionError(f"fused selection differs from the torch selection: {out}")
    out.update(append_gate(kbuf, vbuf, page))
    try:
        out.update(call_timings(q, kmin, kmax, rows, valid, slot, budget, kbuf, vbuf, dp, sizes, width, length, page,
                                scale, device))
    except Exception as exc:  # noqa: BLE001 - a timing, not the gate: recorded
        out["call_timings_error"] = f"{type(exc).__name__}: {exc}"
    return out


def call_timings(q, kmin, kmax, rows, valid, slot, budget, kbuf, vbuf, dp, sizes, width, length, page, scale,
                 device) -> dict:
    """One layer's calls inside a CUDA graph (the rows' kernels, already compiled): the fused and the torch
    selection alone, the fused selection with its decode, the dense kernel with its tables."""
    B, H = q.shape[:2]
    Hkv = kmin.shape[1]
    out = {}
    step0 = torch.zeros(1, dtype=torch.long, device=device)
    fused = lambda: fused_tables(q, kmin, kmax, rows, step0, valid, slot, budget, width=width,  # noqa: E731
                                 page_size=page, scale=scale)
    torch_sel = lambda: block_tables(select_from_row(  # noqa: E731
        q, valid, dp, budget, rows[0], width, kv_heads=Hkv, page_size=page, scale=scale, key_min=kmin,
        key_max=kmax, page_sizes=sizes), heads=H, page_size=page)
    out["fused_select_call_graph_ms"] = graph_ms(fused, device)
    out["torch_select_call_graph_ms"] = graph_ms(torch_sel, device)
    out["fused_select_and_decode_call_graph_ms"] = graph_ms(
        lambda: tables_attention(q, kbuf, vbuf, fused()[0], scale=scale, grouped=True), device)
    dense_w = partial_page_bound(valid[:, :length], page)
    out["dense_kernel_call_graph_ms"] = graph_ms(lambda: tables_attention(
        q, kbuf, vbuf, dense_tables(valid, page_size=page, partial_width=dense_w), scale=scale, grouped=False), device)
    # the per-layer pieces around attention: the non-finite check (fused path) and the static cache append
    # (keys, values, page min / max at a device-side slot; every row pays it, it is part of the null step)
    flags = torch.zeros(30, dtype=torch.bool, device=device)
    attn = tables_attention(q, kbuf, vbuf, fused()[0], scale=scale, grouped=True)
    out["nonfinite_flag_call_graph_ms"] = graph_ms(lambda: flag_nonfinite(attn, q, flags, 3), device)
    k1, v1 = kbuf[:, :, :1].clone(), vbuf[:, :, :1].clone()
    for name, fused_append in (("torch", False), ("fused", True)):
        small = small_layer(kbuf, vbuf, page, fused_append, 2 * page + 5)
        out[f"cache_append_{name}_call_graph_ms"] = graph_ms(lambda: small.update(k1, v1), device)  # noqa: B023
    return out


def small_layer(kbuf, vbuf, page: int, fused_append: bool, slot: int):
    from spattn.runtime.cache import PagedLayer

    layer = PagedLayer(page, reserve=4 * page)
    layer.fused_append = fused_append
    layer.update(kbuf[:, :, : 2 * page].clone(), vbuf[:, :, : 2 * page].clone())
    layer.start_static(torch.tensor([slot], device=kbuf.device))
    return layer


def append_gate(kbuf, vbuf, page: int) -> dict:
    """The fused static append (one launch) against the torch ops, bit for bit, over steps that end a page and
    start the next; if they differ (or it raises), every cache of the run falls back to the torch ops."""
    from spattn.runtime.cache import disable_fused_append

    layers = [small_layer(kbuf, vbuf, page, fused, page - 2) for fused in (False, True)]
    try:
        for step in range(4):
            k1, v1 = kbuf[:, :, 100 + step: 101 + step].clone(), vbuf[:, :, 100 + step: 101 + step].clone()
            for layer in layers:
                layer.update(k1, v1)
                layer.slot += 1
        a, b = layers
        equal = all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("_keys", "_values")) and all(
            torch.equal(getattr(a, n)[:, :, :2], getattr(b, n)[:, :, :2]) for n in ("_min", "_max"))
        error = None
    except Exception as exc:  # noqa: BLE001 - recorded; the rows then use the torch ops
        equal, error = False, f"{type(exc).__name__}: {exc}"
    if not equal:
        disable_fused_append(f"decode_fused.py gate: fused append differs from the torch ops ({error})")
    return {"fused_append_equal": equal, "fused_append_error": error}


# ---------------------------------------------------------------------------------------------- rows
def measure(model, row_name: str, ids, cache, length, args, page, device) -> dict:
    row = {"context": length, "batch": int(ids.shape[0]), "row": row_name}
    rt = runtime_for(model, row_name, args.quick, page, monitor_level=0)
    try:
        with NullAttention() if row_name == "null" else _nothing():
            decode(rt, ids, cache, length, 3)
            tokens, times = decode(rt, ids, cache, length, args.steps + 2)  # + the recorded step, dropped
        d = rt.decoder
        paths: dict[str, int] = {}
        for path in d.paths.values():
            paths[path] = paths.get(path, 0) + 1
        row.update(first_step_ms=times[0] * 1e3, captures=d.captures, replays=d.replays, graph_off_reason=d.reason,
                   attention_paths=paths,
                   fallbacks=dict((f"{k[0]}:{k[1]}", v) for k, v in rt.controller.counts.items()))
        times = times[1:]
    finally:
        rt.detach()
    med = statistics.median(times)
    row.update(step_p50_ms=med * 1e3, step_p95_ms=percentile(times, 0.95) * 1e3,
               tokens_per_second=row["batch"] / med, steps=len(times))
    row["_tokens"] = tokens[:, : args.steps].cpu()
    return row


def record_recalls(controller) -> list[float]:
    """The sampled recalls the controller sees from now on (each still goes to the controller)."""
    seen: list[float] = []
    observe = controller.observe_recall

    def wrapped(layer, recall):
        seen.append(recall)
        return observe(layer, recall)

    controller.observe_recall = wrapped
    return seen


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def derive(rows: list[dict]) -> None:
    """Ratios within one (context, batch): against the fair dense row and the SDPA row, the share outside
    attention (null / row) and its Amdahl bound, next-token agreement of the fused and torch selections."""
    for r in rows:
        same = {x["row"]: x for x in rows if x["context"] == r["context"] and x["batch"] == r["batch"]
                and "step_p50_ms" in x}
        fair, sdpa, null = same.get("dense-kernel"), same.get("dense-sdpa"), same.get("null")
        if "step_p50_ms" not in r:
            continue
        if fair and r["row"] != "dense-kernel":
            r["speedup_vs_fair_dense"] = fair["step_p50_ms"] / r["step_p50_ms"]
        if sdpa and r["row"] != "dense-sdpa":
            r["speedup_vs_sdpa_dense"] = sdpa["step_p50_ms"] / r["step_p50_ms"]
        if null and r["row"] != "null":
            share = min(1.0, null["step_p50_ms"] / r["step_p50_ms"])
            r["outside_attention_ms"] = null["step_p50_ms"]
            r["outside_attention_share"] = share
            r["attention_ms"] = r["step_p50_ms"] - null["step_p50_ms"]
            if r["row"].startswith("dense"):
                r["amdahl_bound_vs_this_dense"] = 1 / share  # the most any sparse step can gain on this dense step
        torch_row = same.get("sparse-16-torch")
        if r["row"] == "sparse-16-fused" and torch_row:
            r["speedup_vs_torch_selection"] = torch_row["step_p50_ms"] / r["step_p50_ms"]
            if "_tokens" in r and "_tokens" in torch_row:
                r["next_token_agreement_with_torch_selection"] = float(
                    (r["_tokens"] == torch_row["_tokens"]).float().mean())
        if r["row"].startswith("sparse") and fair and "_tokens" in fair and "_tokens" in r:
            r["next_token_agreement_with_dense"] = float((r["_tokens"] == fair["_tokens"]).float().mean())


def public_rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


# ---------------------------------------------------------------------------------------------- controller
def controller_spike(model, ids, cache, length, args, page, device) -> dict:
    base_rt = runtime_for(model, "sparse-16-fused", args.quick, page, monitor_level=1, recall_sample=1.0)
    recalls = record_recalls(base_rt.controller)
    try:
        decode(base_rt, ids, cache, length, 2 if args.quick else 3)  # sampled every step: eager static steps
        base_rt.recall_sample = 0.0
        _, times = decode(base_rt, ids, cache, length, 3 if args.quick else 9)
    finally:
        base_rt.detach()
    base = statistics.median(times[1:])
    recall_before = statistics.fmean(recalls) if recalls else None
    floor = 0.5 * recall_before if recall_before else None
    target_ms = 1.5 * base * 1e3
    config = ControllerConfig(latency_target_ms=target_ms, window=8, budget=16, max_budget=64, patience=4,
                              cooldown=16, recall_floor=floor)
    rt = runtime_for(model, "sparse-16-fused", args.quick, page, monitor_level=1, recall_sample=0.125,
                     controller=config)
    spike, total = ((3, 7), 10) if args.quick else ((16, 40), 72)
    per_page = 1.5 * base / 16
    trace: list[dict] = []
    state = {"step": 0}
    sampled = record_recalls(rt.controller)

    def stall(sequence, scores):
        if spike[0] <= state["step"] < spike[1]:
            sync(device)
            time.sleep(per_page * rt.controller.budget)
        return scores

    original_end_step = rt.end_step

    def end_step(seconds, prefill, instrumented=None):
        original_end_step(seconds, prefill, instrumented)
        if not prefill:
            c = rt.controller
            trace.append({"step": state["step"], "ms": round(seconds * 1e3, 3),
                          "p95_ms": None if c.p95 is None else round(c.p95 * 1e3, 3),  # None: no steady step yet
                          "instrumented": bool(instrumented), "budget": c.budget,
                          "dense_layers": len(c.dense_until)})
            state["step"] += 1

    rt.end_step = end_step
    try:
        decode(rt, ids, cache, length, total, logits_processor=[stall])
        captures, replays = rt.decoder.captures, rt.decoder.replays
    finally:
        rt.detach()
    return {
        "context": length, "batch": int(ids.shape[0]), "base_step_ms": base * 1e3, "target_ms": target_ms,
        "spike_steps": list(spike), "stall_ms_per_budget_page": per_page * 1e3, **recovery(trace, spike, target_ms),
        "recall_before_spike": recall_before, "recall_floor": floor,
        "recall_sampled_mean": statistics.fmean(sampled) if sampled else None,
        "recall_sampled_min": min(sampled) if sampled else None,
        "recall_floor_held": None if not sampled or floor is None else min(sampled) >= floor,
        "counts": rt.controller.summary()["counts"], "captures": captures, "replays": replays, "trace": trace,
    }


# ---------------------------------------------------------------------------------------------- real model
def real_recall(args, device, page, report, budget: Budget) -> list[dict]:
    from spattn.data import load_text
    from spattn.integrations.models import load_smollm2
    from spattn.runtime.cache import SpattnCache

    model, tokenizer = load_smollm2(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    if args.quick:  # the CPU dry run interprets the kernels: 2 of the 30 layers
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
    text = load_text("austen")
    ids_all = tokenizer(text[: 8 * 40 * 4096 if not args.quick else 200000], return_tensors="pt").input_ids[0]
    out = []
    lengths = args.real_lengths or ([600] if args.quick else [8192, 16384, 32768])
    steps = 2 if args.quick else 8
    for length in lengths:
        if budget.left() < (6 if args.quick else 12):
            out.append({"context": length, "skipped": f"time budget ({budget.left():.0f} s left)"})
            continue
        started = time.time()
        B = args.real_batch
        if ids_all.numel() < B * (length + 1) + 1:
            out.append({"context": length, "skipped": "text too short"})
            continue
        ids = torch.stack([ids_all[b * (length + 1): (b + 1) * (length + 1)] for b in range(B)]).to(device)
        cache = SpattnCache(model.config.num_hidden_layers, page_size=page, reserve=length + 16)
        with torch.inference_mode():
            model(ids[:, :length], past_key_values=cache, use_cache=True, logits_to_keep=1)
        rt = runtime_for(model, f"sparse-16-{args.real_selection}", args.quick, page, monitor_level=1,
                         recall_sample=1.0)
        recalls = record_recalls(rt.controller)
        try:
            decode(rt, ids, cache, length, steps)
        finally:
            rt.detach()
        out.append({"context": length, "batch": B, "steps": steps, "recall_mean": statistics.fmean(recalls),
                    "recall_min": min(recalls), "samples": len(recalls),
                    "fallbacks": dict((f"{k[0]}:{k[1]}", v) for k, v in rt.controller.counts.items()),
                    "seconds": round(time.time() - started, 2),
                    "note": "positions past 8192 are beyond SmolLM2's training" if length > 8192 else None})
        report["real_model"] = out
        print("real", json.dumps(out[-1]), flush=True)
        del cache
    return out


# ---------------------------------------------------------------------------------------------- main
def cache_bytes(layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, page: int,
                itemsize: int = 2) -> int:
    """Bytes of a :class:`~spattn.runtime.SpattnCache` of ``capacity`` tokens: keys and values
    ``[B, Hkv, C, D]`` plus the page minimum / maximum keys ``[B, Hkv, C / S, D]``, in every layer."""
    per_layer = 2 * batch * kv_heads * capacity * head_dim + 2 * batch * kv_heads * (capacity // page) * head_dim
    return layers * per_layer * itemsize


HEADROOM_GIB = 8.0  # prefill activations, the tiling copy of one layer, graph pools, the allocator's slack


def free_memory(device) -> float:
    """Free device bytes once the earlier rows' caches are gone: a Runtime and its decoder reference each other,
    so what they hold (the cache, the CUDA graph's pool) waits for the cycle collector, not for ``del``."""
    gc.collect()
    if device.type != "cuda":
        return float("inf")
    torch.cuda.empty_cache()
    return float(torch.cuda.mem_get_info()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 131072 32768")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--big-batch", type=int, nargs="*", default=[16, 32],
                        help="the extra batches at the largest context, in order (default 16 32)")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="rows per (context, batch), in order")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prefill-tokens", type=int, default=32768)
    parser.add_argument("--skip", nargs="*", default=[], choices=["controller", "big-batch", "real", "torch"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--time-budget", type=float, default=140.0)
    parser.add_argument("--only-real", action="store_true", help="only the real-model recall phase")
    parser.add_argument("--real-selection", default="fused", choices=["fused", "torch"],
                        help="selection of the real-model phase (torch: the fused one's oracle, for a CPU run)")
    parser.add_argument("--real-lengths", type=int, nargs="+", default=None, help="default 8192 16384 32768")
    parser.add_argument("--real-batch", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.contexts = args.contexts or [512, 256]
        args.layers, args.steps, args.prefill_tokens = 2, 2, 256
        args.big_batch = [3] if args.big_batch == [16, 32] else args.big_batch
        args.batch = min(args.batch, 2)
    args.contexts = args.contexts or [131072, 32768]
    budget = Budget(args.time_budget)
    import transformers

    report = {"_started": time.time(), "command": " ".join([sys.executable, *sys.argv]), "commit": git_commit(),
              "machine": machine_info(device), "versions": {"torch": torch.__version__,
                                                            "transformers": transformers.__version__},
              "args": vars(args), "dtype": "bfloat16", "page_size": 128, "rows": [], "skipped": [],
              "phase_seconds": [], "model": "random-weight Llama of SmolLM2-135M's shape (decode_generate.py)"}
    try:
        import triton

        report["versions"]["triton"] = triton.__version__
    except ImportError:
        report["versions"]["triton"] = None
    page = 32 if args.quick else 128
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.only_real:
        report["note"] = "real-model phase only"
        real_recall(args, device, page, report, budget)
        write(report, args.out)
        return
    started = time.time()
    model = smollm2_shape(args.layers, max(args.contexts) + 4096, dtype, device)
    phase(report, "model", started)
    write(report, args.out)
    rows: list[dict] = []
    est = {}  # seconds per row, measured
    gated = False
    contexts = sorted(args.contexts, reverse=True)
    plan_tasks = [(c, args.batch) for c in contexts]
    for context, batch in plan_tasks:
        started = time.time()
        cache_args = argparse.Namespace(batch=batch, steps=max(args.steps, 72) + 8, prefill_tokens=args.prefill_tokens)
        ids, cache, info = build_cache(model, context, cache_args, device, page)
        report.setdefault("caches", {})[f"{context}x{batch}"] = info
        phase(report, f"cache {context}x{batch}", started)
        if not gated:
            started = time.time()
            try:
                report["gate"] = gate(cache, context, args, device, page)
            except Exception as exc:  # the gate is fatal: recorded, then the run stops
                report["gate"] = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                write(report, args.out)
                raise
            gated = True
            phase(report, "gate", started)
            write(report, args.out)
        rows_started = time.time()
        for name in args.rows:
            if name == "sparse-16-torch" and "torch" in args.skip:
                continue
            need = est.get((context, name), est.get(name, 4.0)) + 1
            if need > budget.left():
                report["skipped"].append(f"{name} @ {context}x{batch}: time budget ({need:.0f} s est., "
                                         f"{budget.left():.0f} s left)")
                write(report, args.out)
                continue
            started = time.time()
            try:
                row = measure(model, name, ids, cache, context, args, page, device)
            except Exception as exc:  # noqa: BLE001 - record, go on
                row = {"context": context, "batch": batch, "row": name,
                       "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            row["seconds"] = round(time.time() - started, 2)
            est[name] = max(est.get(name, 0.0), row["seconds"])
            rows.append(row)
            derive(rows)
            report["rows"] = public_rows(rows)
            write(report, args.out)
            print(json.dumps({k: v for k, v in row.items() if k not in ("traceback",) and not k.startswith("_")}),
                  flush=True)
        phase(report, f"rows {context}x{batch}", rows_started)
        if context == min(contexts) and "controller" not in args.skip:
            started = time.time()
            if budget.left() > (10 if args.quick else 20):
                try:
                    report["controller"] = controller_spike(model, ids, cache, context, args, page, device)
                except Exception as exc:  # noqa: BLE001
                    report["controller"] = {"error": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc()}
            else:
                report["controller"] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
            phase(report, "controller", started)
            write(report, args.out)
        del ids, cache
        free_memory(device)
    # masked SDPA over a big batch: known slow, GiBs of repeated keys; the torch selection: measured at batch 8
    big_rows = [r for r in args.rows if r not in ("dense-sdpa", "sparse-16-torch")]
    for batch in ([] if "big-batch" in args.skip else args.big_batch):
        context = max(contexts)
        capacity = -(-(context + args.steps + 8 + 16) // page) * page  # build_cache's reserve, whole pages
        need_bytes = cache_bytes(args.layers, batch, 3, capacity, 64, page, 2 if device.type == "cuda" else 4) \
            + HEADROOM_GIB * 2**30
        free = free_memory(device)
        report.setdefault("memory", []).append({"batch": batch, "context": context, "capacity": capacity,
                                                "cache_gib": round((need_bytes / 2**30) - HEADROOM_GIB, 2),
                                                "headroom_gib": HEADROOM_GIB, "free_gib": round(free / 2**30, 2)})
        need = 3 + sum(est.get(name, 4.0) for name in big_rows) * max(1.0, batch / 16)  # batch 8's rows had the JIT
        if need_bytes > free:
            report["skipped"].append(f"batch {batch} @ {context}: memory ({need_bytes / 2**30:.0f} GiB needed, "
                                     f"{free / 2**30:.0f} GiB free)")
        elif need > budget.left():
            report["skipped"].append(f"batch {batch} @ {context}: time budget ({need:.0f} s est., "
                                     f"{budget.left():.0f} s left)")
        else:
            started = time.time()
            ids = cache = None
            try:
                cache_args = argparse.Namespace(batch=batch, steps=args.steps + 8,  # a shorter prefix to tile
                                                prefill_tokens=min(args.prefill_tokens, 8192))
                ids, cache, info = build_cache(model, context, cache_args, device, page)
                report.setdefault("caches", {})[f"{context}x{batch}"] = info
                for name in big_rows:
                    if budget.left() < 2 * est.get(name, 4.0) + 2:
                        report["skipped"].append(f"{name} @ {context}x{batch}: time budget")
                        continue
                    t0 = time.time()
                    row = measure(model, name, ids, cache, context, args, page, device)
                    row["seconds"] = round(time.time() - t0, 2)
                    rows.append(row)
                    derive(rows)
                    report["rows"] = public_rows(rows)
                    write(report, args.out)
                    print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded
                report.setdefault("big_batch_errors", []).append(f"batch {batch}: {type(exc).__name__}: {exc}")
            ids = cache = None
            free_memory(device)
            phase(report, f"rows {context}x{batch}", started)
            write(report, args.out)
    if "real" not in args.skip:
        started = time.time()
        if not os.environ.get("SPATTN_SMOLLM2_GGUF") and not args.quick:
            report["real_model"] = {"skipped": "SPATTN_SMOLLM2_GGUF is not set"}
        elif budget.left() < (8 if args.quick else 30):
            report["real_model"] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
        else:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                real_recall(args, device, page, report, budget)
            except Exception as exc:  # noqa: BLE001
                report["real_model_error"] = f"{type(exc).__name__}: {exc}"
                report["real_model_traceback"] = traceback.format_exc()
        phase(report, "real model", started)
    write(report, args.out)
    print(f"wrote {args.out} in {time.time() - report['_started']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
