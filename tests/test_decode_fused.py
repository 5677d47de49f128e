"""The fused decode page selection (``spattn.ops.decode.select_pages``, TRITON_INTERPRET=1 on CPU) against its
oracle, the runtime's torch selection (``select_from_row`` + ``block_tables``): equal tables (counts, page
indices, row 0 of every used mask tile, unused tiles zeroed) on awkward shapes -- budget 0, budget >= pages,
left padding of different lengths in a batch, GQA groups of 1 / 3, head dims 64 / 80, a capacity past the
query -- under NaN-poisoned scratch and garbage-filled tiles; the dense tables (split-K kernel over exactly the
valid keys) against the float64 dense oracle; and the static decode step with both equal to the torch paths.

The interpreter must be set before triton is imported (Note [interpreter in one process] in
``test_triton_kernels.py``); if another module imported triton first, the cases re-run in a subprocess.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
pytest.importorskip("transformers")

import spattn  # noqa: E402
from spattn.ops.decode import api as fused_api  # noqa: E402
from spattn.ops.decode import select_pages  # noqa: E402
from spattn.runtime import Runtime  # noqa: E402
from spattn.runtime.decode import DecodePlan, block_tables, select_from_row, static_rows  # noqa: E402
from spattn.runtime.fused import dense_tables, partial_page_bound, selection_of, tables_attention  # noqa: E402
from spattn.selectors.common import pool  # noqa: E402
from spattn.testing import assert_within, dense_attention, plain_attention, poison_empty  # noqa: E402
from tests.test_triton_kernels import IN_PROCESS, interpreter_subprocess  # noqa: E402 - the interpreter setup, in one place

from .hf_support import tiny_llama  # noqa: E402

needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see subprocess")


test_interpreter_subprocess = interpreter_subprocess(__file__, timeout=600)


def _case(B, H, Hkv, D, S, C, P0, padding, budget, seed=0, ties=False):
    """Query, page bounds of random keys (``ties``: one key repeated, so every full page scores the same), the
    static rows of ``Sinks(3) | Window(2S)``, the valid mask of a left-padded batch whose query is at slot ``P0``
    of a capacity-``C`` cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    keys = torch.randn(B, Hkv, C, D, generator=g)
    if ties:
        keys = keys[:, :, :1].expand(B, Hkv, C, D).clone()
    keys[:, :, P0 + 1:] = 0  # the unfilled cache (its stale page bounds are masked by valid)
    valid = torch.zeros(B, C, dtype=torch.bool)
    valid[:, : P0 + 1] = True
    for b, o in enumerate(padding):
        valid[b, :o] = False
    plan = DecodePlan(static=spattn.Sinks(3) | spattn.Window(2 * S), rule="top_k", blocks=budget)
    rows, pages = static_rows(plan, C, range(P0 + 1, P0 + 3), batch=B, heads=H, page_size=S, device="cpu",
                              group=H // Hkv, offsets=list(padding) if any(padding) else None)
    return q, keys, valid, plan, rows, pages


CASES = [
    # B, H, Hkv, D, S, C, P0 (query slot), left padding, budget[, ties]
    pytest.param(3, 6, 2, 64, 16, 16 * 13, 170, (0, 37, 100), 3, id="B3-G3-D64-ragged"),
    pytest.param(2, 4, 4, 80, 16, 16 * 9, 120, (0, 5), 2, id="B2-mha-D80-tail"),
    pytest.param(1, 6, 2, 64, 32, 32 * 5, 140, (0,), 0, id="B1-budget0"),
    pytest.param(2, 6, 2, 64, 16, 16 * 8, 95, (0, 17), 50, id="B2-budget-covers-all"),
    # 70 pages: three programs of the page-parallel launch (the last one ragged), 45 slots: two mask chunks
    pytest.param(2, 6, 2, 64, 16, 16 * 70, 1000, (0, 300), 40, id="B2-70pages-3chunks-W45"),
    pytest.param(1, 3, 1, 64, 16, 16 * 40, 600, (0,), 4, True, id="B1-G3-ties-to-lower-page"),
]


@needs_interp
@pytest.mark.parametrize("B, H, Hkv, D, S, C, P0, padding, budget, ties",
                         [pytest.param(*c.values, *((False,) if len(c.values) == 9 else ()), id=c.id) for c in CASES])
def test_fused_selection_equals_torch_selection(B, H, Hkv, D, S, C, P0, padding, budget, ties):
    q, keys, valid, plan, rows, pages = _case(B, H, Hkv, D, S, C, P0, padding, budget, ties=ties)
    kmin, kmax = pool(keys, S, "amin"), pool(keys, S, "amax")
    NP = C // S
    slot = torch.tensor([P0])
    width = min(NP, pages + budget + 1)
    sizes = (slot + 1 - torch.arange(NP) * S).clamp(1, S)
    scale = D ** -0.5
    for step, b in ((0, budget), (1, max(budget - 1, 0))):  # a second call: nothing stale from the first
        bud = torch.tensor([b])
        row = rows[min(step, rows.shape[0] - 1)]
        valid_step = valid.clone()
        valid_step[:, P0 + step] = True if P0 + step < C else False
        ref_sel = select_from_row(q, valid_step, plan, bud, row, width, kv_heads=Hkv, page_size=S, scale=scale,
                                  key_min=kmin, key_max=kmax, page_sizes=(sizes + step).clamp(1, S))
        ref = [t.clone() for t in block_tables(ref_sel, heads=H, page_size=S)]
        masks = torch.full((B * Hkv * width, S, S), 7, dtype=torch.uint8)
        fused_api._SCRATCH.clear()
        with poison_empty():
            out = select_pages(q, kmin, kmax, rows, torch.tensor([step]), valid_step, slot + step, bud, masks,
                               width=width, scale=scale)
        assert torch.equal(out.kv_num, ref[0]), (out.kv_num.flatten(), ref[0].flatten())
        assert torch.equal(out.kv_idx, ref[1])
        assert torch.equal(out.masks[:, 0], ref[5][:, 0])
        assert bool((out.masks[:, 1:] == 7).all())  # rows 1.. are never written (never read for one query)
        assert torch.equal(out.stats[..., 2].long(), ref_sel.selected)
        assert torch.equal(out.stats[..., 0].long(), ref_sel.mask.view(B, Hkv, H // Hkv, -1)[:, :, 0].sum(-1))
        back = selection_of(out, heads=H, page_size=S)
        assert torch.equal(back.pages, ref_sel.pages) and torch.equal(back.mask, ref_sel.mask)
        # the safeguards are always visited: every valid sink / window token is in the mask
        kept = (row.expand(B, 1, C) & valid_step[:, None])[:, 0]                     # [B, C]
        tokens = (back.pages.clamp_min(0)[..., None] * S + torch.arange(S)).flatten(2)[:, 0]
        covered = torch.zeros(B, C + S, dtype=torch.bool).scatter(1, torch.where(back.mask[:, 0], tokens, C),
                                                                  back.mask[:, 0])[:, :C]
        assert bool((covered | ~kept).all())


@needs_interp
def test_fused_selection_rejects_bad_input():
    q, keys, valid, plan, rows, pages = _case(1, 2, 2, 16, 16, 64, 40, (0,), 1)
    kmin, kmax = pool(keys, 16, "amin"), pool(keys, 16, "amax")
    masks = torch.zeros(8, 16, 16, dtype=torch.uint8)
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="width"):
        select_pages(q, kmin, kmax, rows, one, valid, one, one, masks, width=0, scale=0.25)
    with pytest.raises(ValueError, match="budget"):
        select_pages(q, kmin, kmax, rows, one, valid, one, torch.tensor([1.0]), masks, width=2, scale=0.25)
    with pytest.raises(ValueError, match="masks"):
        select_pages(q, kmin, kmax, rows, one, valid, one, one, masks[:1], width=4, scale=0.25)
    with pytest.raises(ValueError, match="rows"):
        select_pages(q, kmin, kmax, rows.expand(-1, -1, 2, -1), one, valid, one, one, masks, width=2, scale=0.25)


@needs_interp
def test_dense_tables_equal_the_dense_oracle():
    """The split-K kernel on :func:`dense_tables` attends exactly the valid keys (left padding, a page being
    filled, a capacity past the query); a row with no valid key gives 0."""
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, D, S, C = 3, 4, 2, 16, 16, 16 * 7
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, Hkv, C, D, generator=g)
    v = torch.randn(B, Hkv, C, D, generator=g)
    prompt = torch.ones(B, 50, dtype=torch.bool)
    prompt[1, :21] = False
    prompt[2, :] = False
    valid = torch.zeros(B, C, dtype=torch.bool)
    valid[:, :50] = prompt
    valid[:, 50:61] = True
    valid[2] = False
    width = partial_page_bound(prompt, S)
    assert width == 3  # the page padding cuts, the page holding slot 50, the page being filled
    with poison_empty():
        tables = dense_tables(valid, page_size=S, partial_width=width)
        out = tables_attention(q, k, v, tables, scale=0.25, grouped=False)
    allowed = valid[:, None, None, :].expand(B, H, 1, C)
    golden, _ = dense_attention(q[:2], k[:2], v[:2], allowed[:2], 0.25)
    baseline, _ = plain_attention(q[:2], k[:2], v[:2], allowed[:2], 0.25)
    assert_within(out[:2], golden, baseline, what="split-K decode over the dense tables")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@needs_interp
def test_static_step_fused_and_kernel_dense_equal_torch_paths():
    """``Runtime(cuda_graph=True, decode_selection="fused", dense_decode="kernel")`` with the fused static cache
    append (the static step eagerly on CPU) generates the tokens and logits of the torch selection with SDPA and
    the torch cache ops, for a left-padded batch with a dense layer, with no fallback."""
    model = tiny_llama(seed=2)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 97, (2, 45), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    pattern = spattn.Sinks(4) | spattn.Window(16) | spattn.TopK("bounds", 2)
    plan = spattn.Plan({0: pattern})  # layer 1 dense
    outs = {}
    for name, opts in (("torch", dict(decode_selection="torch", dense_decode="sdpa")),
                       ("fused", dict(decode_selection="fused", dense_decode="kernel"))):
        runtime = Runtime(model, plan, block_size=16, min_sparse_tokens=0, monitor_level=1, cuda_graph=True, **opts)
        cache = runtime.new_cache()
        for layer in cache.layers:  # the fused variant also writes the cache with the one-launch static append
            layer.fused_append = name == "fused"
        try:
            seq = runtime.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, output_logits=True,
                                   past_key_values=cache)
            outs[name] = (seq, runtime.decoder.logits, runtime.decoder.paths)
            assert not runtime.controller.counts
        finally:
            runtime.detach()
    assert outs["torch"][2] == {0: "torch", 1: "dense-sdpa"}
    assert outs["fused"][2] == {0: "fused", 1: "dense-kernel"}
    assert torch.equal(outs["torch"][0], outs["fused"][0])
    for a, b in zip(outs["torch"][1], outs["fused"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_failing_fused_selection_hands_over_to_the_torch_selection(monkeypatch):
    """The fused selection raising (e.g. no triton compiler) switches it off for good, logged, and the step
    runs the torch selection: the tokens of ``decode_selection="torch"``, no dense fallback."""
    from spattn.runtime import engine

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    model = tiny_llama(seed=3)
    ids = torch.randint(3, 97, (1, 50), generator=torch.Generator().manual_seed(8))
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(16) | spattn.TopK("bounds", 1))
    outs = {}
    for name in ("torch", "fused"):
        if name == "fused":
            monkeypatch.setattr(engine, "fused_tables", broken)
        runtime = Runtime(model, plan, block_size=16, min_sparse_tokens=0, monitor_level=0, cuda_graph=True,
                          decode_selection=name, dense_decode="sdpa", decode_kernel="torch" if name == "torch"
                          else "auto")
        try:
            outs[name] = runtime.generate(ids, max_new_tokens=3, pad_token_id=0)
            assert not runtime.controller.counts
            assert runtime.decoder.paths == {0: "torch", 1: "torch"}
            assert (runtime.fused_off is None) == (name == "torch")
        finally:
            runtime.detach()
    assert torch.equal(outs["torch"], outs["fused"])


def test_selection_options_are_validated():
    with pytest.raises(ValueError, match="decode_selection"):
        Runtime(tiny_llama(), spattn.Plan(), decode_selection="gpu")
    with pytest.raises(ValueError, match="dense_decode"):
        Runtime(tiny_llama(), spattn.Plan(), dense_decode="flash")


@needs_interp
def test_flag_nonfinite_equals_the_torch_check():
    """One launch computes ``flags[i] |= ~isfinite(out).all() & isfinite(query).all()``: NaN or inf anywhere in
    a multi-block output sets the flag, a non-finite query (an earlier layer's fault) does not, a set flag stays
    set and the other flags are untouched."""
    from spattn.ops.decode import flag_nonfinite

    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 3, 1, 16, generator=g)
    for fault, in_query, before in (("none", False, False), ("nan", False, False), ("inf", False, False),
                                    ("-inf", False, False), ("nan", True, False), ("none", False, True)):
        out = torch.randn(3, 5, 1, 100, generator=g)  # 1500 elements: two blocks of the kernel
        q = query.clone()
        if fault != "none":
            out.view(-1)[1400] = float(fault)
        if in_query:
            q.view(-1)[7] = float("nan")
        flags = torch.zeros(4, dtype=torch.bool)
        flags[2] = before
        expected = flags.clone()
        expected[2:3].logical_or_((~torch.isfinite(out).all() & torch.isfinite(q).all()).view(1))
        flag_nonfinite(out, q, flags, 2)
        assert torch.equal(flags, expected), (fault, in_query, before, flags)
    with pytest.raises(ValueError, match="index"):
        flag_nonfinite(out, q, flags, 4)
    with pytest.raises(ValueError, match="flags"):
        flag_nonfinite(out, q, flags.int(), 0)


@needs_interp
def test_a_nan_from_the_fused_path_is_flagged_and_rerun_dense(monkeypatch):
    """The fused path's one-launch check flags a NaN output of layer 0 at every static step: each step is rerun
    with layer 0 dense (counted per step), layer 1 stays on the fused selection, and the tokens are dense
    attention's (the window covers every token, so the sparse plan computes dense attention)."""
    from spattn.runtime import engine

    model = tiny_llama(seed=3)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(9))
    pattern = spattn.Sinks(4) | spattn.Window(64) | spattn.TopK("bounds", 1)
    new = 3
    reference = Runtime(model, spattn.Plan(), block_size=16, min_sparse_tokens=0, monitor_level=0,
                        cuda_graph=True, decode_selection="torch", dense_decode="sdpa")
    try:
        expected = reference.generate(ids, max_new_tokens=new, pad_token_id=0)
    finally:
        reference.detach()
    original = engine.tables_attention
    layer = {"index": -1}

    def nan_on_layer_0(query, key, value, tables, **kwargs):
        out = original(query, key, value, tables, **kwargs)
        return out * float("nan") if layer["index"] == 0 and kwargs.get("grouped") else out

    monkeypatch.setattr(engine, "tables_attention", nan_on_layer_0)
    runtime = Runtime(model, spattn.Plan.uniform(pattern), block_size=16, min_sparse_tokens=0, monitor_level=0,
                      cuda_graph=True, decode_selection="fused", dense_decode="sdpa")
    attend = runtime.attend

    def which_layer(module, *args, **kwargs):
        layer["index"] = module.layer_idx
        return attend(module, *args, **kwargs)

    runtime.attend = which_layer
    try:
        out = runtime.generate(ids, max_new_tokens=new, pad_token_id=0)
    finally:
        runtime.detach()
    counts = runtime.controller.counts
    assert counts[("fallback", 0, "nonfinite")] == new - 1 and counts.get(("fallback", 1, "nonfinite"), 0) == 0
    assert runtime.decoder.paths[1] == "fused" and runtime.fused_off is None
    assert torch.equal(out, expected)


@needs_interp
@pytest.mark.parametrize("Hkv, D, Dv", [(3, 64, 64), (2, 80, 48)], ids=["gqa-D64", "D80-Dv48"])
def test_fused_static_append_equals_the_torch_ops(Hkv, D, Dv):
    """``append_static`` (one launch) writes what ``PagedLayer``'s torch ops write in static decode, bit for bit:
    keys, values and page min / max over steps that fill a page, start the next one (its bounds reset to the
    key) and continue it; a wrong dtype is refused."""
    from spattn.runtime.cache import PagedLayer

    g = torch.Generator().manual_seed(5)
    S, P0, B = 16, 29, 2
    k0, v0 = torch.randn(B, Hkv, P0, D, generator=g), torch.randn(B, Hkv, P0, Dv, generator=g)
    layers = {}
    for name in ("torch", "fused"):
        layer = PagedLayer(S, reserve=4 * S)
        layer.fused_append = name == "fused"
        layer.update(k0.clone(), v0.clone())
        slot = torch.tensor([P0])
        layer.start_static(slot)
        layers[name] = (layer, slot)
    for _ in range(6):  # slots 29..34: page 1 filled at 31, page 2 started at 32
        k1, v1 = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, Dv, generator=g)
        for layer, slot in layers.values():
            layer.update(k1, v1)
            slot += 1
    (a, _), (b, _) = layers["torch"], layers["fused"]
    for name in ("_keys", "_values"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("_min", "_max"):  # pages 0..2 hold tokens (page 3 is unwritten memory in both)
        assert torch.equal(getattr(a, name)[:, :, :3], getattr(b, name)[:, :, :3]), name
    assert torch.equal(b._min[:, :, 2], b._keys[:, :, 32:35].amin(2))  # the new page's bounds: its keys only
    from spattn.ops.decode import append_static

    with pytest.raises(ValueError, match="dtype"):
        append_static(k1.double(), v1, b._keys, b._values, b._min, b._max, layers["fused"][1], page_size=S)
