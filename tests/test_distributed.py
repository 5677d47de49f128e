"""spattn.distributed on CPU with gloo: both modes against single-process spattn (forward and backward,
static and dynamic patterns, GQA / MQA, documents, uneven lengths), bytes sent against the cost model, the
balancer, and shard / unshard. The multi-rank cases run once, in 3 ranks under torch.distributed.run
(tests/distributed_cases.py), and each test reads its case."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spattn
from spattn.distributed import Sharding, balance, layer_bytes, simulate, visited_blocks

WORLD = 3
CASES = ["window", "topp_pooled", "topk_bounds", "document", "dense_causal", "mqa"]  # both modes, or head only (mqa)
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(ROOT / "tests" / "distributed_cases.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES)
def test_equal_to_single_process(ranks, case):
    for rank, results in enumerate(ranks):
        found = results[case]
        assert "error" not in found, found.get("error")
        for mode, got in found.items():
            for what in ("out", "unsharded_out", "dq", "dk", "dv"):  # float64: only summation order differs
                assert got[what] <= 1e-12, f"{case} {mode} rank {rank}: {what} differs by {got[what]:.3e}"


def test_torch_flex_context_parallelism_through_the_adapter(ranks):
    for rank, results in enumerate(ranks):
        found = results["torch_flex"]
        assert "error" not in found, found.get("error")
        err = found["torch_flex"]["out"]
        assert err <= 1e-12, f"rank {rank}: torch's Flex CP differs by {err}"


def test_head_parallel_rank_order_slices_without_a_sharding(ranks):
    for results in ranks:
        found = results["head_rank_order"]
        assert "error" not in found, found.get("error")
        assert found["out"] <= 1e-6
        assert "different numbers of rows" in found["uneven_error"]


@pytest.mark.parametrize("case", CASES)
def test_bytes_sent_match_the_cost_model(ranks, case):
    for rank, results in enumerate(ranks):
        for mode, got in results[case].items():
            assert got["sent_forward"] == got["model_forward"], (case, mode, rank)
            assert got["sent_backward"] == got["model_backward"], (case, mode, rank)
            assert got["sent_forward"] > 0


def test_dynamic_selection_moves_less_than_an_all_gather(ranks):
    sent = sum(r["topp_pooled"]["context"]["sent_kv_forward"] for r in ranks)
    dense = sum(r["topp_pooled"]["context"]["dense_kv_bytes"] for r in ranks)
    assert sent < dense


@pytest.mark.parametrize("seq_len", [600, 4099])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_shard_then_unshard_is_the_identity(seq_len, world_size):
    x = torch.randn(2, 3, seq_len, 5)
    pattern = spattn.Sinks(64) | spattn.Window(1024)
    for sharding in (Sharding.contiguous(seq_len, world_size, block_size=64),
                     Sharding.balanced(pattern, seq_len, world_size=world_size, causal=True, block_size=64)):
        shards = [sharding.shard(x, r) for r in range(world_size)]
        assert sum(s.shape[2] for s in shards) == seq_len
        assert torch.equal(sharding.unshard(shards), x)
        assert torch.equal(torch.sort(sharding.permutation()).values, torch.arange(seq_len))


def _imbalance(layout, world_size):
    work = Sharding.balanced(layout, world_size=world_size).work(layout)
    return float(work.max() / work.mean())


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_balancer_on_sinks_window_and_documents(world_size):
    L = 16384
    sinks_window = spattn.compile(spattn.Sinks(64) | spattn.Window(1024), L, causal=True)
    assert _imbalance(sinks_window, world_size) <= 1.1
    causal = spattn.compile(spattn.Causal(), L, causal=True)
    assert _imbalance(causal, world_size) <= 1.1
    lengths = [5000, 700, 3000, 1200, 6484]  # documents of mixed lengths, causal within each
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    documents = spattn.compile(spattn.Document(segments), L, causal=True, batch=1)
    assert _imbalance(documents, world_size) <= 1.1
    # unbalanced contiguous shards are the contrast the balancer fixes
    work = Sharding.contiguous(L, world_size, block_size=128).work(causal)
    assert float(work.max() / work.mean()) > 1.1


def test_balancer_keeps_a_window_contiguous():
    blocks = balance(visited_blocks(spattn.compile(spattn.Window(1024), 16384, causal=True)), 4)
    assert all(list(b) == list(range(b[0], b[-1] + 1)) for b in blocks)


def test_cost_model_window_moves_neighbours_only():
    shape = dict(heads=8, kv_heads=2, head_dim=64)
    window = layer_bytes(spattn.Sinks(64) | spattn.Window(1024), 16384, world_size=4, mode="context", **shape)
    dense = layer_bytes(spattn.Causal(), 16384, world_size=4, mode="context", **shape)
    assert max(window["forward"]) < max(dense["forward"]) / 4
    head = layer_bytes(None, 16384, world_size=4, mode="head", **shape)
    assert head["forward"] == head["backward"]  # even shards: the reverse all-to-alls move the same amount


def test_simulation_rows():
    result = simulate(seq_lens=(16384,), world_sizes=(8, 64), heads=32, kv_heads=8, window=1024)
    rows = {(r["world_size"], r["pattern"], r["mode"]): r for r in result["rows"]}
    assert "note" in rows[(64, "window", "head")]
    assert rows[(8, "window", "context")]["forward_max_bytes"] < rows[(8, "dense", "context")]["forward_max_bytes"]
    assert rows[(8, "dense", "head")]["forward_max_bytes"] == rows[(8, "window", "head")]["forward_max_bytes"]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="world_size"):
        Sharding.contiguous(100, 10, block_size=64)
    with pytest.raises(ValueError, match="blocks"):
        Sharding(256, 64, ((0, 1), (1, 2, 3)))
    with pytest.raises(RuntimeError, match="init_process_group"):
        spattn.distributed.head_parallel_attention(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4),
                                                   torch.randn(1, 2, 8, 4), spattn.Causal())


@pytest.mark.slow
def test_torchrun_example_trains_with_the_single_process_loss():
    pytest.importorskip("transformers")
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(ROOT / "examples" / "train_context_parallel.py"),
           "--steps", "2", "--seq-len", "512", "--window", "64", "--hidden", "32", "--layers", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "check: sharded loss" in proc.stdout
    assert "context parallel, 2 ranks, 512 tokens" in proc.stdout
