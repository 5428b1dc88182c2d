//! glibc's `expf` over a slice, bit for bit, in SIMD lanes.
//!
//! candle's and std's f32 `exp` call the platform libm one element at a time. On x86-64 glibc
//! (2.27 on) that is `__expf_fma` when the CPU has FMA and AVX2 (the ifunc's choice): x·32/ln2
//! rounded to an integer k by adding 1.5·2⁵², a 32-entry table of 2^(i/32), a cubic in the
//! remainder, all in f64, then one rounding to f32 (Szabolcs Nagy's algorithm, glibc
//! `sysdeps/ieee754/flt-32/e_expf.c`). In the softmax of attention and GELU's backward it was
//! 6 % of a MiniLM training step (issue 21). [`exp_in_place`] evaluates the same f64 operations
//! with the same fused multiply-adds as glibc's FMA build (read off its disassembly: the
//! reduction `k = fma(32/ln2, x, shift)`, the remainder `r = fma(32/ln2, x, −(k − shift))`,
//! and three FMAs in the polynomial) and glibc's range checks as selects, so LLVM vectorizes
//! the loop (8 f64 lanes with AVX-512, 4 with AVX2) and every value is libm's bit for bit.
//!
//! Bit-exactness against whatever libm the process has is checked, not assumed: the first call
//! compares the lanes with `f32::exp` on a sweep of arguments (every range branch, both ends of
//! the table), and any difference (another libc, another glibc build, a CPU without FMA, where
//! glibc runs its SSE2 build) makes [`exp_in_place`] call `f32::exp` per element instead.
use std::sync::OnceLock;

/// `__exp2f_data.tab`: 2^(i/32) with the exponent bits of i/32 taken out (glibc's layout).
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// `invln2_scaled`: 32/ln 2 (0x1.71547652b82fep+5).
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// `shift`: 1.5·2⁵², whose addition rounds to an integer in the low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// `poly_scaled`: the cubic's coefficients of r³, r², r.
const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);
/// Above this e^x overflows to +∞ (0x1.62e42ep6, ln 2¹²⁸).
const OFLOW: f32 = f32::from_bits(0x42b1_7217);
/// Below this e^x underflows to +0 (−0x1.9fe368p6, ln 2⁻¹⁵⁰).
const UFLOW: f32 = f32::from_bits(0xc2cf_f1b4);
/// Below this (and above [`UFLOW`]) glibc's `__math_may_uflowf` returns 2⁻¹⁴⁹ (−0x1.9d1d9ep6).
const MAY_UFLOW: f32 = f32::from_bits(0xc2ce_8ecf);

/// glibc's `__expf_fma`, without data-dependent branches.
#[inline(always)]
fn expf(x: f32) -> f32 {
    let xd = f64::from(x);
    // z = x·N/ln2 = k + r: k by the shift trick (one FMA), r with the product unrounded.
    let kd = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    // 2^(k/N) = table[k mod N] with k/N's integer part added to the exponent bits.
    let s = f64::from_bits(TAB[(ki & 31) as usize].wrapping_add(ki << 47));
    let z = C0.mul_add(r, C1);
    let r2 = r * r;
    let y = C2.mul_add(r, 1.0);
    let y = (z.mul_add(r2, y) * s) as f32;
    // |x| ≥ 88 or NaN: glibc's special cases, in its order.
    let bits = x.to_bits();
    let special = if bits == 0xff80_0000 {
        0.0
    } else if (bits >> 20) & 0x7ff >= 0x7f8 {
        x + x
    } else if x > OFLOW {
        f32::INFINITY
    } else if x < UFLOW {
        0.0
    } else if x < MAY_UFLOW {
        f32::from_bits(1)
    } else {
        y
    };
    if (bits >> 20) & 0x7ff >= 0x42b {
        special
    } else {
        y
    }
}

#[inline(always)]
fn exp_lanes(v: &mut [f32]) {
    for v in v {
        *v = expf(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_avx512(v: &mut [f32]) {
    exp_lanes(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(v: &mut [f32]) {
    exp_lanes(v)
}

/// How this process evaluates [`exp_in_place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Path {
    Avx512,
    Avx2,
    /// `f32::exp` per element: the lanes differ from this process's libm (or need FMA).
    Libm,
}

/// Arguments that reach every branch of [`expf`] and both ends of the table: a sweep over
/// [−110, 95], the thresholds and their neighbours, ±0, ±∞, NaN.
fn probe() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..=20_500).map(|i| -110.0 + i as f32 * 0.01).collect();
    xs.extend((0..4096).map(|i| (i as f32 - 2048.0) * (1.0 / 4096.0)));
    for t in [OFLOW, UFLOW, MAY_UFLOW, 88.0, -88.0] {
        xs.extend((-3i32..=3).map(|d| f32::from_bits((t.to_bits() as i32 + d) as u32)));
    }
    xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, 1e-30, -1e-30, 1e-9]);
    xs
}

/// Compiled for this CPU, and equal to this process's `f32::exp` on [`probe`]?
fn path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let fast = if !std::is_x86_feature_detected!("fma") {
                None
            } else if std::is_x86_feature_detected!("avx512f") {
                Some(Path::Avx512)
            } else if std::is_x86_feature_detected!("avx2") {
                Some(Path::Avx2)
            } else {
                None
            };
            if let Some(fast) = fast {
                let xs = probe();
                let mut got = xs.clone();
                run(fast, &mut got);
                let same = xs.iter().zip(&got).all(|(&x, &g)| {
                    let want = x.exp();
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan())
                });
                if same {
                    return fast;
                }
            }
        }
        Path::Libm
    })
}

fn run(path: Path, v: &mut [f32]) {
    match path {
        // SAFETY: `path` returns Avx512/Avx2 only after detecting these features on this CPU;
        // the functions compile the same safe loop with them enabled.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { exp_avx512(v) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { exp_avx2(v) },
        _ => v.iter_mut().for_each(|v| *v = v.exp()),
    }
}

/// `v[i] = e^v[i]`, this process's `f32::exp` bit for bit (in SIMD lanes where they match it).
pub(crate) fn exp_in_place(v: &mut [f32]) {
    run(path(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(xs: &[f32]) {
        crate::ops::testing::check_lanes("exp", xs, exp_in_place, f32::exp)
    }

    #[test]
    fn matches_libm_bit_for_bit() {
        // Every 64th f32 bit pattern (67 M values: both signs, subnormals, every branch, ±∞, NaNs).
        let xs: Vec<f32> = (0..=u32::MAX / 64).map(|i| f32::from_bits(i * 64 + 29)).collect();
        check(&xs);
        // Densely where softmax and GELU's backward call it, and around the range checks.
        let dense: Vec<f32> = (0..4_000_000).map(|i| -110.0 + i as f32 * 5e-5).collect();
        check(&dense);
        check(&probe());
    }

    /// On x86-64 glibc with FMA and AVX2 the lanes are glibc's `__expf_fma`, so they are used.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    fn lanes_are_used_on_glibc_with_fma() {
        if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
            assert_ne!(path(), Path::Libm);
        }
    }
}
