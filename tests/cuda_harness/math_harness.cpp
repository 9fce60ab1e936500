// Host harness for kernels/cuda/fastvae_math.cuh: runs the exact per-element functions the CUDA
// kernels use, on the CPU, so tests/test_cuda_sources.py can compare them with fastvae/reference.py
// without a GPU.  Built by the test into a temporary directory (g++, or nvcc as a host compiler):
//
//     g++ -std=c++17 -O2 -ffp-contract=off -I kernels/cuda math_harness.cpp -o math_harness
//
// Usage: math_harness MODE IN OUT.  IN starts with an int64 count N followed by the mode's input
// arrays (each N long, one after the other); OUT receives the output arrays the same way.
//   rng   in: u64 seed[N], u64 counter[N]  out: u32 w0[N], w1[N], w2[N], w3[N] (Philox at counter),
//                                               f32 u1[N], u2[N], n[N] (element counter: its uniform
//                                               pair and fv_randn)
//   loss  in: f32 x[N], t[N], mu[N], lv[N], u8 k[N]
//         out: f32 bce, dbce, mse, dmse, bce_u8, dbce_u8, mse_u8, dmse_u8, kl, dlv  (each [N])
//   conv  in: f32 x[N], u16 h[N]
//         out: u16 half(x)[N], u16 bf16(x)[N], f32 half_to_float(h)[N], f32 bf16_to_float(h)[N]
//   cos   in: f32 a[N]                     out: f32 cos[N], sin[N] (fv_sincos_small(a))
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "fastvae_math.cuh"

namespace {

struct Reader {
    FILE* f;
    template <typename T>
    std::vector<T> read(long long n) {
        std::vector<T> v((size_t)n);
        if (n > 0 && fread(v.data(), sizeof(T), (size_t)n, f) != (size_t)n) {
            fprintf(stderr, "short read\n");
            exit(2);
        }
        return v;
    }
};

struct Writer {
    FILE* f;
    template <typename T>
    void write(const std::vector<T>& v) {
        if (!v.empty() && fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
            fprintf(stderr, "short write\n");
            exit(2);
        }
    }
};

void run_rng(Reader& in, Writer& out, long long n) {
    const std::vector<fv_u64> seed = in.read<fv_u64>(n);
    const std::vector<fv_u64> counter = in.read<fv_u64>(n);
    std::vector<fv_u32> w0(n), w1(n), w2(n), w3(n);
    std::vector<float> u1(n), u2(n), normal(n);
    for (long long i = 0; i < n; ++i) {
        const fv_u32x4 r = fv_philox_for_counter(seed[i], counter[i]);
        w0[i] = r.x;
        w1[i] = r.y;
        w2[i] = r.z;
        w3[i] = r.w;
        fv_uniform_pair(seed[i], counter[i], &u1[i], &u2[i]);
        normal[i] = fv_randn(seed[i], counter[i]);
    }
    out.write(w0);
    out.write(w1);
    out.write(w2);
    out.write(w3);
    out.write(u1);
    out.write(u2);
    out.write(normal);
}

void run_loss(Reader& in, Writer& out, long long n) {
    const std::vector<float> x = in.read<float>(n);
    const std::vector<float> t = in.read<float>(n);
    const std::vector<float> mu = in.read<float>(n);
    const std::vector<float> lv = in.read<float>(n);
    const std::vector<unsigned char> k = in.read<unsigned char>(n);
    std::vector<std::vector<float>> cols(10, std::vector<float>(n));
    for (long long i = 0; i < n; ++i) {
        const fv_target tf = fv_make_target(t[i]);
        const fv_target tu = fv_make_target(k[i]);
        cols[0][i] = fv_recon<FV_RECON_BCE>(x[i], tf, &cols[1][i]);
        cols[2][i] = fv_recon<FV_RECON_MSE>(x[i], tf, &cols[3][i]);
        cols[4][i] = fv_recon<FV_RECON_BCE>(x[i], tu, &cols[5][i]);
        cols[6][i] = fv_recon<FV_RECON_MSE>(x[i], tu, &cols[7][i]);
        cols[8][i] = fv_kl(mu[i], lv[i], &cols[9][i]);
    }
    for (const auto& c : cols) out.write(c);
}

void run_conv(Reader& in, Writer& out, long long n) {
    const std::vector<float> x = in.read<float>(n);
    const std::vector<unsigned short> h = in.read<unsigned short>(n);
    std::vector<unsigned short> to_half(n), to_bf16(n);
    std::vector<float> from_half(n), from_bf16(n);
    for (long long i = 0; i < n; ++i) {
        to_half[i] = fv_from_float<fv_half>(x[i]).bits;
        to_bf16[i] = fv_from_float<fv_bf16>(x[i]).bits;
        fv_half hh;
        hh.bits = h[i];
        fv_bf16 bb;
        bb.bits = h[i];
        from_half[i] = fv_to_float(hh);
        from_bf16[i] = fv_to_float(bb);
    }
    out.write(to_half);
    out.write(to_bf16);
    out.write(from_half);
    out.write(from_bf16);
}

void run_cos(Reader& in, Writer& out, long long n) {
    const std::vector<float> a = in.read<float>(n);
    std::vector<float> c(n), s(n);
    for (long long i = 0; i < n; ++i) fv_sincos_small(a[i], &c[i], &s[i]);
    out.write(c);
    out.write(s);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s rng|loss|conv|cos IN OUT\n", argv[0]);
        return 2;
    }
    FILE* fin = fopen(argv[2], "rb");
    FILE* fout = fopen(argv[3], "wb");
    if (!fin || !fout) {
        fprintf(stderr, "cannot open files\n");
        return 2;
    }
    Reader in{fin};
    Writer out{fout};
    const long long n = in.read<long long>(1)[0];
    const char* mode = argv[1];
    if (!strcmp(mode, "rng")) {
        run_rng(in, out, n);
    } else if (!strcmp(mode, "loss")) {
        run_loss(in, out, n);
    } else if (!strcmp(mode, "conv")) {
        run_conv(in, out, n);
    } else if (!strcmp(mode, "cos")) {
        run_cos(in, out, n);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    fclose(fin);
    fclose(fout);
    return 0;
}
