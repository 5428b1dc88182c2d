// Rows scaled by e times a window of gate samples (see `ops::gate_scale`, whose CPU code is the
// reference): B-LoRA's h (E m), one launch per direction, f32.
//
//   gate_scale_fwd_f32: out[i, c] = h[i, c] (e[c] z[c]), z already the window.
//   gate_scale_bwd_f32: a block per column c: dh[i, c] = g[i, c] (e[c] z[c]) (when want_dh),
//                       des = sum_i g[i, c] h[i, c] (a fixed tree), de[c] = des z[c] (when
//                       want_de), dz[dz_at + c] = des e[c]; block 0 also zeroes dz around the
//                       window, so every value of out is written.
#include "exact.cuh"

#define THREADS 256

// Mirrors `GateScaleParams` in src/ops/gate_scale.rs.
struct GateScaleParams {
    uint32_t n;  // rows of h
    uint32_t r;  // columns
    uint32_t want_dh;
    uint32_t want_de;
    uint32_t dz_len;
    uint32_t dz_at;
};

extern "C" __global__ void gate_scale_fwd_f32(const GateScaleParams p, const float* __restrict__ h,
                                              const float* __restrict__ e, const float* __restrict__ z,
                                              float* __restrict__ out) {
    const size_t total = (size_t)p.n * p.r;
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < total; j += (size_t)blockDim.x * gridDim.x) {
        const uint32_t c = j % p.r;
        out[j] = mul_rn(h[j], mul_rn(e[c], z[c]));
    }
}

extern "C" __global__ void gate_scale_bwd_f32(const GateScaleParams p, const float* __restrict__ h,
                                              const float* __restrict__ g, const float* __restrict__ e,
                                              const float* __restrict__ z, float* __restrict__ out) {
    __shared__ float part[THREADS];
    const uint32_t c = blockIdx.x, t = threadIdx.x;
    const size_t n_dh = p.want_dh ? (size_t)p.n * p.r : 0;
    const size_t n_de = p.want_de ? p.r : 0;
    float* dz = out + n_dh + n_de;
    if (c == 0) {
        for (uint32_t k = t; k < p.dz_len; k += blockDim.x) {
            if (k < p.dz_at || k - p.dz_at >= p.r) dz[k] = 0.0f;
        }
    }
    if (c >= p.r) return;
    const float es = mul_rn(e[c], z[c]);
    float acc = 0.0f;
    for (uint32_t i = t; i < p.n; i += blockDim.x) {
        const size_t j = (size_t)i * p.r + c;
        if (p.want_dh) out[j] = mul_rn(g[j], es);
        acc = add_rn(acc, mul_rn(g[j], h[j]));
    }
    part[t] = acc;
    __syncthreads();
    for (uint32_t s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) part[t] = add_rn(part[t], part[t + s]);
        __syncthreads();
    }
    if (t == 0) {
        const float des = part[0];
        if (p.want_de) out[n_dh + c] = mul_rn(des, z[c]);
        dz[p.dz_at + c] = mul_rn(des, e[c]);
    }
}
