// The device path of the ivon crate (src/device/cuda.rs launches these): IVON's sampling, sample
// averages and update, and AdamW's update, each one fused elementwise kernel over the flat f32
// state, writing the vars' values (T = f32, bf16 or f16) straight into the vars in the same pass.
//
// Every f32 operation is written with the _rn intrinsics, in the order of src/update.rs and
// src/ivon.rs, so that nvcc cannot contract a*b+c into an FMA: for the same ε and gradients the
// device computes the same bits as the CPU path (division and sqrt are IEEE-rounded by default).
//
// ε ~ N(0, 1) of a seeded draw is Philox4x32-10 (Salmon et al., SC 2011) keyed by the seed, with
// counter (index / 4, draw), then Box–Muller on 24-bit uniforms; noise::philox_normal is the same
// function on the host (the GPU tests compare them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float dvd(float a, float b) { return __fdiv_rn(a, b); }

// The vars' storages: var s holds flat elements ends[s-1]..ends[s] (ends[-1] = 0) at ptrs[s], in
// the vars' dtype. Kernels write the weights straight into the vars through it: no flat output
// buffer and no per-var copy. Mirrors `VarTable` in src/device/cuda.rs.
struct VarTable {
    const uint64_t* ptrs;
    const uint64_t* ends;
    uint32_t count;
};

// vars[j] = T(v) for flat index j (binary search for j's var: log2(count) steps).
template <typename T>
__device__ __forceinline__ void store(const VarTable& vars, const uint64_t j, const float v) {
    uint32_t lo = 0, hi = vars.count - 1;
    while (lo < hi) {
        const uint32_t mid = (lo + hi) >> 1;
        if (vars.ends[mid] > j) hi = mid; else lo = mid + 1;
    }
    const uint64_t start = lo == 0 ? 0 : vars.ends[lo - 1];
    reinterpret_cast<T*>(vars.ptrs[lo])[j - start] = from_f32<T>(v);
}

#define GRID_STRIDE(i, n)                                                                          \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                   \
         i += (uint64_t)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 and Box–Muller (mirrored by noise::philox_normal)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
        const uint32_t lo0 = 0xD2511F53u * c[0], hi0 = __umulhi(0xD2511F53u, c[0]);
        const uint32_t lo1 = 0xCD9E8D57u * c[2], hi1 = __umulhi(0xCD9E8D57u, c[2]);
        const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

// Standard normal number `index` of draw `draw` under `seed`. Philox block index/4 gives four
// words: (w0, w1) feed Box–Muller for elements 4b and 4b+1 (cos, sin), (w2, w3) for 4b+2, 4b+3.
__device__ __forceinline__ float philox_normal(uint64_t seed, uint64_t draw, uint64_t index) {
    const uint64_t block = index >> 2;
    uint32_t c[4] = {(uint32_t)block, (uint32_t)(block >> 32), (uint32_t)draw, (uint32_t)(draw >> 32)};
    philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
    const int pair = (int)((index >> 1) & 1);
    const uint32_t a = c[2 * pair], b = c[2 * pair + 1];
    // 24-bit uniforms, exact in f32: u1 in (0, 1] (never 0, so the log is finite), u2 in [0, 1).
    // (k + 0.5)/2^24 would need 25 bits and round near 1, where r = sqrt(-2 ln u1) is small.
    const float u1 = (float)((a >> 8) + 1u) * (1.0f / 16777216.0f);
    const float u2 = (float)(b >> 8) * (1.0f / 16777216.0f);
    const float r = sqrtf(-2.0f * logf(u1));
    float s, co;
    sincospif(2.0f * u2, &s, &co);
    return (index & 1) ? r * s : r * co;
}

// ---------------------------------------------------------------------------------------------
// IVON
// ---------------------------------------------------------------------------------------------

// Mirrors `SampleParams` in src/device/cuda.rs.
struct SampleParams {
    uint64_t start;  // the group's first flat index
    uint64_t n;      // the group's length
    uint64_t seed;
    uint64_t draw;
    float ess;
    float weight_decay;
    int32_t injected;  // 1: ε comes from eps_in[0..n], else from Philox
};

// Step 1-2 for one group: noise = ε / √(ess·(h+δ)) (update::sample_noise), θ = μ + noise.
template <typename T>
__device__ void ivon_sample(const SampleParams p, const float* __restrict__ mean, const float* __restrict__ hess,
                            const float* __restrict__ eps_in, float* __restrict__ noise, const VarTable vars) {
    GRID_STRIDE(i, p.n) {
        const uint64_t j = p.start + i;
        const float eps = p.injected ? eps_in[i] : philox_normal(p.seed, p.draw, i);
        const float nz = dvd(eps, __fsqrt_rn(mul(p.ess, add(hess[j], p.weight_decay))));
        noise[j] = nz;
        store<T>(vars, j, add(mean[j], nz));
    }
}

// One micro-batch into the sample's gradient: acc = g (k = 1), else acc += (g − acc)/k.
template <typename T>
__device__ void ivon_accumulate(float* __restrict__ acc, const T* __restrict__ g, const uint64_t n, const float k) {
    GRID_STRIDE(i, n) {
        const float x = to_f32(g[i]);
        acc[i] = k == 1.0f ? x : add(acc[i], dvd(sub(x, acc[i]), k));
    }
}

// Step 3: Welford means over samples of g and of noise⊙g (price, approx 0) or g² (gradsq, 1);
// then the vars get μ back.
template <typename T>
__device__ void ivon_finish(const float count, const int32_t approx, float* __restrict__ avg_grad,
                            float* __restrict__ avg_curv, const float* __restrict__ g_in,
                            const float* __restrict__ noise, const float* __restrict__ mean, const VarTable vars,
                            const uint64_t n) {
    GRID_STRIDE(i, n) {
        const float g = g_in[i];
        const float stat = approx == 0 ? mul(noise[i], g) : mul(g, g);
        if (count == 1.0f) {
            avg_grad[i] = g;
            avg_curv[i] = stat;
        } else {
            avg_grad[i] = add(avg_grad[i], dvd(sub(g, avg_grad[i]), count));
            avg_curv[i] = add(avg_curv[i], dvd(sub(stat, avg_curv[i]), count));
        }
        store<T>(vars, i, mean[i]);
    }
}

// Mirrors `update::Coefficients` plus the range, in src/device/cuda.rs (`UpdateParams`).
struct UpdateParams {
    uint64_t start;
    uint64_t n;
    float beta1, one_minus_beta1, beta2, one_minus_beta2, half_sq_one_minus_beta2;
    float ess, weight_decay, lr, debias, clip_radius;
    int32_t approx;  // 0 price, 1 gradsq
};

// Steps 4-8 for one group (update::new_momentum, nll_hess, new_hess, new_mean), h before μ;
// the vars get the new μ.
template <typename T>
__device__ void ivon_update(const UpdateParams c, float* __restrict__ mean, float* __restrict__ mom,
                            float* __restrict__ hess, const float* __restrict__ avg_grad,
                            const float* __restrict__ avg_curv, const VarTable vars) {
    GRID_STRIDE(i, c.n) {
        const uint64_t j = c.start + i;
        const float m = add(mul(c.beta1, mom[j]), mul(c.one_minus_beta1, avg_grad[j]));
        const float h0 = hess[j];
        const float nh = c.approx == 0 ? mul(mul(avg_curv[j], add(h0, c.weight_decay)), c.ess) : mul(avg_curv[j], c.ess);
        const float d = sub(h0, nh);
        const float h = add(add(mul(c.beta2, h0), mul(c.one_minus_beta2, nh)),
                            dvd(mul(c.half_sq_one_minus_beta2, mul(d, d)), add(h0, c.weight_decay)));
        const float mu0 = mean[j];
        const float step = dvd(add(dvd(m, c.debias), mul(c.weight_decay, mu0)), add(h, c.weight_decay));
        // Comparisons, not fminf/fmaxf, so a NaN passes through as on the CPU.
        const float clipped = step > c.clip_radius ? c.clip_radius : (step < -c.clip_radius ? -c.clip_radius : step);
        const float mu = sub(mu0, mul(c.lr, clipped));
        mom[j] = m;
        hess[j] = h;
        mean[j] = mu;
        store<T>(vars, j, mu);
    }
}

// The vars get μ (restore, load) without touching the state.
template <typename T>
__device__ void ivon_cast(const float* __restrict__ src, const VarTable vars, const uint64_t n) {
    GRID_STRIDE(i, n) { store<T>(vars, i, src[i]); }
}

// ---------------------------------------------------------------------------------------------
// AdamW (optimizer::AdamW, torch's single-tensor form)
// ---------------------------------------------------------------------------------------------

// Mirrors `AdamWParams` in src/device/cuda.rs.
struct AdamWParams {
    uint64_t start;
    uint64_t n;
    float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

template <typename T>
__device__ void adamw_update(const AdamWParams c, float* __restrict__ param, float* __restrict__ m1,
                             float* __restrict__ v2, const T* __restrict__ grad, const VarTable vars) {
    GRID_STRIDE(i, c.n) {
        const uint64_t j = c.start + i;
        const float g = to_f32(grad[j]);
        float p = mul(param[j], c.decay);
        const float m = add(m1[j], mul(c.one_minus_beta1, sub(g, m1[j])));
        const float v = add(mul(c.beta2, v2[j]), mul(c.one_minus_beta2, mul(g, g)));
        p = sub(p, mul(c.step_size, dvd(m, add(dvd(__fsqrt_rn(v), c.bc2_sqrt), c.eps))));
        param[j] = p;
        m1[j] = m;
        v2[j] = v;
        store<T>(vars, j, p);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per var dtype: <name>_f32, <name>_bf16, <name>_f16.
// ---------------------------------------------------------------------------------------------

#define IVON_KERNELS(S, T)                                                                         \
    extern "C" __global__ void ivon_sample_##S(const SampleParams p, const float* mean, const float* hess,      \
                                               const float* eps_in, float* noise, const VarTable v) {          \
        ivon_sample<T>(p, mean, hess, eps_in, noise, v);                                                       \
    }                                                                                                          \
    extern "C" __global__ void ivon_accumulate_##S(float* acc, const T* g, const uint64_t n, const float k) {  \
        ivon_accumulate<T>(acc, g, n, k);                                                                      \
    }                                                                                                          \
    extern "C" __global__ void ivon_finish_##S(const float count, const int32_t approx, float* avg_grad,       \
                                               float* avg_curv, const float* g, const float* noise,           \
                                               const float* mean, const VarTable v, const uint64_t n) {       \
        ivon_finish<T>(count, approx, avg_grad, avg_curv, g, noise, mean, v, n);                              \
    }                                                                                                          \
    extern "C" __global__ void ivon_update_##S(const UpdateParams c, float* mean, float* mom, float* hess,     \
                                               const float* avg_grad, const float* avg_curv, const VarTable v) { \
        ivon_update<T>(c, mean, mom, hess, avg_grad, avg_curv, v);                                             \
    }                                                                                                          \
    extern "C" __global__ void ivon_cast_##S(const float* src, const VarTable v, const uint64_t n) {            \
        ivon_cast<T>(src, v, n);                                                                               \
    }                                                                                                          \
    extern "C" __global__ void adamw_update_##S(const AdamWParams c, float* param, float* m1, float* v2,      \
                                                const T* grad, const VarTable v) {                             \
        adamw_update<T>(c, param, m1, v2, grad, v);                                                            \
    }

IVON_KERNELS(f32, float)
IVON_KERNELS(bf16, __nv_bfloat16)
IVON_KERNELS(f16, __half)
