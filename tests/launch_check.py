"""Run by tests/test_launch.py in a subprocess (TRITON_INTERPRET unset): kernels.launch.Launcher
against Triton's own JITFunction.run, on a stub driver whose launcher records its arguments."""

from __future__ import annotations

import json
import sys

import torch
import triton.language as tl

from bench import hosttime


class Recorder:
    calls: list[tuple] = []

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args) -> None:
        Recorder.calls.append(args)


def main() -> int:
    hosttime.install_stub()
    from triton.runtime.driver import driver

    type(driver.active).launcher_cls = Recorder
    handles = iter(range(100, 10**6))  # a distinct function handle per compiled kernel
    driver.active.utils.load_binary = lambda *args: (1, next(handles), 0, 0, 1024)
    from fastvae.kernels.launch import Launcher
    from fastvae.kernels.reparameterize import reparameterize_kernel as fn

    kw = dict(
        BACKWARD=False,
        KEY_IS_PTR=False,
        COMPUTE=tl.float32,
        SHIFT=0,
        EVEN=True,
        I32=True,
        IDX64=False,
        PTX=True,
        MUFU=False,
        BLOCK=1024,
        num_warps=4,
    )
    flat = torch.randn(4097)
    a, lv, out = flat[:4096], torch.randn(4096), torch.empty(4096)
    launcher = Launcher(fn, (4,), kw)
    report = {}

    def plain(*args):
        """The arguments Triton's own JITFunction.run hands the C launcher."""
        fn[(4,)](*args, **kw)
        return Recorder.calls[-1]

    def via_launcher(*args):
        launcher(*args)
        return Recorder.calls[-1]

    def same(x, y):
        """Equal launch arguments.  Launch metadata and hooks (positions 6-8) are equivalent when the hooks
        are empty: JITFunction.run passes empty hook chains and metadata, the Launcher passes None."""

        def empty(u):
            return u is None or type(u).__name__ == "LazyDict" or getattr(u, "calls", None) == []

        def eq(i, u, v):
            if 6 <= i <= 8:
                return empty(u) and empty(v)
            return u is v if torch.is_tensor(u) else u == v

        return len(x) == len(y) and all(eq(i, u, v) for i, (u, v) in enumerate(zip(x, y, strict=True)))

    args = (a, lv, out, 5, 0, 4096)
    via_launcher(*args)  # first call: through JITFunction.run, which compiles
    report["direct_equals_jit"] = same(plain(*args), via_launcher(*args))
    # a misaligned pointer and ints of other classes are other specializations, for Triton and for us
    odd = flat[1:]
    others = [
        (odd, lv, out, 5, 0, 4096),
        (a, lv, out, 5, 0, 1),
        (a, lv, out, 5, 0, 17),
        (a, lv, out, 2**40, 0, 4096),
    ]
    report["direct_equals_jit_each"] = []
    for extra in others:
        via_launcher(*extra)
        report["direct_equals_jit_each"].append(same(plain(*extra), via_launcher(*extra)))
    report["launcher_kernels"] = len(launcher.compiled)
    report["triton_kernels"] = len(fn.device_caches[0][0])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
