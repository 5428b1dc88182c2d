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
// f32 computes every product with f32 FMAs out of shared memory (register-tiled, 4x4 per thread,
// the kernels just below); bf16 and f16 use the tensor cores (the second half of the file).
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
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
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

// =============================================================================================
// Tensor-core path (bf16, f16): every tile product on mma.sync.m16n8k16 (bf16/f16 inputs, f32
// accumulators), tiles staged in shared memory by cp.async and read into fragments by ldmatrix.
// Scores, softmax statistics, probabilities and dS are f32 in registers; P and dS are rounded to
// the input dtype only as mma operands (as FlashAttention-2 does). Masking, tile skipping and
// the statistics layout are the f32 path's (see the top of this file).
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4): A (16x16, row-major) in
// 4 registers of 2 halves: (row g, cols 2t, 2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..);
// B (16x8, k x n) in 2: (k 2t, 2t+1; n g), (k 2t + 8.., n g); C (16x8 f32): (row g, cols 2t, 2t+1),
// (row g + 8, same cols). So the C tiles of two adjacent 8-column blocks are exactly the A
// fragment of a 16-wide k step, which is how P, Pᵀ, dS and dSᵀ feed the next product straight from
// registers, never through shared memory.
//
// Shared tiles are row-major with a row stride of D + 8 elements: 16 bytes of padding put the 8
// rows of every ldmatrix 8x8 matrix on distinct banks. Each kernel is 4 warps of 16 rows and
// 64 x 64 tiles; its next tile loads while the current one is computed (double buffers, one
// barrier per tile).

#define TC_THREADS 128  // 4 warps x 16 rows, every tensor-core kernel
#define LOG2E 1.4426950408889634f

// --- PTX wrappers (begin) ---
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives
// matrix i: (row lane / 4, cols 2 (lane % 4), +1), or with .trans (rows 2 (lane % 4), +1; col lane / 4).
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(ptr)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void* ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(ptr)));
}

// c += a * b on one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global → shared, asynchronously; zero-filled when `valid` is false (src is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
// 4 bytes global → shared (the row statistics), zero-filled when `valid` is false.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// --- PTX wrappers (end) ---

// Two floats → the 2 x 16-bit operand register (lo = first column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// `rows` rows of D elements (row0.., `total` exist) → dst (row stride LD), by cp.async, zeros past
// the end. All NTH threads call it; the caller commits and waits.
template <typename T, int D, int LD, int NTH>
__device__ __forceinline__ void cp_tile(T* dst, const T* __restrict__ src, int row0, int total, int rows) {
    constexpr int CH = D * (int)sizeof(T) / 16;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < rows * CH; idx += NTH) {
        const int r = idx / CH, c = idx % CH;
        const int g = row0 + r;
        const bool valid = g < total;
        cp_async16(dst + r * LD + c * 8, valid ? src + (size_t)g * D + c * 8 : src, valid);
    }
}

// Additive padding bias of the BK keys at k0: 0 or NEG_BIAS, and -inf past the end (those keys
// take no part in any softmax). Threads < BK write.
__device__ __forceinline__ void key_bias_tc(float* kbias, const float* __restrict__ pad, int k0, int s) {
    const int j = threadIdx.x;
    if (j < BK) kbias[j] = k0 + j >= s ? -INFINITY : (pad[k0 + j] == 0.0f ? NEG_BIAS : 0.0f);
}

// Shared memory of the tensor-core kernels, in bytes (mirrored in src/ops/flash_attention.rs).
// Forward: Q, and K, V double-buffered; key biases double-buffered.
template <typename T, int D>
__host__ __device__ constexpr int tc_fwd_smem() {
    return 5 * BQ * (D + 8) * (int)sizeof(T) + 2 * BK * 4 + 16;
}
// dK/dV: K, V, and Q, dO double-buffered; row statistics double-buffered; key biases.
template <typename T, int D>
__host__ __device__ constexpr int tc_bwd_kv_smem() {
    return 6 * BQ * (D + 8) * (int)sizeof(T) + 2 * 3 * BQ * 4 + BK * 4 + 16;
}
// dQ: Q, dO, and K, V double-buffered; key biases double-buffered.
template <typename T, int D>
__host__ __device__ constexpr int tc_bwd_dq_smem() {
    return 6 * BQ * (D + 8) * (int)sizeof(T) + 2 * BK * 4 + 16;
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (ceil(T / BQ), B * H), 128 threads; block x handles query tile nqt - 1 - x (the
// causally heaviest first). Warp w owns query rows 16w..16w+15 of the tile: Q fragments stay in
// registers; per key tile S = Q Kᵀ (16 x 64 per warp), online softmax in f32, O += P V with P
// taken straight from the S accumulators. K and V tiles are double-buffered: the next tile loads
// by cp.async while the current one is computed.
template <typename T, int D>
__device__ void tc_fwd(const FlashParams p, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const float* __restrict__ pad, T* __restrict__ o,
                       float* __restrict__ stats) {
    constexpr int LD = D + 8;
    constexpr int KS = D / 16;  // k steps over D
    constexpr int ND = D / 8;   // 8-wide output column blocks
    constexpr int CH = D / 8;   // 16-byte chunks per row
    extern __shared__ __align__(16) unsigned char fa_smem[];
    T* Qs = reinterpret_cast<T*>(fa_smem);  // later the output staging
    T* Kb = Qs + BQ * LD;                   // 2 x [BK][LD]
    T* Vb = Kb + 2 * BK * LD;               // 2 x [BK][LD]
    float* kbias = reinterpret_cast<float*>(Vb + 2 * BK * LD);  // 2 x [BK]
    int* fv_slot = reinterpret_cast<int*>(kbias + 2 * BK);

    const int T_ = p.t, S_ = p.s;
    const int nqt = (T_ + BQ - 1) / BQ;
    const int q0 = (nqt - 1 - (int)blockIdx.x) * BQ;
    const int bh = blockIdx.y;
    const int b = bh / p.h, h = bh % p.h;
    const int hk = h / (p.h / p.hkv);
    const T* qb = q + (size_t)bh * T_ * D;
    const T* kb = k + (size_t)(b * p.hkv + hk) * S_ * D;
    const T* vb = v + (size_t)(b * p.hkv + hk) * S_ * D;
    const float* padb = pad + (size_t)b * S_;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    // ldmatrix row/column offsets of this lane: A-style (row-major 16x16: rows +0/+8, cols +0/+8
    // by matrix) and B-style (matrix pairs along n).
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;

    const int fv = first_valid_key(padb, S_, fv_slot);
    cp_tile<T, D, LD, TC_THREADS>(Qs, qb, q0, T_, BQ);
    cp_tile<T, D, LD, TC_THREADS>(Kb, kb, 0, S_, BK);
    cp_tile<T, D, LD, TC_THREADS>(Vb, vb, 0, S_, BK);
    cp_async_commit();
    key_bias_tc(kbias, padb, 0, S_);
    cp_async_wait_all();
    __syncthreads();

    uint32_t qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], Qs + (warp * 16 + a_row) * LD + ks * 16 + a_col);

    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;

    const int row_lo = q0 + warp * 16 + g;  // rows row_lo and row_lo + 8 of this thread
    const int nkt = (S_ + BK - 1) / BK;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BK;
        if (!tile_needed(p, q0, k0, fv)) break;  // causal: later tiles are further in the future
        cp_async_wait_all();
        __syncthreads();  // K_kt, V_kt and their biases are in; every warp is done with the other buffer
        if (kt + 1 < nkt && tile_needed(p, q0, k0 + BK, fv)) {
            const int nb = (kt + 1) & 1;
            cp_tile<T, D, LD, TC_THREADS>(Kb + nb * BK * LD, kb, k0 + BK, S_, BK);
            cp_tile<T, D, LD, TC_THREADS>(Vb + nb * BK * LD, vb, k0 + BK, S_, BK);
            cp_async_commit();
            key_bias_tc(kbias + nb * BK, padb, k0 + BK, S_);
        }
        const T* Ks = Kb + (kt & 1) * BK * LD;
        const T* Vs = Vb + (kt & 1) * BK * LD;
        const float* kbt = kbias + (kt & 1) * BK;

        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t kf[4];
                ldsm_x4(kf, Ks + (np * 16 + b_row) * LD + ks * 16 + b_col);
                mma16816<T>(s[2 * np], qf[ks], kf[0], kf[1]);
                mma16816<T>(s[2 * np + 1], qf[ks], kf[2], kf[3]);
            }
        }

        // score = s * scale + bias (f32), online softmax per row.
        const bool causal_tile = p.causal && k0 + BK - 1 > q0 + warp * 16;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int i = row_lo + hr * 8;
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int jj = n * 8 + t4 * 2 + e;
                    float bias = kbt[jj];
                    if (causal_tile && k0 + jj > i) bias += NEG_BIAS;
                    const float sc = s[n][hr * 2 + e] * p.scale + bias;
                    s[n][hr * 2 + e] = sc;
                    mx = fmaxf(mx, sc);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_r[hr], mx);  // finite: every computed tile has a key < S
            const float alpha = exp2f((m_r[hr] - m_new) * LOG2E);
            float rs = 0.0f;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pr = exp2f((s[n][hr * 2 + e] - m_new) * LOG2E);
                    s[n][hr * 2 + e] = pr;
                    rs += pr;
                }
            l_r[hr] = l_r[hr] * alpha + rs;  // this thread's share; the quad is summed at the end
            m_r[hr] = m_new;
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                acc[n][hr * 2] *= alpha;
                acc[n][hr * 2 + 1] *= alpha;
            }
        }

        // O += P V: the S accumulators of key columns 16kk..16kk+15 are the A fragment.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t pa[4];
            pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                uint32_t vf[4];
                ldsm_x4_t(vf, Vs + (kk * 16 + a_row) * LD + dp * 16 + a_col);
                mma16816<T>(acc[2 * dp], pa, vf[0], vf[1]);
                mma16816<T>(acc[2 * dp + 1], pa, vf[2], vf[3]);
            }
        }
    }

    // Normalise, stage this warp's 16 rows in its own rows of Qs, store 16 bytes per lane.
    T* Os = Qs + warp * 16 * LD;
    const size_t bht = (size_t)p.b * p.h * T_;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float l = l_r[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = 1.0f / l;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            *reinterpret_cast<uint32_t*>(Os + (g + hr * 8) * LD + n * 8 + t4 * 2) =
                pack2<T>(acc[n][hr * 2] * inv, acc[n][hr * 2 + 1] * inv);
        }
        const int i = row_lo + hr * 8;
        if (t4 == 0 && i < T_) {
            stats[(size_t)bh * T_ + i] = m_r[hr];
            stats[bht + (size_t)bh * T_ + i] = logf(l);
        }
    }
    __syncwarp();
#pragma unroll
    for (int idx = lane; idx < 16 * CH; idx += 32) {
        const int r = idx / CH, c = idx % CH;
        const int i = q0 + warp * 16 + r;
        if (i < T_) {
            *reinterpret_cast<uint4*>(o + ((size_t)bh * T_ + i) * D + c * 8) =
                *reinterpret_cast<const uint4*>(Os + r * LD + c * 8);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, in two kernels without atomics (dQ through f32 atomics cost more than all the tile
// products at T = 2048): tc_bwd_kv writes dK and dV, tc_bwd_dq writes dQ; both recompute P from
// the forward's statistics and dS = P ∘ (dP − delta).
//
// dK/dV. Grid (ceil(S / BK), B * Hkv), 128 threads; a block owns one key tile of one kv head and
// walks the (query head of its group, query tile) pairs that the causal predicate keeps, with the
// next pair's Q, dO and row statistics loading (cp.async, double-buffered) while the current one
// is computed. Warp w owns keys 16w..16w+15: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (16 x 64), Pᵀ and dSᵀ in
// f32, then dV += Pᵀ dO and dK += dSᵀ Q with Pᵀ and dSᵀ taken straight from the accumulators
// (the forward's trick), dK and dV accumulated in registers over all pairs.
template <typename T, int D>
__device__ void tc_bwd_kv(const FlashParams p, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const float* __restrict__ pad, const T* __restrict__ dout,
                          const float* __restrict__ stats, const float* __restrict__ delta, T* __restrict__ dk,
                          T* __restrict__ dv) {
    constexpr int LD = D + 8;
    constexpr int KS = D / 16;  // k steps over D
    constexpr int ND = D / 8;   // 8-wide output column blocks
    constexpr int CH = D / 8;   // 16-byte chunks per row
    extern __shared__ __align__(16) unsigned char fa_smem[];
    T* Ks = reinterpret_cast<T*>(fa_smem);  // [BK][LD]; at the end dK staging (own rows per warp)
    T* Vs = Ks + BK * LD;                   // [BK][LD]; at the end dV staging
    T* Qb = Vs + BK * LD;                   // 2 x [BQ][LD]
    T* Gb = Qb + 2 * BQ * LD;               // 2 x [BQ][LD]: dO
    float* rowst = reinterpret_cast<float*>(Gb + 2 * BQ * LD);  // 2 x [3][BQ]: m, log l, delta
    float* kbias = rowst + 2 * 3 * BQ;
    int* fv_slot = reinterpret_cast<int*>(kbias + BK);

    const int T_ = p.t, S_ = p.s;
    const int k0 = blockIdx.x * BK;
    const int bhk = blockIdx.y;
    const int b = bhk / p.hkv, hk = bhk % p.hkv;
    const int group = p.h / p.hkv;
    const float* padb = pad + (size_t)b * S_;
    const size_t bht = (size_t)p.b * p.h * T_;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    const int nqt = (T_ + BQ - 1) / BQ;

    const int fv = first_valid_key(padb, S_, fv_slot);
    cp_tile<T, D, LD, TC_THREADS>(Ks, k + (size_t)bhk * S_ * D, k0, S_, BK);
    cp_tile<T, D, LD, TC_THREADS>(Vs, v + (size_t)bhk * S_ * D, k0, S_, BK);
    key_bias_tc(kbias, padb, k0, S_);

    // The next needed (query head in group, query tile) after (hh, qt); false when none is left.
    auto advance = [&](int& hh, int& qt) -> bool {
        while (true) {
            if (++qt >= nqt) {
                qt = 0;
                if (++hh >= group) return false;
            }
            if (nqt > 0 && tile_needed(p, qt * BQ, k0, fv)) return true;
        }
    };
    // Q, dO and the row statistics of pair (hh, qt) into buffer `buf`, then commit. Rows past T
    // are zeros: S = 0 and dO = 0 there, so they add nothing to dK and dV.
    auto load_pair = [&](int hh, int qt, int buf) {
        const int bh = b * p.h + hk * group + hh, q0 = qt * BQ;
        cp_tile<T, D, LD, TC_THREADS>(Qb + buf * BQ * LD, q + (size_t)bh * T_ * D, q0, T_, BQ);
        cp_tile<T, D, LD, TC_THREADS>(Gb + buf * BQ * LD, dout + (size_t)bh * T_ * D, q0, T_, BQ);
        float* rs = rowst + buf * 3 * BQ;
        for (int r = tid; r < 3 * BQ; r += TC_THREADS) {
            const int which = r / BQ, i = q0 + r % BQ;
            const size_t row = (size_t)bh * T_ + i;
            const float* src = which == 0 ? stats + row : which == 1 ? stats + bht + row : delta + row;
            cp_async4(rs + r, i < T_ ? src : stats, i < T_);
        }
        cp_async_commit();
    };

    float dv_acc[ND][4], dk_acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dv_acc[n][e] = dk_acc[n][e] = 0.0f;

    int hh = 0, qt = -1, buf = 0;
    bool have = advance(hh, qt);
    if (have) load_pair(hh, qt, 0);  // K and V go with its group
    cp_async_commit();
    while (have) {
        cp_async_wait_all();
        __syncthreads();  // this pair's tiles are in `buf`; every warp is done with the other buffer
        const int q0 = qt * BQ;
        const T* Qs = Qb + buf * BQ * LD;
        const T* Gs = Gb + buf * BQ * LD;
        const float* rm = rowst + buf * 3 * BQ;
        const float* rl = rm + BQ;
        const float* rd = rl + BQ;
        have = advance(hh, qt);
        if (have) load_pair(hh, qt, buf ^ 1);
        buf ^= 1;

        // 1. Sᵀ and dPᵀ: this warp's 16 keys x the 64 queries.
        float st[8][4], dpt[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t ka[4];
            ldsm_x4(ka, Ks + (warp * 16 + a_row) * LD + ks * 16 + a_col);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t qf[4];
                ldsm_x4(qf, Qs + (np * 16 + b_row) * LD + ks * 16 + b_col);
                mma16816<T>(st[2 * np], ka, qf[0], qf[1]);
                mma16816<T>(st[2 * np + 1], ka, qf[2], qf[3]);
            }
        }
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t va[4];
            ldsm_x4(va, Vs + (warp * 16 + a_row) * LD + ks * 16 + a_col);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t gf[4];
                ldsm_x4(gf, Gs + (np * 16 + b_row) * LD + ks * 16 + b_col);
                mma16816<T>(dpt[2 * np], va, gf[0], gf[1]);
                mma16816<T>(dpt[2 * np + 1], va, gf[2], gf[3]);
            }
        }
        // 2. Pᵀ and dSᵀ in f32 (key j = row, query i = column; a column's statistics are read
        // where they are used, which keeps them out of the registers).
        const int j_lo = k0 + warp * 16 + g;  // keys j_lo and j_lo + 8 of this thread
        const float kb_r[2] = {kbias[warp * 16 + g], kbias[warp * 16 + g + 8]};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int ii = n * 8 + t4 * 2 + e, i = q0 + ii;
                const float mi = rm[ii], li = rl[ii], di = rd[ii];
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    float bias = kb_r[hr];
                    if (p.causal && j_lo + hr * 8 > i) bias += NEG_BIAS;
                    const float sc = st[n][hr * 2 + e] * p.scale + bias;
                    const float pv = exp2f(((sc - mi) - li) * LOG2E);
                    st[n][hr * 2 + e] = pv;
                    dpt[n][hr * 2 + e] = pv * (dpt[n][hr * 2 + e] - di);
                }
            }
        // 3. dV += Pᵀ dO, dK += dSᵀ Q (A fragments from the accumulators of queries 16kq..).
#pragma unroll
        for (int kq = 0; kq < BQ / 16; ++kq) {
            uint32_t pa[4], sa[4];
            pa[0] = pack2<T>(st[2 * kq][0], st[2 * kq][1]);
            pa[1] = pack2<T>(st[2 * kq][2], st[2 * kq][3]);
            pa[2] = pack2<T>(st[2 * kq + 1][0], st[2 * kq + 1][1]);
            pa[3] = pack2<T>(st[2 * kq + 1][2], st[2 * kq + 1][3]);
            sa[0] = pack2<T>(dpt[2 * kq][0], dpt[2 * kq][1]);
            sa[1] = pack2<T>(dpt[2 * kq][2], dpt[2 * kq][3]);
            sa[2] = pack2<T>(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
            sa[3] = pack2<T>(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                uint32_t gf[4], qf[4];
                ldsm_x4_t(gf, Gs + (kq * 16 + a_row) * LD + dp * 16 + a_col);
                ldsm_x4_t(qf, Qs + (kq * 16 + a_row) * LD + dp * 16 + a_col);
                mma16816<T>(dv_acc[2 * dp], pa, gf[0], gf[1]);
                mma16816<T>(dv_acc[2 * dp + 1], pa, gf[2], gf[3]);
                mma16816<T>(dk_acc[2 * dp], sa, qf[0], qf[1]);
                mma16816<T>(dk_acc[2 * dp + 1], sa, qf[2], qf[3]);
            }
        }
    }

    // dK (· scale) and dV: each warp stages its 16 rows in its own rows of Ks / Vs, 16-byte stores.
    cp_async_wait_all();
    __syncthreads();  // K, V landed even when no pair was needed
    T* Kw = Ks + warp * 16 * LD;
    T* Vw = Vs + warp * 16 * LD;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            const int off = (g + hr * 8) * LD + n * 8 + t4 * 2;
            *reinterpret_cast<uint32_t*>(Kw + off) =
                pack2<T>(dk_acc[n][hr * 2] * p.scale, dk_acc[n][hr * 2 + 1] * p.scale);
            *reinterpret_cast<uint32_t*>(Vw + off) = pack2<T>(dv_acc[n][hr * 2], dv_acc[n][hr * 2 + 1]);
        }
    __syncwarp();
#pragma unroll
    for (int idx = lane; idx < 16 * CH; idx += 32) {
        const int r = idx / CH, c = idx % CH;
        const int j = k0 + warp * 16 + r;
        if (j < S_) {
            const size_t off = ((size_t)bhk * S_ + j) * D + c * 8;
            *reinterpret_cast<uint4*>(dk + off) = *reinterpret_cast<const uint4*>(Kw + r * LD + c * 8);
            *reinterpret_cast<uint4*>(dv + off) = *reinterpret_cast<const uint4*>(Vw + r * LD + c * 8);
        }
    }
}

// dQ. Grid (ceil(T / BQ), B * H), 128 threads, query tiles as in the forward (heaviest first).
// Warp w owns query rows 16w..16w+15 and keeps their statistics in registers; per key tile (K, V
// double-buffered by cp.async): S = Q Kᵀ and dP = dO Vᵀ (16 x 64), dS = P ∘ (dP − delta) in f32,
// dQ += dS K with dS taken straight from the accumulators; dQ · scale written in the dtype.
template <typename T, int D>
__device__ void tc_bwd_dq(const FlashParams p, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const float* __restrict__ pad, const T* __restrict__ dout,
                          const float* __restrict__ stats, const float* __restrict__ delta, T* __restrict__ dq) {
    constexpr int LD = D + 8;
    constexpr int KS = D / 16;
    constexpr int ND = D / 8;
    constexpr int CH = D / 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    T* Qs = reinterpret_cast<T*>(fa_smem);  // [BQ][LD]; at the end dQ staging (own rows per warp)
    T* Gs = Qs + BQ * LD;                   // [BQ][LD]: dO
    T* Kb = Gs + BQ * LD;                   // 2 x [BK][LD]
    T* Vb = Kb + 2 * BK * LD;               // 2 x [BK][LD]
    float* kbias = reinterpret_cast<float*>(Vb + 2 * BK * LD);  // 2 x [BK]
    int* fv_slot = reinterpret_cast<int*>(kbias + 2 * BK);

    const int T_ = p.t, S_ = p.s;
    const int nqt = (T_ + BQ - 1) / BQ;
    const int q0 = (nqt - 1 - (int)blockIdx.x) * BQ;
    const int bh = blockIdx.y;
    const int b = bh / p.h, h = bh % p.h;
    const int hk = h / (p.h / p.hkv);
    const T* kb = k + (size_t)(b * p.hkv + hk) * S_ * D;
    const T* vb = v + (size_t)(b * p.hkv + hk) * S_ * D;
    const float* padb = pad + (size_t)b * S_;
    const size_t bht = (size_t)p.b * p.h * T_;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    (void)tid;

    const int fv = first_valid_key(padb, S_, fv_slot);
    cp_tile<T, D, LD, TC_THREADS>(Qs, q + (size_t)bh * T_ * D, q0, T_, BQ);
    cp_tile<T, D, LD, TC_THREADS>(Gs, dout + (size_t)bh * T_ * D, q0, T_, BQ);
    cp_tile<T, D, LD, TC_THREADS>(Kb, kb, 0, S_, BK);
    cp_tile<T, D, LD, TC_THREADS>(Vb, vb, 0, S_, BK);
    cp_async_commit();
    key_bias_tc(kbias, padb, 0, S_);

    const int row_lo = q0 + warp * 16 + g;  // rows row_lo and row_lo + 8 of this thread
    float m_r[2], l_r[2], d_r[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int i = row_lo + hr * 8;
        const bool in = i < T_;
        const size_t row = (size_t)bh * T_ + i;
        m_r[hr] = in ? stats[row] : INFINITY;  // rows past T: P = 0
        l_r[hr] = in ? stats[bht + row] : 0.0f;
        d_r[hr] = in ? delta[row] : 0.0f;
    }
    float dqa[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dqa[n][e] = 0.0f;

    const int nkt = (S_ + BK - 1) / BK;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BK;
        if (!tile_needed(p, q0, k0, fv)) break;  // causal: later tiles are further in the future
        cp_async_wait_all();
        __syncthreads();  // K_kt, V_kt and their biases are in; every warp is done with the other buffer
        if (kt + 1 < nkt && tile_needed(p, q0, k0 + BK, fv)) {
            const int nb = (kt + 1) & 1;
            cp_tile<T, D, LD, TC_THREADS>(Kb + nb * BK * LD, kb, k0 + BK, S_, BK);
            cp_tile<T, D, LD, TC_THREADS>(Vb + nb * BK * LD, vb, k0 + BK, S_, BK);
            cp_async_commit();
            key_bias_tc(kbias + nb * BK, padb, k0 + BK, S_);
        }
        const T* Ks = Kb + (kt & 1) * BK * LD;
        const T* Vs = Vb + (kt & 1) * BK * LD;
        const float* kbt = kbias + (kt & 1) * BK;

        float s[8][4], dpv[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dpv[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t qa[4], ga[4];
            ldsm_x4(qa, Qs + (warp * 16 + a_row) * LD + ks * 16 + a_col);
            ldsm_x4(ga, Gs + (warp * 16 + a_row) * LD + ks * 16 + a_col);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t kf[4], vf[4];
                ldsm_x4(kf, Ks + (np * 16 + b_row) * LD + ks * 16 + b_col);
                ldsm_x4(vf, Vs + (np * 16 + b_row) * LD + ks * 16 + b_col);
                mma16816<T>(s[2 * np], qa, kf[0], kf[1]);
                mma16816<T>(s[2 * np + 1], qa, kf[2], kf[3]);
                mma16816<T>(dpv[2 * np], ga, vf[0], vf[1]);
                mma16816<T>(dpv[2 * np + 1], ga, vf[2], vf[3]);
            }
        }
        const bool causal_tile = p.causal && k0 + BK - 1 > q0 + warp * 16;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int i = row_lo + hr * 8;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int jj = n * 8 + t4 * 2 + e;
                    float bias = kbt[jj];
                    if (causal_tile && k0 + jj > i) bias += NEG_BIAS;
                    const float sc = s[n][hr * 2 + e] * p.scale + bias;
                    const float pv = exp2f(((sc - m_r[hr]) - l_r[hr]) * LOG2E);
                    s[n][hr * 2 + e] = pv * (dpv[n][hr * 2 + e] - d_r[hr]);
                }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t sa[4];
            sa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            sa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            sa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            sa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                uint32_t kf[4];
                ldsm_x4_t(kf, Ks + (kk * 16 + a_row) * LD + dp * 16 + a_col);
                mma16816<T>(dqa[2 * dp], sa, kf[0], kf[1]);
                mma16816<T>(dqa[2 * dp + 1], sa, kf[2], kf[3]);
            }
        }
    }

    cp_async_wait_all();
    __syncthreads();  // Q rows landed even if no tile ran; nothing reads Qs any more
    T* Os = Qs + warp * 16 * LD;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            *reinterpret_cast<uint32_t*>(Os + (g + hr * 8) * LD + n * 8 + t4 * 2) =
                pack2<T>(dqa[n][hr * 2] * p.scale, dqa[n][hr * 2 + 1] * p.scale);
        }
    __syncwarp();
#pragma unroll
    for (int idx = lane; idx < 16 * CH; idx += 32) {
        const int r = idx / CH, c = idx % CH;
        const int i = q0 + warp * 16 + r;
        if (i < T_) {
            *reinterpret_cast<uint4*>(dq + ((size_t)bh * T_ + i) * D + c * 8) =
                *reinterpret_cast<const uint4*>(Os + r * LD + c * 8);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: flash_fwd_<dtype>_d<D>, flash_bwd_<dtype>_d<D>, flash_bwd_delta_<dtype>, and for
// bf16/f16 flash_bwd_dq_<dtype>_d<D>. f32 runs the FMA kernels above with NT threads
// (flash_bwd_f32 writes dK, dV and accumulates dQ into the zeroed f32 dq_acc). bf16/f16 run the
// tensor-core kernels with TC_THREADS threads and tc_*_smem bytes: flash_bwd writes dK and dV,
// flash_bwd_dq writes dQ.
#define FLASH_ENTRY_F32(D)                                                                             \
    extern "C" __global__ void __launch_bounds__(NT) flash_fwd_f32_d##D(                               \
        const FlashParams p, const float* q, const float* k, const float* v, const float* pad,         \
        float* o, float* stats) {                                                                      \
        flash_fwd<float, D>(p, q, k, v, pad, o, stats);                                                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(NT) flash_bwd_f32_d##D(                               \
        const FlashParams p, const float* q, const float* k, const float* v, const float* pad,         \
        const float* dout, const float* stats, const float* delta, float* dq_acc, float* dk,           \
        float* dv) {                                                                                   \
        flash_bwd<float, D>(p, q, k, v, pad, dout, stats, delta, dq_acc, dk, dv);                      \
    }

#define FLASH_ENTRY_TC(SUFFIX, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) flash_fwd_##SUFFIX##_d##D(                \
        const FlashParams p, const T* q, const T* k, const T* v, const float* pad, T* o,               \
        float* stats) {                                                                                \
        tc_fwd<T, D>(p, q, k, v, pad, o, stats);                                                       \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) flash_bwd_##SUFFIX##_d##D(             \
        const FlashParams p, const T* q, const T* k, const T* v, const float* pad, const T* dout,      \
        const float* stats, const float* delta, T* dk, T* dv) {                                        \
        tc_bwd_kv<T, D>(p, q, k, v, pad, dout, stats, delta, dk, dv);                                  \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) flash_bwd_dq_##SUFFIX##_d##D(          \
        const FlashParams p, const T* q, const T* k, const T* v, const float* pad, const T* dout,      \
        const float* stats, const float* delta, T* dq) {                                               \
        tc_bwd_dq<T, D>(p, q, k, v, pad, dout, stats, delta, dq);                                      \
    }

#define FLASH_HELPERS(SUFFIX, T)                                                                       \
    extern "C" __global__ void flash_bwd_delta_##SUFFIX(uint32_t rows, uint32_t d, const T* o,        \
                                                        const T* dout, float* delta) {                 \
        flash_bwd_delta<T>(rows, d, o, dout, delta);                                                   \
    }

FLASH_ENTRY_F32(32)
FLASH_ENTRY_F32(64)
FLASH_ENTRY_F32(128)
FLASH_HELPERS(f32, float)
FLASH_ENTRY_TC(bf16, __nv_bfloat16, 32)
FLASH_ENTRY_TC(bf16, __nv_bfloat16, 64)
FLASH_ENTRY_TC(bf16, __nv_bfloat16, 128)
FLASH_HELPERS(bf16, __nv_bfloat16)
FLASH_ENTRY_TC(f16, __half, 32)
FLASH_ENTRY_TC(f16, __half, 64)
FLASH_ENTRY_TC(f16, __half, 128)
FLASH_HELPERS(f16, __half)
