"""Host (Python) cost per call of ``spattn.attention`` on the triton path, model-free, at SmolLM2-135M's shapes.

Why: on the H200 (session 7, commit ded742c) a patched SmolLM2 forward at 8192 tokens ran 28 ms of device work in
48 ms of host time, and the one-layer kernel table put spattn at ~0.7x Flex on every row: per-call host work, not
the kernels (``docs/planner.md``, Note [forward host cost] in ``ops/attention/impl/triton/_launch.py``). This
script measures it without a model (B 1, H 9, Hkv 3, D 64; ``--lengths``, default 1024 and 8192), for three
patterns: ``dense`` (causal), ``sinks_window`` (``Sinks(4) | Window(L / 8)``) and ``per_head`` (layer 1 of the
committed latency plan, ``--plan``: a PerHead of windows and ``Budgeted`` at that length). Steps, most important
first, each written to the JSON as soon as it exists; ``--time-budget`` skips what would not fit (estimated from
the steps already timed, JIT included) and records it:

1. gate, at the first length: spattn (triton on CUDA) against the float64 oracle on each pattern's brute-force mask
   (``spattn.testing`` tolerance rule, baseline the same maths in the test dtype), and the cached call's output
   against the first (uncached) call's, bit for bit.
2. per call, each length and pattern: ``host_us`` (time to issue the call; the device is kept busy by a sleep
   kernel queued first, so the host never waits), ``device_us`` (the same calls back to back on the device, with
   ``gap_free`` saying the host stayed ahead of them), ``wall_us`` (one call, synchronised before and after), for
   ``spattn`` (a Layout, the integration's call), ``spattn_cold`` (every cache of this change cleared before each
   call: the work each call did before it, plus forgetting and re-keeping it; ``clear_only`` is the forgetting
   alone), ``spattn_pattern`` (a static pattern: its Layout from the cache),
   ``python_only`` (the launch replaced by a no-op: spattn's own Python), ``launch_only`` (the triton kernel
   launch alone, outputs preallocated: triton's launcher), and ``sdpa`` (dense causal, key/value expanded once).
3. a 30-layer loop per length (a model-free stand-in for the forward's attention): the plan's 30 layer layouts,
   dense and sinks_window 30 times, SDPA 30 times; then the HF attention function itself
   (``spattn_attention_forward``, inputs strided like the model's) over the plan's 30 layers, warm and cold.
4. Flex (``torch.compile(flex_attention)`` on the layout's BlockMask, tiles = block size as the report does),
   per call for each pattern and the 30-call loop of ``sinks_window``; last because each new BlockMask shape
   compiles (~2-3 s on the H200).

    # H200 (alone on the card: latency measurements), <= 40 device seconds
    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src python benchmarks/host_overhead.py --device cuda --time-budget 34 \\
        --out $OUT/host_overhead.json
    # CPU (no kernels: the launch is a no-op, so only the Python is timed; the machine is shared)
    PYTHONPATH=src python benchmarks/host_overhead.py --device cpu --out /tmp/host_overhead_cpu.json
    # CPU dry run of every step (tiny lengths)
    PYTHONPATH=src python benchmarks/host_overhead.py --device cpu --quick --out /tmp/host_overhead_quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()  # --time-budget counts from here: the imports are device time too

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.bench.env import machine_info  # noqa: E402
from spattn.bench.record import finish, record_error  # noqa: E402
from spattn.patterns import Full, Sinks, Window  # noqa: E402

PLAN = "benchmarks/results/h200/planner/s5/planner_latency_latency_latency_0.5.json"
B, H, HKV, D = 1, 9, 3, 64
LAYERS = 30


# ---------------------------------------------------------------------------------------------- budget, output
class Budget:
    """Seconds left of ``--time-budget`` and estimates of steps from the ones already timed."""

    def __init__(self, seconds: float | None, start: float) -> None:
        self.start, self.seconds, self.timed = start, seconds, {}

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def fits(self, kind: str, default: float, out: dict, what: str) -> bool:
        need = self.timed.get(kind, default)
        if need <= self.left():
            return True
        out["skipped"].append({"what": what, "estimated_s": round(need, 2), "left_s": round(self.left(), 2)})
        print(f"[skip] {what}: needs ~{need:.1f} s, {self.left():.1f} s left", flush=True)
        return False

    def record(self, kind: str, seconds: float) -> None:
        self.timed[kind] = seconds


def save(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- stubs and caches
@contextlib.contextmanager
def no_launch():
    """The triton path's Python with the kernel launch replaced by a no-op (and, off CUDA, the CUDA test of
    ``supports`` by the shape checks), so its host time is spattn's own Python. Outputs are garbage inside."""
    from spattn.ops.attention.impl import triton as tri
    from spattn.ops.attention.impl.triton import _launch

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kernel, supports = _launch.attn_fwd_kernel, tri.supports
    _launch.attn_fwd_kernel = NoLaunch()
    tri.supports = lambda q, k, v, layout: tri._check(q, k, v, layout)
    try:
        yield
    finally:
        _launch.attn_fwd_kernel, tri.supports = kernel, supports


def clear_call_caches() -> None:
    """Forget what this change keeps between calls (checked signatures, forward launch plans, per-layer lookups):
    the next call does the work every call did before (compiled Layouts stay: they were kept before too)."""
    import spattn.integrations.hf as hf
    import spattn.ops.attention.api as api

    checked = getattr(api, "_checked", None)
    if checked is not None:
        checked.clear()
    from spattn.ops.attention.impl.triton import _launch

    plans = getattr(_launch, "_forward_plans", None)
    if plans is not None:
        plans._data.clear()
    for _ref, shapes in list(hf._PLAN_LAYOUTS.values()):
        for kept in shapes.values():
            by_layer = getattr(kept, "by_layer", None)
            if by_layer is not None:
                by_layer.clear()


def cold(fn):
    def call():
        clear_call_caches()
        return fn()

    return call


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond (measured once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    torch.cuda.synchronize(device)
    return 20_000_000 / max(start.elapsed_time(end), 1e-3)


def measure(calls: list, device: torch.device, repeats: int, cycles_per_ms: float | None) -> dict:
    """``calls`` (functions, one pass = one "call" of the row: a layer loop passes 30) timed three ways, medians
    over ``repeats``: host_us, device_us (+ gap_free), wall_us (see the module docstring)."""
    def one_pass():
        for fn in calls:
            fn()

    for _ in range(2):
        one_pass()
    _sync(device)
    host, dev, wall, gap_free = [], [], [], []
    for _ in range(repeats):
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            expected_ms = (host[-1] / 1e3 if host else 5.0) * 2 + 1.0
            torch.cuda.synchronize(device)
            e0.record()
            torch.cuda._sleep(int(expected_ms * cycles_per_ms))
            e1.record()
            t0 = time.perf_counter()
            one_pass()
            t1 = time.perf_counter()
            e2.record()
            torch.cuda.synchronize(device)
            host.append((t1 - t0) * 1e6)
            dev.append(e1.elapsed_time(e2) * 1e3)
            gap_free.append((t1 - t0) * 1e3 < e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            one_pass()
            host.append((time.perf_counter() - t0) * 1e6)
        _sync(device)
        t0 = time.perf_counter()
        one_pass()
        _sync(device)
        wall.append((time.perf_counter() - t0) * 1e6)
    row = {"host_us": round(statistics.median(host), 2), "wall_us": round(statistics.median(wall), 2),
           "host_us_all": [round(x, 1) for x in host], "calls_per_pass": len(calls)}
    if dev:
        row.update(device_us=round(statistics.median(dev), 2), gap_free=all(gap_free))
    return row


# ---------------------------------------------------------------------------------------------- inputs
def inputs(L: int, device: torch.device, dtype: torch.dtype, strided: bool = False, seed: int = 0):
    """query [1, 9, L, 64], key/value [1, 3, L, 64]; ``strided``: views of [1, L, H, 64] (the model's)."""
    gen = torch.Generator().manual_seed(seed)

    def make(heads):
        if strided:
            return torch.randn(B, L, heads, D, generator=gen).to(device, dtype).transpose(1, 2)
        return torch.randn(B, heads, L, D, generator=gen).to(device, dtype)

    return make(H), make(HKV), make(HKV)


def load_plan(path: str, L: int):
    plan = spattn.Plan.load(path)
    return plan.at_length(L) if plan.budget is not None else plan


def patterns_at(plan, L: int) -> dict:
    return {"dense": Full(), "sinks_window": Sinks(4) | Window(max(L // 8, 1)),
            "per_head": plan.pattern_for(1) or Full()}


def compile_at(pattern, L: int, bs: int, device: torch.device):
    return spattn.compile(pattern, L, causal=True, block_size=bs, heads=H, device=device)


# ---------------------------------------------------------------------------------------------- steps
def gate(pattern, L: int, bs: int, device, dtype, backend: str) -> dict:
    """spattn against the float64 oracle on the brute-force mask; the cached call against the first call."""
    from spattn.testing import assert_within, brute_force_mask, dense_attention, plain_attention

    q, k, v = inputs(L, device, dtype, seed=7)
    layout = compile_at(pattern, L, bs, device)
    clear_call_caches()
    first = spattn.attention(q, k, v, layout, causal=True, backend=backend)
    cached = spattn.attention(q, k, v, layout, causal=True, backend=backend)
    allowed = brute_force_mask(pattern, L, causal=True, heads=H).to(device)
    golden = dense_attention(q, k, v, allowed)[0]
    base = plain_attention(q, k, v, allowed)[0]
    row = {"length": L, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
           "keys_fraction": round(float(layout.density()), 4), "cached_equals_first": bool(torch.equal(first, cached)),
           "max_error": float((first.double() - golden).abs().max()),
           "baseline_max_error": float((base.double() - golden).abs().max())}
    try:
        assert_within(first, golden, base, what=f"gate L={L}")
        row["passed"] = row["cached_equals_first"]
    except AssertionError as err:
        row.update(passed=False, error=str(err)[:300])
    return row


def per_call_rows(name, pattern, L, bs, device, dtype, backend, repeats, cycles, sdpa_too: bool) -> dict:
    from spattn.ops.attention.impl.triton import _launch

    q, k, v = inputs(L, device, dtype)
    layout = compile_at(pattern, L, bs, device)
    call = lambda: spattn.attention(q, k, v, layout, causal=True, backend=backend)  # noqa: E731
    rows = {"keys_fraction": round(float(layout.density()), 4),
            "block_fraction": round(float(layout.density("block")), 4)}
    rows["spattn"] = measure([call], device, repeats, cycles)
    rows["spattn_cold"] = measure([cold(call)], device, repeats, cycles)
    rows["clear_only"] = measure([clear_call_caches], device, repeats, cycles)  # subtract from the *_cold rows
    rows["spattn_pattern"] = measure(
        [lambda: spattn.attention(q, k, v, pattern, causal=True, backend=backend, block_size=bs)],
        device, repeats, cycles)
    if device.type == "cuda":
        store = getattr(_launch, "_forward_plans", None)
        plans = (store.get(layout) if store is not None else None) or {}
        if plans:  # the kept launch plan's kernel launch alone, outputs preallocated
            plan = next(iter(plans.values()))
            o = torch.empty(q.shape, dtype=q.dtype, device=device)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=device)
            rows["launch_only"] = measure([lambda: plan._launch(plan.cfg, q, k, v, o, lse)], device, repeats, cycles)
        with no_launch():
            stub = lambda: spattn.attention(q, k, v, layout, causal=True, backend="triton")  # noqa: E731
            rows["python_only"] = measure([stub], device, repeats, cycles)
            rows["python_only_cold"] = measure([cold(stub)], device, repeats, cycles)
        clear_call_caches()  # no launch plan made under the no-op launch is kept
    if sdpa_too:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        rows["sdpa"] = measure([lambda: sdpa(q, kr, vr, is_causal=True)], device, repeats, cycles)
    return rows


def loop_rows(plan, patterns, L, bs, device, dtype, backend, repeats, cycles, sdpa_too: bool = True,
              plan_path: str = PLAN) -> dict:
    """Thirty attention calls per pass: a model-free stand-in for the forward's attention."""
    import spattn.integrations.hf as hf

    q, k, v = inputs(L, device, dtype)
    layouts = [compile_at(plan.pattern_for(i) or Full(), L, bs, device) for i in range(LAYERS)]
    rows = {"plan_keys_fraction": round(sum(float(x.density()) for x in layouts) / LAYERS, 4)}

    def calls(lays):
        return [lambda lay=lay: spattn.attention(q, k, v, lay, causal=True, backend=backend) for lay in lays]

    rows["spattn_plan"] = measure(calls(layouts), device, repeats, cycles)
    rows["spattn_plan_cold"] = measure([cold(c) for c in calls(layouts)], device, repeats, cycles)
    for name in ("dense", "sinks_window"):
        lay = compile_at(patterns[name], L, bs, device)
        rows[f"spattn_{name}"] = measure(calls([lay] * LAYERS), device, repeats, cycles)
    if sdpa_too:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        rows["sdpa"] = measure([lambda: sdpa(q, kr, vr, is_causal=True)] * LAYERS, device, repeats, cycles)

    # the HF attention function on model-strided inputs, one fake attention module per layer; on the CPU at 256
    # tokens at most: its output copy ([B, H, L, D] -> [B, L, H, D], a device kernel on CUDA) would dominate there
    hf_length = L if device.type == "cuda" else min(L, 256)
    if hf_length != L:
        plan = load_plan(plan_path, hf_length)
    rows["hf_length"] = hf_length
    qs, ks, vs = inputs(hf_length, device, dtype, strided=True)

    class Module(torch.nn.Module):
        def __init__(self, layer: int) -> None:
            super().__init__()
            self.layer_idx, self.is_causal = layer, True
            self._spattn_plan, self._spattn_layer = plan, layer
            self._spattn_backend, self._spattn_block_size = backend, bs

    modules = [Module(i) for i in range(LAYERS)]
    scaling = D ** -0.5
    hf_calls = [lambda m=m: hf.spattn_attention_forward(m, qs, ks, vs, None, scaling=scaling) for m in modules]
    rows["hf_plan"] = measure(hf_calls, device, repeats, cycles)
    rows["hf_plan_cold"] = measure([cold(c) for c in hf_calls], device, repeats, cycles)
    return rows


def flex_rows(patterns, L, bs, device, dtype, repeats, cycles, budget: Budget, out: dict, where: dict) -> None:
    from spattn.bench.selection import flex_fn

    flex = flex_fn(device)
    options = {"kernel_options": {"BLOCK_M": min(bs, 128), "BLOCK_N": min(bs, 128)}} if device.type == "cuda" else {}
    q, k, v = inputs(L, device, dtype)
    for name, pattern in patterns.items():
        if not budget.fits("flex", 6.0, out, f"flex {name} L={L}"):  # the first compile also starts inductor
            continue
        t0 = time.perf_counter()
        try:
            row = _flex_row(flex, options, name, pattern, q, k, v, L, bs, device, repeats, cycles)
        except Exception as err:  # e.g. a Flex compile error: recorded, the other rows still run
            row = {"error": f"{type(err).__name__}: {err}"[:500], "trace": traceback.format_exc()[-1500:]}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        where.setdefault(str(L), {})[name] = row
        budget.record("flex", time.perf_counter() - t0)
        save(out, Path(out["args"]["out"]))
        print(f"flex {name} L={L}", json.dumps({k2: row.get(k2) for k2 in ('host_us', 'wall_us', 'error')}),
              flush=True)


def _flex_row(flex, options, name, pattern, q, k, v, L, bs, device, repeats, cycles) -> dict:
    """Flex on the layout's BlockMask: per call, its largest difference from spattn, and (sinks_window) 30 calls."""
    layout = compile_at(pattern, L, bs, device)
    block_mask = layout.to_block_mask()
    call = lambda: flex(q, k, v, block_mask=block_mask, scale=D ** -0.5, enable_gqa=True, **options)  # noqa: E731
    ours = spattn.attention(q, k, v, layout, causal=True, backend="triton" if device.type == "cuda" else "reference")
    row = measure([call], device, repeats, cycles)
    row["max_abs_difference_vs_spattn"] = float((call().float() - ours.float()).abs().max())
    if name == "sinks_window":
        row["loop"] = measure([call] * LAYERS, device, repeats, cycles)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--plan", default=PLAN, help="the plan whose layers make the per_head pattern and the loop")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per row (default 15 CUDA, 5 CPU)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (imports and JIT "
                    "included); "
                    "steps that would not fit are skipped and recorded")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny dry run: lengths 256,512, 2 repeats")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    budget = Budget(args.time_budget, STARTED)
    device = torch.device(args.device)
    if args.quick:
        args.lengths, args.repeats = "256,512", args.repeats or 2
    repeats = args.repeats or (15 if device.type == "cuda" else 5)
    lengths = [int(x) for x in args.lengths.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "reference"
    if device.type == "cpu":
        torch.set_num_threads(1)  # host cost of one Python thread; the 2-core machine is shared
    path = Path(args.out)
    out = {"what": "host cost per call of spattn.attention (triton path) and of the HF attention function, "
                   "model-free, SmolLM2-135M shapes (B1 H9 Hkv3 D64)",
           "machine": machine_info(device), "args": vars(args), "backend": backend,
           "dtype": str(dtype).removeprefix("torch."), "skipped": [],
           "note": ("CPU: no kernels run: the spattn and hf rows time the triton path's Python with the kernel "
                    "launch a no-op; the gate runs the reference backend; a shared 2-core machine, one torch thread")
           if device.type == "cpu" else None,
           "gate": {}, "per_call": {}, "loop": {}, "flex": {}}
    out["import_s"] = round(time.perf_counter() - STARTED, 2)
    save(out, path)
    status = "complete"
    try:
        cycles = _sleep_cycles_per_ms(device) if device.type == "cuda" else None
        out["sleep_cycles_per_ms"] = cycles
        for L in lengths[:1]:  # 1. gate
            plan = load_plan(args.plan, L)
            for name, pattern in patterns_at(plan, L).items():
                t0 = time.perf_counter()
                out["gate"][name] = gate(pattern, L, args.block_size, device, dtype, backend)
                out["gate"][name]["seconds"] = round(time.perf_counter() - t0, 2)
                print("gate", name, json.dumps(out["gate"][name]), flush=True)
                save(out, path)
        gates_ok = all(g.get("passed") for g in out["gate"].values())
        out["gate_passed"] = gates_ok
        if not gates_ok:
            out["note_gate"] = "a gate failed: timings below are of a path that is not known to be correct"
        # on the CPU the timed spattn rows run the triton path's Python with the launch a no-op (no kernels here)
        timing = no_launch if device.type == "cpu" else contextlib.nullcontext
        timed_backend = "triton" if device.type == "cpu" else backend
        baselines = device.type == "cuda" or args.quick  # SDPA / Flex rows: real compute, meaningless on the CPU
        for L in lengths:  # 2. per call
            plan = load_plan(args.plan, L)
            for name, pattern in patterns_at(plan, L).items():
                if not budget.fits(f"per_call{L}", 3.0, out, f"per_call {name} L={L}"):
                    continue
                t0 = time.perf_counter()
                try:
                    with timing():
                        row = per_call_rows(name, pattern, L, args.block_size, device, dtype, timed_backend,
                                            repeats, cycles, sdpa_too=baselines and name == "dense")
                except Exception as err:  # one row's failure is recorded; the others still run
                    row = {"error": f"{type(err).__name__}: {err}"[:500], "trace": traceback.format_exc()[-1500:]}
                row["seconds"] = round(time.perf_counter() - t0, 2)
                budget.record(f"per_call{L}", time.perf_counter() - t0)
                out["per_call"].setdefault(str(L), {})[name] = row
                save(out, path)
                print(f"per_call {name} L={L}", json.dumps({k: v.get("host_us") for k, v in row.items()
                                                             if isinstance(v, dict)}), flush=True)
        for L in lengths:  # 3. thirty-layer loops
            if not budget.fits(f"loop{L}", 4.0, out, f"loop L={L}"):
                continue
            t0 = time.perf_counter()
            plan = load_plan(args.plan, L)
            try:
                with timing():
                    out["loop"][str(L)] = loop_rows(plan, patterns_at(plan, L), L, args.block_size, device, dtype,
                                                    timed_backend, repeats, cycles, sdpa_too=baselines,
                                                    plan_path=args.plan)
            except Exception as err:
                out["loop"][str(L)] = {"error": f"{type(err).__name__}: {err}"[:500],
                                       "trace": traceback.format_exc()[-1500:]}
            out["loop"][str(L)]["seconds"] = round(time.perf_counter() - t0, 2)
            budget.record(f"loop{L}", time.perf_counter() - t0)
            save(out, path)
            print(f"loop L={L}", json.dumps({k: v.get("wall_us") for k, v in out["loop"][str(L)].items()
                                             if isinstance(v, dict)}), flush=True)
        if not args.no_flex and baselines:  # 4. Flex
            for L in lengths:
                plan = load_plan(args.plan, L)
                flex_rows(patterns_at(plan, L), L, args.block_size, device, dtype, repeats, cycles, budget, out,
                          out["flex"])
                save(out, path)
    except Exception as err:  # keep the partial JSON, say what broke
        status = record_error(out, err)
    finish(out, path, status, time.perf_counter() - budget.start, save)


if __name__ == "__main__":
    main()
