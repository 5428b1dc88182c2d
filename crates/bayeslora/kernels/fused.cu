// RMSNorm, rotary embedding and SwiGLU, forward and backward, each as one kernel (see
// `ops::fused`). Composed from candle ops, each of these costs 5-10 launches of strided
// broadcast/cast kernels and as many full-size temporaries; here every element is read from and
// written to global memory once. Math in f32 whatever the storage dtype, one rounding at the end
// (RMSNorm also rounds the normalised row before the weight, as HF's LlamaRMSNorm does).
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

// ---------------------------------------------------------------------------------------------
// RMSNorm over rows of `cols` elements, one block per row.

// Mirrors `NormParams` in src/ops/fused.rs.
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

// ---------------------------------------------------------------------------------------------
// Rotary embedding, rotate-half convention, on rows of `d` elements whose position is
// row % t; cos/sin are [t, d]. One thread per pack of pairs (x[j], x[j + d/2]), consecutive
// threads along a row, so each warp reads whole 128-byte segments of both halves.

// Mirrors `RopeParams` in src/ops/fused.rs.
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

// ---------------------------------------------------------------------------------------------
// SwiGLU, y = silu(gate)·up, elementwise.

// Mirrors `SwigluParams` in src/ops/fused.rs.
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


// ---- Attention head layout: [B, T, H, D] <-> [B, H, T, D] ----
// A pure permutation of rows of D contiguous elements. candle's strided copy computes every
// element's source index through a generic dims/strides loop (~150 us for a 7B layer's q, about
// 100 GB/s); here each thread moves one 16-byte piece of a row, coalesced on both sides.
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

#define FUSED_KERNELS(SUFFIX, T)                                                                              \
    extern "C" __global__ void rms_fwd_##SUFFIX(const NormParams p, const T* x, const T* w, T* y) {          \
        rms_fwd<T>(p, x, w, y);                                                                              \
    }                                                                                                        \
    extern "C" __global__ void rms_bwd_##SUFFIX(const NormParams p, const T* x, const T* g, const T* w,      \
                                                T* dx) {                                                     \
        rms_bwd<T>(p, x, g, w, dx);                                                                          \
    }                                                                                                        \
    extern "C" __global__ void rope_##SUFFIX(const RopeParams p, const T* x, const T* cs, const T* sn, T* y) { \
        rope<T>(p, x, cs, sn, y);                                                                            \
    }                                                                                                        \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const SwigluParams p, const T* gate, const T* up, T* y) { \
        swiglu_fwd<T>(p, gate, up, y);                                                                       \
    }                                                                                                        \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const SwigluParams p, const T* gate, const T* up,         \
                                                   const T* g, T* d) {                                       \
        swiglu_bwd<T>(p, gate, up, g, d);                                                                    \
    }                                                                                                        \
    extern "C" __global__ void heads_##SUFFIX(const HeadsParams p, const T* x, T* y) { heads<T>(p, x, y); }

FUSED_KERNELS(f32, float)
FUSED_KERNELS(bf16, __nv_bfloat16)
FUSED_KERNELS(f16, __half)

// ---- Dtype casts between f32 and bf16/f16 ----
// candle's cast kernel moves one element per thread (~0.8 TB/s on a 7B layer's activations,
// 60-80 us a cast); four per thread, 8/16-byte accesses, run at memory speed.
struct CastParams {
    unsigned long long n;
    unsigned int vec;
    unsigned int pad;
};

template <typename S, typename D>
__device__ __forceinline__ void cast_body(const CastParams p, const S* __restrict__ x, D* __restrict__ y) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (p.vec) {  // 4 elements per item; n % 4 == 0 and both pointers 16-byte aligned
        for (; i < p.n / 4; i += stride) {
            S in[4];
            if constexpr (sizeof(S) == 4) {
                *reinterpret_cast<float4*>(in) = reinterpret_cast<const float4*>(x)[i];
            } else {
                *reinterpret_cast<uint2*>(in) = reinterpret_cast<const uint2*>(x)[i];
            }
            D out[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) out[k] = from_f32<D>(to_f32(in[k]));
            if constexpr (sizeof(D) == 4) {
                reinterpret_cast<float4*>(y)[i] = *reinterpret_cast<const float4*>(out);
            } else {
                reinterpret_cast<uint2*>(y)[i] = *reinterpret_cast<const uint2*>(out);
            }
        }
    } else {
        for (; i < p.n; i += stride) y[i] = from_f32<D>(to_f32(x[i]));
    }
}

#define CAST_KERNEL(NAME, S, D)                                                              \
    extern "C" __global__ void NAME(const CastParams p, const S* x, D* y) {                  \
        if (p.vec && aligned16(x) && aligned16(y))                                            \
            cast_body<S, D>(p, x, y);                                                         \
        else                                                                                  \
            cast_body<S, D>(CastParams{p.n, 0, 0}, x, y);                                     \
    }
CAST_KERNEL(cast_bf16_f32, __nv_bfloat16, float)
CAST_KERNEL(cast_f32_bf16, float, __nv_bfloat16)
CAST_KERNEL(cast_f16_f32, __half, float)
CAST_KERNEL(cast_f32_f16, float, __half)
