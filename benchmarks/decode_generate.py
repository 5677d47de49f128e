"""Sparse decode inside Hugging Face ``generate``: tokens/s, per-step latency, the share of a step outside
attention, sampled recall, and the controller under a synthetic latency spike.

    PYTHONPATH=src python benchmarks/decode_generate.py --out $OUT/decode_generate.json            # H200, < 6 min
    PYTHONPATH=src python benchmarks/decode_generate.py --quick --device cpu --out /tmp/decode.json  # smoke (CPU)

Model: a random-weight Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads,
head dim 64), bfloat16; batch 8; contexts 32k and 128k. Per context the prompt is prefilled once (dense SDPA)
into a :class:`spattn.runtime.SpattnCache`; every variant then decodes ``--steps`` tokens from that cache
through ``Runtime.generate`` (the cache is cropped back between variants):

* ``dense``: the plan ``Plan()`` — transformers' SDPA attention in every layer (the baseline);
* ``sparse-16`` / ``sparse-64``: ``Sinks(64) | Window(1024) | TopK("bounds", k)``, pages of 128 tokens chosen per
  step from the cache's per-page key min/max (selection included in every timing).

Measured per variant: median / p95 decode-step wall time (``generate``'s own steps, timed by the runtime's step
clock; one host sync per step is in generate anyway), tokens/s = batch / median step; the share of a step spent
outside the attention call (a second run with every attention call CUDA-synchronised and timed; the sparse
attention call includes selection and gathering); density, pages and the sampled true recall against dense
(monitor level 1, every step); next-token agreement with dense on the same steps.

Correctness gates first (the run stops if one fails): the paged decode kernel against the float64 dense oracle
at 32k (tolerance rule of ``spattn.testing``) and ``generate`` with a plan that covers every token equal to dense
``generate`` (float32, 2 layers). Random weights make attention diffuse, so the recall numbers say what the
selection keeps on this model, not on a trained one.

Controller: at 32k with ``sparse-16``, target = 1.5 x the measured sparse median step; from step 16 to 40 the
layer-0 kernel stalls (sleeps 2 x the median step per call); recorded per step: latency, controller p95, budget,
layers running dense; reported: steps and seconds from the spike's start until the controller meets the target
again, and from its end, and the minimum sampled recall against the floor.
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))

import torch

import spattn
from spattn.bench.env import machine_info
from spattn.runtime import ControllerConfig, Runtime, decode_plan, paged_attention, select
from spattn.runtime.engine import NAME, runtime_attention_forward
from spattn.testing import assert_within, dense_attention, plain_attention


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def smollm2_shape(layers: int, max_positions: int, dtype, device, init: float = 0.02):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=max_positions, rope_theta=100000.0, tie_word_embeddings=True,
        attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=init,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype=dtype)
    return model.to(device).eval()


def plans(quick: bool) -> dict[str, spattn.Plan]:
    window, sinks = (64, 8) if quick else (1024, 64)
    return {
        "dense": spattn.Plan(),
        "sparse-16": spattn.Plan.uniform(spattn.Sinks(sinks) | spattn.Window(window) | spattn.TopK("bounds", 16)),
        "sparse-64": spattn.Plan.uniform(spattn.Sinks(sinks) | spattn.Window(window) | spattn.TopK("bounds", 64)),
    }


# ---------------------------------------------------------------------------------------------- gates
def gate_kernel(length: int, device, dtype, page: int) -> dict:
    """The paged decode kernel against the float64 oracle on the token mask it attends."""
    B, H, Hkv, D = 8, 9, 3, 64
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, length, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, length, D, generator=g).to(device, dtype)
    k[:, :, 5000 % length] += 3 * q[:, ::3, 0]  # a few keys the query likes
    plan = decode_plan(spattn.Sinks(64) | spattn.Window(1024) | spattn.TopK("bounds", 16))
    valid = torch.ones(B, length, dtype=torch.bool, device=device)
    from spattn.selectors.common import pool

    sel = select(q, length, valid, plan, 16, kv_heads=Hkv, page_size=page, scale=D ** -0.5,
                 key_min=pool(k, page, "amin"), key_max=pool(k, page, "amax"))
    out = paged_attention(q, k, v, sel, page_size=page, scale=D ** -0.5)
    tokens = (sel.pages.clamp_min(0)[..., None] * page + torch.arange(page, device=device)).flatten(2)
    tokens = tokens.repeat_interleave(H // Hkv, dim=1)
    mask = sel.mask & (tokens < length)
    allowed = torch.zeros(B, H, length + page, dtype=torch.bool, device=device)
    allowed.scatter_(-1, torch.where(mask, tokens, length), mask)
    allowed = allowed[..., None, :length]
    golden, _ = dense_attention(q, k, v, allowed)
    baseline, _ = plain_attention(q, k, v, allowed)
    assert_within(out, golden, baseline, what="paged decode kernel")
    return {"length": length, "pages_visited_max": int((sel.pages >= 0).sum(-1).max()),
            "max_err": float((out.double() - golden).abs().max()),
            "baseline_err": float((baseline.double() - golden).abs().max())}


def gate_generate(device, page: int) -> dict:
    """``generate`` with a plan that covers every token against dense ``generate`` (float32, 2 layers, one
    padded row): the same tokens, and per-step logits within 1e-3 of the largest logit where tokens agree."""
    model = smollm2_shape(2, 4096, torch.float32, device, init=0.2)  # larger weights: clear argmax margins
    ids = torch.randint(3, 49152, (2, 700), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2, return_dict_in_generate=True,
              output_logits=True)
    with torch.inference_mode():
        dense = model.generate(ids, **kw)
    plan = spattn.Plan.uniform(spattn.Sinks(64) | spattn.Window(4096) | spattn.TopK("bounds", 4))
    runtime = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0)
    out = runtime.generate(ids, **kw)
    runtime.detach()
    equal = bool(torch.equal(out.sequences, dense.sequences))
    diffs = []
    for a, b in zip(out.logits, dense.logits, strict=True):
        diffs.append(float((a.float() - b.float()).abs().max() / b.float().abs().max()))
        if not equal and not torch.equal(a.argmax(-1), b.argmax(-1)):
            break  # past a flipped token the two runs see different inputs
    if max(diffs) > 1e-3:
        raise AssertionError(f"generate with a plan covering every token differs from dense: relative logit "
                             f"error {max(diffs):.2e}")
    return {"prompt": 700, "new_tokens": 8, "equal_tokens": equal, "max_relative_logit_error": max(diffs),
            "fallbacks": dict(runtime.controller.summary()["counts"])}


# ---------------------------------------------------------------------------------------------- timing
class AttentionTimer:
    """Wrap the runtime's attention function: CUDA-synchronised wall time of every attention call."""

    def __init__(self, device) -> None:
        self.device, self.total = device, 0.0

    def __enter__(self):
        from transformers import AttentionInterface

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = runtime_attention_forward(*args, **kwargs)
            sync(self.device)
            self.total += time.perf_counter() - start
            return out

        AttentionInterface.register(NAME, timed)
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, runtime_attention_forward)


def decode(runtime, ids, cache, length, steps, **extra):
    with torch.inference_mode():  # the cache holds inference tensors
        for layer in cache.layers:
            layer.crop(length - layer.get_seq_length())
    out = runtime.generate(ids[:, : length + 1], attention_mask=torch.ones_like(ids[:, : length + 1]),
                           past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           pad_token_id=2, **extra)
    return out[:, length + 1:], list(runtime.step_seconds[1:])


def metric_mean(runtime, name: str) -> tuple[float | None, float | None]:
    """Mean over layers of a per-layer histogram's mean, and the smallest layer mean."""
    registry = runtime.metrics.registry
    if registry is None:
        return None, None
    means = []
    for layer in range(runtime.num_layers):
        count = registry.get_sample_value(f"{name}_count", {"layer": str(layer)})
        if count:
            means.append(registry.get_sample_value(f"{name}_sum", {"layer": str(layer)}) / count)
    return (statistics.fmean(means), min(means)) if means else (None, None)


def run_context(model, length, args, device, page, results, deadline) -> None:
    B, steps = args.batch, args.steps
    ids = torch.randint(3, 49152, (B, length + 1), generator=torch.Generator().manual_seed(length)).to(device)
    runtime = Runtime(model, spattn.Plan(), block_size=page, monitor_level=0)
    cache = runtime.new_cache(reserve=length + steps + 8)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids[:, :length], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    runtime.detach()
    print(f"[{length}] prefill {prefill:.1f} s", flush=True)
    reference = None
    for name, plan in plans(args.quick).items():
        if time.time() > deadline:
            results.append({"context": length, "variant": name, "skipped": "time budget"})
            continue
        row = {"context": length, "batch": B, "variant": name, "plan": plan.to_dict(), "prefill_seconds": prefill}
        try:
            rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0)
            decode(rt, ids, cache, length, 3)  # warm-up
            tokens, times = decode(rt, ids, cache, length, steps)
            med = statistics.median(times)
            row.update(step_median_ms=med * 1e3, step_p95_ms=sorted(times)[int(0.95 * (len(times) - 1))] * 1e3,
                       tokens_per_second=B / med, steps=len(times))
            with AttentionTimer(device) as timer:
                _, t2 = decode(rt, ids, cache, length, 8)
            row["attention_share"] = timer.total / sum(rt.step_seconds)
            row["outside_attention_share"] = 1 - row["attention_share"]
            rt.detach()
            if name == "dense":
                reference = tokens
            else:
                row["next_token_agreement_with_dense"] = float((tokens == reference).float().mean()) \
                    if reference is not None else None
                rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=1, recall_sample=1.0)
                decode(rt, ids, cache, length, 4)
                row["recall_mean"], row["recall_worst_layer"] = metric_mean(rt, "spattn_decode_recall")
                row["density_mean"], _ = metric_mean(rt, "spattn_decode_density")
                row["pages_mean"], _ = metric_mean(rt, "spattn_decode_pages")
                rt.detach()
        except Exception as exc:  # noqa: BLE001 - record and go on with the other rows
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
            for m in spattn.integrations.hf.attention_modules(model):
                m.__dict__.pop("_spattn_runtime", None)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("plan", "traceback")}), flush=True)
    dense_row = next((r for r in results if r.get("context") == length and r["variant"] == "dense"
                      and "step_median_ms" in r), None)
    for r in results:
        if r.get("context") == length and dense_row and "step_median_ms" in r:
            r["speedup_vs_dense"] = dense_row["step_median_ms"] / r["step_median_ms"]
    del cache


def controller_spike(model, length, args, device, page) -> dict:
    B = args.batch
    ids = torch.randint(3, 49152, (B, length + 1), generator=torch.Generator().manual_seed(7)).to(device)
    plan = plans(args.quick)["sparse-16"]
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0)
    cache = rt.new_cache(reserve=length + 80)
    with torch.inference_mode():
        model(ids[:, :length], past_key_values=cache, use_cache=True, logits_to_keep=1)
    decode(rt, ids, cache, length, 3)
    _, times = decode(rt, ids, cache, length, 8)
    rt.detach()
    base = statistics.median(times)
    target_ms = 1.5 * base * 1e3
    floor = 0.3
    config = ControllerConfig(latency_target_ms=target_ms, window=8, budget=16, max_budget=64, patience=4,
                              cooldown=16, recall_floor=floor)
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=1, recall_sample=0.25,
                 controller=config)
    spike = (16, 40)
    trace: list[dict] = []
    state = {"step": 0}

    def kernel(query, key, value, selection, **kwargs):
        if spike[0] <= state["step"] < spike[1] and state.get("layer0", True):
            sync(device)
            time.sleep(2 * base)
        return paged_attention(query, key, value, selection, **kwargs)

    original_end_step = rt.end_step

    def end_step(seconds, prefill):
        original_end_step(seconds, prefill)
        if not prefill:
            c = rt.controller
            trace.append({"step": state["step"], "ms": seconds * 1e3, "p95_ms": c.p95 * 1e3, "budget": c.budget,
                          "dense_layers": len(c.dense_until)})
            state["step"] += 1

    rt.end_step = end_step

    def layer0_only(module, query, key, value, attention_mask, **kwargs):
        state["layer0"] = module.layer_idx == 0
        return runtime_attention_forward(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(NAME, layer0_only)
    rt.kernel = kernel
    try:
        decode(rt, ids, cache, length, 64)
    finally:
        AttentionInterface.register(NAME, runtime_attention_forward)
    recall, worst = metric_mean(rt, "spattn_decode_recall")
    rt.detach()
    over = [t["step"] for t in trace if t["p95_ms"] > target_ms]
    first_over = next((s for s in over if s >= spike[0]), None)
    recovered = next((t["step"] for t in trace if first_over is not None and t["step"] > first_over
                      and t["p95_ms"] <= target_ms), None)
    seconds_between = lambda a, b: sum(t["ms"] for t in trace if a <= t["step"] < b) / 1e3  # noqa: E731
    return {
        "context": length, "batch": B, "plan": plan.to_dict(), "base_step_ms": base * 1e3, "target_ms": target_ms,
        "spike_steps": list(spike), "stall_ms_per_call": 2 * base * 1e3, "first_step_over_target": first_over,
        "first_step_back_under_target": recovered,
        "recover_steps_from_spike_start": None if recovered is None else recovered - spike[0],
        "recover_seconds_from_spike_start": None if recovered is None else seconds_between(spike[0], recovered),
        "recover_steps_from_spike_end": None if recovered is None else recovered - spike[1],
        "recall_floor": floor, "recall_mean": recall, "recall_worst_layer_mean": worst,
        "counts": rt.controller.summary()["counts"], "trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds; later rows are skipped after it")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batch, args.steps, args.layers = [1024, 2048], 2, 4, 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    page = 128 if not args.quick else 32
    started = time.time()
    deadline = started + args.time_budget
    report = {"machine": machine_info(), "transformers": __import__("transformers").__version__,
              "args": vars(args), "dtype": str(dtype), "page_size": page, "gates": {}, "rows": []}
    report["gates"]["kernel"] = gate_kernel(min(args.contexts), device, dtype, page)
    report["gates"]["generate"] = gate_generate(device, page)
    print("gates passed:", json.dumps(report["gates"]), flush=True)
    model = smollm2_shape(args.layers, max(args.contexts) + args.steps + 64, dtype, device)
    for length in args.contexts:
        if time.time() > deadline:
            report["rows"].append({"context": length, "skipped": "time budget"})
            continue
        run_context(model, length, args, device, page, report["rows"], deadline)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if time.time() < deadline + 60:
        try:
            report["controller"] = controller_spike(model, min(args.contexts), args, device, page)
        except Exception as exc:  # noqa: BLE001
            report["controller"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    report["seconds"] = time.time() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    for r in report["rows"]:
        if "step_median_ms" in r:
            print(f"{r['context']:>7} {r['variant']:>10}: step {r['step_median_ms']:8.2f} ms  "
                  f"{r['tokens_per_second']:8.1f} tok/s  x{r.get('speedup_vs_dense', 1):.2f}  "
                  f"outside attention {r['outside_attention_share']:.0%}  recall {r.get('recall_mean')}")
    c = report.get("controller", {})
    print("controller:", {k: c.get(k) for k in ("target_ms", "first_step_over_target", "first_step_back_under_target",
                                                 "recover_seconds_from_spike_start", "recall_mean")})


if __name__ == "__main__":
    main()
