"""A ``triton.jit`` that also runs CPU tensors through Triton's interpreter.

Note [interpreter]: ``triton.jit`` decides between the compiler and the interpreter when the kernel is
*decorated*, from ``TRITON_INTERPRET``. Tests in one process may import this package before or after the
variable is set, so we keep the plain Python function and build both flavours lazily: CUDA tensors go to
the compiled kernel, CPU tensors to the interpreter (with ``TRITON_INTERPRET=1`` set while it runs, since
parts of Triton read that knob at launch time).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import triton


@contextlib.contextmanager
def _interpret_env():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_PATCHED = False


def _patch_interpreter_index() -> None:
    """Note [numpy 2.4]: the interpreter turns a scalar tensor into a Python int with ``int(array)``, but its
    scalars are 1-element 1-D arrays, which numpy >= 2.4 refuses; so ``range(0, n)`` over a loaded count
    fails. We add a patch that reads the single element instead (applied only around interpreted launches,
    through the interpreter's own patch scope)."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


class DualKernel:
    def __init__(self, fn: Callable, **jit_kwargs: Any) -> None:
        self.fn = fn
        self._jit_kwargs = jit_kwargs
        self._compiled: Any = None
        self._interpreted: Any = None

    def compiled(self) -> Any:
        if self._compiled is None:
            if os.environ.get("TRITON_INTERPRET", "0") == "1":
                # decorated as JITFunction regardless of the variable: build it with the knob off
                old = os.environ.pop("TRITON_INTERPRET")
                try:
                    self._compiled = triton.jit(self.fn, **self._jit_kwargs)
                finally:
                    os.environ["TRITON_INTERPRET"] = old
            else:
                self._compiled = triton.jit(self.fn, **self._jit_kwargs)
        return self._compiled

    def interpreted(self) -> Any:
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            _patch_interpreter_index()
            self._interpreted = InterpretedFunction(self.fn, **self._jit_kwargs)
        return self._interpreted

    def __getitem__(self, grid: Any) -> Callable:
        def launch(*args: Any, **kwargs: Any) -> Any:
            if args[0].is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
                return self.compiled()[grid](*args, **kwargs)
            with _interpret_env():
                return self.interpreted()[grid](*args, **kwargs)

        return launch


def kernel(fn: Callable | None = None, **jit_kwargs: Any) -> Any:
    """Decorator: ``@kernel`` makes a :class:`DualKernel` (launch with ``k[grid](...)``)."""
    if fn is None:
        return lambda f: DualKernel(f, **jit_kwargs)
    return DualKernel(fn, **jit_kwargs)
