"""The report's figures (matplotlib, PNG). Every plotted value is read from the results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spattn._optional import require

_FAMILY_COLORS = {
    "window": "#7f7f7f", "sinks_window": "#1f77b4", "strided": "#9467bd", "random": "#8c564b",
    "budgeted": "#2ca02c", "plan": "#17becf", "learned": "#000000", "hierarchical": "#bc8f00",
}
_SELECTOR_COLORS = {"pooled": "#d62728", "vertical_slash": "#ff7f0e", "antidiagonal": "#e377c2", "bounds": "#bcbd22"}
_MARKERS = {"window": "s", "sinks_window": "o", "strided": "^", "random": "v", "budgeted": "D", "top_p": "*",
            "plan": "P", "learned": "X", "hierarchical": "h"}


def series_key(rec: dict[str, Any]) -> str:
    return f"top_p:{rec['selector']}" if rec["family"] == "top_p" else rec["family"]


def series_label(rec: dict[str, Any]) -> str:
    return f"Adaptive {rec['selector']}" if rec["family"] == "top_p" else rec["family_title"]


def color(rec: dict[str, Any]) -> str:
    if rec["family"] == "top_p":
        return _SELECTOR_COLORS.get(rec["selector"], "#17becf")
    return _FAMILY_COLORS.get(rec["family"], "#333333")


def _plt():
    mpl = require("matplotlib", extra="viz")
    mpl.use("Agg", force=True)
    return require("matplotlib.pyplot", extra="viz")


def _plain_log(axis) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(fmt)


def _int_ticks(ax, y: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _wrap(text: str, width: int = 34) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True))


def _legend_below(fig, axes) -> None:
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(len(seen), 5), frameon=False,
                   fontsize=8)


def _by_series(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["cost"]["keys_fraction"]):
        out.setdefault(series_key(r), []).append(r)
    return out


def _recommended(results: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    by_id = {r["id"]: r for r in results["candidates"]}
    return [(x["budget"], by_id[x["candidate"]]) for x in results["recommendations"] if x["candidate"] in by_id]


def pareto_figure(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    recs = results["candidates"]
    dense = results["dense"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [
        ("perplexity", lambda r: r["model"]["perplexity_ratio"], "held-out perplexity / dense (log)", True),
        ("recall", lambda r: r["recall"]["mean"], "mean attention recall", False),
        (None, lambda r: r["latency"]["median_ms"], f"attention latency, ms ({results['backends']['latency']})", True),
    ]
    rec_ids = {r["id"] for _, r in _recommended(results)}
    for ax, (front, value, ylabel, logy) in zip(axes, panels, strict=True):
        for rows in _by_series(recs).values():
            ax.plot([r["cost"]["keys_fraction"] for r in rows], [value(r) for r in rows],
                    marker=_MARKERS[rows[0]["family"]], color=color(rows[0]), label=series_label(rows[0]),
                    linestyle="-", linewidth=0.8, markersize=6, alpha=0.9)
        for r in recs:
            if r["id"] in rec_ids:
                ax.scatter([r["cost"]["keys_fraction"]], [value(r)], s=260, facecolors="none", edgecolors="black",
                           linewidths=1.6, zorder=5)
        if front:
            ids = results["frontier"][front]
            pts = sorted((r["cost"]["keys_fraction"], value(r)) for r in recs if r["id"] in ids)
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", linewidth=1.2,
                    linestyle=":", label="Pareto frontier")
        for b in results["config"]["budgets"]:
            ax.axvline(b, color="#bbbbbb", linestyle="--", linewidth=0.8, zorder=0)
        if front == "perplexity":
            ax.axhline(1.0, color="black", linewidth=1, label="dense")
        elif front is None:
            ax.axhline(dense["latency"]["spattn_causal_ms"], color="black", linewidth=1, label="dense (same backend)")
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        if logy:
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        ax.set_xlabel("cost: fraction of dense causal keys (log)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_title("cost vs model damage")
    axes[1].set_title("cost vs coverage")
    axes[2].set_title("cost vs measured latency")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def heatmap_figure(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    recs = _recommended(results)
    n = max(1, len(recs))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1, 5.2), squeeze=False)
    im = None
    for ax, (budget, r) in zip(axes[0], recs, strict=False):
        im = ax.imshow(r["recall"]["per_layer_head_mean"], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_title(_wrap(f"budget {budget:g}: {r['label']}"), fontsize=8)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        _int_ticks(ax)
    for ax in axes[0][len(recs):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="mean recall", shrink=0.85)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def layout_figure(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    from matplotlib.colors import ListedColormap

    recs = _recommended(results)
    n = max(1, len(recs))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.9), squeeze=False)
    bs = results["config"]["block_size"]
    for ax, (budget, r) in zip(axes[0], recs, strict=False):
        pic = r["picture"]
        ax.imshow(pic["block_status"], cmap=ListedColormap(["#f4f4f4", "#8fb3d9", "#1f4e79"]), vmin=0, vmax=2,
                  interpolation="nearest")
        ax.set_title(_wrap(f"budget {budget:g}: {r['label']}") + f"\n(layer {pic['layer']}, head {pic['head']})",
                     fontsize=8)
        ax.set_xlabel(f"key block ({bs} tokens)")
        ax.set_ylabel("query block")
        _int_ticks(ax)
    for ax in axes[0][len(recs):]:
        ax.axis("off")
    from matplotlib.patches import Patch

    legend = [Patch(facecolor="#1f4e79", label="full block (every pair kept)"),
              Patch(facecolor="#8fb3d9", label="partial block (token mask)"),
              Patch(facecolor="#f4f4f4", edgecolor="#bbbbbb", label="skipped block")]
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles=legend, loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def lengths_figure(results: dict[str, Any], path: Path) -> None:
    """Perplexity over dense of each budget's pick and runner-up at every length."""
    plt = _plt()
    lengths = [results["data"]["chunk_length"]] + [x["length"] for x in results["lengths"]]
    tables = [{c["id"]: c for c in results["candidates"]}] + [{c["id"]: c for c in x["candidates"]}
                                                              for x in results["lengths"]]
    denses = [results["dense"]] + [x["dense"] for x in results["lengths"]]
    budgets = results["config"]["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.2), squeeze=False, sharey=True)
    for ax, rec in zip(axes[0], results["recommendations"], strict=True):
        for cid, style in ((rec.get("candidate"), "-"), (rec.get("runner_up"), "--")):
            if cid is None:
                continue
            xs, ys, lo, hi = [], [], [], []
            for n, table in zip(lengths, tables, strict=True):
                c = table.get(cid)
                if c is None:
                    continue
                d = denses[lengths.index(n)]["perplexity"]
                xs.append(n)
                ys.append(c["model"]["perplexity"] / d)
                lo.append(c["model"]["perplexity"] / d - c["model"]["perplexity_interval"][0] / d)
                hi.append(c["model"]["perplexity_interval"][1] / d - c["model"]["perplexity"] / d)
            if xs:
                first = tables[0][cid]
                ax.errorbar(xs, ys, yerr=[lo, hi], color=color(first), marker=_MARKERS[first["family"]],
                            linestyle=style, capsize=3, label=("pick: " if style == "-" else "runner-up: ")
                            + series_label(first))
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_title(f"budget {rec['budget']:g}")
        ax.set_xlabel("tokens")
        ax.grid(True, alpha=0.25)
    axes[0][0].set_ylabel("perplexity / dense perplexity")
    _legend_below(fig, axes[0])
    fig.savefig(path, dpi=80)
    plt.close(fig)


def reach_figure(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    budgets = results["config"]["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for r in results["candidates"]:
            if r["budget"] != b:
                continue
            frac = r["reach"]["fraction"]
            ax.plot(range(1, len(frac) + 1), frac, color=color(r), marker=_MARKERS[r["family"]], markersize=3,
                    linewidth=1, label=series_label(r))
        ax.set_title(f"budget {b:g}")
        ax.set_xlabel("layers")
        ax.grid(True, alpha=0.25)
        _int_ticks(ax, y=False)
    axes[0][0].set_ylabel("reachable (token, source) pairs")
    _legend_below(fig, axes[0])
    fig.savefig(path, dpi=80)
    plt.close(fig)


def recall_layer_figure(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    budgets = results["config"]["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for r in results["candidates"]:
            if r["budget"] != b:
                continue
            vals = r["recall"]["per_layer_mean"]
            ax.plot(range(len(vals)), vals, color=color(r), marker=_MARKERS[r["family"]], markersize=3, linewidth=1,
                    label=series_label(r))
        ax.set_title(f"budget {b:g}")
        ax.set_xlabel("layer")
        _int_ticks(ax, y=False)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.25)
    axes[0][0].set_ylabel("mean recall")
    _legend_below(fig, axes[0])
    fig.savefig(path, dpi=80)
    plt.close(fig)


FIGURES = {
    "pareto": ("pareto.png", pareto_figure, "Pareto curves: cost against held-out perplexity, mean recall and latency"),
    "recall_by_layer": ("recall_by_layer.png", recall_layer_figure, "Mean recall per layer, per budget"),
    "recall_heatmaps": ("recall_heatmaps.png", heatmap_figure, "Recall per layer and head of the recommended patterns"),
    "layouts": ("layouts.png", layout_figure, "Block layouts of the recommended patterns"),
    "reachability": ("reachability.png", reach_figure, "Reachability against depth"),
    "lengths": ("lengths.png", lengths_figure, "Perplexity over dense of each budget's pick and runner-up at every "
                "length (bars: 95% bootstrap intervals)"),
}


def write_figures(results: dict[str, Any], folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (filename, draw, _) in FIGURES.items():
        if not results["candidates"]:
            continue
        draw(results, folder / filename)
        out[name] = f"figures/{filename}"
    return out
