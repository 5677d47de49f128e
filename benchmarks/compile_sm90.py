"""Compile every triton kernel variant for Hopper (sm_90) on a machine without a GPU, before spending device
time: ``PYTHONPATH=src python benchmarks/compile_sm90.py``.

The CPU interpreter runs the kernels' arithmetic but not Triton's compiler, so type errors, globals that are
not constexpr or shared-memory blow-ups only show on the GPU. Here a stand-in driver reports an sm_90 target,
launches become ``warmup`` compiles (no kernel runs) and each variant prints its shared memory. This is a
pre-flight check, not a benchmark (timings come from ``benchmarks/run.py kernels``).
"""

from __future__ import annotations

import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


class _Sm90:
    """Just enough of a driver for ``JITFunction.run(warmup=True)``."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def main() -> None:
    driver.set_active(_Sm90())
    import spattn
    from spattn.ops.attention.impl.triton import _launch, _tuning

    run = triton.runtime.jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        md = kernel.metadata
        print(f"  {self.fn.__name__:28s} shared {md.shared:>7} B  warps {md.num_warps}  stages {md.num_stages}")
        return kernel

    triton.runtime.jit.JITFunction.run = compile_only
    chosen = {}
    _launch._tuning.choose = lambda kernel, *a, **k: chosen[kernel]
    _launch._num_sms = lambda device: 132
    L = 1024
    layout = spattn.compile(spattn.Sinks(64) | spattn.Window(256), L, causal=True, block_size=128)
    fwd_tables = [getattr(layout, n) for n in ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks",
                                               "full_kv_indices")]
    bwd_tables = [getattr(layout, n) for n in ("q_num_blocks", "q_indices", "q_mask_ids", "full_q_num_blocks",
                                               "full_q_indices")]
    for D in (64, 128):
        q = torch.randn(1, 4, L, D, dtype=torch.bfloat16)
        k = torch.randn(1, 2, L, D, dtype=torch.bfloat16)
        small = D <= 64
        chosen.update({name: _tuning.default(name, D) for name in ("dq", "dkdv", "decode")})
        for band in ([], [1024, 0, 64, 0, 1]):
            print(f"D={D} band={band}")
            for persistent in (False, True):
                cfg = _tuning.Config(128, 64, 4 if small else 8, 3, persistent)
                chosen["fwd"] = cfg
                _launch.forward(q, k, k, *fwd_tables, layout.masks, 0.1, band)
            _launch.decode(q[:, :, :1], k, k, *fwd_tables, layout.masks, 0.1, band)
        _launch.backward(q, q, k, k, q, torch.zeros(1, 4, L), None, *fwd_tables, *bwd_tables, layout.masks, 0.1)
        # coverage.measure's Triton pass, recall only and with values
        from spattn.coverage.kernel import coverage_sums
        from spattn.layout import tables

        _, slot = tables.unpack(layout)
        for value in (None, k):
            coverage_sums(q, k, value, slot, tables.tiles(layout.masks), block_size=128, causal=True, scale=0.1)


if __name__ == "__main__":
    main()
