// cuda_emu.h -- a CPU emulation of the parts of CUDA's execution model the fastvae kernels use, so the
// kernels of kernels/cuda/ compile *unchanged* as C++ and run on the host (tests/cuda_harness/
// kernel_emulator.cpp runs job files; kernel_lib.cpp is a shared library that launches them on host
// buffers, the way CuPy launches them on device buffers).
//
// Model: a block's threads are cooperative fibers (ucontext) run one at a time; __syncthreads()
// yields to the scheduler, which resumes every thread of the block in turn, so a barrier is a
// round.  __shfl_xor_sync is a barrier-separated exchange through a block-wide array (the kernels
// only shuffle with the whole block converged).  __shared__ is `static`: blocks run one after the
// other.  A block whose threads do not all reach the same barriers is reported as an error.
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <type_traits>
#include <vector>

// ---- CUDA built-ins ------------------------------------------------------------------------
struct uint4 {
    unsigned int x, y, z, w;
};
struct uint2 {
    unsigned int x, y;
};
struct fv_dim3 {
    unsigned int x, y, z;
};
static fv_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
};
static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static unsigned current = 0;
static std::function<void()> body;
static float shfl_buf[1024];

static void entry() {
    body();
    fibers[current].done = true;  // returns to uc_link = scheduler
}

static void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

// Runs body() for every block of `grid` with `block.x` threads (1-D blocks).  Returns 0, or 3 after
// reporting a block whose threads did not all reach the same barriers.
static int launch(fv_dim3 grid, fv_dim3 block, std::function<void()> kernel) {
    gridDim = grid;
    blockDim = block;
    body = std::move(kernel);
    const unsigned n = block.x;
    fibers.assign(n, Fiber());
    for (auto& f : fibers) f.stack.resize(1 << 16);
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            for (unsigned t = 0; t < n; ++t) {
                Fiber& f = fibers[t];
                f.done = false;
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.data();
                f.ctx.uc_stack.ss_size = f.stack.size();
                f.ctx.uc_link = &scheduler;
                makecontext(&f.ctx, entry, 0);
            }
            blockIdx = fv_dim3{bx, by, 0};
            for (;;) {  // one round = every live thread runs to its next barrier or to its end
                unsigned finished = 0;
                for (unsigned t = 0; t < n; ++t) {
                    current = t;
                    threadIdx = fv_dim3{t, 0, 0};
                    swapcontext(&scheduler, &fibers[t].ctx);
                    finished += fibers[t].done;
                }
                if (finished == n) break;
                if (finished != 0) {
                    fprintf(stderr, "divergent barrier in block (%u, %u)\n", bx, by);
                    return 3;
                }
            }
        }
    }
    return 0;
}
}  // namespace emu

static void __syncthreads() { emu::yield(); }

static float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
    const unsigned t = threadIdx.x;
    emu::shfl_buf[t] = v;
    __syncthreads();
    const float r = emu::shfl_buf[t ^ (unsigned)lane_mask];
    __syncthreads();
    return r;
}
