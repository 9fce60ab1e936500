// vae_loss.cu -- the fused VAE loss: reconstruction (BCE-with-logits or MSE) + beta * KL, one pass.
//
//   recon_b = sum_f  bce(x_bf, t_bf)  or  (x_bf - t_bf)^2               over the F features of row b
//   kl_b    = sum_d  -0.5 (1 + lv_bd - mu_bd^2 - exp(lv_bd))             over the D latents of row b
//   loss    = sum_b (recon_b + beta kl_b)        ("sum"; "mean" divides by B; "none" keeps [B])
//
// Gradients are written in the same pass, for an incoming gradient of 1 on the reduced loss:
//   dlogits = grad_scale * (sigmoid(x) - t)   or  grad_scale * 2 (x - t)
//   dmu     = grad_scale * beta * mu,   dlogvar = grad_scale * beta * 0.5 (exp(lv) - 1)
// with grad_scale = 1 ("sum", "none") or 1/B ("mean").  (For "none" the caller multiplies row b by
// the incoming gradient of loss_b.)  Per-element math: fastvae_math.cuh; all of it in fp32.
//
// Kernel 1, fastvae_vae_loss_rows: a group of G threads (G = 32 << group_log2 in {32, 64, 128, 256})
// owns one row; a 256-thread block holds 256 / G rows.  G is chosen by the host from F: a warp per
// row for small F (no block-wide barrier, 8 rows per block, few idle lanes), up to the whole block
// for large rows (enough loads in flight per row and enough blocks for small batches).  Each thread
// accumulates its strided elements in order, the group reduces with a fixed shuffle tree, then (if
// G > 32) its warps' partials are added in warp order through shared memory: the result depends
// only on (B, F, D, G), never on timing.  It writes recon_b and kl_b (and loss_b for "none").
//   Bytes moved per row:  reads   F (sizeof(TX) + sizeof(TT)) + 2 D sizeof(TM)
//                         writes  F sizeof(TX) + 2 D sizeof(TM)      (only when NEED_GRAD)
//                                 + 8 (recon_b, kl_b) [+ 4 for loss_b]
//   e.g. MNIST fp32 logits, uint8 pixels, D = 20: 784 * 9 + 320 + 8 = 7384 bytes per row.
//
// Kernel 2, fastvae_vae_loss_finalize: one block sums recon_b and kl_b over the batch in a fixed
// order (strided fp64 partial sums per thread, then a fixed shared-memory tree) and writes
// out = [loss, recon, kl] as fp32.  Reads 8 B bytes, writes 12.  No floating-point atomics anywhere:
// results are bit-identical run to run.
//
// Layout: row-major [B, F] / [B, D] views with contiguous features and row strides in elements, so
// sliced inputs need no copy.  All indexing is int64.  `vec` != 0 means logits, target and dlogits
// base pointers and row strides are aligned for VEC = 16 / sizeof(TX) elements (16 bytes of logits,
// VEC * sizeof(TT) bytes of target, capped at 16): those chunks move as single wide accesses.
#include "fastvae_math.cuh"
#include "fastvae_vec.cuh"

#define FV_LOSS_THREADS 256
#define FV_FINALIZE_THREADS 512
// At least 4 resident blocks (32 warps) per SM: caps registers at 64 so ptxas never trades spills
// for occupancy, and keeps enough 16-byte loads in flight to stream from HBM.
#define FV_LOSS_MIN_BLOCKS 4

__device__ __forceinline__ float fv_warp_sum(float v) {
    FV_UNROLL
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One recon element: fp32 loss and (optionally) the scaled gradient rounded to TX.
template <int RECON, bool NEED_GRAD, typename TX, typename TT>
__device__ __forceinline__ float fv_recon_elem(TX x, TT t, float grad_scale, TX* g) {
    float grad;
    const float loss = fv_recon<RECON>(fv_to_float(x), fv_make_target(t), &grad);
    if (NEED_GRAD) *g = fv_from_float<TX>(grad * grad_scale);
    return loss;
}

template <typename TX, typename TT, typename TM, int RECON, bool NEED_GRAD>
__global__ void __launch_bounds__(FV_LOSS_THREADS, FV_LOSS_MIN_BLOCKS)
    fastvae_vae_loss_rows(const TX* __restrict__ logits, fv_i64 logits_stride,  //
                          const TT* __restrict__ target, fv_i64 target_stride,  //
                          const TM* __restrict__ mu, fv_i64 mu_stride,          //
                          const TM* __restrict__ logvar, fv_i64 logvar_stride,  //
                          TX* __restrict__ dlogits, fv_i64 dlogits_stride,      //
                          TM* __restrict__ dmu, fv_i64 dmu_stride,              //
                          TM* __restrict__ dlogvar, fv_i64 dlogvar_stride,      //
                          float* __restrict__ recon_rows, float* __restrict__ kl_rows,
                          float* __restrict__ loss_rows,  // nullptr unless reduction == "none"
                          fv_i64 B, fv_i64 F, fv_i64 D, float beta, float grad_scale, int group_log2,
                          int vec) {
    constexpr int VEC = 16 / (int)sizeof(TX);
    __shared__ float s_recon[FV_LOSS_THREADS / 32];
    __shared__ float s_kl[FV_LOSS_THREADS / 32];

    const int G = 32 << group_log2;            // threads per row
    const int rows_per_block = FV_LOSS_THREADS / G;
    const int lane = threadIdx.x & (G - 1);     // position inside the row's group
    const int sub = threadIdx.x / G;            // which of the block's rows
    const int warp = threadIdx.x >> 5;
    const int warps_per_row = G >> 5;
    const float kl_grad_scale = beta * grad_scale;

    // The loop bound is uniform across the block, so every thread reaches the barriers.
    for (fv_i64 row0 = (fv_i64)blockIdx.x * rows_per_block; row0 < B;
         row0 += (fv_i64)gridDim.x * rows_per_block) {
        const fv_i64 row = row0 + sub;
        float acc_recon = 0.0f;
        float acc_kl = 0.0f;
        if (row < B) {
            const TX* __restrict__ x_row = logits + row * logits_stride;
            const TT* __restrict__ t_row = target + row * target_stride;
            TX* __restrict__ g_row = dlogits + row * dlogits_stride;

            // Reconstruction, vector part: VEC features per access.
            const fv_i64 n_vec = vec ? F / VEC : 0;
            for (fv_i64 c = lane; c < n_vec; c += G) {
                const fv_i64 col = c * VEC;
                fv_pack<TX, VEC> px, pg;
                fv_pack<TT, VEC> pt;
                px.load(x_row + col);
                pt.load(t_row + col);
                FV_UNROLL
                for (int j = 0; j < VEC; ++j) {
                    acc_recon +=
                        fv_recon_elem<RECON, NEED_GRAD>(px.v[j], pt.v[j], grad_scale, &pg.v[j]);
                }
                if (NEED_GRAD) pg.store(g_row + col);
            }
            // Reconstruction, scalar part: the row's tail, or the whole row when vec == 0.
            for (fv_i64 col = n_vec * VEC + lane; col < F; col += G) {
                TX g;
                acc_recon += fv_recon_elem<RECON, NEED_GRAD>(x_row[col], t_row[col], grad_scale, &g);
                if (NEED_GRAD) g_row[col] = g;
            }
            // KL over the row's D latents (small: scalar accesses).
            const TM* __restrict__ mu_row = mu + row * mu_stride;
            const TM* __restrict__ lv_row = logvar + row * logvar_stride;
            for (fv_i64 d = lane; d < D; d += G) {
                const float m = fv_to_float(mu_row[d]);
                float dlv;
                acc_kl += fv_kl(m, fv_to_float(lv_row[d]), &dlv);
                if (NEED_GRAD) {
                    dmu[row * dmu_stride + d] = fv_from_float<TM>(kl_grad_scale * m);
                    dlogvar[row * dlogvar_stride + d] = fv_from_float<TM>(kl_grad_scale * dlv);
                }
            }
        }
        // Fixed-order reduction: butterfly inside each warp, then warps of the row in order.
        acc_recon = fv_warp_sum(acc_recon);
        acc_kl = fv_warp_sum(acc_kl);
        if (warps_per_row > 1) {
            if ((threadIdx.x & 31) == 0) {
                s_recon[warp] = acc_recon;
                s_kl[warp] = acc_kl;
            }
            __syncthreads();
            if (lane == 0) {
                const int w0 = sub * warps_per_row;
                acc_recon = s_recon[w0];
                acc_kl = s_kl[w0];
                for (int w = 1; w < warps_per_row; ++w) {
                    acc_recon += s_recon[w0 + w];
                    acc_kl += s_kl[w0 + w];
                }
            }
            __syncthreads();  // s_* are reused by the next row group
        }
        if (lane == 0 && row < B) {
            recon_rows[row] = acc_recon;
            kl_rows[row] = acc_kl;
            if (loss_rows != nullptr) loss_rows[row] = acc_recon + beta * acc_kl;
        }
    }
}

// out[0] = loss, out[1] = recon, out[2] = kl (each already divided by B when mean != 0).
// One block of FV_FINALIZE_THREADS threads; thread i sums rows i, i + T, i + 2T, ... in fp64, then a
// fixed binary tree over the threads.  fp64 because these are the batch-level sums.
extern "C" __global__ void __launch_bounds__(FV_FINALIZE_THREADS)
    fastvae_vae_loss_finalize(const float* __restrict__ recon_rows, const float* __restrict__ kl_rows,
                              fv_i64 B, float beta, int mean, float* __restrict__ out) {
    __shared__ double s_recon[FV_FINALIZE_THREADS];
    __shared__ double s_kl[FV_FINALIZE_THREADS];
    double r = 0.0, k = 0.0;
    for (fv_i64 i = threadIdx.x; i < B; i += FV_FINALIZE_THREADS) {
        r += (double)recon_rows[i];
        k += (double)kl_rows[i];
    }
    s_recon[threadIdx.x] = r;
    s_kl[threadIdx.x] = k;
    __syncthreads();
    for (int half = FV_FINALIZE_THREADS / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) {
            s_recon[threadIdx.x] += s_recon[threadIdx.x + half];
            s_kl[threadIdx.x] += s_kl[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double recon = s_recon[0], kl = s_kl[0];
        if (mean) {
            recon /= (double)B;
            kl /= (double)B;
        }
        out[0] = (float)(recon + (double)beta * kl);
        out[1] = (float)recon;
        out[2] = (float)kl;
    }
}

// Explicit instantiations for offline checks (nvcc in tests/test_cuda_sources.py): every logits /
// target dtype pair with mu/logvar in the logits dtype, plus fp32 latents under 16-bit logits.  At
// run time CuPy/NVRTC instantiates only what it is asked for through name_expressions.
#ifdef FASTVAE_INSTANTIATE_ALL
#define FV_INST_LOSS1(TX, TT, TM, R, G)                                                               \
    template __global__ void fastvae_vae_loss_rows<TX, TT, TM, R, G>(                                 \
        const TX*, fv_i64, const TT*, fv_i64, const TM*, fv_i64, const TM*, fv_i64, TX*, fv_i64, TM*, \
        fv_i64, TM*, fv_i64, float*, float*, float*, fv_i64, fv_i64, fv_i64, float, float, int, int);
#define FV_INST_LOSS(TX, TT, TM)                  \
    FV_INST_LOSS1(TX, TT, TM, FV_RECON_BCE, true)  \
    FV_INST_LOSS1(TX, TT, TM, FV_RECON_BCE, false) \
    FV_INST_LOSS1(TX, TT, TM, FV_RECON_MSE, true)  \
    FV_INST_LOSS1(TX, TT, TM, FV_RECON_MSE, false)
FV_INST_LOSS(float, float, float)
FV_INST_LOSS(float, unsigned char, float)
FV_INST_LOSS(fv_half, fv_half, fv_half)
FV_INST_LOSS(fv_half, unsigned char, fv_half)
FV_INST_LOSS(fv_half, float, fv_half)
FV_INST_LOSS(fv_half, float, float)
FV_INST_LOSS(fv_bf16, fv_bf16, fv_bf16)
FV_INST_LOSS(fv_bf16, unsigned char, fv_bf16)
FV_INST_LOSS(fv_bf16, float, fv_bf16)
FV_INST_LOSS(fv_bf16, float, float)
#endif
