"""How many Triton compiles the kernels need across sequence lengths and patterns, counted on a CPU machine.

    PYTHONPATH=src python benchmarks/kernels_jit.py --out benchmarks/results/cpu/kernels-jit.json

The interpreter (``TRITON_INTERPRET=1``) has no compile cache, so compiles are not observable there. Instead,
as ``benchmarks/compile_sm90.py`` does, a stand-in driver reports an sm_90 target and every launch becomes a
``warmup`` compile (no kernel runs): a compile is a launch that returns a kernel object not returned before.
The forward at head dim 64 by default (bf16, 9 query / 3 KV heads, SmolLM2's shape), the backward and the decode
kernel are launched for ``Causal()`` and ``Sinks(s) | Window(w)`` (several s, w) at every length of ``--lengths``,
with the untuned defaults (``_tuning.default``). Run it from another checkout (``--src``) to count an older tree.
Compiling takes ~15 s per variant on a shared 2-core CPU, so the older tree's count takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernels-jit.json")
    ap.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
                    help="the spattn source tree to count (default: this checkout's)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 1024, 2047, 4096, 4097, 8192])
    ap.add_argument("--patterns", nargs="+", default=["causal", "s64w1024", "s4w492", "s16w496"])
    ap.add_argument("--kernels", default="fwd,bwd,decode", help="comma-separated subset of fwd,bwd,decode")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, nargs=2, default=[9, 3], help="query heads, key/value heads")
    args = ap.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="spattn-jit-")  # no disk-cache hits
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compile_sm90 import _Sm90  # the stand-in sm_90 driver; imported before --src goes first on the path
    sys.path.insert(0, os.path.abspath(args.src))

    import torch
    import triton
    from triton.runtime import driver

    driver.set_active(_Sm90())
    import spattn
    from spattn.ops.attention.impl import triton as tri
    from spattn.ops.attention.impl.triton import _launch, _tuning

    events: list[dict] = []
    seen: set[int] = set()
    kept: list = []
    current: dict = {}
    run = triton.runtime.jit.JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        t0 = time.perf_counter()
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        if id(kernel) not in seen:
            seen.add(id(kernel))
            kept.append(kernel)
            events.append({"kernel": self.fn.__name__, "seconds": round(time.perf_counter() - t0, 2), **current,
                           "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                           "num_stages": kernel.metadata.num_stages})
            print(f"  compile {events[-1]}", flush=True)
        return kernel

    triton.runtime.jit.JITFunction.run = compile_only

    def choose(kernel, head_dim, dtype, facts, device, block_size, **kw):
        try:
            cfg = _tuning.default(kernel, head_dim, dtype, banded=kw.get("banded", False), even=kw.get("even", True))
        except TypeError:  # an older tree: default(kernel, head_dim)
            cfg = _tuning.default(kernel, head_dim)
        return cfg.fit(block_size)

    _launch._tuning.choose = choose
    _launch._num_sms = lambda device: 132
    pats = {"causal": lambda L: spattn.Causal(), "s64w1024": lambda L: spattn.Sinks(64) | spattn.Window(1024),
            "s4w492": lambda L: spattn.Sinks(4) | spattn.Window(492),
            "s16w496": lambda L: spattn.Sinks(16) | spattn.Window(496)}
    kinds = set(args.kernels.split(","))
    (H, Hkv), D = args.heads, args.head_dim
    rows = []
    t_start = time.time()
    for pname in args.patterns:
        for L in args.lengths:
            current.update(pattern=pname, L=L)
            n0 = len(events)
            layout = spattn.compile(pats[pname](L), L, causal=True, block_size=128)
            band = tri._band(layout)
            fwd = [getattr(layout, n) for n in ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks",
                                                "full_kv_indices")]
            bwd = [getattr(layout, n) for n in ("q_num_blocks", "q_indices", "q_mask_ids", "full_q_num_blocks",
                                                "full_q_indices")]
            q = torch.empty(1, H, L, D, dtype=torch.bfloat16)
            k = torch.empty(1, Hkv, L, D, dtype=torch.bfloat16)
            if "fwd" in kinds:
                _launch.forward(q, k, k, *fwd, layout.masks, 0.125, band)
            if "bwd" in kinds:
                _launch.backward(q, q, k, k, q, torch.zeros(1, H, L), None, *fwd, *bwd, layout.masks, 0.125)
            if "decode" in kinds:
                dec = spattn.compile(pats[pname](L), 1, L, causal=True, block_size=128)
                tabs = [getattr(dec, n) for n in ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks",
                                                  "full_kv_indices")]
                _launch.decode(q[:, :, :1].contiguous(), k, k, *tabs, dec.masks, 0.125, tri._band(dec))
            rows.append({"pattern": pname, "L": L, "banded": bool(band), "new_compiles": len(events) - n0})
            print(rows[-1], flush=True)
    rec = {"suite": "kernels-jit", "src": os.path.abspath(args.src), "config": vars(args),
           "triton": triton.__version__, "torch": torch.__version__, "rows": rows, "compiles": events,
           "total_compiles": len(events), "seconds": round(time.time() - t_start, 1),
           "by_kernel": {name: sum(1 for e in events if e["kernel"] == name) for name in {e["kernel"] for e in events}}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(f"{len(events)} compiles for {len(rows)} (pattern, length) cases; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
