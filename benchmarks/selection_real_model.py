"""Dynamic selection against sinks + window at equal measured key budget, on SmolLM2-135M (issue 12).

Three tasks, one JSON each (machine, versions, git commit, command):

    # per layer and head: true recall at equal budget and where the missed mass sits (captured q/k, offline)
    PYTHONPATH=src python benchmarks/selection_real_model.py recall --length 4096 --layers 2 9 16 23 29 \
        --out benchmarks/results/cpu/selection/recall-4096.json
    # perplexity, top-1 agreement, KL (spattn.eval.lm.compare_lm) with percentile-bootstrap intervals over chunks
    PYTHONPATH=src python benchmarks/selection_real_model.py lm --length 4096 --chunks 4 \
        --out benchmarks/results/cpu/selection/lm-4096.json
    # a 5-digit pass key in Austen text at depths 0.1 / 0.5 / 0.9, greedy answer checked by teacher forcing
    PYTHONPATH=src python benchmarks/selection_real_model.py passkey --length 4096 --samples 2 \
        --out benchmarks/results/cpu/selection/passkey-4096.json
    # H200 (8192 tokens): add --device cuda --backend auto (the triton kernels)

Variants per budget (``--budgets`` in keys per query, token-exact over layers and heads, causal): the best
``Sinks(s) | Window(w)`` over ``s`` in ``--sinks`` at that budget, and ``Adaptive(selector, keys, sinks=64,
window=w0, block=64)``. Every variant's measured keys per query is recorded next to its result.
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))

import argparse
import json
import math
import platform
import random
import subprocess
import time

import torch
import torch.nn.functional as F

import spattn
from spattn.layout import tables as _tables
from spattn.selectors import Adaptive


# ------------------------------------------------------------------------------------------- variants
def window_for(budget: float, sinks: int, length: int, block_size: int) -> int:
    """Largest window with ``Sinks(sinks) | Window(w)`` at or under ``budget`` keys per query (causal)."""
    lo, hi = 0, length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lay = spattn.compile(spattn.Sinks(sinks) | spattn.Window(mid), length, causal=True, block_size=block_size)
        if float(lay.allowed_pairs().mean()) / length <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def variants(budget: int, length: int, block_size: int, args) -> list[tuple[str, spattn.Pattern]]:
    out = []
    for s in args.sinks:
        w = window_for(budget, s, length, block_size)
        out.append((f"Sinks({s}) | Window({w})", spattn.Sinks(s) | spattn.Window(w)))
    for sel in args.selectors:
        for w0 in args.local_windows:
            opts = {"queries": args.probe_queries} if sel == "probe" else {}
            p = Adaptive(sel, budget, sinks=64, window=w0, block=args.select_block, sharing=args.sharing,
                         options=opts)
            out.append((f"Adaptive({sel!r}, {budget}, sinks=64, window={w0}, block={args.select_block}, "
                        f"sharing={args.sharing!r})", p))
    return out


# ------------------------------------------------------------------------------------------- helpers
def environment(args) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "spattn": spattn.__version__,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "device": args.device,
           "note": "CPU shared with other developers: timings are not speed claims"}
    if args.device == "cuda":
        env["card"] = torch.cuda.get_device_name()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True, cwd=_HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return env


def bootstrap(values: list[float], reps: int = 2000, seed: int = 0) -> list[float]:
    """Percentile-bootstrap 95% interval of the mean over chunks."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(reps))
    return [means[int(0.025 * reps)], means[int(0.975 * reps) - 1]]


class KeyCounter:
    """``spattn.integrations.hf.hook`` callback: keys per query of ``pattern`` in the first ``calls`` attention
    calls (the first chunk's layers), token-exact, from the q/k the model really used."""

    def __init__(self, pattern, block_size: int, calls: int):
        self.pattern, self.block_size, self.calls, self.keys = pattern, block_size, calls, []

    def __call__(self, module, layer, query, key) -> None:
        if len(self.keys) >= self.calls:
            return
        lay = spattn.compile(self.pattern, query.shape[2], key.shape[2], causal=True, block_size=self.block_size,
                             batch=query.shape[0], heads=query.shape[1], query=query, key=key)
        self.keys.append(float(lay.allowed_pairs().mean()) / query.shape[2])

    @property
    def mean(self) -> float:
        return sum(self.keys) / len(self.keys)


def load(args):
    from spattn.integrations.models import load_smollm2

    model, tok = load_smollm2()
    model = model.to(args.device).eval()
    return model, tok


# ------------------------------------------------------------------------------------------- tasks
def dense_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float, rows: int = 512) -> torch.Tensor:
    """float16 ``[H, L, L]``: the causal softmax of one sequence, kept once per layer to score many layouts."""
    from spattn.selectors.common import group_matmul

    L = query.shape[2]
    out = torch.empty(query.shape[1], L, L, dtype=torch.float16, device=query.device)
    j = torch.arange(L, device=query.device)[None]
    for i0 in range(0, L, rows):
        i = torch.arange(i0, min(L, i0 + rows), device=query.device)[:, None]
        logits = group_matmul(query[:, :, i0:i0 + rows].float(), key.float())[0] * scale
        out[:, i0:i0 + rows] = torch.softmax(logits.masked_fill(j > i, -math.inf), -1).half()
    return out


def layout_recall(layout: spattn.Layout, probs: torch.Tensor, sinks: int = 64, local: int = 512) -> dict:
    """Per head: kept mass (recall) and the missed mass on the sinks / local / far keys (mean over queries)."""
    slot, tiles = _tables.unpack(layout)[1], _tables.tiles(layout.masks)
    bs, L = layout.block_size, layout.q_len
    H = probs.shape[0]
    kept = torch.zeros(H, dtype=torch.float64)
    missed = {r: torch.zeros(H, dtype=torch.float64) for r in ("sinks", "local", "far")}
    j = torch.arange(L)[None]
    for qb0 in range(0, layout.num_q_blocks, 4):
        part = tiles[slot[:, :, qb0:qb0 + 4]].cpu()
        n = part.shape[2]
        m = part.permute(0, 1, 2, 4, 3, 5).reshape(part.shape[0], part.shape[1], n * bs, -1)[0, :, :, :L]
        p = probs[:, qb0 * bs:qb0 * bs + n * bs].float().cpu()
        m = m[:, : p.shape[1]]
        kept += (p * m).sum((-1, -2)).double()
        i = torch.arange(qb0 * bs, qb0 * bs + p.shape[1])[:, None]
        region = {"sinks": j < sinks}
        region["local"] = ~region["sinks"] & (i - j < local)
        region["far"] = ~region["sinks"] & ~region["local"]
        lost = p * ~m
        for r in missed:
            missed[r] += (lost * region[r]).sum((-1, -2)).double()
    return {"recall": (kept / L).tolist(), **{f"missed_{r}": (v / L).tolist() for r, v in missed.items()}}


def task_recall(args, model, tok, save) -> dict:
    """Captured q/k of one held-out chunk; per variant and layer the true recall per head (the dense softmax
    computed once per layer), keys per query token-exact, and where the missed mass sits."""
    from spattn.data.chunks import text_chunks

    ids = text_chunks(args.text, tok, args.length, split="held_out", max_chunks=1)
    cap = spattn.capture(model, ids.to(args.device), layers=args.layers, mode="full")
    probs = {layer: dense_probabilities(cap.queries[layer], cap.keys[layer], cap.scale) for layer in cap.layers}
    plans = [(b, n, p) for b in args.budgets for n, p in variants(b, args.length, args.block_size, args)]
    plans += [(0, n, p) for n, p in extra_variants(args)]
    rows = []
    for budget, name, pattern in plans:
        per_layer = {}
        for layer in cap.layers:
            q, k = cap.queries[layer], cap.keys[layer]
            lay = spattn.compile(pattern, q.shape[2], causal=True, block_size=args.block_size, batch=1,
                                 heads=q.shape[1], query=q, key=k)
            per_layer[layer] = {"keys_per_query": float(lay.allowed_pairs().mean()) / q.shape[2],
                                **layout_recall(lay, probs[layer])}
        n = len(per_layer)
        row = {"budget": budget, "variant": name, "pattern": pattern.to_dict(),
               "keys_per_query": sum(v["keys_per_query"] for v in per_layer.values()) / n,
               **{m: sum(sum(v[m]) / len(v[m]) for v in per_layer.values()) / n
                  for m in ("recall", "missed_sinks", "missed_local", "missed_far")},
               "per_layer": per_layer}
        rows.append(row)
        print(f"{budget:5d} {name:75s} keys {row['keys_per_query']:7.1f} recall {row['recall']:.4f} missed sinks "
              f"{row['missed_sinks']:.4f} local {row['missed_local']:.4f} far {row['missed_far']:.4f}", flush=True)
        save({"rows": rows, "layers": cap.layers})
    return {"rows": rows, "layers": cap.layers}


def extra_variants(args) -> list[tuple[str, spattn.Pattern]]:
    """The steps of docs/selection.md's table that are not a budget's default variants (``--ablation``)."""
    if not args.ablation:
        return []
    from spattn.selectors import TopK

    S, W = spattn.Sinks, spattn.Window
    out = [("Sinks(64) | Window(64) | TopK('pooled', 1)", S(64) | W(64) | TopK("pooled", 1)),
           ("Sinks(64) | Window(64) | TopK('vertical_slash', 1)", S(64) | W(64) | TopK("vertical_slash", 1))]
    for b in args.budgets:
        out += [(f"Adaptive('pooled', {b}, sinks=64, window=64, block=64)", Adaptive("pooled", b, sinks=64, window=64)),
                (f"Adaptive('probe', {b}, sinks=64, window=64, block=64)", Adaptive("probe", b, sinks=64, window=64)),
                (f"Adaptive('probe', {b}, sinks=64, window=64, block=32)",
                 Adaptive("probe", b, sinks=64, window=64, block=32)),
                (f"Adaptive('probe', {b}, sinks=64, window=64, block=64, sharing='head')",
                 Adaptive("probe", b, sinks=64, window=64, sharing="head"))]
    return out


def chunk_metrics(dense: torch.Tensor, sparse: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-chunk metrics as ``spattn.eval.lm.compare_lm`` defines them (dense / sparse NLL, top-1 agreement,
    mean KL(dense || sparse) per predicted token)."""
    log_d, log_s = F.log_softmax(dense, -1), F.log_softmax(sparse, -1)
    n = target.numel()
    return {"dense_nll": float(F.nll_loss(log_d.flatten(0, 1), target.flatten(), reduction="sum")) / n,
            "sparse_nll": float(F.nll_loss(log_s.flatten(0, 1), target.flatten(), reduction="sum")) / n,
            "top1_agreement": int((dense.argmax(-1) == sparse.argmax(-1)).sum()) / n,
            "mean_kl": float((log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0).sum()) / n}


def task_lm(args, model, tok, save) -> dict:
    """Dense logits once per chunk (the model's own SDPA, as compare_lm's dense run), then every variant under
    ``spattn.integrations.hf.patched`` on the same chunk; per-chunk metrics as compare_lm defines them."""
    from spattn.data.chunks import text_chunks
    from spattn.integrations.hf import hook, patched

    chunks = text_chunks(args.text, tok, args.length, split="held_out", max_chunks=args.chunks)
    plans = [(budget, name, pattern) for budget in args.budgets
             for name, pattern in variants(budget, args.length, args.block_size, args)]
    rows = [{"budget": b, "variant": n, "pattern": p.to_dict(), "per_chunk": [], "keys": []} for b, n, p in plans]
    out = {"rows": rows, "chunks": 0}
    for c in range(chunks.shape[0]):
        ids = chunks[c:c + 1].to(args.device)
        with torch.no_grad():
            dense = model(input_ids=ids).logits[:, :-1].float()
        for row, (budget, name, pattern) in zip(rows, plans, strict=True):
            counter = KeyCounter(pattern, args.block_size, model.config.num_hidden_layers)
            t = time.perf_counter()
            with patched(model, pattern, backend=args.backend), hook(counter), torch.no_grad():
                sparse = model(input_ids=ids).logits[:, :-1].float()
            if not bool(torch.isfinite(sparse).all()):
                raise FloatingPointError(f"{name}: non-finite logits")
            m = chunk_metrics(dense, sparse, ids[:, 1:])
            m["seconds"] = time.perf_counter() - t
            row["per_chunk"].append(m)
            row["keys"].append(counter.mean)
            print(f"chunk {c} {budget:5d} {name:60s} keys {counter.mean:7.1f} ppl {math.exp(m['sparse_nll']):.3f} "
                  f"(dense {math.exp(m['dense_nll']):.3f}) top1 {m['top1_agreement']:.4f} KL {m['mean_kl']:.4f}",
                  flush=True)
        out["chunks"] = c + 1
        summarise(rows)
        save(out)
    return out


def summarise(rows: list[dict]) -> None:
    """Means over chunks, percentile-bootstrap intervals, and paired differences against the best window."""
    for r in rows:
        pc = r["per_chunk"]
        n = len(pc)
        mean = {k: sum(c[k] for c in pc) / n for k in ("dense_nll", "sparse_nll", "top1_agreement", "mean_kl")}
        r.update(keys_per_query=sum(r["keys"]) / len(r["keys"]), perplexity=math.exp(mean["sparse_nll"]),
                 dense_perplexity=math.exp(mean["dense_nll"]), top1_agreement=mean["top1_agreement"],
                 mean_kl=mean["mean_kl"],
                 interval_perplexity=[math.exp(v) for v in bootstrap([c["sparse_nll"] for c in pc])],
                 interval_top1=bootstrap([c["top1_agreement"] for c in pc]),
                 interval_kl=bootstrap([c["mean_kl"] for c in pc]))
    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget]
        best = min((r for r in group if r["variant"].startswith("Sinks(")), key=lambda r: r["perplexity"])
        for r in group:
            r["best_window"] = best["variant"]
            for metric in ("sparse_nll", "mean_kl", "top1_agreement"):
                diffs = [a[metric] - b[metric] for a, b in zip(r["per_chunk"], best["per_chunk"], strict=True)]
                r[f"paired_{metric}_minus_best_window"] = {"mean": sum(diffs) / len(diffs),
                                                           "interval": bootstrap(diffs)}
            gap = best["perplexity"] - best["dense_perplexity"]
            r["share_of_window_gap_closed"] = (best["perplexity"] - r["perplexity"]) / gap if gap > 0 else None


def passkey_prompt(tok, filler_ids, length: int, depth: float, key: str):
    """Token ids: Austen filler with the pass key sentence at ``depth``, then the question; and the answer ids."""
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False).input_ids
    question = tok(" What is the pass key? The pass key is", add_special_tokens=False).input_ids
    answer = tok(f" {key}", add_special_tokens=False).input_ids
    room = length - len(needle) - len(question) - len(answer)
    at = int(room * depth)
    ids = filler_ids[:at] + needle + filler_ids[at:room] + question + answer
    return torch.tensor([ids]), len(answer), at


def task_passkey(args, model, tok, save) -> dict:
    from spattn.data.corpora import load_text
    from spattn.integrations.hf import hook, patched

    text = load_text(args.text)
    filler = tok(text[: len(text) // 2][: args.length * 8], add_special_tokens=False).input_ids
    rng = random.Random(args.seed)
    samples = []
    for depth in args.depths:
        for _ in range(args.samples):
            key = str(rng.randrange(10000, 100000))
            start = rng.randrange(0, max(1, len(filler) - args.length))
            samples.append((depth, key, filler[start:start + args.length]))
    plans = [("dense", None)]
    for budget in args.budgets:
        plans += variants(budget, args.length, args.block_size, args)
    rows = []
    for name, pattern in plans:
        found = {str(d): 0 for d in args.depths}
        keys = KeyCounter(pattern, args.block_size, model.config.num_hidden_layers) if pattern is not None else None
        for depth, key, fill in samples:
            ids, n_answer, at = passkey_prompt(tok, fill, args.length, depth, key)
            ids = ids.to(args.device)
            if pattern is None:
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
            else:
                with patched(model, pattern, backend=args.backend), hook(keys), torch.no_grad():
                    logits = model(input_ids=ids).logits
            pred = logits[0, -n_answer - 1:-1].argmax(-1)
            ok = bool((pred == ids[0, -n_answer:]).all())  # greedy decoding would print the key
            found[str(depth)] += ok
        rows.append({"variant": name, "pattern": None if pattern is None else pattern.to_dict(),
                     "keys_per_query": None if keys is None else keys.mean,
                     "approximate_key_distance": [args.length - int((args.length - 40) * d) for d in args.depths],
                     "found_per_depth": found, "samples_per_depth": args.samples,
                     "found": sum(found.values()), "samples": len(samples)})
        print(f"{name:60s} found {sum(found.values())}/{len(samples)} per depth {found}", flush=True)
        save({"rows": rows, "depths": args.depths})
    return {"rows": rows, "depths": args.depths}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["recall", "lm", "passkey"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--text", default="austen")
    parser.add_argument("--budgets", type=int, nargs="+", default=[246, 492], help="keys per query (6%%, 12%% of 4096)")
    parser.add_argument("--sinks", type=int, nargs="+", default=[64], help="sinks of the sinks + window baselines")
    parser.add_argument("--selectors", nargs="+", default=["probe"])
    parser.add_argument("--local-windows", type=int, nargs="+", default=[64], help="Adaptive's own window")
    parser.add_argument("--probe-queries", type=int, default=4)
    parser.add_argument("--ablation", action="store_true", help="recall: also the steps of docs/selection.md")
    parser.add_argument("--select-block", type=int, default=64)
    parser.add_argument("--sharing", default="group", choices=["group", "head"])
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default="dense", help="spattn backend (dense: SDPA with the exact token mask)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--samples", type=int, default=2, help="pass keys per depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok = load(args)
    started = time.perf_counter()

    def save(result: dict) -> None:
        record = {"task": args.task, "model": "SmolLM2-135M", "text": args.text, "length": args.length,
              "budgets": args.budgets, "backend": args.backend, "block_size": args.block_size,
              "environment": environment(args), "seconds": time.perf_counter() - started,
              "command": "PYTHONPATH=src python benchmarks/selection_real_model.py " + " ".join(
                  sys.argv[1:] if argv is None else argv), **result}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")

    task = {"recall": task_recall, "lm": task_lm, "passkey": task_passkey}[args.task]
    save(task(args, model, tok, save))


if __name__ == "__main__":
    main()
