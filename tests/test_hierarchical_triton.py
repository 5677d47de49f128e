"""Hierarchical attention on the triton kernels (TRITON_INTERPRET=1 on CPU, fp32): every branch's Layout
(the compressed one over zero-padded compressed keys with empty rows, the selected one with a safeguard, the
window) run by ``attention_triton`` under NaN poisoning equals the float64 reference at the same selection,
forward and backward, within the tolerance rule (baseline: the fp32 reference).

The interpreter must be set before triton is imported (Note [interpreter in one process] in
``test_triton_kernels.py``, whose helpers this module reuses); if another module imported triton first, the case
re-runs in a subprocess.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import spattn  # noqa: E402
import spattn.hierarchical.attention as fast_path  # noqa: E402
from spattn.hierarchical import hierarchical_attention, reference, selection_scores  # noqa: E402
from spattn.hierarchical.scores import compressed_lse, token_scores_torch  # noqa: E402
from spattn.ops.attention.impl import triton as tri  # noqa: E402
from spattn.testing import assert_within, poison_empty  # noqa: E402
from tests.test_triton_kernels import DEVICE, IN_PROCESS, interpreter_subprocess  # noqa: E402 - the interpreter setup, in one place

test_interpreter_subprocess = interpreter_subprocess(__file__, timeout=600)


@pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see the subprocess test")
def test_triton_branches_equal_reference(monkeypatch):
    def on_triton(query, key, value, layout, *, causal=False, scale=None, backend=None, return_lse=False):
        out, lse = tri.attention_triton(query, key, value, layout, scale=scale, return_lse=return_lse)
        return (out, lse) if return_lse else out

    monkeypatch.setattr(fast_path, "attention", on_triton)  # every branch on the triton kernels
    monkeypatch.setattr(fast_path, "selection_scores", functools.partial(selection_scores, backend="triton"))
    config = spattn.Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2,
                                 window=12, pooling="learned") | spattn.Sinks(4)
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 1, 2, 1, 40, 16
    q, k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), \
        torch.randn(B, Hkv, L, D, generator=g)
    gl = torch.randn(B, H, L, 3, generator=g)
    pool = (torch.randn(Hkv, 16, generator=g), torch.randn(Hkv, 16, generator=g))
    do = torch.randn(B, H, L, D, generator=g)

    def run(fn, dtype, device, **extra):
        leaves = [x.detach().to(device, dtype).requires_grad_() for x in (q, k, v, gl, *pool)]
        out = fn(*leaves[:3], config, gate_logits=leaves[3], pool_logits=(leaves[4], leaves[5]), **extra)
        (out.double() * do.to(device).double()).sum().backward()
        return [out.detach().cpu()] + [x.grad.cpu() for x in leaves]

    with torch.no_grad():
        chosen = hierarchical_attention(q, k, v, config, gate_logits=gl, pool_logits=pool,
                                        return_info=True)[1]["chosen"].cpu()
    with poison_empty():
        got = run(hierarchical_attention, torch.float32, DEVICE)
    golden = run(reference, torch.float64, "cpu", chosen=chosen)
    baseline = run(reference, torch.float32, "cpu", chosen=chosen)
    for name, f, gd, bl in zip(("out", "dq", "dk", "dv", "dgate", "dpool_key", "dpool_value"), got, golden,
                               baseline, strict=True):
        assert torch.isfinite(f).all(), name
        assert_within(f.float(), gd, bl.float(), k=2.0, eps=1e-5, what=name)


@pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see the subprocess test")
@pytest.mark.parametrize("shape", [
    pytest.param((1, 4, 2, 100, 16, 16, 8, 16), id="B1-L100-H4-G2-D16-tail"),
    pytest.param((2, 3, 1, 64, 24, 8, 8, 16), id="B2-L64-H3-mqa-D24-stride=block"),
    pytest.param((1, 2, 2, 47, 16, 32, 16, 32), id="B1-L47-H2-mha-few-tokens"),
])
def test_triton_token_scores_equal_torch(shape):
    from spattn.hierarchical.triton_scores import token_scores_triton

    B, H, Hkv, L, D, cb, cs, sb = shape
    config = spattn.Hierarchical(compress_block=cb, compress_stride=cs, select_block=sb, select_count=2, window=8)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, L, D, generator=g)
    kc = torch.randn(B, Hkv, config.num_compressed(L), D, generator=g)
    lse = compressed_lse(q, kc, config, scale=D ** -0.5)
    want = token_scores_torch(q.double(), kc.double(), lse.double(), config, scale=D ** -0.5)
    got = token_scores_triton(q, kc, lse, config, scale=D ** -0.5)
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    # each query row's probabilities sum to 1 over its visible tokens: a block sums to G x its rows that see one
    rows = torch.arange(L).view(-1, 1) >= cb - 1
    per_block = torch.zeros(-(-L // sb)).index_add_(0, torch.arange(L) // sb, rows[:, 0].float()) * (H // Hkv)
    torch.testing.assert_close(got.sum(-1), per_block.expand_as(got.sum(-1)), rtol=1e-5, atol=1e-5)
