"""Selection that accounts for what the safeguards keep: partly kept blocks, key budgets, adaptive heads."""

import dataclasses

import pytest
import torch

import spattn
from spattn.patterns.compile import brute_force_mask
from spattn.selectors import Adaptive, TopK, TopP, diagnose

BS = 32


def _compile(pattern, q, k, bs=BS):
    layout = spattn.compile(pattern, q.shape[2], k.shape[2], causal=True, block_size=bs, batch=q.shape[0],
                            heads=q.shape[1], query=q, key=k)
    return layout, layout.to_dense().expand(q.shape[0], q.shape[1], -1, -1)


def _planted(L=256, H=2, D=16, before=8, seed=0):
    """Queries of the last block look at the keys just before their window (which is ``before`` wide)."""
    g = torch.Generator().manual_seed(seed)
    q = 0.2 * torch.randn(1, H, L, D, generator=g)
    k = 0.2 * torch.randn(1, H, L, D, generator=g)
    u = torch.zeros(D)
    u[0] = 4.0
    q[:, :, L - BS:] += u
    k[:, :, L - 2 * BS:L - BS - before] += u  # block nq - 2 minus the part the window holds
    return q, k


@pytest.mark.parametrize("rule", ["topk", "topp", "adaptive"])
def test_partly_kept_block_is_selectable_and_then_kept_whole(rule):
    q, k = _planted()
    window = spattn.Window(BS // 2)  # holds part of the block just before each query block
    dyn = {"topk": TopK("pooled", 1), "topp": TopP("pooled", 0.6),
           "adaptive": Adaptive("pooled", 16, block=BS)}[rule]
    layout, mask = _compile(spattn.Sinks(4) | window | dyn, q, k)
    nq = layout.num_q_blocks
    before = torch.zeros(1, 1, 256, 256, dtype=torch.bool)
    assert brute_force_mask(window, 256, causal=True)[..., -1, (nq - 2) * BS:].any()  # the window holds part
    # the block just before the last query block was chosen: every query of that block sees all of it
    assert mask[..., (nq - 1) * BS:, (nq - 2) * BS:(nq - 1) * BS].all()
    assert (layout.block_status()[..., nq - 1, nq - 2] == spattn.patterns.FULL).all()
    del before


def test_finer_selection_block_finds_mass_just_before_the_window_and_compiles_exactly():
    q, k = _planted(before=0)
    safe = spattn.Sinks(4) | spattn.Window(8)
    for sel in ("probe", "pooled"):
        pattern = safe | TopK(sel, 2, block=16)
        layout, mask = _compile(pattern, q, k)
        nq = layout.num_q_blocks
        assert mask[..., (nq - 1) * BS:, (nq - 2) * BS:(nq - 1) * BS].all(), sel
        # the compiled token mask equals the pattern's own predicate (signature of 16-token cells)
        want = brute_force_mask(pattern, 256, causal=True, block_size=BS, batch=1, heads=2, query=q, key=k)
        assert torch.equal(mask, want.expand_as(mask)), sel
        # cells of 16 keys: the last query block's queries read 2 * 16 selected keys beyond the safeguards
        sel_only = mask & ~brute_force_mask(safe, 256, causal=True)
        per_cell = sel_only[..., (nq - 1) * BS:, :].sum(-1)
        assert per_cell.max() <= 2 * 16


def test_diagonal_cell_is_not_paid_for_when_the_window_covers_it():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    layout, _ = _compile(spattn.Window(40) | TopK("probe", 1, block=16), q, k)
    sel = layout.info["selected_blocks"]
    assert (sel <= 1).all()
    chosen = spattn.compile(TopK("probe", 1, block=16), 256, causal=True, block_size=BS, batch=1, heads=2,
                            query=q, key=k)
    assert chosen.allowed_pairs().sum() > 0


@pytest.mark.parametrize("block", [32, 16])
@pytest.mark.parametrize("keys", [40, 96])
def test_measured_keys_per_query_match_the_budget_within_one_block(block, keys):
    torch.manual_seed(2)
    L = 320
    q, k = torch.randn(1, 4, L, 16) * 1.5, torch.randn(1, 2, L, 16) * 1.5
    for selector in ("probe", "pooled"):
        layout, mask = _compile(Adaptive(selector, keys, sinks=4, window=20, block=block), q, k)
        measured = float(layout.allowed_pairs().mean()) / L  # token-exact, sinks and window included
        assert abs(measured - keys) <= block, selector
        assert abs(float(layout.info["estimated_keys_per_head"].mean()) - measured) < 1e-3
        assert (mask >= brute_force_mask(spattn.Sinks(4) | spattn.Window(20), L, causal=True)).all()
    # a union's safeguards held whole by blocks: the selection adds its own keys on top of them
    layout, _ = _compile(spattn.Sinks(BS) | Adaptive("probe", keys, block=block, sharing="head"), q, k)
    added = float(layout.allowed_pairs().mean() - spattn.compile(spattn.Sinks(BS), L, causal=True,
                                                                  block_size=BS).allowed_pairs().mean()) / L
    assert abs(added - keys) <= block


def test_per_head_budgets_follow_the_mass_and_average_to_the_global_budget():
    torch.manual_seed(3)
    L, D = 512, 16
    q, k = 0.2 * torch.randn(1, 2, L, D), 0.2 * torch.randn(1, 2, L, D)
    # head 0 is a sink head: the safeguards already hold its mass
    s = torch.zeros(D)
    s[2] = 6.0
    q[0, 0] += s
    k[0, 0, :4] += s
    # head 1 retrieves: every query looks at a few far blocks
    u = torch.zeros(D)
    u[5] = 4.0
    q[0, 1] += u
    k[0, 1, 64:96] += u
    k[0, 1, 200:232] += u
    layout, _ = _compile(Adaptive("probe", 24 + 37, sinks=4, window=32, block=32, sharing="head"), q, k)
    est = layout.info["estimated_keys_per_head"][0] - 37  # beyond the sinks and window (about 37 keys)
    assert abs(float(est.mean()) - 24) <= 32
    assert est[1] > 4 * est[0]  # the retrieving head spends most of the budget
    recall = spattn.coverage.measure(q, k, layout, causal=True, topk=0).per_head()
    window = spattn.coverage.measure(q, k, spattn.Sinks(4) | spattn.Window(80), causal=True, topk=0,
                                     block_size=BS).per_head()
    assert recall[1] > window[1]


def test_diagnose_matches_measure_and_splits_the_missed_mass():
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 1, 300, 16)
    pattern = Adaptive("probe", 80, sinks=8, window=32, block=16)
    baseline = spattn.Sinks(8) | spattn.Window(72)
    d = diagnose(q, k, pattern, baseline, block_size=BS, sinks=8, local=64, chunk=64)
    for p, recall, keys in ((pattern, d.recall, d.keys), (baseline, d.baseline_recall, d.baseline_keys)):
        layout = spattn.compile(p, 300, causal=True, block_size=BS, batch=1, heads=2, query=q, key=k)
        want = spattn.coverage.measure(q, k, layout, causal=True, topk=0).per_head()
        torch.testing.assert_close(recall[0], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(keys[0], layout.allowed_pairs()[0].expand(2) / 300)
    total = sum(d.missed[r] for r in ("sinks", "local", "far"))
    torch.testing.assert_close(total, 1 - d.recall, atol=1e-5, rtol=0)
    assert (d.baseline_missed["sinks"].abs() < 1e-6).all()  # the baseline keeps every sink
    assert "head" in d.table() and set(d.to_dict()["mean"]) >= {"recall", "keys", "missed_far"}


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="block"):
        TopK("pooled", 1, block=0)
    with pytest.raises(ValueError, match="keys"):
        Adaptive("probe", -1)
    with pytest.raises(ValueError, match="window"):
        Adaptive("probe", 10, window=-2)
    with pytest.raises(ValueError, match="queries"):
        spattn.selectors.get_selector("probe", queries=0)
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="divide"):
        spattn.compile(TopK("pooled", 1, block=24), 64, causal=True, block_size=32, query=q, key=q)
    p = spattn.Sinks(4) | Adaptive("probe", 100, sinks=2, window=9, options={"queries": 2}, block=16)
    assert spattn.pattern_from_dict(p.to_dict()) == p


def test_adaptive_own_sinks_and_window_are_compiled_once_for_all_calls():
    from spattn.selectors import patterns as selection_patterns

    pattern = Adaptive("probe", 48, sinks=8, window=16, block=16)
    layouts = []
    for seed in (0, 1):
        q, k = _planted(seed=seed)
        selection_patterns._LOCAL_CACHE.clear()
        fresh, _ = _compile(pattern, q, k)
        entry = dict(selection_patterns._LOCAL_CACHE)
        cached, _ = _compile(pattern, q, k)  # from the process-wide cache
        assert dict(selection_patterns._LOCAL_CACHE) == entry  # reused, not rebuilt
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "kv_mask_ids"):
            assert torch.equal(getattr(fresh, name), getattr(cached, name)), name
        assert torch.equal(fresh.masks, cached.masks)
        layouts.append(cached)
    assert not torch.equal(layouts[0].to_dense(), layouts[1].to_dense())  # the selection itself is not cached


def test_layout_hook_counts_the_keys_a_patched_model_really_kept():
    from spattn.integrations.hf import hook, layout_hook, patched
    from tests.hf_support import tiny_llama

    model = tiny_llama()
    pattern = Adaptive("probe", 40, sinks=4, window=8, block=16)
    seen, compiled = {}, {}

    def on_query(module, layer, query, key):
        lay = spattn.compile(pattern, query.shape[2], key.shape[2], causal=True, block_size=BS,
                             batch=query.shape[0], heads=query.shape[1], query=query, key=key)
        compiled[layer] = lay.allowed_pairs()

    def on_layout(module, layer, layout):
        seen[layer] = layout.allowed_pairs()

    ids = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), patched(model, pattern, backend="reference", block_size=BS), hook(on_query), \
            layout_hook(on_layout):
        model(input_ids=ids)
    assert sorted(seen) == sorted(compiled) == [0, 1]
    for layer in seen:
        assert torch.equal(seen[layer], compiled[layer])
        assert abs(float(seen[layer].float().mean()) / 160 - 40) <= 16  # the stated budget within one cell


def test_layer_budgets_average_to_the_global_budget_and_feed_the_layer_that_misses_most():
    from spattn.selectors import layer_budgets

    q_local, k_local = _planted(before=8, seed=2)  # layer 0: the planted mass sits outside the window
    g = torch.Generator().manual_seed(3)
    q_flat = 0.01 * torch.randn(1, 2, 256, 16, generator=g)  # layer 1: nearly uniform, little to gain anywhere
    k_flat = 0.01 * torch.randn(1, 2, 256, 16, generator=g)
    pattern = Adaptive("probe", 64, sinks=4, window=16, block=16, sharing="head")
    split = layer_budgets(pattern, {0: q_local, 1: q_flat}, {0: k_local, 1: k_flat}, block_size=BS)
    assert set(split) == {0, 1}
    assert abs(sum(split.values()) / 2 - 64) <= 16  # the mean meets the budget within one cell
    local = float(pattern.own_pairs(spattn.patterns.base.Context(256, 256, BS, torch.device("cpu"), True))) / 256
    assert min(split.values()) >= round(local)
    # the planted layer's far mass is worth more per key than a flat layer's: it gets the larger share, and with
    # its share the planted block is chosen
    assert split[0] > split[1]
    layout, mask = _compile(dataclasses.replace(pattern, keys=split[0]), q_local, k_local)
    assert mask[0, :, -1, 256 - 2 * BS:256 - BS - 8].all()
    with pytest.raises(ValueError, match="same"):
        layer_budgets(pattern, {0: q_local}, {1: k_local})
    with pytest.raises(TypeError, match="Adaptive"):
        layer_budgets(TopK("pooled", 1), {0: q_local}, {0: k_local})
