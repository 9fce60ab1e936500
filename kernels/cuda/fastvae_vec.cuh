// fastvae_vec.cuh -- vectorized loads and stores for the CUDA kernels (device only).
//
// fv_pack<T, N> holds N elements of T in registers and moves them with the widest aligned accesses
// that fit: 16-byte (uint4) words when N * sizeof(T) >= 16, else one 8/4/2/1-byte word.  The caller
// guarantees the alignment (the host glue checks every base pointer and row stride and falls back
// to the scalar path, `vec = 0`, when any is misaligned).
#pragma once

#include "fastvae_math.cuh"

template <int BYTES>
struct fv_word;
template <>
struct fv_word<16> {
    typedef uint4 type;
};
template <>
struct fv_word<8> {
    typedef uint2 type;
};
template <>
struct fv_word<4> {
    typedef unsigned int type;
};
template <>
struct fv_word<2> {
    typedef unsigned short type;
};
template <>
struct fv_word<1> {
    typedef unsigned char type;
};

template <typename T, int N>
struct fv_pack {
    static constexpr int BYTES = N * (int)sizeof(T);
    static constexpr int WORD = BYTES >= 16 ? 16 : BYTES;
    static constexpr int WORDS = BYTES / WORD;
    typedef typename fv_word<WORD>::type word_t;
    union {
        word_t w[WORDS];
        T v[N];
    };

    __device__ __forceinline__ void load(const T* __restrict__ p) {
        const word_t* q = reinterpret_cast<const word_t*>(p);
        FV_UNROLL
        for (int k = 0; k < WORDS; ++k) w[k] = q[k];
    }
    __device__ __forceinline__ void store(T* __restrict__ p) const {
        word_t* q = reinterpret_cast<word_t*>(p);
        FV_UNROLL
        for (int k = 0; k < WORDS; ++k) q[k] = w[k];
    }
};
