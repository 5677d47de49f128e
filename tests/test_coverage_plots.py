"""spattn.coverage.plots: every picture renders to PNG and SVG."""

import pytest
import torch

import spattn
from spattn.coverage import reachability

pytest.importorskip("matplotlib")

from spattn.coverage import plots  # noqa: E402 - our own module: a broken import must fail, never skip


def test_pictures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = spattn.compile(spattn.Sinks(4) | spattn.Window(40), 128, 128, causal=True, block_size=16)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 1, 128, 16)
    plots.plot_layout(layout, path=tmp_path / "layout")
    plots.plot_recall_heatmap(torch.rand(4, 6), path=tmp_path / "recall.png")
    plots.plot_attention_map(q, k, layout, head=1, causal=True, path=tmp_path / "map.svg")
    r = reachability(layout, causal=True, max_layers=6)
    plots.plot_reachability({"sinks+window": r}, path=tmp_path / "reach")
    for name in ("layout.png", "layout.svg", "recall.png", "map.svg", "reach.png", "reach.svg"):
        assert (tmp_path / name).stat().st_size > 1000, name
    with pytest.raises(ValueError, match="suffix|png"):
        plots.plot_recall_heatmap(torch.rand(2, 2), path=tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="layers, heads"):
        plots.plot_recall_heatmap(torch.rand(2, 2, 2))
    plt.close("all")
