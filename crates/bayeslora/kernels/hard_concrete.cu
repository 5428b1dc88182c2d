// B-LoRA's hard-concrete gates (see `ops::hard_concrete`, whose CPU code is the reference):
//
//   hard_concrete_fwd/bwd: the gate samples of one quantizer or layer (a handful), one thread;
//                         with p.rank, a layer's rank multiplier first (`layer_gates_at`).
//   rank_gates_fwd/bwd: a layer's rank multiplier (samples, nested product, straight-through
//                      round), one thread.
#include "exact.cuh"

// Hard-concrete samples z = clamp(sigma((la + n)/beta)(zeta - gamma) + gamma, 0, 1) * mask, with
// sigma(x) = (1 + tanh(x/2))/2, op for op as candle's CUDA kernels compute the composed path: each
// affine a*x + b is one fused multiply-add, tanh is tanhf, the clamp is fmaxf/fminf. The mask is
// the cumulative product of [la > hard_off] (when use_hard_off).

// Mirrors `HardConcreteParams` in src/ops/hard_concrete.rs.
struct HardConcreteParams {
    double inv_beta;
    double stretch;
    double gamma;
    double hard_off;
    uint32_t n;
    uint32_t use_hard_off;
    uint32_t group;  // the mask restarts every `group` gates (0: never)
    // The first `rank` gates are a rank multiplier's (`layer_gates_at`: output [rank + 1], then
    // the bit gates' samples); 0: none.
    uint32_t rank;
    // Handed-over gradient windows (`GateGrads`): the backward reads window k's values at
    // window_at[k]..+window_len[k] from window_ptr[k] in place of the upstream gradient's.
    uint32_t windows;
    uint32_t window_at[8];
    uint32_t window_len[8];
    uint64_t window_ptr[8];
};

// The upstream gradient of gate i: a handed-over window's value where one covers it.
template <typename T>
__device__ __forceinline__ T hc_grad_at(const HardConcreteParams& p, const T* __restrict__ g, uint32_t i) {
    for (uint32_t k = 0; k < p.windows; ++k) {
        if (i >= p.window_at[k] && i - p.window_at[k] < p.window_len[k]) {
            return reinterpret_cast<const T*>(p.window_ptr[k])[i - p.window_at[k]];
        }
    }
    return g[i];
}

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float tanh_c(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_c(double v) { return tanh(v); }
__device__ __forceinline__ float fmax_c(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fmax_c(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float fmin_c(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double fmin_c(double a, double b) { return fmin(a, b); }

// (v before the clamp, t = tanh(..)) of one gate.
template <typename T>
__device__ __forceinline__ void hc_pre_clamp(const HardConcreteParams& p, T la, T n, T& v, T& t) {
    const T half = (T)0.5, zero = (T)0.0;
    const T b = fma_rn(add_rn(la, n), (T)p.inv_beta, zero);
    t = tanh_c(fma_rn(b, half, zero));
    const T s = fma_rn(t, half, half);
    v = fma_rn(s, (T)p.stretch, (T)p.gamma);
}

template <typename T>
__device__ void rank_gates(const HardConcreteParams& p, uint32_t n, const T* __restrict__ la,
                           const T* __restrict__ noise, T* __restrict__ m);

template <typename T>
__device__ void hard_concrete_fwd(const HardConcreteParams p, const T* __restrict__ la, const T* __restrict__ noise,
                                  T* __restrict__ z) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const uint32_t r = p.rank, shift = r > 0 ? 1 : 0;
    if (r > 0) rank_gates<T>(p, r, la, noise, z);
    T m = (T)1.0;
    for (uint32_t i = r; i < p.n; ++i) {
        T v, t;
        hc_pre_clamp(p, la[i], noise[i], v, t);
        if (p.group != 0 && (i - r) % p.group == 0) m = (T)1.0;
        if (p.use_hard_off) m = mul_rn(m, la[i] > (T)p.hard_off ? (T)1.0 : (T)0.0);
        z[i + shift] = mul_rn(fmin_c(fmax_c(v, (T)0.0), (T)1.0), m);
    }
}

// d(gm z)/d la of one gate through the composed path's backward, for the upstream gradient gm
// already times the mask: the clamp (1/2 on a bound), each affine, and tanh's -(dt (t^2 - 1)).
template <typename T>
__device__ __forceinline__ T hc_chain(const HardConcreteParams& p, T v, T t, T gm) {
    const T half = (T)0.5, zero = (T)0.0, one = (T)1.0;
    const T lo = v > zero ? one : (v == zero ? half : zero);
    const T hi = v < one ? one : (v == one ? half : zero);
    const T dv = mul_rn(gm, mul_rn(lo, hi));
    const T dt = fma_rn(fma_rn(dv, (T)p.stretch, zero), half, zero);
    const T du = -mul_rn(dt, fma_rn(mul_rn(t, t), one, -one));
    return fma_rn(fma_rn(du, half, zero), (T)p.inv_beta, zero);
}

template <typename T>
__device__ void rank_gates_grad(const HardConcreteParams& p, uint32_t n, const T* __restrict__ la,
                                const T* __restrict__ noise, const T* __restrict__ g, T* __restrict__ dla);

// d(sum g z)/d la through the composed path's backward: the mask, then hc_chain (after the rank
// multiplier's backward when p.rank > 0; g is then [rank + 1 + bit gates]).
template <typename T>
__device__ void hard_concrete_bwd(const HardConcreteParams p, const T* __restrict__ la, const T* __restrict__ noise,
                                  const T* __restrict__ g, T* __restrict__ dla) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const T zero = (T)0.0, one = (T)1.0;
    const uint32_t r = p.rank, shift = r > 0 ? 1 : 0;
    if (r > 0) rank_gates_grad<T>(p, r, la, noise, g, dla);
    T m = one;
    for (uint32_t i = r; i < p.n; ++i) {
        T v, t;
        hc_pre_clamp(p, la[i], noise[i], v, t);
        if (p.group != 0 && (i - r) % p.group == 0) m = one;
        if (p.use_hard_off) m = mul_rn(m, la[i] > (T)p.hard_off ? one : zero);
        dla[i] = hc_chain(p, v, t, mul_rn(hc_grad_at(p, g, i + shift), m));
    }
}

// B-LoRA's rank multiplier (`ops::rank_multiplier`) of the n gates la[0..n]: m = [1, acc +
// (round(acc) - acc)] for the cumulative products acc of the clamped samples (no hard-off), as
// candle's CUDA kernels compute the composition (each op rounded on its own).
template <typename T>
__device__ void rank_gates(const HardConcreteParams& p, uint32_t n, const T* __restrict__ la,
                           const T* __restrict__ noise, T* __restrict__ m) {
    m[0] = (T)1.0;
    T acc = (T)1.0;
    for (uint32_t i = 0; i < n; ++i) {
        T v, t;
        hc_pre_clamp(p, la[i], noise[i], v, t);
        const T z = fmin_c(fmax_c(v, (T)0.0), (T)1.0);
        acc = i == 0 ? z : mul_rn(acc, z);
        m[i + 1] = add_rn(acc, sub_rn(round_away(acc), acc));
    }
}

template <typename T>
__device__ void rank_gates_fwd(const HardConcreteParams p, const T* __restrict__ la, const T* __restrict__ noise,
                               T* __restrict__ m) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    rank_gates<T>(p, p.n, la, noise, m);
}

// Its backward for the upstream gradient g [n + 1] (a handed-over window's values where one
// covers them): G_i = g[i + 1] + G_{i+1} z_{i+1} (straight through the round), dz_i = G_i acc_{i-1}
// (G_0 for the first), then hc_chain. dla holds the products acc_i until the reverse pass
// overwrites them.
template <typename T>
__device__ void rank_gates_grad(const HardConcreteParams& p, uint32_t n, const T* __restrict__ la,
                                const T* __restrict__ noise, const T* __restrict__ g, T* __restrict__ dla) {
    if (n == 0) return;
    T acc = (T)1.0;
    for (uint32_t i = 0; i < n; ++i) {
        T v, t;
        hc_pre_clamp(p, la[i], noise[i], v, t);
        const T z = fmin_c(fmax_c(v, (T)0.0), (T)1.0);
        acc = i == 0 ? z : mul_rn(acc, z);
        dla[i] = acc;
    }
    T big_g = (T)0.0, z_next = (T)0.0;
    for (uint32_t k = n; k-- > 0;) {
        T v, t;
        hc_pre_clamp(p, la[k], noise[k], v, t);
        const T z = fmin_c(fmax_c(v, (T)0.0), (T)1.0);
        const T gk = hc_grad_at(p, g, k + 1);
        big_g = k + 1 == n ? gk : add_rn(gk, mul_rn(big_g, z_next));
        const T dz = k == 0 ? big_g : mul_rn(big_g, dla[k - 1]);
        dla[k] = hc_chain(p, v, t, dz);
        z_next = z;
    }
}

template <typename T>
__device__ void rank_gates_bwd(const HardConcreteParams p, const T* __restrict__ la, const T* __restrict__ noise,
                               const T* __restrict__ g, T* __restrict__ dla) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    rank_gates_grad<T>(p, p.n, la, noise, g, dla);
}

#define HARD_CONCRETE_KERNELS(SUFFIX, T)                                                                 \
    extern "C" __global__ void hard_concrete_fwd_##SUFFIX(const HardConcreteParams p, const T* la,         \
                                                          const T* noise, T* z) {                          \
        hard_concrete_fwd<T>(p, la, noise, z);                                                             \
    }                                                                                                      \
    extern "C" __global__ void hard_concrete_bwd_##SUFFIX(const HardConcreteParams p, const T* la,         \
                                                          const T* noise, const T* g, T* dla) {            \
        hard_concrete_bwd<T>(p, la, noise, g, dla);                                                        \
    }                                                                                                      \
    extern "C" __global__ void rank_gates_fwd_##SUFFIX(const HardConcreteParams p, const T* la,            \
                                                       const T* noise, T* m) {                             \
        rank_gates_fwd<T>(p, la, noise, m);                                                                \
    }                                                                                                      \
    extern "C" __global__ void rank_gates_bwd_##SUFFIX(const HardConcreteParams p, const T* la,            \
                                                       const T* noise, const T* g, T* dla) {               \
        rank_gates_bwd<T>(p, la, noise, g, dla);                                                           \
    }

HARD_CONCRETE_KERNELS(f32, float)
HARD_CONCRETE_KERNELS(f64, double)
