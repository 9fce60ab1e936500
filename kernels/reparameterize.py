"""Reparameterization sample in one pass: ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)``.

``eps`` never exists in memory: element i draws ``eps[i] = randn(key, n)``, n = ``offset + i``, normal
``n & 3`` of one Philox4x32-10 call (key 0, counter ``(c_lo, c_hi, key_lo, key_hi)`` for c = ``n >> 2``:
the 64-bit ``key`` selects the stream) whose four words become uniforms as in ``tl.randn4x``;
Box-Muller on words (1, 2) and (3, 4) gives (r cos, r sin) twice (with a short-range sine and cosine
instead of libdevice's), so four elements share a call.  16-bit operands on a GPU take log, cosine and
sine from MUFU and fold r into exp(logvar / 2)'s exponent (``_box_muller_mufu``, within a fraction of a
16-bit rounding step of the exact draw); the interpreter, which runs no PTX, always draws exactly.  The
draw depends on neither the block size nor the grid, and the backward regenerates it instead of loading it.
``key`` is a Python int (an explicit seed, passed by value) or a 1-element int64 tensor that the kernel
loads: the host never reads it, so a replayed CUDA graph draws with whatever key the device holds at
replay time.

Bytes (N elements, s bytes each):
    forward   reads mu, logvar          writes z         = 3 N s
    backward  reads dz, logvar          writes dlogvar   = 3 N s
              (dmu = dz needs no pass; replaying eps costs arithmetic, not bytes, and is exact:
               0.5 * dz * (z - mu) would read z and mu, and loses the low bits of std * eps when
               |mu| >> std.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastvae.kernels.launch import SMS, Launcher
from torch import Tensor
from triton.runtime.jit import JITFunction

from fastvae.backend import Key

__all__ = ["reparameterize", "reparameterize_backward", "launch_config"]

# A thread holds 8 elements (float32: two 128-bit accesses an operand; 16-bit types: one) or 4 of float64
# (gradcheck; 8 would spill).  A program is 4 warps of them from FOUR_WARPS_FROM elements on: 2 waves on
# 132 SMs of 16 programs an SM, the most that 64 resident warps hold (on H100/H200 and below; the same
# rule everywhere, and the draw does not depend on it).  Smaller calls use 1-warp programs, 4x as many:
# an SM holds at most 32 (the block limit), so 2^22 elements still run 3.9 waves (4-warp programs at the
# 31-34 registers of the 16-bit kernel would hold 16 an SM and run 1.94), and a training batch's latents
# spread over 4x the SMs.  No register cap: every specialization compiles to at most 64 registers
# (tests/test_aot_sm90.py).
ELEMENTS_PER_THREAD = 8
FOUR_WARPS_FROM = 2 * SMS * 16 * (4 * 32 * ELEMENTS_PER_THREAD)


def launch_config(n: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) of a call over ``n`` elements of ``dtype``: a fixed rule of the shape and dtype."""
    warps = 4 if n >= FOUR_WARPS_FROM else 1
    per_thread = ELEMENTS_PER_THREAD // 2 if dtype == torch.float64 else ELEMENTS_PER_THREAD
    return 32 * warps * per_thread, warps


@triton.jit
def _sincos_0_2pi(theta):
    """(cos(theta), sin(theta)) for float32 theta in [0, 2 pi] (2 pi u for a uniform u), each within
    1.5 ulp.

    j = rint(theta / (pi / 2)) in {0, ..., 4}; y = theta - j pi / 2 by a three-part Cody-Waite:
    fma(-j, P1, theta) is exact (the exact difference is a multiple of 2^-23 below 1), then the two
    lower parts of pi / 2, so y keeps its relative accuracy next to the zeros of sin and cos;
    |y| <= pi / 4.  With q = j mod 4, cos(theta) = cos(y), -sin(y), -cos(y), sin(y) and sin(theta) =
    sin(y), cos(y), -sin(y), -cos(y) for q = 0, 1, 2, 3: one reduction and the Cephes minimax
    polynomials of cosf / sinf on [-pi / 4, pi / 4] serve both.  Straight-line code: no libdevice
    cosf / sinf, whose slow path for large arguments (never taken here) puts a 32-byte stack in the
    kernel under Triton 3.6.
    """
    # shifted = 1.5 2^23 + j: adding 1.5 2^23 rounds theta 2 / pi to the integer j in the low mantissa
    # bits (no FRND / F2I); j mod 4 is the low two bits.
    shifted = tl.fma(theta, 0.6366197723675814, 12582912.0)
    bits = shifted.to(tl.int32, bitcast=True)
    j = shifted - 12582912.0
    y = tl.fma(j, -1.5707963705062866, theta)  # P1 = float32(pi / 2): exact
    y = tl.fma(j, 4.371138828673793e-08, y)  # P2 = float32(pi / 2 - P1), negated
    y = tl.fma(j, 1.7151245100058819e-15, y)  # P3 = float32(pi / 2 - P1 - P2), negated
    z = y * y
    c = tl.fma(z, 2.443315711809948e-5, -1.388731625493765e-3)
    c = tl.fma(z, c, 4.166664568298827e-2)
    c = tl.fma(z, c, -0.5)
    c = tl.fma(z, c, 1.0)
    s = tl.fma(z, -1.9515295891e-4, 8.3321608736e-3)
    s = tl.fma(z, s, -1.6666654611e-1)
    s = tl.fma(y * z, s, y)
    odd = (bits & 1) != 0
    cv = tl.where(odd, s, c)
    sv = tl.where(odd, c, s)
    # signs as bit 31: cos is negated for j mod 4 in {1, 2} (bit 1 of j + 1), sin for {2, 3} (bit 1 of j)
    cos_sign = ((bits + 1) << 30) & -(2**31)
    sin_sign = (bits << 30) & -(2**31)
    cos_t = (cv.to(tl.int32, bitcast=True) ^ cos_sign).to(tl.float32, bitcast=True)
    sin_t = (sv.to(tl.int32, bitcast=True) ^ sin_sign).to(tl.float32, bitcast=True)
    return cos_t, sin_t


@triton.jit
def _mul_wide(c, m, PTX: tl.constexpr):
    """The 64-bit product of uint32 c and m as (hi, lo) words: one IMAD.WIDE.U32."""
    if PTX:
        # LLVM sees a 64-bit product of zero-extended words as a general one and ptxas then adds the
        # (zero) cross products of the high words: the PTX instruction keeps it one multiply.
        p = tl.inline_asm_elementwise("mul.wide.u32 $0, $1, $2;", "=l,r,r", [c, m], tl.uint64, True, 1)
    else:
        p = c.to(tl.uint64) * m
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox4x32_10(seed, counter, PTX: tl.constexpr = False):
    """The four words of Philox4x32-10 with the key 0 at the counter (lo, hi, seed_lo, seed_hi) (the RNG
    contract, ``fastvae.reference.uniform4``).  The key schedule is constant, so each round key is an
    immediate operand of its three-input LOP3; the seed words are the same for every lane, and so is
    round 0's second product.  Each round's two 32 x 32-bit products are taken as one 64-bit product
    (hi and lo from one IMAD.WIDE.U32, ``_mul_wide``) instead of ``umulhi`` plus a separate low
    multiply.  An int32 counter (under 2^31) has the high word 0."""
    seed = seed.to(tl.uint64)
    c0 = counter.to(tl.uint32)
    if counter.dtype.primitive_bitwidth == 32:
        c1 = tl.zeros_like(c0)
    else:
        c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + (seed & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (seed >> 32).to(tl.uint32)
    ma = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    mb = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    for r in tl.static_range(10):
        ahi, alo = _mul_wide(c0, ma, PTX)
        bhi, blo = _mul_wide(c2, mb, PTX)
        c0 = bhi ^ c1 ^ ((r * 0x9E3779B9) & 0xFFFFFFFF)  # round key r of the key 0: r times the Weyl
        c2 = ahi ^ c3 ^ ((r * 0xBB67AE85) & 0xFFFFFFFF)  # constants, mod 2^32
        c1 = blo
        c3 = alo
    return c0, c1, c2, c3


@triton.jit
def _uniform(w):
    """Triton's uint_to_uniform_float for 32-bit words: int32 x -> (x < 0 ? ~x : x) * 4.6566127342e-10."""
    x = w.to(tl.int32, bitcast=True)
    return tl.where(x < 0, ~x, x).to(tl.float32) * 4.6566127342e-10


@triton.jit
def _log_normal(u):
    """log(u) for a positive normal finite float32 u (here u in [1e-7, 1]; the fused loss's continuous
    Bernoulli calls it too): libdevice logf's reduction and polynomial (within 1 ulp) without its
    branches for 0, denormals, negatives, inf and NaN.

    e = (bits(u) - bits(2/3)) & exponent mask, so m = u / 2^e lies in [2/3, 4/3) (integer subtraction
    on the bits: exact) and f = m - 1 is exact; log(u) = e ln2 + f + f^2 P(f) with P the minimax
    polynomial of degree 8 (Horner, 9 FFMA).  e ln2 is one FFMA: float(e bits) * (ln2 2^-23)."""
    ub = u.to(tl.int32, bitcast=True)
    e = (ub - 0x3F2AAAAB) & -8388608  # 0xff800000: the exponent field of u / m
    f = (ub - e).to(tl.float32, bitcast=True) - 1.0
    p = tl.fma(f, -0.13018856942653656, 0.14084610342979431)
    p = tl.fma(f, p, -0.12148627638816833)
    p = tl.fma(f, p, 0.13980610668659210)
    p = tl.fma(f, p, -0.16684235632419586)
    p = tl.fma(f, p, 0.20012299716472626)
    p = tl.fma(f, p, -0.24999669194221497)
    p = tl.fma(f, p, 0.33333182334899902)
    p = tl.fma(f, p, -0.5)
    r = tl.fma(f, f * p, f)
    return tl.fma(e.to(tl.float32), 8.262958317573066e-08, r)  # float32(ln2) 2^-23: exact scaling


@triton.jit
def _box_muller(w1, w2):
    """Triton's pair_uniform_to_normal with a short-range sine and cosine: u1 = max(1e-7, u1),
    theta = float32(2 pi) u2, r = sqrt(-2 log u1); returns (r cos(theta), r sin(theta))."""
    u1 = tl.maximum(1.0e-7, _uniform(w1))
    theta = 6.283185307179586 * _uniform(w2)
    r = tl.sqrt(-2.0 * _log_normal(u1))
    c, s = _sincos_0_2pi(theta)
    return r * c, r * s


# One MUFU instruction each (PTX ``.approx.ftz.f32``; Triton's tl.log2 / tl.sin / tl.cos are libdevice's
# accurate functions).  The interpreter runs no PTX: tests/test_triton_kernels.py's ``mufu`` fixture
# stands in.
@triton.jit
def _lg2_mufu(x):
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], tl.float32, True, 1)


@triton.jit
def _widen_mufu(x):
    """float32 of a 16-bit tile in the MUFU path.  bfloat16: one instruction an element (ptxas takes
    ``cvt.f32.bf16`` of a register's upper half as PRMT and a shift)."""
    if x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000;", "=r,=r,r", [x], tl.float32, True, 2
        )
    else:
        return x.to(tl.float32)


@triton.jit
def _sin_mufu(x):
    return tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=f,f", [x], tl.float32, True, 1)


@triton.jit
def _cos_mufu(x):
    return tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=f,f", [x], tl.float32, True, 1)


@triton.jit
def _box_muller_mufu(w1, w2, BIAS: tl.constexpr = 0.0):
    """``_box_muller`` to the precision of a 16-bit result, in the log domain: returns (log2 r,
    cos theta, sin theta), so that a caller's ``exp2(logvar log2(e) / 2 + log2 r)`` is sigma r in the
    one MUFU.EX2 that sigma alone needs (no sqrt, no r cos / r sin products).  The draw of 16-bit outputs
    on the GPU: 2^(log2 r) cos and 2^(log2 r) sin are within 2^-16 |n| + 2^-19 r of the float64 draw n of
    the same float32 uniforms even with every approximation off by twice its documented worst case
    (tests/test_triton_kernels.py), a fraction of a float16 (2^-11 relative) or bfloat16 (2^-8)
    rounding step.

    - u1 exactly as ``_uniform``, its floor 1e-7 applied to -y instead (below); theta from
      |float(int32 w2)| instead of the fold (|x| - 1 for x < 0): at most 2 pi 2^-31 larger, and the
      absolute value is an operand modifier.
    - y = lg2 u1 (< 0).  For u1 <= 1 - 2^-6, MUFU.LG2: its error (2^-22 absolute on [1/2, 2], else
      2 ulp: CUDA's __log2f) is under 2^-16.5 of |y| >= 2^-5.46.  Above, where that absolute error would
      grow relative to y -> 0, the series f (1 - f / 2 + f^2 / 3) / ln 2 of lg2(1 + f), f = u1 - 1
      (truncation f^3 / 4 <= 2^-20 relative).
    - r^2 = -2 ln u1 = 2 ln 2 (-y), so log2 r = (log2(2 ln 2) + lg2(-y)) / 2 (+ BIAS, a power of two
      the caller wants in the amplitude): a second MUFU.LG2, whose error (2 ulp of |lg2(-y)| <= 24,
      2^-18) is an error of 2^-19 ln 2 relative in r.  MUFU.LG2 takes no negated operand, FMNMX does:
      min(-y, -lg2(1e-7)) is u1's floor (lg2 is increasing; u1 = 0 gives -y = inf) and the negation in
      one instruction.
    - cos and sin: MUFU.COS / MUFU.SIN, absolute error 2^-20.5 on [-100 pi, 100 pi] (PTX ISA).
    """
    x1 = w1.to(tl.int32, bitcast=True)
    u1 = (x1 ^ (x1 >> 31)).to(tl.float32) * 4.6566127342e-10  # floored below, as -y
    f = u1 - 1.0
    q = tl.fma(f, 0.48089834696298783, -0.7213475204444817)  # 1 / (3 ln 2), -1 / (2 ln 2)
    q = tl.fma(f, q, 1.4426950408889634)  # 1 / ln 2
    y = tl.where(f > -0.015625, f * q, _lg2_mufu(u1))
    t = tl.minimum(-y, 23.253496647352062)  # -lg2(float32(1e-7)): u1 >= 1e-7
    log2_r = tl.fma(_lg2_mufu(t), 0.5, 0.23561681352755118 + BIAS)  # log2(2 ln 2) / 2
    theta = tl.abs(w2.to(tl.int32, bitcast=True).to(tl.float32)) * 2.925836017908523e-09  # f32(2 pi) c
    return log2_r, _cos_mufu(theta), _sin_mufu(theta)


@triton.jit
def _randn4(seed, counter, PTX: tl.constexpr):
    """``fastvae.reference.randn4(seed, counter)``: the Philox4x32-10 words and uniforms bit for bit,
    Box-Muller on (u1, u2) -> (n1, n2) and on (u3, u4) -> (n3, n4) (``tl.randn4x``'s transform)."""
    w1, w2, w3, w4 = _philox4x32_10(seed, counter, PTX)
    n1, n2 = _box_muller(w1, w2)
    n3, n4 = _box_muller(w3, w4)
    return n1, n2, n3, n4


@triton.jit
def _randn4_mufu(seed, counter, BIAS: tl.constexpr):
    """``_randn4`` in ``_box_muller_mufu``'s log domain: (log2 r + BIAS, cos, sin) of (u1, u2) and of
    (u3, u4)."""
    w1, w2, w3, w4 = _philox4x32_10(seed, counter, True)
    a1, c1, s1 = _box_muller_mufu(w1, w2, BIAS)
    a2, c2, s2 = _box_muller_mufu(w3, w4, BIAS)
    return a1, c1, s1, a2, c2, s2


@triton.jit(do_not_specialize=["key", "quad_offset"])
def reparameterize_kernel(
    a_ptr,  # forward: mu; backward: dz (the incoming gradient)
    logvar_ptr,
    out_ptr,  # forward: z; backward: dlogvar
    key,  # KEY_IS_PTR: pointer to the int64 key; else the key itself
    quad_offset,  # offset >> 2
    n_elements,
    BACKWARD: tl.constexpr,
    KEY_IS_PTR: tl.constexpr,
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 inputs
    SHIFT: tl.constexpr,  # offset & 3
    EVEN: tl.constexpr,  # SHIFT == 0 and n_elements a multiple of BLOCK
    I32: tl.constexpr,  # offset + n_elements + BLOCK < 2^31: int32 counters and indices
    IDX64: tl.constexpr,  # n_elements + BLOCK >= 2^31: int64 indices
    PTX: tl.constexpr,  # compiled for a GPU (not the interpreter): Philox's products in PTX
    MUFU: tl.constexpr,  # PTX and 16-bit operands: eps from _box_muller_mufu
    BLOCK: tl.constexpr,
):
    """forward: out = a + exp(lv / 2) eps;  backward: out = d z/d lv * dz = 0.5 a exp(lv / 2) eps.

    eps[i] = randn4(key, n >> 2)[n & 3] for n = offset + i.  The program covers the BLOCK counters
    4 (offset >> 2) + v, v = pid BLOCK + [0, BLOCK), i.e. the elements i = v - SHIFT: one Philox call
    and two Box-Mullers for each of its BLOCK / 4 quads, interleaved into BLOCK normals.

    Specializations, each fixed by the call's shape, dtype and offset: EVEN (no tail, no masks), PTX
    (compiled for a GPU: Philox's products as ``mul.wide.u32``), MUFU (PTX with 16-bit operands: the
    log-domain draw, bfloat16 widened by ``_widen_mufu``)."""
    QUADS: tl.constexpr = BLOCK // 4
    # The counter of the program's first quad, (pid BLOCK + offset) >> 2, and the indices: int32 (one
    # IMAD.WIDE an address, Philox's high counter word 0) while they fit, else int64.
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    if I32:
        first = pid * QUADS + quad_offset
    else:
        first = pid.to(tl.int64) * QUADS + quad_offset
    idx = pid * BLOCK + tl.arange(0, BLOCK) - SHIFT
    if EVEN:  # every program's tile is whole: no masks (no predicates, no zero fill of masked lanes)
        mask = None
    else:
        mask = idx < n_elements
        if SHIFT != 0:
            mask = mask & (idx >= 0)
    if KEY_IS_PTR:
        seed = tl.load(key)
    else:
        seed = key
    if EVEN:
        a = tl.load(a_ptr + idx)
        lv = tl.load(logvar_ptr + idx)
    else:
        a = tl.load(a_ptr + idx, mask=mask, other=0.0)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0)
    if MUFU:
        # 16-bit operands on the GPU.  A thread's 128-bit access holds 8 elements (two quads): draw the
        # even and the odd quads as two tiles, so its two consecutive quads are its own.  Word w = 4 h +
        # 2 k + l (elements 2 w, 2 w + 1) is pair l of quad 2 h + k: its cosine normal and its sine
        # normal share log2 r.  No layout conversion through shared memory before the loads' layout.
        pair = first + 2 * tl.arange(0, QUADS // 2)
        HALF: tl.constexpr = -1.0 if BACKWARD else 0.0  # backward: 2^-1 sigma r (the 0.5 of dz/dlv)
        ea1, ec1, es1, ea2, ec2, es2 = _randn4_mufu(seed, pair, HALF)
        oa1, oc1, os1, oa2, oc2, os2 = _randn4_mufu(seed, pair + 1, HALF)
        log2_r = tl.reshape(tl.join(tl.join(ea1, oa1), tl.join(ea2, oa2)), [BLOCK // 2])
        cos_t = tl.reshape(tl.join(tl.join(ec1, oc1), tl.join(ec2, oc2)), [BLOCK // 2])
        sin_t = tl.reshape(tl.join(tl.join(es1, os1), tl.join(es2, os2)), [BLOCK // 2])
        a_c, a_s = tl.split(tl.reshape(_widen_mufu(a), [BLOCK // 2, 2]))
        lv_c, lv_s = tl.split(tl.reshape(_widen_mufu(lv), [BLOCK // 2, 2]))
        # sigma r = 2^(lv log2(e) / 2 + log2 r): one FFMA and one MUFU.EX2 an element
        amp_c = tl.exp2(tl.fma(lv_c, 0.7213475204444817, log2_r))
        amp_s = tl.exp2(tl.fma(lv_s, 0.7213475204444817, log2_r))
        if BACKWARD:
            out_c = a_c * (amp_c * cos_t)
            out_s = a_s * (amp_s * sin_t)
        else:
            out_c = tl.fma(amp_c, cos_t, a_c)
            out_s = tl.fma(amp_s, sin_t, a_s)
        out = tl.reshape(tl.join(out_c, out_s), [BLOCK])
    else:
        logvar = lv.to(COMPUTE)
        if COMPUTE == tl.float64:
            std = tl.exp(0.5 * logvar)
        else:
            # exp(lv / 2) = 2^(lv log2(e) / 2): one FMUL and one MUFU.EX2, relative error 2 ulp + |lv| 2^-25
            std = tl.exp2(logvar * 0.7213475204444817)
        if a_ptr.dtype.element_ty.primitive_bitwidth == 16:
            # The tiles of the MUFU branch above, with the exact draw: [h, k, l, m] = quad 2 h + k,
            # normal 2 l + m.
            pair = first + 2 * tl.arange(0, QUADS // 2)
            e1, e2, e3, e4 = _randn4(seed, pair, PTX)
            o1, o2, o3, o4 = _randn4(seed, pair + 1, PTX)
            cos_half = tl.join(tl.join(e1, o1), tl.join(e3, o3))
            sin_half = tl.join(tl.join(e2, o2), tl.join(e4, o4))
        else:
            # [q, l, m] = normal 2 l + m of quad q: flattened n1, n2, n3, n4 of quad 0, then quad 1, ...
            n1, n2, n3, n4 = _randn4(seed, first + tl.arange(0, QUADS), PTX)
            cos_half = tl.join(n1, n3)
            sin_half = tl.join(n2, n4)
        eps = tl.reshape(tl.join(cos_half, sin_half), [BLOCK]).to(COMPUTE)
        if BACKWARD:
            out = 0.5 * a.to(COMPUTE) * std * eps
        else:
            out = a.to(COMPUTE) + std * eps
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


_LAUNCH: dict[tuple, tuple] = {}
# Compiled for a GPU (not the interpreter, which runs no PTX): 16-bit operands then draw with MUFU.
_COMPILED = isinstance(reparameterize_kernel, JITFunction)


def _launch(a: Tensor, logvar: Tensor, key: Key, offset: int, backward: bool) -> Tensor:
    device = a.device
    out = torch.empty(a.shape, device=device, dtype=a.dtype)
    n = a.numel()
    if n == 0:
        return out
    key_is_ptr = isinstance(key, Tensor)
    shift = offset & 3
    i32 = offset + n + 1024 < 2**31  # every counter and index (BLOCK <= 1024) fits int32
    cfg = (n, a.dtype, backward, key_is_ptr, shift, i32)
    launch = _LAUNCH.get(cfg)
    if launch is None:
        block, warps = launch_config(n, a.dtype)
        kw = dict(
            BACKWARD=backward,
            KEY_IS_PTR=key_is_ptr,
            SHIFT=shift,
            EVEN=shift == 0 and n % block == 0,
            I32=i32,
            IDX64=n + 1024 >= 2**31,
            PTX=_COMPILED,
            MUFU=a.element_size() == 2 and _COMPILED,
            COMPUTE=tl.float64 if a.dtype == torch.float64 else tl.float32,
            BLOCK=block,
            num_warps=warps,
        )
        launch = _LAUNCH[cfg] = Launcher(reparameterize_kernel, ((n + shift + block - 1) // block,), kw)
    launch(a, logvar, out, key, offset >> 2, n)
    return out


def reparameterize(mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = randn(key, offset + i)`` over the flat index i;
    mu and logvar contiguous, of one shape and dtype; z new and contiguous."""
    return _launch(mu, logvar, key, offset, backward=False)


def reparameterize_backward(dz: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``dlogvar = 0.5 * dz * exp(logvar / 2) * eps`` with the forward's eps (dmu is dz itself)."""
    return _launch(dz, logvar, key, offset, backward=True)
