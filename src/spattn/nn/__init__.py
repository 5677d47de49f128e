"""Trainable layers on spattn attention: :class:`SparseAttention` (``[B, L, dim] -> [B, L, dim]``) and a small
:class:`TransformerLM` built from it. A pattern that owns parameters (``spattn.learned.LearnedTopK``) plugs in
through the :class:`ParametrisedPattern` protocol (``attend(query, key, value, *, causal, scale)``)."""

from spattn.nn.attention import ParametrisedPattern, SparseAttention, apply_rotary, rotary_tables
from spattn.nn.lm import TransformerLM

__all__ = ["SparseAttention", "ParametrisedPattern", "TransformerLM", "apply_rotary", "rotary_tables"]
