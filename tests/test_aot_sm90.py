"""Static GPU budgets without a GPU: every production kernel, AOT-compiled for sm_90 by ``bench.static``.

Each kernel is held to zero local memory / stack / spills and to the budget table below: registers,
SASS instructions per valid element of its steady-state loop, BAR.SYNC in that loop, and the global
load / store widths there (128-bit for the streaming operands).  A change that adds instructions,
registers or barriers, or narrows an access, fails here.  After an intended improvement, lower the
row to the new measurement: the failure message prints it, and
``python -m bench.static --arch 90 --budget-rows`` prints every row for the installed Triton.  The
budgets are per Triton minor version (3.6 and 3.9 generate different code); CI runs this file under
both (``.ci/run``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402

from bench import static  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REG_MARGIN = 8  # one register-allocation step (8 per thread)
# Slack on instructions per element: 2%, at least 0.25 (one more loop instruction adds
# threads / lanes per iteration = 1/8 at 128 threads and 1024 lanes).
IPE_MARGIN, IPE_FLOOR = 0.02, 0.25

# case: (registers, instructions per valid element, loop load bits, loop store bits, BAR.SYNC in loop)
Budget = tuple[int, float, list[int], list[int], int]
BUDGETS: dict[str, dict[str, Budget]] = {
    "3.9": {
        "vae_loss fp32 5350x784 D=20": (48, 26.12, [128], [128], 0),
        "vae_loss u8 5350x784 D=20": (40, 29.25, [32, 128], [128], 0),
        "vae_loss bf16 5350x784 D=20": (48, 28.5, [128], [128], 0),
        "vae_loss fp32 512x12288 D=128": (40, 26.25, [128], [128], 0),
        "vae_loss u8 512x12288 D=128": (32, 30.5, [32, 128], [128], 0),
        "vae_loss bf16 512x12288 D=128": (40, 29.12, [128], [128], 0),
        "vae_loss fp32 8x196608 D=256": (40, 26.25, [128], [128], 0),
        "vae_loss gaussian fp32 4096x784 D=20 L=1": (64, 10.0, [128], [128], 0),
        "vae_loss gaussian fp32 4096x784 D=20 L=784": (64, 23.12, [128], [128], 0),
        "vae_loss cb fp32 4096x784 D=20": (64, 58.12, [128], [128], 0),
        "kl_divergence fp32 256x16384": (48, 20.25, [128], [128], 0),
        "scale_grads fp32 5350x784 D=20": (32, 3.69, [128], [128], 0),
        "scale_grads fp32 512x12288 D=128": (28, 3.19, [128], [128], 0),
        "scale_grads bf16 5350x784 D=20": (32, 4.09, [128], [128], 0),
        "reparameterize fwd fp32 4194304": (46, 42.25, [64, 128], [128], 0),
        "reparameterize bwd fp32 4194304": (46, 44.25, [64, 128], [128], 0),
        "reparameterize fwd bf16 4194304": (34, 27.12, [64, 128], [128], 0),
        "reparameterize bwd bf16 4194304": (31, 28.12, [64, 128], [128], 0),
    },
    "3.6": {
        "vae_loss fp32 5350x784 D=20": (48, 26.38, [128], [128], 0),
        "vae_loss u8 5350x784 D=20": (40, 30.5, [32, 128], [128], 0),
        "vae_loss bf16 5350x784 D=20": (48, 28.12, [128], [128], 0),
        "vae_loss fp32 512x12288 D=128": (40, 27.25, [128], [128], 0),
        "vae_loss u8 512x12288 D=128": (32, 31.5, [32, 128], [128], 0),
        "vae_loss bf16 512x12288 D=128": (40, 29.25, [128], [128], 0),
        "vae_loss fp32 8x196608 D=256": (40, 27.25, [128], [128], 0),
        "vae_loss gaussian fp32 4096x784 D=20 L=1": (56, 10.12, [128], [128], 0),
        "vae_loss gaussian fp32 4096x784 D=20 L=784": (56, 23.25, [128], [128], 0),
        "vae_loss cb fp32 4096x784 D=20": (56, 59.5, [128], [128], 0),
        "kl_divergence fp32 256x16384": (48, 20.25, [128], [128], 0),
        "scale_grads fp32 5350x784 D=20": (32, 3.69, [128], [128], 0),
        "scale_grads fp32 512x12288 D=128": (28, 3.19, [128], [128], 0),
        "scale_grads bf16 5350x784 D=20": (34, 4.09, [128], [128], 0),
        "reparameterize fwd fp32 4194304": (46, 42.25, [64, 128], [128], 0),
        "reparameterize bwd fp32 4194304": (46, 44.25, [64, 128], [128], 0),
        "reparameterize fwd bf16 4194304": (32, 27.62, [64, 128], [128], 0),
        "reparameterize bwd bf16 4194304": (31, 28.62, [64, 128], [128], 0),
    },
}
VERSION = ".".join(triton.__version__.split(".")[:2])


def _static(tmp_path_factory, *args: str):
    """``python -m bench.static --arch 90 *args`` in a clean process (kernels must not be interpreted):
    its JSON output."""
    path = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.static", "--arch", "90", *args, "--json", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    """``python -m bench.static --arch 90``: the static cases."""
    return _static(tmp_path_factory)


@pytest.fixture(scope="module")
def kernels(record) -> dict[str, dict]:
    """The streaming kernel of every case, by case name."""
    return {r["case"]: r for r in record["kernels"] if r["streaming"]}


def test_every_case_compiles(record, kernels):
    assert record["versions"]["triton"] == triton.__version__
    assert set(kernels) == set(BUDGETS["3.9"]), sorted(kernels)
    for r in record["kernels"]:
        assert r["arch"] == "sm_90" and 0 < r["registers"] <= 255, r


def test_no_local_memory_stack_or_spills(record):
    bad = [
        (r["case"], r["kernel"], r["stack_bytes"], r["local_bytes"], r["spill_instructions"])
        for r in record["kernels"]
        if r["stack_bytes"] or r["local_bytes"] or r["spill_instructions"]
    ]
    assert not bad, f"triton {triton.__version__}: (case, kernel, stack, local, spill instructions) {bad}"


def test_shapes_of_2_22_elements_run_2_waves(kernels):
    """Every case of at least 2^22 elements launches at least 2 waves of programs on 132 SMs at the
    occupancy its registers allow (5350 x 784: short rows, split in 3 chunks)."""
    big = {name: r for name, r in kernels.items() if r["elements"] >= 2**22}
    assert len(big) >= 8, sorted(big)
    low = [(name, r["programs"], r["blocks_per_sm"], r["waves"]) for name, r in big.items() if r["waves"] < 2]
    assert not low, f"(case, programs, resident programs an SM, waves): {low}"


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    """``python -m bench.static --variants``: every reparameterize specialization and the fused-loss and
    gradient-scaling ones the static cases leave out, compiled for sm_90."""
    return _static(tmp_path_factory, "--variants")


def test_every_reparameterize_specialization_compiles(variants):
    """Each dtype and direction, the key as a tensor or an int, whole tiles and tails at offset phases
    0, 1 and 3 (int64 counters), in 1-warp and 4-warp programs and past 2^31 elements (int64 indices):
    compiled for sm_90 with no stack, local memory or spill and at most 64 registers (50% occupancy);
    the 16-bit ones draw with MUFU (EX2 an element, two LG2, COS and SIN a pair: 24 for a thread's 8),
    the others do not."""
    rep = [v for v in variants if v["kernel"] == "reparameterize_kernel"]
    assert len(rep) == 72
    for v in rep:
        c = v["constexprs"]
        half = " float16 " in v["name"] or " bfloat16 " in v["name"]
        n, offset = (int(v["name"].split(f" {k}=")[1].split()[0]) for k in ("n", "offset"))
        assert (v["stack_bytes"], v["local_bytes"], v["spill_instructions"]) == (0, 0, 0), v
        assert c["PTX"] == "True" and c["MUFU"] == str(half), v
        assert c["EVEN"] == str(offset == 0), v
        assert c["I32"] == str(offset + n + 1024 < 2**31) and c["IDX64"] == str(n >= 2**31), v
        assert (v["mufu"] == 24) if half else (v["mufu"] <= 12), v
        assert v["registers"] <= 64, v
    assert {v["constexprs"]["BLOCK"] for v in rep} == {"128", "256", "512", "1024"}


def test_every_loss_specialization_compiles(variants):
    """Each likelihood and reduction, 16-bit and float64 operands, uint8 targets, no gradients, KL alone,
    split rows, and scale_grads_ with a scalar and a per-row factor: compiled for sm_90 with no stack,
    local memory or spill and at most 64 registers, float64 aside (the gradcheck path: 60-140
    registers, libdevice's double-precision subroutines; Triton 3.9 keeps one value of the BCE kernel
    on an 8-byte stack)."""
    rest = [v for v in variants if v["kernel"] != "reparameterize_kernel"]
    assert len(rest) == 16 and {v["kernel"] for v in rest} == {"fused_loss_kernel", "scale_grads_kernel"}
    for v in rest:
        if "float64" not in v["name"]:
            assert (v["stack_bytes"], v["local_bytes"], v["spill_instructions"]) == (0, 0, 0), v
            assert v["registers"] <= 64, v


def test_16_bit_reparameterize_draws_with_mufu(kernels):
    """bf16 reparameterize compiles the MUFU draw (EX2 an element, two LG2, COS and SIN a pair: 3 an
    element); fp32 keeps the exact one (EX2 for exp(lv / 2) and SQRT: 1.5 an element)."""
    rep = {name: r for name, r in kernels.items() if name.startswith("reparameterize")}
    assert len(rep) == 4
    for name, r in rep.items():
        bf16 = " bf16 " in name
        assert r["constexprs"]["MUFU"] == str(bf16), name
        assert r["mufu_per_element"] == (3.0 if bf16 else 1.5), (name, r["mufu_per_element"])


def test_streaming_loops_use_128_bit_accesses(kernels):
    for r in kernels.values():
        lp = r["loop"]
        assert max(lp["load_bits"]) == 128 and max(lp["store_bits"]) == 128, (r["case"], lp)


def test_the_steady_state_loop_is_the_streaming_loop(kernels):
    """Its loads and stores are in the ratio of the case's operands, over whole tiles; a kernel
    without a loop (reparameterize: one tile a program) is counted whole."""
    for r in kernels.values():
        assert r["loop"]["matches_case"] is not False, (r["case"], r["loop"], r["loops"])
        assert r["tiles_per_iteration"] >= 1 and r["valid_fraction"] == 1.0, r


def test_budgets(kernels):
    budgets = BUDGETS.get(VERSION)
    if budgets is None:
        rows = "\n".join(static.budget_row(r) for r in kernels.values())
        pytest.skip(f"no budget table for triton {VERSION}; measured:\n{rows}")
    over = []
    for name, (regs, ipe, loads, stores, bars) in budgets.items():
        r = kernels[name]
        lp = r["loop"]
        if (
            r["registers"] > regs + REG_MARGIN
            or r["instructions_per_element"] > ipe + max(IPE_FLOOR, IPE_MARGIN * ipe)
            or lp["load_bits"] != loads
            or lp["store_bits"] != stores
            or lp["bar_sync"] > bars
        ):
            over.append(static.budget_row(r))
    assert not over, f"triton {VERSION}: over budget (measured rows):\n" + "\n".join(over)


# ------------------------------------------------------------------------------------------------
# The analysis itself, on hand-written inputs (no compiler).
# ------------------------------------------------------------------------------------------------

SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0030*/                   MUFU.EX2 R5, R5 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   STG.E.128 desc[UR4][R8.64], R4 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/              @!P1 BRA 0xc0 ;
        /*0080*/                   FADD R1, R1, R1 ;
        /*0090*/                   FADD R1, R1, R1 ;
        /*00a0*/               @P2 BRA 0x80 ;
        /*00b0*/                   LDG.E.CONSTANT R3, desc[UR4][R2.64] ;
        /*00c0*/                   STG.E desc[UR4][R2.64], R1 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def test_sass_parsing_and_the_steady_state_loop():
    code = static.parse_sass(SASS)
    assert [i.addr for i in code] == list(range(0, 0xF0, 0x10))
    assert [static.access_bits(i) for i in code if i.base in ("LDG", "STG")] == [64, 128, 128, 32, 32]
    assert static.loops(code) == [(2, 6), (8, 10)]
    # 0x80..0xb0 is skipped by the branch at 0x70 and holds a loop and no data access (a load through
    # the read-only cache, LDG.E.CONSTANT, is a table lookup): a slow path.
    assert static.slow_paths(code) == {8, 9, 10, 11}
    loop, has_loop, every = static.steady_state(code, static.slow_paths(code), (4, 4))
    assert has_loop and loop["start"] == "0x20" and loop["matches_case"] and len(every) == 1
    # No loop loads twice what it stores: flagged, and the loop moving the most bytes is reported.
    other, _, _ = static.steady_state(code, static.slow_paths(code), (8, 4))
    assert other["matches_case"] is False and other["start"] == "0x20"
    assert (loop["instructions"], loop["mufu"], loop["bar_sync"]) == (5, 1, 1)
    assert (loop["load_bits"], loop["store_bits"], loop["loaded_bytes"], loop["stored_bytes"]) == (
        [128],
        [128],
        16,
        16,
    )


def test_straight_line_kernel_counts_up_to_the_last_exit():
    code = static.parse_sass(SASS.replace("@P0 BRA 0x20", "NOP"))
    loop, has_loop, _ = static.steady_state(code, static.slow_paths(code))
    # 14 instructions up to EXIT, less the 4 of the slow path.
    assert not has_loop and loop["instructions"] == 10 and loop["slow_path_instructions"] == 4


def test_occupancy_follows_the_register_file_threads_and_shared_memory():
    sm90 = static.ARCHS[90]
    assert static.occupancy(sm90, 56, 4, 0) == (9, 36)  # 56 regs: 7168 a block, 9 blocks of 4 warps
    assert static.occupancy(sm90, 32, 4, 0) == (16, 64)  # thread limit: 2048 / 128
    assert static.occupancy(sm90, 128, 8, 0) == (2, 16)
    assert static.occupancy(sm90, 32, 4, 100 * 1024) == (2, 8)  # 228 KiB / (100 KiB + 1 KiB)
    assert static.occupancy(sm90, 255, 32, 0) == (0, 0)  # 256 regs x 1024 threads > 64K


def test_issue_and_memory_time_figures():
    h200 = static.H200
    assert h200.lane_issue_rate == 32 * 132 * 4 * 1.98e9
    # 100 instructions per element, 12 bytes: issue 100 / 3.345e13 s, memory 12 / 4.8e12 s.
    ratio = (100 / h200.lane_issue_rate) / (12 / h200.bandwidth)
    assert math.isclose(ratio, 1.196, rel_tol=1e-3)


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# bench\n\ntext\n")
    static.update_readme("table one", readme)
    assert readme.read_text() == f"# bench\n\ntext\n\n{static.BEGIN}\ntable one\n{static.END}\n"
    readme.write_text(readme.read_text() + "after\n")
    static.update_readme("table two", readme)
    assert readme.read_text() == f"# bench\n\ntext\n\n{static.BEGIN}\ntable two\n{static.END}\nafter\n"


@pytest.mark.parametrize("arch", ["70", "nine", ""])
def test_bad_arch_is_refused_by_name(arch, capsys):
    with pytest.raises(SystemExit):
        static.parse_args(["--arch", arch])
    assert "--arch" in capsys.readouterr().err
