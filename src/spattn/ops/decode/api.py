"""``select_pages``: the fused decode page selection (two triton launches per layer and step: page-parallel
logits, then the per-row top-k and tables), its checks and its launches. The reference is the torch selection
of :mod:`spattn.runtime.decode` (:func:`~spattn.runtime.decode.select_from_row` +
:func:`~spattn.runtime.decode.block_tables`), which the tests use as the oracle; the kernels are in
``_kernel.py``."""

from __future__ import annotations

import dataclasses

import torch

from spattn._optional import require

_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclasses.dataclass
class PageTables:
    """What :func:`select_pages` writes: ``kv_num`` int32 ``[B, H, 1]`` (visited pages), ``kv_idx`` int32
    ``[B, H, 1, W]`` (their indices, ascending, unused slots 0; equal for the G query heads of a key/value
    group), row 0 of ``masks`` uint8 ``[B * Hkv * W, S, S]`` (tile ``(b * Hkv + k) * W + j``: the token mask of
    slot ``j``), ``stats`` int32 ``[B, Hkv, 3]`` (attended tokens, visited pages, pages chosen by the top-k)."""

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    masks: torch.Tensor
    stats: torch.Tensor


_BLOCK_P = 32  # pages per program of the logit launch (Note [why two launches] in _kernel.py)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def select_pages(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, rows: torch.Tensor,
                 step: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, budget: torch.Tensor, masks: torch.Tensor,
                 *, width: int, scale: float) -> PageTables:
    """The pages one decode query attends, as block tables for the split-K decode kernel, with no host read.

    The safeguards (the static row: sinks, window, mandatory tokens) keep their pages; of the other visible
    pages the ``budget`` best by Quest's bound (per-page key min / max, the mean over the key/value group's
    query heads of each head's page softmax) are chosen; the visited pages fill the first ``width`` slots in
    ascending order. Same selection as :func:`spattn.runtime.decode.select_from_row` with ``rule="top_k"``,
    ``selector="bounds"``, a head-independent static row and no dense rows.

    Args:
        query: ``[B, H, 1, D]`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        key_min, key_max: ``[B, Hkv, NP, D]`` contiguous per-page key bounds (``NP = C / S`` pages of the
            capacity ``C``; pages past the query are masked by ``valid``).
        rows: bool ``[T, Bs, 1, C]`` (``Bs`` in (1, B)): the static part's keys for each decode step.
        step: int64 ``[1]``: the row of ``rows`` this step reads (clamped to ``[0, T)``).
        valid: bool ``[B, C]``: keys that may be attended (prompt without padding, decoded tokens so far).
        slot: int64 ``[1]``: the query's cache slot (``slot + 1`` keys up to it; the last page's size).
        budget: int64 ``[1]``: pages the top-k may choose beyond the safeguards' (per key/value head).
        masks: uint8 ``[>= B * Hkv * width, S, S]``: the mask tiles; only row 0 of the used tiles is written.
        width: ``W``, slots of the tables (``>= 1``).
        scale: softmax scale of the page logits (``> 0``).

    Returns:
        :class:`PageTables`.
    """
    require("triton", extra="gpu")
    import triton

    from spattn.ops.decode._kernel import page_choose_kernel, page_logit_kernel

    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be [B, H, 1, D], got shape {tuple(query.shape)}")
    B, H, _, D = query.shape
    if key_min.dim() != 4 or key_min.shape != key_max.shape or key_min.shape[0] != B or key_min.shape[3] != D:
        raise ValueError(f"key_min/key_max must be [B={B}, Hkv, NP, D={D}] and equal, got "
                         f"{tuple(key_min.shape)} / {tuple(key_max.shape)}")
    Hkv, NP = key_min.shape[1], key_min.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    if valid.dim() != 2 or valid.shape[0] != B or valid.shape[1] % NP or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B={B}, C] with C a multiple of NP={NP}, got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    C = valid.shape[1]
    S = C // NP
    if S < 1 or S & (S - 1):
        raise ValueError(f"the page size C / NP = {S} must be a power of two")
    if rows.dim() != 4 or rows.shape[1] not in (1, B) or rows.shape[2] != 1 or rows.shape[3] != C \
            or rows.dtype != torch.bool:
        raise ValueError(f"rows must be bool [T, 1 or {B}, 1, C={C}], got {rows.dtype} {tuple(rows.shape)}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if masks.dim() != 3 or masks.shape[0] < B * Hkv * width or masks.shape[1:] != (S, S) \
            or masks.dtype != torch.uint8 or not masks.is_contiguous():
        raise ValueError(f"masks must be contiguous uint8 [>= {B * Hkv * width}, {S}, {S}], got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    if not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    for name, t in (("step", step), ("slot", slot), ("budget", budget)):
        if t.numel() != 1 or t.dtype != torch.long:
            raise ValueError(f"{name} must be an int64 tensor of one element, got {t.dtype} {tuple(t.shape)}")
    key_min, key_max = key_min.contiguous(), key_max.contiguous()
    rows = rows.contiguous()
    dev = query.device
    skey = (B, H, Hkv, NP, str(dev))
    scratch = _SCRATCH.get(skey)
    if scratch is None:  # per-head page logits, per-page visible / kept codes (rewritten by every call)
        scratch = (torch.empty(B * H * NP, dtype=torch.float32, device=dev),
                   torch.empty(B * Hkv * NP, dtype=torch.int32, device=dev))
        if len(_SCRATCH) >= 8:
            _SCRATCH.pop(next(iter(_SCRATCH)))
        _SCRATCH[skey] = scratch
    logits, code = scratch
    slots = torch.empty(B * Hkv * width, dtype=torch.int32, device=dev)
    kv_num = torch.empty(B, H, 1, dtype=torch.int32, device=dev)
    kv_idx = torch.empty(B, H, 1, width, dtype=torch.int32, device=dev)
    stats = torch.empty(B, Hkv, 3, dtype=torch.int32, device=dev)
    G = H // Hkv
    sr_b = rows.stride(1) if rows.shape[1] > 1 else 0
    rows_u8, valid_u8 = rows.view(torch.uint8), valid.view(torch.uint8)
    page_logit_kernel[(B * Hkv, triton.cdiv(NP, _BLOCK_P))](
        query, key_min, key_max, rows_u8, valid_u8, slot, step, logits, code,
        float(scale), NP, rows.shape[0], rows.stride(0), sr_b, valid.stride(0),
        (query.stride(0), query.stride(1)), (key_min.stride(1), key_min.stride(2)),
        Hkv=Hkv, G=G, GP=max(16, _pow2(G)), D=D, DP=max(16, _pow2(D)), S=S, BLOCK_P=_BLOCK_P, num_warps=4,
    )
    NPP = max(16, _pow2(NP))
    page_choose_kernel[(B * Hkv,)](
        rows_u8, valid_u8, step, budget, logits, code, slots, kv_num, kv_idx, masks, stats,
        NP, width, rows.shape[0], rows.stride(0), sr_b, valid.stride(0),
        Hkv=Hkv, G=G, S=S, NPP=NPP, BLOCK_W=min(32, max(16, _pow2(width))),
        num_warps=8 if NPP <= 2048 else 16,
    )
    return PageTables(kv_num=kv_num, kv_idx=kv_idx, masks=masks, stats=stats)


def flag_nonfinite(output: torch.Tensor, query: torch.Tensor, flags: torch.Tensor, index: int) -> None:
    """``flags[index] |= (output has a NaN or inf) & (query is all finite)``, in one triton launch with no host
    read (the static decode step's per-layer check: a non-finite output from a finite query; a layer fed an
    earlier layer's NaN is not to blame). Same as
    ``flags[index] |= ~torch.isfinite(output).all() & torch.isfinite(query).all()`` (seven kernels).

    Args:
        output: any shape, floating (e.g. the attention output ``[B, H, 1, D]``).
        query: any shape, floating.
        flags: bool ``[N]`` contiguous, on the same device.
        index: ``0 <= index < N``.
    """
    require("triton", extra="gpu")
    from spattn.ops.decode._kernel import nonfinite_flag_kernel

    if flags.dtype != torch.bool or flags.dim() != 1 or not flags.is_contiguous():
        raise ValueError(f"flags must be a contiguous bool [N] tensor, got {flags.dtype} {tuple(flags.shape)}")
    if not 0 <= int(index) < flags.shape[0]:
        raise ValueError(f"index must be in [0, {flags.shape[0]}), got {index!r}")
    for name, t in (("output", output), ("query", query)):
        if not t.is_floating_point() or t.device != flags.device:
            raise ValueError(f"{name} must be a floating tensor on {flags.device}, got {t.dtype} on {t.device}")
    out, q = output.contiguous().view(-1), query.contiguous().view(-1)
    nonfinite_flag_kernel[(1,)](out, q, flags.view(torch.uint8), out.numel(), q.numel(), int(index), BLOCK=1024,
                                num_warps=4)


def append_static(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  key_min: torch.Tensor, key_max: torch.Tensor, slot: torch.Tensor, *, page_size: int) -> None:
    """One decode token into a static paged cache, in one triton launch with no host read: ``keys[:, :, slot] =
    key``, ``values[:, :, slot] = value``, and the page ``slot // page_size``'s minimum / maximum keys updated
    (set to the key on the page's first slot). Same as the torch ops of
    :meth:`spattn.runtime.cache.PagedLayer.update` in static decode (about a dozen kernels), bit for bit.

    Args:
        key: ``[B, Hkv, 1, D]``; value: ``[B, Hkv, 1, Dv]`` (the token's, same dtype as the cache).
        keys: ``[B, Hkv, C, D]``; values: ``[B, Hkv, C, Dv]``; key_min / key_max: ``[B, Hkv, C / page_size, D]``
            (the cache's buffers; the last dim contiguous).
        slot: int64 ``[1]`` on the device, ``0 <= slot < C``.
        page_size: tokens per page.
    """
    require("triton", extra="gpu")
    from spattn.ops.decode._kernel import append_static_kernel

    B, Hkv, C, D = keys.shape
    Dv = values.shape[-1]
    if key.shape != (B, Hkv, 1, D) or value.shape != (B, Hkv, 1, Dv):
        raise ValueError(f"key / value must be [B={B}, Hkv={Hkv}, 1, D] matching the cache, got "
                         f"{tuple(key.shape)} / {tuple(value.shape)}")
    if key.dtype != keys.dtype or value.dtype != values.dtype or key_min.dtype != keys.dtype:
        raise ValueError(f"key / value / bounds must have the cache's dtype {keys.dtype}, got {key.dtype} / "
                         f"{value.dtype} / {key_min.dtype}")
    if key_min.shape != (B, Hkv, C // page_size, D) or key_max.shape != key_min.shape:
        raise ValueError(f"key_min / key_max must be [{B}, {Hkv}, {C // page_size}, {D}], got "
                         f"{tuple(key_min.shape)} / {tuple(key_max.shape)}")
    if key_min.stride() != key_max.stride():
        raise ValueError("key_min and key_max must have the same strides")
    for name, t in (("key", key), ("value", value), ("keys", keys), ("values", values), ("key_min", key_min)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if slot.numel() != 1 or slot.dtype != torch.long:
        raise ValueError(f"slot must be an int64 tensor of one element, got {slot.dtype} {tuple(slot.shape)}")
    append_static_kernel[(B * Hkv,)](
        key, value, keys, values, key_min, key_max, slot,
        (key.stride(0), key.stride(1)), (value.stride(0), value.stride(1)),
        (keys.stride(0), keys.stride(1), keys.stride(2)), (values.stride(0), values.stride(1), values.stride(2)),
        (key_min.stride(0), key_min.stride(1), key_min.stride(2)),
        Hkv=Hkv, S=page_size, D=D, DP=max(16, _pow2(D)), DV=Dv, DVP=max(16, _pow2(Dv)), num_warps=1,
    )
