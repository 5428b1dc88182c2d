// The attention head layout as one permutation kernel (see `ops::layout`).
#include "pack.cuh"

// [B, T, H, D] <-> [B, H, T, D]: a pure permutation of rows of D contiguous elements. candle's strided copy computes every
// element's source index through a generic dims/strides loop (~150 us for a 7B layer's q, about
// 100 GB/s); here each thread moves one 16-byte piece of a row, coalesced on both sides.

// Mirrors `HeadsParams` in src/ops/layout.rs.
struct HeadsParams {
    unsigned int b, t, h, d;
    unsigned int to_heads;  // 1: x is [B, T, H, D], y [B, H, T, D]; 0: the reverse
    unsigned int vec;
};

template <typename T, int N>
__device__ __forceinline__ void heads_body(const HeadsParams p, const T* __restrict__ x, T* __restrict__ y) {
    const size_t per_row = p.d / N;
    const size_t rows = (size_t)p.b * p.t * p.h;
    const size_t items = rows * per_row;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < items; i += (size_t)gridDim.x * blockDim.x) {
        const size_t piece = i % per_row, row = i / per_row;  // row of y
        size_t src;
        if (p.to_heads) {  // y row (b, h, t) <- x row (b, t, h)
            const size_t t = row % p.t, h = (row / p.t) % p.h, b = row / ((size_t)p.t * p.h);
            src = (b * p.t + t) * p.h + h;
        } else {  // y row (b, t, h) <- x row (b, h, t)
            const size_t h = row % p.h, t = (row / p.h) % p.t, b = row / ((size_t)p.h * p.t);
            src = (b * p.h + h) * p.t + t;
        }
        const T* from = x + src * p.d + piece * N;
        T* to = y + row * p.d + piece * N;
        if constexpr (N * sizeof(T) == 16) {
            *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) to[k] = from[k];
        }
    }
}

template <typename T>
__device__ __forceinline__ void heads(const HeadsParams p, const T* x, T* y) {
    if (p.vec && aligned16(x) && aligned16(y))
        heads_body<T, Pack<T>::N>(p, x, y);
    else
        heads_body<T, 1>(p, x, y);
}

#define LAYOUT_KERNELS(SUFFIX, T) \
    extern "C" __global__ void heads_##SUFFIX(const HeadsParams p, const T* x, T* y) { heads<T>(p, x, y); }

FOR_EACH_FLOAT(LAYOUT_KERNELS)
