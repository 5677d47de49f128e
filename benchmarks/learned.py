"""Learned sparsity on one GPU (H200): correctness first, then the three ``spattn train`` recipes.

1. Correctness gate (same run): the gate against its float64 reference; ``SparseAttention`` with a static pattern
   and with a ``LearnedTopK`` router against the float64 dense oracle on its own projections (tolerance rule);
   the straight-through training pass equals the sparse pass. The run stops if any check fails.
2. (a) distil SmolLM2 gates on Austen at ``--length`` tokens; block recall against the oracle top-k and the
   window, perplexity dense / window / gates / pooled on held-out Austen and KJV, at equal block budget.
3. (b) byte-level LMs from scratch on Austen + KJV: dense / window / learned / learned + regularisers.
4. (c) MQAR with each attention variant (when ``spattn.eval.tasks`` is installed).

Everything is written under ``$OUT`` (default ``benchmarks/results/h200/learned``): ``learned.json`` (summary with
machine, versions, commit, command) and one folder per recipe (results.json, JSON-lines logs). Target: < 6 min.

    python benchmarks/learned.py                 # H200
    python benchmarks/learned.py --quick --device cpu   # a smoke run of the same code at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import spattn
from spattn.bench.env import machine_info
from spattn.cli.train import distil_recipe, lm_recipe, task_recipe
from spattn.learned import BlockGate, LearnedTopK
from spattn.nn import SparseAttention
from spattn.testing import assert_within, brute_force_mask, dense_attention, plain_attention


def static_check(device: torch.device, dtype: torch.dtype, pattern, *, length: int = 1025, dim: int = 512,
                 heads: int = 8, kv_heads: int = 2, block: int = 64) -> None:
    """``SparseAttention`` with a static ``pattern`` against the float64 dense oracle (tolerance rule)."""
    layer = SparseAttention(dim, heads, kv_heads, pattern=pattern, block_size=block).to(device, dtype)
    with torch.no_grad():
        q, k, v = layer.project(torch.randn(2, length, dim, device=device, dtype=dtype))
        mask = brute_force_mask(pattern, length, causal=True).to(device)
        golden, _ = dense_attention(q, k, v, mask)
        assert_within(layer.attend(q, k, v), golden, plain_attention(q, k, v, mask)[0], what="static")


def router_check(device: torch.device, dtype: torch.dtype, *, length: int = 1025, dim: int = 512, heads: int = 8,
                 kv_heads: int = 2, block: int = 64, blocks: int = 4, local: int = 0, safeguard=None) -> None:
    """``LearnedTopK``'s straight-through training pass (gradients reach the gate) and its eval pass against the
    float64 dense oracle on the mask it selected (tolerance rule)."""
    router = LearnedTopK(heads, kv_heads, dim // heads, blocks=blocks, block_size=block, local=local,
                         safeguard=safeguard)
    layer = SparseAttention(dim, heads, kv_heads, pattern=router).to(device, dtype)
    q, k, v = layer.project(torch.randn(2, length, dim, device=device, dtype=dtype))
    scale = (dim // heads) ** -0.5
    layer.train()
    trained = router.attend(q, k, v, causal=True, scale=scale)  # straight-through pass
    trained.float().square().mean().backward()
    assert router.gate.query_proj.grad.abs().sum() > 0
    mask = router.layout(q, k, router.last["chosen"], causal=True).to_dense()
    q, k, v = q.detach(), k.detach(), v.detach()
    golden, _ = dense_attention(q, k, v, mask, scale=scale)
    baseline = plain_attention(q, k, v, mask, scale=scale)[0]
    assert_within(trained.detach(), golden, baseline, what="router straight-through")
    layer.eval()
    with torch.no_grad():  # the same selection (no noise, no drop), plain sparse attention
        assert_within(router.attend(q, k, v, causal=True, scale=scale), golden, baseline, what="router eval")


def timed(checks: list[dict], name: str, fn) -> None:
    """Run ``fn`` and append ``{"check": name, "ok": True, "seconds": ...}`` to ``checks`` (raises on failure)."""
    t = time.perf_counter()
    fn()
    checks.append({"check": name, "ok": True, "seconds": time.perf_counter() - t})


def correctness(device: torch.device) -> list[dict]:
    checks: list[dict] = []

    def gate():
        g = BlockGate(8, 2, 64, block_size=64, hidden=32).to(device)
        q, k = torch.randn(2, 8, 1000, 64, device=device), torch.randn(2, 2, 1000, 64, device=device)
        torch.testing.assert_close(g(q, k).double().cpu(), g.cpu().reference(q.cpu(), k.cpu()), atol=1e-4, rtol=1e-3)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the kernels' dtype on GPU
    timed(checks, "gate == float64 reference", gate)
    timed(checks, "SparseAttention(static) within the tolerance rule",
          lambda: static_check(device, torch.float32,
                               spattn.Sinks(64) | spattn.Window(256) | spattn.Essential(positions=(300, 700))))
    timed(checks, "LearnedTopK: straight-through and sparse passes within the tolerance rule",
          lambda: router_check(device, dtype, safeguard=spattn.Sinks(64) | spattn.Window(128)))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--length", type=int, default=4096, help="distillation / evaluation tokens per chunk")
    parser.add_argument("--skip", default="", help="comma-separated recipes to skip: distil,lm,task")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "benchmarks/results/h200/learned"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    summary = {"machine": machine_info(), "spattn": spattn.__version__, "correctness": correctness(device)}
    _save(out, summary)
    skip = set(args.skip.split(","))
    quick = args.quick
    if "distil" not in skip:
        summary["distil"] = _short(distil_recipe(
            output=out / "distil", length=256 if quick else args.length, train_chunks=2 if quick else 8,
            eval_chunks=1 if quick else 2, steps=5 if quick else 300, lr=1e-3, block_size=64,
            budget=2 if quick else 8, layers=[0, 1] if quick else None, device=args.device, progress=True))
        _save(out, summary)
    if "lm" not in skip:
        summary["lm"] = _short(lm_recipe(
            output=out / "lm", length=256 if quick else 2048, steps=4 if quick else 300, batch_size=2 if quick else 8,
            dim=32 if quick else 256, layers=1 if quick else 4, heads=2 if quick else 8, kv_heads=1 if quick else 2,
            budget=2 if quick else 8, block_size=64, device=args.device, progress=True))
        _save(out, summary)
    if "task" not in skip:
        try:
            summary["task"] = _short(task_recipe(
                output=out / "task", examples=64 if quick else 4000, length=256 if quick else 512,
                steps=4 if quick else 400, batch_size=8 if quick else 64, budget=2 if quick else 4,
                block_size=32 if quick else 64, device=args.device, progress=True))
        except RuntimeError as exc:  # spattn.eval.tasks not installed
            summary["task"] = {"skipped": str(exc)}
    summary["seconds"] = time.perf_counter() - start
    _save(out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1, default=str)[:4000])


def _short(data: dict) -> dict:
    """The recipe JSON without per-step histories (they stay in the recipe folder)."""
    if "runs" in data:
        return {**{k: v for k, v in data.items() if k != "runs"},
                "runs": {k: {"final": v["final"], "seconds": v["seconds"]} for k, v in data["runs"].items()}}
    return data


def _save(out: Path, summary: dict) -> None:
    (out / "learned.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
