// x times a window of gate samples (see `ops::gate_scale`, whose CPU code is the reference):
// B-LoRA's E times the rank multiplier, a handful of values, one launch per direction, f32.
//
//   gate_scale_fwd_f32: out[i] = x[i] z[offset + i], i < n.
//   gate_scale_bwd_f32: out = [g z (n values, when want_dx), dz], dz zero but for
//                       dz[dz_at + i] = g[i] x[i]; every one of the out_len values written.
#include "exact.cuh"

// Mirrors `GateScaleParams` in src/ops/gate_scale.rs.
struct GateScaleParams {
    uint32_t n;
    uint32_t offset;
    uint32_t want_dx;
    uint32_t dz_at;
    uint32_t out_len;
};

extern "C" __global__ void gate_scale_fwd_f32(const GateScaleParams p, const float* __restrict__ x,
                                              const float* __restrict__ z, float* __restrict__ out) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += blockDim.x * gridDim.x) {
        out[i] = mul_rn(x[i], z[p.offset + i]);
    }
}

extern "C" __global__ void gate_scale_bwd_f32(const GateScaleParams p, const float* __restrict__ x,
                                              const float* __restrict__ z, const float* __restrict__ g,
                                              float* __restrict__ out) {
    const uint32_t n_dx = p.want_dx ? p.n : 0;
    for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < p.out_len; j += blockDim.x * gridDim.x) {
        float v = 0.0f;
        if (j < n_dx) {
            v = mul_rn(g[j], z[p.offset + j]);
        } else if (j - n_dx >= p.dz_at && j - n_dx - p.dz_at < p.n) {
            const uint32_t i = j - n_dx - p.dz_at;
            v = mul_rn(g[i], x[i]);
        }
        out[j] = v;
    }
}
