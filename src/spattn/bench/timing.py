"""The one median timer of every benchmark.

``median_ms(fn)``: CUDA work is timed with ``triton.testing.do_bench`` (CUDA events, the median; L2 flushed
between repeats) when triton is installed, else with CUDA events around each call; CPU work, and
``wall=True`` (host time included: compile, builds, eager decode steps), with ``time.perf_counter`` around
each call followed by a device synchronisation. Warm-up calls are never counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def host_sync(fn: Callable[[], object]) -> RuntimeError | None:
    """Run ``fn()`` once under ``torch.cuda.set_sync_debug_mode("error")`` (queued work drained first): ``None``
    when it never synchronised with the host, else the error CUDA raised. CUDA only."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as exc:
        return exc
    finally:
        torch.cuda.set_sync_debug_mode("default")


def median_ms(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    repeats: int = 20,
    warmup: int = 3,
    wall: bool = False,
    grad_to_none: list[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of ``fn()``.

    Args:
        fn: the work, called with no arguments.
        device: where it runs (default: CUDA when available, else CPU).
        repeats: timed calls (CPU / wall / events); do_bench gets about ``repeats * 5`` ms of repetitions.
        warmup: untimed calls first.
        wall: host wall clock with a synchronisation after each call, also on CUDA.
        grad_to_none: tensors whose ``.grad`` is reset between calls (backward timings).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not wall:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=max(25, warmup * 5), rep=max(100, repeats * 5),
                                  grad_to_none=grad_to_none, return_mode="median"))
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for t in grad_to_none or ():
                t.grad = None
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class TimeBudget:
    """A benchmark script's ``--time-budget``: seconds spent and left, and ``fits(step, estimate)``, which records
    a step that would not fit in ``skipped`` (printed too) instead of running it."""

    def __init__(self, seconds: float, skipped: list | None = None) -> None:
        self.budget, self.started = float(seconds), time.perf_counter()
        self.skipped = [] if skipped is None else skipped

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget - self.spent()

    def fits(self, step: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        self.skipped.append({"step": step, "estimate_s": round(estimate, 1), "left_s": round(self.left(), 1)})
        print(f"skipped {step}: needs ~{estimate:.0f} s, {self.left():.0f} s left", flush=True)
        return False
