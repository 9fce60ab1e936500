// CPU emulator for the fastvae CUDA kernels: compiles kernels/cuda/vae_loss.cu, reparameterize.cu
// and scale_grads.cu *unchanged* as C++ and runs them under cuda_emu.h (CUDA's execution model on
// the host), so tests/test_cuda_sources.py can check the kernels' indexing, vector/tail paths,
// row-group reductions, the finalize kernel, the random counters and the in-place gradient scale
// against fastvae/reference.py on a machine without a GPU.
//
//     g++ -std=c++17 -O2 -fno-strict-aliasing -I kernels/cuda kernel_emulator.cpp -o kernel_emulator
//
// Usage: kernel_emulator loss|reparam|scale JOB OUT (formats in run_loss / run_reparam / run_scale
// below; every output buffer is filled with NaN bytes first, so an element the kernels do not write
// shows up).
#include "cuda_emu.h"

// A divergent barrier ends the run with exit code 3.
template <typename F>
static void launch_or_exit(fv_dim3 grid, fv_dim3 block, F&& kernel) {
    if (emu::launch(grid, block, std::forward<F>(kernel)) != 0) exit(3);
}

// ---- the kernels, as NVRTC compiles them -----------------------------------------------------
#include "reparameterize.cu"
#include "scale_grads.cu"
#include "vae_loss.cu"

// ---- job files -------------------------------------------------------------------------------
namespace {

struct In {
    FILE* f;
    long long i64() {
        long long v;
        if (fread(&v, sizeof v, 1, f) != 1) exit(2);
        return v;
    }
    double f64() {
        double v;
        if (fread(&v, sizeof v, 1, f) != 1) exit(2);
        return v;
    }
    void* buffer(size_t bytes) {  // 64-byte aligned, like a cudaMalloc'd buffer base
        void* p = aligned_alloc(64, (bytes + 64) / 64 * 64);
        if (bytes && fread(p, 1, bytes, f) != bytes) exit(2);
        return p;
    }
};

void* poisoned(size_t bytes) {
    void* p = aligned_alloc(64, (bytes + 64) / 64 * 64);
    memset(p, 0xff, bytes);  // all-ones bytes: NaN in fp32, fp16 and bf16
    return p;
}

void put(FILE* f, const void* p, size_t bytes) {
    if (bytes && fwrite(p, 1, bytes, f) != bytes) exit(2);
}

size_t type_size(int code) { return code == 0 ? 4 : code == 3 ? 1 : 2; }

// loss job: i64 tx, tt, tm (0 fp32, 1 fp16, 2 bf16, 3 uint8), recon (1 bce, 2 mse), need_grad,
//   reduction (0 sum, 1 mean, 2 none), B, F, D, then (offset, row stride, buffer length) in elements
//   for logits, target, mu, logvar, then group_log2, vec, grid; f64 beta; then the four buffers.
// out: recon_rows f32[B], kl_rows f32[B], loss_rows f32[B] (none) or out3 f32[3] (sum / mean), and
//   with need_grad dlogits TX[B*F], dmu TM[B*D], dlogvar TM[B*D] (contiguous).
template <typename TX, typename TT, typename TM>
void loss_job(const long long* h, double beta, void* const* buf, FILE* out) {
    const int recon = (int)h[3], need_grad = (int)h[4], reduction = (int)h[5];
    const long long B = h[6], F = h[7], D = h[8];
    const long long* xs = h + 9;  // offset, stride, length x 4
    const int glog2 = (int)h[21], vec = (int)h[22];
    const unsigned grid = (unsigned)h[23];
    const TX* x = (const TX*)buf[0] + xs[0];
    const TT* t = (const TT*)buf[1] + xs[3];
    const TM* mu = (const TM*)buf[2] + xs[6];
    const TM* lv = (const TM*)buf[3] + xs[9];
    TX* dx = (TX*)poisoned(sizeof(TX) * B * F);
    TM* dmu = (TM*)poisoned(sizeof(TM) * B * D);
    TM* dlv = (TM*)poisoned(sizeof(TM) * B * D);
    float* rec = (float*)poisoned(4 * B);
    float* kl = (float*)poisoned(4 * B);
    float* rows = reduction == 2 ? (float*)poisoned(4 * B) : nullptr;
    float* out3 = (float*)poisoned(12);
    const float grad_scale = reduction == 1 ? (float)(1.0 / (double)B) : 1.0f;
    auto row_kernel = [&](auto R, auto G) {
        launch_or_exit(fv_dim3{grid, 1, 1}, fv_dim3{FV_LOSS_THREADS, 1, 1}, [&] {
            fastvae_vae_loss_rows<TX, TT, TM, decltype(R)::value, decltype(G)::value>(
                x, xs[1], t, xs[4], mu, xs[7], lv, xs[10], dx, F, dmu, D, dlv, D, rec, kl, rows, B, F, D,
                (float)beta, grad_scale, glog2, vec);
        });
    };
    using BCE = std::integral_constant<int, FV_RECON_BCE>;
    using MSE = std::integral_constant<int, FV_RECON_MSE>;
    using YES = std::true_type;
    using NO = std::false_type;
    if (recon == FV_RECON_BCE) {
        if (need_grad) row_kernel(BCE(), YES()); else row_kernel(BCE(), NO());
    } else {
        if (need_grad) row_kernel(MSE(), YES()); else row_kernel(MSE(), NO());
    }
    if (reduction != 2) {
        launch_or_exit(fv_dim3{1, 1, 1}, fv_dim3{FV_FINALIZE_THREADS, 1, 1},
                    [&] { fastvae_vae_loss_finalize(rec, kl, B, (float)beta, reduction == 1, out3); });
    }
    put(out, rec, 4 * B);
    put(out, kl, 4 * B);
    if (reduction == 2) put(out, rows, 4 * B); else put(out, out3, 12);
    if (need_grad) {
        put(out, dx, sizeof(TX) * B * F);
        put(out, dmu, sizeof(TM) * B * D);
        put(out, dlv, sizeof(TM) * B * D);
    }
}

int run_loss(In& in, FILE* out) {
    long long h[24];
    for (long long& v : h) v = in.i64();
    const double beta = in.f64();
    void* buf[4];
    const int codes[4] = {(int)h[0], (int)h[1], (int)h[2], (int)h[2]};
    for (int k = 0; k < 4; ++k) buf[k] = in.buffer(type_size(codes[k]) * (size_t)h[11 + 3 * k]);
    const int key = (int)(h[0] * 100 + h[1] * 10 + h[2]);
    switch (key) {  // the dtype triples the emulator is built for
        case 0: loss_job<float, float, float>(h, beta, buf, out); break;
        case 30: loss_job<float, unsigned char, float>(h, beta, buf, out); break;
        case 111: loss_job<fv_half, fv_half, fv_half>(h, beta, buf, out); break;
        case 131: loss_job<fv_half, unsigned char, fv_half>(h, beta, buf, out); break;
        case 100: loss_job<fv_half, float, float>(h, beta, buf, out); break;
        case 222: loss_job<fv_bf16, fv_bf16, fv_bf16>(h, beta, buf, out); break;
        case 200: loss_job<fv_bf16, float, float>(h, beta, buf, out); break;
        default: fprintf(stderr, "dtype triple %d not built into the emulator\n", key); return 2;
    }
    return 0;
}

// reparam job: i64 dtype (0 fp32, 1 fp16, 2 bf16), backward, rows, cols, then (offset, row stride,
//   buffer length) for a (mu or dz) and logvar, vec, grid_x, grid_y, key (u64 bits), counter offset
//   (u64 bits), key_in_memory (1: the kernel reads the key through a pointer, the by-value key
//   argument is then garbage); then buffers.
// out: z or dlogvar, contiguous [rows, cols].
template <typename T>
void reparam_job(const long long* h, void* const* buf, FILE* out) {
    const int backward = (int)h[1];
    const long long rows = h[2], cols = h[3];
    const T* a = (const T*)buf[0] + h[4];
    const T* lv = (const T*)buf[1] + h[7];
    const int vec = (int)h[10];
    const fv_dim3 grid{(unsigned)h[11], (unsigned)h[12], 1};
    const fv_u64 offset = (fv_u64)h[14];
    const bool in_memory = h[15] != 0;
    static fv_i64 key_cell;  // the "device" int64 the kernel reads
    key_cell = h[13];
    const fv_i64* key_ptr = in_memory ? &key_cell : nullptr;
    const fv_u64 key = in_memory ? 0x5a5a5a5a5a5a5a5aull : (fv_u64)h[13];
    T* o = (T*)poisoned(sizeof(T) * rows * cols);
    launch_or_exit(grid, fv_dim3{256, 1, 1}, [&] {
        if (backward)
            fastvae_reparameterize_bwd<T>(a, h[5], lv, h[8], o, cols, rows, cols, key_ptr, key, offset, vec);
        else
            fastvae_reparameterize_fwd<T>(a, h[5], lv, h[8], o, cols, rows, cols, key_ptr, key, offset, vec);
    });
    put(out, o, sizeof(T) * rows * cols);
}

int run_reparam(In& in, FILE* out) {
    long long h[16];
    for (long long& v : h) v = in.i64();
    const size_t size = type_size((int)h[0]);
    void* buf[2] = {in.buffer(size * (size_t)h[6]), in.buffer(size * (size_t)h[9])};
    switch (h[0]) {
        case 0: reparam_job<float>(h, buf, out); break;
        case 1: reparam_job<fv_half>(h, buf, out); break;
        case 2: reparam_job<fv_bf16>(h, buf, out); break;
        default: return 2;
    }
    return 0;
}

// scale job: i64 tx, tm (0 fp32, 1 fp16, 2 bf16), B, F, D, g_stride, g length, dlogits offset (in
//   elements; -1: no dlogits), has_dmu, has_dlogvar, group_log2, vec, grid; then f32 g, then the
//   buffers dlogits (offset + B * F elements), dmu, dlogvar (B * D each, when present).
// out: the same buffers after the in-place scale (dlogits from its offset).
template <typename TX, typename TM>
void scale_job(const long long* h, In& in, FILE* out) {
    const long long B = h[2], F = h[3], D = h[4], g_stride = h[5], n_g = h[6], x_off = h[7];
    const bool has_mu = h[8] != 0, has_lv = h[9] != 0;
    const int glog2 = (int)h[10], vec = (int)h[11];
    const unsigned grid = (unsigned)h[12];
    const float* g = (const float*)in.buffer(4 * (size_t)n_g);
    TX* dx_buf = x_off >= 0 ? (TX*)in.buffer(sizeof(TX) * (size_t)(x_off + B * F)) : nullptr;
    TM* dmu = has_mu ? (TM*)in.buffer(sizeof(TM) * (size_t)(B * D)) : nullptr;
    TM* dlv = has_lv ? (TM*)in.buffer(sizeof(TM) * (size_t)(B * D)) : nullptr;
    TX* dx = dx_buf ? dx_buf + x_off : nullptr;
    launch_or_exit(fv_dim3{grid, 1, 1}, fv_dim3{FV_SCALE_THREADS, 1, 1}, [&] {
        fastvae_scale_grads<TX, TM>(g, g_stride, dx, dx ? F : 0, dmu, dlv, D, B, glog2, vec);
    });
    if (dx) put(out, dx, sizeof(TX) * B * F);
    if (dmu) put(out, dmu, sizeof(TM) * B * D);
    if (dlv) put(out, dlv, sizeof(TM) * B * D);
}

int run_scale(In& in, FILE* out) {
    long long h[13];
    for (long long& v : h) v = in.i64();
    switch (h[0] * 10 + h[1]) {
        case 0: scale_job<float, float>(h, in, out); break;
        case 11: scale_job<fv_half, fv_half>(h, in, out); break;
        case 10: scale_job<fv_half, float>(h, in, out); break;
        case 22: scale_job<fv_bf16, fv_bf16>(h, in, out); break;
        case 20: scale_job<fv_bf16, float>(h, in, out); break;
        default: fprintf(stderr, "dtype pair %lld not built into the emulator\n", h[0] * 10 + h[1]); return 2;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s loss|reparam|scale JOB OUT\n", argv[0]);
        return 2;
    }
    FILE* fin = fopen(argv[2], "rb");
    FILE* fout = fopen(argv[3], "wb");
    if (!fin || !fout) return 2;
    In in{fin};
    const int rc = !strcmp(argv[1], "loss")      ? run_loss(in, fout)
                   : !strcmp(argv[1], "reparam") ? run_reparam(in, fout)
                                                 : run_scale(in, fout);
    fclose(fout);
    return rc;
}
