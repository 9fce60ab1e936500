// reparameterize.cu -- z = mu + exp(logvar / 2) * eps and its backward, eps[i] = randn(key, offset + i).
//
// Tensors are logical [rows, cols] with contiguous features and a row stride in elements (so a
// sliced mu / logvar needs no copy); the host collapses fully contiguous inputs to one row of
// rows * cols elements.  eps for element (r, c) is randn(key, n) at the element counter
// n = offset + r * cols + c: normal n & 3 of reference.randn4(key, n >> 2), i.e. Philox4x32-10 with the
// key 0 at the counter (n >> 2, key): the 64-bit element quad n >> 2 (its high word carried past 2^32)
// in words 0, 1 and the 64-bit key, which selects the stream, in words 2, 3; Box-Muller (tl.randn4x's)
// on words (0, 1) -> r cos, r sin and on (2, 3) -> r cos, r sin.  The backward replays the forward's
// noise from (key, offset) alone and nothing is saved between them.
//
// The key is either the scalar `key` (an explicit seed) or, when `key_ptr` is not null, the int64
// at key_ptr read on the device (its bits as a u64): a key drawn on the device by torch's generator,
// never read on the host, so a captured CUDA graph draws fresh eps on every replay.
//
// Forward   reads mu, logvar         writes z          : 3 * sizeof(T) bytes per element
// Backward  reads dz, logvar         writes dlogvar    : 3 * sizeof(T) bytes per element
//           (dmu = dz is returned by the host without a kernel); + 8 bytes of key per thread (cached)
// Per 4 elements: one Philox4x32-10 (10 rounds of two 32x32->64 multiplies and four xors), two logf
// and sqrtf, two short-range sine / cosine pairs of fastvae_math.cuh; per element one expf.  Rows
// whose first counter is a multiple of 4 draw by quads in the vector path; the others (and tails)
// draw one element per Philox call (fv_randn), exact but 4x the Philox work.
//
// Launch: block (256, 1), grid (gx, gy); blockIdx.y strides over rows, x over chunks of a row.
// __launch_bounds__(256, 4): at least 4 resident blocks per SM, i.e. at most 64 registers, a fixed
// budget so ptxas never trades spills for occupancy (tests check for no spills).
// `vec` != 0 means every base pointer is 16-byte aligned and every row stride is a multiple of
// VEC = 16 / sizeof(T) elements: full chunks then move as one 16-byte access per tensor.
#include "fastvae_math.cuh"
#include "fastvae_vec.cuh"

template <typename T>
struct fv_reparam_vec {
    static constexpr int VEC = 16 / (int)sizeof(T);
};

// forward: z = mu + std * eps;  backward: dlogvar = 0.5 * dz * std * eps (= 0.5 * dz * (z - mu));
// std = exp(lv / 2); fp32 math, rounded once to T.
template <typename T, bool BACKWARD>
__device__ __forceinline__ T fv_reparam_op(T a, T lv, float eps) {
    const float std_eps = expf(0.5f * fv_to_float(lv)) * eps;
    return fv_from_float<T>(BACKWARD ? 0.5f * fv_to_float(a) * std_eps : fv_to_float(a) + std_eps);
}

// One pass over [rows, cols]: out = OP(a, logvar) with OP the forward (a = mu) or backward (a = dz).
template <typename T, bool BACKWARD>
__device__ __forceinline__ void fv_reparam_body(const T* __restrict__ a, fv_i64 a_stride,
                                                const T* __restrict__ logvar, fv_i64 lv_stride,
                                                T* __restrict__ out, fv_i64 out_stride, fv_i64 rows,
                                                fv_i64 cols, const fv_i64* __restrict__ key_ptr, fv_u64 key,
                                                fv_u64 offset, int vec) {
    constexpr int VEC = fv_reparam_vec<T>::VEC;
    const fv_u64 seed = key_ptr != nullptr ? (fv_u64)*key_ptr : key;  // one 8-byte load, cached
    const fv_i64 step = (fv_i64)gridDim.x * blockDim.x;
    const fv_i64 first = (fv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (fv_i64 row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* __restrict__ a_row = a + row * a_stride;
        const T* __restrict__ lv_row = logvar + row * lv_stride;
        T* __restrict__ out_row = out + row * out_stride;
        const fv_u64 base = offset + (fv_u64)(row * cols);  // Philox counter of (row, 0)
        // Vector part: chunks of VEC whole elements (VEC / 4 quads of counters when base % 4 == 0).
        const fv_i64 n_vec = vec ? cols / VEC : 0;
        const bool quads = (base & 3u) == 0;
        for (fv_i64 c = first; c < n_vec; c += step) {
            const fv_i64 col = c * VEC;
            fv_pack<T, VEC> pa, plv, po;
            pa.load(a_row + col);
            plv.load(lv_row + col);
            if (quads) {
                const fv_u64 quad = (base + (fv_u64)col) >> 2;
                FV_UNROLL
                for (int q = 0; q < VEC / 4; ++q) {
                    const fv_f32x4 n = fv_randn4(seed, quad + (fv_u64)q);
                    po.v[4 * q + 0] = fv_reparam_op<T, BACKWARD>(pa.v[4 * q + 0], plv.v[4 * q + 0], n.x);
                    po.v[4 * q + 1] = fv_reparam_op<T, BACKWARD>(pa.v[4 * q + 1], plv.v[4 * q + 1], n.y);
                    po.v[4 * q + 2] = fv_reparam_op<T, BACKWARD>(pa.v[4 * q + 2], plv.v[4 * q + 2], n.z);
                    po.v[4 * q + 3] = fv_reparam_op<T, BACKWARD>(pa.v[4 * q + 3], plv.v[4 * q + 3], n.w);
                }
            } else {
                FV_UNROLL
                for (int j = 0; j < VEC; ++j) {
                    const float eps = fv_randn(seed, base + (fv_u64)(col + j));
                    po.v[j] = fv_reparam_op<T, BACKWARD>(pa.v[j], plv.v[j], eps);
                }
            }
            po.store(out_row + col);
        }
        // Scalar part: the tail of a vectorized row, or the whole row when vec == 0.
        for (fv_i64 col = n_vec * VEC + first; col < cols; col += step) {
            const float eps = fv_randn(seed, base + (fv_u64)col);
            out_row[col] = fv_reparam_op<T, BACKWARD>(a_row[col], lv_row[col], eps);
        }
    }
}

// z[r, c] = mu[r, c] + exp(logvar[r, c] / 2) * randn(key, offset + r * cols + c)
template <typename T>
__global__ void __launch_bounds__(256, 4)
    fastvae_reparameterize_fwd(const T* __restrict__ mu, fv_i64 mu_stride, const T* __restrict__ logvar,
                               fv_i64 lv_stride, T* __restrict__ z, fv_i64 z_stride, fv_i64 rows,
                               fv_i64 cols, const fv_i64* __restrict__ key_ptr, fv_u64 key, fv_u64 offset,
                               int vec) {
    fv_reparam_body<T, false>(mu, mu_stride, logvar, lv_stride, z, z_stride, rows, cols, key_ptr, key, offset,
                              vec);
}

// dlogvar[r, c] = 0.5 * dz[r, c] * exp(logvar[r, c] / 2) * randn(key, offset + r * cols + c)
template <typename T>
__global__ void __launch_bounds__(256, 4)
    fastvae_reparameterize_bwd(const T* __restrict__ dz, fv_i64 dz_stride, const T* __restrict__ logvar,
                               fv_i64 lv_stride, T* __restrict__ dlogvar, fv_i64 dlv_stride, fv_i64 rows,
                               fv_i64 cols, const fv_i64* __restrict__ key_ptr, fv_u64 key, fv_u64 offset,
                               int vec) {
    fv_reparam_body<T, true>(dz, dz_stride, logvar, lv_stride, dlogvar, dlv_stride, rows, cols, key_ptr, key,
                             offset, vec);
}

// Explicit instantiations for offline checks (nvcc in tests/test_cuda_sources.py).  At run time
// CuPy/NVRTC instantiates only what it is asked for through name_expressions.
#ifdef FASTVAE_INSTANTIATE_ALL
#define FV_INST_REPARAM(T)                                                                            \
    template __global__ void fastvae_reparameterize_fwd<T>(const T*, fv_i64, const T*, fv_i64, T*, fv_i64, \
                                                           fv_i64, fv_i64, const fv_i64*, fv_u64, fv_u64,  \
                                                           int);                                           \
    template __global__ void fastvae_reparameterize_bwd<T>(const T*, fv_i64, const T*, fv_i64, T*, fv_i64, \
                                                           fv_i64, fv_i64, const fv_i64*, fv_u64, fv_u64,  \
                                                           int);
FV_INST_REPARAM(float)
FV_INST_REPARAM(fv_half)
FV_INST_REPARAM(fv_bf16)
#endif
