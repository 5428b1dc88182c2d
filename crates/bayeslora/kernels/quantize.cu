// B-LoRA's training quantizer: the Bayesian Bits gated residual sum and its running range (see
// `ops::quantize`, whose CPU code is the reference these kernels equal to the bit):
//
//   quantize_fwd:       q = x2 + z4(e4 + z8(e8 + z16(e16 + z32 e32))) of clip(x), one pass;
//   quantize_bwd_fused: dx = g * dclip/dx (straight through the rounding) and, per block, the
//                       f64 partial sums of dL/dz_b = sum g * dq/dz_b; the last block to finish
//                       adds the partials in a fixed tree (`quantize_dz`): deterministic, and
//                       the same floats as a second one-block launch, in one launch;
//   range_fused:        per-block min/max of x (NaN marks a block that saw a non-finite value),
//                       then the last block: the running range widened by x's extremes and the
//                       grid's parameters (`range_update`; PARAMS floats, the layout of
//                       `ops::quantize::PARAMS`), in one launch;
//   ranges_fused:       range_fused of up to MAX_RANGES tensors in one launch: grid row y is
//                       tensor y's (its own partials, counter and output row).
//
// "The last block": each block's thread 0 writes its partials, fences, and takes a ticket from a
// counter; the block that draws gridDim.x - 1 sees every partial, finishes, and resets the
// counter for the next launch (launches on one stream never overlap). Its reads of the partials
// are volatile (written by other blocks during this kernel: no read-only cache).
//
// The arithmetic is exactly rounded (exact.cuh): the levels equal the CPU's to the bit.
#include "exact.cuh"

#define PARAMS 14
#define THREADS 256

// One value's ladder [x2, e4, e8, e16, e32] under the parameters p.
template <typename T>
__device__ __forceinline__ void levels_of(T v, const T (&p)[PARAMS], T (&l)[5]) {
    const T xc = min_c(max_c(v, p[0]), p[1]);
    const T x2 = mul_rn(min_c(max_c(round_away(mul_rn(xc, p[9])), p[2]), p[3]), p[4]);
    l[0] = x2;
    T rest = sub_rn(xc, x2);
    // Residual level codes stay within +-2^(b/2 - 1) (`RESIDUAL_BOUND` in ops::quantize).
    const float bound[4] = {2.0f, 8.0f, 128.0f, 32768.0f};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const T k = (T)bound[i];
        const T e = mul_rn(min_c(max_c(round_away(mul_rn(rest, p[10 + i])), -k), k), p[5 + i]);
        rest = sub_rn(rest, e);
        l[i + 1] = e;
    }
}

// a3 = e16 + e32 z32, a2 = e8 + a3 z16, a1 = e4 + a2 z8; returns q = x2 + a1 z4.
template <typename T>
__device__ __forceinline__ T nested(const T (&l)[5], const T (&z)[4], T (&a)[3]) {
    a[2] = add_rn(l[3], mul_rn(l[4], z[3]));
    a[1] = add_rn(l[2], mul_rn(a[2], z[2]));
    a[0] = add_rn(l[1], mul_rn(a[1], z[1]));
    return add_rn(l[0], mul_rn(a[0], z[0]));
}

// candle's max/min backward through the clip: 1 inside, 1/2 at a bound, 0 outside.
template <typename T>
__device__ __forceinline__ T clip_factor(T v, T lo, T hi) {
    const double a = v > lo ? 1.0 : (v == lo ? 0.5 : 0.0);
    const double b = v < hi ? 1.0 : (v == hi ? 0.5 : 0.0);
    return (T)(a * b);
}

// Mirrors `QuantizeParams` in src/ops/quantize/mod.rs.
struct QuantizeParams {
    uint64_t n;
    uint32_t want_dx;
    uint32_t pad;
};

template <typename T>
__device__ __forceinline__ void load_params(const T* prm, const T* zs, T (&p)[PARAMS], T (&z)[4]) {
#pragma unroll
    for (int i = 0; i < PARAMS; ++i) p[i] = prm[i];
#pragma unroll
    for (int i = 0; i < 4; ++i) z[i] = zs[i];
}

template <typename T>
__device__ void quantize_fwd(const QuantizeParams qp, const T* __restrict__ x, const T* __restrict__ prm,
                             const T* __restrict__ zs, T* __restrict__ y) {
    T p[PARAMS], z[4];
    load_params(prm, zs, p, z);
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < qp.n; i += stride) {
        T l[5], a[3];
        levels_of(x[i], p, l);
        y[i] = nested(l, z, a);
    }
}

// Sums each of v[0..K) over the block (blockDim.x == THREADS) in a fixed order; thread 0 gets the
// sums.
template <int K>
__device__ __forceinline__ void block_sum_f64(double (&v)[K]) {
    __shared__ double partial[K][THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffff, v[k], o);
        if (lane == 0) partial[k][warp] = v[k];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            double s = lane < THREADS / 32 ? partial[k][lane] : 0.0;
            for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffff, s, o);
            v[k] = s;
        }
    }
}

// Tickets of the fused kernels' blocks (see the top of the file); zero between launches.
__device__ unsigned int dz_blocks_done = 0;
__device__ unsigned int range_blocks_done = 0;
#define MAX_RANGES 8
__device__ unsigned int ranges_blocks_done[MAX_RANGES] = {0};

// Whether this block is the last of the grid to finish: thread 0 (which wrote the block's
// partials) fences and takes a ticket; every thread gets the answer. The barrier also separates
// the block's earlier use of its shared scratch from the finishing pass's.
__device__ __forceinline__ bool last_block(unsigned int* done) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    return last;
}

// dx[i] = g[i] * dclip/dx (when want_dx) and partial[4 * block + b] = this block's sum of
// g * dq/dz_b, dq/dz_b = (z4 ... z_{b/2}) * a_b with a = [a1, a2, a3, e32], in f64 as on the CPU.
template <typename T>
__device__ void quantize_bwd(const QuantizeParams qp, const T* __restrict__ x, const T* __restrict__ prm,
                             const T* __restrict__ zs, const T* __restrict__ g, T* __restrict__ dx,
                             double* partial) {
    T p[PARAMS], z[4];
    load_params(prm, zs, p, z);
    const double z0 = (double)z[0], z1 = (double)z[1], z2 = (double)z[2];
    const double w[4] = {1.0, z0, z0 * z1, z0 * z1 * z2};
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < qp.n; i += stride) {
        const T v = x[i], gi = g[i];
        T l[5], a[3];
        levels_of(v, p, l);
        nested(l, z, a);
        const double gd = (double)gi;
        const T t[4] = {a[0], a[1], a[2], l[4]};
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] = __dadd_rn(acc[k], __dmul_rn(__dmul_rn(gd, w[k]), (double)t[k]));
        if (qp.want_dx) dx[i] = mul_rn(gi, clip_factor(v, p[0], p[1]));
    }
    block_sum_f64<4>(acc);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) partial[4 * blockIdx.x + k] = acc[k];
    }
}

// The last block: dz[b] = sum over blocks of partial[4 * block + b].
template <typename T>
__device__ void quantize_dz(const uint32_t blocks, const volatile double* partial, T* __restrict__ dz) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (uint32_t j = threadIdx.x; j < blocks; j += blockDim.x) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += partial[4 * j + k];
    }
    block_sum_f64<4>(acc);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) dz[k] = from_double_rn<T>(acc[k]);
    }
}

template <typename T>
__device__ void quantize_bwd_fused(const QuantizeParams qp, const T* __restrict__ x, const T* __restrict__ prm,
                                   const T* __restrict__ zs, const T* __restrict__ g, T* __restrict__ dx,
                                   double* partial, T* __restrict__ dz) {
    quantize_bwd<T>(qp, x, prm, zs, g, dx, partial);
    if (!last_block(&dz_blocks_done)) return;
    quantize_dz<T>(gridDim.x, partial, dz);
    if (threadIdx.x == 0) dz_blocks_done = 0;
}

// ---------------------------------------------------------------------------------------------
// The running range. Extremes in x's dtype; a NaN extreme marks "saw a non-finite value".

template <typename T>
__device__ __forceinline__ T nan_min(T a, T b) {
    return (isnan(a) || isnan(b)) ? nan<T>() : min_c(a, b);
}
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
    return (isnan(a) || isnan(b)) ? nan<T>() : max_c(a, b);
}

// Min and max over the block (blockDim.x == THREADS); thread 0 gets them.
template <typename T>
__device__ __forceinline__ void block_min_max(T& lo, T& hi) {
    __shared__ T part[2][THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        lo = nan_min(lo, __shfl_down_sync(0xffffffff, lo, o));
        hi = nan_max(hi, __shfl_down_sync(0xffffffff, hi, o));
    }
    if (lane == 0) {
        part[0][warp] = lo;
        part[1][warp] = hi;
    }
    __syncthreads();
    if (warp == 0) {
        lo = lane < THREADS / 32 ? part[0][lane] : inf<T>();
        hi = lane < THREADS / 32 ? part[1][lane] : -inf<T>();
        for (int o = 16; o > 0; o >>= 1) {
            lo = nan_min(lo, __shfl_down_sync(0xffffffff, lo, o));
            hi = nan_max(hi, __shfl_down_sync(0xffffffff, hi, o));
        }
    }
}

template <typename T>
__device__ void range_partial(const uint64_t n, const T* __restrict__ x, T* partial) {
    T lo = inf<T>(), hi = -inf<T>();
    bool bad = false;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T v = x[i];
        if (isfinite(v)) {
            lo = min_c(lo, v);
            hi = max_c(hi, v);
        } else {
            bad = true;
        }
    }
    if (bad) lo = nan<T>();
    block_min_max(lo, hi);
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = lo;
        partial[2 * blockIdx.x + 1] = hi;
    }
}

// The last block: out = [x_min, x_max, PARAMS grid parameters], all in T; range = the old
// [x_min, x_max], f32.
template <typename T>
__device__ void range_update(const uint32_t blocks, const volatile T* partial, const float* __restrict__ range,
                             T* __restrict__ out) {
    T lo_t = inf<T>(), hi_t = -inf<T>();
    for (uint32_t j = threadIdx.x; j < blocks; j += blockDim.x) {
        lo_t = nan_min(lo_t, (T)partial[2 * j]);
        hi_t = nan_max(hi_t, (T)partial[2 * j + 1]);
    }
    block_min_max(lo_t, hi_t);
    if (threadIdx.x != 0) return;
    // The old path: extremes cast to f32, widened in f32 (see `update_range_cpu`).
    const float lo = to_float_rn(lo_t), hi = to_float_rn(hi_t);
    const float x_min = range[0], x_max = range[1];
    const bool finite = !isnan(lo_t) && !isnan(hi_t) && fabsf(__fsub_rn(hi, lo)) < inf<float>();
    const float m = max_c(max_c(max_c(x_max, -x_min), hi), -lo);
    const bool sgn = min_c(x_min, lo) < 0.0f;
    const float new_min = finite ? (sgn ? -m : 0.0f) : x_min;
    const float new_max = finite ? m : x_max;
    // The grid in f64: s_b = (x_max - x_min) / D_b, and 1/s_b.
    const double divisors[5] = {3.0, 15.0, 255.0, 65535.0, 4294967295.0};
    const double dlo = (double)new_min, dhi = (double)new_max, width = __dsub_rn(dhi, dlo);
    const double sgnd = dlo < 0.0 ? 1.0 : 0.0;
    out[0] = (T)new_min;
    out[1] = (T)new_max;
    out[2] = from_double_rn<T>(dlo);
    out[3] = from_double_rn<T>(dhi);
    out[4] = from_double_rn<T>(__dadd_rn(__dmul_rn(sgnd, -1.0), 0.0));
    out[5] = from_double_rn<T>(__dadd_rn(__dmul_rn(sgnd, -2.0), 3.0));
#pragma unroll
    for (int i = 0; i < 5; ++i) {
        const double s = __ddiv_rn(width, divisors[i]);
        out[6 + i] = from_double_rn<T>(s);
        out[11 + i] = from_double_rn<T>(__ddiv_rn(1.0, s));
    }
}

template <typename T>
__device__ void range_fused(const uint64_t n, const T* __restrict__ x, T* partial, const float* __restrict__ range,
                            T* __restrict__ out) {
    range_partial<T>(n, x, partial);
    if (!last_block(&range_blocks_done)) return;
    range_update<T>(gridDim.x, partial, range, out);
    if (threadIdx.x == 0) range_blocks_done = 0;
}

// Mirrors `RangeGroup` in src/ops/quantize/range.rs: tensor y has n[y] elements at x[y] (T) and
// its old range at range[y] (2 floats).
struct RangeGroup {
    uint64_t n[MAX_RANGES];
    uint64_t x[MAX_RANGES];
    uint64_t range[MAX_RANGES];
};

// Grid (blocks, k): row y = blockIdx.y runs range_fused on tensor y; partial holds 2 * gridDim.x
// values per tensor, out 2 + PARAMS per tensor.
template <typename T>
__device__ void ranges_fused(const RangeGroup g, T* partial, T* __restrict__ out) {
    const unsigned int y = blockIdx.y;
    T* part = partial + 2 * (uint64_t)gridDim.x * y;
    range_partial<T>(g.n[y], reinterpret_cast<const T*>(g.x[y]), part);
    if (!last_block(&ranges_blocks_done[y])) return;
    range_update<T>(gridDim.x, part, reinterpret_cast<const float*>(g.range[y]), out + (2 + PARAMS) * y);
    if (threadIdx.x == 0) ranges_blocks_done[y] = 0;
}

#define QUANTIZE_KERNELS(SUFFIX, T)                                                                      \
    extern "C" __global__ void quantize_fwd_##SUFFIX(const QuantizeParams p, const T* x, const T* prm,     \
                                                     const T* z, T* y) {                                   \
        quantize_fwd<T>(p, x, prm, z, y);                                                                  \
    }                                                                                                      \
    extern "C" __global__ void quantize_bwd_fused_##SUFFIX(const QuantizeParams p, const T* x,            \
                                                           const T* prm, const T* z, const T* g, T* dx,  \
                                                           double* partial, T* dz) {                     \
        quantize_bwd_fused<T>(p, x, prm, z, g, dx, partial, dz);                                           \
    }                                                                                                      \
    extern "C" __global__ void range_fused_##SUFFIX(const uint64_t n, const T* x, T* partial,             \
                                                    const float* range, T* out) {                         \
        range_fused<T>(n, x, partial, range, out);                                                         \
    }                                                                                                      \
    extern "C" __global__ void ranges_fused_##SUFFIX(const RangeGroup g, T* partial, T* out) {            \
        ranges_fused<T>(g, partial, out);                                                                  \
    }

QUANTIZE_KERNELS(f32, float)
QUANTIZE_KERNELS(f64, double)
