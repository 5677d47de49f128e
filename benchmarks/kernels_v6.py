"""Issue 18, session 6: the one-pass atomic backward against the split one and Flex, on one GPU (run ALONE).

    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src python -P benchmarks/kernels_v6.py --out $OUT/kernels-v6.json \
        --time-budget 165

CPU dry run (triton interpreter, float32, tiny sizes, every phase; Flex has no CPU backward, so its fwd+bwd
columns stay empty there): add ``--device cpu --time-budget 1500``.

"split" = the dQ + dK/dV kernels (deterministic, the default); "atomic" = ``attn_bwd_fused_kernel`` (dK/dV per
key tile, dQ by fp32 atomic adds; Note [atomic backward] in ``ops/attention/impl/triton/_backward.py``), chosen
per call with ``SPATTN_TRITON_BACKWARD``. Phases, most important first; every result is written to ``--out`` as
soon as it exists (a killed run keeps its partial JSON) and a step whose estimate would pass ``--time-budget``
is skipped and listed under ``not_run``:

0. ``precheck``: the atomic backward once in a child process ([1, 2, 1024, 128] causal, the same kernels as
   below, compiled into Triton's disk cache for the parent): a crash there (an illegal address leaves the CUDA
   context unusable) or a wrong result drops the atomic method, so a broken new kernel cannot cost the call.
1. ``gate``: out, lse, dq, dk, dv of both methods against the float64 oracle (``check_case``: dense on the
   brute-force token mask, the bf16 ``plain_attention`` baseline, ``err <= 2 * err_baseline + 1e-3 * max``) on ONE
   small shape, [1, 16, 1024, 128], causal and sinks 64 + window 256: the kernels it compiles are the ones the
   timings reuse (lengths do not recompile). A method that fails or raises is dropped from every later phase
   (the split backward always stays: the fallback).
2. ``bwd_configs``: the backward alone (``_launch.backward`` on saved forward outputs) at [1, 16, 16384, 128]
   causal: split with its defaults and with other dK/dV tiles, atomic with its default and other tiles (each
   config one compile, seconds); the fastest atomic config becomes the atomic default for the later phases
   (recorded in ``bwd_default_used``). After phase 4, that config with tensor-descriptor loads of q / dO
   (``SPATTN_TRITON_TMA=load``) and also the dQ reduction by descriptor (``=1``), timed and compared only
   (not used elsewhere: compiled for sm_90 on the CPU they spilled more), also under ``bwd_configs``.
3. ``rows``: forward and forward + backward (split, atomic) against ``torch.compile(flex_attention)`` on the
   same tables, and the backward alone per method, for causal, sinks 64 + window 1024 and random 10% blocks
   at 16k and 64k (D 128, 16 heads). Each row also compares the atomic gradients with the split ones and
   Flex's (max abs difference over max |split|).
3a. ``order``: the backward alone with the grid's programs issued heads first (the default, Note [heads first]
   in ``_backward.py``) and tiles first (before), at 64k sinks|window and 16k causal, per method.
4. ``fwd_configs``: the banded forward (sinks 64 + window 1024) under other tiles and the persistent order.
5. ``extra``: D 64 at 64k (after a D 64 gate), random 50% / 5%, document, GQA 16/4 at 64k.

Every Triton compile (kernel, seconds, phase) is recorded under ``compiles``; ``phases`` sums each phase's
seconds and compiles.
"""

# ruff: noqa: B023 - the timing closures are called inside the loop iteration that defines them
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("SPATTN_TRITON_AUTOTUNE", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from kernels_v5 import SPATTN_KERNELS, Compiles  # noqa: E402 - the compile counter of the v5 script

SPATTN_KERNELS.add("attn_bwd_fused_kernel")
METHODS = ("split", "atomic")
# seconds a step of each kind is expected to take before one was measured (then the last measured one is used)
ESTIMATE_S = {"gate": 12.0, "bwd_configs": 6.0, "rows": 15.0, "order": 6.0, "fwd_configs": 4.0, "extra": 15.0}


@contextlib.contextmanager
def environ(name: str, value: str | None):
    """``os.environ[name] = value`` inside the block (None: unchanged)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def backward_method(method: str):
    """``SPATTN_TRITON_BACKWARD=method`` inside the block."""
    return environ("SPATTN_TRITON_BACKWARD", method)


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary(rec: dict) -> str:
    """Markdown tables of a kernels-v6 record (``--summary PATH``; no GPU needed)."""
    m = rec["machine"]
    lines = [f"{m.get('device')}, torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('git_commit')}, "
             f"autotune {rec['config'].get('autotune')}, {rec.get('seconds')} s, methods {rec.get('methods')}", ""]
    lines.append("gate: " + ", ".join(f"{r.get('method')} D{r.get('D')} {r.get('pattern')} "
                                      f"{'ok' if r.get('ok') else 'FAIL'}" for r in rec.get("gate", [])))
    lines += ["", "| backward alone, causal 16k D128 | config | TMA | ms | TFLOP/s | grad diff vs split |",
              "|---|---|---|---|---|---|"]
    for r in rec.get("bwd_configs", []):
        c = r.get("config") or {}
        lines.append(f"| {r.get('method')} {r.get('kernel', '')} | {c.get('block_m')}×{c.get('block_n')} "
                     f"w{c.get('num_warps')} s{c.get('num_stages')} | {r.get('tma')} | {_f(r.get('bwd_ms'))} | "
                     f"{_f(r.get('bwd_tflops'), 0)} | {_f(r.get('grad_diff_vs_split'), 4)} |")
    lines += ["", "| L | pattern | H/Hkv | D | fwd ms | Flex fwd | fwd × Flex | f+b split | f+b atomic | Flex f+b | "
              "split × Flex | atomic × Flex | bwd split | bwd atomic | grad diff atomic | ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec.get("rows", []) + rec.get("extra", []):
        if "L" not in r:
            continue
        lines.append(f"| {r.get('L')} | {r.get('pattern')} | {r.get('H')}/{r.get('Hkv')} | {r.get('D')} | "
                     f"{_f(r.get('triton_fwd_ms'))} | {_f(r.get('flex_fwd_ms'))} | "
                     f"{_f(r.get('speedup_fwd_vs_flex'), 2)} | {_f(r.get('split_fwdbwd_ms'))} | "
                     f"{_f(r.get('atomic_fwdbwd_ms'))} | {_f(r.get('flex_fwdbwd_ms'))} | "
                     f"{_f(r.get('split_fwdbwd_vs_flex'), 2)} | {_f(r.get('atomic_fwdbwd_vs_flex'), 2)} | "
                     f"{_f(r.get('split_bwd_ms'))} | {_f(r.get('atomic_bwd_ms'))} | "
                     f"{_f(r.get('atomic_vs_split_grad_diff'), 4)} | {r.get('ok')} |")
    lines += ["", "| grid order (bwd alone) | L | split heads first | split tiles first | atomic heads first | "
              "atomic tiles first |", "|---|---|---|---|---|---|"]
    for r in rec.get("order", []):
        lines.append(f"| {r.get('pattern')} | {r.get('L')} | {_f(r.get('split_bwd_ms_heads_first'))} | "
                     f"{_f(r.get('split_bwd_ms_tiles_first'))} | {_f(r.get('atomic_bwd_ms_heads_first'))} | "
                     f"{_f(r.get('atomic_bwd_ms_tiles_first'))} |")
    lines += ["", "| banded fwd config | L | ms | × default |", "|---|---|---|---|"]
    for r in rec.get("fwd_configs", []):
        c = r.get("config") or {}
        lines.append(f"| {c.get('block_m')}×{c.get('block_n')} w{c.get('num_warps')} s{c.get('num_stages')}"
                     f"{' persistent' if c.get('persistent') else ''} | {r.get('L')} | {_f(r.get('fwd_ms'))} | "
                     f"{_f(r.get('vs_default'), 2)} |")
    ev = [e for e in rec.get("compiles", []) if e["kernel"] in SPATTN_KERNELS]
    by_phase: dict[str, list] = {}
    for e in ev:
        by_phase.setdefault(e["phase"], []).append(e["seconds"])
    lines += ["", "spattn compiles: " + ", ".join(f"{k} {len(v)} ({sum(v):.1f} s)" for k, v in by_phase.items()),
              "phases: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in rec.get("phases", {}).items()),
              "not run: " + ", ".join(f"{n['phase']} {n['what']}" for n in rec.get("not_run", []))]
    return "\n".join(lines)


def precheck(method: str, device: str) -> int:
    """Phase 0's child: ``method``'s backward against the oracle on one small shape; exit 0 when correct."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import spattn
    from spattn.bench import kernels as kbench
    from spattn.testing import brute_force_mask

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    H, L, D = (1, 256, 64) if device == "cpu" else (2, 1024, 128)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device=device, generator=g).to(dtype) for _ in range(3))
    layout = spattn.compile(spattn.Causal(), L, causal=True, device=device)
    with backward_method(method):
        errors = kbench.check_case(q, k, v, layout, brute_force_mask(spattn.Causal(), L, causal=True).to(device),
                                   D**-0.5)
    if device == "cuda":
        torch.cuda.synchronize()
    ok = all(e["ok"] for e in errors.values())
    print(json.dumps({"ok": ok, "errors": errors}), flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernels-v6.json")
    ap.add_argument("--summary", default=None, metavar="JSON", help="print the tables of a finished run and exit")
    ap.add_argument("--time-budget", type=float, default=165.0, help="seconds, JIT included (default 165)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the dry run under the triton interpreter (float32, tiny sizes)")
    ap.add_argument("--precheck", default=None, choices=["atomic"], help=argparse.SUPPRESS)  # the child of phase 0
    args = ap.parse_args(argv)
    if args.precheck:
        return precheck(args.precheck, args.device)
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

    import spattn
    from spattn.bench import kernels as kbench
    from spattn.bench.env import machine_info
    from spattn.bench.record import failed
    from spattn.bench.timing import median_ms
    from spattn.ops.attention.impl import triton as tri
    from spattn.ops.attention.impl.triton import _launch, _plan, _tuning
    from spattn.ops.attention.impl.triton._op import TABLES
    from spattn.testing import brute_force_mask

    torch._dynamo.config.cache_size_limit = 64  # Flex recompiles per shape: never fall back to eager Flex
    dev = args.device
    dtype = torch.float32 if cpu else torch.bfloat16
    if cpu:
        kbench.DEV, kbench.DTYPE = "cpu", torch.float32
    reps = 2 if cpu else 20
    H, D = (1, 64) if cpu else (16, 128)
    gate_len = 256 if cpu else 1024
    big = [128] if cpu else [16384, 65536]
    bwd_cfg_len = 128 if cpu else 16384

    rec: dict = {
        "suite": "kernels-v6", "machine": machine_info(dev if not cpu else "cpu"),
        "config": {**vars(args), "autotune": os.environ.get("SPATTN_TRITON_AUTOTUNE"), "dtype": str(dtype)},
        "defaults": {f"{k}|{'D<=64' if s else 'D>64'}": vars(c) for (k, s), c in _tuning._DEFAULTS.items()},
        "methods": list(METHODS), "phases": {}, "gate": [], "bwd_configs": [], "rows": [], "order": [],
        "fwd_configs": [], "extra": [], "not_run": [], "compiles": compiles.events, "compile_counting": compiles.active,
    }
    methods_for: dict[int, list[str]] = {}  # the methods that passed the gate, per head dim

    def save() -> None:
        rec["seconds"] = round(time.time() - start, 2)
        rec["methods"] = {f"D{d}": list(m) for d, m in methods_for.items()}
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

    def step(kind: str, what, fn) -> dict | None:
        if not fits(kind, what):
            return None
        compiles.phase = kind
        mark, t0 = compiles.mark(), time.time()
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            row = failed({"what": str(what)}, exc)
        row.setdefault("what", str(what))
        row["step_s"] = round(time.time() - t0, 3)
        row.update(compiles.since(mark))
        measured.setdefault(kind, []).append(time.time() - t0)
        rec[kind].append(row)
        ph = rec["phases"].setdefault(kind, {"seconds": 0.0, "spattn_compiles": 0})
        ph["seconds"] = round(ph["seconds"] + row["step_s"], 3)
        ph["spattn_compiles"] += row["spattn_compiles"]
        print(f"[{time.time() - start:6.1f}s] {kind:11s} {what}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if k not in ("trace", "errors", "what", "config")), flush=True)
        save()
        return row

    def inputs(B, H, Hkv, L, D, seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        mk = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
        return mk(B, H, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D), mk(B, H, L, D)

    def ms(fn, grad_to_none=None) -> float:
        return median_ms(fn, device=dev, repeats=reps, warmup=1 if cpu else 2, grad_to_none=grad_to_none)

    def bwd_alone(q, k, v, do, layout, method):
        """A closure running only the backward kernels (on saved forward outputs) with ``method``."""
        tables = [getattr(layout, n) for n in TABLES]
        with torch.no_grad():
            o, lse = tri.attention_triton(q, k, v, layout, scale=q.shape[-1] ** -0.5, return_lse=True)
        return lambda: _launch.backward(do, q, k, v, o, lse, None, *tables, q.shape[-1] ** -0.5, method=method)

    # ------------------------------------------------------------------------------------------ 0. precheck
    import subprocess

    t0 = time.time()
    try:
        child = subprocess.run(
            [sys.executable, "-P", os.path.abspath(__file__), "--precheck", "atomic", "--device", dev],
            capture_output=True, text=True, timeout=300 if cpu else 60)
        rc, tail = child.returncode, (child.stdout + child.stderr)[-1500:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc)[-500:]
    rec["precheck"] = {"method": "atomic", "returncode": rc, "ok": rc == 0, "seconds": round(time.time() - t0, 2),
                       "output_tail": tail}
    print(f"[{time.time() - start:6.1f}s] precheck atomic: rc={rc} in {rec['precheck']['seconds']} s", flush=True)
    if rc != 0:
        print(tail, flush=True)
    save()

    # ------------------------------------------------------------------------------------------ 1. gate
    def gate(method, H, Hkv, D, pname):
        def fn():
            L = gate_len
            q, k, v, _ = inputs(1, H, Hkv, L, D, seed=D)
            pattern = spattn.Sinks(64) | spattn.Window(L // 4) if pname != "causal" else spattn.Causal()
            layout = spattn.compile(pattern, L, causal=True, device=dev)
            allowed = brute_force_mask(pattern, L, causal=True).to(dev)
            with backward_method(method):
                errors = kbench.check_case(q, k, v, layout, allowed, D**-0.5)
            return {"method": method, "shape": [1, H, L, D], "D": D, "Hkv": Hkv, "pattern": pname, "errors": errors,
                    "ok": all(e["ok"] for e in errors.values())}
        return fn

    def gate_all(H, Hkv, D) -> None:
        methods = methods_for.setdefault(D, list(METHODS) if rec["precheck"]["ok"] else ["split"])
        for method in list(methods):
            rows = [step("gate", f"{method} D{D} {pname}", gate(method, H, Hkv, D, pname))
                    for pname in ("causal", "sinks64|window")]
            if method != "split" and not all(r is not None and r.get("ok") for r in rows):
                methods.remove(method)  # failed, raised, or not gated (budget): not timed at this head dim
                why = "was not gated (budget)" if None in rows else "failed its gate"
                print(f"{method} backward {why} at D{D}: dropped", flush=True)
                save()

    gate_all(H, H, D)
    methods = methods_for[D]
    if not any(r.get("ok") for r in rec["gate"]):
        print("every gate case failed: no timings", flush=True)
        save()
        return 1

    # ------------------------------------------------------------------------------------------ 2. bwd configs
    C = _tuning.Config
    L = bwd_cfg_len
    q, k, v, do = inputs(1, H, H, L, D, seed=L)
    layout = spattn.compile(spattn.Causal(), L, causal=True, device=dev)
    flops = layout.flops(D, batch=1, heads=H)

    def bwd_config_row(method, kernel, cfg, tma=None):
        def fn():
            choose = _tuning.choose
            if cfg is not None:
                _tuning.choose = lambda name, *a, **kw: cfg.fit(layout.block_size) if name == kernel else choose(
                    name, *a, **kw)
            try:
                with environ("SPATTN_TRITON_TMA", tma):
                    run = bwd_alone(q, k, v, do, layout, method)
                    diff = grad_diff(run(), reference["split"])
                    t = ms(run)
            finally:
                _tuning.choose = choose
            used = cfg or _tuning.default(kernel, D, dtype)
            return {"method": method, "kernel": kernel, "config": vars(used), "is_default": cfg is None,
                    "tma": tma or os.environ.get("SPATTN_TRITON_TMA", "0"), "grad_diff_vs_split": diff,
                    "ok": diff < 5e-2,
                    "shape": [1, H, L, D], "bwd_ms": t, "bwd_tflops": 2.5 * flops / t / 1e9}
        return fn

    def grad_diff(a, b) -> float:
        """max over (dq, dk, dv) of max |a - b| / max |b|: bf16 rounding of two correct backwards is ~1e-2."""
        return max(float((x.float() - y.float()).abs().max()) / max(float(y.float().abs().max()), 1e-6)
                   for x, y in zip(a, b, strict=True))

    reference = {"split": bwd_alone(q, k, v, do, layout, "split")()}

    atomic_cfgs = [] if cpu else [C(64, 64, 8, 3), C(64, 128, 8, 2), C(128, 64, 8, 3)]
    split_cfgs = [] if cpu else [C(64, 64, 8, 3)]
    best_atomic = None
    if "atomic" in methods:
        row = step("bwd_configs", "atomic default", bwd_config_row("atomic", "bwd", None))
        if row and row.get("ok"):
            best_atomic = (row["bwd_ms"], _tuning.default("bwd", D, dtype))
    step("bwd_configs", "split default", bwd_config_row("split", "dkdv", None))
    if "atomic" in methods:
        for cfg in atomic_cfgs:
            row = step("bwd_configs", f"atomic {cfg}", bwd_config_row("atomic", "bwd", cfg))
            if row and row.get("ok") and (best_atomic is None or row["bwd_ms"] < best_atomic[0]):
                best_atomic = (row["bwd_ms"], cfg)
    for cfg in split_cfgs:
        step("bwd_configs", f"split dkdv {cfg}", bwd_config_row("split", "dkdv", cfg))
    if best_atomic is not None:
        _tuning._DEFAULTS[("bwd", D <= 64)] = best_atomic[1]
        rec["bwd_default_used"] = {f"D{D}": vars(best_atomic[1])}
    elif "atomic" in methods and not cpu:
        methods.remove("atomic")  # every atomic config failed
    save()

    # ------------------------------------------------------------------------------------------ 3. rows
    def fwdbwd_row(L, pname, H, Hkv, D, *, flex=True):
        def fn():
            from torch.nn.attention.flex_attention import flex_attention

            if "flex" not in kbench._FLEX:
                kbench._FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
            flex_fn = kbench._FLEX["flex"]
            methods = methods_for.get(D, ["split"])
            row = {"L": L, "pattern": pname, "H": H, "Hkv": Hkv, "D": D, "methods": list(methods)}
            q, k, v, do = inputs(1, H, Hkv, L, D, seed=L + D + Hkv)
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            pattern, mod = kbench.pattern_for(pname, L)
            layout = spattn.compile(pattern, L, L, causal=True, device=dev)
            row["density"] = layout.density()
            row["density_block"] = layout.density("block")
            row["banded"] = _plan.band(layout) is not None
            flops = layout.flops(D, batch=1, heads=H)
            scale = D**-0.5
            run_t = lambda q, k, v: tri.attention_triton(q, k, v, layout, scale=scale, return_lse=False)[0]  # noqa: E731
            grads = {}

            def grads_of(run):
                for x in (qg, kg, vg):
                    x.grad = None
                run(qg, kg, vg).backward(do)
                return [x.grad.clone() for x in (qg, kg, vg)]

            with torch.no_grad():
                row["triton_fwd_ms"] = ms(lambda: run_t(q, k, v))
            for method in methods:
                with backward_method(method):
                    grads[method] = grads_of(run_t)
                    row[f"{method}_fwdbwd_ms"] = ms(lambda: run_t(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
                    row[f"{method}_bwd_ms"] = ms(bwd_alone(q, k, v, do, layout, method))
                    row[f"{method}_fwdbwd_tflops"] = 3.5 * flops / row[f"{method}_fwdbwd_ms"] / 1e9
            if flex:
                bm = kbench.block_mask_for(layout, mod)
                gqa = Hkv != H
                run_f = lambda q, k, v: flex_fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)  # noqa: E731
                try:
                    with torch.no_grad():
                        ot, of = run_t(q, k, v), run_f(q, k, v)
                        fin = torch.isfinite(of)
                        row["max_abs_diff_vs_flex"] = float((ot.float() - of.float())[fin].abs().max())
                        del ot, of
                        row["flex_fwd_ms"] = ms(lambda: run_f(q, k, v))
                    grads["flex"] = grads_of(run_f)
                    row["flex_fwdbwd_ms"] = ms(lambda: run_f(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
                except Exception as exc:  # noqa: BLE001 - a failed baseline is recorded, the row goes on
                    row["flex_error"] = repr(exc)[:300]
            row["triton_fwd_tflops"] = flops / row["triton_fwd_ms"] / 1e9
            if "flex_fwd_ms" in row:
                row["speedup_fwd_vs_flex"] = row["flex_fwd_ms"] / row["triton_fwd_ms"]
            for method in methods:
                if "flex_fwdbwd_ms" in row:
                    row[f"{method}_fwdbwd_vs_flex"] = row["flex_fwdbwd_ms"] / row[f"{method}_fwdbwd_ms"]
                if "flex" in grads:
                    row[f"{method}_vs_flex_grad_diff"] = grad_diff(grads[method], grads["flex"])
            if "atomic" in grads:
                row["atomic_vs_split_grad_diff"] = grad_diff(grads["atomic"], grads["split"])
                row["atomic_speedup_vs_split_fwdbwd"] = row["split_fwdbwd_ms"] / row["atomic_fwdbwd_ms"]
            # bf16 gradients of two correct backwards differ by rounding (~1e-2 of the max at most)
            row["ok"] = all(row.get(f"{m}_vs_flex_grad_diff", 0.0) < 5e-2 for m in methods) and \
                row.get("atomic_vs_split_grad_diff", 0.0) < 5e-2 and row.get("max_abs_diff_vs_flex", 0.0) < 3e-2
            del grads
            torch.cuda.empty_cache() if not cpu else None
            return row
        return fn

    for L in big:
        for pname in ("causal", "sinks64|window1024", "random10%"):
            step("rows", f"D{D} L{L} {pname}", fwdbwd_row(L, pname, H, H, D))

    # ------------------------------------------------------------------------------------------ 3a. grid order
    def order_row(L, pname):
        def fn():
            q, k, v, do = inputs(1, H, H, L, D, seed=L + 3)
            pattern, _mod = kbench.pattern_for(pname, L)
            layout = spattn.compile(pattern, L, L, causal=True, device=dev)
            row = {"L": L, "pattern": pname, "H": H, "D": D, "ok": True}
            try:
                for method in methods_for.get(D, ["split"]):
                    for first in (True, False):
                        _launch.HEADS_FIRST = first
                        row[f"{method}_bwd_ms_{'heads_first' if first else 'tiles_first'}"] = ms(
                            bwd_alone(q, k, v, do, layout, method))
                    row[f"{method}_heads_first_speedup"] = (row[f"{method}_bwd_ms_tiles_first"]
                                                            / row[f"{method}_bwd_ms_heads_first"])
            finally:
                _launch.HEADS_FIRST = True
            return row
        return fn

    for L, pname in ((big[-1], "sinks64|window1024"), (big[0], "causal")):
        step("order", f"L{L} {pname}", order_row(L, pname))

    # ------------------------------------------------------------------------------------------ 4. banded fwd configs
    def fwd_config_row(L, cfg):
        def fn():
            q, k, v, _ = inputs(1, H, H, L, D, seed=L + 7)
            pattern, _mod = kbench.pattern_for("sinks64|window1024", L)
            layout = spattn.compile(pattern, L, L, causal=True, device=dev)
            run = lambda: tri.attention_triton(q, k, v, layout, scale=D**-0.5, return_lse=False)  # noqa: E731
            with torch.no_grad():
                base = ms(run)
                choose = _tuning.choose
                _tuning.choose = lambda name, *a, **kw: cfg.fit(layout.block_size) if name == "fwd" else choose(
                    name, *a, **kw)
                try:
                    t = ms(run)
                finally:
                    _tuning.choose = choose
            return {"L": L, "pattern": "sinks64|window1024", "config": vars(cfg), "fwd_ms": t, "default_ms": base,
                    "vs_default": base / t, "banded": _plan.band(layout) is not None, "ok": True}
        return fn

    fwd_cfgs = [C(64, 64, 4, 1)] if cpu else [C(128, 64, 8, 3), C(128, 128, 8, 2), C(128, 128, 8, 4),
                                               C(128, 128, 8, 3, True), C(64, 64, 4, 3)]
    for cfg in fwd_cfgs:
        step("fwd_configs", f"L{big[0]} {cfg}", fwd_config_row(big[0], cfg))

    # ------------------------------------------------------------------------------------------ 4b. TMA backward
    if best_atomic is not None:  # tensor-descriptor (TMA) loads, then loads + dQ reduction (not interpretable)
        for tma in ("load",) if cpu else ("load", "1"):
            step("bwd_configs", f"atomic TMA={tma} {best_atomic[1]}",
                 bwd_config_row("atomic", "bwd", best_atomic[1], tma))
    q = k = v = do = reference = None  # free the 16k tensors (the closures above are done with them)

    # ------------------------------------------------------------------------------------------ 5. extra rows
    d64 = (1, 32) if cpu else (16, 64)
    if cpu or fits("extra", "D64 gate"):
        gate_all(d64[0], d64[0], d64[1])
    Lx = big[-1]
    extra = [(Lx, "causal", d64[0], d64[0], d64[1])]
    if not cpu:
        extra += [(Lx, "random50%", H, H, D), (Lx, "random5%", H, H, D), (Lx, "document", H, H, D),
                  (Lx, "causal", H, 4, D)]
    for L, pname, h, hkv, d in extra:
        step("extra", f"D{d} Hkv{hkv} L{L} {pname}", fwdbwd_row(L, pname, h, hkv, d))

    rec["configs_chosen"] = _tuning.chosen()
    save()
    print(f"wrote {args.out} in {time.time() - start:.1f} s; spattn compiles: "
          f"{sum(1 for e in compiles.events if e['kernel'] in SPATTN_KERNELS)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
