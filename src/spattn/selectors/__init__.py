"""Dynamic, query-aware block selection: selectors (query, key) -> block scores, budget rules, and the
``TopK`` / ``TopP`` patterns that compose with the fixed ones.

    >>> import torch, spattn
    >>> from spattn.selectors import TopP
    >>> q = k = v = torch.randn(1, 2, 512, 32)
    >>> out = spattn.attention(q, k, v, spattn.Sinks(16) | spattn.Window(64) | TopP("pooled", 0.9), causal=True)

Selectors (``get_selector(name, **options)``): ``pooled``, ``vertical_slash`` (``last``), ``antidiagonal``
(``stride``), ``bounds`` (``reduce``), ``probe`` (``queries``). Each has ``scores`` (fast, on device) and
``reference`` (float64 loops).
``Adaptive(selector, keys)`` spends one key budget per query over all heads where the missing mass is;
``layer_budgets`` splits one budget over the layers of a model from the same estimates.
``LayoutBuilder`` builds ``static | TopK/TopP`` layouts for new inputs with no host synchronisation.
"""

from spattn.selectors.antidiagonal import Antidiagonal
from spattn.selectors.bounds import Bounds
from spattn.selectors.budget import top_k, top_keys, top_p
from spattn.selectors.build import LayoutBuilder
from spattn.selectors.common import Selector, get_selector, register_selector, selector_names
from spattn.selectors.diagnose import Diagnosis, diagnose
from spattn.selectors.layers import layer_budgets
from spattn.selectors.patterns import Adaptive, Estimate, TopK, TopP
from spattn.selectors.pooled import Pooled
from spattn.selectors.probe import Probe
from spattn.selectors.vertical_slash import VerticalSlash

__all__ = [
    "Selector", "get_selector", "register_selector", "selector_names", "Pooled", "VerticalSlash", "Antidiagonal",
    "Bounds", "Probe", "top_k", "top_p", "top_keys", "TopK", "TopP", "Adaptive", "Estimate", "LayoutBuilder",
    "Diagnosis", "diagnose", "layer_budgets",
]
