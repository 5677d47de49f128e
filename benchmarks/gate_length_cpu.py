"""Why SmolLM2's distilled gates close the window -> dense gap at 4096 tokens but not at 8192 (issue 14), on the CPU.

The gates of the H200 run (``benchmarks/real_model_h200.py``, chain A) were distilled on 4096-token chunks.
A gate reads the model's queries and keys *after* rotary embeddings, and its bilinear score
``u . v`` is not rotation-equivariant, so what it learned is tied to the absolute rotary angles of positions
0..4095. Beyond them its scores are extrapolated. This script measures that on a few layers, on the CPU:

1. One held-out Austen chunk of ``--length`` (8192) tokens through the first ``max(--layers) + 1`` layers of
   SmolLM2 (a layer's queries and keys depend only on the layers before it, so the truncated model gives the
   exact full-model captures of those layers).
2. Block recall (share of the dense softmax mass kept by 8 key blocks of 64 per query block: the true recall of
   the selection, from ``spattn.learned.block_targets``) of each gate's top-k, of the oracle top-k and of the
   window, split into queries at positions < 4096 (seen in distillation) and >= 4096 (not seen).
3. The same gate on positions 4096..8191 cut out as a sequence of their own (as many key blocks as in
   distillation, unseen positions): separates "more key blocks" from "unseen positions".
4. The fix: gates distilled on one calibration chunk of ``--length`` tokens (all positions the evaluation uses),
   against a control distilled on the first 4096 tokens of the same chunk (same recipe, same text).

Captures are cached in ``--cache`` (the forward pass is the slow part on a shared CPU). Writes ``--out`` JSON
with machine (load average), versions, commit and command.

    PYTHONPATH=src python benchmarks/gate_length_cpu.py --gates gates.safetensors \
        --out benchmarks/results/cpu/learned-gate-length.json
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import spattn
from spattn.bench.env import machine_info, versions
from spattn.coverage import measure
from spattn.data import text_chunks
from spattn.integrations.capture import capture
from spattn.integrations.models import load_smollm2
from spattn.learned import BlockGate, block_targets, load, train_gate
from spattn.learned.checkpoint import load_gates, read_meta


def captured(split: str, length: int, layers: list[int], cache: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (query [1, H, L, D], key [1, Hkv, L, D])}`` of the first ``split`` Austen chunk (cached)."""
    path = cache / f"smollm2_austen_{split}_{length}_{'-'.join(map(str, layers))}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.is_file():
        flat = load_file(str(path))
        return {i: (flat[f"{i}.query"], flat[f"{i}.key"]) for i in layers}
    model, tokenizer = load_smollm2()
    depth = max(layers) + 1
    model.model.layers = model.model.layers[:depth]  # the later layers do not change these layers' inputs
    model.config.num_hidden_layers = depth
    chunk = text_chunks("austen", tokenizer, length, split=split, max_chunks=1)
    cap = capture(model, chunk[:1], layers=layers, mode="full")
    out = {i: (cap.queries[i], cap.keys[i]) for i in layers}
    cache.mkdir(parents=True, exist_ok=True)
    save_file({f"{i}.{n}": t.contiguous() for i, (q, k) in out.items() for n, t in (("query", q), ("key", k))},
              str(path))
    return out


def recall_rows(scores: torch.Tensor | None, target: torch.Tensor, budget: int, groups: int, kind: str
                ) -> torch.Tensor:
    """float ``[H, NQ]``: recall of each query block when ``budget`` key blocks are kept per query block.

    ``kind``: ``"gate"`` (top-k of ``scores`` averaged over each key/value group, as ``TopK`` with
    ``sharing="group"``), ``"oracle"`` (top-k of the true mass per head) or ``"window"`` (the last ``budget``
    blocks)."""
    _, H, NQ, NK = target.shape
    visible = torch.ones(NQ, NK, dtype=torch.bool).tril(NK - NQ)
    if kind == "window":
        distance = torch.arange(NQ)[:, None] + (NK - NQ) - torch.arange(NK)[None, :]
        keep = visible & (distance < budget)
        return (target * keep).sum(-1)[0]
    if kind == "gate":
        pooled = scores.reshape(1, H // groups, groups, NQ, NK).mean(2).masked_fill(~visible, -1.0)
        top = pooled.topk(min(budget, NK), -1).indices
        keep = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, top, True) & visible
        keep = keep.repeat_interleave(groups, 1)
    else:
        top = target.masked_fill(~visible, -1.0).topk(min(budget, NK), -1).indices
        keep = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, top, True) & visible
    return (target * keep).sum(-1)[0]


def halves(rows: torch.Tensor, split_block: int) -> dict[str, float]:
    return {"before": float(rows[:, :split_block].mean()), "after": float(rows[:, split_block:].mean())}


def evaluate(gates: dict[str, BlockGate], query: torch.Tensor, key: torch.Tensor, *, budget: int, split: int,
             scale: float) -> dict[str, Any]:
    """Recall per variant, split at query position ``split``, and the mean block distance each one picks."""
    bs = next(iter(gates.values())).block_size
    groups = query.shape[1] // key.shape[1]
    target = block_targets(query, key, bs, causal=True, scale=scale)
    row: dict[str, Any] = {}
    for name in ("oracle", "window"):
        row[name] = halves(recall_rows(None, target, budget, groups, name), split // bs)
    for name, gate in gates.items():
        with torch.no_grad():
            scores = gate(query, key, causal=True)
        row[name] = halves(recall_rows(scores, target, budget, groups, "gate"), split // bs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gates", required=True, help="gate checkpoint distilled at --distilled-length (H200 run)")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", default="3,8,13")
    parser.add_argument("--budget-blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="distillation steps per gate (as the H200 run)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/spattn/gate_length"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu/learned-gate-length.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    cache, out = Path(args.cache), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    distilled_length = int(read_meta(args.gates).get("chunk_length", 0))
    if not 0 < distilled_length < args.length:
        raise SystemExit(f"--gates were distilled at {distilled_length} tokens; need fewer than --length "
                         f"{args.length}")
    machine = machine_info()
    record: dict[str, Any] = {
        "benchmark": "gate_length_cpu", "model": "SmolLM2-135M", "machine": machine,
        "versions": {"spattn": spattn.__version__, **versions()}, "commit": machine.get("git_commit"),
        "command": machine.get("command"), "arguments": vars(args), "gates": args.gates,
        "distilled_length": distilled_length, "length": args.length, "layers": {},
        "note": (f"recall = share of the dense softmax mass kept with {args.budget_blocks} key blocks of 64 per "
                 f"query block; 'before'/'after' = query positions < / >= {distilled_length}. One held-out Austen "
                 "chunk. Shared 2-core CPU (see machine.load_average)."),
    }

    def save() -> None:
        record["load_average_now"] = list(os.getloadavg())
        out.with_suffix(".tmp").write_text(json.dumps(record, indent=1, default=str))
        os.replace(out.with_suffix(".tmp"), out)

    started = time.perf_counter()
    held = captured("held_out", args.length, layers, cache)
    calibration = captured("calibration", args.length, layers, cache)
    record["capture_seconds"] = time.perf_counter() - started
    save()
    original = load_gates(args.gates)
    scale = float(read_meta(args.gates).get("scale") or held[layers[0]][0].shape[-1] ** -0.5)
    for layer in layers:
        t = time.perf_counter()
        q, k = held[layer]
        cq, ck = calibration[layer]
        fresh: dict[str, BlockGate] = {}
        for name, n in ((f"cpu_gate_{distilled_length}", distilled_length), (f"cpu_gate_{args.length}", args.length)):
            gate = BlockGate(q.shape[1], k.shape[1], q.shape[-1], block_size=original[layer].block_size, hidden=64)
            losses = train_gate(gate, [(cq[:, :, :n], ck[:, :, :n])], steps=args.steps, lr=1e-3, scale=scale)
            gate.requires_grad_(False)
            fresh[name] = gate
            record.setdefault("final_loss", {}).setdefault(str(layer), {})[name] = losses[-1]
        h200 = f"h200_gate_{distilled_length}"
        row = evaluate({h200: original[layer], **fresh}, q, k, budget=args.budget_blocks, split=distilled_length,
                       scale=scale)
        # the H200 gate on the unseen positions alone: as many key blocks as in distillation
        cut = slice(args.length - distilled_length, args.length)
        alone = evaluate({h200: original[layer]}, q[:, :, cut], k[:, :, cut], budget=args.budget_blocks,
                         split=distilled_length, scale=scale)
        row["unseen_positions_alone"] = {name: v["before"] for name, v in alone.items()}
        # the TopK pattern path agrees with the direct top-k above (no bug in the selection plumbing)
        pattern = spattn.TopK(load(args.gates, layer), args.budget_blocks)
        report = measure(q, k, pattern, causal=True, topk=0, block_size=original[layer].block_size)
        recall = report.recall[0]
        row["topk_pattern_h200_gate"] = {"before": float(recall[:, :distilled_length].mean()),
                                         "after": float(recall[:, distilled_length:].mean())}
        row["seconds"] = time.perf_counter() - t
        record["layers"][str(layer)] = row
        print(f"layer {layer}: " + "; ".join(f"{n} {v['before']:.3f}/{v['after']:.3f}" for n, v in row.items()
                                             if isinstance(v, dict) and "after" in v), flush=True)
        save()
    record["seconds"] = time.perf_counter() - started
    save()
    print(f"wrote {out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
