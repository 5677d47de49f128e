"""spattn inside transformers, on tiny random models: exactness (dense, padded, sparse, per head), restore."""

import pytest
import torch

import spattn
from spattn.integrations import hf
from spattn.integrations.plan import Plan
from spattn.testing import assert_within
from tests.hf_support import tiny_bert, tiny_llama, transformers


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _window_mask(L, left, causal=True, batch=1, heads=1):
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    allowed = (j >= i - left) & ((j <= i) if causal else (j <= i + left))
    return allowed.expand(batch, heads, L, L)


@pytest.mark.parametrize("backend", ["reference", "dense"])
@pytest.mark.parametrize("L", [1, 63, 130])
def test_llama_full_matches_sdpa(backend, L):
    model = tiny_llama()
    gold_model = tiny_llama().double()
    ids = torch.randint(0, 97, (2, L))
    gold = _logits(gold_model, ids)
    base = _logits(model, ids)
    with hf.patched(model, None, backend=backend, block_size=32):
        assert model.config._attn_implementation == "spattn"
        out = _logits(model, ids)
    assert model.config._attn_implementation == "sdpa"
    assert_within(out, gold, base, what=f"llama L={L} {backend}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_padded_batch(side):
    model = tiny_llama()
    gold_model = tiny_llama().double()
    L, short = 50, 23
    ids = torch.randint(0, 97, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    if side == "right":
        mask[1, short:] = 0
    else:
        mask[1, : L - short] = 0
    gold = _logits(gold_model, ids, mask)
    base = _logits(model, ids, mask)
    with hf.patched(model, None, backend="reference", block_size=16):
        out = _logits(model, ids, mask)
    valid = mask.bool()
    assert_within(out[valid], gold[valid], base[valid], what=f"padded {side}")


def test_llama_window_and_per_head_match_masked_sdpa():
    model = tiny_llama()
    gold_model = tiny_llama().double()
    L = 70
    ids = torch.randint(0, 97, (1, L))
    # a 4D mask goes to SDPA unchanged: an independent oracle for the sparse pattern
    window = _window_mask(L, 5)
    gold = _logits(gold_model, ids, window)
    base = _logits(model, ids, window)
    with hf.patched(model, spattn.Window(5), backend="reference", block_size=16):
        out = _logits(model, ids)
    assert_within(out, gold, base, what="window")
    assert (out - _logits(model, ids)).abs().max() > 1e-3  # the pattern did something

    heads = torch.cat([window[:, :1], torch.ones_like(window[:, :1]).tril(), window[:, :1], window[:, :1]], dim=1)
    gold = _logits(gold_model, ids, heads)
    base = _logits(model, ids, heads)
    per_head = spattn.PerHead([spattn.Window(5), spattn.Full(), spattn.Window(5), spattn.Window(5)])
    plan = Plan(layers={0: per_head, 1: per_head})
    with hf.patched(model, plan, backend="reference", block_size=16):
        out = _logits(model, ids)
    assert_within(out, gold, base, what="per head")


def test_per_layer_plan_changes_only_listed_layers():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 40))
    dense = _logits(model, ids)
    with hf.patched(model, Plan(layers={1: None}, default=None), backend="reference", block_size=16):
        same = _logits(model, ids)
    with hf.patched(model, Plan(layers={1: spattn.Window(2)}), backend="reference", block_size=16):
        changed = _logits(model, ids)
    assert (same - dense).abs().max() < 1e-4
    assert (changed - dense).abs().max() > 1e-3


def test_generate_with_cache_matches_sdpa():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 12))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        with hf.patched(model, None, backend="reference", block_size=8):
            got = model.generate(ids, **kwargs)
    assert torch.equal(expected, got)


def test_bert_padded_matches_sdpa():
    model = tiny_bert()
    gold_model = tiny_bert().double()
    ids = torch.randint(0, 120, (3, 37))
    mask = torch.ones(3, 37, dtype=torch.long)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        gold = gold_model(input_ids=ids, attention_mask=mask).last_hidden_state
        base = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with hf.patched(model, None, backend="reference", block_size=16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert_within(out[valid], gold[valid], base[valid], what="bert padded")


def test_padding_is_exact_under_a_sparse_pattern():
    """A padded sequence under a window pattern gives what it gives alone (right padding keeps positions)."""
    model = tiny_bert()
    ids = torch.randint(0, 120, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad(), hf.patched(model, spattn.Window(3, 3), backend="reference", block_size=16):
        batch = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[1:, :25]).last_hidden_state
    assert (batch[1, :25] - alone[0]).abs().max() < 1e-5


def test_unpatch_restores_and_register_alone_is_dense():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 30))
    before = _logits(model, ids)
    hf.patch(model, spattn.Window(2), backend="reference")
    assert model.config._attn_implementation == "spattn"
    hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_spattn_plan") for m in model.modules())
    assert torch.equal(_logits(model, ids), before)
    hf.unpatch(model)  # no-op on an unpatched model
    # a model switched to "spattn" without a plan computes full attention
    hf.register()
    model.set_attn_implementation("spattn")
    assert (_logits(model, ids) - before).abs().max() < 1e-4


def test_nested_patched_restores_outer_plan():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 30))
    with hf.patched(model, spattn.Window(2), backend="reference", block_size=8):
        outer = _logits(model, ids)
        with hf.patched(model, None, backend="reference"):
            inner = _logits(model, ids)
        again = _logits(model, ids)
    assert torch.equal(outer, again) and not torch.equal(outer, inner)
    assert model.config._attn_implementation == "sdpa"


def test_from_pretrained_with_spattn(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    hf.register()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="spattn").eval()
    assert loaded.config._attn_implementation == "spattn"
    ids = torch.randint(0, 97, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[0, 20:] = 0
    valid = mask.bool()
    assert (_logits(loaded, ids, mask)[valid] - _logits(model, ids, mask)[valid]).abs().max() < 1e-4


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layer"):
        hf.patch(model, Plan(layers={2: spattn.Window(3)}))
    with pytest.raises(ValueError, match="backend"):
        hf.patch(model, None, backend="fast")
    with pytest.raises(ValueError, match="block_size"):
        hf.patch(model, None, block_size=0)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.patch(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="plan"):
        hf.patch(model, "window")
    assert model.config._attn_implementation == "sdpa"
    # a custom 4D mask that is not causal + padding is refused, not silently changed
    ids = torch.randint(0, 97, (1, 20))
    with hf.patched(model, None, backend="reference"), pytest.raises(NotImplementedError, match="mask"):
        _logits(model, ids, _window_mask(20, 3))


def test_padding_segments():
    L = 6
    keep = torch.ones(2, 1, L, L, dtype=torch.bool).tril()
    assert hf.padding_segments(keep, L, L, True) is None
    keep[1, :, :, 4:] = False
    seg = hf.padding_segments(keep.clone(), L, L, True)
    assert seg.tolist() == [[0] * 6, [0, 0, 0, 0, -1, -1]]
    additive = torch.zeros(2, 1, L, L).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert torch.equal(hf.padding_segments(additive, L, L, True), seg)
    with pytest.raises(ValueError, match="4D"):
        hf.padding_segments(torch.ones(2, L, dtype=torch.bool), L, L, True)


def test_model_sliding_window_is_kept():
    """A Mistral-style model's own sliding window (with and without padding) matches SDPA."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=8, attn_implementation="sdpa",
    )
    model = transformers.MistralForCausalLM(config).eval()
    gold_model = transformers.MistralForCausalLM(config).eval()
    gold_model.load_state_dict(model.state_dict())
    gold_model = gold_model.double()
    ids = torch.randint(0, 97, (2, 45))
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, 30:] = 0
    valid = mask.bool()
    for m in (None, mask):
        gold = _logits(gold_model, ids, m)
        base = _logits(model, ids, m)
        with hf.patched(model, None, backend="reference", block_size=16):
            out = _logits(model, ids, m)
        sel = valid if m is not None else torch.ones_like(valid)
        assert_within(out[sel], gold[sel], base[sel], what=f"mistral sliding window, mask={m is not None}")
    # the window matters at this length: without it the same weights give other logits
    windowed = _logits(model, ids)
    model.config.sliding_window = None
    with hf.patched(model, None, backend="reference", block_size=16):
        assert (_logits(model, ids) - windowed).abs().max() > 1e-3
