"""spattn.eval.train: the small trainers learn, and the attention inside them is the pattern asked for."""

import pytest
import torch

import spattn
from spattn.eval import stats
from spattn.eval.tasks import listops
from spattn.eval.train import Learned, TinyTransformer, TrainConfig, listops_config, mqar_config, sweep, train
from spattn.learned import LearnedTopK


def test_tiny_mqar_dense_beats_a_short_window():
    config = mqar_config("tiny", steps=120)
    dense = train(config, None)
    window = train(config, spattn.Window(1))
    verdict = stats.compare(dense.per_example, window.per_example)
    assert verdict.winner == "a", (str(dense.accuracy), str(window.accuracy))
    assert dense.losses[-1] < dense.losses[0]
    # a window of one key cannot reach the pairs: about chance among the 16 values
    assert window.accuracy.value < 0.15
    assert dense.accuracy.low <= dense.accuracy.value <= dense.accuracy.high


def test_model_attention_is_the_pattern():
    torch.manual_seed(0)
    ids = torch.randint(1, 32, (2, 24))
    full = TinyTransformer(32, 24, d_model=16, layers=2, plan=None, block_size=8)
    wide = TinyTransformer(32, 24, d_model=16, layers=2, plan=spattn.Window(23), block_size=8)
    wide.load_state_dict(full.state_dict())
    assert torch.allclose(full(ids), wide(ids), atol=1e-5)  # a window over everything is dense
    local = TinyTransformer(32, 24, d_model=16, layers=1, plan=spattn.Window(2), block_size=8)
    local.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.1")})
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] % 31) + 1
    # one layer of Window(2): positions >= 3 cannot see position 0, positions <= 2 can
    out, out_changed = local(ids), local(changed)
    assert torch.allclose(out[:, 3:], out_changed[:, 3:], atol=1e-6)
    assert not torch.allclose(out[:, :3], out_changed[:, :3], atol=1e-6)
    with pytest.raises(ValueError, match="layer"):
        TinyTransformer(32, 24, layers=2, plan=spattn.Plan(layers={5: None}))


def test_classifier_ignores_padding_and_trains_with_a_dynamic_pattern():
    inputs, _ = listops(3, min_length=10, max_length=40, max_depth=3, max_args=4, seed=0)
    pattern = spattn.Window(4, 4) | spattn.TopK("pooled", 1)
    model = TinyTransformer(16, 64, d_model=16, heads=2, mlp=True, plan=pattern, causal=False, num_classes=10,
                            block_size=8).eval()
    longer = torch.cat([inputs, torch.zeros(3, 24, dtype=torch.long)], dim=1)  # more padding on the right
    assert torch.allclose(model(inputs), model(longer), atol=1e-5)
    config = listops_config("tiny", steps=8, train_examples=64, test_examples=16, block_size=8)
    result = train(config, pattern)
    assert len(result.per_example) == 16 and 0 <= result.accuracy.value <= 1
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.plan == spattn.Plan.uniform(pattern).to_dict()


def test_sweep_keeps_the_best_learning_rate():
    config = mqar_config("tiny", steps=10, train_examples=320, test_examples=40)
    result = sweep(config, spattn.Window(4), learning_rates=(1e-2, 1e-4), seeds=(0, 1))
    assert len(result.runs) == 4 and len(result.best_runs()) == 2
    values = {float(rate): entry["value"] for rate, entry in result.by_learning_rate.items()}
    assert result.best_learning_rate == max(values, key=values.get)
    assert result.accuracy.n == 2  # the interval is over seeds (then examples)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="copying")


def _copy_shared(source, target):
    """Load ``source``'s weights into ``target`` (the router's gate parameters stay as initialised)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(".pattern." in name for name in missing)


@pytest.mark.parametrize("training", [True, False], ids=["straight-through", "eval"])
def test_learned_attention_is_its_layout(training):
    torch.manual_seed(0)
    ids = torch.randint(1, 32, (2, 24))
    dense = TinyTransformer(32, 24, d_model=16, layers=2, plan=None, block_size=8)
    window = TinyTransformer(32, 24, d_model=16, layers=2, plan=spattn.Window(2), block_size=8)
    window.load_state_dict(dense.state_dict())
    everything = TinyTransformer(32, 24, d_model=16, layers=2, plan=Learned(99), block_size=8)
    guarded = TinyTransformer(32, 24, d_model=16, layers=2, plan=Learned(0, safeguard=spattn.Window(2)),
                              block_size=8)
    for model in (everything, guarded):
        _copy_shared(dense, model)
        assert all(isinstance(b.pattern, LearnedTopK) for b in model.blocks)
        model.train(training)
    with torch.set_grad_enabled(training):
        # every visible block routed == dense; nothing routed == the safeguard alone
        torch.testing.assert_close(everything(ids), dense(ids), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guarded(ids), window(ids), atol=1e-5, rtol=1e-4)


def test_learned_attention_trains_its_router_and_holds_padding():
    config = mqar_config("tiny", steps=6, train_examples=96, test_examples=16)
    spec = Learned(1, safeguard=spattn.Window(8), temperature_end=0.2)
    result = train(config, spec)
    assert result.plan["learned"]["safeguard"] == spattn.Window(8).to_dict()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # the routers' collapse metrics after training, on the first test batch: at block 8 with Window(4) only the
    # last of the 3 query blocks has a block to route (block 0), so 1/3 of a block per query block
    routed = train(config.replace(block_size=8), Learned(1, safeguard=spattn.Window(4))).selection
    assert set(routed) >= {"distinct_blocks", "usage_entropy", "gate_entropy", "selected_per_row"}
    assert routed["selected_per_row"] == pytest.approx(1 / 3) and 0 <= routed["gate_entropy"] <= 1
    assert result.to_dict()["selection"] == result.selection and train(config, spattn.Window(8)).selection == {}
    model = TinyTransformer(32, 24, d_model=16, layers=1, plan=Learned(1, local=1), block_size=8)  # 2 choices
    ids = torch.randint(1, 32, (2, 24))
    model(ids).square().mean().backward()  # straight-through: the task loss reaches the gate
    assert model.blocks[0].pattern.gate.query_proj.grad.abs().sum() > 0
    # ListOps with learned attention: padded positions carry no content (the padding embedding is irrelevant)
    inputs, _ = listops(3, min_length=10, max_length=40, max_depth=3, max_args=4, seed=0)
    classifier = TinyTransformer(16, 64, d_model=16, heads=2, mlp=True, plan=Learned(1, safeguard=spattn.Window(4, 4)),
                                 causal=False, num_classes=10, block_size=8).eval()
    before = classifier(inputs)
    with torch.no_grad():
        classifier.embed.weight[0].normal_()
        classifier.position.weight[inputs.shape[1] - 1].normal_()
    assert (inputs[:, -1] == 0).any()
    torch.testing.assert_close(classifier(inputs), before, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="blocks"):
        Learned(-1)


@pytest.mark.parametrize("pattern", [spattn.Sinks(3) | spattn.Window(5, 5),
                                     spattn.Window(4, 4) | spattn.TopK("pooled", 1)], ids=["static", "dynamic"])
def test_padding_removed_on_the_device_is_the_document_pattern(pattern):
    # the model's layout for a right-padded batch: the pairs of `pattern & Document(pad -> -1)` for every real query
    torch.manual_seed(0)
    B, H, L, D, bs = 3, 2, 40, 8, 8
    model = TinyTransformer(16, L, d_model=H * D, heads=H, plan=pattern, causal=False, num_classes=10, block_size=bs)
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    lengths = torch.tensor([40, 17, 9])  # full, mid-block, a block and one token (whole blocks padded)
    got = model.layout_for(0, q, k, lengths).to_dense()
    segments = torch.where(torch.arange(L)[None, :] < lengths[:, None], 0, -1)
    want = spattn.compile(pattern & spattn.patterns.Document(segments), L, block_size=bs, batch=B, heads=H,
                          query=q, key=k).to_dense()
    real = torch.arange(L)[None, :] < lengths[:, None]  # [B, L]
    got, want = got.expand(B, H, L, L), want.expand(B, H, L, L)
    assert torch.equal(got[real[:, None, :].expand(B, H, L)], want[real[:, None, :].expand(B, H, L)])
    assert not got[:, :, :, ~real.any(0)].any()  # keys no row has are never attended


def test_head_at_the_labelled_positions():
    torch.manual_seed(0)
    model = TinyTransformer(32, 24, d_model=16, layers=2, plan=spattn.Window(8), block_size=8)
    ids = torch.randint(1, 32, (2, 24))
    positions = torch.tensor([[3, 7, 20], [0, 5, 23]])
    torch.testing.assert_close(model(ids, positions), model(ids).gather(1, positions[..., None].expand(-1, -1, 32)))
    with pytest.raises(ValueError, match="positions"):
        model(ids, positions.int())


def test_time_limit_cuts_the_run_to_what_fits():
    config = mqar_config("tiny", steps=3000, train_examples=320, test_examples=40)
    result = train(config, None, time_limit=0.5)
    steps = result.config["steps"]
    assert 25 < steps <= 1000  # cut at the first check (not before it), to what the pace says fits
    assert len(result.losses) >= 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(ValueError, match="time_limit"):
        train(config, None, time_limit=0)


def test_given_data_is_the_generated_data():
    from spattn.eval.tasks import mqar

    config = mqar_config("tiny", steps=5, train_examples=64, test_examples=16)
    options = config.task_options
    given = (*mqar(64, seed=0, **options), *mqar(16, seed=1, **options))
    assert train(config, None, data=given).per_example == train(config, None).per_example
    with pytest.raises(ValueError, match="data"):
        train(config, None, data=given[:2])


def test_bfloat16_autocast_trains_the_classifier():
    config = listops_config("tiny", steps=4, train_examples=64, test_examples=16, block_size=8,
                            precision="bfloat16")
    result = train(config, spattn.Window(4, 4))
    assert all(torch.isfinite(torch.tensor(result.losses))) and 0 <= result.accuracy.value <= 1
    with pytest.raises(ValueError, match="precision"):
        listops_config("tiny", precision="float16")
