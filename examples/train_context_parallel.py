"""Train a small Llama-shaped model with a sparse plan under context parallelism (or head parallelism).

CPU (gloo), 2 ranks:    torchrun --nproc-per-node 2 examples/train_context_parallel.py
GPUs (NCCL), 4 ranks:   torchrun --nproc-per-node 4 examples/train_context_parallel.py --seq-len 65536 --steps 50
Head-parallel instead:  ... examples/train_context_parallel.py --mode head
Dynamic selection:      ... examples/train_context_parallel.py --dynamic

Byte-level language model on Jane Austen (spattn.data, offline). Every rank holds the rows of its balanced
shard (spattn.distributed.Sharding) with their global position ids; gradients are summed over the ranks.
Before training, rank 0 checks that the sharded loss equals the single-process loss of the same model.
Needs the hf extra (pip install 'spattn[hf]') and the Austen corpus (spattn data prepare austen).
"""

import argparse
import copy
import json
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import spattn
import spattn.distributed as sd


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("context", "head"), default="context")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--dynamic", action="store_true", help="add TopP('pooled', 0.9) to the window")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args()


def byte_batches(text: str, seq_len: int, batch: int, seed: int):
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)  # the same batches on every rank
    while True:
        start = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        yield torch.stack([data[s: s + seq_len + 1] for s in start.tolist()])


def loss_sum(model, ids, labels, positions):
    logits = model(input_ids=ids, position_ids=positions).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    reference = copy.deepcopy(model)  # single-process copy, for the equality check

    pattern = spattn.Sinks(args.sinks) | spattn.Window(args.window)
    if args.dynamic:
        pattern = pattern | spattn.TopP("pooled", 0.9)
    plan = spattn.Plan.uniform(pattern)
    if args.mode == "context":
        sharding = sd.Sharding.balanced(pattern, args.seq_len, world_size=world, causal=True)
    else:
        sharding = sd.Sharding.contiguous(args.seq_len, world)
    sd.plan(model, plan, mesh, mode=args.mode, sharding=sharding)
    spattn.patch(reference, plan)
    positions = sharding.positions(rank).to(device)[None].expand(args.batch, -1)
    tokens = args.batch * args.seq_len

    batches = byte_batches(spattn.data.load_text("austen"), args.seq_len, args.batch, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log = []
    for step in range(args.steps):
        batch = next(batches).to(device)
        ids, labels = batch[:, :-1], batch[:, 1:]
        start = time.perf_counter()
        with sd.count_bytes() as traffic:
            local = loss_sum(model, sharding.shard(ids, rank, dim=1), sharding.shard(labels, rank, dim=1), positions)
            (local / tokens).backward()
        for p in model.parameters():  # every rank saw different rows: sum their gradients
            dist.all_reduce(p.grad)
        total = local.detach().clone()
        dist.all_reduce(total)
        if step == 0:
            with torch.no_grad():
                single = loss_sum(reference, ids, labels, torch.arange(args.seq_len, device=device)[None])
            err = abs(float(total) - float(single)) / tokens
            if rank == 0:
                print(f"check: sharded loss {float(total) / tokens:.6f} vs single-process {float(single) / tokens:.6f}"
                      f" (|diff| {err:.2e})")
            if err > 1e-4:
                raise SystemExit(f"sharded loss differs from the single-process loss by {err:.2e}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        row = {"step": step, "loss": float(total) / tokens, "seconds": seconds,
               "attention_bytes_sent": traffic.total()}
        log.append(row)
        if rank == 0:
            print(json.dumps(row))
    if rank == 0:
        print(f"{args.mode} parallel, {world} ranks, {args.seq_len} tokens, {pattern!r}: loss "
              f"{log[0]['loss']:.3f} -> {log[-1]['loss']:.3f} in {len(log)} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
