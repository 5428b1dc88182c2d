// Softmax cross-entropy per row, forward and backward, without materialising log-softmax:
// the forward keeps one f32 per row, the backward recomputes the row's max and Σexp and writes
// dx = (softmax(x) − onehot(label)) · g directly. One block per row; f32 statistics for every
// input dtype. Mirrors `ops::cross_entropy::{FusedCrossEntropy, CrossEntropyGrad}` (their CPU
// paths are the reference the GPU tests compare against).
#include "dtype.cuh"

// Mirrors `CeParams` in src/ops/cross_entropy.rs.
struct CeParams {
    uint32_t rows;
    uint32_t cols;
};

// Reduces `v` over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
template <bool IS_MAX>
__device__ float block_reduce(float v) {
    __shared__ float partial[32];
    __shared__ float result;
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffff, v, o);
        v = IS_MAX ? fmaxf(v, other) : v + other;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? partial[lane] : (IS_MAX ? -INFINITY : 0.0f);
        for (int o = 16; o > 0; o >>= 1) {
            const float other = __shfl_xor_sync(0xffffffff, v, o);
            v = IS_MAX ? fmaxf(v, other) : v + other;
        }
        if (lane == 0) result = v;
    }
    __syncthreads();
    const float r = result;
    __syncthreads();  // partial/result may be reused by the next reduction
    return r;
}

// max_j x_j and Σ_j exp(x_j − max) of one row.
template <typename T>
__device__ void row_stats(const T* __restrict__ x, uint32_t cols, float* max_out, float* sum_out) {
    float m = -INFINITY;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, to_f32(x[j]));
    m = block_reduce<true>(m);
    float s = 0.0f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) s += __expf(to_f32(x[j]) - m);
    *max_out = m;
    *sum_out = block_reduce<false>(s);
}

// loss[r] = log Σ exp(x_r) − x_r[label_r]; NaN when the label is out of range.
template <typename T>
__device__ void ce_fwd(const CeParams p, const T* __restrict__ x, const uint32_t* __restrict__ labels,
                       float* __restrict__ loss) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const T* row = x + (uint64_t)r * p.cols;
    float m, s;
    row_stats(row, p.cols, &m, &s);
    if (threadIdx.x == 0) {
        const uint32_t y = labels[r];
        loss[r] = y < p.cols ? m + logf(s) - to_f32(row[y]) : NAN;
    }
}

// dx[r, j] = (exp(x[r, j] − lse_r) − [j == label_r]) · g[r].
template <typename T>
__device__ void ce_bwd(const CeParams p, const T* __restrict__ x, const uint32_t* __restrict__ labels,
                       const float* __restrict__ g, T* __restrict__ dx) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const T* row = x + (uint64_t)r * p.cols;
    T* out = dx + (uint64_t)r * p.cols;
    float m, s;
    row_stats(row, p.cols, &m, &s);
    const float inv = 1.0f / s, gr = g[r];
    const uint32_t y = labels[r];
    for (uint32_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
        const float prob = __expf(to_f32(row[j]) - m) * inv;
        out[j] = from_f32<T>((prob - (j == y ? 1.0f : 0.0f)) * gr);
    }
}

#define CE_KERNELS(SUFFIX, T)                                                                          \
    extern "C" __global__ void ce_fwd_##SUFFIX(const CeParams p, const T* x, const uint32_t* labels,  \
                                               float* loss) {                                         \
        ce_fwd<T>(p, x, labels, loss);                                                                \
    }                                                                                                 \
    extern "C" __global__ void ce_bwd_##SUFFIX(const CeParams p, const T* x, const uint32_t* labels,  \
                                               const float* g, T* dx) {                               \
        ce_bwd<T>(p, x, labels, g, dx);                                                               \
    }

CE_KERNELS(f32, float)
CE_KERNELS(bf16, __nv_bfloat16)
CE_KERNELS(f16, __half)
