// Dtype casts between f32 and bf16/f16 (see `ops::cast`).
#include "pack.cuh"

// candle's cast kernel moves one element per thread (~0.8 TB/s on a 7B layer's activations,
// 60-80 us a cast); four per thread, 8/16-byte accesses, run at memory speed.

// Mirrors `CastParams` in src/ops/cast.rs.
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
