// fastvae_math.cuh -- the per-element math shared by the CUDA kernels and the host test harness.
//
// Everything here is `__host__ __device__` (FV_HD) and self-contained: no CUDA or C++ headers are
// needed under NVRTC (CuPy compiles the kernels at run time with no include path), and the same
// text compiles as plain C++ (g++) for tests/cuda_harness/, which checks it against
// fastvae/reference.py on the CPU.  16-bit floats are stored as raw bits (fv_half / fv_bf16) and
// converted with single PTX instructions on the device, or bit-exact software on the host.
//
// Contents
//   * Philox4x32-10 and Box-Muller as fastvae.reference.randn: element counter n is normal n & 3 of
//     Philox (key 0) at counter (n >> 2, seed), with tl.randn4x's uniforms and Box-Muller; the uniforms
//     match reference.uniform_pair bit for bit; the normals use precise logf/sqrtf and a short-range
//     sine / cosine (no fast math).
//   * BCE-with-logits, MSE and the Gaussian KL per element, with their gradients, written so that
//     fp32 keeps a few-ulp relative accuracy even where the textbook formula cancels.
//   * dtype conversions (fp32 / fp16 / bf16 / uint8 pixels -> fp32 and back, round to nearest even).
#pragma once

#if defined(__CUDACC__)
#define FV_HD __host__ __device__ __forceinline__
#define FV_UNROLL _Pragma("unroll")
#else
#include <math.h>
#include <string.h>
#define FV_HD inline
#define FV_UNROLL
#endif

typedef unsigned int fv_u32;
typedef unsigned long long fv_u64;
typedef long long fv_i64;

// 16-bit storage types: the bits only, so no cuda_fp16.h / cuda_bf16.h is needed.
struct alignas(2) fv_half {
    unsigned short bits;
};
struct alignas(2) fv_bf16 {
    unsigned short bits;
};

// ---------------------------------------------------------------------------------------------
// Bit casts
// ---------------------------------------------------------------------------------------------

FV_HD float fv_u32_as_float(fv_u32 u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

FV_HD fv_u32 fv_float_as_u32(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    fv_u32 u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

// ---------------------------------------------------------------------------------------------
// dtype conversions: load as fp32, store with round-to-nearest-even
// ---------------------------------------------------------------------------------------------

FV_HD float fv_half_bits_to_float(unsigned short h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const fv_u32 sign = (fv_u32)(h & 0x8000u) << 16;
    const fv_u32 exp = (h >> 10) & 0x1fu;
    fv_u32 man = h & 0x3ffu;
    if (exp == 0x1fu) return fv_u32_as_float(sign | 0x7f800000u | (man << 13));  // inf / nan
    if (exp != 0) return fv_u32_as_float(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return fv_u32_as_float(sign);  // +-0
    // subnormal: man * 2^-24, exact in fp32
    const float mag = (float)man * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
#endif
}

FV_HD unsigned short fv_float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const fv_u32 u = fv_float_as_u32(f);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const fv_u32 a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // nan
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {  // below 2^-14: fp16 subnormal (or zero), rne on man * 2^-24
        if (a < 0x33000000u) return sign;  // below 2^-25: rounds to 0
        const fv_u32 e = a >> 23;
        const fv_u32 m = (a & 0x7fffffu) | 0x800000u;
        const fv_u32 shift = 126u - e;  // 14 .. 24
        fv_u32 r = m >> shift;
        const fv_u32 rem = m & ((1u << shift) - 1u);
        const fv_u32 half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return (unsigned short)(sign | r);
    }
    // normal: rebias, round the 13 dropped bits to nearest even (a carry into the exponent is right)
    const fv_u32 r = a - 0x38000000u;
    const fv_u32 rounded = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    return (unsigned short)(sign | rounded);
#endif
}

FV_HD float fv_bf16_bits_to_float(unsigned short b) { return fv_u32_as_float((fv_u32)b << 16); }

FV_HD unsigned short fv_float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#else
    const fv_u32 u = fv_float_as_u32(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);  // quiet nan
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

FV_HD float fv_to_float(float x) { return x; }
FV_HD float fv_to_float(fv_half x) { return fv_half_bits_to_float(x.bits); }
FV_HD float fv_to_float(fv_bf16 x) { return fv_bf16_bits_to_float(x.bits); }

template <typename T>
FV_HD T fv_from_float(float x);
template <>
FV_HD float fv_from_float<float>(float x) {
    return x;
}
template <>
FV_HD fv_half fv_from_float<fv_half>(float x) {
    fv_half h;
    h.bits = fv_float_to_half_bits(x);
    return h;
}
template <>
FV_HD fv_bf16 fv_from_float<fv_bf16>(float x) {
    fv_bf16 b;
    b.bits = fv_float_to_bf16_bits(x);
    return b;
}

// ---------------------------------------------------------------------------------------------
// Random numbers: reference.randn4(seed, n >> 2)[n & 3] for element counter n
// ---------------------------------------------------------------------------------------------

struct fv_u32x4 {
    fv_u32 x, y, z, w;
};

// Philox4x32-10 (Salmon et al. 2011) with key (key & 0xffffffff, key >> 32).  Each round:
//   c0' = hi(B*c2) ^ c1 ^ k0,  c1' = lo(B*c2),  c2' = hi(A*c0) ^ c3 ^ k1,  c3' = lo(A*c0),
// then the key is bumped by the Weyl constants.  One 32x32->64 multiply gives hi and lo together.
FV_HD fv_u32x4 fv_philox4x32_10(fv_u64 key, fv_u32 c0, fv_u32 c1, fv_u32 c2, fv_u32 c3) {
    fv_u32 k0 = (fv_u32)key;
    fv_u32 k1 = (fv_u32)(key >> 32);
    FV_UNROLL
    for (int round = 0; round < 10; ++round) {
        const fv_u64 prod_b = (fv_u64)0xCD9E8D57u * c2;
        const fv_u64 prod_a = (fv_u64)0xD2511F53u * c0;
        const fv_u32 n0 = (fv_u32)(prod_b >> 32) ^ c1 ^ k0;
        const fv_u32 n2 = (fv_u32)(prod_a >> 32) ^ c3 ^ k1;
        c1 = (fv_u32)prod_b;
        c3 = (fv_u32)prod_a;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    fv_u32x4 out;
    out.x = c0;
    out.y = c1;
    out.z = c2;
    out.w = c3;
    return out;
}

// Triton's uint_to_uniform_float for 32-bit words: reinterpret as int32, fold negatives with ~x
// (so the result lies in [0, 2^31 - 1]), convert to fp32 rounding to nearest, scale by the largest
// fp32 s with (2^31 - 1) * s < 1.  Two correctly rounded operations: bit-exact on host and device.
FV_HD float fv_uint_to_uniform(fv_u32 x) {
    int s = (int)x;
    if (s < 0) s = ~s;
    return (float)s * 4.6566127342e-10f;
}

// The Philox words for a 64-bit counter c: Philox4x32-10 with the key 0 of (c lo, c hi, seed lo,
// seed hi): the seed selects the stream, and the key schedule is a constant (reference.uniform4).  A
// reparameterize call draws element i from Philox counter (offset + i) >> 2 (fastvae.backend's RNG
// contract): four elements share one call.
FV_HD fv_u32x4 fv_philox_for_counter(fv_u64 seed, fv_u64 counter) {
    return fv_philox4x32_10(0ull, (fv_u32)counter, (fv_u32)(counter >> 32), (fv_u32)seed, (fv_u32)(seed >> 32));
}

// (cos a, sin a) for |a| <= ~100 (Box-Muller only needs [0, 2 pi)), each accurate to ~1 ulp:
// a = j pi/2 + r with j = rint(a 2/pi) and a three-part Cody-Waite pi/2 (the first two products are
// exact), then the minimax sin / cos polynomials on [-pi/4, pi/4] used by CUDA's own sinf/cosf, both
// from one reduction: cos(r + j pi/2) = cos r, -sin r, -cos r, sin r and sin(r + j pi/2) = sin r,
// cos r, -sin r, -cos r for j mod 4 = 0..3.  The library sincosf is as accurate but carries a
// Payne-Hanek path for huge arguments whose scratch array lands in local memory once the call is
// unrolled; this version has no such path.
FV_HD void fv_sincos_small(float a, float* c, float* s) {
    const float shifted = fmaf(a, 0.636619772f, 12582912.0f);  // 1.5 * 2^23: rounds a 2/pi to an int
    const unsigned j = fv_float_as_u32(shifted) & 3u;          // quadrant mod 4 (two's complement ok)
    const float jf = shifted - 12582912.0f;
    float r = fmaf(jf, -1.5707962512969971e+00f, a);
    r = fmaf(jf, -7.5497894158615964e-08f, r);
    r = fmaf(jf, -5.3903029534e-15f, r);
    const float r2 = r * r;
    float cr = fmaf(2.44331571e-5f, r2, -1.38873163e-3f);
    cr = fmaf(cr, r2, 4.16666457e-2f);
    cr = fmaf(cr, r2, -5.00000000e-1f);
    cr = fmaf(cr, r2, 1.0f);
    float sr = fmaf(-1.95152959e-4f, r2, 8.33216087e-3f);
    sr = fmaf(sr, r2, -1.66666546e-1f);
    sr = sr * r2;
    sr = fmaf(sr, r, r);
    const float cv = (j & 1u) ? sr : cr;
    const float sv = (j & 1u) ? cr : sr;
    *c = ((j + 1u) & 2u) ? -cv : cv;
    *s = (j & 2u) ? -sv : sv;
}

// Triton's pair_uniform_to_normal: u1 = max(1e-7, u1), theta = 2 pi u2 (an fp32 product),
// r = sqrt(-2 ln u1); (r cos theta, r sin theta).  Precise logf/sqrtf (no fast math): within a few
// ulp of the fp64 reference.
FV_HD void fv_box_muller2(float u1, float u2, float* n_cos, float* n_sin) {
    u1 = fmaxf(1.0e-7f, u1);
    const float theta = 6.283185307179586f * u2;
    const float radius = sqrtf(-2.0f * logf(u1));
    float c, s;
    fv_sincos_small(theta, &c, &s);
    *n_cos = radius * c;
    *n_sin = radius * s;
}

struct fv_f32x4 {
    float x, y, z, w;
};

// reference.randn4(seed, quad): Box-Muller on the uniforms of Philox words (x, y) and (z, w) of the counter
// `quad`, i.e. the normals of element counters 4 quad + 0..3 (fastvae.reference.randn4).
FV_HD fv_f32x4 fv_randn4(fv_u64 seed, fv_u64 quad) {
    const fv_u32x4 r = fv_philox_for_counter(seed, quad);
    fv_f32x4 n;
    fv_box_muller2(fv_uint_to_uniform(r.x), fv_uint_to_uniform(r.y), &n.x, &n.y);
    fv_box_muller2(fv_uint_to_uniform(r.z), fv_uint_to_uniform(r.w), &n.z, &n.w);
    return n;
}

// The two uniforms behind element counter n: (u1, u2) of Philox counter n >> 2 for n & 3 in {0, 1},
// (u3, u4) for {2, 3} (reference.uniform_pair).
FV_HD void fv_uniform_pair(fv_u64 seed, fv_u64 counter, float* ua, float* ub) {
    const fv_u32x4 r = fv_philox_for_counter(seed, counter >> 2);
    const bool second = (counter & 2u) != 0;
    *ua = fv_uint_to_uniform(second ? r.z : r.x);
    *ub = fv_uint_to_uniform(second ? r.w : r.y);
}

// One standard normal at a 64-bit element counter n: normal n & 3 of reference.randn4(seed, n >> 2)
// (fastvae.reference.randn): r cos for even n, r sin for odd n.  A whole Philox call for one normal:
// for unaligned counters; aligned runs of 4 use fv_randn4.
FV_HD float fv_randn(fv_u64 seed, fv_u64 counter) {
    float ua, ub, n_cos, n_sin;
    fv_uniform_pair(seed, counter, &ua, &ub);
    fv_box_muller2(ua, ub, &n_cos, &n_sin);
    return (counter & 1u) ? n_sin : n_cos;
}

// ---------------------------------------------------------------------------------------------
// Loss terms, one element at a time (all fp32)
// ---------------------------------------------------------------------------------------------

// A target value t together with 1 - t: for uint8 pixels k, t = k * (1/255) and 1 - t = (255 - k) * (1/255)
// are both formed from exact integers, so 1 - t does not lose the low bits of t near 1.
struct fv_target {
    float t, one_minus_t;
};

FV_HD fv_target fv_make_target(float t) {
    fv_target r;
    r.t = t;
    r.one_minus_t = 1.0f - t;
    return r;
}
FV_HD fv_target fv_make_target(fv_half t) { return fv_make_target(fv_to_float(t)); }
FV_HD fv_target fv_make_target(fv_bf16 t) { return fv_make_target(fv_to_float(t)); }
FV_HD fv_target fv_make_target(unsigned char k) {
    const float inv255 = 1.0f / 255.0f;
    fv_target r;
    r.t = (float)k * inv255;
    r.one_minus_t = (float)(255 - (int)k) * inv255;
    return r;
}

// BCE with logits: max(x, 0) - x t + log1p(exp(-|x|)), evaluated as
//   x >= 0:  x (1 - t) + log1p(e)        x < 0:  (-x) t + log1p(e)        e = exp(-|x|)
// (the same value in exact arithmetic; for t in [0, 1] both terms are >= 0, so nothing cancels).
// Gradient sigmoid(x) - t, evaluated as (1 - t) - e/(1+e) for x >= 0 and e/(1+e) - t for x < 0,
// so that e.g. x = 100, t = 1 gives -3.7e-44 rather than 1 - 1 = 0.
FV_HD float fv_bce(float x, fv_target tg, float* grad) {
    const float e = expf(-fabsf(x));
    const float softplus = log1pf(e);
    const float q = e / (1.0f + e);  // sigmoid(-|x|)
    if (x >= 0.0f) {
        *grad = tg.one_minus_t - q;
        return x * tg.one_minus_t + softplus;
    }
    *grad = q - tg.t;
    return (-x) * tg.t + softplus;
}

// Squared error (x - t)^2 with gradient 2 (x - t).
FV_HD float fv_mse(float x, fv_target tg, float* grad) {
    const float d = x - tg.t;
    *grad = 2.0f * d;
    return d * d;
}

// g(lv) = exp(lv) - 1 - lv >= 0.  For |lv| >= 1, expm1(lv) - lv (cancels at most ~4x); below, the
// Taylor series lv^2 (1/2! + lv/3! + ... + lv^10/12!), truncation < 1e-9 relative, no cancellation.
FV_HD float fv_exp_minus_1_minus_x(float lv) {
    if (fabsf(lv) >= 1.0f) return expm1f(lv) - lv;
    float p = 2.08767569878681e-09f;        // 1/12!
    p = fmaf(p, lv, 2.505210838544172e-08f);  // 1/11!
    p = fmaf(p, lv, 2.755731922398589e-07f);  // 1/10!
    p = fmaf(p, lv, 2.755731922398589e-06f);  // 1/9!
    p = fmaf(p, lv, 2.48015873015873e-05f);   // 1/8!
    p = fmaf(p, lv, 1.984126984126984e-04f);  // 1/7!
    p = fmaf(p, lv, 1.388888888888889e-03f);  // 1/6!
    p = fmaf(p, lv, 8.333333333333333e-03f);  // 1/5!
    p = fmaf(p, lv, 4.166666666666666e-02f);  // 1/4!
    p = fmaf(p, lv, 1.666666666666667e-01f);  // 1/3!
    p = fmaf(p, lv, 0.5f);                    // 1/2!
    return (lv * lv) * p;
}

// KL(N(mu, exp(lv)) || N(0, 1)) = -0.5 (1 + lv - mu^2 - exp(lv)) = 0.5 (mu^2 + g(lv)): a sum of two
// non-negative terms.  Gradients (before beta and the reduction scale): dmu = mu, dlv = 0.5 expm1(lv).
FV_HD float fv_kl(float mu, float lv, float* dlv) {
    *dlv = 0.5f * expm1f(lv);
    return 0.5f * (mu * mu + fv_exp_minus_1_minus_x(lv));
}

// Reconstruction kinds, numbered as fastvae.backend (RECON_NONE / RECON_BCE / RECON_MSE): the loss
// kernel's RECON template parameter.  A KL-only call runs the BCE instantiation with F = 0.
enum { FV_RECON_NONE = 0, FV_RECON_BCE = 1, FV_RECON_MSE = 2 };

template <int RECON>
FV_HD float fv_recon(float x, fv_target tg, float* grad) {
    if (RECON == FV_RECON_BCE) return fv_bce(x, tg, grad);
    return fv_mse(x, tg, grad);
}
