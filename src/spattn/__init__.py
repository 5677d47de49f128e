"""spattn: sparse attention for PyTorch that balances efficiency against contextual coverage.

Describe a pattern, compile it to a block-sparse Layout, run attention on it:

    >>> import torch, spattn
    >>> q = k = v = torch.randn(1, 2, 256, 64)
    >>> out = spattn.attention(q, k, v, spattn.Sinks(16) | spattn.Window(64), causal=True)
"""

from spattn.patterns import (
    BlockLayout,
    Budgeted,
    Causal,
    Dilated,
    Document,
    Full,
    Global,
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
    pattern_from_dict,
)

from spattn.ops.attention import attention, choose_backend
from spattn.selectors import LayoutBuilder, TopK, TopP
from spattn.integrations import Plan, patch, patched, unpatch
from spattn.integrations.capture import Capture, capture
from spattn import coverage  # noqa: E402 - the coverage toolkit as spattn.coverage
from spattn.patterns import Essential, essential_flags  # noqa: E402 - the essential-token safeguard
from spattn import learned, nn  # noqa: E402 - learned sparsity (registers the 'gate' selector) and layers
from spattn import distributed  # noqa: E402 - sparse attention across ranks as spattn.distributed

__version__ = "0.1.0"

__all__ = [
    "BlockLayout", "Budgeted", "Causal", "Dilated", "Document", "Full", "Global", "Intersection", "Layout",
    "Pattern", "PerHead", "RandomBlocks", "Sinks", "Strided", "Union", "Window", "compile", "pattern_from_dict",
    "attention", "choose_backend", "TopK", "TopP", "LayoutBuilder",
    "Plan", "patch", "patched", "unpatch", "Capture", "capture",
    "Essential", "essential_flags", "learned", "nn",
]
