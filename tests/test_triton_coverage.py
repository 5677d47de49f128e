"""The Triton pass of ``coverage.measure`` (``spattn.coverage.kernel``) under TRITON_INTERPRET=1 on CPU (fp32 /
fp16: bf16 tl.dot is wrong in the interpreter), against the independent float64 oracle: recall, lse and the
outputs from ``spattn.testing.dense_attention`` on the dense-visible and the kept token masks (recall =
exp(lse_kept - lse_dense)), with the torch pass in the test dtype as the baseline of the tolerance rule, and
outputs NaN-poisoned. Same interpreter set-up as ``test_triton_kernels.py`` (Note [interpreter in one process])."""

from __future__ import annotations  # noqa: I001 - tests.test_triton_kernels must be imported before spattn

import math

import pytest
import torch

# first: it sets TRITON_INTERPRET before triton is imported and patches the interpreter (order matters)
from tests import test_triton_kernels as kernel_tests

import spattn  # noqa: E402
from spattn.coverage import measure  # noqa: E402
from spattn.testing import (  # noqa: E402
    assert_within, brute_force_mask, dense_attention, plain_attention, poison_empty,
)

needs_interp = kernel_tests.needs_interp
DEVICE = kernel_tests.DEVICE


test_coverage_interpreter_subprocess = kernel_tests.interpreter_subprocess(__file__, timeout=900)


CASES = [  # pattern, B, H, Hkv, Lq, Lk, D, block_size, causal, dtype, with value
    pytest.param(spattn.Sinks(5) | spattn.Window(40), 1, 2, 1, 100, 100, 32, 32, True, torch.float32, True,
                 id="gqa-causal-L100-bs32"),
    pytest.param(spattn.RandomBlocks(2, seed=1, block=16, per_head=True), 2, 2, 2, 33, 90, 24, 16, False,
                 torch.float32, False, id="per-head-noncausal-Lq33-Lk90-D24"),
    pytest.param(spattn.Window(20) | spattn.Strided(3, block=16), 1, 1, 1, 70, 70, 16, 16, True, torch.float16,
                 True, id="fp16-causal-window|strided"),
]


@needs_interp
@pytest.mark.parametrize("pattern,B,H,Hkv,Lq,Lk,D,bs,causal,dtype,with_v", CASES)
def test_coverage_kernel_against_the_oracle(pattern, B, H, Hkv, Lq, Lk, D, bs, causal, dtype, with_v):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, H, Lq, D, generator=g) * 1.5).to(dtype).to(DEVICE)
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * 1.5).to(dtype).to(DEVICE)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).to(DEVICE) if with_v else None
    layout = spattn.compile(pattern, Lq, Lk, causal=causal, block_size=bs, batch=B, heads=H, device=DEVICE)
    with poison_empty():
        fast = measure(q, k, layout, value=v, causal=causal, topk=0, backend="triton")
    base = measure(q, k, layout, value=v, causal=causal, topk=0, backend="torch")
    # the oracle: float64 dense attention on the token masks (no block tables, no streaming)
    visible = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        visible = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    kept = brute_force_mask(pattern, Lq, Lk, causal=causal, heads=H, batch=B).expand(B, H, Lq, Lk) & visible
    vv = v if with_v else k
    o_dense, lse_dense = dense_attention(q, k, vv, visible.expand(B, H, Lq, Lk), D**-0.5)
    o_kept, lse_kept = dense_attention(q, k, vv, kept, D**-0.5)
    recall = torch.exp(lse_kept - lse_dense)
    assert not fast.recall.isnan().any() and not fast.lse.isnan().any()
    assert_within(fast.recall, recall, base.recall, what="recall")
    assert_within(fast.lse, lse_dense, base.lse, what="lse")
    finite = torch.isfinite(recall.log())
    assert torch.equal(torch.isinf(fast.kl), ~finite)  # a row with nothing kept: KL = inf, exactly where the oracle has
    assert_within(fast.kl[finite], -recall.log()[finite], base.kl[finite], what="kl")
    if with_v:  # the outputs' baseline: plain attention in the test dtype (the kernel's P @ V runs in it, as flash's)
        p_dense, _ = plain_attention(q, k, vv, visible.expand(B, H, Lq, Lk), D**-0.5)
        p_kept, _ = plain_attention(q, k, vv, kept, D**-0.5)
        err = (o_kept - o_dense).norm(dim=-1)
        assert_within(fast.output_abs_error, err, (p_kept.double() - p_dense.double()).norm(dim=-1),
                      what="output_abs_error", eps=1e-4)
        ref = ((o_kept - o_dense).square().sum((-1, -2)) / o_dense.square().sum((-1, -2))).sqrt()
        p_ref = ((p_kept.double() - p_dense.double()).square().sum((-1, -2))
                 / p_dense.double().square().sum((-1, -2))).sqrt()
        assert_within(fast.output_error, ref, p_ref, what="output_error", eps=1e-4)
    else:
        assert fast.output_error is None


@needs_interp
def test_coverage_kernel_refusals():
    q = torch.randn(1, 1, 64, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="top-k"):
        measure(q, q, spattn.Window(8), topk=4, backend="triton", block_size=16)
    with pytest.raises(RuntimeError, match="block size"):
        measure(q, q, spattn.Window(8), topk=0, backend="triton", block_size=24)
    with pytest.raises(ValueError, match="backend"):
        measure(q, q, spattn.Window(8), backend="cuda")
    assert math.isfinite(float(measure(q, q, spattn.Window(8), topk=0, block_size=16).recall.mean()))
