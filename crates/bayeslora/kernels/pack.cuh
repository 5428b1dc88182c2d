// 16-byte vector loads and stores through f32, and a block-wide sum: the helpers of the
// memory-bound elementwise and row kernels (rms_norm.cu, rope.cu, swiglu.cu, layout.cu). Included
// by those .cu files.
#pragma once
#include "dtype.cuh"

// 16-byte accesses (4 f32 or 8 bf16/f16 per thread): these kernels are bound by memory, and wide
// loads halve-to-quarter the instructions and transactions per byte. The host asks for them
// (`vec`) only when the row/element counts are multiples of a pack; the kernels also check
// pointer alignment, so an odd tensor offset falls back to scalar accesses instead of faulting.
template <typename T>
struct Pack {
    static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, int N>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[N]) {
    if constexpr (N * sizeof(T) == 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f32(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f32(p[i]);
    }
}

template <typename T, int N>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[N]) {
    if constexpr (N * sizeof(T) == 16) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) e[i] = from_f32<T>(in[i]);
        *reinterpret_cast<uint4*>(p) = raw;
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) p[i] = from_f32<T>(in[i]);
    }
}

// Sums each of v[0..K) over the block (blockDim.x a multiple of 32); every thread gets the sums.
// Each warp reduces the per-warp partials itself, so one barrier suffices. Called once per kernel.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
    __shared__ float partial[K][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffff, v[k], o);
        if (lane == 0) partial[k][warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float s = lane < warps ? partial[k][lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        v[k] = s;
    }
}

// Instantiates `KERNELS(SUFFIX, T)` for each storage dtype of these kernels; the host names the
// entry points `<name>_<SUFFIX>` (`ops::cuda::dtype_suffix`).
#define FOR_EACH_FLOAT(KERNELS) \
    KERNELS(f32, float)         \
    KERNELS(bf16, __nv_bfloat16) \
    KERNELS(f16, __half)
