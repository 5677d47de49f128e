"""Operations in one static decode step, counted on the CPU: torch ops dispatched (TorchDispatchMode) and triton
launches (kernels under ``TRITON_INTERPRET=1``, each launch counted once, its interpreter work not counted), for
the torch selection against the fused one, and SDPA against the split-K dense decode; the last two rows also write
the cache with the one-launch static append (``PagedLayer.fused_append``, the default on CUDA). On a GPU each op is at
least one kernel launch of a few microseconds even replayed from a CUDA graph, so the count is what the fused
selection removes; it is not a timing.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/decode_opcount.py \
        --out benchmarks/results/cpu/decode_opcount.json

Model: SmolLM2-135M's attention shape (9 / 3 heads, head dim 64, hidden 576) with 2 layers and random weights
(``decode_generate.smollm2_shape``), batch 2, a 2048-token prompt, pages of 128; the plan
``Sinks(64) | Window(1024) | TopK("bounds", 16)`` in both layers (sparse rows) or ``Plan()`` (dense rows). The
step counted is the second static decode step (from the logits processor after step 1 to the one after step 2).
"""

# ruff: noqa: E402 - src/ and benchmarks/ are put on the import path first
from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))
sys.path.insert(0, _HERE)
if not os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("run with TRITON_INTERPRET=1 (the triton kernels are interpreted on the CPU)")

import torch
import triton.runtime.interpreter as interpreter
from decode_generate import smollm2_shape
from torch.utils._python_dispatch import TorchDispatchMode

import spattn
from spattn.bench.env import machine_info
from spattn.runtime import Runtime


class Counter(TorchDispatchMode):
    """Torch ops dispatched while ``on`` (views and metadata ops included, as dispatched), triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.paused = 0
        self.ops: dict[str, int] = {}
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not self.paused:
            name = str(func.overloadpacket.__name__)
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_step(model, plan, ids, page: int, fused_append: bool = False, **options) -> dict:
    counter = Counter()
    original = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        if counter.on and not counter.paused:
            counter.launches += 1
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    state = {"step": 0}

    def toggle(sequence, scores):
        state["step"] += 1
        counter.on = state["step"] == 2  # calls: 1 after the prefill, 2 after static step 1: count step 2
        return scores

    rt = Runtime(model, plan, min_sparse_tokens=0, block_size=page, monitor_level=0, cuda_graph=True, **options)
    cache = rt.new_cache()
    for layer in cache.layers:  # the one-launch static append (on CUDA by default), else the torch ops
        layer.fused_append = fused_append
    interpreter.GridExecutor.__call__ = launch
    try:
        with counter:
            rt.generate(ids, max_new_tokens=4, pad_token_id=2, logits_processor=[toggle], past_key_values=cache)
        paths = dict(rt.decoder.paths)
    finally:
        interpreter.GridExecutor.__call__ = original
        rt.detach()
    total = sum(counter.ops.values())
    return {"torch_ops": total, "triton_launches": counter.launches, "paths": paths,
            "top_ops": dict(sorted(counter.ops.items(), key=lambda kv: -kv[1])[:12])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt", type=int, default=2048)
    args = parser.parse_args()
    page, layers, B = 128, 2, 2
    model = smollm2_shape(layers, args.prompt + 256, torch.float32, torch.device("cpu"))
    ids = torch.randint(3, 49152, (B, args.prompt), generator=torch.Generator().manual_seed(0))
    sparse = spattn.Plan.uniform(spattn.Sinks(64) | spattn.Window(1024) | spattn.TopK("bounds", 16))
    rows = {
        "sparse-16, torch selection": (sparse, dict(decode_selection="torch", decode_kernel="triton",
                                                    dense_decode="sdpa")),
        "sparse-16, fused selection": (sparse, dict(decode_selection="fused", dense_decode="sdpa")),
        "dense, masked SDPA": (spattn.Plan(), dict(dense_decode="sdpa")),
        "dense, split-K kernel": (spattn.Plan(), dict(dense_decode="kernel")),
        "sparse-16, fused selection + fused append": (sparse, dict(decode_selection="fused", dense_decode="sdpa",
                                                                  fused_append=True)),
        "dense, split-K kernel + fused append": (spattn.Plan(), dict(dense_decode="kernel", fused_append=True)),
    }
    report = {"machine": machine_info("cpu"), "command": " ".join([sys.executable, *sys.argv]),
              "model": f"SmolLM2-135M's shape, {layers} layers, random weights", "batch": B, "prompt": args.prompt,
              "page_size": page, "note": "counts, not timings (2-core CPU shared with other jobs)", "rows": {}}
    for name, (plan, options) in rows.items():
        row = count_step(model, plan, ids, page, **options)
        report["rows"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "top_ops"}), flush=True)
    dense = report["rows"]["dense, masked SDPA"]["torch_ops"]
    for row in report["rows"].values():  # ops + launches per layer beyond the masked-SDPA dense step's
        row["extra_ops_per_layer_vs_sdpa_dense"] = (row["torch_ops"] + row["triton_launches"] - dense) / layers
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
