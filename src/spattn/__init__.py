"""spattn: sparse attention for PyTorch that balances efficiency against contextual coverage.

Describe a pattern, compile it to a block-sparse Layout, run attention on it:

    >>> import torch, spattn
    >>> q = k = v = torch.randn(1, 2, 256, 64)
    >>> out = spattn.attention(q, k, v, spattn.Sinks(16) | spattn.Window(64), causal=True)
"""

from spattn import (  # the toolkits as spattn.<name>
    coverage,
    distributed,
    hierarchical,
    learned,  # registers the 'gate' selector
    nn,
)
from spattn.integrations import BudgetRule, Plan, patch, patched, unpatch
from spattn.integrations.capture import Capture, capture
from spattn.ops.attention import CapturedAttention, attention, choose_backend
from spattn.patterns import (
    BlockLayout,
    Budgeted,
    Causal,
    Dilated,
    Document,
    Essential,
    Full,
    Global,
    Hierarchical,
    Intersection,
    Layout,
    Pattern,
    PerHead,
    RandomBlocks,
    Sinks,
    Strided,
    Union,
    Window,
    compile,
    essential_flags,
    pattern_from_dict,
)
from spattn.selectors import Adaptive, LayoutBuilder, TopK, TopP

__version__ = "0.1.0"


def __getattr__(name: str):  # spattn.plan (the planner, which needs numpy) loads on first use
    if name == "plan":
        from spattn.planner import plan

        return plan
    raise AttributeError(f"module 'spattn' has no attribute {name!r}")


__all__ = [
    "BlockLayout", "Budgeted", "Causal", "Dilated", "Document", "Full", "Global", "Intersection", "Layout",
    "Pattern", "PerHead", "RandomBlocks", "Sinks", "Strided", "Union", "Window", "compile", "pattern_from_dict",
    "attention", "choose_backend", "CapturedAttention", "TopK", "TopP", "Adaptive", "LayoutBuilder",
    "Plan", "patch", "patched", "unpatch", "Capture", "capture",
    "Essential", "essential_flags", "learned", "nn", "BudgetRule", "plan",
    "Hierarchical", "hierarchical", "coverage", "distributed",
]
