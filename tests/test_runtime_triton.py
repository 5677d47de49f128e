"""The runtime's sparse decode through spattn's triton split-K decode kernel (TRITON_INTERPRET=1 on CPU,
fp32 / fp16): block tables built on the device from the selected pages equal the torch reference path
(``paged_attention``) and the float64 dense oracle on the token mask the selection attends, under NaN
poisoning, for batches of different lengths (left padding), GQA, page tails, per-head and per-group tables
and the cache's whole buffer; and ``Runtime(decode_kernel="triton")`` generates what the torch path generates.

The interpreter must be set before triton is imported (Note [interpreter in one process] in
``test_triton_kernels.py``, whose setup this module reuses); if another module imported triton first, the cases
re-run in a subprocess.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
pytest.importorskip("transformers")

import spattn  # noqa: E402
from spattn.runtime import Runtime, decode_plan, paged_attention, select  # noqa: E402
from spattn.runtime.decode import block_tables, triton_paged_attention  # noqa: E402
from spattn.selectors.common import pool  # noqa: E402
from spattn.testing import assert_within, dense_attention, plain_attention, poison_empty  # noqa: E402
from tests.test_triton_kernels import DEVICE, IN_PROCESS, interpreter_subprocess  # noqa: E402 - the interpreter setup, in one place

from .hf_support import tiny_llama  # noqa: E402

needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see subprocess")


test_interpreter_subprocess = interpreter_subprocess(__file__, timeout=600)


def _allowed(selection, length: int, heads: int, page: int) -> torch.Tensor:
    """bool ``[B, H, 1, L]``: the token mask a selection attends, scattered back to key positions."""
    B, Hkv, P = selection.pages.shape
    tokens = (selection.pages.clamp_min(0)[..., None] * page + torch.arange(page)).flatten(2)
    tokens = tokens.repeat_interleave(heads // Hkv, dim=1)
    mask = selection.mask & (tokens < length) & (selection.pages >= 0).repeat_interleave(
        heads // Hkv, dim=1).repeat_interleave(page, dim=-1)
    allowed = torch.zeros(B, heads, length + page, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(mask, tokens, length), mask)
    allowed[..., length:] = False
    return allowed[..., None, :length]


def _case(B, H, Hkv, L, D, page, dtype, padding, budget, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    valid = torch.ones(B, L, dtype=torch.bool)
    for b, o in enumerate(padding):
        valid[b, :o] = False
    plan = decode_plan(spattn.Sinks(5) | spattn.Window(40) | spattn.TopK("bounds", budget))
    selection = select(q, L, valid, plan, budget, kv_heads=Hkv, page_size=page, scale=D ** -0.5,
                       key_min=pool(k, page, "amin"), key_max=pool(k, page, "amax"),
                       offsets=list(padding) if any(padding) else None)
    return q, k, v, selection


CASES = [
    # B, H, Hkv, L, D, page, dtype, left padding per sequence, budget
    pytest.param(3, 4, 2, 173, 16, 16, torch.float32, (0, 37, 128), 3, id="B3-gqa-tail-padded-fp32"),
    pytest.param(2, 6, 2, 161, 32, 32, torch.float16, (0, 9), 2, id="B2-G3-tail-padded-fp16"),
    pytest.param(1, 2, 2, 64, 16, 16, torch.float32, (0,), 8, id="B1-mha-budget-covers-all"),
]


@needs_interp
@pytest.mark.parametrize("B, H, Hkv, L, D, page, dtype, padding, budget", CASES)
def test_triton_decode_equals_reference_and_oracle(B, H, Hkv, L, D, page, dtype, padding, budget):
    q, k, v, selection = _case(B, H, Hkv, L, D, page, dtype, padding, budget)
    assert selection.grouped
    scale = D ** -0.5
    with poison_empty():
        fast = triton_paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), selection, page_size=page,
                                      scale=scale).cpu()
        per_head = triton_paged_attention(q, k, v, dataclasses.replace(selection, grouped=False), page_size=page,
                                          scale=scale)
    reference = paged_attention(q, k, v, selection, page_size=page, scale=scale)
    allowed = _allowed(selection, L, H, page)
    assert bool(allowed.any(-1).all())
    golden, _ = dense_attention(q, k, v, allowed, scale)
    baseline, _ = plain_attention(q, k, v, allowed, scale)
    assert_within(fast, golden, baseline, what="triton paged decode (per-group tables)")
    assert_within(per_head, golden, baseline, what="triton paged decode (per-head tables)")
    assert_within(reference, golden, baseline, what="torch paged decode")
    assert torch.isfinite(fast).all()


@needs_interp
def test_triton_decode_over_the_whole_buffer():
    """``whole_buffer``: the view of a longer zero-padded buffer runs over the buffer (fixed launch arguments)
    and gives the same answer; a row with nothing to attend (every key padding) gives 0, not NaN."""
    q, k, v, selection = _case(2, 4, 2, 150, 16, 16, torch.float32, (0, 0), 2, seed=3)
    kb = torch.zeros(2, 2, 256, 16)
    vb = torch.zeros(2, 2, 256, 16)
    kb[:, :, :150], vb[:, :, :150] = k, v
    with poison_empty():
        whole = triton_paged_attention(q, kb[:, :, :150], vb[:, :, :150], selection, page_size=16,
                                       scale=0.25, whole_buffer=True)
        plain = triton_paged_attention(q, k, v, selection, page_size=16, scale=0.25)
    torch.testing.assert_close(whole, plain, rtol=1e-6, atol=1e-6)
    empty = dataclasses.replace(selection, mask=torch.zeros_like(selection.mask))
    with poison_empty():
        zero = triton_paged_attention(q, k, v, empty, page_size=16, scale=0.25)
    assert torch.equal(zero, torch.zeros_like(zero))
    tables = block_tables(selection, heads=4, page_size=16)
    assert [t.dtype for t in tables[:5]] == [torch.int32] * 5
    assert int(tables[0].max()) <= selection.pages.shape[-1]


@needs_interp
def test_runtime_triton_generate_equals_torch_path():
    """``Runtime(decode_kernel="triton")`` (tables on the device, the cache's whole buffer) generates the same
    tokens as the torch reference path, for a left-padded batch, with no fallback."""
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 97, (2, 58), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :21] = 0
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(16) | spattn.TopK("bounds", 1))
    outs = {}
    for kernel in ("torch", "triton"):
        runtime = Runtime(model, plan, block_size=16, min_sparse_tokens=0, monitor_level=0, decode_kernel=kernel)
        try:
            outs[kernel] = runtime.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                            pad_token_id=0, return_dict_in_generate=True, output_logits=True)
            assert not runtime.controller.counts
        finally:
            runtime.detach()
    assert torch.equal(outs["torch"].sequences, outs["triton"].sequences)
    for a, b in zip(outs["torch"].logits, outs["triton"].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_decode_kernel_is_validated():
    with pytest.raises(ValueError, match="decode_kernel"):
        Runtime(tiny_llama(), spattn.Plan(), decode_kernel="cuda")
