"""``spattn.distributed.plan``: run a transformers model's attention across ranks with a spattn ``Plan``
(the role torch's ``parallelize_module`` plays for tensor parallelism).

``plan(model, plan, mesh, mode="context" | "head", sharding=...)`` patches the model with
:func:`spattn.patch` (so each layer knows its pattern), then switches it to the attention implementation
``"spattn_distributed"``: each layer runs :func:`context_parallel_attention` or
:func:`head_parallel_attention` on the rows this rank holds. The caller feeds every rank its rows of the batch
(``sharding.shard(input_ids, rank, dim=1)``) with their global ``position_ids``
(``sharding.positions(rank)``), so rotary embeddings see true positions.

Masks: the model's own attention mask is not used (each rank only sees its rows, as under DeepSpeed-Ulysses);
the layout comes from the plan and ``causal``. Express padding or packed documents with ``Document(ids)``
in the plan. Dropout and KV caches are not supported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from spattn._optional import require
from spattn.distributed.comm import resolve_group
from spattn.distributed.context_parallel import context_parallel_attention
from spattn.distributed.head_parallel import head_parallel_attention
from spattn.distributed.sharding import Sharding
from spattn.integrations.hf import attention_modules, layer_index, patch
from spattn.integrations.plan import Plan
from spattn.patterns import Full, Pattern

NAME = "spattn_distributed"
MODES = ("context", "head")


@dataclasses.dataclass
class _Setting:
    mode: str
    group: Any
    sharding: Sharding | None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask builder of ``"spattn_distributed"``: none (the layout comes from the plan)."""
    return None


def distributed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function of ``"spattn_distributed"``: this rank's rows, query
    ``[B, H, L_r, D]``, key/value ``[B, Hkv, L_r, D]``; returns ``([B, L_r, H, D], None)``."""
    setting: _Setting | None = getattr(module, "_spattn_distributed", None)
    if setting is None:
        raise RuntimeError("spattn_distributed: this model was not prepared with spattn.distributed.plan")
    if dropout and module.training:
        raise NotImplementedError("spattn_distributed: attention dropout is not supported; set dropout=0")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    plan: Plan = module._spattn_plan
    pattern = plan.pattern_for(layer_index(module)) or Full()
    options = dict(causal=causal, scale=scaling, backend=getattr(module, "_spattn_backend", "auto"),
                   block_size=getattr(module, "_spattn_block_size", 128))
    if setting.mode == "context":
        out = context_parallel_attention(query, key, value, pattern, mesh=setting.group, sharding=setting.sharding,
                                         **options)
    else:
        out = head_parallel_attention(query, key, value, pattern, group=setting.group, sharding=setting.sharding,
                                      **options)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"spattn_distributed"`` in transformers' attention and mask interfaces (idempotent)."""
    require("transformers", extra="hf")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, distributed_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)


def plan(
    model: torch.nn.Module,
    plan: Plan | Pattern | None,
    mesh=None,
    *,
    mode: str = "context",
    sharding: Sharding | None = None,
    backend: str = "auto",
    block_size: int = 128,
) -> torch.nn.Module:
    """Apply a spattn Plan to a transformers model whose sequence is sharded over a 1-D ``DeviceMesh``.

    Args:
        model: a transformers ``PreTrainedModel`` (decoder or encoder using the attention interface).
        plan: a :class:`~spattn.Plan`, one Pattern for every layer, or ``None`` (full attention).
        mesh: a 1-D ``DeviceMesh`` or ``ProcessGroup`` over the sequence ranks (default: the default group).
        mode: ``"context"`` (local queries, visited key blocks exchanged) or ``"head"`` (Ulysses all-to-all).
        sharding: the :class:`Sharding` the inputs are cut with (``context``: default balanced per call from
            the total length; ``head``: default equal rows in rank order). Change it with
            :func:`set_sharding` when the sequence length changes.
        backend, block_size: as in :func:`spattn.patch`.

    Returns the same model (patched in place); :func:`spattn.unpatch` undoes it.

    Example:
        >>> s = Sharding.balanced(pattern, 4096, world_size=W, causal=True)                 # doctest: +SKIP
        >>> spattn.distributed.plan(model, spattn.Plan.uniform(pattern), mesh, sharding=s)  # doctest: +SKIP
        >>> logits = model(s.shard(ids, rank, dim=1), position_ids=s.positions(rank)[None]).logits  # doctest: +SKIP
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sharding is not None and not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be a spattn.distributed.Sharding or None, got {type(sharding).__name__}")
    group = resolve_group(mesh)
    patch(model, plan, backend=backend, block_size=block_size)
    register()
    model.set_attn_implementation(NAME)
    for m in attention_modules(model):
        m._spattn_distributed = _Setting(mode, group, sharding)
    return model


def set_sharding(model: torch.nn.Module, sharding: Sharding | None) -> None:
    """Use ``sharding`` for the following forward passes of a model prepared with :func:`plan`."""
    for m in attention_modules(model):
        setting = getattr(m, "_spattn_distributed", None)
        if setting is None:
            raise RuntimeError("set_sharding: the model was not prepared with spattn.distributed.plan")
        setting.sharding = sharding
