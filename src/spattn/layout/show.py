"""Pictures of a Layout: a █/▒/░ string and a matplotlib plot of its block status."""

from __future__ import annotations

import math
from typing import Any

import torch

from spattn.layout.layout import Layout

_CHARS = {0: "░", 1: "▒", 2: "█"}  # EMPTY, PARTIAL, FULL


def _status(layout: Layout, batch: int, head: int) -> torch.Tensor:
    return layout.block_status()[min(batch, layout.batch - 1), min(head, layout.heads - 1)]


def to_string(layout: Layout, batch: int = 0, head: int = 0, max_size: int = 64) -> str:
    """A █/▒/░ grid of the block status (█ full, ▒ partial, ░ skipped), downsampled (max) to ``max_size``."""
    status = _status(layout, batch, head).float()
    NQ, NK = status.shape
    step = max(1, math.ceil(max(NQ, NK) / max_size))
    if step > 1:
        pad = torch.nn.functional.pad(status, (0, (-NK) % step, 0, (-NQ) % step), value=0.0)
        status = torch.nn.functional.max_pool2d(pad[None, None], step)[0, 0]
    return "\n".join("".join(_CHARS[int(v)] for v in row) for row in status.tolist())


def plot(layout: Layout, batch: int = 0, head: int = 0, ax: Any = None, title: str | None = None) -> Any:
    """Draw the block status with matplotlib (``pip install 'spattn[viz]'``). Returns the Axes."""
    from spattn._optional import require

    plt = require("matplotlib.pyplot", extra="viz")
    colors = require("matplotlib.colors", extra="viz")
    status = _status(layout, batch, head).cpu().numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(status, cmap=colors.ListedColormap(["#f4f4f4", "#8fb3d9", "#1f4e79"]), vmin=0, vmax=2,
              interpolation="nearest")
    ax.set_xlabel(f"key block ({layout.block_size} tokens)")
    ax.set_ylabel("query block")
    ax.set_title(title or f"density {layout.density():.3f}")
    return ax
