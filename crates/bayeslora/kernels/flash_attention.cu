// Memory-efficient attention (FlashAttention-2, Dao 2023): forward and backward without ever
// materialising the [T, S] score matrix. Called from src/ops/flash_attention.rs.
//
// Layouts (all contiguous): q, o, do, dq: [B, H, T, D]; k, v, dk, dv: [B, Hkv, S, D];
// pad: [B, S] f32, 1 = real key, 0 = padding; stats: [2, B, H, T] f32 (row max m, then log l,
// with l = sum_j exp(score_ij - m)). Query head h reads kv head h / (H / Hkv) (HF repeat_kv).
//
// Scores follow ops::attention's plain path exactly: score = (q.k) * scale + bias, in f32, where
// bias = -1e9 for a padded key plus -1e9 for a future key (j > i when causal). A row whose every
// key carries a bias (a padding query under left padding) is then, as in the plain path, a
// softmax over the keys with the smallest bias.
//
// Causal tile skipping: the pair (query tile, key tile) is skipped when every key of the tile lies
// in the future of every query of the tile, unless the query tile holds a "dead" row i, one with
// no visible key j <= i (i < first real key of the batch row). Why that is exact: a live row i
// has a key j <= i with bias 0, so its max is >= q_i.k_j*scale, and every skipped key scores
// <= q.k*scale - 1e9, whose exp(score - max) underflows to exactly 0 in f32 — skipping changes
// nothing. A dead row (left padding: all keys j <= i are padding) has max ~ -1e9, which the valid
// *future* keys also reach (-1e9 causal + 0 padding), so it needs them: its tiles are not skipped.
// The backward uses the same predicate.
//
// The backward stores m and log l separately (not m + log l): for a dead row m ~ -1e9, where f32
// cannot hold m + log l (ulp 64), but score - m is exact.
//
// This first version computes all GEMMs with f32 FMAs out of shared memory (register-tiled,
// 4x4 per thread), for every dtype.
#include "dtype.cuh"

// Mirrors `FlashParams` in src/ops/flash_attention.rs.
struct FlashParams {
    uint32_t b, h, hkv, t, s;
    uint32_t causal;
    float scale;
    uint32_t pad_;
};

#define BQ 64
#define BK 64
#define NT 256
#define NEG_BIAS (-1e9f)

// rows x D of src (rows row0.., `total` rows exist) → dst (f32, row stride D + 1); zeros past the end.
template <typename T, int D>
__device__ __forceinline__ void load_tile(float* dst, const T* __restrict__ src, int row0, int total, int rows) {
    for (int idx = threadIdx.x; idx < rows * D; idx += NT) {
        const int r = idx / D, c = idx % D;
        const int g = row0 + r;
        dst[r * (D + 1) + c] = g < total ? to_f32(src[(size_t)g * D + c]) : 0.0f;
    }
}

// The first real key of a batch row (S when there is none). All threads must call it.
__device__ __forceinline__ int first_valid_key(const float* __restrict__ pad, int s, int* slot) {
    if (threadIdx.x == 0) *slot = s;
    __syncthreads();
    for (int j = threadIdx.x; j < s; j += NT) {
        if (pad[j] != 0.0f) {
            atomicMin(slot, j);
            break;  // later j of this thread are larger
        }
    }
    __syncthreads();
    return *slot;
}

// Whether the pair (query tile at q0, key tile at k0) must be computed.
__device__ __forceinline__ bool tile_needed(const FlashParams& p, int q0, int k0, int first_valid) {
    if (!p.causal || q0 < first_valid) return true;
    const int last_q = min(q0 + BQ, (int)p.t) - 1;
    return k0 <= last_q;
}

// Additive padding bias of the BK keys at k0 (0 past the end; those keys are excluded anyway).
__device__ __forceinline__ void load_key_bias(float* kbias, const float* __restrict__ pad, int k0, int s) {
    for (int j = threadIdx.x; j < BK; j += NT) {
        kbias[j] = (k0 + j < s && pad[k0 + j] == 0.0f) ? NEG_BIAS : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (ceil(T / BQ), B * H), NT threads. Thread (ty, tx) = (tid / 16, tid % 16) owns
// query rows ty*4 + r (r < 4) and, for scores, keys tx + 16c (c < 4); for the output, columns
// tx + 16c (c < D / 16).
template <typename T, int D>
__device__ void flash_fwd(const FlashParams p, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const float* __restrict__ pad, T* __restrict__ o,
                          float* __restrict__ stats) {
    constexpr int DP = D + 1;
    constexpr int DC = D / 16;
    constexpr int PP = BK + 1;
    extern __shared__ float smem[];
    float* Qs = smem;
    float* Ks = Qs + BQ * DP;
    float* Vs = Ks + BK * DP;
    float* Ps = Vs + BK * DP;
    float* kbias = Ps + BQ * PP;
    __shared__ int fv_slot;

    const int T_ = p.t, S_ = p.s;
    const int q0 = blockIdx.x * BQ;
    const int bh = blockIdx.y;
    const int b = bh / p.h, h = bh % p.h;
    const int hk = h / (p.h / p.hkv);
    const T* qb = q + (size_t)bh * T_ * D;
    const T* kb = k + (size_t)(b * p.hkv + hk) * S_ * D;
    const T* vb = v + (size_t)(b * p.hkv + hk) * S_ * D;
    const float* padb = pad + (size_t)b * S_;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;

    const int fv = first_valid_key(padb, S_, &fv_slot);
    load_tile<T, D>(Qs, qb, q0, T_, BQ);

    float m[4], l[4], acc[4][DC];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[r][c] = 0.0f;
    }

    const int nkt = (S_ + BK - 1) / BK;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BK;
        if (!tile_needed(p, q0, k0, fv)) break;  // causal: later tiles are further in the future
        __syncthreads();  // the previous tile's Ks, Vs, Ps are consumed
        load_tile<T, D>(Ks, kb, k0, S_, BK);
        load_tile<T, D>(Vs, vb, k0, S_, BK);
        load_key_bias(kbias, padb, k0, S_);
        __syncthreads();

        float s[4][4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
            float a[4], bb[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = Qs[(ty * 4 + r) * DP + d];
#pragma unroll
            for (int c = 0; c < 4; ++c) bb[c] = Ks[(tx + 16 * c) * DP + d];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[r][c] = fmaf(a[r], bb[c], s[r][c]);
        }

#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = q0 + ty * 4 + r;
            float mt = -INFINITY;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int jj = tx + 16 * c, j = k0 + jj;
                if (j >= S_) {
                    s[r][c] = -INFINITY;
                } else {
                    float bias = kbias[jj];
                    if (p.causal && j > i) bias += NEG_BIAS;
                    s[r][c] = s[r][c] * p.scale + bias;
                }
                mt = fmaxf(mt, s[r][c]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
            const float m_new = fmaxf(m[r], mt);  // finite: every computed tile has a key < S
            const float alpha = expf(m[r] - m_new);
            float rs = 0.0f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float pr = expf(s[r][c] - m_new);
                rs += pr;
                Ps[(ty * 4 + r) * PP + tx + 16 * c] = pr;
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) rs += __shfl_xor_sync(0xffffffffu, rs, off);
            l[r] = l[r] * alpha + rs;
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < DC; ++c) acc[r][c] *= alpha;
        }
        __syncthreads();

#pragma unroll 4
        for (int j = 0; j < BK; ++j) {
            float pr[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) pr[r] = Ps[(ty * 4 + r) * PP + j];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const float vv = Vs[j * DP + tx + 16 * c];
#pragma unroll
                for (int r = 0; r < 4; ++r) acc[r][c] = fmaf(pr[r], vv, acc[r][c]);
            }
        }
    }

    const size_t bht = (size_t)p.b * p.h * T_;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int i = q0 + ty * 4 + r;
        if (i >= T_) continue;
        const float inv = 1.0f / l[r];
        T* orow = o + ((size_t)bh * T_ + i) * D;
#pragma unroll
        for (int c = 0; c < DC; ++c) orow[tx + 16 * c] = from_f32<T>(acc[r][c] * inv);
        if (tx == 0) {
            stats[(size_t)bh * T_ + i] = m[r];
            stats[bht + (size_t)bh * T_ + i] = logf(l[r]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward preprocessing: delta[bh, i] = sum_d dO[bh, i, d] * O[bh, i, d] (f32). One warp per row.
template <typename T>
__device__ void flash_bwd_delta(uint32_t rows, uint32_t d, const T* __restrict__ o,
                                const T* __restrict__ dout, float* __restrict__ delta) {
    const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= rows) return;
    const T* orow = o + (size_t)warp * d;
    const T* grow = dout + (size_t)warp * d;
    float acc = 0.0f;
    for (uint32_t c = lane; c < d; c += 32) acc = fmaf(to_f32(orow[c]), to_f32(grow[c]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[warp] = acc;
}

// f32 accumulator → dtype.
template <typename T>
__device__ void flash_convert(uint64_t n, const float* __restrict__ src, T* __restrict__ dst) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)blockDim.x * gridDim.x) {
        dst[i] = from_f32<T>(src[i]);
    }
}

// Backward. Grid (ceil(S / BK), B * Hkv), NT threads. A block owns one key tile of one kv head and
// loops over the H / Hkv query heads sharing it and over their query tiles, accumulating dK and dV
// in registers (no atomics, K/V never repeated); dQ goes to an f32 buffer by atomicAdd.
// Thread (ty, tx): for P/dS, query rows ty*4 + r and keys tx + 16c (c < 4); for dK/dV, key rows
// ty*4 + r and columns tx + 16c (c < D / 16); for dQ, query rows ty*4 + r, columns tx + 16c.
template <typename T, int D>
__device__ void flash_bwd(const FlashParams p, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const float* __restrict__ pad, const T* __restrict__ dout,
                          const float* __restrict__ stats, const float* __restrict__ delta,
                          float* __restrict__ dq_acc, T* __restrict__ dk, T* __restrict__ dv) {
    constexpr int DP = D + 1;
    constexpr int DC = D / 16;
    constexpr int PP = BK + 1;
    extern __shared__ float smem[];
    float* Ks = smem;
    float* Vs = Ks + BK * DP;
    float* Qs = Vs + BK * DP;
    float* dOs = Qs + BQ * DP;
    float* Ps = dOs + BQ * DP;
    float* dSs = Ps + BQ * PP;
    float* kbias = dSs + BQ * PP;
    float* rowm = kbias + BK;
    float* rowl = rowm + BQ;
    float* rowd = rowl + BQ;
    __shared__ int fv_slot;

    const int T_ = p.t, S_ = p.s;
    const int k0 = blockIdx.x * BK;
    const int bhk = blockIdx.y;
    const int b = bhk / p.hkv, hk = bhk % p.hkv;
    const int group = p.h / p.hkv;
    const T* kb = k + (size_t)bhk * S_ * D;
    const T* vb = v + (size_t)bhk * S_ * D;
    const float* padb = pad + (size_t)b * S_;
    const size_t bht = (size_t)p.b * p.h * T_;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;

    const int fv = first_valid_key(padb, S_, &fv_slot);
    load_tile<T, D>(Ks, kb, k0, S_, BK);
    load_tile<T, D>(Vs, vb, k0, S_, BK);
    load_key_bias(kbias, padb, k0, S_);

    float dk_acc[4][DC], dv_acc[4][DC];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < DC; ++c) dk_acc[r][c] = dv_acc[r][c] = 0.0f;

    const int nqt = (T_ + BQ - 1) / BQ;
    for (int hh = 0; hh < group; ++hh) {
        const int bh = b * p.h + hk * group + hh;
        const T* qb = q + (size_t)bh * T_ * D;
        const T* gb = dout + (size_t)bh * T_ * D;
        for (int qt = 0; qt < nqt; ++qt) {
            const int q0 = qt * BQ;
            if (!tile_needed(p, q0, k0, fv)) continue;
            __syncthreads();  // the previous tile's Qs, dOs, Ps, dSs are consumed
            load_tile<T, D>(Qs, qb, q0, T_, BQ);
            load_tile<T, D>(dOs, gb, q0, T_, BQ);
            for (int r = tid; r < BQ; r += NT) {
                const int i = q0 + r;
                rowm[r] = i < T_ ? stats[(size_t)bh * T_ + i] : 0.0f;
                rowl[r] = i < T_ ? stats[bht + (size_t)bh * T_ + i] : 0.0f;
                rowd[r] = i < T_ ? delta[(size_t)bh * T_ + i] : 0.0f;
            }
            __syncthreads();

            float s[4][4], dp[4][4];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[r][c] = dp[r][c] = 0.0f;
#pragma unroll 4
            for (int d = 0; d < D; ++d) {
                float a[4], g[4], kk[4], vv[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    a[r] = Qs[(ty * 4 + r) * DP + d];
                    g[r] = dOs[(ty * 4 + r) * DP + d];
                }
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    kk[c] = Ks[(tx + 16 * c) * DP + d];
                    vv[c] = Vs[(tx + 16 * c) * DP + d];
                }
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        s[r][c] = fmaf(a[r], kk[c], s[r][c]);
                        dp[r][c] = fmaf(g[r], vv[c], dp[r][c]);
                    }
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int ii = ty * 4 + r, i = q0 + ii;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int jj = tx + 16 * c, j = k0 + jj;
                    float pr = 0.0f;
                    if (i < T_ && j < S_) {
                        float bias = kbias[jj];
                        if (p.causal && j > i) bias += NEG_BIAS;
                        pr = expf((s[r][c] * p.scale + bias - rowm[ii]) - rowl[ii]);
                    }
                    Ps[ii * PP + jj] = pr;
                    dSs[ii * PP + jj] = pr * (dp[r][c] - rowd[ii]);
                }
            }
            __syncthreads();

            // dV += P^T dO, dK += dS^T Q (scale applied at the end).
#pragma unroll 2
            for (int i = 0; i < BQ; ++i) {
                float pr[4], ds[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    pr[r] = Ps[i * PP + ty * 4 + r];
                    ds[r] = dSs[i * PP + ty * 4 + r];
                }
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    const float g = dOs[i * DP + tx + 16 * c];
                    const float a = Qs[i * DP + tx + 16 * c];
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        dv_acc[r][c] = fmaf(pr[r], g, dv_acc[r][c]);
                        dk_acc[r][c] = fmaf(ds[r], a, dk_acc[r][c]);
                    }
                }
            }
            // dQ += dS K * scale.
            float dq[4][DC];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < DC; ++c) dq[r][c] = 0.0f;
#pragma unroll 2
            for (int j = 0; j < BK; ++j) {
                float ds[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) ds[r] = dSs[(ty * 4 + r) * PP + j];
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    const float kk = Ks[j * DP + tx + 16 * c];
#pragma unroll
                    for (int r = 0; r < 4; ++r) dq[r][c] = fmaf(ds[r], kk, dq[r][c]);
                }
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int i = q0 + ty * 4 + r;
                if (i >= T_) continue;
                float* dst = dq_acc + ((size_t)bh * T_ + i) * D;
#pragma unroll
                for (int c = 0; c < DC; ++c) atomicAdd(dst + tx + 16 * c, dq[r][c] * p.scale);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int j = k0 + ty * 4 + r;
        if (j >= S_) continue;
        T* dkrow = dk + ((size_t)bhk * S_ + j) * D;
        T* dvrow = dv + ((size_t)bhk * S_ + j) * D;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            dkrow[tx + 16 * c] = from_f32<T>(dk_acc[r][c] * p.scale);
            dvrow[tx + 16 * c] = from_f32<T>(dv_acc[r][c]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: flash_fwd_<dtype>_d<D>, flash_bwd_<dtype>_d<D>, flash_bwd_delta_<dtype>,
// flash_convert_<dtype>.
#define FLASH_ENTRY(SUFFIX, T, D)                                                                      \
    extern "C" __global__ void __launch_bounds__(NT) flash_fwd_##SUFFIX##_d##D(                        \
        const FlashParams p, const T* q, const T* k, const T* v, const float* pad, T* o,               \
        float* stats) {                                                                                \
        flash_fwd<T, D>(p, q, k, v, pad, o, stats);                                                    \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(NT) flash_bwd_##SUFFIX##_d##D(                        \
        const FlashParams p, const T* q, const T* k, const T* v, const float* pad, const T* dout,      \
        const float* stats, const float* delta, float* dq_acc, T* dk, T* dv) {                         \
        flash_bwd<T, D>(p, q, k, v, pad, dout, stats, delta, dq_acc, dk, dv);                          \
    }

#define FLASH_DTYPE(SUFFIX, T)                                                                         \
    FLASH_ENTRY(SUFFIX, T, 32)                                                                         \
    FLASH_ENTRY(SUFFIX, T, 64)                                                                         \
    FLASH_ENTRY(SUFFIX, T, 128)                                                                        \
    extern "C" __global__ void flash_bwd_delta_##SUFFIX(uint32_t rows, uint32_t d, const T* o,        \
                                                        const T* dout, float* delta) {                 \
        flash_bwd_delta<T>(rows, d, o, dout, delta);                                                   \
    }                                                                                                  \
    extern "C" __global__ void flash_convert_##SUFFIX(uint64_t n, const float* src, T* dst) {         \
        flash_convert<T>(n, src, dst);                                                                 \
    }

FLASH_DTYPE(f32, float)
FLASH_DTYPE(bf16, __nv_bfloat16)
FLASH_DTYPE(f16, __half)
