"""The communication simulation of spattn.distributed: bytes per rank per attention layer at 128k-1M tokens
on 8-1024 ranks, for causal Sinks(64) | Window(4096), dynamic selection and dense causal attention, in
head-parallel and context-parallel mode (cost model: spattn.distributed.cost; no processes are started).

    PYTHONPATH=src python benchmarks/distributed_simulation.py \
        [--out benchmarks/results/cpu/distributed/simulation.json]

Writes the JSON (machine, versions, commit, command, every row) and prints a markdown table of the forward +
backward bytes per rank (max over ranks).

    PYTHONPATH=src python benchmarks/distributed_simulation.py --balancers \
        [--out benchmarks/results/cpu/distributed/balancers.json]

compares the balancers instead (spattn's, torch's PTRR through spattn.distributed.torch_cp, contiguous shards):
max / mean work per rank and context-parallel bytes, at 32k tokens on 8 ranks.
"""

import argparse
import json
from pathlib import Path

from spattn.bench.env import machine_info
from spattn.distributed import simulate


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}" if x >= 2**20 else f"{x / 2**20:.2f}"


def table(result: dict) -> str:
    rows = result["rows"]
    lens = sorted({r["seq_len"] for r in rows})
    worlds = sorted({r["world_size"] for r in rows})
    out = ["| tokens | ranks | window ctx | dynamic ctx | dense ctx | head (any pattern) |",
           "|---|---|---|---|---|---|"]
    for L in lens:
        for W in worlds:
            got = {(r["pattern"], r["mode"]): r for r in rows if r["seq_len"] == L and r["world_size"] == W}
            cells = [mib(got[(p, "context")]["fwd_bwd_max_bytes"]) for p in ("window", "dynamic", "dense")]
            head = got[("window", "head")]
            cells.append("n/a (ranks > heads)" if "note" in head else mib(head["fwd_bwd_max_bytes"]))
            out.append(f"| {L // 1024}k | {W} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def balancers(seq_len: int = 32768, world_size: int = 8) -> dict:
    import spattn
    from spattn.distributed import Sharding, layer_bytes, torch_cp

    rows = []
    for name, pattern in (("sinks_window", spattn.Sinks(64) | spattn.Window(4096)), ("causal", spattn.Causal())):
        layout = spattn.compile(pattern, seq_len, causal=True)
        for balancer, sharding in (("spattn", Sharding.balanced(layout, world_size=world_size)),
                                   ("torch_ptrr", torch_cp.ptrr_sharding(layout, world_size=world_size)),
                                   ("contiguous", Sharding.contiguous(seq_len, world_size))):
            work = sharding.work(layout)
            got = layer_bytes(layout, seq_len, world_size=world_size, mode="context", heads=32, kv_heads=8,
                              head_dim=128, sharding=sharding)
            both = [f + b for f, b in zip(got["forward"], got["backward"], strict=True)]
            rows.append({"pattern": name, "balancer": balancer, "max_over_mean_work": float(work.max() / work.mean()),
                         "fwd_bwd_max_bytes": max(both), "fwd_bwd_mean_bytes": sum(both) / len(both)})
    lines = ["| pattern | balancer | max / mean work | fwd+bwd MiB per rank (max) |", "|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['balancer']} | {r['max_over_mean_work']:.3f} | {mib(r['fwd_bwd_max_bytes'])} |"
              for r in rows]
    return {"seq_len": seq_len, "world_size": world_size, "rows": rows, "table_md": "\n".join(lines)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/cpu/distributed/simulation.json")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--dynamic-blocks", type=int, default=16)
    p.add_argument("--balancers", action="store_true", help="compare the balancers instead")
    args = p.parse_args()
    if args.balancers:
        result = balancers()
        result["machine"] = machine_info()
        default = "benchmarks/results/cpu/distributed/balancers.json"
        path = Path(args.out if args.out != p.get_default("out") else default)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(result["table_md"])
        print(f"\nwrote {path}")
        return
    result = simulate(seq_lens=tuple(args.seq_lens), world_sizes=tuple(args.world_sizes),
                      dynamic_blocks=args.dynamic_blocks)
    result["machine"] = machine_info()
    result["units"] = "bytes sent per rank per attention layer; max and mean over ranks"
    result["table_md"] = table(result)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("forward + backward MiB sent per rank per layer (max over ranks); Llama-8B-like layer: 32 query heads, "
          "8 key/value heads, head dim 128, bf16, batch 1\n")
    print(result["table_md"])
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
