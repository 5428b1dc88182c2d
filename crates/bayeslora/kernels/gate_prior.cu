// B-LoRA's gate prior over a bank of gate logits (see `ops::gate_prior`, whose CPU code is the
// reference): a thread per layer, one launch per direction.
//
//   gate_prior_fwd_f32: each layer's expected BOPs (cost 0) or expected open gates (cost 1), [L].
//   gate_prior_bwd_f32: the bank's gradient for the upstream gradient [L] (the caller zeroes it;
//                       each thread writes the gates of its layer).
//
// Every multiply and add is rounded on its own (exact.cuh) in the CPU path's order; tanh is tanhf.
#include "exact.cuh"

#define PRIOR_COLUMNS 8
#define META (1 + PRIOR_COLUMNS)
#define COEF 6
#define NONE 0xffffffffu
// Columns (B-LoRA's Slot order).
#define X 0
#define W0 1
#define A 2
#define E 3
#define B 4
#define ACT_A 5
#define ACT_E 6

// Mirrors `GatePriorParams` in src/ops/gate_prior.rs.
struct GatePriorParams {
    uint32_t layers;
    uint32_t rank_len;
    uint32_t cost;  // 0: bops, 1: const
    float logit_shift;
    float hard_off;
    float full_bits;
};

__constant__ float ADDED[4] = {2.0f, 4.0f, 8.0f, 16.0f};

// P(open) = (1 + tanh((a + shift)/2))/2 as the composed affines; t = the tanh.
__device__ __forceinline__ float gp_prob(float a, float shift, float& t) {
    const float x = add_rn(mul_rn(a, 1.0f), shift);
    t = tanhf(add_rn(mul_rn(x, 0.5f), 0.0f));
    return add_rn(mul_rn(t, 0.5f), 0.5f);
}

// d a for the upstream gradient g of P(open), t its tanh.
__device__ __forceinline__ float gp_prob_grad(float g, float t) {
    const float dt = add_rn(mul_rn(g, 0.5f), 0.0f);
    const float du = -mul_rn(dt, add_rn(mul_rn(mul_rn(t, t), 1.0f), -1.0f));
    return add_rn(mul_rn(add_rn(mul_rn(du, 0.5f), 0.0f), 1.0f), 0.0f);
}

// One quantizer's nested bit gates at la[0..4]: P_i (hard-off masked), c_i, tanh t_i, mask m_i.
__device__ __forceinline__ void gp_bits(const GatePriorParams& p, const float* la, float* P, float* c, float* t,
                                        float* m) {
    float mask = 1.0f;
    for (int i = 0; i < 4; ++i) {
        const float q = gp_prob(la[i], p.logit_shift, t[i]);
        const float open = la[i] > p.hard_off ? 1.0f : 0.0f;
        mask = i == 0 ? open : mul_rn(mask, open);
        m[i] = mask;
        P[i] = mul_rn(q, mask);
        c[i] = i == 0 ? P[i] : mul_rn(c[i - 1], P[i]);
    }
}

// E[open] of the rank gates la[0..n] (sum of the nested products, in order from 0).
__device__ __forceinline__ float gp_rank_open(const GatePriorParams& p, const float* la, uint32_t n) {
    float acc = 1.0f, sum = 0.0f, t;
    for (uint32_t i = 0; i < n; ++i) {
        const float q = gp_prob(la[i], p.logit_shift, t);
        acc = i == 0 ? q : mul_rn(acc, q);
        sum = add_rn(sum, acc);
    }
    return sum;
}

// E[bits] (bops) or E[open] (const) of a column's quantizer from its c_i.
__device__ __forceinline__ float gp_col_value(const GatePriorParams& p, const float* c) {
    float s = 0.0f;
    for (int i = 0; i < 4; ++i) s = add_rn(s, p.cost == 0 ? mul_rn(c[i], ADDED[i]) : c[i]);
    return p.cost == 0 ? add_rn(mul_rn(s, 1.0f), 2.0f) : s;
}

// A layer's column values b[8] (32 bits / 0 where no quantizer) and its rank term.
__device__ void gp_values(const GatePriorParams& p, const float* bank, const uint32_t* meta, const float* coef,
                          float* b, float& rank_value, float& rank_open) {
    for (int k = 0; k < PRIOR_COLUMNS; ++k) {
        const uint32_t at = meta[1 + k];
        if (at == NONE) {
            b[k] = p.cost == 0 ? p.full_bits : 0.0f;
        } else {
            float P[4], c[4], t[4], m[4];
            gp_bits(p, bank + at, P, c, t, m);
            b[k] = gp_col_value(p, c);
        }
    }
    const bool has_rank = meta[0] != NONE && p.rank_len > 0;
    rank_open = has_rank ? gp_rank_open(p, bank + meta[0], p.rank_len) : 0.0f;
    if (p.cost == 0) {
        rank_value = has_rank ? add_rn(mul_rn(rank_open, 1.0f), 1.0f) : coef[3];
    } else {
        rank_value = rank_open;
    }
}

__device__ __forceinline__ float gp_per_rank(const float* b, const float* coef) {
    return add_rn(add_rn(mul_rn(mul_rn(b[X], b[A]), coef[0]), mul_rn(b[ACT_A], b[E])),
                  mul_rn(mul_rn(b[ACT_E], b[B]), coef[1]));
}

extern "C" __global__ void gate_prior_fwd_f32(const GatePriorParams p, const float* __restrict__ bank,
                                              const uint32_t* __restrict__ meta_all,
                                              const float* __restrict__ coef_all, float* __restrict__ out) {
    for (uint32_t l = blockIdx.x * blockDim.x + threadIdx.x; l < p.layers; l += blockDim.x * gridDim.x) {
        const uint32_t* meta = meta_all + (size_t)l * META;
        const float* coef = coef_all + (size_t)l * COEF;
        float b[PRIOR_COLUMNS], rank_value, rank_open;
        gp_values(p, bank, meta, coef, b, rank_value, rank_open);
        if (p.cost == 0) {
            const float total =
                add_rn(mul_rn(rank_value, gp_per_rank(b, coef)), mul_rn(mul_rn(b[X], b[W0]), coef[2]));
            out[l] = mul_rn(total, coef[4]);
        } else {
            float s = add_rn(0.0f, rank_open);
            for (int k = 0; k < PRIOR_COLUMNS; ++k) {
                if (meta[1 + k] != NONE) s = add_rn(s, b[k]);
            }
            out[l] = mul_rn(s, coef[5]);
        }
    }
}

// Writes d la[0..n] of nested gates for the upstream gradient dc_i = dc (rank, const) or
// dc_i = dv * ADDED[i] (bits under bops): G_i = dc_i + G_{i+1} P_{i+1}, dP_i = G_i c_{i-1}.
__device__ void gp_nested_grad(const GatePriorParams& p, const float* la, uint32_t n, bool bits, float dv,
                               float* __restrict__ d) {
    // c_{i-1} and P_{i+1} recomputed from the front for each i: n is a handful (4, r − 1).
    float big_g = 0.0f, p_next = 0.0f;
    for (uint32_t k = n; k-- > 0;) {
        float acc = 1.0f, mask = 1.0f, c_prev = 1.0f, pk = 0.0f, tk = 0.0f, mk = 1.0f;
        for (uint32_t i = 0; i <= k; ++i) {
            float t;
            const float q = gp_prob(la[i], p.logit_shift, t);
            float pi = q;
            if (bits) {
                const float open = la[i] > p.hard_off ? 1.0f : 0.0f;
                mask = i == 0 ? open : mul_rn(mask, open);
                pi = mul_rn(q, mask);
            }
            if (i == k) {
                c_prev = acc;
                pk = pi;
                tk = t;
                mk = mask;
            }
            acc = i == 0 ? pi : mul_rn(acc, pi);
        }
        const float dc = bits && p.cost == 0 ? mul_rn(add_rn(mul_rn(dv, 1.0f), 0.0f), ADDED[k]) : dv;
        big_g = k + 1 == n ? dc : add_rn(dc, mul_rn(big_g, p_next));
        const float dp = k == 0 ? big_g : mul_rn(big_g, c_prev);
        const float dq = bits ? mul_rn(dp, mk) : dp;
        d[k] = add_rn(0.0f, gp_prob_grad(dq, tk));
        p_next = pk;
    }
}

extern "C" __global__ void gate_prior_bwd_f32(const GatePriorParams p, const float* __restrict__ bank,
                                              const uint32_t* __restrict__ meta_all,
                                              const float* __restrict__ coef_all, const float* __restrict__ g,
                                              float* __restrict__ dbank) {
    for (uint32_t l = blockIdx.x * blockDim.x + threadIdx.x; l < p.layers; l += blockDim.x * gridDim.x) {
        const uint32_t* meta = meta_all + (size_t)l * META;
        const float* coef = coef_all + (size_t)l * COEF;
        float b[PRIOR_COLUMNS], rank_value, rank_open;
        gp_values(p, bank, meta, coef, b, rank_value, rank_open);
        float d_rank, d_col[PRIOR_COLUMNS];
        if (p.cost == 0) {
            const float d_total = mul_rn(g[l], coef[4]);
            const float d_per = mul_rn(d_total, rank_value);
            const float d_xw = mul_rn(d_total, coef[2]);
            const float d_xa = mul_rn(d_per, coef[0]);
            const float d_eb = mul_rn(d_per, coef[1]);
            d_rank = add_rn(mul_rn(mul_rn(d_total, gp_per_rank(b, coef)), 1.0f), 0.0f);
            for (int k = 0; k < PRIOR_COLUMNS; ++k) d_col[k] = 0.0f;
            d_col[X] = add_rn(mul_rn(d_xa, b[A]), mul_rn(d_xw, b[W0]));
            d_col[W0] = mul_rn(d_xw, b[X]);
            d_col[A] = mul_rn(d_xa, b[X]);
            d_col[ACT_A] = mul_rn(d_per, b[E]);
            d_col[E] = mul_rn(d_per, b[ACT_A]);
            d_col[ACT_E] = mul_rn(d_eb, b[B]);
            d_col[B] = mul_rn(d_eb, b[ACT_E]);
        } else {
            const float ds = mul_rn(g[l], coef[5]);
            d_rank = add_rn(0.0f, ds);
            for (int k = 0; k < PRIOR_COLUMNS; ++k) d_col[k] = ds;
        }
        if (meta[0] != NONE && p.rank_len > 0) {
            gp_nested_grad(p, bank + meta[0], p.rank_len, false, d_rank, dbank + meta[0]);
        }
        for (int k = 0; k < PRIOR_COLUMNS; ++k) {
            const uint32_t at = meta[1 + k];
            if (at != NONE) gp_nested_grad(p, bank + at, 4, true, add_rn(0.0f, d_col[k]), dbank + at);
        }
    }
}
