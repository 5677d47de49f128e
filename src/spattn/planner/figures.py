"""The plan as a picture: a layer x head grid of the chosen families (with their sizes) beside the recall of
each choice. Reads only the plan's JSON (``plan.heads``), so a saved plan file can be drawn later."""

from __future__ import annotations

from pathlib import Path

from spattn._optional import require
from spattn.integrations.plan import Plan

_COLORS = {"window": "#9ecae1", "sinks_window": "#3182bd", "strided": "#74c476", "random": "#fd8d3c",
           "budgeted": "#9e9ac8", "dense": "#252525", "custom": "#bdbdbd"}
_DYNAMIC = ["#e6550d", "#a63603", "#d94801", "#fdae6b"]


def _family_color(family: str, dynamic_order: list[str]) -> str:
    if family.startswith("dynamic:"):
        if family not in dynamic_order:
            dynamic_order.append(family)
        return _DYNAMIC[dynamic_order.index(family) % len(_DYNAMIC)]
    return _COLORS.get(family, _COLORS["custom"])


def plan_heatmap(plan: Plan, path: str | Path | None = None, *, title: str | None = None):
    """Draw ``plan`` (a planner plan with ``heads``): left, each head's family (cell text: the size, e.g. a
    window of 128 keys); right, each choice's recall on the calibration chunks. Saves a PNG when ``path`` is
    given. Returns the matplotlib Figure (``pip install 'spattn[viz]'``)."""
    plt = require("matplotlib.pyplot", extra="viz")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not plan.heads:
        raise ValueError("plan has no per-head choices (plan.heads): draw a plan made by spattn.plan")
    layers = sorted(plan.heads)
    heads = max(len(plan.heads[i]) for i in layers)
    families: list[str] = []
    dynamic_order: list[str] = []
    grid = [[0] * heads for _ in layers]
    recall = [[float("nan")] * heads for _ in layers]
    labels = [[""] * heads for _ in layers]
    for r, layer in enumerate(layers):
        for h, row in enumerate(plan.heads[layer]):
            fam = str(row.get("family", "custom"))
            if fam not in families:
                families.append(fam)
            grid[r][h] = families.index(fam)
            recall[r][h] = float(row.get("recall", float("nan")))
            name = str(row.get("choice", ""))
            labels[r][h] = "" if fam == "dense" else name.split(":", 1)[-1]
    colors = [_family_color(f, dynamic_order) for f in families]
    height = max(4.0, 0.22 * len(layers) + 1.5)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(3.0 + 0.9 * heads * 2, height), constrained_layout=True)
    ax0.imshow(grid, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(colors) - 0.5, aspect="auto",
               interpolation="nearest")
    for r in range(len(layers)):
        for h in range(heads):
            ax0.text(h, r, labels[r][h], ha="center", va="center", fontsize=6,
                     color="white" if families[grid[r][h]] in ("dense", "sinks_window") else "black")
    im = ax1.imshow(recall, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for ax, name in ((ax0, "chosen pattern"), (ax1, "recall of the choice")):
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(i) for i in layers], fontsize=6)
        ax.set_title(name)
    fig.colorbar(im, ax=ax1, shrink=0.8)
    ax0.legend(handles=[Patch(color=c, label=f) for f, c in zip(families, colors, strict=True)],
               loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=min(4, len(families)), fontsize=7)
    if title or plan.budget is not None:
        fig.suptitle(title or f"plan under {plan.budget}", fontsize=9)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    return fig
