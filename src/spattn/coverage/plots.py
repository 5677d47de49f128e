"""Pictures of coverage (``pip install 'spattn[viz]'``): layout grids, recall heatmaps, the dense attention map
with the kept blocks outlined, reachability against depth.

Every function takes ``ax`` (draw into an existing Axes; default: a new figure) and ``path`` (save there; the
suffix picks the format, ``.png`` or ``.svg``; a path without suffix saves both), and returns the Axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spattn.layout.layout import Layout


def _plt() -> Any:
    from spattn._optional import require

    plt = require("matplotlib.pyplot", extra="viz")
    return plt


def _axes(ax: Any, size: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    _, ax = _plt().subplots(figsize=size)
    return ax


def save(ax: Any, path: str | Path | None) -> list[Path]:
    """Save the figure of ``ax`` to ``path`` (``.png``/``.svg``; no suffix: both). Returns the files written."""
    if path is None:
        return []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = ax.figure
    fig.tight_layout()
    if path.suffix and path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"path must end in .png or .svg (or have no suffix for both), got {str(path)!r}")
    targets = [path] if path.suffix else [path.with_suffix(".png"), path.with_suffix(".svg")]
    for t in targets:
        fig.savefig(t, dpi=150)
    return targets


def plot_layout(layout: Layout, *, batch: int = 0, head: int = 0, ax: Any = None, path: str | Path | None = None,
                title: str | None = None) -> Any:
    """Block grid of a Layout (full / partial / skipped). Returns the Axes."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a spattn.Layout, got {type(layout).__name__}")
    ax = _axes(ax, (4, 4))
    layout.plot(batch=batch, head=head, ax=ax, title=title)
    save(ax, path)
    return ax


def plot_recall_heatmap(recall: torch.Tensor | Sequence[Sequence[float]], *, ax: Any = None,
                        path: str | Path | None = None, title: str = "attention recall",
                        row_label: str = "layer", col_label: str = "head", annotate: bool | None = None,
                        vmin: float = 0.0, vmax: float = 1.0) -> Any:
    """Heatmap of recall [layers, heads] (or any [rows, cols] metric in [vmin, vmax]). Returns the Axes."""
    data = torch.as_tensor(recall, dtype=torch.float64)
    if data.dim() == 1:
        data = data[None]
    if data.dim() != 2:
        raise ValueError(f"recall must be [layers, heads], got shape {tuple(data.shape)}")
    rows, cols = data.shape
    ax = _axes(ax, (max(3.0, 0.35 * cols + 1.5), max(2.5, 0.3 * rows + 1.2)))
    im = ax.imshow(data.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    if annotate if annotate is not None else rows * cols <= 64:
        for r in range(rows):
            for c in range(cols):
                v = float(data[r, c])
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")
    save(ax, path)
    return ax


def plot_attention_map(query: torch.Tensor, key: torch.Tensor, layout: Layout, *, batch: int = 0, head: int = 0,
                       causal: bool = False, scale: float | None = None, ax: Any = None,
                       path: str | Path | None = None, title: str | None = None, max_len: int = 4096) -> Any:
    """Dense attention probabilities of one head (log colour scale) with the layout's kept blocks outlined.

    For small lengths only (Lq, Lk <= ``max_len``): this is the one place that forms the dense map.
    query [B, H, Lq, D], key [B, Hkv, Lk, D].
    """
    from matplotlib.patches import Rectangle

    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if Lq > max_len or Lk > max_len:
        raise ValueError(f"plot_attention_map is for small lengths (<= {max_len}); got {Lq} x {Lk}")
    G = H // key.shape[1]
    q = query[batch, head].double()
    k = key[batch, head // G].double()
    s = q @ k.T * (1.0 / math.sqrt(D) if scale is None else scale)
    if causal:
        s = s.masked_fill(torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None] + (Lk - Lq), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    ax = _axes(ax, (5, 5))
    from matplotlib.colors import LogNorm

    floor = max(float(p[p > 0].min()) if bool((p > 0).any()) else 1e-12, 1e-8)
    im = ax.imshow(p.clamp(min=floor).numpy(), cmap="magma", norm=LogNorm(vmin=floor, vmax=1.0),
                   interpolation="nearest", extent=(-0.5, Lk - 0.5, Lq - 0.5, -0.5))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    status = layout.block_status()[min(batch, layout.batch - 1), min(head, layout.heads - 1)].cpu()
    bs = layout.block_size
    for qb, kb in status.nonzero().tolist():
        color = "#39d353" if int(status[qb, kb]) == 2 else "#58a6ff"
        ax.add_patch(Rectangle((kb * bs - 0.5, qb * bs - 0.5), min(bs, Lk - kb * bs), min(bs, Lq - qb * bs),
                               fill=False, edgecolor=color, linewidth=0.8))
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title or f"dense attention, kept blocks outlined (density {layout.density():.3f})")
    save(ax, path)
    return ax


def plot_reachability(results: Any, *, labels: Sequence[str] | None = None, ax: Any = None,
                      path: str | Path | None = None, title: str = "reachability against depth") -> Any:
    """Fraction of reachable (token, source) pairs against the number of layers, one line per result.

    ``results``: a :class:`Reachability`, a sequence of them, or a dict label -> Reachability.
    """
    from spattn.coverage.reach import Reachability

    if isinstance(results, Reachability):
        results = [results]
    if isinstance(results, dict):
        labels, results = list(results), list(results.values())
    results = list(results)
    labels = list(labels) if labels is not None else [None] * len(results)
    if len(labels) != len(results):
        raise ValueError(f"labels ({len(labels)}) must match results ({len(results)})")
    ax = _axes(ax, (5, 3.5))
    for res, label in zip(results, labels, strict=True):
        n = torch.arange(1, res.num_layers + 1)
        ax.plot(n.numpy(), res.fraction.numpy(), marker="o", markersize=3, label=label)
        if res.layers_to_full is not None:
            ax.axvline(res.layers_to_full, color=ax.lines[-1].get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("layers")
    ax.set_ylabel("reachable pairs (fraction)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if any(lbl is not None for lbl in labels):
        ax.legend(fontsize=8)
    save(ax, path)
    return ax


__all__ = ["plot_attention_map", "plot_layout", "plot_recall_heatmap", "plot_reachability", "save"]
