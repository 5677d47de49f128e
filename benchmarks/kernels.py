"""Triton block-sparse attention kernels: correctness grid, then benchmark against FlexAttention and dense SDPA.

One script, one GPU call (DESIGN.md "benchmarks are a registry plus one driver"):

    PYTHONPATH=src python benchmarks/kernels.py --out results.json            # full run (H200: a few minutes)
    PYTHONPATH=src python benchmarks/kernels.py --quick --out results.json    # smaller lengths

1. ceilings: a bf16 8192^3 matmul and a device copy (the roofline this run is judged against);
2. correctness grid in bf16: awkward lengths, GQA, empty rows, varlen (Document), head dims, decode;
   forward, lse and all gradients against the float64 reference with the DESIGN.md rule
   err(triton, gold) <= 2 * err(reference in bf16, gold) + eps;
3. prefill benchmark: L x pattern, forward and forward+backward, spattn triton vs FlexAttention on the same
   block tables (compiled, closed-form mask_mod for the partial blocks) vs dense SDPA (flash), with density,
   useful TFLOP/s (allowed pairs only) and speedups; each row is gated by triton-vs-flex agreement;
4. decode: 1 query, batch 8, 16 heads (and GQA), Sinks(64) | Window(4096) at 32k and 128k context against
   dense SDPA decode and FlexAttention, eager and CUDA-graph replay;
5. the on-device layout build (spattn.patterns.device_build) against spattn.compile.

Writes JSON (machine, versions, git commit, command) and prints a short table last.
"""

# ruff: noqa: B023 - the timing closures are called inside the loop iteration that defines them
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import spattn
from spattn.ops.attention.impl import triton as tri
from spattn.ops.attention.impl.reference import attention_reference


def bench(fn, *, grad_to_none=None, warmup=10, rep=60) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms_copy = bench(lambda: y.copy_(x))
    return {"matmul_bf16_tflops": 2 * 8192**3 / ms / 1e9, "copy_tb_s": 2 * x.numel() / ms_copy / 1e9}


# ----------------------------------------------------------------------------------------------- correctness
def _errs(fast, gold, lowp):
    out = {}
    for name, a, g, r in zip(("out", "lse", "dq", "dk", "dv"), fast, gold, lowp, strict=True):
        if a is None:
            continue
        fin = torch.isfinite(g)
        same_inf = bool(torch.equal(torch.isfinite(a), fin))
        e_fast = float((a.double() - g.double())[fin].abs().max()) if fin.any() else 0.0
        e_ref = float((r.double() - g.double())[fin].abs().max()) if fin.any() else 0.0
        scale = float(g.double()[fin].abs().max()) if fin.any() else 1.0
        ok = same_inf and not bool(torch.isnan(a).any()) and e_fast <= 2 * e_ref + 1e-3 * max(scale, 1.0)
        out[name] = {"triton": e_fast, "reference_bf16": e_ref, "ok": ok}
    return out


def _run(fn, q, k, v, layout, scale, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, layout, scale=scale, return_lse=True)
    (out.float() * do.float()).sum().backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def correctness_grid() -> list[dict]:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    L_doc = 1000
    ids = torch.zeros(2, L_doc, dtype=torch.long)
    ids[0, 300:] = 1
    ids[0, 900:] = -1
    ids[1, 20:] = 1
    ids[1, 500:] = 2
    ids[1, 990:] = -1
    cases = [
        # name, B, H, Hkv, Lq, Lk, D, pattern, causal
        ("L1025-gqa-sinkwin", 2, 4, 2, 1025, 1025, 128, spattn.Sinks(64) | spattn.Window(256), True),
        ("L127-causal-D64", 1, 2, 2, 127, 127, 64, spattn.Causal(), False),
        ("L200-D80-window", 1, 2, 1, 200, 200, 80, spattn.Window(60, 10), True),
        ("Lq63-Lk1000-causal", 1, 2, 2, 63, 1000, 96, spattn.Causal(), False),
        ("L1-full", 1, 2, 2, 1, 1, 64, spattn.Full(), False),
        ("L700-D32-strided", 1, 2, 2, 700, 700, 32, spattn.Strided(4, block=64) | spattn.Window(64), True),
        ("doc-varlen-empty-rows", 2, 4, 1, L_doc, L_doc, 64, spattn.Document(ids), True),
        ("decode-q1-gqa", 2, 8, 2, 1, 3000, 128, spattn.Sinks(64) | spattn.Window(1024), True),
        ("decode-q16", 1, 4, 4, 16, 5000, 64, spattn.Sinks(64) | spattn.Window(512), True),
        ("decode-q4-perhead", 1, 2, 1, 4, 2000, 128, spattn.PerHead([spattn.Window(300), spattn.Sinks(128)]), True),
    ]
    rows = []
    for name, B, H, Hkv, Lq, Lk, D, pattern, causal in cases:
        try:
            mk = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.float32)  # noqa: E731
            q, k, v = mk(B, H, Lq, D).bfloat16(), mk(B, Hkv, Lk, D).bfloat16(), mk(B, Hkv, Lk, D).bfloat16()
            do = mk(B, H, Lq, D).bfloat16()
            layout = spattn.compile(pattern, Lq, Lk, causal=causal, batch=B, heads=H, device=dev)
            scale = D**-0.5
            fast = _run(tri.attention_triton, q, k, v, layout, scale, do)
            gold = _run(attention_reference, q.double(), k.double(), v.double(), layout, scale, do.double())
            lowp = _run(attention_reference, q, k, v, layout, scale, do)
            errs = _errs(fast, gold, lowp)
            ok = all(e["ok"] for e in errs.values())
            rows.append({"case": name, "ok": ok, "errors": errs, "density": layout.density()})
        except Exception as exc:  # noqa: BLE001 - record and continue: the table shows it
            rows.append({"case": name, "ok": False, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
        print(f"  check {name:28s} {'ok' if rows[-1]['ok'] else 'FAIL'}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- prefill
def _pattern(name: str, L: int, bs: int = 128):
    NQ = -(-L // bs)
    if name == "causal":
        return spattn.Causal(), "causal"
    if name == "sinks64|window1024":
        return spattn.Sinks(64) | spattn.Window(1024), "sinkwin"
    if name == "random10%":
        gen = torch.Generator().manual_seed(0)
        sel = (torch.rand(NQ, NQ, generator=gen) < 0.1).tril(-1) | torch.eye(NQ, dtype=torch.bool)
        return spattn.BlockLayout(sel, block=bs), "causal"
    if name == "strided8":
        return spattn.Strided(8, block=bs), "causal"
    raise ValueError(name)


def _causal_mod(b, h, q, k):
    return q >= k


def _sinkwin_mod(b, h, q, k):
    return (q >= k) & ((k < 64) | (q - k <= 1024))


def _flex_mask_mod(kind: str):
    # module-level functions: a fresh closure per call would make dynamo recompile flex every time
    return _causal_mod if kind == "causal" else _sinkwin_mod


def _block_mask(layout, kind):
    from torch.nn.attention.flex_attention import BlockMask

    NK = layout.num_kv_blocks
    widen = lambda t: F.pad(t, (0, NK - t.shape[-1])).contiguous()  # noqa: E731 - flex wants width NK
    return BlockMask.from_kv_blocks(
        layout.kv_num_blocks, widen(layout.kv_indices), layout.full_kv_num_blocks, widen(layout.full_kv_indices),
        BLOCK_SIZE=layout.block_size, mask_mod=_flex_mask_mod(kind), seq_lengths=(layout.q_len, layout.kv_len),
    )


def prefill(lengths, patterns, B=1, H=16, D=128, backward=True) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for L in lengths:
        g = torch.Generator(device="cuda").manual_seed(L)
        q, k, v, do = (torch.randn(B, H, L, D, device="cuda", generator=g).bfloat16() for _ in range(4))
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        for pname in patterns:
            row = {"L": L, "pattern": pname, "B": B, "H": H, "D": D, "dtype": "bf16"}
            try:
                pattern, kind = _pattern(pname, L)
                t0 = time.perf_counter()
                layout = spattn.compile(pattern, L, L, causal=True, device="cuda")
                torch.cuda.synchronize()
                row["compile_ms"] = (time.perf_counter() - t0) * 1e3
                row["density"] = layout.density()
                row["density_block"] = layout.density("block")
                flops = layout.flops(D, batch=B, heads=H)
                row["useful_gflop_fwd"] = flops / 1e9
                bm = _block_mask(layout, kind)
                scale = D**-0.5
                run_t = lambda q, k, v: tri.attention_triton(q, k, v, layout, scale=scale, return_lse=False)[0]  # noqa: E731
                run_f = lambda q, k, v: flex(q, k, v, block_mask=bm, scale=scale)  # noqa: E731

                def run_d(q, k, v):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

                # gate: triton agrees with flex on the same tables (and both are finite)
                with torch.no_grad():
                    ot, of = run_t(q, k, v), run_f(q, k, v)
                row["max_abs_diff_vs_flex"] = float((ot.float() - of.float()).abs().max())
                row["ok"] = bool(torch.isfinite(ot).all()) and row["max_abs_diff_vs_flex"] < 3e-2
                for name, fn in (("triton", run_t), ("flex", run_f), ("sdpa", run_d)):
                    with torch.no_grad():
                        row[f"{name}_fwd_ms"] = bench(lambda fn=fn: fn(q, k, v))
                    if backward:
                        row[f"{name}_fwdbwd_ms"] = bench(
                            lambda fn=fn: fn(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg]
                        )
                row["triton_fwd_tflops"] = flops / row["triton_fwd_ms"] / 1e9
                row["flex_fwd_tflops"] = flops / row["flex_fwd_ms"] / 1e9
                row["speedup_fwd_vs_flex"] = row["flex_fwd_ms"] / row["triton_fwd_ms"]
                row["speedup_fwd_vs_sdpa"] = row["sdpa_fwd_ms"] / row["triton_fwd_ms"]
                if backward:
                    row["triton_fwdbwd_tflops"] = 3.5 * flops / row["triton_fwdbwd_ms"] / 1e9
                    row["speedup_fwdbwd_vs_flex"] = row["flex_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
                    row["speedup_fwdbwd_vs_sdpa"] = row["sdpa_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
            except Exception as exc:  # noqa: BLE001
                row["ok"] = False
                row["error"] = repr(exc)[:500]
                row["trace"] = traceback.format_exc()[-1500:]
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "trace"}
            print("  prefill", shown, flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------- decode
def _graph_ms(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def decode(contexts, B=8, H=16, D=128, window=4096, kv_heads=(16, 2)) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    rows = []
    for Lk in contexts:
        for Hkv in kv_heads:
            row = {"context": Lk, "B": B, "H": H, "Hkv": Hkv, "D": D, "budget": f"sinks64|window{window}"}
            try:
                g = torch.Generator(device="cuda").manual_seed(Lk + Hkv)
                q = torch.randn(B, H, 1, D, device="cuda", generator=g).bfloat16()
                k = torch.randn(B, Hkv, Lk, D, device="cuda", generator=g).bfloat16()
                v = torch.randn(B, Hkv, Lk, D, device="cuda", generator=g).bfloat16()
                layout = spattn.compile(spattn.Sinks(64) | spattn.Window(window), 1, Lk, causal=True, device="cuda")
                row["density"] = layout.density()
                scale = D**-0.5
                run_t = lambda: tri.attention_triton(q, k, v, layout, scale=scale, return_lse=False)[0]  # noqa: E731

                def run_d():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=Hkv != H)

                with torch.no_grad():
                    ot = run_t()
                    # gate: against the reference on the kept keys (fp32) for batch 0
                    ref, _ = attention_reference(q[:1].float(), k[:1].float(), v[:1].float(), layout, scale=scale)
                    row["max_abs_err_vs_reference"] = float((ot[:1].float() - ref).abs().max())
                    row["ok"] = row["max_abs_err_vs_reference"] < 2e-2
                    row["triton_ms"] = bench(run_t)
                    row["triton_graph_ms"] = _graph_ms(run_t)
                    row["sdpa_ms"] = bench(run_d)
                    row["sdpa_graph_ms"] = _graph_ms(run_d)
                    try:
                        flex = torch.compile(flex_attention, dynamic=False)
                        mod = lambda b, h, qi, kj: (kj < 64) | (qi + Lk - 1 - kj <= window)  # noqa: E731
                        from torch.nn.attention.flex_attention import create_block_mask

                        bm = create_block_mask(mod, None, None, 1, Lk, device="cuda")
                        run_f = lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=Hkv != H)  # noqa: E731
                        row["flex_ms"] = bench(run_f)
                    except Exception as exc:  # noqa: BLE001
                        row["flex_error"] = repr(exc)[:300]
                row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["triton_ms"]
                row["speedup_vs_sdpa_graph"] = row["sdpa_graph_ms"] / row["triton_graph_ms"]
                if "flex_ms" in row:
                    row["speedup_vs_flex"] = row["flex_ms"] / row["triton_ms"]
                kv_bytes = 2 * B * Hkv * min(Lk, window + 1 + 128 + 64) * D * 2
                row["kept_kv_gb_s_graph"] = kv_bytes / row["triton_graph_ms"] / 1e6
            except Exception as exc:  # noqa: BLE001
                row["ok"] = False
                row["error"] = repr(exc)[:500]
                row["trace"] = traceback.format_exc()[-1500:]
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "trace"}
            print("  decode", shown, flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------- layout build
def device_build(lengths) -> list[dict]:
    from spattn.patterns import device_build as db

    rows = []
    for L in lengths:
        row = {"L": L, "pattern": "sinks64|window1024 causal"}
        try:
            pattern = spattn.Sinks(64) | spattn.Window(1024)
            fn = lambda: db.build_layout(pattern, L, L, causal=True, device="cuda")  # noqa: E731
            lay = fn()
            ref = spattn.compile(pattern, L, L, causal=True, device="cuda")
            pairs = zip(lay.tables().values(), ref.tables().values(), strict=True)
            row["same_as_compile"] = all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs)
            torch.cuda.synchronize()
            ts = []
            for _ in range(20):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            row["build_us_wall_median"] = sorted(ts)[len(ts) // 2] * 1e6
            row["build_us_gpu"] = bench(fn) * 1e3
            ts = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                spattn.compile(pattern, L, L, causal=True, device="cuda")
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            row["compile_us_wall_median"] = sorted(ts)[len(ts) // 2] * 1e6
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
            row["profile_top_self_cpu_us"] = {e.key[:50]: e.self_cpu_time_total for e in ops}
        except Exception as exc:  # noqa: BLE001
            row["error"] = repr(exc)[:500]
        print("  build", row, flush=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- host overhead
def overhead(L=4096, B=1, H=16, D=128) -> dict:
    """Host time per call and GPU kernel times (profiler) for a short, sparse case where launch costs show."""
    pattern, _ = _pattern("random10%", L)
    layout = spattn.compile(pattern, L, L, causal=True, device="cuda")
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda").bfloat16() for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    fwd = lambda: tri.attention_triton(q, k, v, layout, scale=D**-0.5, return_lse=False)  # noqa: E731
    fb = lambda: tri.attention_triton(qg, kg, vg, layout, scale=D**-0.5, return_lse=False)[0].backward(do)  # noqa: E731
    out = {}
    for name, fn, n in (("fwd", fwd, 200), ("fwd_bwd", fb, 50)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out[f"{name}_host_us_per_call"] = (t1 - t0) / n * 1e6
        out[f"{name}_wall_us_per_call"] = (time.perf_counter() - t0) / n * 1e6
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        kern = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA":
                kern[e.key[:60]] = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 10
        out[f"{name}_gpu_us_by_kernel"] = dict(sorted(kern.items(), key=lambda kv: -kv[1])[:8])
    print("  overhead", out, flush=True)
    return out


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--quick", action="store_true", help="lengths 4096 and 16384 only")
    ap.add_argument("--lengths", default=None, help="comma-separated prefill lengths")
    ap.add_argument("--patterns", default="causal,sinks64|window1024,random10%,strided8")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated: grid,prefill,decode,build")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [4096, 16384] if args.quick else [4096, 16384, 65536, 131072]
    )
    import triton

    record = {
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": args.commit,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64
    from spattn.ops.attention.impl.triton import _tuning

    t_start = time.time()

    def save() -> None:
        record["configs"] = _tuning.chosen()
        record["seconds"] = time.time() - t_start
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    record["ceilings"] = ceilings()
    print("ceilings", record["ceilings"], flush=True)
    tune = os.environ.get("SPATTN_TRITON_AUTOTUNE", "1")
    if "grid" not in skip:
        os.environ["SPATTN_TRITON_AUTOTUNE"] = "0"  # defaults only: the grid checks numerics, not speed
        record["correctness"] = correctness_grid()
        os.environ["SPATTN_TRITON_AUTOTUNE"] = tune
        save()
    if "overhead" not in skip:
        try:
            record["overhead"] = overhead()
        except Exception as exc:  # noqa: BLE001
            record["overhead"] = {"error": repr(exc)[:300]}
        save()
    if "build" not in skip:
        record["device_build"] = device_build([16384, 131072])
        save()
    if "decode" not in skip:
        record["decode"] = decode([32768, 131072])
        save()
    if "prefill" not in skip:
        record["prefill"] = []
        for L in lengths:
            record["prefill"] += prefill([L], args.patterns.split(","), backward=not args.no_backward)
            save()
    save()
    summary(record)


def summary(record: dict) -> None:
    peak = record["ceilings"]["matmul_bf16_tflops"]
    print(f"\n{record['gpu']}  torch {record['torch']}  triton {record['triton']}  commit {record['git_commit'][:10]}")
    print(f"matmul {peak:.0f} TFLOP/s, copy {record['ceilings']['copy_tb_s']:.2f} TB/s")
    grid = record.get("correctness", [])
    if grid:
        bad = [r["case"] for r in grid if not r["ok"]]
        print(f"correctness grid (bf16 vs float64 reference): {len(grid) - len(bad)}/{len(grid)} ok {bad or ''}")
    for r in record.get("device_build", []):
        print(f"device build L={r['L']}: {r.get('build_us_wall_median', float('nan')):.0f} us wall, "
              f"same as compile: {r.get('same_as_compile')}, "
              f"compile {r.get('compile_us_wall_median', float('nan')):.0f} us")
    print("| L | pattern | density | triton fwd ms | flex fwd ms | sdpa fwd ms | fwd x flex | "
          "triton TFLOP/s (% peak) | "
          "triton fwd+bwd ms | flex fwd+bwd ms | fwd+bwd x flex | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in record.get("prefill", []):
        if "triton_fwd_ms" not in r:
            print(f"| {r['L']} | {r['pattern']} | error: {r.get('error', '')[:80]} |")
            continue
        tf = r["triton_fwd_tflops"]
        print(f"| {r['L']} | {r['pattern']} | {r['density']:.3f} | {r['triton_fwd_ms']:.3f} | {r['flex_fwd_ms']:.3f} | "
              f"{r['sdpa_fwd_ms']:.3f} | {r['speedup_fwd_vs_flex']:.2f} | {tf:.0f} ({100 * tf / peak:.0f}%) | "
              f"{r.get('triton_fwdbwd_ms', float('nan')):.3f} | {r.get('flex_fwdbwd_ms', float('nan')):.3f} | "
              f"{r.get('speedup_fwdbwd_vs_flex', float('nan')):.2f} | {r['ok']} |")
    print("| context | Hkv | triton ms (graph) | sdpa ms (graph) | flex ms | x sdpa (graph) | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in record.get("decode", []):
        if "triton_ms" not in r:
            print(f"| {r['context']} | {r['Hkv']} | error: {r.get('error', '')[:80]} |")
            continue
        print(f"| {r['context']} | {r['Hkv']} | {r['triton_ms']:.4f} ({r['triton_graph_ms']:.4f}) | "
              f"{r['sdpa_ms']:.4f} ({r['sdpa_graph_ms']:.4f}) | {r.get('flex_ms', float('nan')):.4f} | "
              f"{r['speedup_vs_sdpa']:.1f} ({r['speedup_vs_sdpa_graph']:.1f}) | {r['ok']} |")


if __name__ == "__main__":
    main()
