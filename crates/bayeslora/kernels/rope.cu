// Rotary position embedding and its adjoint (the backward) as one kernel (see `ops::rope`):
// every element read and written once, math in f32 whatever the storage dtype.
#include "pack.cuh"

// Rotary embedding, rotate-half convention, on rows of `d` elements whose position is
// row % t; cos/sin are [t, d]. One thread per pack of pairs (x[j], x[j + d/2]), consecutive
// threads along a row, so each warp reads whole 128-byte segments of both halves.

// Mirrors `RopeParams` in src/ops/rope.rs.
struct RopeParams {
    uint64_t rows;
    uint32_t t;
    uint32_t d;
    uint32_t vec;
    uint32_t transpose;
};

// Forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2. Transpose (the backward, applied to the
// gradient): y1 = x1·c1 + x2·s2, y2 = x2·c2 − x1·s1.
template <typename T, int N>
__device__ __forceinline__ void rope_body(const RopeParams& p, const T* __restrict__ x, const T* __restrict__ cs,
                                          const T* __restrict__ sn, T* __restrict__ y) {
    const uint32_t half = p.d / 2, per_row = half / N;
    const uint64_t items = p.rows * per_row;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t k = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; k < items; k += stride) {
        const uint64_t row = k / per_row;
        const uint32_t j = (uint32_t)(k - row * per_row) * N;
        const uint64_t pos = (uint32_t)(row % p.t);
        const T* xr = x + row * p.d;
        T* yr = y + row * p.d;
        const T* cr = cs + pos * p.d;
        const T* sr = sn + pos * p.d;
        float x1[N], x2[N], c1[N], c2[N], s1[N], s2[N], y1[N], y2[N];
        load<T, N>(xr + j, x1);
        load<T, N>(xr + half + j, x2);
        load<T, N>(cr + j, c1);
        load<T, N>(cr + half + j, c2);
        load<T, N>(sr + j, s1);
        load<T, N>(sr + half + j, s2);
        if (p.transpose) {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
            }
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
            }
        }
        store<T, N>(yr + j, y1);
        store<T, N>(yr + half + j, y2);
    }
}

template <typename T>
__device__ void rope(const RopeParams p, const T* x, const T* cs, const T* sn, T* y) {
    if (p.vec && aligned16(x) && aligned16(cs) && aligned16(sn) && aligned16(y))
        rope_body<T, Pack<T>::N>(p, x, cs, sn, y);
    else
        rope_body<T, 1>(p, x, cs, sn, y);
}

#define ROPE_KERNELS(SUFFIX, T)                                                                               \
    extern "C" __global__ void rope_##SUFFIX(const RopeParams p, const T* x, const T* cs, const T* sn, T* y) { \
        rope<T>(p, x, cs, sn, y);                                                                            \
    }

FOR_EACH_FLOAT(ROPE_KERNELS)
