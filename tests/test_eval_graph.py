"""spattn.eval.train: the recorded (CUDA graph) training step, its fallback to eager, and Zoology's recipe
options. A CPU cannot record: the recording itself is exercised by ``check_graph`` on the GPU; here every
path around it is tested, the failing recording through stand-ins for the CUDA calls."""

import contextlib

import pytest
import torch

import spattn
from spattn.eval import train as train_module
from spattn.eval.train import GRAPH_WARMUP, TinyTransformer, TrainConfig, check_graph, mqar_config, train


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models spend most of a step in thread hand-offs on a shared 2-core machine: one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(**changes):
    return mqar_config("tiny", steps=8, train_examples=96, test_examples=16, **changes)


def test_the_run_says_why_it_did_not_record():
    result = train(_small(), spattn.Window(4))
    assert result.graph["captured"] is False and "CUDA device" in result.graph["reason"]
    assert result.train_seconds > 0 and result.ms_per_step == pytest.approx(1000 * result.train_seconds / 8)
    assert result.to_dict()["graph"] == result.graph
    plan = train_module._GraphPlan.of
    assert plan(_small(cuda_graph=False), True).reason == "TrainConfig.cuda_graph is False"
    assert "ListOps" in plan(TrainConfig(task="listops"), True).reason
    assert plan(_small(), True).wanted and plan(_small(), True).reason is None


def test_check_graph_on_cpu_is_deterministic_and_does_not_pass():
    report = check_graph(_small(), spattn.Window(4), steps=GRAPH_WARMUP + 3)
    assert report["captured"] is False and report["passed"] is False
    assert report["max_loss_difference"] == 0.0  # the same seed trains the same steps twice
    assert len(report["losses_eager"]) == GRAPH_WARMUP + 3
    with pytest.raises(ValueError, match="steps"):
        check_graph(_small(), None, steps=2)


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


def test_a_failed_recording_trains_on_eagerly_with_the_same_numbers(monkeypatch):
    """A recording that raises (as a host read during capture does) leaves the run eager from that step, and
    the run is step for step the eager one: the failed attempt changed no parameter and no optimiser state."""
    eager = train(_small(), spattn.Window(4))

    class FailingGraph:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train_module._GraphPlan, "of", classmethod(lambda cls, config, on_cuda: cls(True)))
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    fallen = train(_small(), spattn.Window(4))
    assert fallen.graph["captured"] is False and fallen.graph["replays"] == 0
    assert f"recording failed at step {GRAPH_WARMUP}" in fallen.graph["reason"]
    assert "stream is capturing" in fallen.graph["reason"]
    assert fallen.losses == eager.losses and fallen.per_example == eager.per_example


def test_zoology_initialisation_and_tied_embeddings():
    model = TinyTransformer(4096, 64, d_model=64, layers=2, init_std=0.02, tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[1].out.weight.std().item() == pytest.approx(0.01, rel=0.1)  # 0.02 / sqrt(2 * 2 layers)
    assert model.norm.weight.eq(1).all()
    plain = TinyTransformer(4096, 64, d_model=64, layers=2)
    assert plain.head.weight is not plain.embed.weight and plain.embed.weight.std().item() > 0.5
    # a tied model is trained with one weight: named once
    assert sum(1 for name, _ in model.named_parameters() if name.startswith(("embed", "head"))) == 1
    with pytest.raises(ValueError, match="tie_embeddings"):
        TinyTransformer(16, 64, num_classes=10, tie_embeddings=True)
    with pytest.raises(ValueError, match="tie_embeddings"):
        TrainConfig(task="listops", tie_embeddings=True)
    with pytest.raises(ValueError, match="init_std"):
        TrainConfig(init_std=0.0)
    with pytest.raises(ValueError, match="clip_grad"):
        TrainConfig(clip_grad=-1.0)


def test_hierarchical_layers_get_learned_gates():
    pattern = spattn.Hierarchical(compress_block=16, compress_stride=16, select_block=16, select_count=1, window=8)
    model = TinyTransformer(32, 32, d_model=16, layers=2, plan=spattn.Plan(layers={1: pattern}), block_size=16)
    from spattn.hierarchical import HierarchicalAttention

    assert model.blocks[0].pattern is None and isinstance(model.blocks[1].pattern, HierarchicalAttention)
    ids = torch.randint(1, 32, (2, 32))
    out = model(ids)
    out.sum().backward()
    assert out.shape == (2, 32, 32) and model.blocks[1].pattern.gate_weight.grad is not None
    with pytest.raises(ValueError, match="causal"):
        TinyTransformer(16, 64, plan=pattern, causal=False, num_classes=10, block_size=16)


def _bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "eval_synthetic.py"
    spec = importlib.util.spec_from_file_location("spattn_bench_eval_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_shares_give_cheap_runs_their_steps_and_split_the_rest():
    level = _bench().water_level
    assert level([10, 20], 100) == float("inf")  # everything fits
    cap = level([10, 10, 300, 300], 220)  # the cheap runs get all they need, the dear ones share the rest
    assert cap == pytest.approx(100) and sum(min(n, cap) for n in (10, 10, 300, 300)) == pytest.approx(220)
    assert level([50, 50], 60) == pytest.approx(30)
