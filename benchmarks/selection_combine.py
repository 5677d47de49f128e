"""Combine ``selection_real_model.py lm`` runs over disjoint held-out chunks (one run, then ``--first-chunk``
runs that extend it) into one table with intervals over chunks and over 512-token segments (issue 12).

    PYTHONPATH=src python benchmarks/selection_combine.py run0.json run1.json --out combined.json

Per budget and variant: perplexity over all chunks, top-1 agreement, mean KL, keys per query, and against the
best sinks + window paired bootstrap differences of the per-chunk and per-segment NLL and KL
(``spattn.eval.stats.compare``) and the share of the window -> dense gap closed (``stats.gap_closed``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from spattn.eval import stats


def rows_of(path: Path, length: str) -> dict[str, dict]:
    data = json.loads(path.read_text())
    entry = data["lm"][length]
    out = {}
    for budget, group in entry["budgets"].items():
        for r in group["rows"]:
            out[f"{budget}|{r['role']}"] = {"variant": r["variant"], "per_chunk": r["per_chunk"],
                                            "per_segment": r["per_segment"], "keys": r.get("keys", []),
                                            "first_chunk": entry.get("first_chunk", 0)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--length", default="4096")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    merged: dict[str, dict] = {}
    for path in args.runs:
        for key, r in rows_of(path, args.length).items():
            m = merged.setdefault(key, {"variant": r["variant"], "per_chunk": [], "per_segment": [], "keys": []})
            m["per_chunk"] += r["per_chunk"]
            m["per_segment"] += r["per_segment"]
            m["keys"] += r["keys"]
    budgets = sorted({k.split("|")[0] for k in merged}, key=int, reverse=True)
    table = {"length": int(args.length), "runs": [str(p) for p in args.runs], "budgets": {}}
    for budget in budgets:
        group = {role.split("|")[1]: r for role, r in merged.items() if role.startswith(f"{budget}|")}
        n = min(len(r["per_chunk"]) for r in group.values())
        window, dense = group["best_window"], group["dense"]
        out = {}
        for role, r in group.items():
            nll = [c["nll"] for c in r["per_chunk"][:n]]
            row = {"variant": r["variant"], "chunks": n, "perplexity": math.exp(sum(nll) / n),
                   "top1_agreement": sum(c["agree"] for c in r["per_chunk"][:n]) / n,
                   "mean_kl": sum(c["kl"] for c in r["per_chunk"][:n]) / n,
                   "keys_per_query": (sum(r["keys"]) / len(r["keys"])) if r["keys"] else None}
            if role not in ("dense", "best_window"):
                segs = len(window["per_segment"]) if n == len(window["per_chunk"]) else None
                w_seg, r_seg = window["per_segment"][:segs], r["per_segment"][:segs]
                row["versus_window"] = {
                    "nll_chunks": stats.compare([c["nll"] for c in r["per_chunk"][:n]],
                                                [c["nll"] for c in window["per_chunk"][:n]],
                                                higher_is_better=False).to_dict(),
                    "nll_segments": stats.compare([s["nll"] for s in r_seg], [s["nll"] for s in w_seg],
                                                  higher_is_better=False).to_dict(),
                    "kl_segments": stats.compare([s["kl"] for s in r_seg], [s["kl"] for s in w_seg],
                                                 higher_is_better=False).to_dict()}
                row["gap_closed"] = stats.gap_closed(nll, [c["nll"] for c in window["per_chunk"][:n]],
                                                     [c["nll"] for c in dense["per_chunk"][:n]]).to_dict()
            out[role] = row
        table["budgets"][budget] = out
    args.out.write_text(json.dumps(table, indent=1))
    for budget, out in table["budgets"].items():
        for role, row in out.items():
            extra = ""
            if "gap_closed" in row:
                g, v = row["gap_closed"], row["versus_window"]["nll_segments"]
                extra = (f" gap closed {g['value']:.2f} [{g['low']:.2f}, {g['high']:.2f}]; nll vs window (segments) "
                         f"{v['difference']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]")
            print(f"{budget:>4} {row['variant'][:72]:72s} chunks {row['chunks']} ppl {row['perplexity']:.3f} "
                  f"top1 {row['top1_agreement']:.4f} KL {row['mean_kl']:.4f}{extra}")


if __name__ == "__main__":
    main()
