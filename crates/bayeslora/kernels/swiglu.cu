// SwiGLU, forward and backward, each as one elementwise kernel (see `ops::swiglu`): math in f32
// whatever the storage dtype, one rounding at the end.
#include "pack.cuh"

// SwiGLU, y = silu(gate)·up, elementwise.

// Mirrors `SwigluParams` in src/ops/swiglu.rs.
struct SwigluParams {
    uint64_t n;
    uint32_t vec;
    uint32_t pad;
};

// The forward as candle's CPU silu writes it, x / (1 + e^−x), so f32 results stay within an ulp.
template <typename T, int N>
__device__ __forceinline__ void swiglu_fwd_body(const SwigluParams& p, const T* __restrict__ gate,
                                                const T* __restrict__ up, T* __restrict__ y) {
    const uint64_t items = p.n / N, stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t k = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; k < items; k += stride) {
        float a[N], u[N];
        load<T, N>(gate + k * N, a);
        load<T, N>(up + k * N, u);
#pragma unroll
        for (int i = 0; i < N; ++i) a[i] = a[i] / (1.0f + expf(-a[i])) * u[i];
        store<T, N>(y + k * N, a);
    }
}

// d_gate = g·up·s·(1 + gate·(1 − s)), d_up = g·gate·s, s = σ(gate); written to d[0..n) and
// d[n..2n).
template <typename T, int N>
__device__ __forceinline__ void swiglu_bwd_body(const SwigluParams& p, const T* __restrict__ gate,
                                                const T* __restrict__ up, const T* __restrict__ g,
                                                T* __restrict__ d) {
    const uint64_t items = p.n / N, stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t k = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; k < items; k += stride) {
        float a[N], u[N], gv[N], da[N], du[N];
        load<T, N>(gate + k * N, a);
        load<T, N>(up + k * N, u);
        load<T, N>(g + k * N, gv);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float s = 1.0f / (1.0f + expf(-a[i]));
            da[i] = gv[i] * u[i] * s * (1.0f + a[i] * (1.0f - s));
            du[i] = gv[i] * a[i] * s;
        }
        store<T, N>(d + k * N, da);
        store<T, N>(d + p.n + k * N, du);
    }
}

template <typename T>
__device__ void swiglu_fwd(const SwigluParams p, const T* gate, const T* up, T* y) {
    if (p.vec && aligned16(gate) && aligned16(up) && aligned16(y))
        swiglu_fwd_body<T, Pack<T>::N>(p, gate, up, y);
    else
        swiglu_fwd_body<T, 1>(p, gate, up, y);
}

template <typename T>
__device__ void swiglu_bwd(const SwigluParams p, const T* gate, const T* up, const T* g, T* d) {
    if (p.vec && aligned16(gate) && aligned16(up) && aligned16(g) && aligned16(d))
        swiglu_bwd_body<T, Pack<T>::N>(p, gate, up, g, d);
    else
        swiglu_bwd_body<T, 1>(p, gate, up, g, d);
}

#define SWIGLU_KERNELS(SUFFIX, T)                                                                             \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const SwigluParams p, const T* gate, const T* up, T* y) { \
        swiglu_fwd<T>(p, gate, up, y);                                                                       \
    }                                                                                                        \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const SwigluParams p, const T* gate, const T* up,         \
                                                   const T* g, T* d) {                                       \
        swiglu_bwd<T>(p, gate, up, g, d);                                                                    \
    }

FOR_EACH_FLOAT(SWIGLU_KERNELS)
