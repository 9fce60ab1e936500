"""Launch a Triton kernel with the host work of ``JITFunction.run`` done once per specialization.

At training sizes a fused op's kernel runs for a few microseconds, and ``kernel[grid](*args)`` costs
about as much on the host: ``JITFunction.run`` binds the arguments, builds a cache key (a string of
the options), reads configuration knobs, checks the kernel's globals and builds the launch metadata on
every call.  :class:`Launcher` keeps, per specialization, the ``CompiledKernel`` that the first call
through ``JITFunction.run`` compiled (or found), and afterwards calls its C launcher directly with the
same arguments on the current device's current stream -- exactly what ``JITFunction.run`` ends with.

The specialization key is computed here and is at least as fine as Triton's own: per tensor its dtype
and whether its address is 16-byte aligned; per int whether it is 1, a multiple of 16, and which of
int32 / int64 / uint64 holds it; per float nothing (Triton does not specialize floats).  Two calls
Triton would compile differently therefore never share a cached kernel.  Under the Triton interpreter
(``TRITON_INTERPRET=1``) there is no compiled kernel: every call goes through ``kernel[grid]``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

__all__ = ["Launcher"]

_I32, _I64 = 2**31, 2**63


def _arg_key(x: Any) -> Any:
    """What Triton's specialization can see of one runtime argument (or more)."""
    if isinstance(x, Tensor):
        return x.dtype, x.data_ptr() & 15 == 0
    if isinstance(x, bool):
        return bool, x
    if isinstance(x, int):
        return x == 1, x & 15 == 0, -_I32 <= x < _I32, -_I64 <= x < _I64
    return type(x)


class Launcher:
    """``fn[grid](*args, **constexprs)`` for one kernel, grid and constexpr set (and ``num_warps``...).

    ``args`` are the kernel's runtime (non-constexpr) arguments in signature order.
    """

    __slots__ = ("fn", "grid", "kwargs", "compiled", "_template", "_runtime_slots")

    def __init__(self, fn: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.grid, self.kwargs = fn, tuple(grid) + (1,) * (3 - len(grid)), kwargs
        self.compiled: dict[tuple, Any] | None = {} if isinstance(fn, JITFunction) else None
        if self.compiled is not None:
            # Every parameter's value in signature order, constexprs filled in; the C launcher takes
            # them all (it skips the constexprs).
            self._template = [kwargs.get(p.name) if p.is_constexpr else None for p in fn.params]
            self._runtime_slots = [i for i, p in enumerate(fn.params) if not p.is_constexpr]

    def __call__(self, *args: Any) -> None:
        compiled = self.compiled
        if compiled is None:  # the interpreter
            self.fn[self.grid](*args, **self.kwargs)
            return
        device = driver.active.get_current_device()
        key = (device, *map(_arg_key, args))
        kernel = compiled.get(key)
        if kernel is None:
            kernel = self.fn[self.grid](*args, **self.kwargs)  # compiles (or finds) and launches
            compiled[key] = kernel.result() if hasattr(kernel, "result") else kernel
            return
        values = self._template.copy()
        for slot, arg in zip(self._runtime_slots, args, strict=True):
            values[slot] = arg
        stream = driver.active.get_current_stream(device)
        enter = knobs.runtime.launch_enter_hook
        metadata = kernel.launch_metadata(self.grid, stream, *values) if enter is not None else None
        g0, g1, g2 = self.grid
        kernel.run(
            g0, g1, g2, stream, kernel.function, kernel.packed_metadata, metadata,
            enter, knobs.runtime.launch_exit_hook, *values,
        )  # fmt: skip
