"""PNG figures of evaluation results (matplotlib, the ``viz`` extra); every value is read from a result dict.

* :func:`heatmap_figure`: accuracy over needle depth x context length, one panel per plan (needle tests).
* :func:`bars_figure`: one score per configuration with its interval (trained models, plans).
* :func:`ablation_figure`: score against the value of the ablated factor, with intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spattn._optional import require


def _pyplot() -> Any:
    matplotlib = require("matplotlib", extra="viz")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot", extra="viz")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def heatmap_figure(panels: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy heatmaps, depth (rows) x length (columns), one panel per entry of ``panels``.

    ``panels`` maps a plan name to its cells ``[{"length", "depth", "value"}, ...]`` (the ``cells`` of
    :func:`spattn.eval.retrieval.retrieval_grid`). Each cell is annotated with its accuracy."""
    if not panels:
        raise ValueError("panels must hold at least one plan's cells")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.8, 3.4), squeeze=False)
    image = None
    for ax, (name, cells) in zip(axes[0], panels.items(), strict=True):
        lengths = sorted({int(c["length"]) for c in cells})
        depths = sorted({float(c["depth"]) for c in cells})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in cells:
            grid[depths.index(float(c["depth"]))][lengths.index(int(c["length"]))] = float(c["value"])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for r, row in enumerate(grid):
            for col, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(col, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), label="exact-match accuracy", shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def bars_figure(scores: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str = "",
                ylabel: str = "accuracy") -> Path:
    """One bar per name with its interval: ``scores[name] = {"value", "low", "high"}`` (an Estimate dict)."""
    if not scores:
        raise ValueError("scores must hold at least one entry")
    plt = _pyplot()
    names = list(scores)
    values = [float(scores[n]["value"]) for n in names]
    low = [v - float(scores[n]["low"]) for v, n in zip(values, names, strict=True)]
    high = [float(scores[n]["high"]) - v for v, n in zip(values, names, strict=True)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.4))
    ax.bar(range(len(names)), values, yerr=[low, high], capsize=3, color="#1f77b4")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, max(values) * 1.1))
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def ablation_figure(result: Mapping[str, Any], path: str | Path, *, ylabel: str = "score") -> Path:
    """Score against the ablated factor's value with intervals, and the base spec as a dashed line
    (``result`` from :func:`spattn.eval.ablate.ablate`)."""
    plt = _pyplot()
    rows = result["rows"]
    labels = [str(r["value"]) for r in rows]
    values = [r["score"]["value"] for r in rows]
    err = [[v - r["score"]["low"] for v, r in zip(values, rows, strict=True)],
           [r["score"]["high"] - v for v, r in zip(values, rows, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.4))
    ax.errorbar(range(len(rows)), values, yerr=err, fmt="o-", capsize=3)
    ax.axhline(result["base_score"]["value"], color="#7f7f7f", linestyle="--", label=f"base: {result['base_label']}")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel(result["factor"])
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
