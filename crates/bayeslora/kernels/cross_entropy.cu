// Softmax cross-entropy per row, forward and backward, without materialising log-softmax. One
// block per row, f32 statistics for every input dtype, 16-byte loads where the row allows.
// The forward reads each row once (an online max and Σexp: the running sum is rescaled when the
// max grows) and writes three f32 per row: the loss, the max m and Σexp(x − m) = s. The backward
// reads m and s back instead of recomputing them, so it reads the row once and writes
// dx = (exp(x − m) / s − onehot(label)) · g. Mirrors `ops::cross_entropy::{FusedCrossEntropy,
// CrossEntropyGrad}` (their CPU paths are the reference the GPU tests compare against).
#include "pack.cuh"

// Mirrors `CeParams` in src/ops/cross_entropy.rs.
struct CeParams {
    uint32_t rows;
    uint32_t cols;
};

// (m, s) ← the statistics of the union of (m, s) and (m2, s2): max and Σexp relative to it.
// A NaN anywhere in a row makes its sum NaN (so its loss and gradient), as a two-pass softmax
// does; −inf logits add nothing, and a side with only −inf has m = −inf, s = 0.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float M = fmaxf(m, m2);
    if (M == -INFINITY) {  // both sides empty: their sums are 0, or NaN
        s += s2;
        return;
    }
    s = s * __expf(m - M) + s2 * __expf(m2 - M);
    m = M;
}

// Merges every thread's (m, s) over the block (blockDim.x a multiple of 32, ≤ 1024); every thread
// gets the result. Each warp merges the per-warp partials itself: one barrier. Once per kernel.
__device__ __forceinline__ void block_merge(float& m, float& s) {
    __shared__ float pm[32], ps[32];
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        pm[warp] = m;
        ps[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? pm[lane] : -INFINITY;
    s = lane < warps ? ps[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        merge(m, s, m2, s2);
    }
}

// Whether a row of `cols` elements starting at `row` can be read in 16-byte packs.
template <typename T>
__device__ __forceinline__ bool packed(const T* row, uint32_t cols) {
    return cols % Pack<T>::N == 0 && aligned16(row);
}

// max_j x_j and Σ_j exp(x_j − max) of one row, in one pass.
template <typename T>
__device__ void row_stats(const T* __restrict__ row, uint32_t cols, float& m, float& s) {
    constexpr int N = Pack<T>::N;
    m = -INFINITY;
    s = 0.0f;
    if (packed(row, cols)) {
        for (uint32_t j = threadIdx.x * N; j < cols; j += blockDim.x * N) {
            float v[N];
            load<T, N>(row + j, v);
            float mx = v[0];
#pragma unroll
            for (int i = 1; i < N; ++i) mx = fmaxf(mx, v[i]);
            const float M = fmaxf(m, mx);
            if (M == -INFINITY) {  // every value so far −inf (adds nothing) or NaN (fmaxf skips it)
#pragma unroll
                for (int i = 0; i < N; ++i)
                    if (v[i] != -INFINITY) s = NAN;
                continue;
            }
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < N; ++i) acc += __expf(v[i] - M);
            s = s * __expf(m - M) + acc;
            m = M;
        }
    } else {
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
            const float v = to_f32(row[j]);
            if (v > m) {
                s = s * __expf(m - v) + 1.0f;
                m = v;
            } else if (v != -INFINITY) {
                s += __expf(v - m);  // NaN when v is NaN
            }
        }
    }
    block_merge(m, s);
}

// out[r] = log Σ exp(x_r) − x_r[label_r] (NaN when the label is out of range), out[n + r] = m_r,
// out[2n + r] = s_r.
template <typename T>
__device__ void ce_fwd(const CeParams p, const T* __restrict__ x, const uint32_t* __restrict__ labels,
                       float* __restrict__ out) {
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const T* row = x + (uint64_t)r * p.cols;
    float m, s;
    row_stats(row, p.cols, m, s);
    if (threadIdx.x == 0) {
        const uint32_t y = labels[r];
        out[r] = y < p.cols ? m + logf(s) - to_f32(row[y]) : NAN;
        out[p.rows + r] = m;
        out[2 * p.rows + r] = s;
    }
}

// dx[r, j] = (exp(x[r, j] − m_r) / s_r − [j == label_r]) · g_r, with gms = [g; m; s] (3 × rows).
template <typename T>
__device__ void ce_bwd(const CeParams p, const T* __restrict__ x, const uint32_t* __restrict__ labels,
                       const float* __restrict__ gms, T* __restrict__ dx) {
    constexpr int N = Pack<T>::N;
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const T* row = x + (uint64_t)r * p.cols;
    T* out = dx + (uint64_t)r * p.cols;
    const float gr = gms[r], m = gms[p.rows + r], scale = gr / gms[2 * p.rows + r];
    const uint32_t y = labels[r];
    if (packed(row, p.cols) && aligned16(out)) {
        for (uint32_t j = threadIdx.x * N; j < p.cols; j += blockDim.x * N) {
            float v[N];
            load<T, N>(row + j, v);
#pragma unroll
            for (int i = 0; i < N; ++i) v[i] = __expf(v[i] - m) * scale - (j + i == y ? gr : 0.0f);
            store<T, N>(out + j, v);
        }
    } else {
        for (uint32_t j = threadIdx.x; j < p.cols; j += blockDim.x)
            out[j] = from_f32<T>(__expf(to_f32(row[j]) - m) * scale - (j == y ? gr : 0.0f));
    }
}

#define CE_KERNELS(SUFFIX, T)                                                                          \
    extern "C" __global__ void ce_fwd_##SUFFIX(const CeParams p, const T* x, const uint32_t* labels,  \
                                               float* out) {                                          \
        ce_fwd<T>(p, x, labels, out);                                                                 \
    }                                                                                                 \
    extern "C" __global__ void ce_bwd_##SUFFIX(const CeParams p, const T* x, const uint32_t* labels,  \
                                               const float* gms, T* dx) {                             \
        ce_bwd<T>(p, x, labels, gms, dx);                                                             \
    }

FOR_EACH_FLOAT(CE_KERNELS)
