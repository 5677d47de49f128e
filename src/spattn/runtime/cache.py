"""``SpattnCache``: a transformers ``Cache`` whose layers keep, per page of keys, the statistics decode-time
page selection needs (Quest-style elementwise key min / max), updated as tokens arrive.

Each :class:`PagedLayer` stores keys/values in a buffer grown by doubling (no copy of the whole cache at
every step, unlike ``torch.cat``) and returns views of the filled part, ``[B, Hkv, L, D]``. Page ``p`` holds
tokens ``p * page_size .. (p + 1) * page_size - 1``; ``key_min`` / ``key_max`` are ``[B, Hkv, NP, D]`` with
``NP = ceil(L / page_size)`` (the last page may be partial). Pages cover every slot of the cache, padding
included: padding is excluded by the attention mask, not here.

    >>> cache = SpattnCache(num_layers=model.config.num_hidden_layers, page_size=128)  # doctest: +SKIP
    >>> model.generate(**inputs, past_key_values=cache)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch

from spattn._optional import require
from spattn.runtime.decode import has_triton
from spattn.runtime.monitor import log_event

require("transformers", extra="hf")
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402 - after the extra check

_APPEND_OFF: list[str] = []  # why the fused static append failed (then the torch ops write, for every layer)


def disable_fused_append(reason: str) -> None:
    """From now on every :class:`PagedLayer` left on auto writes static decode tokens with the torch ops (logged)."""
    _APPEND_OFF.append(reason)
    log_event(logging.WARNING, "fused_append_off", reason=reason)


def _fused_append(forced: bool | None, keys: torch.Tensor) -> bool:
    if forced is not None:
        return forced
    return keys.is_cuda and not _APPEND_OFF and has_triton()


class PagedLayer(DynamicLayer):
    """One layer of :class:`SpattnCache`: growing key/value buffers plus per-page key min/max.

    Args:
        page_size: tokens per page (the selection granularity; default 128, the kernels' block size).
        reserve: tokens to allocate at the first update (default 0: grow by doubling).
        track_means: also keep each page's mean key (float32; what the ``pooled`` selector scores at decode;
            default False).
    """

    def __init__(self, page_size: int = 128, reserve: int = 0, track_means: bool = False) -> None:
        super().__init__()
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.page_size = page_size
        self.reserve = int(reserve)
        self.length = 0
        self._keys: torch.Tensor | None = None    # [B, Hkv, capacity, D]
        self._values: torch.Tensor | None = None
        self._min: torch.Tensor | None = None     # [B, Hkv, capacity // page_size, D]
        self._max: torch.Tensor | None = None
        self.track_means = bool(track_means)
        self._mean: torch.Tensor | None = None    # [B, Hkv, capacity // page_size, D] float32
        self.slot: torch.Tensor | None = None     # int64 [1] on the device: static decode writes here
        # static decode's write in one triton launch (spattn.ops.decode.append_static) instead of about a dozen
        # torch kernels: None = on CUDA when triton is installed (and it has not failed), True / False = forced
        self.fused_append: bool | None = None

    # ------------------------------------------------------------------ storage
    def _ensure(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._keys is None else self._keys.shape[2]
        if needed <= capacity:
            return
        S = self.page_size
        new_capacity = max(needed, 2 * capacity, S, self.reserve)
        new_capacity = -(-new_capacity // S) * S
        B, Hkv, _, D = key_states.shape
        Dv = value_states.shape[-1]
        # zeroed, not empty: the triton decode kernel may read the unfilled rows (masked out, but 0 * NaN = NaN)
        keys = key_states.new_zeros(B, Hkv, new_capacity, D)
        values = value_states.new_zeros(B, Hkv, new_capacity, Dv)
        kmin = key_states.new_empty(B, Hkv, new_capacity // S, D)
        kmax = key_states.new_empty(B, Hkv, new_capacity // S, D)
        kmean = key_states.new_empty(B, Hkv, new_capacity // S, D, dtype=torch.float32) if self.track_means else None
        if self.length:
            n_pages = -(-self.length // S)
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
            kmin[:, :, :n_pages] = self._min[:, :, :n_pages]
            kmax[:, :, :n_pages] = self._max[:, :, :n_pages]
            if kmean is not None:
                kmean[:, :, :n_pages] = self._mean[:, :, :n_pages]
        self._keys, self._values, self._min, self._max, self._mean = keys, values, kmin, kmax, kmean

    def _refresh_pages(self, start: int) -> None:
        """Recompute min/max of the pages holding tokens ``start .. length - 1``."""
        S = self.page_size
        first, last = start // S, -(-self.length // S)
        if last <= first:
            return
        lo, hi = first * S, self.length
        chunk = self._keys[:, :, lo:hi]
        pad = (last - first) * S - (hi - lo)
        if self._mean is not None:
            padded = torch.nn.functional.pad(chunk, (0, 0, 0, pad)).unflatten(2, (last - first, S))
            sums = padded.sum(3, dtype=torch.float32)
            counts = (hi - lo - torch.arange(last - first, device=chunk.device) * S).clamp(max=S)
            self._mean[:, :, first:last] = sums / counts[:, None].to(torch.float32)
        if pad:  # the partial last page: repeat its first key (min/max unchanged by duplicates)
            chunk = torch.cat([chunk, chunk[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        pages = chunk.unflatten(2, (last - first, S))
        self._min[:, :, first:last] = pages.amin(3)
        self._max[:, :, first:last] = pages.amax(3)

    def _append_one(self, slot: int, key: torch.Tensor) -> None:
        """The page statistics after one key ``[B, Hkv, D]`` arrived at ``slot`` (a decode step): a running
        min / max / mean of its page instead of a recompute over the page (a few elementwise kernels)."""
        S = self.page_size
        page, filled = slot // S, slot % S
        if filled == 0:
            self._min[:, :, page] = key
            self._max[:, :, page] = key
            if self._mean is not None:
                self._mean[:, :, page] = key.float()
            return
        self._min[:, :, page] = torch.minimum(self._min[:, :, page], key)
        self._max[:, :, page] = torch.maximum(self._max[:, :, page], key)
        if self._mean is not None:
            mean = self._mean[:, :, page]
            self._mean[:, :, page] = mean + (key.float() - mean) / (filled + 1)

    def _publish(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def _rebuild(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents with ``keys``/``values`` (after crop / reorder / batch selection)."""
        self.length = 0
        self._keys = self._values = self._min = self._max = self._mean = None
        if keys is None or keys.numel() == 0:
            self.keys = keys
            self.values = values
            return
        self._ensure(keys, values, keys.shape[2])
        self._keys[:, :, : keys.shape[2]] = keys
        self._values[:, :, : keys.shape[2]] = values
        self.length = keys.shape[2]
        self._refresh_pages(0)
        self._publish()

    def _update_static(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """One decode token written at the device-side ``slot``: no host value read, fixed shapes (what a CUDA
        graph can record); returns the whole ``[B, Hkv, C, D]`` buffers."""
        if key_states.shape[2] != 1:
            raise ValueError(f"a static cache takes one token per update, got {key_states.shape[2]}")
        slot = self.slot
        if self._mean is None and _fused_append(self.fused_append, self._keys):
            from spattn.ops.decode import append_static

            try:
                append_static(key_states, value_states, self._keys, self._values, self._min, self._max, slot,
                              page_size=self.page_size)
                return self._keys, self._values
            except Exception as exc:  # noqa: BLE001 - the torch ops below do the same write
                if self.fused_append:
                    raise
                disable_fused_append(f"{type(exc).__name__}: {exc}")
        self._keys.index_copy_(2, slot, key_states)
        self._values.index_copy_(2, slot, value_states)
        S = self.page_size
        page, first = slot // S, (slot % S == 0)
        key = key_states
        old_min, old_max = self._min.index_select(2, page), self._max.index_select(2, page)
        self._min.index_copy_(2, page, torch.where(first, key, torch.minimum(old_min, key)))
        self._max.index_copy_(2, page, torch.where(first, key, torch.maximum(old_max, key)))
        if self._mean is not None:
            mean = self._mean.index_select(2, page)
            filled = (slot % S).to(torch.float32)
            running = mean + (key.float() - mean) / (filled + 1)
            self._mean.index_copy_(2, page, torch.where(first, key.float(), running))
        return self._keys, self._values

    def start_static(self, slot: torch.Tensor) -> None:
        """Static decode from now on: each update writes its one token at ``slot`` (int64 ``[1]``, on the
        device, advanced by the caller) and returns the whole buffers (capacity fixed by ``reserve``)."""
        if self._keys is None:
            raise ValueError("start_static needs a filled cache layer (run the prefill first)")
        if int(self._keys.shape[2]) % self.page_size:
            raise ValueError("the cache capacity must be a whole number of pages")
        self.slot = slot

    def end_static(self, length: int) -> None:
        """Back to the host-side length after static decode: ``length`` tokens are filled."""
        self.slot = None
        self.length = int(length)
        self._publish()

    # ------------------------------------------------------------------ transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, n, D]`` keys/values; returns views of all ``[B, Hkv, L, D]`` (in static decode, see
        :meth:`start_static`, the whole ``[B, Hkv, C, D]`` buffers)."""
        if self.slot is not None:
            return self._update_static(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._keys is not None and (key_states.shape[0] != self._keys.shape[0]
                                       or key_states.shape[1] != self._keys.shape[1]):
            raise ValueError(f"key_states has shape {tuple(key_states.shape)} but the cache holds "
                             f"{tuple(self._keys.shape[:2])} (batch, heads)")
        n = key_states.shape[2]
        start = self.length
        self._ensure(key_states, value_states, start + n)
        self._keys[:, :, start : start + n] = key_states
        self._values[:, :, start : start + n] = value_states
        self.length = start + n
        if n == 1:
            self._append_one(start, key_states[:, :, 0])
        else:
            self._refresh_pages(start)
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self.slot = None
        self._keys = self._values = self._min = self._max = self._mean = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.length:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        if self.length:
            self._refresh_pages((self.length - 1) // self.page_size * self.page_size)  # the new last page
        self._publish()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.length:
            self._rebuild(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.length:
            self._rebuild(self.keys, self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.length:
            self._rebuild(self.keys, self.values)

    # ------------------------------------------------------------------ page statistics
    @property
    def num_pages(self) -> int:
        return -(-self.length // self.page_size)

    def page_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_min, key_max)``, each ``[B, Hkv, NP, D]``: elementwise bounds of the keys of each page (in
        static decode, every page of the capacity: the pages past the slot are stale, masked by the caller)."""
        if self.slot is not None:
            return self._min, self._max
        if not self.length:
            raise ValueError("the cache layer is empty: no page statistics yet")
        n = self.num_pages
        return self._min[:, :, :n], self._max[:, :, :n]

    def page_means(self) -> torch.Tensor:
        """float32 ``[B, Hkv, NP, D]``: the mean key of each page (needs ``track_means``)."""
        if not self.track_means:
            raise ValueError("this cache layer does not keep page means (track_means=False)")
        if self.slot is not None:
            return self._mean
        if not self.length:
            raise ValueError("the cache layer is empty: no page statistics yet")
        return self._mean[:, :, : self.num_pages]

    def holds(self, key: torch.Tensor) -> bool:
        """True when ``key`` is this layer's current key view (the tensor ``update`` returned)."""
        if self.slot is not None:
            return key is self._keys
        return self.keys is key or (
            self.length > 0 and key.shape == self.keys.shape and key.data_ptr() == self.keys.data_ptr()
        )


class SpattnCache(Cache):
    """A transformers ``Cache`` of :class:`PagedLayer` layers (per-page key statistics for sparse decode).

    Args:
        num_layers: number of decoder layers (``model.config.num_hidden_layers``).
        page_size: tokens per page (default 128).
        reserve: tokens to allocate at the first update (e.g. prompt + max_new_tokens), so the buffers never
            grow during generation (default 0: grow by doubling).
        track_means: also keep each page's mean key (for ``pooled`` decode selection; default False).
    """

    def __init__(self, num_layers: int, page_size: int = 128, reserve: int = 0, track_means: bool = False) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        super().__init__(layers=[PagedLayer(page_size, reserve, track_means) for _ in range(num_layers)])
        self.page_size = page_size

    def start_static(self, slot: torch.Tensor) -> None:
        """Every layer in static decode (see :meth:`PagedLayer.start_static`), writing at ``slot``."""
        for layer in self.layers:
            layer.start_static(slot)

    def end_static(self, length: int) -> None:
        """Every layer back to a host-side ``length`` (see :meth:`PagedLayer.end_static`)."""
        for layer in self.layers:
            layer.end_static(length)
