"""Sparse decode inside Hugging Face ``generate``: tokens/s, per-step latency (p50 / p95), the share of a step
outside attention, sampled recall, the 8x target at 128k, and the controller under a synthetic latency spike.

    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src timeout 100 python benchmarks/decode_generate.py --time-budget 80 \
        --out $OUT/decode_generate.json                                        # H200, alone on the GPU
    PYTHONPATH=src python benchmarks/decode_generate.py --quick --device cpu --out /tmp/decode.json          # CPU smoke

Model: a random-weight Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads, head
dim 64, vocabulary 49152), bfloat16, ``max_position_embeddings`` = the largest context. Not the real SmolLM2: its
positions go to 8192, and decode at 32k / 128k would put its RoPE far outside what it was trained on; the
decode step's cost depends on the shapes only, which are SmolLM2's. Batch 8; contexts 128k then 32k.

The cache (one per context, built once, every variant decodes from it and it is cropped back between runs): the
first ``--prefill-tokens`` (32768) tokens are prefilled by the model (dense SDPA) into a
:class:`spattn.runtime.SpattnCache`; a longer context repeats that prefix's keys and values to its length
(``cache.tiled`` in the JSON) instead of a 128k dense prefill. The decode step reads the same number of bytes and
runs the same selection whatever the cached values are, so the timings are those of a 128k cache; the recall is
the true recall against dense attention over this same (tiled) cache.

Variants, decoded with ``Runtime.generate`` from the cache, ``--steps`` (32) timed steps after 3 warm-up steps,
each eager and captured (``<variant>+graph``: ``Runtime(cuda_graph=True)``, the whole model's static decode step
recorded in a CUDA graph and replayed; compared with ``dense+graph``, the dense step captured in the same
harness; see ``docs/runtime.md``, *Static decode and CUDA graphs*):

* ``dense``: the plan ``Plan()`` -- transformers' SDPA attention in every layer (the baseline);
* ``sparse-16`` / ``sparse-64``: ``Sinks(64) | Window(1024) | TopK("bounds", k)``, pages of 128 tokens chosen per
  step from the cache's per-page key min/max (selection and table building included in every timing); on CUDA the
  attention runs through spattn's triton split-K decode kernel (``Runtime(decode_kernel="auto")``: block tables
  built on the device from the selected pages, one launch per layer, over the cache's whole zeroed buffer so the
  launch plan is the same at every step), elsewhere through the torch reference ``paged_attention``.

Measured, in the order of :func:`tasks` (captured rows first; the rest of this paragraph describes the eager
diagnostics; each result is written to the JSON as soon as it exists, and a
task whose estimated cost does not fit in what is left of ``--time-budget`` is skipped and recorded as skipped):
at 128k, dense and sparse-16 ``generate`` step latency (the 8x target: ``speedup_vs_dense``, end to end, p50 over
p50); the attention call alone (layer 0's cache: torch SDPA vs selection + kernel, x layers =
``attention_per_step_ms``, with ``select_call_ms`` / ``kernel_call_ms`` / ``torch_kernel_call_ms`` apart); the
model's decode forward alone without the generate loop (``forward_p50_ms``, ``generate_loop_ms``); the share of a
step outside attention (a second run with every attention call CUDA-synchronised and timed); then the timings at
32k, the sampled true recall (monitor level 1, every step, 4 steps), sparse-64, and the rest at 32k. tokens/s =
batch / p50 step; next-token agreement with dense on the same steps. ``phase_seconds`` says when the gates and
the model build finished.

Correctness gates first (the run stops if one fails): the runtime's decode kernel (triton on CUDA) and the torch
reference path against the float64 dense oracle at 32k (tolerance rule of ``spattn.testing``), and ``generate``
with a plan that covers every token (through the runtime's default kernel) equal to dense ``generate`` (float32,
2 layers), then the captured static step equal to the eager runtime (``gate_static``; not fatal: a failure drops
the ``+graph`` rows). Random weights make attention diffuse, so the recall numbers say what the
selection keeps on this model, not on a trained one.

Controller (last): at 32k with ``sparse-16``, target = 1.5 x the measured sparse median step; from step 16 to 40
the layer-0 kernel stalls (sleeps 2 x the median step per call); recorded per step: latency, controller p95,
budget, layers running dense; reported: steps and seconds from the spike's start until the controller meets the
target again, and from its end, and the mean sampled recall against the floor.
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import argparse
import json
import math
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
from spattn.runtime.cache import SpattnCache
from spattn.runtime.engine import KERNELS, NAME, runtime_attention_forward
from spattn.testing import assert_within, dense_attention, plain_attention

MODEL = ("random-weight LlamaForCausalLM of SmolLM2-135M's shape: 30 layers (--layers), hidden 576, 9 / 3 heads, "
         "head dim 64, intermediate 1536, vocabulary 49152, rope_theta 1e5")
KERNEL = ["auto"]  # --decode-kernel: the runtime's sparse decode kernel in every row
CACHE = ("first --prefill-tokens tokens prefilled by the model (dense SDPA); a longer context repeats that prefix's "
         "keys/values to its length (per-page statistics recomputed); decode positions are the true ones")


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
    """The plans by variant name; ``<name>+graph`` decodes the same plan with ``Runtime(cuda_graph=True)``."""
    window, sinks = (64, 8) if quick else (1024, 64)
    base = {
        "dense": spattn.Plan(),
        "sparse-16": spattn.Plan.uniform(spattn.Sinks(sinks) | spattn.Window(window) | spattn.TopK("bounds", 16)),
        "sparse-64": spattn.Plan.uniform(spattn.Sinks(sinks) | spattn.Window(window) | spattn.TopK("bounds", 64)),
    }
    return {**base, **{f"{name}+graph": plan for name, plan in base.items()}}


def is_graph(variant: str) -> bool:
    return variant.endswith("+graph")


def baseline_of(variant: str) -> str:
    """The dense row a variant is compared with: the same harness (captured against captured)."""
    return "dense+graph" if is_graph(variant) else "dense"


VARIANTS = ["dense+graph", "sparse-16+graph", "dense", "sparse-16", "sparse-64+graph", "sparse-64"]


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
    out = KERNELS[KERNEL[0]](q, k, v, sel, page_size=page, scale=D ** -0.5)  # auto: triton on CUDA
    reference = paged_attention(q, k, v, sel, page_size=page, scale=D ** -0.5)
    tokens = (sel.pages.clamp_min(0)[..., None] * page + torch.arange(page, device=device)).flatten(2)
    tokens = tokens.repeat_interleave(H // Hkv, dim=1)
    mask = sel.mask & (tokens < length)
    allowed = torch.zeros(B, H, length + page, dtype=torch.bool, device=device)
    allowed.scatter_(-1, torch.where(mask, tokens, length), mask)
    allowed = allowed[..., None, :length]
    golden, _ = dense_attention(q, k, v, allowed)
    baseline, _ = plain_attention(q, k, v, allowed)
    assert_within(out, golden, baseline, what="paged decode kernel")
    assert_within(reference, golden, baseline, what="torch paged decode (reference path)")
    return {"length": length, "pages_visited_max": int((sel.pages >= 0).sum(-1).max()),
            "kernel": KERNELS[KERNEL[0]].__name__ + (" (triton on CUDA)" if KERNEL[0] == "auto" else ""),
            "max_err": float((out.double() - golden).abs().max()),
            "reference_path_max_err": float((reference.double() - golden).abs().max()),
            "baseline_err": float((baseline.double() - golden).abs().max())}


def gate_generate(device, page: int, prompt: int = 700) -> dict:
    """``generate`` with a plan that covers every token against dense ``generate`` (float32, 2 layers, one
    padded row): the same tokens, and per-step logits within 1e-3 of the largest logit where tokens agree."""
    model = smollm2_shape(2, 4096, torch.float32, device, init=0.2)  # larger weights: clear argmax margins
    ids = torch.randint(3, 49152, (2, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2, return_dict_in_generate=True,
              output_logits=True)
    with torch.inference_mode():
        dense = model.generate(ids, **kw)
    plan = spattn.Plan.uniform(spattn.Sinks(64) | spattn.Window(4096) | spattn.TopK("bounds", 4))
    # the prefill through the reference backend (no triton JIT of prefill kernels this benchmark does not time);
    # the decode steps through the runtime's decode kernel (triton on CUDA)
    runtime = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, backend="reference",
                      decode_kernel=KERNEL[0])
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
    report = {"prompt": prompt, "new_tokens": 8, "prefill_backend": "reference", "equal_tokens": equal,
              "max_relative_logit_error": max(diffs), "fallbacks": dict(runtime.controller.summary()["counts"])}
    try:
        report["static"] = gate_static(model, ids, mask, page)
    except Exception as exc:  # noqa: BLE001 - not fatal: the +graph rows are dropped, the eager rows measured
        report["static"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()}
        for m in spattn.integrations.hf.attention_modules(model):
            m.__dict__.pop("_spattn_runtime", None)
    return report


def gate_static(model, ids, mask, page: int) -> dict:
    """The static decode step recorded in a CUDA graph (``Runtime(cuda_graph=True)``) against the eager
    runtime, same sparse plan (sinks, window and 2 selected pages of a 700-token prompt, one padded row): the
    same tokens and per-step logits within 1e-3 of the largest logit (both runs through the decode kernel the
    measurements use, float32). Not fatal: a failure disables the graph
    variants (recorded), the eager rows are still measured."""
    plan = spattn.Plan.uniform(spattn.Sinks(64) | spattn.Window(256) | spattn.TopK("bounds", 2))
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2, output_logits=True)
    started = time.time()
    eager = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, backend="reference",
                    decode_kernel=KERNEL[0])
    with torch.inference_mode():
        expected = eager.generate(ids, return_dict_in_generate=True, **kw)
    eager.detach()
    static = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, backend="reference",
                     decode_kernel=KERNEL[0], cuda_graph=True)
    out = static.generate(ids, **kw)
    static.detach()
    decoder = static.decoder
    equal = bool(torch.equal(out, expected.sequences))
    diffs = []
    for a, b in zip(decoder.logits, expected.logits, strict=True):
        diffs.append(float((a.float() - b.float()).abs().max() / b.float().abs().max()))
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break
    result = {"plan": plan.to_dict(), "equal_tokens": equal, "max_relative_logit_error": max(diffs),
              "captures": decoder.captures, "replays": decoder.replays, "graph_off_reason": decoder.reason,
              "fallbacks": dict(static.controller.summary()["counts"]), "seconds": round(time.time() - started, 2)}
    result["passed"] = equal and max(diffs) <= 1e-3 and (decoder.replays > 0 or model.device.type != "cuda")
    return result


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


def build_cache(model, length: int, args, device, page: int) -> tuple[torch.Tensor, SpattnCache, dict]:
    """The ``[B, length]`` cache every variant decodes from, and how it was built.

    The first ``min(length, --prefill-tokens)`` tokens are prefilled by the model (dense SDPA, the model's own
    keys and values, RoPE at their positions). Past that the cache is filled by repeating that prefix's keys and
    values (tiles); positions of the decoded tokens are still ``length, length + 1, ...``. Decode time does not
    depend on the cached values (dense reads every key; sparse reads a fixed number of pages and scores every
    page's bounds), so the timings are those of a real ``length``-token cache; recall is measured against dense
    attention over this same cache."""
    B = args.batch
    ids = torch.randint(3, 49152, (B, length + 1), generator=torch.Generator().manual_seed(length)).to(device)
    real = min(length, args.prefill_tokens)
    layers = model.config.num_hidden_layers
    reserve = length + args.steps + 16
    prefix = SpattnCache(layers, page_size=page, reserve=real if real < length else reserve)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids[:, :real], past_key_values=prefix, use_cache=True, logits_to_keep=1)
    sync(device)
    info = {"prefilled_tokens": real, "prefill_seconds": time.perf_counter() - start, "tiled": real < length}
    if real == length:
        return ids, prefix, info
    start = time.perf_counter()
    cache = SpattnCache(layers, page_size=page, reserve=reserve)
    reps = -(-length // real)
    with torch.inference_mode():
        for source, target in zip(prefix.layers, cache.layers, strict=True):
            keys = source.keys.repeat(1, 1, reps, 1)[:, :, :length]
            values = source.values.repeat(1, 1, reps, 1)[:, :, :length]
            target.update(keys, values)
            del keys, values
            source.reset()
    sync(device)
    info["fill_seconds"] = time.perf_counter() - start
    return ids, cache, info


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure_timing(model, plan, ids, cache, length, args, page, row) -> None:
    """tokens/s and per-step p50 / p95 of ``generate``'s decode steps (3 warm-up steps first). A ``+graph``
    variant: ``Runtime(cuda_graph=True)``; its first decode step (eager, then recorded) is left out of the
    statistics and reported as ``first_step_ms``."""
    graph = is_graph(row["variant"])
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, decode_kernel=KERNEL[0],
                 cuda_graph=graph)
    try:
        decode(rt, ids, cache, length, 3)
        tokens, times = decode(rt, ids, cache, length, args.steps + (1 if graph else 0))
        if graph:
            d = rt.decoder
            row.update(first_step_ms=times[0] * 1e3, captures=d.captures, replays=d.replays,
                       graph_off_reason=d.reason)
            times = times[1:]
    finally:
        rt.detach()
    med = statistics.median(times)
    row.update(step_p50_ms=med * 1e3, step_p95_ms=percentile(times, 0.95) * 1e3, step_mean_ms=statistics.fmean(times)
               * 1e3, tokens_per_second=args.batch / med, steps=len(times), step_ms=[t * 1e3 for t in times])
    row["_tokens"] = tokens[:, : args.steps]


def measure_share(model, plan, ids, cache, length, args, device, page, row) -> None:
    """Share of a step outside the attention call (every attention call CUDA-synchronised and timed)."""
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, decode_kernel=KERNEL[0])
    try:
        with AttentionTimer(device) as timer:
            decode(rt, ids, cache, length, 8)
    finally:
        rt.detach()
    total = sum(rt.step_seconds)  # step 0 (the first forward from the cache) is inside generate too
    row["attention_share"] = timer.total / total
    row["outside_attention_share"] = 1 - row["attention_share"]
    row["synchronised_step_mean_ms"] = total / len(rt.step_seconds) * 1e3


def measure_forward(model, plan, ids, cache, length, args, device, page, row) -> None:
    """The model's decode forward alone (one token, from the cache, no ``generate`` loop, no sampling):
    CUDA-synchronised p50 over ``--steps`` steps after 3 warm-up steps; ``generate_loop_ms`` = the generate
    step p50 minus this."""
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, decode_kernel=KERNEL[0])
    B = ids.shape[0]
    times = []
    try:
        with torch.inference_mode():
            for layer in cache.layers:
                layer.crop(length - layer.get_seq_length())
            rt.cache = cache
            for i in range(3 + args.steps):
                mask = torch.ones(B, length + i + 1, dtype=torch.long, device=device)
                sync(device)
                start = time.perf_counter()
                model(ids[:, length:length + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
                sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - start)
    finally:
        rt.detach()
    row["forward_p50_ms"] = statistics.median(times) * 1e3
    if "step_p50_ms" in row:
        row["generate_loop_ms"] = row["step_p50_ms"] - row["forward_p50_ms"]


def measure_recall(model, plan, ids, cache, length, page, row) -> None:
    """Sampled true recall (every step, monitor level 1), density and pages over 4 decode steps."""
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=1, recall_sample=1.0,
                 decode_kernel=KERNEL[0])
    try:
        decode(rt, ids, cache, length, 4)
        row["recall_mean"], row["recall_worst_layer"] = metric_mean(rt, "spattn_decode_recall")
        row["density_mean"], _ = metric_mean(rt, "spattn_decode_density")
        row["pages_mean"], _ = metric_mean(rt, "spattn_decode_pages")
    finally:
        rt.detach()


def measure_kernel(plan, cache, length, args, device, page, row, repeats: int = 20) -> None:
    """The attention call alone on layer 0's cache, x layers: dense = torch SDPA (GQA, one query, no mask);
    sparse = selection from the page statistics + the paged kernel (``Runtime.kernel``). CUDA-synchronised."""
    layer = cache.layers[0]
    key, value = layer.keys, layer.values
    B, Hkv, L, D = key.shape
    H = args.heads
    query = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(3)).to(device, key.dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    pattern = plan.pattern_for(0)
    dp = None if pattern is None else decode_plan(pattern)

    def selection():
        key_min, key_max = layer.page_bounds()
        return select(query, L, valid, dp, dp.blocks, kv_heads=Hkv, page_size=page, scale=D ** -0.5,
                      key_min=key_min, key_max=key_max)

    sel = None if dp is None else selection()

    def kernel():  # the runtime's kernel on CUDA: triton on device tables, over the cache's whole buffer
        if KERNEL[0] == "torch":
            return paged_attention(query, key, value, sel, page_size=page, scale=D ** -0.5)
        return KERNELS[KERNEL[0]](query, key, value, sel, page_size=page, scale=D ** -0.5, whole_buffer=True)

    def call():
        if dp is None:
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)
        nonlocal sel
        sel = selection()
        return kernel()

    def timed(fn) -> float:
        with torch.inference_mode():
            for _ in range(3):
                fn()
            sync(device)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def graph_timed(fn) -> float:
        """Mean GPU time of ``fn`` recorded in a CUDA graph and replayed ``repeats`` times back to back."""
        if device.type != "cuda":
            return timed(fn)
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                graph.replay()
            sync(device)
        return (time.perf_counter() - start) / repeats

    if is_graph(row["variant"]):
        if device.type != "cuda":  # a dry run: the same calls, timed without a graph
            row["attention_call_note"] = "no CUDA: timed without a CUDA graph (dry run)"
        measure_kernel_graph(dp, layer, query, L, page, len(cache.layers), device, row, graph_timed,
                             lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                                                       enable_gqa=True))
        return
    med = timed(call)
    row["attention_call_ms"] = med * 1e3
    row["attention_per_step_ms"] = med * 1e3 * len(cache.layers)
    row["attention_call_what"] = ("torch SDPA, enable_gqa, one query, no mask" if dp is None
                                  else "select (bounds from page min/max) + triton decode on device tables"
                                  if device.type == "cuda" and KERNEL[0] != "torch" else f"select + {KERNEL[0]} kernel")
    if dp is not None:  # the two halves apart: page selection, and the kernel on a fixed selection
        row["select_call_ms"] = timed(selection) * 1e3
        row["kernel_call_ms"] = timed(kernel) * 1e3
        row["torch_kernel_call_ms"] = timed(
            lambda: paged_attention(query, key, value, sel, page_size=page, scale=D ** -0.5)) * 1e3


def measure_kernel_graph(dp, layer, query, L, page, layers, device, row, graph_timed, flash) -> None:
    """The attention call of the captured static step, alone, in a CUDA graph (mean GPU time of back-to-back
    replays): dense = SDPA over the cache's whole capacity with a bool mask (GQA folded into the query
    length), and for reference torch's flash SDPA over exactly L keys; sparse = ``select_from_row`` over the
    capacity with the step's static row and fixed width + the decode kernel on the whole buffers."""
    from spattn.runtime.decode import select_from_row, static_rows
    from spattn.runtime.engine import _dense_static

    whole_k, whole_v = layer._keys, layer._values
    B, Hkv, C, D = whole_k.shape
    H = query.shape[1]
    valid = torch.zeros(B, C, dtype=torch.bool, device=device)
    valid[:, :L] = True
    n = layers
    if dp is None:
        masked = graph_timed(lambda: _dense_static(None, query, whole_k, whole_v, valid, {"scaling": D ** -0.5}))
        exact = graph_timed(flash)
        row.update(attention_call_graph_ms=masked * 1e3, attention_per_step_graph_ms=masked * 1e3 * n,
                   flash_exact_length_call_graph_ms=exact * 1e3, flash_exact_length_per_step_graph_ms=exact * 1e3 * n,
                   attention_call_what="the static step's dense attention: SDPA over the whole capacity with a bool "
                   "mask, GQA folded into the query length, in a CUDA graph; flash_exact_length_*: torch's flash "
                   "SDPA (enable_gqa, no mask) over exactly L keys, in a CUDA graph")
        if "step_p50_ms" in row:
            row["step_p50_ms_with_flash_attention_estimate"] = row["step_p50_ms"] - (masked - exact) * 1e3 * n
    else:
        rows, pages = static_rows(dp, C, range(L, L + 1), batch=B, heads=H, page_size=page, device=device,
                                  group=H // Hkv)
        budget = torch.full((1,), dp.blocks, dtype=torch.long, device=device)
        sizes = (L - torch.arange(C // page, device=device) * page).clamp(1, page)
        width = min(C // page, pages + dp.blocks + 1)
        key_min, key_max = layer._min, layer._max

        def call():
            sel = select_from_row(query, valid, dp, budget, rows[0], width, kv_heads=Hkv, page_size=page,
                                  scale=D ** -0.5, key_min=key_min, key_max=key_max, page_sizes=sizes)
            return KERNELS[KERNEL[0]](query, whole_k, whole_v, sel, page_size=page, scale=D ** -0.5)

        med = graph_timed(call)
        row.update(attention_call_graph_ms=med * 1e3, attention_per_step_graph_ms=med * 1e3 * n,
                   attention_call_what="the static step's select_from_row over the capacity (static row, fixed "
                   "width) + the decode kernel on the whole buffers, in a CUDA graph")
    if "step_p50_ms" in row:
        row["outside_attention_share"] = 1 - row["attention_per_step_graph_ms"] / row["step_p50_ms"]


def tasks(contexts: list[int], variants: list[str]) -> list[tuple[str, int, str]]:
    """(kind, context, variant), most important first: at the largest context the step timing of the first
    four variants (captured dense / sparse-16, then eager), the attention call alone of the first two (in a CUDA
    graph: the share of the captured step outside attention), the sampled recall; the same at the other
    contexts; then per context the other variants and the eager diagnostics (attention call, share, model
    forward alone)."""
    ordered = sorted(contexts, reverse=True)
    head, rest = variants[:4], variants[4:]
    eager = [v for v in variants if not is_graph(v)][:2]
    sparse = [v for v in variants if v.startswith("sparse") and not is_graph(v)]
    out = []
    for c in ordered:  # one pass per context for what matters most (a 128k cache is rebuilt once per pass)
        out += [("timing", c, v) for v in head]
        out += [("kernel", c, v) for v in head[:2]]
        out += [("recall", c, v) for v in sparse[:1]]
    for c in ordered:
        out += [("timing", c, v) for v in rest]
        out += [(kind, c, v) for kind in ("kernel", "share", "forward") for v in eager]
        out += [("recall", c, v) for v in sparse[1:]]
        out += [("kernel", c, v) for v in rest]
    return [t for i, t in enumerate(out) if t not in out[:i]]


class Budget:
    """Seconds left before ``--time-budget`` and cost estimates of the next task from the ones already run."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.time(), seconds
        self.cost: dict[tuple[str, int], float] = {}

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)

    def estimate(self, kind: str, context: int) -> float:
        if (kind, context) in self.cost:
            return self.cost[(kind, context)]
        same = [(c, s) for (k, c), s in self.cost.items() if k == kind]
        return max(s * context / c for c, s in same) if same else 0.0

    def record(self, kind: str, context: int, seconds: float) -> None:
        self.cost[(kind, context)] = max(self.cost.get((kind, context), 0.0), seconds)


def write(report: dict, path: str) -> None:
    """Write the report now (atomically): a run killed later still leaves what it measured."""
    report["seconds"] = time.time() - report["_started"]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        public["rows"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["rows"]]
        json.dump(public, f, indent=2)
    os.replace(tmp, path)


def speedups(rows: list[dict]) -> None:
    """Speedups against the dense row of the same harness (captured against captured, eager against eager);
    captured rows also against eager dense and their own eager variant."""
    def find(context, variant):
        return next((d for d in rows if d["context"] == context and d["variant"] == variant and "step_p50_ms" in d),
                    None)

    for r in rows:
        if is_graph(r["variant"]) and "step_p50_ms" in r:
            eager_dense, eager_same = find(r["context"], "dense"), find(r["context"], r["variant"][: -len("+graph")])
            if eager_dense:
                r["speedup_vs_eager_dense"] = eager_dense["step_p50_ms"] / r["step_p50_ms"]
            if eager_same:
                r["speedup_vs_own_eager"] = eager_same["step_p50_ms"] / r["step_p50_ms"]
    for r in rows:
        dense = find(r["context"], baseline_of(r["variant"]))
        if dense and "attention_call_ms" in r and "attention_call_ms" in dense:
            r["attention_call_speedup_vs_dense"] = dense["attention_call_ms"] / r["attention_call_ms"]
        if dense and "step_p50_ms" in r:
            r["speedup_vs_dense"] = dense["step_p50_ms"] / r["step_p50_ms"]
            r["meets_8x"] = r["speedup_vs_dense"] >= 8.0 if not r["variant"].startswith("dense") else None
        if dense and "_tokens" in r and "_tokens" in dense and not r["variant"].startswith("dense"):
            r["next_token_agreement_with_dense"] = float((r["_tokens"] == dense["_tokens"]).float().mean())


def run_rows(model, args, device, page, report, budget: Budget) -> None:
    all_plans = plans(args.quick)
    rows: dict[tuple[int, str], dict] = {}
    for c in sorted(args.contexts, reverse=True):
        for v in args.variants:
            rows[(c, v)] = {"context": c, "batch": args.batch, "variant": v, "plan": all_plans[v].to_dict()}
    report["rows"] = list(rows.values())
    caches: dict[int, tuple] = {}
    for kind, context, variant in tasks(args.contexts, args.variants):
        row = rows[(context, variant)]
        if kind != "timing" and "step_p50_ms" not in row:
            row.setdefault("skipped", []).append(f"{kind}: no timing row")
            continue
        need = budget.estimate(kind, context) + (0 if context in caches else budget.estimate("cache", context))
        if need > budget.left():
            row.setdefault("skipped", []).append(f"{kind}: time budget ({need:.0f} s estimated, "
                                                 f"{budget.left():.0f} s left)")
            write(report, args.out)
            continue
        try:
            if context not in caches:
                started = time.time()
                for other in list(caches):  # one cache at a time above 64k (memory), built once per context
                    if max(other, context) > 65536:
                        del caches[other]
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                caches[context] = build_cache(model, context, args, device, page)
                budget.record("cache", context, time.time() - started)
                report.setdefault("caches", {})[str(context)] = caches[context][2]
                print(f"[{context}] cache {caches[context][2]}", flush=True)
            ids, cache, _ = caches[context]
            started = time.time()
            plan = all_plans[variant]
            if kind == "timing":
                measure_timing(model, plan, ids, cache, context, args, page, row)
            elif kind == "kernel":
                measure_kernel(plan, cache, context, args, device, page, row)
            elif kind == "forward":
                measure_forward(model, plan, ids, cache, context, args, device, page, row)
            elif kind == "share":
                measure_share(model, plan, ids, cache, context, args, device, page, row)
            else:
                measure_recall(model, plan, ids, cache, context, page, row)
            budget.record(kind, context, time.time() - started)
            report.setdefault("task_seconds", []).append([kind, context, variant, round(time.time() - started, 2),
                                                          round(time.time() - budget.start, 1)])
        except Exception as exc:  # noqa: BLE001 - record and go on with the other rows
            row.setdefault("errors", []).append({"task": kind, "error": f"{type(exc).__name__}: {exc}",
                                                 "traceback": traceback.format_exc()})
            for m in spattn.integrations.hf.attention_modules(model):
                m.__dict__.pop("_spattn_runtime", None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        speedups(report["rows"])
        write(report, args.out)
        shown = {k: v for k, v in row.items() if k not in ("plan", "step_ms", "_tokens", "errors")}
        print(kind, json.dumps(shown), flush=True)
    caches.clear()


def recovery(trace: list[dict], spike: tuple[int, int], target_ms: float) -> dict:
    """From a controller trace (per decode step: ``step``, ``ms``, ``p95_ms`` or None before the first steady
    step): the first step at or after the spike with p95 over the target, the first later one back under it, and
    the steps / seconds that took from the spike's start and end (None when it never came back)."""
    over = [t["step"] for t in trace if t["p95_ms"] is not None and t["p95_ms"] > target_ms]
    first_over = next((s for s in over if s >= spike[0]), None)
    recovered = next((t["step"] for t in trace if first_over is not None and t["step"] > first_over
                      and t["p95_ms"] is not None and t["p95_ms"] <= target_ms), None)
    seconds = sum(t["ms"] for t in trace if recovered is not None and spike[0] <= t["step"] < recovered) / 1e3
    return {"first_step_over_target": first_over, "first_step_back_under_target": recovered,
            "recover_steps_from_spike_start": None if recovered is None else recovered - spike[0],
            "recover_seconds_from_spike_start": None if recovered is None else seconds,
            "recover_steps_from_spike_end": None if recovered is None else recovered - spike[1]}


def controller_spike(model, length, args, device, page) -> dict:
    B = args.batch
    ids = torch.randint(3, 49152, (B, length + 1), generator=torch.Generator().manual_seed(7)).to(device)
    plan = plans(args.quick)["sparse-16"]
    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, decode_kernel=KERNEL[0])
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
                 controller=config, decode_kernel=KERNEL[0])
    spike = (16, 40)
    trace: list[dict] = []
    state = {"step": 0}

    def kernel(query, key, value, selection, **kwargs):
        if spike[0] <= state["step"] < spike[1] and state.get("layer0", True):
            sync(device)
            time.sleep(2 * base)
        return KERNELS[KERNEL[0]](query, key, value, selection, **kwargs)

    original_end_step = rt.end_step

    def end_step(seconds, prefill, instrumented=None):
        original_end_step(seconds, prefill, instrumented)
        if not prefill:
            c = rt.controller
            trace.append({"step": state["step"], "ms": seconds * 1e3, "p95_ms": None if c.p95 is None else c.p95 * 1e3,
                          "instrumented": bool(instrumented), "budget": c.budget, "dense_layers": len(c.dense_until)})
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
    return {
        "context": length, "batch": B, "plan": plan.to_dict(), "base_step_ms": base * 1e3, "target_ms": target_ms,
        "spike_steps": list(spike), "stall_ms_per_call": 2 * base * 1e3, **recovery(trace, spike, target_ms),
        "recall_floor": floor, "recall_mean": recall, "recall_worst_layer_mean": worst,
        "counts": rt.controller.summary()["counts"], "trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 131072 32768")
    parser.add_argument("--decode-kernel", default="auto", choices=sorted(KERNELS),
                        help="the runtime's sparse decode kernel (default auto: triton on CUDA, torch elsewhere; "
                             "triton on CPU needs TRITON_INTERPRET=1, a dry run)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                        help="'+graph': Runtime(cuda_graph=True); each is compared with the dense of its harness")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prefill-tokens", type=int, default=32768,
                        help="tokens prefilled by the model; longer caches repeat that prefix (default 32768)")
    parser.add_argument("--no-controller", action="store_true", help="skip the controller spike")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--time-budget", type=float, default=300.0,
                        help="seconds for the whole run (default 300); a task whose estimated cost does not fit "
                             "in what is left is skipped and recorded as skipped")
    args = parser.parse_args()
    if args.quick:
        args.contexts = args.contexts or [2048, 1024]
        args.batch, args.steps, args.layers, args.prefill_tokens = 2, 4, 2, 512
    args.contexts = args.contexts or [131072, 32768]
    KERNEL[0] = args.decode_kernel
    if args.variants[0] not in ("dense", "dense+graph"):
        parser.error("--variants must start with a dense variant (the baseline of the speedups)")
    budget = Budget(args.time_budget)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    page = 128 if not args.quick else 32
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = {"machine": machine_info(device), "transformers": __import__("transformers").__version__,
              "args": vars(args), "dtype": str(dtype), "page_size": page, "model": MODEL, "cache": CACHE,
              "dense_baseline": "transformers' SDPA attention (sdpa_attention_forward) in every layer",
              "gates": {}, "rows": [], "_started": budget.start}
    write(report, args.out)
    report["phase_seconds"] = {"start": round(time.time() - budget.start, 2)}
    report["gates"]["kernel"] = gate_kernel(min(max(args.contexts), 32768), device, dtype, page)
    report["phase_seconds"]["kernel_gate_done"] = round(time.time() - budget.start, 2)
    write(report, args.out)
    report["gates"]["generate"] = gate_generate(device, page, prompt=200 if args.quick else 700)
    if not report["gates"]["generate"]["static"]["passed"]:
        args.variants = [v for v in args.variants if not is_graph(v)]
        report["graph_variants_dropped"] = "the static / CUDA graph gate failed (gates.generate.static)"
    write(report, args.out)
    print("gates passed:", json.dumps(report["gates"]), flush=True)
    report["phase_seconds"]["gates_done"] = round(time.time() - budget.start, 2)
    model = smollm2_shape(args.layers, max(args.contexts) + args.steps + 64, dtype, device)
    report["phase_seconds"]["model_built"] = round(time.time() - budget.start, 2)
    args.heads = model.config.num_attention_heads
    run_rows(model, args, device, page, report, budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    control = min(args.contexts)
    sparse = next((r for r in report["rows"] if r["context"] == control and r["variant"] == "sparse-16"
                   and "step_p50_ms" in r), None)
    stall = 0.0 if sparse is None else 24 * 3 * sparse["step_p50_ms"] / 1e3  # 24 stalled steps of 3 x a step
    need = 2 * budget.estimate("cache", control) + 4 * budget.estimate("timing", control) + stall
    if args.no_controller:
        report["controller"] = {"skipped": "--no-controller"}
    elif need > budget.left():
        report["controller"] = {"skipped": f"time budget ({need:.0f} s estimated, {budget.left():.0f} s left)"}
    else:
        try:
            report["controller"] = controller_spike(model, control, args, device, page)
        except Exception as exc:  # noqa: BLE001
            report["controller"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    write(report, args.out)
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    for r in report["rows"]:
        if "step_p50_ms" in r:
            print(f"{r['context']:>7} {r['variant']:>10}: step p50 {r['step_p50_ms']:8.2f} ms p95 "
                  f"{r['step_p95_ms']:8.2f} ms {r['tokens_per_second']:8.1f} tok/s  x{r.get('speedup_vs_dense', 1):.2f}"
                  f"  outside attention {r.get('outside_attention_share')}  recall {r.get('recall_mean')}")
        else:
            print(f"{r['context']:>7} {r['variant']:>10}: {r.get('skipped') or r.get('errors')}")
    c = report.get("controller", {})
    print("controller:", {k: c.get(k) for k in ("target_ms", "first_step_over_target", "first_step_back_under_target",
                                                 "recover_seconds_from_spike_start", "recall_mean", "skipped",
                                                 "error")})


if __name__ == "__main__":
    main()
