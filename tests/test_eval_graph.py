"""spattn.eval.train: the recorded (CUDA graph) training step, its fallback to eager, and Zoology's recipe
options. A CPU cannot record: the recording itself is exercised by ``check_graph`` on the GPU; here every
path around it is tested, the failing recording through stand-ins for the CUDA calls."""

import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _HostTraffic(TorchDispatchMode):
    """Records every operation of a training step that a CUDA graph cannot record: a host read of a device
    value (``.item()``, ``bool(t)``, ``tolist``), an output shape that depends on the data (``nonzero``,
    ``unique``...) and a tensor made from host data (``torch.tensor(...)``: on CUDA a host-to-device copy, the
    "Cannot copy between CPU and CUDA tensors during CUDA graph capture" of the learned router on the H200).
    On a CPU these ops run fine, so they have to be looked for. Not counted: the blockwise reference attention
    (the CPU's stand-in for the triton kernels, recorded on the GPU by the dense and window plans) and the
    CPU optimiser (CUDA runs fused, capturable AdamW)."""

    FLAGGED = ("_local_scalar_dense", "nonzero", "lift_fresh", "unique", "masked_select", "repeat_interleave")
    EXEMPT = (os.path.join("ops", "attention", "impl", "reference.py"), os.path.join("torch", "optim"))

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # repeat_interleave with an int repeat is a view-and-copy; only tensor repeats read the device
        if any(name.lstrip("_").startswith(f) for f in self.FLAGGED) and not (
                name == "repeat_interleave" and not isinstance(args[0], torch.Tensor)):
            frames = [f for f in traceback.extract_stack() if "spattn" in f.filename or "torch" in f.filename]
            if not any(e in f.filename for f in frames for e in self.EXEMPT):
                where = next((f"{f.filename.split('src/')[-1]}:{f.lineno}" for f in reversed(frames)
                              if "spattn" in f.filename), "?")
                self.events.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


_STEP_PLANS = {
    "dense": None,
    "window": spattn.Window(8),
    "sinks+window": spattn.Sinks(4) | spattn.Window(8),
    "window+topk": spattn.Window(8) | spattn.TopK("pooled", 1),
    "learned": train_module.Learned(1, safeguard=spattn.Window(8)),
    "learned-local": train_module.Learned(1, safeguard=spattn.Sinks(3), local=1, scorer="pooled"),
    "hierarchical": spattn.Hierarchical(compress_block=8, compress_stride=8, select_block=8, select_count=2,
                                        window=8, pooling="learned"),
}


@pytest.mark.parametrize("name", list(_STEP_PLANS))
def test_the_training_step_reads_nothing_on_the_host(name):
    """The step the trainer records (``_Stepper._compute``: forward, loss, router losses, backward, clipping,
    optimiser) after its first eager step, with every plan the H200 MQAR run trains."""
    config = _small(block_size=8)
    model = train_module.build_model(config, _STEP_PLANS[name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = train_module._Data(config, *train_module._data(config, config.train_examples, 0))
    layer_routers = train_module.routers(model)
    for router in layer_routers:  # a device scalar, as train() shares it
        router.temperature = torch.tensor(1.0)
    stepper = train_module._Stepper(config, model, optimizer, data, layer_routers)
    index = torch.arange(config.batch_size)
    stepper.eager(index, None)  # the first step builds the per-shape caches (eager on the GPU too)
    probe = _HostTraffic()
    with probe:
        loss = stepper.eager(index, None)
    assert torch.isfinite(loss)
    assert probe.events == [], f"{name}: operations a CUDA graph cannot record: {sorted(set(probe.events))}"


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


def test_every_run_gets_its_minimum_steps_or_is_skipped():
    allot = _bench().allot
    assert allot(30, [30, 30], 1000) == pytest.approx(940)  # all but the later runs' minimums
    assert allot(60, [60, 60], 200) == pytest.approx(80)
    # a later minimum that cannot fit anyway is not kept free (that run will be skipped)
    assert allot(60, [150, 30], 200) == pytest.approx(170)
    # room for one later minimum only: that one stays free, the last one will be skipped
    assert allot(60, [60, 60], 130) == pytest.approx(70)
    assert allot(60, [], 50) is None  # its minimum does not fit: skipped, the time goes to the later ones
    split = _bench().split_variant
    assert split("dense") == ("dense", {}) and split("sinks32+window32@prefix32") == ("sinks32+window32",
                                                                                         {"prefix_length": 32})
    with pytest.raises(ValueError, match="variant"):
        split("dense@shuffled")
