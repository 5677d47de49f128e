"""``LearnedTopK``: a block selection trained **with** the model, as a parametrised pattern of ``spattn.nn``.

Per query block it keeps the safeguard pattern (``Sinks | Window | Essential``, static, compiled first) and
the ``blocks`` key blocks a scorer ranks highest among the rest, then runs spattn attention on that layout.

Scorers: ``"gate"`` (a :class:`BlockGate`, its own parameters; SeerAttention's pooled features) or
``"pooled"`` (MoBA's parameter-free ``scale * mean(q_block) . mean(k_block)``; it learns through the model's
query/key projections).

Training signals (``training=``):

* ``"straight_through"``: the forward pass is the exact hard top-k attention; in the backward pass each kept
  block ``c`` of query block ``b`` carries a score bias ``log p[b, c] - stopgrad(log p[b, c])`` (value 0), so
  the LM loss reaches the routing probabilities ``p = softmax(logits / temperature)`` over the routable blocks.
  The bias rides in extra head dimensions through ``spattn.attention`` on the same sparse layout (see
  ``_straight_through``), so training stays sparse; key/value heads are repeated per query head.
  Evaluation (``model.eval()`` or no grad) runs the sparse layout through ``spattn.attention``.
* ``"distill"`` (DeepSeek's indexer): the model trains through the sparse attention only; the scorer is trained
  by ``last["distill_loss"]`` = KL(block-pooled dense attention of the detached q/k || gate), which the
  trainer adds to the loss. With ``detach_inputs=True`` (default for ``"gate"``) the scorer's inputs are
  detached, so that loss changes only the gate.

Exploration and budget: ``temperature`` (softmax temperature of the routing, settable per step by a
schedule), ``blocks`` (settable per step: a budget schedule), ``noise`` (Gumbel noise scale on the ranking
in training), ``drop`` (stochastic block pruning rate in training). After each call ``last`` holds
``logits``, ``probs`` (routing probabilities), ``routable`` (visible blocks the safeguards do not keep),
``chosen`` (bool ``[B, H, NQ, NK]``) and, for ``"distill"``, ``distill_loss``: the regularisers and
:func:`spattn.learned.collapse_metrics` read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.learned.distill import block_targets, distill_loss
from spattn.learned.gate import BlockGate
from spattn.learned.regularisers import drop_blocks
from spattn.ops.attention import attention
from spattn.patterns import EMPTY, BlockLayout, Full, Pattern, compile
from spattn.selectors.budget import top_k
from spattn.selectors.common import block_sizes, masked_softmax, pool, visible_blocks

SCORERS = ("gate", "pooled")
TRAINING = ("straight_through", "distill")


@dataclass
class _ShapeTables:
    """The input-free part of a :class:`LearnedTopK` layout at one shape: ``kept`` bool ``[Bs, Hs, NQ, NK]``
    (blocks the safeguard or the local band touch), their dense view (``status`` int8 / ``mask_ids`` int32,
    ``None`` without either), what a routed block becomes (``routed_status`` / ``routed_mask_ids``: full, or its
    causal token mask on the diagonal, ``Full() & Causal()``), and the masks both index."""

    kept: torch.Tensor
    status: torch.Tensor | None
    mask_ids: torch.Tensor | None
    routed_status: torch.Tensor
    routed_mask_ids: torch.Tensor
    masks: torch.Tensor


class LearnedTopK(nn.Module):
    """Trainable top-k block routing with deterministic safeguards (a parametrised pattern for ``spattn.nn``).

    Args:
        num_heads, num_kv_heads, head_dim: the attention's query heads ``H``, key/value heads ``Hkv`` and ``D``.
        blocks: key blocks routed per query block, beyond the safeguards (an int >= 0).
        block_size: tokens per block (default 64).
        safeguard: a static pattern always kept (default ``None``); e.g. ``Sinks(16) | Window(128)``.
        local: the last ``local`` key blocks up to each query's own block are always kept whole (MoBA keeps
            the current block; default 1, 0 for none). Budget per query block: ``local + blocks``.
        scorer: ``"gate"`` (default) or ``"pooled"``; hidden: gate width (default 32).
        training: ``"straight_through"`` (default) or ``"distill"``.
        temperature: routing softmax temperature (default 1.0); noise: Gumbel noise scale on the ranking in
            training (default 0.0); drop: stochastic block pruning rate in training (default 0.0).
        detach_inputs: score detached q/k (default: True for ``"gate"``, False for ``"pooled"``).
        sharing: ``"group"`` (one selection per key/value head group, default) or ``"head"``.
        backend: ``spattn.attention`` backend for the sparse path (default ``"auto"``).

    Example:
        >>> router = LearnedTopK(4, 2, 32, blocks=2, block_size=16, safeguard=Sinks(4) | Window(16))
        >>> layer = spattn.nn.SparseAttention(128, 4, 2, pattern=router)
        >>> layer(torch.randn(2, 256, 128)).shape
        torch.Size([2, 256, 128])
    """

    def __init__(self, num_heads: int, num_kv_heads: int | None = None, head_dim: int = 64, *, blocks: int,
                 block_size: int = 64, safeguard: Pattern | None = None, local: int = 1, scorer: str = "gate",
                 hidden: int = 32,
                 training: str = "straight_through", temperature: float = 1.0, noise: float = 0.0,
                 drop: float = 0.0, detach_inputs: bool | None = None, sharing: str = "group",
                 backend: str = "auto") -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if training not in TRAINING:
            raise ValueError(f"training must be one of {TRAINING}, got {training!r}")
        if sharing not in ("group", "head"):
            raise ValueError(f"sharing must be 'group' or 'head', got {sharing!r}")
        if safeguard is not None and (not isinstance(safeguard, Pattern) or safeguard.contains_dynamic()):
            raise TypeError("safeguard must be a static spattn Pattern (Sinks, Window, Essential...) or None")
        if training == "distill" and scorer != "gate":
            raise ValueError("training='distill' trains a gate: use scorer='gate'")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        if isinstance(local, bool) or not isinstance(local, int) or local < 0:
            raise ValueError(f"local must be an int >= 0, got {local!r}")
        self.block_size, self.safeguard, self.scorer, self.mode = block_size, safeguard, scorer, training
        self.local = local
        self.blocks, self.temperature, self.noise, self.drop = blocks, temperature, noise, drop
        self.detach_inputs = (scorer == "gate") if detach_inputs is None else bool(detach_inputs)
        self.sharing, self.backend = sharing, backend
        self.gate = BlockGate(num_heads, num_kv_heads, head_dim, block_size=block_size, hidden=hidden) \
            if scorer == "gate" else None
        self.last: dict[str, torch.Tensor] = {}
        self._shape_cache: dict[tuple, _ShapeTables] = {}

    # -- pieces -----------------------------------------------------------------------------------
    def _logits(self, query, key, causal):
        if self.gate is not None:
            return self.gate.logits(query, key, causal=causal)
        bs = self.block_size
        qb, kb = pool(query, bs), pool(key, bs)  # [B, H, NQ, D], [B, Hkv, NK, D]
        kb = kb.repeat_interleave(query.shape[1] // key.shape[1], 1)
        logits = qb @ kb.transpose(-1, -2) / math.sqrt(query.shape[-1])
        logits = logits + torch.log(block_sizes(key.shape[2], bs, query.device).float())
        return logits, visible_blocks(query.shape[2], key.shape[2], bs, causal, query.device)

    def _tables(self, q_len, kv_len, batch, causal, device) -> _ShapeTables:
        """The fixed part of this shape's layouts, built once per shape (one shape at a time; the safeguard is
        compiled here, never in a training step): see :class:`_ShapeTables`."""
        key = (q_len, kv_len, batch, causal, str(device))
        if key not in self._shape_cache:
            bs = self.block_size
            local = self.local_blocks(q_len, kv_len, device)
            fixed = BlockLayout(local, block=bs) if self.local else None
            if self.safeguard is not None:
                fixed = self.safeguard if fixed is None else self.safeguard | fixed
            options = dict(causal=causal, block_size=bs, device=device)
            masks, status, mask_ids = [], None, None
            if fixed is not None:
                layout = compile(fixed, q_len, kv_len, batch=batch, **options)
                status, slot = tables.unpack(layout)
                mask_ids = tables.mask_ids(status, slot)
                masks.append(layout.masks)
            kept = (torch.zeros_like(local)[None, None] if status is None else status != EMPTY)
            # what a routed block becomes: full, or its causal token mask on the diagonal
            base = compile(Full(), q_len, kv_len, **options)
            routed_status, slot = tables.unpack(base)
            routed_ids = tables.mask_ids(routed_status, slot)
            offset = masks[0].shape[0] if masks else 0
            routed_ids = torch.where(routed_ids >= 0, routed_ids + offset, -1)
            masks.append(base.masks)
            self._shape_cache = {key: _ShapeTables(kept, status, mask_ids, routed_status, routed_ids,
                                                   torch.cat(masks))}
        return self._shape_cache[key]

    def local_blocks(self, q_len: int, kv_len: int, device) -> torch.Tensor:
        """bool ``[NQ, NK]``: the ``local`` key blocks ending at the last key each query block may see."""
        bs = self.block_size
        NQ, NK = -(-q_len // bs), -(-kv_len // bs)
        last = (torch.clamp((torch.arange(NQ, device=device) + 1) * bs, max=q_len) - 1 + kv_len - q_len) // bs
        kb = torch.arange(NK, device=device)
        return (kb[None, :] <= last[:, None]) & (kb[None, :] > last[:, None] - self.local)

    def route(self, query: torch.Tensor, key: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """bool ``[B, H, NQ, NK]``: the routed key blocks (safeguards excluded); fills ``last``."""
        B, H, Lq, _ = query.shape
        Hkv, Lk = key.shape[1], key.shape[2]
        q_in, k_in = (query.detach(), key.detach()) if self.detach_inputs else (query, key)
        logits, visible = self._logits(q_in, k_in, causal)
        kept = self._tables(Lq, Lk, B, causal, query.device).kept
        routable = visible & ~kept
        probs = masked_softmax(logits / self.temperature, routable)
        rank = probs.detach()
        G = H // Hkv if self.sharing == "group" else 1
        NQ, NK = rank.shape[-2:]
        avail = routable.expand(B, H, NQ, NK)
        if G > 1:  # one selection per key/value head group, from the group's mean probabilities
            rank = rank.view(B, Hkv, G, NQ, NK).mean(2)
            avail = avail.reshape(B, Hkv, G, NQ, NK)[:, :, 0]
        if self.training and self.noise > 0:
            gumbel = -torch.log(-torch.log(torch.rand_like(rank).clamp(1e-9, 1 - 1e-9)))
            rank = torch.where(avail, torch.log(rank.clamp_min(1e-12)) + self.noise * gumbel, rank)
            rank = torch.where(avail, rank - rank.amin(-1, keepdim=True) + 1e-6, torch.zeros_like(rank))
        chosen = top_k(rank, avail, int(self.blocks))
        if self.training and self.drop > 0:
            chosen = drop_blocks(chosen, self.drop)
        if G > 1:
            chosen = chosen.repeat_interleave(G, 1)
        self.last = {"logits": logits, "visible": visible, "probs": probs, "routable": routable, "chosen": chosen}
        return chosen

    def layout(self, query: torch.Tensor, key: torch.Tensor, chosen: torch.Tensor, *, causal: bool) -> Layout:
        """The Layout of the safeguard | the local blocks | the ``chosen`` blocks (bool ``[B, H, NQ, NK]``, as
        :meth:`route` returns them: never a block the first two keep), tables ``[B, H, ...]`` ``NK`` wide.

        The fixed part is compiled once per shape (:meth:`_tables`); each call merges the chosen blocks into it
        with two ``torch.where`` and packs the tables at a fixed width: no host read, no host-to-device copy, so
        a CUDA graph can record it (compiling ``safeguard | BlockLayout(chosen)`` at every step could not).
        Equal to that compile block for block and token for token."""
        B, H, Lq, _ = query.shape
        Lk = key.shape[2]
        fixed = self._tables(Lq, Lk, B, causal, query.device)
        take = chosen & ~fixed.kept  # route never chooses a kept block; this keeps the merge a union regardless
        status = torch.where(take, fixed.routed_status, torch.zeros_like(fixed.routed_status))
        mask_ids = torch.where(take, fixed.routed_mask_ids, -1)
        if fixed.status is not None:
            status = torch.where(take, status, fixed.status)
            mask_ids = torch.where(take, mask_ids, fixed.mask_ids.expand_as(mask_ids))
        status = status.expand(B, H, -1, -1)
        return Layout(q_len=Lq, kv_len=Lk, block_size=self.block_size, causal=causal,
                      **tables.pack(status, mask_ids.expand_as(status), fixed.masks, width=status.shape[-1]))

    # -- the parametrised-pattern protocol ----------------------------------------------------------
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        """out ``[B, H, Lq, Dv]`` for query ``[B, H, Lq, D]``, key/value ``[B, Hkv, Lk, D]``."""
        chosen = self.route(query, key, causal=causal)
        layout = self.layout(query, key, chosen, causal=causal)
        if self.mode == "distill" and self.training and torch.is_grad_enabled():
            target = block_targets(query, key, self.block_size, causal=causal, scale=scale)
            self.last["distill_loss"] = distill_loss(self.last["logits"], self.last["visible"], target)
        if self.mode == "straight_through" and self.training and self.last["probs"].requires_grad:
            return self._straight_through(query, key, value, layout, chosen, scale)
        return attention(query, key, value, layout, causal=causal, scale=scale, backend=self.backend)

    def _straight_through(self, query, key, value, layout, chosen, scale):
        """The hard layout's attention with a zero-valued block bias ``log p - stopgrad(log p)`` on the routed
        blocks, through ``spattn.attention`` itself: the bias is written as extra head dimensions,
        ``q' = [scale * q, onehot(query block)]`` and ``k' = [k, beta[:, key block]]``, so that
        ``q' . k' = scale * q . k + beta[query block, key block]`` (scale 1, the same sparse layout). The value
        gets ``NQ`` zero columns (the triton kernels need equal key and value widths: without them a CUDA
        training pass fell back to the blockwise reference), cut off from the output."""
        B, H, Lq, D = query.shape
        Hkv, Lk, bs = key.shape[1], key.shape[2], self.block_size
        NQ = -(-Lq // bs)
        logp = torch.log(self.last["probs"].clamp_min(1e-12))
        beta = torch.where(chosen, logp - logp.detach(), torch.zeros_like(logp)).to(query.dtype)  # [B, H, NQ, NK]
        qblock = torch.arange(Lq, device=query.device) // bs
        # [Lq, NQ] one-hot rows by comparison: F.one_hot reads its input's range on the host (CPU)
        onehot = (qblock[:, None] == torch.arange(NQ, device=query.device)).to(query.dtype).expand(B, H, Lq, NQ)
        kblock = torch.arange(Lk, device=query.device) // bs
        kbias = beta.transpose(-1, -2)[:, :, kblock]  # [B, H, Lk, NQ]
        G = H // Hkv
        k_rep = key.repeat_interleave(G, 1) if G > 1 else key
        q2 = torch.cat([query * scale, onehot], -1)
        k2 = torch.cat([k_rep, kbias], -1)
        v2 = value.repeat_interleave(G, 1) if G > 1 else value
        # zero columns so that value has the key's width (the triton kernels take Dk == Dv); cut off after
        v2 = torch.nn.functional.pad(v2, (0, NQ))
        out = attention(q2, k2, v2, layout, causal=layout.causal, scale=1.0, backend=self.backend)
        return out[..., :value.shape[-1]]

    def regularisers(self) -> dict[str, torch.Tensor]:
        """Losses this pattern asks the trainer to add (``distill_loss`` in ``"distill"`` training)."""
        return {k: v for k, v in self.last.items() if k == "distill_loss"}

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks}, local={self.local}, block_size={self.block_size}, scorer={self.scorer!r}, "
                f"training={self.mode!r}, safeguard={self.safeguard!r}")


__all__ = ["LearnedTopK", "SCORERS", "TRAINING"]
