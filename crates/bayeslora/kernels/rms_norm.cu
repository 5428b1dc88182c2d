// RMSNorm, forward and backward, each as one kernel (see `ops::rms_norm`). Composed from candle
// ops it costs 5-10 launches of strided broadcast/cast kernels and as many full-size temporaries;
// here every element is read from and written to global memory once. Math in f32 whatever the
// storage dtype; the normalised row is rounded to the storage dtype before the weight, as HF's
// LlamaRMSNorm does.
#include "pack.cuh"

// RMSNorm over rows of `cols` elements, one block per row.

// Mirrors `NormParams` in src/ops/rms_norm.rs.
struct NormParams {
    uint32_t rows;
    uint32_t cols;
    float eps;
    uint32_t vec;
};

// y = T(T(x·rstd)·w), rstd = 1/sqrt(mean(x²) + eps).
template <typename T, int N>
__device__ __forceinline__ void rms_fwd_row(const NormParams& p, const T* __restrict__ x, const T* __restrict__ w,
                                            T* __restrict__ y) {
    float acc[1] = {0.0f};
    for (uint32_t j = threadIdx.x * N; j < p.cols; j += blockDim.x * N) {
        float v[N];
        load<T, N>(x + j, v);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[0] += v[i] * v[i];
    }
    block_sum<1>(acc);
    const float rstd = rsqrtf(acc[0] / p.cols + p.eps);
    // This second read of the row is served by L1/L2 (a row is a few KB), not DRAM.
    for (uint32_t j = threadIdx.x * N; j < p.cols; j += blockDim.x * N) {
        float v[N], wv[N];
        load<T, N>(x + j, v);
        load<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = to_f32(from_f32<T>(v[i] * rstd)) * wv[i];
        store<T, N>(y + j, v);
    }
}

// dx = rstd·(g·w − x̂·mean(g·w·x̂)) = rstd·g·w − x·rstd³·Σ(g·w·x)/cols: both sums in one pass.
template <typename T, int N>
__device__ __forceinline__ void rms_bwd_row(const NormParams& p, const T* __restrict__ x, const T* __restrict__ g,
                                            const T* __restrict__ w, T* __restrict__ dx) {
    float acc[2] = {0.0f, 0.0f};
    for (uint32_t j = threadIdx.x * N; j < p.cols; j += blockDim.x * N) {
        float xv[N], gv[N], wv[N];
        load<T, N>(x + j, xv);
        load<T, N>(g + j, gv);
        load<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            acc[0] += xv[i] * xv[i];
            acc[1] += gv[i] * wv[i] * xv[i];
        }
    }
    block_sum<2>(acc);
    const float rstd = rsqrtf(acc[0] / p.cols + p.eps);
    const float c = acc[1] * rstd * rstd * rstd / p.cols;
    for (uint32_t j = threadIdx.x * N; j < p.cols; j += blockDim.x * N) {
        float xv[N], gv[N], wv[N];
        load<T, N>(x + j, xv);
        load<T, N>(g + j, gv);
        load<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) xv[i] = rstd * gv[i] * wv[i] - xv[i] * c;
        store<T, N>(dx + j, xv);
    }
}

template <typename T>
__device__ void rms_fwd(const NormParams p, const T* x, const T* w, T* y) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const uint64_t off = (uint64_t)r * p.cols;
    if (p.vec && aligned16(x) && aligned16(w) && aligned16(y))
        rms_fwd_row<T, Pack<T>::N>(p, x + off, w, y + off);
    else
        rms_fwd_row<T, 1>(p, x + off, w, y + off);
}

template <typename T>
__device__ void rms_bwd(const NormParams p, const T* x, const T* g, const T* w, T* dx) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const uint64_t off = (uint64_t)r * p.cols;
    if (p.vec && aligned16(x) && aligned16(g) && aligned16(w) && aligned16(dx))
        rms_bwd_row<T, Pack<T>::N>(p, x + off, g + off, w, dx + off);
    else
        rms_bwd_row<T, 1>(p, x + off, g + off, w, dx + off);
}

#define RMS_NORM_KERNELS(SUFFIX, T)                                                                           \
    extern "C" __global__ void rms_fwd_##SUFFIX(const NormParams p, const T* x, const T* w, T* y) {          \
        rms_fwd<T>(p, x, w, y);                                                                              \
    }                                                                                                        \
    extern "C" __global__ void rms_bwd_##SUFFIX(const NormParams p, const T* x, const T* g, const T* w,      \
                                                T* dx) {                                                     \
        rms_bwd<T>(p, x, g, w, dx);                                                                          \
    }

FOR_EACH_FLOAT(RMS_NORM_KERNELS)
