// Inverted dropout with the mask computed on the device from (seed, element index), so no mask
// is drawn on the host and uploaded. keep(i) = uniform(seed, i) >= p; y = x * keep / (1 - p).
// The hash is splitmix64 (Steele et al. 2014) applied twice; ops::hash_uniform (ops/dropout.rs) is the
// same function on the host, and the GPU tests compare the two bit for bit.
#include "dtype.cuh"

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 24 random bits → [0, 1), exact in f32.
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t i) {
    return (float)(splitmix64(seed ^ splitmix64(i)) >> 40) * (1.0f / 16777216.0f);
}

// Mirrors `DropoutParams` in src/ops/dropout.rs.
struct DropoutParams {
    uint64_t n;
    uint64_t seed;
    float p;
    float scale;
};

template <typename T>
__device__ void dropout(const DropoutParams a, const T* __restrict__ x, T* __restrict__ y) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        const float keep = uniform01(a.seed, i) >= a.p ? a.scale : 0.0f;
        y[i] = from_f32<T>(to_f32(x[i]) * keep);
    }
}

#define DROPOUT_KERNEL(NAME, T)                                                                  \
    extern "C" __global__ void NAME(const DropoutParams a, const T* x, T* y) { dropout<T>(a, x, y); }

DROPOUT_KERNEL(dropout_f32, float)
DROPOUT_KERNEL(dropout_bf16, __nv_bfloat16)
DROPOUT_KERNEL(dropout_f16, __half)

extern "C" __global__ void dropout_f64(const DropoutParams a, const double* __restrict__ x,
                                       double* __restrict__ y) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        y[i] = uniform01(a.seed, i) >= a.p ? x[i] * (double)a.scale : 0.0;
    }
}
