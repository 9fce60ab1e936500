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

__all__ = ["Launcher", "SMS"]

# The SM count the launch rules size their grids for (H100 and H200: 132), the same on every machine so
# that a shape's configuration never depends on the device it runs on.
SMS = 132

_I32, _I64 = 2**31, 2**63


def _key_source(i: int, x: Any) -> str:
    """What Triton's specialization can see of runtime argument ``a{i}`` (as an expression)."""
    a = f"a{i}"
    if isinstance(x, Tensor):
        return f"{a}.dtype, {a}.data_ptr() & 15 == 0"
    if isinstance(x, bool):
        return a
    if isinstance(x, int):
        return f"{a} == 1, {a} & 15 == 0, {-_I32} <= {a} < {_I32}, {-_I64} <= {a} < {_I64}"
    return f"type({a})"


def _make_key(args: tuple) -> Any:
    """A function of the runtime arguments returning their specialization key, generated for the kinds
    of ``args`` (a launch site passes the same kinds every call: ints stay ints, tensors tensors)."""
    names = ", ".join(f"a{i}" for i in range(len(args)))
    parts = ", ".join(_key_source(i, x) for i, x in enumerate(args))
    scope: dict[str, Any] = {}
    exec(f"def key({names}):\n    return ({parts},)", scope)  # noqa: S102  (generated from argument kinds only)
    return scope["key"]


def _kinds(args: tuple) -> tuple:
    return tuple(Tensor if isinstance(x, Tensor) else type(x) for x in args)


class Launcher:
    """``fn[grid](*args, **constexprs)`` for one kernel, grid and constexpr set (and ``num_warps``...).

    ``args`` are the kernel's runtime (non-constexpr) arguments in signature order.
    """

    __slots__ = ("fn", "grid", "kwargs", "compiled", "_template", "_runtime_slots", "_key", "_kinds")

    def __init__(self, fn: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.grid, self.kwargs = fn, tuple(grid) + (1,) * (3 - len(grid)), kwargs
        self.compiled: dict[tuple, Any] | None = {} if isinstance(fn, JITFunction) else None
        self._key = self._kinds = None
        if self.compiled is not None:
            # Every parameter's value in signature order, constexprs filled in; the C launcher takes
            # them all (it skips the constexprs).
            self._template = [kwargs.get(p.name) if p.is_constexpr else None for p in fn.params]
            self._runtime_slots = [i for i, p in enumerate(fn.params) if not p.is_constexpr]

    def _slow(self, args: tuple) -> None:
        """Through ``JITFunction.run`` (which compiles or finds the kernel, and launches it); remember it."""
        kernel = self.fn[self.grid](*args, **self.kwargs)
        if kernel is None:  # nothing was compiled (a warm-up hook, or a tool that records launches)
            return
        kinds = _kinds(args)
        if kinds != self._kinds:  # a new key function: keys of the old one no longer compare
            self._key, self._kinds = _make_key(args), kinds
            self.compiled.clear()
        device = driver.active.get_current_device()
        self.compiled[(device, *self._key(*args))] = kernel.result() if hasattr(kernel, "result") else kernel

    def __call__(self, *args: Any) -> None:
        if self.compiled is None:  # the interpreter
            self.fn[self.grid](*args, **self.kwargs)
            return
        if self._key is None:
            self._slow(args)
            return
        device = driver.active.get_current_device()
        try:
            kernel = self.compiled.get((device, *self._key(*args)))
        except (AttributeError, TypeError, RuntimeError):  # arguments of other kinds than before
            kernel = None
        if kernel is None:
            self._slow(args)
            return
        values = self._template.copy()
        for slot, arg in zip(self._runtime_slots, args, strict=True):
            values[slot] = arg
        stream = driver.active.get_current_stream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        # Hooks are (possibly empty) chains; an empty one is passed as None, which the C launcher skips.
        enter = enter if getattr(enter, "calls", enter) else None
        leave = leave if getattr(leave, "calls", leave) else None
        metadata = kernel.launch_metadata(self.grid, stream, *values) if enter is not None else None
        g0, g1, g2 = self.grid
        kernel.run(
            g0, g1, g2, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave, *values
        )
