// kernel_lib.cpp -- the fastvae CUDA kernels as a host shared library with a cuLaunchKernel-like entry
// point, so tests/test_cuda_sources.py can run fastvae.kernels.cupy_launch end to end on the CPU:
// its launches (names, grids, argument tuples) go to fv_emu_launch instead of CuPy, on the host
// buffers of CPU torch tensors, under cuda_emu.h.
//
//     g++ -std=c++17 -O1 -fno-strict-aliasing -fPIC -shared -I kernels/cuda kernel_lib.cpp -o kernel_lib.so
//
// int fv_emu_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned block_x, void** args)
//   name: the kernel's C++ name as cupy_launch asks NVRTC for it ("fastvae_scale_grads<float, float>");
//   args: one pointer per kernel parameter to that parameter's bytes (pointers are 8-byte values),
//   exactly what cuLaunchKernel takes.  Returns 0; 2 for a name not built in; 3 for a divergent barrier.
#include <map>
#include <string>

#include "cuda_emu.h"

#include "reparameterize.cu"
#include "scale_grads.cu"
#include "vae_loss.cu"

namespace {

using Launcher = std::function<void(void**)>;

template <typename T>
T arg(void** args, int i) {
    T v;
    memcpy(&v, args[i], sizeof v);
    return v;
}

template <typename TX, typename TT, typename TM, int R, bool G>
void loss_rows(void** a) {
    fastvae_vae_loss_rows<TX, TT, TM, R, G>(
        arg<const TX*>(a, 0), arg<fv_i64>(a, 1), arg<const TT*>(a, 2), arg<fv_i64>(a, 3), arg<const TM*>(a, 4),
        arg<fv_i64>(a, 5), arg<const TM*>(a, 6), arg<fv_i64>(a, 7), arg<TX*>(a, 8), arg<fv_i64>(a, 9),
        arg<TM*>(a, 10), arg<fv_i64>(a, 11), arg<TM*>(a, 12), arg<fv_i64>(a, 13), arg<float*>(a, 14),
        arg<float*>(a, 15), arg<float*>(a, 16), arg<fv_i64>(a, 17), arg<fv_i64>(a, 18), arg<fv_i64>(a, 19),
        arg<float>(a, 20), arg<float>(a, 21), arg<int>(a, 22), arg<int>(a, 23));
}

void finalize(void** a) {
    fastvae_vae_loss_finalize(arg<const float*>(a, 0), arg<const float*>(a, 1), arg<fv_i64>(a, 2),
                              arg<float>(a, 3), arg<int>(a, 4), arg<float*>(a, 5));
}

template <typename T, bool BACKWARD>
void reparam(void** a) {
    auto k = BACKWARD ? fastvae_reparameterize_bwd<T> : fastvae_reparameterize_fwd<T>;
    k(arg<const T*>(a, 0), arg<fv_i64>(a, 1), arg<const T*>(a, 2), arg<fv_i64>(a, 3), arg<T*>(a, 4),
      arg<fv_i64>(a, 5), arg<fv_i64>(a, 6), arg<fv_i64>(a, 7), arg<const fv_i64*>(a, 8), arg<fv_u64>(a, 9),
      arg<fv_u64>(a, 10), arg<int>(a, 11));
}

template <typename TX, typename TM>
void scale(void** a) {
    fastvae_scale_grads<TX, TM>(arg<const float*>(a, 0), arg<fv_i64>(a, 1), arg<TX*>(a, 2), arg<fv_i64>(a, 3),
                                arg<TM*>(a, 4), arg<TM*>(a, 5), arg<fv_i64>(a, 6), arg<fv_i64>(a, 7),
                                arg<int>(a, 8), arg<int>(a, 9));
}

#define FV_LOSS_NAME(TX, TT, TM, R, G) "fastvae_vae_loss_rows<" #TX ", " #TT ", " #TM ", " #R ", " #G ">"
#define FV_LOSS(TX, TT, TM)                                                      \
    {FV_LOSS_NAME(TX, TT, TM, 1, true), loss_rows<TX, TT, TM, 1, true>},         \
        {FV_LOSS_NAME(TX, TT, TM, 1, false), loss_rows<TX, TT, TM, 1, false>},   \
        {FV_LOSS_NAME(TX, TT, TM, 2, true), loss_rows<TX, TT, TM, 2, true>},     \
        {FV_LOSS_NAME(TX, TT, TM, 2, false), loss_rows<TX, TT, TM, 2, false>}
#define FV_REPARAM(T)                                                     \
    {"fastvae_reparameterize_fwd<" #T ">", reparam<T, false>},            \
        {"fastvae_reparameterize_bwd<" #T ">", reparam<T, true>}
#define FV_SCALE(TX, TM) {"fastvae_scale_grads<" #TX ", " #TM ">", scale<TX, TM>}

// The instantiations the end-to-end tests use (each dtype, uint8 targets, mixed latents).
const std::map<std::string, Launcher>& kernels() {
    static const std::map<std::string, Launcher> table = {
        {"fastvae_vae_loss_finalize", finalize},
        FV_LOSS(float, float, float),
        FV_LOSS(float, unsigned char, float),
        FV_LOSS(fv_half, unsigned char, fv_half),
        FV_LOSS(fv_bf16, fv_bf16, float),
        FV_REPARAM(float),
        FV_REPARAM(fv_half),
        FV_REPARAM(fv_bf16),
        FV_SCALE(float, float),
        FV_SCALE(fv_half, fv_half),
        FV_SCALE(fv_bf16, float),
    };
    return table;
}

}  // namespace

extern "C" int fv_emu_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned block_x,
                             void** args) {
    const auto it = kernels().find(name);
    if (it == kernels().end()) {
        fprintf(stderr, "kernel %s is not built into kernel_lib\n", name);
        return 2;
    }
    const Launcher& launcher = it->second;
    return emu::launch(fv_dim3{grid_x, grid_y, 1}, fv_dim3{block_x, 1, 1}, [&] { launcher(args); });
}
