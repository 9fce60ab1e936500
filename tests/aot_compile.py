"""AOT-compile every Triton kernel for sm_90 and report registers, local memory and load widths.

Run as a script without TRITON_INTERPRET (``tests/test_aot_sm90.py`` does so in a subprocess); it
needs no GPU.  Each kernel is compiled with the specialization the JIT gives it in production
(pointers and 16-divisible sizes carry ``tt.divisibility=16``, which is what lets loads be 128-bit),
then the cubin is disassembled with the ``cuobjdump`` shipped inside the triton wheel.

Prints one JSON object per kernel: name, registers, stack/local bytes, and the widths of its
global loads and stores found in the SASS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from fastvae.kernels import fused_loss, reparameterize
from triton.backends.compiler import GPUTarget

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DIV16 = [["tt.divisibility", 16]]


def compile_case(name, fn, signature, constexprs, div16, num_warps):
    """Compile ``fn``; ``div16`` names the arguments known to be multiples of 16 (bytes for pointers)."""
    attrs = {(fn.arg_names.index(a),): DIV16 for a in div16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        res = subprocess.run(
            [CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    # Data loads and stores; LDG.E.CONSTANT are libdevice's table lookups (cosf's argument reduction).
    data = [l for l in sass.splitlines() if "CONSTANT" not in l]
    widths = lambda op: sorted(
        {int(m or 32) for l in data for m in re.findall(rf"\b{op}\.E(?:\.\w+)*?(?:\.(64|128))?\s", l)}
    )
    return {
        "name": name,
        "registers": int(usage.get("REG", -1)),
        "stack": int(usage.get("STACK", -1)),
        "local": int(usage.get("LOCAL", -1)),
        "load_bits": widths("LDG"),
        "store_bits": widths("STG"),
        "spill_lines": len(re.findall(r"\b(STL|LDL)\b", sass)),
    }


def cases():
    """The production specializations: MNIST-sized vae_loss (fp32, uint8 and bf16 data), reparameterize."""
    loss_args = fused_loss.fused_loss_kernel.arg_names
    B, F, D = 4096, 784, 20
    block_b, block_f, block_d, warps = fused_loss.block_sizes(B, F, D)
    for label, x_t, t_t, u8 in (
        ("fp32", "fp32", "fp32", False),
        ("u8", "fp32", "u8", True),
        ("bf16", "bf16", "bf16", False),
    ):
        sig = dict.fromkeys(loss_args, "constexpr")
        sig.update({a: f"*{x_t}" for a in ("x_ptr", "dx_ptr")})
        sig.update({"t_ptr": f"*{t_t}"})
        sig.update({a: f"*{x_t}" for a in ("mu_ptr", "lv_ptr", "dmu_ptr", "dlv_ptr")})
        sig.update({a: "*fp32" for a in ("row_loss_ptr", "row_recon_ptr", "row_kl_ptr")})
        sig.update({a: "i32" for a in ("B", "F", "D", "stride_x", "stride_t", "stride_mu", "stride_lv")})
        sig.update({"beta": "fp32", "grad_scale": "fp32"})
        const = dict(
            RECON=1,
            HAS_KL=True,
            TARGET_U8=u8,
            NEED_GRAD=True,
            WRITE_ROW_LOSS=False,
            COMPUTE=tl.float32,
            BLOCK_B=block_b,
            BLOCK_F=block_f,
            BLOCK_D=block_d,
        )
        pointers = [a for a in loss_args if a.endswith("_ptr")]
        yield (
            f"fused_loss_{label}",
            fused_loss.fused_loss_kernel,
            sig,
            const,
            pointers + ["B", "F", "stride_x", "stride_t"],
            warps,
            True,
        )

    sig = {
        "row_recon_ptr": "*fp32",
        "row_kl_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "recon_ptr": "*fp32",
        "kl_ptr": "*fp32",
        "B": "i32",
        "beta": "fp32",
        "scale": "fp32",
        "BLOCK": "constexpr",
    }
    yield (
        "sum_rows",
        fused_loss.sum_rows_kernel,
        sig,
        {"BLOCK": fused_loss.SUM_BLOCK},
        [a for a in sig if a.endswith("_ptr")] + ["B"],
        4,
        False,
    )

    scale_args = fused_loss.scale_rows_kernel.arg_names
    sig = dict.fromkeys(scale_args, "constexpr")
    sig.update(
        {
            "g_ptr": "*fp32",
            "dx_ptr": "*fp32",
            "dmu_ptr": "*fp32",
            "dlv_ptr": "*fp32",
            "B": "i32",
            "F": "i32",
            "D": "i32",
        }
    )
    const = dict(G_PER_ROW=False, HAS_X=True, HAS_KL=True, BLOCK_B=block_b, BLOCK_F=block_f, BLOCK_D=block_d)
    yield (
        "scale_rows",
        fused_loss.scale_rows_kernel,
        sig,
        const,
        ["g_ptr", "dx_ptr", "dmu_ptr", "dlv_ptr", "B", "F"],
        warps,
        True,
    )

    rep_args = reparameterize.reparameterize_kernel.arg_names
    for label, ty, backward in (
        ("fwd_fp32", "fp32", False),
        ("bwd_fp32", "fp32", True),
        ("fwd_bf16", "bf16", False),
    ):
        sig = dict.fromkeys(rep_args, "constexpr")
        sig.update(
            {
                "mu_ptr": f"*{ty}",
                "logvar_ptr": f"*{ty}",
                "out_ptr": f"*{ty}",
                "seed": "i64",
                "n_elements": "i64",
            }
        )
        const = dict(BACKWARD=backward, COMPUTE=tl.float32, BLOCK=reparameterize.BLOCK)
        yield (
            f"reparameterize_{label}",
            reparameterize.reparameterize_kernel,
            sig,
            const,
            ["mu_ptr", "logvar_ptr", "out_ptr", "n_elements"],
            reparameterize.NUM_WARPS,
            True,
        )


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    for name, fn, sig, const, div16, warps, streaming in cases():
        report = compile_case(name, fn, sig, const, div16, warps)
        report["streaming"] = streaming
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
