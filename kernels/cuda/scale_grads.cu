// scale_grads.cu -- the backward of the fused loss: the gradients the forward wrote, scaled in place.
//
// The fused loss writes d(loss)/d(logits, mu, logvar) for an incoming gradient of 1 during the
// forward; the backward multiplies each gradient row b by the real incoming gradient:
//
//   dlogits[b, :] *= s_b,   dmu[b, :] *= s_b,   dlogvar[b, :] *= s_b,   s_b = g[b * g_stride]
//
// with g_stride = 0 for a scalar incoming gradient (reduction sum / mean: every row the same s) and
// the [B] gradient's stride for reduction none (stride 0 also serves a broadcast [B] gradient, the
// one `loss.sum().backward()` passes).  A row whose s_b is exactly 1 is left alone: it is neither
// loaded nor stored, so the common `loss.backward()` moves 4 bytes per row group (the factor) and
// nothing else.  A NaN factor is not 1, so it propagates.  Math: fp32 product, rounded once to the
// gradient's dtype (exactly torch's `grad * s` for fp32 gradients).
//
// Bytes moved per scaled row: F sizeof(TX) + 2 D sizeof(TM), read and written once; per row: the
// factor (4 bytes).  No barriers, no shared memory, no atomics.
//
// Layout: the gradients are contiguous [B, F] (TX, the logits dtype) and [B, D] (TM, the latents
// dtype), or null when absent (dmu and dlogvar independently).  A group of G = 32 << group_log2
// threads owns a row (G chosen by the host from the row length, as for the loss kernel); a block of
// FV_SCALE_THREADS threads holds FV_SCALE_THREADS / G rows; blocks stride over the batch.  The skip
// test is uniform across a group (G >= 32, so whole warps), never divergent inside a warp.  `vec` != 0
// means dlogits is 16-byte aligned with F * sizeof(TX) a multiple of 16: VEC = 16 / sizeof(TX)
// elements then move as one 16-byte access.
#include "fastvae_math.cuh"
#include "fastvae_vec.cuh"

#define FV_SCALE_THREADS 256

template <typename T>
__device__ __forceinline__ void fv_scale_elem(T* __restrict__ p, float s) {
    *p = fv_from_float<T>(fv_to_float(*p) * s);
}

template <typename TX, typename TM>
__global__ void __launch_bounds__(FV_SCALE_THREADS)
    fastvae_scale_grads(const float* __restrict__ g, fv_i64 g_stride,  //
                        TX* __restrict__ dlogits, fv_i64 F,               //
                        TM* __restrict__ dmu, TM* __restrict__ dlogvar, fv_i64 D, fv_i64 B, int group_log2,
                        int vec) {
    constexpr int VEC = 16 / (int)sizeof(TX);
    const int G = 32 << group_log2;
    const int rows_per_block = FV_SCALE_THREADS / G;
    const int lane = threadIdx.x & (G - 1);
    const fv_i64 first = (fv_i64)blockIdx.x * rows_per_block + threadIdx.x / G;
    const fv_i64 step = (fv_i64)gridDim.x * rows_per_block;
    for (fv_i64 row = first; row < B; row += step) {
        const float s = g[row * g_stride];
        if (s == 1.0f) continue;  // the gradient of this row is already right: no bytes move
        if (dlogits != nullptr) {
            TX* __restrict__ x_row = dlogits + row * F;
            const fv_i64 n_vec = vec ? F / VEC : 0;
            for (fv_i64 c = lane; c < n_vec; c += G) {
                fv_pack<TX, VEC> p;
                p.load(x_row + c * VEC);
                FV_UNROLL
                for (int j = 0; j < VEC; ++j) p.v[j] = fv_from_float<TX>(fv_to_float(p.v[j]) * s);
                p.store(x_row + c * VEC);
            }
            for (fv_i64 col = n_vec * VEC + lane; col < F; col += G) fv_scale_elem(x_row + col, s);
        }
        for (fv_i64 d = lane; d < D; d += G) {  // the latents: short rows, scalar accesses
            if (dmu != nullptr) fv_scale_elem(dmu + row * D + d, s);
            if (dlogvar != nullptr) fv_scale_elem(dlogvar + row * D + d, s);
        }
    }
}

// Explicit instantiations for offline checks (nvcc in tests/test_cuda_sources.py): every pair of
// gradient dtypes.  At run time CuPy/NVRTC instantiates only what it is asked for.
#ifdef FASTVAE_INSTANTIATE_ALL
#define FV_INST_SCALE(TX, TM)                                                                       \
    template __global__ void fastvae_scale_grads<TX, TM>(const float*, fv_i64, TX*, fv_i64, TM*, TM*, \
                                                         fv_i64, fv_i64, int, int);
#define FV_INST_SCALE_TX(TX)     \
    FV_INST_SCALE(TX, float)     \
    FV_INST_SCALE(TX, fv_half)   \
    FV_INST_SCALE(TX, fv_bf16)
FV_INST_SCALE_TX(float)
FV_INST_SCALE_TX(fv_half)
FV_INST_SCALE_TX(fv_bf16)
#endif
