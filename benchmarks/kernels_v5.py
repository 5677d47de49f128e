"""Issue 18, session 5: the untuned Triton defaults and one compile per length, on one GPU (run ALONE: latency).

    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src python -P benchmarks/kernels_v5.py --out $OUT/kernels-v5.json \
        --time-budget 135

CPU dry run (triton interpreter, tiny sizes, every phase; no compile counts there, and the public call runs the
reference backend, which is the only one ``spattn.attention`` takes for CPU tensors): add ``--device cpu``.

Phases, most important first; each result is written to ``--out`` as soon as it exists (a killed run keeps its
partial JSON), and a step whose estimate would pass ``--time-budget`` is skipped and listed under ``not_run``:

1. ``gate``: forward out/lse against the float64 oracle (``dense_attention`` on the brute-force token mask,
   the bf16 ``plain_attention`` as baseline, ``err <= 2 * err_baseline + 1e-3``) on ONE small shape per head dim
   ([1, 9, 1024, 64] with 3 KV heads, [1, 16, 1024, 128]) for ``Causal()`` and ``Sinks(64) | Window(256)``:
   the kernels it compiles are the ones the measurements reuse (lengths no longer recompile).
2. ``forward``: causal and sinks 64 + window 1024 at D 64 ([1, 9, L, 64], 3 KV heads, the report's shape) at
   4096 and 8192, then D 128 ([1, 16, L, 128]) at 8192 and 16384: the kernel on a compiled Layout, the public
   ``spattn.attention(q, k, v, pattern)`` (layout cache, host path included) and dense causal SDPA.
3. ``jit``: the first ``spattn.attention`` call at lengths never seen (even and with a tail): wall seconds and
   the Triton compiles it triggered (expected 0 with ``do_not_specialize``).
4. ``configs`` (D 64): the causal forward at [1, 9, 8192, 64] under other tile configs, to check the defaults
   (``is_default`` marks them; each config is one more compile, seconds each).
5. ``backward gate``: ``spattn.bench.kernels.check_case`` (out, lse, dq, dk, dv vs the oracle) at the gate shapes.
6. ``flex``: forward and forward + backward vs ``torch.compile(flex_attention)`` on the same tables and dense
   SDPA (``spattn.bench.kernels.prefill_row``), D 128 16k first, then D 64 8k / 4k.
7. ``configs`` (D 128): the same at [1, 16, 16384, 128].
8. ``grid``: issue 18's rows at 65536 (causal, sinks|window, random 10%, GQA 16/4, D 64) while time remains.

Every Triton compile (kernel name, seconds, phase) is recorded under ``compiles`` (wrapping
``JITFunction.run``: a compile is a launch that returns a kernel object not seen before).
"""

# ruff: noqa: B023 - the timing closures are called inside the loop iteration that defines them
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("SPATTN_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SPATTN_KERNELS = {"attn_fwd_kernel", "decode_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dq_kernel",
                  "attn_bwd_dkdv_kernel"}
# seconds a step of each kind is expected to take before one was measured (then the last measured one is used);
# the first Flex row carries torch.compile's start-up
ESTIMATE_S = {"gate": 15.0, "forward": 4.0, "jit": 3.0, "bwd_gate": 15.0, "flex": 45.0, "configs": 5.0, "grid": 30.0}


class Compiles:
    """Counts Triton compiles: a ``JITFunction.run`` that returns a kernel object not returned before (its wall
    time is the compile, the launch being asynchronous). Not observable under the interpreter."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._kept: list = []  # keep the kernels alive so their ids are never reused
        self._seen: set[int] = set()
        self.phase = "setup"
        self.active = False

    def install(self) -> None:
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        original = JITFunction.run
        counter = self

        def run(fn_self, *args, **kwargs):
            t0 = time.perf_counter()
            kernel = original(fn_self, *args, **kwargs)
            if kernel is not None and id(kernel) not in counter._seen:
                counter._seen.add(id(kernel))
                counter._kept.append(kernel)
                name = getattr(getattr(fn_self, "fn", None), "__name__", str(fn_self))
                md = getattr(kernel, "metadata", None)
                counter.events.append({"kernel": name, "seconds": round(time.perf_counter() - t0, 3),
                                       "phase": counter.phase, "num_warps": getattr(md, "num_warps", None),
                                       "num_stages": getattr(md, "num_stages", None),
                                       "shared": getattr(md, "shared", None)})
            return kernel

        JITFunction.run = run
        self.active = True

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> dict:
        ev = [e for e in self.events[mark:] if e["kernel"] in SPATTN_KERNELS]
        return {"spattn_compiles": len(ev), "spattn_jit_s": round(sum(e["seconds"] for e in ev), 3),
                "all_compiles": len(self.events) - mark}


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary(rec: dict) -> str:
    """Markdown tables of a kernels-v5 record (``--summary PATH``; no GPU needed)."""
    m = rec["machine"]
    lines = [f"{m.get('device')}, torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('git_commit')}, "
             f"autotune {rec['config'].get('autotune')}, {rec.get('seconds')} s", ""]
    gate = rec.get("gate", []) + rec.get("bwd_gate", [])
    lines.append("gate: " + ", ".join(f"{r.get('shape')} {r.get('pattern')} {'ok' if r.get('ok') else 'FAIL'}"
                                      for r in gate))
    lines += ["", "| shape [B,H,L,D] (Hkv) | pattern | kernel ms | public ms | public wall ms | SDPA causal ms | "
              "kernel × SDPA | public × SDPA | TFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rec.get("forward", []):
        if "triton_kernel_ms" not in r:
            lines.append(f"| {r.get('what')} | failed: {r.get('error', '')[:80]} |")
            continue
        lines.append(f"| {r['shape']} ({r['Hkv']}) | {r['pattern']} | {_f(r['triton_kernel_ms'])} | "
                     f"{_f(r['public_ms'])} | {_f(r['public_wall_ms'])} | {_f(r['sdpa_causal_ms'])} | "
                     f"{_f(r['speedup_vs_sdpa'], 2)} | {_f(r['public_speedup_vs_sdpa'], 2)} | "
                     f"{_f(r['useful_tflops'], 0)} |")
    lines += ["", "| first call | even | seconds | spattn compiles | JIT s |", "|---|---|---|---|---|"]
    for r in rec.get("jit", []):
        lines.append(f"| {r.get('shape')} {r.get('pattern')} {'fwd+bwd' if r.get('backward') else 'fwd'} | "
                     f"{r.get('even')} | {_f(r.get('first_call_s'), 2)} | {r.get('spattn_compiles')} | "
                     f"{_f(r.get('spattn_jit_s'), 2)} |")
    lines += ["", "| tile config (causal fwd) | shape | default | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for r in rec.get("configs", []):
        c = r.get("config", {})
        lines.append(f"| {c.get('block_m')}×{c.get('block_n')} w{c.get('num_warps')} s{c.get('num_stages')} | "
                     f"{r.get('shape')} | {r.get('is_default')} | {_f(r.get('triton_kernel_ms'))} | "
                     f"{_f(r.get('useful_tflops'), 0)} |")
    lines += ["", "| L | pattern | H/Hkv | D | fwd ms | Flex fwd | fwd × Flex | fwd+bwd ms | Flex f+b | f+b × Flex | "
              "fwd × SDPA | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec.get("flex", []) + rec.get("grid", []):
        lines.append(f"| {r.get('L')} | {r.get('pattern')} | {r.get('H')}/{r.get('Hkv')} | {r.get('D')} | "
                     f"{_f(r.get('triton_fwd_ms'))} | {_f(r.get('flex_fwd_ms'))} | "
                     f"{_f(r.get('speedup_fwd_vs_flex'), 2)} | "
                     f"{_f(r.get('triton_fwdbwd_ms'))} | {_f(r.get('flex_fwdbwd_ms'))} | "
                     f"{_f(r.get('speedup_fwdbwd_vs_flex'), 2)} | {_f(r.get('speedup_fwd_vs_sdpa'), 2)} | "
                     f"{r.get('ok')} |")
    ev = [e for e in rec.get("compiles", []) if e["kernel"] in SPATTN_KERNELS]
    by_phase: dict[str, list] = {}
    for e in ev:
        by_phase.setdefault(e["phase"], []).append(e["seconds"])
    lines += ["", "spattn compiles: " + ", ".join(f"{k} {len(v)} ({sum(v):.1f} s)" for k, v in by_phase.items()),
              "not run: " + ", ".join(f"{n['phase']} {n['what']}" for n in rec.get("not_run", []))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernels-v5.json")
    ap.add_argument("--summary", default=None, metavar="JSON", help="print the tables of a finished run and exit")
    ap.add_argument("--time-budget", type=float, default=140.0, help="seconds, JIT included (default 140)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the dry run under the triton interpreter (float32, tiny sizes)")
    args = ap.parse_args(argv)
    if args.summary:
        with open(args.summary) as f:
            print(summary(json.load(f)))
        return 0
    start = time.time()
    cpu = args.device == "cpu"
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    compiles = Compiles()
    if not cpu:
        compiles.install()

    import torch
    import torch._dynamo
    import torch.nn.functional as F

    import spattn
    from spattn.bench import kernels as kbench
    from spattn.bench.env import machine_info
    from spattn.bench.record import failed
    from spattn.bench.timing import median_ms, sync
    from spattn.ops.attention.impl import triton as tri
    from spattn.ops.attention.impl.triton import _plan, _tuning
    from spattn.testing import brute_force_mask, dense_attention, max_err, plain_attention, poison_empty

    torch._dynamo.config.cache_size_limit = 64  # Flex recompiles per shape: never fall back to eager Flex
    dev = args.device
    dtype = torch.float32 if cpu else torch.bfloat16
    if cpu:
        kbench.DEV, kbench.DTYPE = "cpu", torch.float32
    reps = 2 if cpu else 20
    # sizes: (H, Hkv, D) per head dim, the gate length, the measured lengths
    d64, d128 = ((2, 1, 32), (2, 2, 64)) if cpu else ((9, 3, 64), (16, 16, 128))
    gate_len = 256 if cpu else 1024
    lengths64 = [256, 384] if cpu else [4096, 8192]
    lengths128 = [256] if cpu else [8192, 16384]
    jit_lengths = [320, 300] if cpu else [6144, 5000, 12288, 3000]
    window = 64 if cpu else 1024
    backend = "reference" if cpu else "triton"  # the public call refuses CPU tensors for triton: the dry run
    # exercises the script's path with the reference backend there

    rec: dict = {
        "suite": "kernels-v5", "machine": machine_info(dev if not cpu else "cpu"),
        "config": {**vars(args), "autotune": os.environ.get("SPATTN_TRITON_AUTOTUNE"), "dtype": str(dtype)},
        "defaults": {f"{k}|{'D<=64' if s else 'D>64'}": vars(c) for (k, s), c in _tuning._DEFAULTS.items()},
        "phases": {}, "gate": [], "forward": [], "jit": [], "bwd_gate": [], "flex": [], "configs": [], "grid": [],
        "not_run": [], "compiles": compiles.events, "compile_counting": compiles.active,
    }

    def save() -> None:
        rec["seconds"] = round(time.time() - start, 2)
        path = os.path.abspath(args.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    measured: dict[str, list[float]] = {}

    def fits(kind: str, what) -> bool:
        estimate = (measured.get(kind) or [ESTIMATE_S[kind]])[-1]
        left = args.time_budget - (time.time() - start)
        if estimate > left:
            rec["not_run"].append({"phase": kind, "what": what,
                                   "reason": f"estimated {estimate:.0f} s, {left:.0f} s left"})
            save()
            return False
        return True

    def step(kind: str, what, fn) -> None:
        if not fits(kind, what):
            return
        compiles.phase = kind
        mark, t0 = compiles.mark(), time.time()
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            row = failed({"what": str(what)}, exc)
        row["step_s"] = round(time.time() - t0, 3)
        row.update(compiles.since(mark))
        measured.setdefault(kind, []).append(time.time() - t0)
        rec[kind].append(row)
        ph = rec["phases"].setdefault(kind, {"seconds": 0.0, "spattn_compiles": 0})
        ph["seconds"] = round(ph["seconds"] + row["step_s"], 3)
        ph["spattn_compiles"] += row["spattn_compiles"]
        print(f"[{time.time() - start:6.1f}s] {kind:8s} {what}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if k not in ("trace", "errors")), flush=True)
        save()

    def inputs(B, H, Hkv, L, D, seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        mk = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
        return mk(B, H, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D)

    patterns = {"causal": lambda: spattn.Causal(),
                "sinks64|window": lambda: spattn.Sinks(64) | spattn.Window(window)}

    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        if cpu:
            backends.append(SDPBackend.MATH)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    # ------------------------------------------------------------------------------------------ 1. gate
    def gate(H, Hkv, D, pname):
        def fn():
            L = gate_len
            q, k, v = inputs(1, H, Hkv, L, D, seed=D)
            pattern = spattn.Sinks(64) | spattn.Window(L // 4) if pname != "causal" else spattn.Causal()
            layout = spattn.compile(pattern, L, causal=True, device=dev)
            allowed = brute_force_mask(pattern, L, causal=True).to(dev)
            scale = D**-0.5
            with torch.no_grad(), poison_empty():
                out, lse = tri.attention_triton(q, k, v, layout, scale=scale, return_lse=True)
            gold = dense_attention(q, k, v, allowed, scale)
            base = plain_attention(q, k, v, allowed, scale)
            row = {"shape": [1, H, L, D], "Hkv": Hkv, "pattern": pname, "banded": _plan.band(layout) is not None,
                   "config": vars(_tuning.default("fwd", D, dtype, banded=_plan.band(layout) is not None))}
            ok = True
            for name, a, gd, b in (("out", out, gold[0], base[0]), ("lse", lse, gold[1], base[1])):
                e_fast, e_base = max_err(a.float(), gd), max_err(b.float(), gd)
                good = not bool(torch.isnan(a).any()) and e_fast <= 2 * e_base + 1e-3 * max(float(gd.abs().max()), 1.0)
                row[f"{name}_err"], row[f"{name}_err_baseline"] = e_fast, e_base
                ok &= good
            row["ok"] = bool(ok)
            return row
        return fn

    for H, Hkv, D in (d64, d128):
        for pname in patterns:
            step("gate", f"D{D} {pname}", gate(H, Hkv, D, pname))
    if rec["gate"] and not any(r.get("ok") for r in rec["gate"]):
        print("every gate case failed: no timings", flush=True)
        save()
        return 1

    # ------------------------------------------------------------------------------------------ 2. forward
    def forward_row(H, Hkv, D, L, pname):
        def fn():
            q, k, v = inputs(1, H, Hkv, L, D, seed=L + D)
            pattern = patterns[pname]()
            t0 = time.perf_counter()
            layout = spattn.compile(pattern, L, causal=True, device=dev)
            sync(dev)
            row = {"shape": [1, H, L, D], "Hkv": Hkv, "pattern": pname, "compile_ms": (time.perf_counter() - t0) * 1e3,
                   "density": layout.density(), "banded": _plan.band(layout) is not None}
            flops = layout.flops(D, batch=1, heads=H)
            with torch.no_grad():
                kernel = lambda: tri.attention_triton(q, k, v, layout, scale=D**-0.5, return_lse=False)  # noqa: E731
                public = lambda: spattn.attention(q, k, v, pattern, causal=True, backend=backend)  # noqa: E731
                public()  # the public call keeps the Layout of a static pattern (first call compiles it)
                row["triton_kernel_ms"] = median_ms(kernel, device=dev, repeats=reps, warmup=2)
                row["public_ms"] = median_ms(public, device=dev, repeats=reps, warmup=2)
                row["public_wall_ms"] = median_ms(public, device=dev, repeats=reps, warmup=2, wall=True)
                row["sdpa_causal_ms"] = median_ms(lambda: sdpa(q, k, v), device=dev, repeats=reps, warmup=2)
            row["useful_tflops"] = flops / row["triton_kernel_ms"] / 1e9
            row["speedup_vs_sdpa"] = row["sdpa_causal_ms"] / row["triton_kernel_ms"]
            row["public_speedup_vs_sdpa"] = row["sdpa_causal_ms"] / row["public_ms"]
            row["ok"] = True
            return row
        return fn

    for (H, Hkv, D), lens in ((d64, lengths64), (d128, lengths128)):
        for L in lens:
            for pname in patterns:
                step("forward", f"D{D} L{L} {pname}", forward_row(H, Hkv, D, L, pname))

    # ------------------------------------------------------------------------------------------ 3. jit
    def jit_row(H, Hkv, D, L, pname, backward):
        def fn():
            q, k, v = inputs(1, H, Hkv, L, D, seed=L)
            if backward:
                q, k, v = (x.requires_grad_() for x in (q, k, v))
            pattern = patterns[pname]()
            sync(dev)
            t0 = time.perf_counter()
            out = spattn.attention(q, k, v, pattern, causal=True, backend=backend)
            if backward:
                out.sum().backward()
            sync(dev)
            return {"shape": [1, H, L, D], "Hkv": Hkv, "pattern": pname, "backward": backward,
                    "even": L % 128 == 0, "first_call_s": time.perf_counter() - t0,
                    "ok": bool(torch.isfinite(out).all())}
        return fn

    for L in jit_lengths:
        step("jit", f"D{d64[2]} L{L} causal fwd", jit_row(*d64, L, "causal", False))
    step("jit", f"D{d64[2]} L{jit_lengths[-1]} sinks64|window fwd",
         jit_row(*d64, jit_lengths[-1], "sinks64|window", False))

    # ------------------------------------------------------------------------------------------ 4. configs (D 64)
    def config_row(H, Hkv, D, L, cfg):
        def fn():
            q, k, v = inputs(1, H, Hkv, L, D, seed=L + D)
            layout = spattn.compile(spattn.Causal(), L, causal=True, device=dev)
            choose = _tuning.choose
            _tuning.choose = lambda *a, **kw: cfg.fit(layout.block_size)
            try:
                with torch.no_grad():
                    ms = median_ms(lambda: tri.attention_triton(q, k, v, layout, scale=D**-0.5, return_lse=False),
                                   device=dev, repeats=reps, warmup=2)
            finally:
                _tuning.choose = choose
            default = _tuning.default("fwd", D, dtype, banded=True)
            return {"shape": [1, H, L, D], "Hkv": Hkv, "pattern": "causal", "config": vars(cfg),
                    "is_default": cfg == default, "triton_kernel_ms": ms,
                    "useful_tflops": layout.flops(D, batch=1, heads=H) / ms / 1e9, "ok": True}
        return fn

    def configs(rows):
        for (H, Hkv, D), L, cfg in rows:
            step("configs", f"D{D} L{L} causal {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                 config_row(H, Hkv, D, L, cfg))

    C = _tuning.Config
    configs([(d64, 256, C(64, 64, 4, 1)), (d64, 256, C(64, 32, 4, 1))] if cpu else
            [(d64, 8192, c) for c in (C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 64, 4, 3), C(128, 128, 4, 3),
                                     C(128, 64, 4, 4), C(64, 64, 4, 3))])

    # ------------------------------------------------------------------------------------------ 5. backward gate
    def bwd_gate(H, Hkv, D, pname):
        def fn():
            L = gate_len
            q, k, v = inputs(1, H, Hkv, L, D, seed=D + 1)
            pattern = spattn.Sinks(64) | spattn.Window(L // 4) if pname != "causal" else spattn.Causal()
            layout = spattn.compile(pattern, L, causal=True, device=dev)
            allowed = brute_force_mask(pattern, L, causal=True).to(dev)
            errors = kbench.check_case(q, k, v, layout, allowed, D**-0.5)
            return {"shape": [1, H, L, D], "Hkv": Hkv, "pattern": pname, "errors": errors,
                    "ok": all(e["ok"] for e in errors.values())}
        return fn

    for H, Hkv, D in (d128, d64):
        step("bwd_gate", f"D{D} causal", bwd_gate(H, Hkv, D, "causal"))
    step("jit", f"D{d64[2]} L{jit_lengths[0] + 128} causal fwd+bwd (after the backward gate)",
         jit_row(*d64, jit_lengths[0] + 128, "causal", True))

    # ------------------------------------------------------------------------------------------ 6. flex
    flex_rows = ([(256, "causal", 2, 2, 32)] if cpu else
                 [(16384, "causal", 16, 16, 128), (16384, "sinks64|window1024", 16, 16, 128),
                  (8192, "causal", 9, 3, 64), (8192, "sinks64|window1024", 9, 3, 64),
                  (4096, "causal", 9, 3, 64), (4096, "sinks64|window1024", 9, 3, 64)])
    for L, pname, H, Hkv, D in flex_rows:
        step("flex", f"D{D} L{L} {pname}", lambda L=L, pname=pname, H=H, Hkv=Hkv, D=D:
             kbench.prefill_row(L, pname, H=H, Hkv=Hkv, D=D, backward=True))

    # ------------------------------------------------------------------------------------------ 7. configs (D 128)
    if not cpu:
        configs([(d128, 16384, c) for c in (C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 64, 4, 3))])

    # ------------------------------------------------------------------------------------------ 8. grid
    grid_rows = ([] if cpu else
                 [(65536, "causal", 16, 16, 128), (65536, "sinks64|window1024", 16, 16, 128),
                  (65536, "random10%", 16, 16, 128), (65536, "causal", 16, 4, 128), (65536, "causal", 16, 16, 64),
                  (65536, "random50%", 16, 16, 128), (65536, "random5%", 16, 16, 128),
                  (65536, "document", 16, 16, 128)])
    for L, pname, H, Hkv, D in grid_rows:
        step("grid", f"D{D} Hkv{Hkv} L{L} {pname}", lambda L=L, pname=pname, H=H, Hkv=Hkv, D=D:
             kbench.prefill_row(L, pname, H=H, Hkv=Hkv, D=D, backward=True))

    rec["configs_chosen"] = _tuning.chosen()
    save()
    print(f"wrote {args.out} in {time.time() - start:.1f} s; spattn compiles: "
          f"{sum(1 for e in compiles.events if e['kernel'] in SPATTN_KERNELS)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
