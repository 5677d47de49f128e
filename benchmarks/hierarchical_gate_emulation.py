"""Is the bf16 gate failure of the H200 (session 7: ``dpool_value`` 0.212 > 2 x 0.087 + 0.002) precision or a bug?

A CPU run of the hierarchical fast path whose compressed-branch attention is replaced by an emulation of the
triton kernels' bf16 numerics: scores and the online softmax in float32 from bf16 inputs, the probabilities
rounded to bf16 before the ``P V`` and ``P^T dO`` dots (float32 accumulation), ``dV`` / ``dK`` accumulated in
float32 over the GQA group and rounded once, ``dS`` rounded to bf16 (FlashAttention's recipe, which the kernels
follow). Same inputs, seeds and configuration as ``benchmarks/hierarchical.py``'s gate at the timings' shape;
the errors of every result against the float64 reference, beside the bf16 reference's own, with the learned
pooling as it was (input dtype, session 7's H200 code) and as it is now (float32).

If the emulation reproduces the H200's errors, the failure is the arithmetic, not the kernels.

    PYTHONPATH=src python benchmarks/hierarchical_gate_emulation.py        # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

import torch

import spattn
from spattn.bench.record import make, write
from spattn.hierarchical import hierarchical_attention, reference
from spattn.hierarchical.common import compress, pool_weights
from spattn.testing import max_err

GRADIENTS = ("out", "dq", "dk", "dv", "dgate", "dpool_key", "dpool_value")
LOW = torch.bfloat16
# the modules themselves (the package rebinds ``spattn.hierarchical.reference`` to the function of that name)
fast_module = importlib.import_module("spattn.hierarchical.attention")
reference_module = importlib.import_module("spattn.hierarchical.reference")
ATTENTION = fast_module.attention  # the fast path's own spattn.attention


class KernelNumerics(torch.autograd.Function):
    """softmax(q k^T * scale) v over a dense bool mask with the triton kernels' rounding points (module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        G = q.shape[1] // k.shape[1]
        kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
        s = ((q.float() @ kf.transpose(-1, -2)) * scale).masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        o = p.to(LOW).float() @ vf
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.scale = scale
        return o.to(LOW), lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, mask, o, lse = ctx.saved_tensors
        B, Hkv, G, scale = q.shape[0], k.shape[1], q.shape[1] // k.shape[1], ctx.scale
        kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
        s = ((q.float() @ kf.transpose(-1, -2)) * scale).masked_fill(~mask, -math.inf)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        dof = do.float()
        dv = (p.to(LOW).float().transpose(-1, -2) @ dof).view(B, Hkv, G, *v.shape[2:]).sum(2)
        delta = (dof * o.to(LOW).float()).sum(-1, keepdim=True)
        ds = (p * (dof @ vf.transpose(-1, -2) - delta)).to(LOW).float()
        dq = (ds @ kf) * scale
        dk = ((ds.transpose(-1, -2) @ q.float()) * scale).view(B, Hkv, G, *k.shape[2:]).sum(2)
        return dq.to(LOW), dk.to(LOW), dv.to(LOW), None, None


def emulated_attention(query, key, value, layout, *, causal=False, scale=None, backend="auto", return_lse=False):
    """``spattn.attention`` for the fast path: the compressed branch (the call that asks for the log-sum-exp)
    with the kernels' numerics, the other branches as they are."""
    if return_lse and query.dtype == LOW:
        return KernelNumerics.apply(query, key, value, layout.to_dense().to(query.device), scale)
    return ATTENTION(query, key, value, layout, causal=causal, scale=scale, backend=backend, return_lse=return_lse)


def compress_in_input_dtype(x, config, pool_logit=None):
    """The pooling of session 7's H200 run: the weighted sum in the input dtype (bf16 weights)."""
    nc = config.num_compressed(x.shape[2])
    if nc == 0:
        return x.new_zeros(*x.shape[:2], 0, x.shape[3])
    span = x.unfold(2, config.compress_block, config.compress_stride)[:, :, :nc]
    return torch.einsum("bhndc,hc->bhnd", span, pool_weights(pool_logit, config, x.shape[1], x.device, x.dtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(1024, 16, 2, 128), metavar=("L", "H", "HKV", "D"))
    parser.add_argument("--out", default="benchmarks/results/cpu/hierarchical/gate_emulation.json")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    L, H, Hkv, D = args.shape
    config = spattn.Hierarchical(compress_block=32, compress_stride=16, select_block=64, select_count=4,
                                 window=128, pooling="learned") | spattn.Sinks(16)
    g = torch.Generator().manual_seed(0)  # the gate's inputs (benchmarks/hierarchical.py)
    q, k, v = (torch.randn(1, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    gl = torch.randn(1, H, L, 3, generator=g)
    pool = (torch.randn(Hkv, 32, generator=g), torch.randn(Hkv, 32, generator=g))
    do = torch.randn(1, H, L, D, generator=g)
    with torch.no_grad():
        chosen = hierarchical_attention(q.to(LOW), k.to(LOW), v.to(LOW), config, gate_logits=gl.to(LOW),
                                        pool_logits=pool, return_info=True)[1]["chosen"]

    def run(fn, dtype, **extra):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, gl, *pool)]
        out = fn(*leaves[:3], config, gate_logits=leaves[3], pool_logits=(leaves[4], leaves[5]), **extra)
        (out.double() * do.double()).sum().backward()
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    golden = run(reference, torch.float64, chosen=chosen)
    rows = {}
    for pooling, pool_fn in (("input dtype (session 7 H200)", compress_in_input_dtype), ("float32 (now)", compress)):
        fast_module.compress = reference_module.compress = pool_fn
        baseline = run(reference, LOW, chosen=chosen)
        fast_module.attention = emulated_attention
        try:
            emulated = run(hierarchical_attention, LOW)
        finally:
            fast_module.attention = ATTENTION
        rows[pooling] = {
            "reference_bf16_max_abs_err": dict(zip(GRADIENTS, map(max_err, baseline, golden), strict=True)),
            "emulated_kernels_max_abs_err": dict(zip(GRADIENTS, map(max_err, emulated, golden), strict=True)),
        }
        print(pooling, {n: (round(rows[pooling]["emulated_kernels_max_abs_err"][n], 4),
                            round(rows[pooling]["reference_bf16_max_abs_err"][n], 4)) for n in GRADIENTS}, flush=True)
    fast_module.compress = reference_module.compress = compress
    record = make("hierarchical_gate_emulation",
                  {"shape": [1, H, Hkv, L, D], "config": config.to_dict(), "dtype": "bfloat16"}, [],
                  golden_max_abs=dict(zip(GRADIENTS, (float(gd.abs().max()) for gd in golden), strict=True)),
                  pooling=rows,
                  h200_session7={"dpool_value": {"fast": 0.2121, "reference": 0.08710},
                                 "source": "/work/gpu-results/s7/cB/hierarchical.log (commit ded742c)"},
                  command="python " + " ".join(sys.argv), seconds=time.perf_counter() - started)
    write(record, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
