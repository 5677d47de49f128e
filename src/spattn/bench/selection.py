"""Dynamic selection benchmark: selection cost, sparse attention speed and recall next to the oracle.

The ``selectors`` suite of the one driver (DESIGN.md "benchmarks are a registry plus one driver"):

    PYTHONPATH=src python benchmarks/run.py selectors --out benchmarks/results/h200/selectors.json              # H200
    PYTHONPATH=src python benchmarks/run.py selectors --out /tmp/selectors.json -- --quick                       # smoke
    PYTHONPATH=src python benchmarks/run.py selectors --out benchmarks/results/cpu/selectors.json -- --device cpu \
        --lengths 1024 2048 --heads 4 --kv-heads 4 2 --head-dim 64 --dtype float32                        # CPU

Per length x head configuration (MHA and GQA) x selector, on synthetic prefill inputs with local structure
plus a few heavy key blocks (``--data random`` for pure noise), pattern ``Sinks(s) | Window(w) | TopP(sel, p)``
(``--rule topk`` for ``TopK(sel, k)``), causal:

1. selection: the dynamic part alone (scores + budget rule, given the safeguards), ``spattn.compile``
   (selection + safeguards + block tables, with host syncs), and ``spattn.selectors.LayoutBuilder.build``
   (selection + merge + fixed-width tables, checked host-sync free on CUDA), medians;
2. sparse attention forward on the compiled layout (backend ``triton`` when importable on CUDA, else
   ``flex``; recorded), dense SDPA (flash on CUDA) and FlexAttention on the same layout via
   ``layout.to_block_mask()``; end-to-end = compile + sparse attention, and build + attention in one call;
3. correctness gate: sparse output against FlexAttention (or the reference) on the same layout;
4. recall (``spattn.coverage.measure``) of the layout and of the oracle (``spattn.coverage.oracle_layout``)
   at the same blocks per query block, on ``--recall-heads`` query heads, with the selector's own estimate.

A ``--time-budget`` (seconds) skips the optional parts (flex, recall) of later rows rather than running over.
Returns the suite record (``spattn.bench.record``) and prints a line per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import spattn
from spattn.bench import record as bench_record
from spattn.bench.timing import median_ms, sync
from spattn.patterns.base import Context
from spattn.selectors import LayoutBuilder, TopK, TopP

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------- timing
def timed(fn, device: torch.device, *, reps: int, warmup: int = 2) -> float:
    """Median milliseconds (device time on CUDA, wall clock on CPU)."""
    return median_ms(fn, device=device, repeats=reps, warmup=warmup)


def wall(fn, device: torch.device, *, reps: int) -> float:
    """Median wall-clock milliseconds including host synchronisation (for compile)."""
    return median_ms(fn, device=device, repeats=reps, warmup=1, wall=True)


# ------------------------------------------------------------------------------------------- inputs
def synthetic(B, H, Hkv, L, D, *, seed, device, dtype, kind="structured"):
    """q [B, H, L, D], k / v [B, Hkv, L, D], generated on ``device``. ``structured``: an AR(1) latent per kv
    head (correlation decays over ~1-2k tokens: local attention), per-head noise, and 1% heavy key blocks
    plus 4 sink tokens sharing a direction every query leans toward (vertical lines). ``random``: i.i.d."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    if kind == "random":
        return randn(B, H, L, D).to(dtype), randn(B, Hkv, L, D).to(dtype), randn(B, Hkv, L, D).to(dtype)
    step, rho = 256, 0.85
    n = L // step + 2
    eps = randn(B, Hkv, n, D)
    w = [eps[:, :, 0]]
    for t in range(1, n):
        w.append(rho * w[-1] + math.sqrt(1 - rho * rho) * eps[:, :, t])
    w = torch.stack(w, dim=2)
    z = F.interpolate(w.flatten(0, 1).transpose(1, 2), size=L, mode="linear", align_corners=False)
    z = z.transpose(1, 2).reshape(B, Hkv, L, D)
    z = z / z.norm(dim=-1, keepdim=True)
    c = math.sqrt(8.0) * D ** 0.25  # scale * c^2 = 8: strong locality
    G = H // Hkv
    k = c * z + randn(B, Hkv, L, D)
    q = c * z.repeat_interleave(G, dim=1) + randn(B, H, L, D)
    u = randn(B, Hkv, 1, D)
    u = u / u.norm(dim=-1, keepdim=True)
    a = math.sqrt(7.0) * D ** 0.25  # heavy keys add about 7 to the scaled logit
    q = q + a * u.repeat_interleave(G, dim=1)
    bs = 128
    nb = max(L // bs, 1)
    heavy = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))[: max(1, nb // 100)]
    hot = torch.zeros(nb, bs, dtype=torch.bool)
    hot[heavy] = True
    hot = torch.nn.functional.pad(hot.flatten(), (0, max(L - nb * bs, 0)))[:L]
    hot[:4] = True
    k = k + a * u * hot.to(device)[None, None, :, None]
    v = randn(B, Hkv, L, D)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()


# ------------------------------------------------------------------------------------------- backends
def sparse_backend(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            from spattn.ops.attention.impl import triton as _  # noqa: F401

            return "triton"
        except ImportError:
            return "flex"
    return "reference"


_FLEX: dict = {}


def flex_fn(device: torch.device):
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if device.type == "cuda":
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        else:
            _FLEX["fn"] = flex_attention
    return _FLEX["fn"]


def _mask_mod(sinks: int, window: int):
    """Closed form of ``(Sinks | Window) & Causal`` (one function object per (sinks, window): no recompiles)."""
    key = ("mask_mod", sinks, window)
    if key not in _FLEX:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((kv_idx < sinks) | (q_idx - kv_idx <= window))

        _FLEX[key] = mask_mod
    return _FLEX[key]


def flex_block_mask(layout, sinks: int, window: int):
    """BlockMask on the layout's own tables. Partial blocks of ``Sinks | Window | TopX`` under causal are never
    selected (the safeguards keep them), so their exact mask is the closed form of the safeguards & causal;
    the gate against the spattn output checks it. Eager (CPU) flex evaluates mask_mod on every pair, so there
    (and on older torch) it is ``layout.to_block_mask()``, exact everywhere."""
    if layout.device.type != "cuda":  # eager flex applies mask_mod to every pair: it needs the exact predicate
        return layout.to_block_mask(), "layout.to_block_mask()"
    try:
        from torch.nn.attention.flex_attention import BlockMask

        NK = layout.num_kv_blocks

        def widen(x):
            return F.pad(x, (0, NK - x.shape[-1])).contiguous()

        bm = BlockMask.from_kv_blocks(layout.kv_num_blocks, widen(layout.kv_indices), layout.full_kv_num_blocks,
                                      widen(layout.full_kv_indices), BLOCK_SIZE=layout.block_size,
                                      mask_mod=_mask_mod(sinks, window), seq_lengths=(layout.q_len, layout.kv_len))
        return bm, "layout tables + closed-form mask_mod (sinks | window) & causal"
    except Exception:  # noqa: BLE001 - older torch: the generic converter
        return layout.to_block_mask(), "layout.to_block_mask()"


def dense_fn(q, k, v):
    """Dense causal SDPA (flash on CUDA); GQA through enable_gqa, else pre-expanded key/value."""
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                probe = (q[:, :, :128], k[:, :, :128], v[:, :, :128])
                F.scaled_dot_product_attention(*probe, is_causal=True, enable_gqa=gqa)

            def run():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

            return run, "sdpa-flash" + ("-gqa" if gqa else "")
        except RuntimeError:
            G = q.shape[1] // k.shape[1]
            k2, v2 = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

            def run():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k2, v2, is_causal=True)

            return run, "sdpa-flash (key/value pre-expanded)"
    G = q.shape[1] // k.shape[1]
    k2, v2 = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return (lambda: F.scaled_dot_product_attention(q, k2, v2, is_causal=True)), "sdpa-" + q.device.type


# ------------------------------------------------------------------------------------------- recall
def _coverage():
    """(measure, oracle_layout) from spattn.coverage, or None when it is not there."""
    try:
        import spattn.coverage as cov
    except ImportError:
        return None
    m, o = getattr(cov, "measure", None), getattr(cov, "oracle_layout", None)
    try:
        if not callable(m):
            from spattn.coverage.measure import measure as m
        if not callable(o):
            from spattn.coverage.mass import oracle_layout as o
    except ImportError:
        return None
    return (m, o) if callable(m) and callable(o) else None


def head_slice(layout, h0: int, h1: int):
    """The layout restricted to query heads [h0, h1) (tables with one head are shared, kept as they are)."""
    if layout.heads == 1:
        return layout
    names = ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "q_mask_ids", "full_q_num_blocks", "full_q_indices")
    return dataclasses.replace(layout, **{n: getattr(layout, n)[:, h0:h1].contiguous() for n in names})


def _local_block_mass(q, k, bs, scale):
    """float64 [B, H, NQ, NK] causal softmax mass per block (fallback when spattn.coverage is absent)."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    kk = k.repeat_interleave(G, 1).float()
    NQ = NK = -(-L // bs)
    out = torch.zeros(B, H, NQ, NK, dtype=torch.float64, device=q.device)
    j = torch.arange(L, device=q.device)
    for qb in range(NQ):
        i = torch.arange(qb * bs, min((qb + 1) * bs, L), device=q.device)
        s = (q[:, :, i].float() @ kk.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(j[None, :] > i[:, None], -math.inf), -1)
        p = F.pad(p, (0, NK * bs - L)).view(B, H, len(i), NK, bs).sum(-1)
        out[:, :, qb] = p.sum(2).double()
    return out


def recall(q, k, layout, *, heads: int, causal: bool = True) -> dict:
    """Recall of ``layout`` and of the oracle at the same blocks per query block, on the first query heads."""
    h = min(heads, q.shape[1])
    G = q.shape[1] // k.shape[1]
    qh, kh = q[:, :h], k[:, : -(-h // G)]
    if kh.shape[1] * G != h:  # keep a whole number of groups: use MHA-style slicing
        kh = k[:, [i // G for i in range(h)]]
    lay = head_slice(layout, 0, h)
    status = lay.block_status()
    blocks = float((status > 0).sum(-1).double().mean())
    budget = max(1, math.floor(blocks))  # the oracle never gets more blocks per row than the layout keeps
    cov = _coverage()
    if cov is not None:
        measure, oracle_layout = cov
        got = measure(qh, kh, lay, causal=causal, topk=0)
        orc = oracle_layout(qh, kh, budget=budget, block_size=layout.block_size, causal=causal)
        want = measure(qh, kh, orc, causal=causal, topk=0)
        return {"source": "spattn.coverage", "heads": h, "recall": float(got.recall.float().mean()),
                "recall_min_row": float(got.recall.float().min()), "oracle_recall": float(want.recall.float().mean()),
                "oracle_blocks_per_row": budget, "blocks_per_row": blocks, "density": got.density,
                "oracle_density": want.density}
    mass = _local_block_mass(qh, kh, layout.block_size, 1 / math.sqrt(q.shape[-1]))  # block-level fallback
    sel = (status > 0).expand_as(mass)
    got = (mass * sel).sum(-1) / mass.sum(-1)
    best = mass.sort(-1, descending=True).values[..., :budget].sum(-1) / mass.sum(-1)
    return {"source": "local fallback (block mass)", "heads": h, "recall": float(got.mean()),
            "recall_min_row": float(got.min()), "oracle_recall": float(best.mean()), "oracle_blocks_per_row": budget,
            "blocks_per_row": blocks}


# ------------------------------------------------------------------------------------------- one row
def make_pattern(args, selector: str):
    options = {"stride": args.antidiagonal_stride} if selector == "antidiagonal" else {}
    if selector == "vertical_slash":
        options = {"last": args.probe}
    common = dict(options=options, max_keys=args.max_keys, sharing=args.sharing)
    dyn = TopP(selector, args.mass, **common) if args.rule == "topp" else TopK(selector, args.blocks, **common)
    safe = spattn.Sinks(args.sinks) | spattn.Window(args.window)
    return safe, dyn, safe | dyn


def run_row(args, q, k, v, selector, device, backend, dense_ms, deadline) -> dict:
    L, H, Hkv = q.shape[2], q.shape[1], k.shape[1]
    bs = args.block_size
    safe, dyn, pattern = make_pattern(args, selector)
    row = {"length": L, "heads": H, "kv_heads": Hkv, "selector": selector, "pattern": pattern.to_dict(),
           "rule": args.rule, "backend": backend}

    def compile_layout():
        return spattn.compile(pattern, L, L, causal=True, block_size=bs, batch=q.shape[0], heads=H, query=q, key=k)

    layout = compile_layout()
    sync(device)
    row["density"] = layout.density()
    row["block_density"] = layout.density("block")
    row["estimated_mass"] = float(layout.info["estimated_mass"].float().mean())
    row["selected_blocks_per_row"] = float(layout.info["selected_blocks"].float().mean())
    # 1. selection alone: the dynamic part given the safeguards' status (what the budget rule sees)
    ctx = Context(L, L, bs, q.device, True, q.shape[0], H, q, k)
    kept = safe.status(ctx)
    ctx.kept = kept

    def select():
        ctx.info = {}
        return dyn.selection(ctx)

    if device.type == "cuda":  # the selection must not synchronise with the host: let CUDA say so
        try:
            torch.cuda.set_sync_debug_mode("error")
            select()
            row["selection_host_sync_free"] = True
        except RuntimeError as exc:
            row["selection_host_sync_free"] = False
            row["selection_host_sync"] = str(exc)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    row["selection_ms"] = timed(select, device, reps=args.reps)
    scorer = dyn.make_selector()
    row["scores_ms"] = timed(lambda: scorer.scores(q, k, block_size=bs, causal=True), device, reps=args.reps)
    row["compile_ms"] = wall(compile_layout, device, reps=max(3, args.reps // 2))
    # 1b. the sync-free builder (static part compiled once per length, excluded; then selection + merge + pack)
    t0 = time.perf_counter()
    builder = LayoutBuilder(pattern, L, causal=True, block_size=bs, batch=q.shape[0], heads=H, device=q.device)
    sync(device)
    row["builder_init_ms"] = (time.perf_counter() - t0) * 1e3
    built = builder.build(q, k)
    row["builder_equals_compile"] = bool(torch.equal(built.block_status(), layout.block_status().expand_as(
        built.block_status())))
    if device.type == "cuda":
        try:
            torch.cuda.set_sync_debug_mode("error")
            builder.build(q, k)
            row["build_host_sync_free"] = True
        except RuntimeError as exc:
            row["build_host_sync_free"] = False
            row["build_host_sync"] = str(exc)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    row["build_ms"] = timed(lambda: builder.build(q, k), device, reps=args.reps)
    # 2. sparse attention on the compiled layout
    run_sparse = lambda: spattn.attention(q, k, v, layout, causal=True, backend=backend)  # noqa: E731
    out = run_sparse()
    row["attention_ms"] = timed(run_sparse, device, reps=args.reps)
    row["end_to_end_ms"] = row["compile_ms"] + row["attention_ms"]
    run_built = lambda: spattn.attention(q, k, v, builder.build(q, k), causal=True, backend=backend)  # noqa: E731
    row["end_to_end_build_ms"] = timed(run_built, device, reps=args.reps)  # build + attention, one timed call
    row["speedup_end_to_end_build_vs_dense"] = dense_ms / row["end_to_end_build_ms"]
    row["selection_fraction_of_attention"] = row["selection_ms"] / row["attention_ms"]
    row["dense_ms"] = dense_ms
    row["speedup_attention_vs_dense"] = dense_ms / row["attention_ms"]
    row["speedup_end_to_end_vs_dense"] = dense_ms / row["end_to_end_ms"]
    causal_pairs = L * (L + 1) / 2
    row["useful_tflops"] = 4 * row["density"] * L * L * q.shape[-1] * H * q.shape[0] / (row["attention_ms"] * 1e9)
    row["dense_tflops"] = 4 * causal_pairs * q.shape[-1] * H * q.shape[0] / (dense_ms * 1e9)
    # 3. FlexAttention on the same layout, and the correctness gate
    if args.flex and time.time() < deadline:
        try:
            bm, row["flex_block_mask"] = flex_block_mask(layout, args.sinks, args.window)
            fx = flex_fn(device)
            run_flex = lambda: fx(q, k, v, block_mask=bm, enable_gqa=Hkv != H)  # noqa: E731
            ref = run_flex()
            row["flex_ms"] = timed(run_flex, device, reps=args.reps)
            row["speedup_vs_flex"] = row["flex_ms"] / row["attention_ms"]
            err = (out.float() - ref.float()).abs()
            tol = 2e-2 if q.dtype != torch.float32 else 1e-4
            row["gate"] = {"against": "flex", "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                           "tolerance": tol, "ok": bool(float(err.max()) <= tol)}
        except Exception as exc:  # noqa: BLE001 - record and go on: one optional measurement
            row["flex_error"] = f"{type(exc).__name__}: {exc}"
    else:
        row["flex_skipped"] = "disabled" if not args.flex else "time budget"
    if "gate" not in row and L <= (32768 if device.type == "cuda" else 8192):
        ref = spattn.attention(q.float(), k.float(), v.float(), layout, causal=True, backend="reference")
        err = float((out.float() - ref).abs().max())
        tol = 2e-2 if q.dtype != torch.float32 else 1e-4
        row["gate"] = {"against": "reference", "max_abs_err": err, "tolerance": tol, "ok": err <= tol}
    # 4. recall next to the oracle
    if args.recall_heads > 0 and time.time() < deadline:
        try:
            row["recall"] = recall(q, k, layout, heads=args.recall_heads)
        except Exception as exc:  # noqa: BLE001
            row["recall_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    else:
        row["recall_skipped"] = "disabled" if args.recall_heads <= 0 else "time budget"
    return row


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="selectors", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4], help="one row set per value (MHA, GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--selectors", nargs="+", default=["pooled", "vertical_slash", "antidiagonal", "bounds"])
    p.add_argument("--rule", choices=["topp", "topk"], default="topp")
    p.add_argument("--mass", type=float, default=0.95)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--max-keys", type=int, default=None)
    p.add_argument("--sharing", choices=["group", "head"], default="group")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--antidiagonal-stride", type=int, default=16)
    p.add_argument("--probe", type=int, default=64, help="vertical_slash: last queries probed")
    p.add_argument("--data", choices=["structured", "random"], default="structured")
    p.add_argument("--backend", default="auto", help="sparse backend: auto (triton on CUDA, else flex / reference)")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--recall-heads", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=150.0, help="seconds; optional parts are skipped after it")
    p.add_argument("--quick", action="store_true", help="smoke run: short lengths, two selectors")
    args = p.parse_args(argv)
    start = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.quick:
        args.lengths = [4096, 8192] if device.type == "cuda" else [512, 1024]
        args.selectors = args.selectors[:2] if len(args.selectors) > 2 else args.selectors
        args.reps = min(args.reps, 3)
        if device.type == "cpu":
            args.heads, args.kv_heads, args.head_dim, args.window = 2, [2, 1], 32, 128
            args.dtype = "float32"
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        print("note: CPU run uses float32", file=sys.stderr)
        dtype = torch.float32
    backend = sparse_backend(device) if args.backend == "auto" else args.backend
    deadline = start + args.time_budget
    result = bench_record.make(
        "selectors", vars(args), [], device=str(device), dtype=str(dtype).removeprefix("torch."),
        sparse_backend=backend, coverage="spattn.coverage" if _coverage() is not None else "local fallback",
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print(f"device={device} backend={backend} dtype={dtype} coverage={result['coverage']}", flush=True)
    for L in sorted(args.lengths, reverse=True):  # largest first: the headline rows fit the time budget
        for Hkv in args.kv_heads:
            q, k, v = synthetic(args.batch, args.heads, Hkv, L, args.head_dim, seed=L + Hkv, device=device,
                                dtype=dtype, kind=args.data)
            run_dense, dense_name = dense_fn(q, k, v)
            try:
                dense_ms = timed(run_dense, device, reps=args.reps)
            except Exception as exc:  # noqa: BLE001
                print(f"dense failed: {exc}", file=sys.stderr)
                dense_ms = float("nan")
            for sel in args.selectors:
                try:
                    row = run_row(args, q, k, v, sel, device, backend, dense_ms, deadline)
                    row["dense"] = dense_name
                except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the run goes on
                    traceback.print_exc()
                    row = {"length": L, "heads": args.heads, "kv_heads": Hkv, "selector": sel,
                           "error": f"{type(exc).__name__}: {exc}"}
                row["elapsed_s"] = time.time() - start
                result["rows"].append(row)
                print(summary(row), flush=True)
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["total_seconds"] = time.time() - start
    return result


def summary(row: dict) -> str:
    if "error" in row:
        return f"L={row['length']:>6} Hkv={row['kv_heads']:>2} {row['selector']:<15} ERROR {row['error']}"
    rec = row.get("recall", {})
    flex = row.get("flex_ms")
    return (
        f"L={row['length']:>6} Hkv={row['kv_heads']:>2} {row['selector']:<15} dens={row['density']:.4f} "
        f"sel={row['selection_ms']:8.2f}ms comp={row['compile_ms']:8.2f}ms attn={row['attention_ms']:8.2f}ms "
        f"dense={row['dense_ms']:8.2f}ms flex={'-' if flex is None else f'{flex:8.2f}ms'} "
        f"build={row['build_ms']:7.2f}ms e2e x{row['speedup_end_to_end_vs_dense']:.2f} "
        f"e2e(build) x{row['speedup_end_to_end_build_vs_dense']:.2f} "
        f"sel/attn={row['selection_fraction_of_attention']:.2f} "
        f"recall={rec.get('recall', float('nan')):.3f} oracle={rec.get('oracle_recall', float('nan')):.3f} "
        f"est={row['estimated_mass']:.3f} gate={row.get('gate', {}).get('ok')}"
    )

