"""Patterns (declarative, frozen, JSON), their algebra, and the compiler to a block-sparse Layout."""

from spattn.layout import Layout  # re-exported: spattn.patterns.Layout is the same class
from spattn.patterns.base import EMPTY, FULL, PARTIAL, Context, Intersection, Pattern, Union
from spattn.patterns.builtin import (
    BlockLayout,
    BlockSelection,
    Budgeted,
    Causal,
    Dilated,
    Document,
    Full,
    Global,
    PerHead,
    RandomBlocks,
    Sinks,
    Strided,
    Window,
)
from spattn.patterns.compile import brute_force_mask, compile, layout_from_status
from spattn.patterns.essential import Essential, essential_flags  # registers itself
from spattn.patterns.serialize import pattern_from_dict, register_pattern

for _cls in (Union, Intersection, Full, Causal, Window, Sinks, Global, Dilated, Strided, RandomBlocks, BlockLayout,
             Document, PerHead, Budgeted):
    register_pattern(_cls)

__all__ = [
    "EMPTY", "FULL", "PARTIAL", "Context", "Pattern", "Union", "Intersection",
    "Full", "Causal", "Window", "Sinks", "Global", "Dilated", "Strided", "RandomBlocks", "BlockLayout",
    "BlockSelection", "Document", "PerHead", "Budgeted",
    "compile", "brute_force_mask", "layout_from_status", "Layout", "pattern_from_dict", "register_pattern",
    "Essential", "essential_flags",
]
