// Exactly rounded arithmetic for B-LoRA's kernels (quantize.cu, hard_concrete.cu), which equal
// their CPU references to the bit. Every multiply, add and subtract is an explicit _rn intrinsic:
// nvcc would otherwise contract `a - b*c` into an FMA, and results would differ from the CPU's
// (and candle's composed ops') in the last bit. max/min are candle's CPU ones (a < b ? b : a),
// not fmaxf, so a NaN propagates as it does on the CPU.
#pragma once
#include "dtype.cuh"

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
// Half away from zero, exact (as Rust's f32::round / f64::round).
__device__ __forceinline__ float round_away(float v) { return roundf(v); }
__device__ __forceinline__ double round_away(double v) { return round(v); }
__device__ __forceinline__ float to_float_rn(float v) { return v; }
__device__ __forceinline__ float to_float_rn(double v) { return __double2float_rn(v); }
template <typename T> __device__ __forceinline__ T from_double_rn(double v);
template <> __device__ __forceinline__ float from_double_rn<float>(double v) { return __double2float_rn(v); }
template <> __device__ __forceinline__ double from_double_rn<double>(double v) { return v; }

template <typename T> __device__ __forceinline__ T max_c(T a, T b) { return a < b ? b : a; }
template <typename T> __device__ __forceinline__ T min_c(T a, T b) { return a > b ? b : a; }

template <typename T> __device__ __forceinline__ T inf();
template <> __device__ __forceinline__ float inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }
template <typename T> __device__ __forceinline__ T nan();
template <> __device__ __forceinline__ float nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }
