"""Registers, spills and shared memory of the backward kernels compiled for Hopper (sm_90) on a CPU machine.

    PYTHONPATH=src python benchmarks/kernels_regs.py --out benchmarks/results/cpu/kernels-regs.json

A stand-in driver (``compile_sm90._Sm90``) makes every launch a ``warmup`` compile; the cubin's resource usage
comes from ``cuobjdump --dump-resource-usage`` (bundled with triton). Registers are capped at 255 per thread,
so STACK (bytes of local memory per thread) is the spill. Config specs: ``KERNEL:BLOCK_M,BLOCK_N,WARPS,STAGES``
with KERNEL ``dkdv`` (the split backward, dQ at its default) or ``bwd`` (the atomic one), ``--tma`` for the
atomic kernel's ``SPATTN_TRITON_TMA`` mode. Compiles take 15-80 s each on a shared CPU. Static facts, not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

DEFAULT_SPECS = ["dkdv:64,128,8,3", "dkdv:64,64,8,3", "bwd:64,128,8,3", "bwd:64,128,8,2", "bwd:64,64,8,3"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=DEFAULT_SPECS, help=f"configs (default {' '.join(DEFAULT_SPECS)})")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tma", default="0", choices=["0", "load"], help="1 needs CUDA tensors (not here)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ["SPATTN_TRITON_TMA"] = args.tma

    import torch
    import triton
    from compile_sm90 import _Sm90
    from triton.runtime import driver

    driver.set_active(_Sm90())
    import spattn
    from spattn.bench.env import machine_info
    from spattn.ops.attention.impl.triton import _launch, _tuning

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows: list[dict] = []
    current: dict = {}
    run = triton.runtime.jit.JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        t0 = time.time()
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        name = self.fn.__name__
        if name in ("attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_fused_kernel"):
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            os.unlink(f.name)
            found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
            row = {**current, "kernel": name, "num_warps": kernel.metadata.num_warps,
                   "num_stages": kernel.metadata.num_stages, "shared_bytes": kernel.metadata.shared,
                   "registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", -1)),
                   "compile_s": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        return kernel

    triton.runtime.jit.JITFunction.run = compile_only
    chosen: dict = {}
    _launch._tuning.choose = lambda kernel, *a, **k: chosen[kernel]
    L, D = 1024, args.head_dim
    layout = spattn.compile(spattn.Causal(), L, causal=True, block_size=128)
    tables = [getattr(layout, n) for n in ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks",
                                            "full_kv_indices", "q_num_blocks", "q_indices", "q_mask_ids",
                                            "full_q_num_blocks", "full_q_indices")]
    q = torch.randn(1, 4, L, D, dtype=torch.bfloat16)
    for spec in args.specs:
        kernel, cfg = spec.split(":")
        cfg = _tuning.Config(*map(int, cfg.split(",")))
        chosen.update({n: _tuning.default(n, D) for n in ("dq", "dkdv", "bwd")})
        chosen[kernel] = cfg
        current.clear()
        current.update(spec=spec, head_dim=D, tma=args.tma if kernel == "bwd" else "0")
        method = "atomic" if kernel == "bwd" else "split"
        _launch.backward(q, q, q, q, q, torch.zeros(1, 4, L), None, *tables, layout.masks, 0.1, method=method)
    if args.out:
        record = {"suite": "kernels-regs", "machine": machine_info("cpu"), "target": "sm_90 (stand-in driver)",
                  "triton": triton.__version__, "config": vars(args), "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
