"""``Schedule``: a value that moves from ``start`` to ``end`` over the first ``steps`` training steps."""

from __future__ import annotations

import dataclasses
import math

SHAPES = ("linear", "cosine", "exponential")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``at(step)``: ``start`` at step 0, ``end`` from step ``steps`` on; ``shape`` ``"linear"`` (default),
    ``"cosine"`` or ``"exponential"`` (geometric, for temperatures; both ends > 0). ``integer=True`` rounds
    (budgets in blocks).

    Example:
        >>> Schedule(2.0, 0.5, 100).at(50)
        1.25
    """

    start: float
    end: float
    steps: int
    shape: str = "linear"
    integer: bool = False

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Schedule.steps must be an int >= 0, got {self.steps!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"Schedule.shape must be one of {SHAPES}, got {self.shape!r}")
        if self.shape == "exponential" and not (self.start > 0 and self.end > 0):
            raise ValueError("an exponential Schedule needs start > 0 and end > 0")

    def at(self, step: int) -> float:
        t = 1.0 if self.steps == 0 else min(max(step, 0) / self.steps, 1.0)
        if self.shape == "cosine":
            t = 0.5 - 0.5 * math.cos(math.pi * t)
        if self.shape == "exponential":
            value = self.start * (self.end / self.start) ** t
        else:
            value = self.start + (self.end - self.start) * t
        return round(value) if self.integer else value

    @classmethod
    def constant(cls, value: float, *, integer: bool = False) -> Schedule:
        return cls(value, value, 0, integer=integer)


__all__ = ["Schedule", "SHAPES"]
