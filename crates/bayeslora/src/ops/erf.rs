//! libm's `erff` over a slice, bit for bit, in SIMD lanes.
//!
//! candle's `erf_f32` is the `libm` crate's `erff` (FreeBSD's `s_erff.c`): four rational
//! approximations picked by `|x|`, and for 1.25 ≤ |x| < 6 two calls of its `expf`. Called one
//! element at a time it branches per element and cannot vectorize; in BERT's GELU it was 13 % of a
//! MiniLM training step on the CPU (issue 21). [`erf_in_place`] evaluates every branch for every
//! element and selects, with the same f32 operations in the same order (Rust never fuses a
//! multiply and an add), so each value is the scalar one bit for bit (the tests check ~17 M
//! inputs across every branch) while LLVM vectorizes the loop: 16 lanes with AVX-512, 8 with
//! AVX2, chosen at run time. With AVX-512 only the elements with |x| ≥ 1.25 pay for every branch
//! (seven divisions and two `expf`): the others take the one-division branch of their range, the
//! costlier ranges packed together first ([`erf_avx512`]; 9 % → 3.3 % of a MiniLM step).

// The constants are written as FreeBSD prints them (more digits than an f32 holds), so they can be
// checked against s_erff.c and e_expf.c line by line; each rounds to the f32 libm uses.
#![allow(clippy::excessive_precision)]

// FreeBSD s_erff.c coefficients, as in libm 0.2 `math/erff.rs`.
const ERX: f32 = 8.4506291151e-01;
const EFX8: f32 = 1.0270333290e+00;
const PP: [f32; 5] = [1.2837916613e-01, -3.2504209876e-01, -2.8481749818e-02, -5.7702702470e-03, -2.3763017452e-05];
const QQ: [f32; 5] = [3.9791721106e-01, 6.5022252500e-02, 5.0813062117e-03, 1.3249473704e-04, -3.9602282413e-06];
const PA: [f32; 7] = [
    -2.3621185683e-03,
    4.1485610604e-01,
    -3.7220788002e-01,
    3.1834661961e-01,
    -1.1089469492e-01,
    3.5478305072e-02,
    -2.1663755178e-03,
];
const QA: [f32; 6] =
    [1.0642088205e-01, 5.4039794207e-01, 7.1828655899e-02, 1.2617121637e-01, 1.3637083583e-02, 1.1984500103e-02];
const RA: [f32; 8] = [
    -9.8649440333e-03,
    -6.9385856390e-01,
    -1.0558626175e+01,
    -6.2375331879e+01,
    -1.6239666748e+02,
    -1.8460508728e+02,
    -8.1287437439e+01,
    -9.8143291473e+00,
];
const SA: [f32; 8] = [
    1.9651271820e+01,
    1.3765776062e+02,
    4.3456588745e+02,
    6.4538726807e+02,
    4.2900814819e+02,
    1.0863500214e+02,
    6.5702495575e+00,
    -6.0424413532e-02,
];
const RB: [f32; 7] = [
    -9.8649431020e-03,
    -7.9928326607e-01,
    -1.7757955551e+01,
    -1.6063638306e+02,
    -6.3756646729e+02,
    -1.0250950928e+03,
    -4.8351919556e+02,
];
const SB: [f32; 7] = [
    3.0338060379e+01,
    3.2579251099e+02,
    1.5367296143e+03,
    3.1998581543e+03,
    2.5530502930e+03,
    4.7452853394e+02,
    -2.2440952301e+01,
];

// libm 0.2 `math/expf.rs` (FreeBSD e_expf.c).
const LN2_HI: f32 = 6.9314575195e-01;
const LN2_LO: f32 = 1.4286067653e-06;
const INV_LN2: f32 = 1.4426950216e+00;
const P1: f32 = 1.6666625440e-1;
const P2: f32 = -2.7667332906e-3;

/// libm's `expf` for the arguments `erff` gives it: finite, in [−37, 0] (−z² − 0.5625 with
/// |z| < 6, and a small correction), so neither its overflow nor its underflow branch is taken
/// and `scalbnf(y, k)` is the exact product `y · 2^k` (k ≥ −54).
#[inline(always)]
fn expf_erf_domain(x: f32) -> f32 {
    let hx = x.to_bits() & 0x7fff_ffff;
    let sign = (x.to_bits() >> 31) as i32;
    let half = if sign != 0 { -0.5f32 } else { 0.5 };
    let k_far = (INV_LN2 * x + half) as i32;
    let k_near = 1 - sign - sign;
    let reduce = hx > 0x3eb1_7218; // |x| > ln2 / 2
    let k = if hx > 0x3f85_1592 { k_far } else { k_near }; // |x| > 1.5 ln2
    let k = if reduce { k } else { 0 };
    let kf = k as f32;
    let hi = if reduce { x - kf * LN2_HI } else { x };
    let lo = if reduce { kf * LN2_LO } else { 0.0 };
    let r = if reduce { hi - lo } else { x };
    let xx = r * r;
    let c = r - xx * (P1 + xx * P2);
    let y = 1. + (r * c / (2. - c) - lo + hi);
    // |x| ≤ 2⁻¹⁴: libm returns 1 + x.
    let y = if hx > 0x3900_0000 { y } else { 1. + x };
    y * f32::from_bits(((k + 127) as u32) << 23)
}

/// |x| below this (0.84375) takes [`erff_small`]'s branch.
const SMALL: u32 = 0x3f58_0000;

/// `erff(x)` for |x| < 0.84375: x + x·P(x²)/Q(x²), or, below 2⁻²⁸, 0.125·(8x + EFX8·x). One
/// division, where the other branches take five more and two `expf`.
#[inline(always)]
fn erff_small(x: f32) -> f32 {
    let z = x * x;
    let r = PP[0] + z * (PP[1] + z * (PP[2] + z * (PP[3] + z * PP[4])));
    let s = 1.0 + z * (QQ[0] + z * (QQ[1] + z * (QQ[2] + z * (QQ[3] + z * QQ[4]))));
    let small = x + x * (r / s);
    let tiny = 0.125 * (8.0 * x + EFX8 * x);
    if x.to_bits() & 0x7fff_ffff < 0x3180_0000 {
        tiny
    } else {
        small
    }
}

/// |x| below this (1.25) and at least [`SMALL`] takes [`erff_mid`]'s branch.
const MID: u32 = 0x3fa0_0000;

/// erfc(|x|) for 0.84375 ≤ |x| < 1.25: 1 − ERX − P(|x|−1)/Q(|x|−1).
#[inline(always)]
fn erfc_mid(ax: f32) -> f32 {
    let s1 = ax - 1.0;
    let p = PA[0] + s1 * (PA[1] + s1 * (PA[2] + s1 * (PA[3] + s1 * (PA[4] + s1 * (PA[5] + s1 * PA[6])))));
    let q = 1.0 + s1 * (QA[0] + s1 * (QA[1] + s1 * (QA[2] + s1 * (QA[3] + s1 * (QA[4] + s1 * QA[5])))));
    1.0 - ERX - p / q
}

/// `erff(x)` for 0.84375 ≤ |x| < 1.25 (one division).
#[inline(always)]
fn erff_mid(x: f32) -> f32 {
    let y = 1.0 - erfc_mid(f32::from_bits(x.to_bits() & 0x7fff_ffff));
    if x.to_bits() >> 31 != 0 {
        -y
    } else {
        y
    }
}

/// `erff(x)`, bit for bit libm's, without data-dependent branches.
#[inline(always)]
fn erff(x: f32) -> f32 {
    let bits = x.to_bits();
    let ix = bits & 0x7fff_ffff;
    let negative = bits >> 31 != 0;
    let ax = f32::from_bits(ix);

    // 0.84375 ≤ |x| < 1.25: erfc = 1 − ERX − P(|x|−1)/Q(|x|−1).
    let erfc1 = erfc_mid(ax);

    // 1.25 ≤ |x| < 6: erfc = e^(−z² − 0.5625) · e^((z − |x|)(z + |x|) + R/S) / |x|, z = |x| with
    // the low 13 mantissa bits cleared.
    let s2 = 1.0 / (ax * ax);
    let ra =
        RA[0] + s2 * (RA[1] + s2 * (RA[2] + s2 * (RA[3] + s2 * (RA[4] + s2 * (RA[5] + s2 * (RA[6] + s2 * RA[7]))))));
    let sa = 1.0
        + s2 * (SA[0]
            + s2 * (SA[1] + s2 * (SA[2] + s2 * (SA[3] + s2 * (SA[4] + s2 * (SA[5] + s2 * (SA[6] + s2 * SA[7])))))));
    let rb = RB[0] + s2 * (RB[1] + s2 * (RB[2] + s2 * (RB[3] + s2 * (RB[4] + s2 * (RB[5] + s2 * RB[6])))));
    let sb = 1.0 + s2 * (SB[0] + s2 * (SB[1] + s2 * (SB[2] + s2 * (SB[3] + s2 * (SB[4] + s2 * (SB[5] + s2 * SB[6]))))));
    let near = ix < 0x4036_db6d; // |x| < 1/0.35
    let (rr, ss) = if near { (ra, sa) } else { (rb, sb) };
    // Outside [1.25, 6) the arguments are clamped into expf's domain; those lanes are not selected.
    let mid = (0x3fa0_0000..0x40c0_0000).contains(&ix);
    let am = if mid { ax } else { 2.0 };
    let zz = f32::from_bits(am.to_bits() & 0xffff_e000);
    let (rr, ss) = if mid { (rr, ss) } else { (0.0, 1.0) };
    let erfc2 = expf_erf_domain(-zz * zz - 0.5625) * expf_erf_domain((zz - am) * (zz + am) + rr / ss) / am;

    let erfc = if ix < MID { erfc1 } else { erfc2 };
    let y = if ix < 0x40c0_0000 { 1.0 - erfc } else { 1.0 - f32::from_bits(0x0380_0000) };
    let y = if negative { -y } else { y };
    let y = if ix < SMALL { erff_small(x) } else { y };
    // NaN stays NaN, ±∞ gives ±1 (libm: 1 − 2·sign + 1/x).
    let sign = if negative { 1.0f32 } else { 0.0 };
    if ix >= 0x7f80_0000 {
        1.0 - 2.0 * sign + 1.0 / x
    } else {
        y
    }
}

#[inline(always)]
fn erf_lanes(v: &mut [f32]) {
    for v in v {
        *v = erff(*v);
    }
}

/// Elements per block of [`erf_avx512`]: its compacted values and masks stay in L1.
#[cfg(target_arch = "x86_64")]
const BLOCK: usize = 1024;

/// [`erf_lanes`] with the costly branches evaluated only where needed: every lane takes
/// [`erff_small`]; the lanes with |x| ≥ 0.84375 (and NaN, ±∞) are packed together and take
/// [`erff_mid`]; of those, the lanes with |x| ≥ 1.25 are packed again and take the whole
/// [`erff`]. Each element's value is its own branch's, so nothing changes but the cost.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn erf_avx512(v: &mut [f32]) {
    let (lanes, tail) = v.split_at_mut(v.len() / 16 * 16);
    for block in lanes.chunks_mut(BLOCK) {
        // Closures inherit the function's target features, so each loop runs in AVX-512 lanes.
        let small = |v: &mut [f32]| v.iter_mut().for_each(|x| *x = erff_small(*x));
        let mid = |v: &mut [f32]| v.iter_mut().for_each(|x| *x = erff_mid(*x));
        split_by_magnitude(block, SMALL, small, |far| split_by_magnitude(far, MID, mid, erf_lanes));
    }
    erf_lanes(tail)
}

/// `near(v)` on every lane, then `far` only on the lanes whose magnitude bits are `bound` or
/// more: packed into a buffer (`vcompressps`), evaluated there (in whole 16-lane vectors; the
/// padding lanes are ignored) and unpacked over `near`'s values (`vexpandps`). `v.len()` is a
/// multiple of 16 and at most [`BLOCK`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn split_by_magnitude(v: &mut [f32], bound: u32, near: impl Fn(&mut [f32]), far: impl Fn(&mut [f32])) {
    use std::arch::x86_64::*;
    let mut packed = [0f32; BLOCK];
    let mut masks = [0u16; BLOCK / 16];
    let mut n = 0;
    for (c, m) in v.chunks_exact(16).zip(masks.iter_mut()) {
        let x = _mm512_loadu_ps(c.as_ptr());
        let ix = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fff_ffff));
        *m = _mm512_cmpge_epu32_mask(ix, _mm512_set1_epi32(bound as i32));
        // SAFETY: n + popcount(m) ≤ the lanes seen so far ≤ BLOCK.
        _mm512_mask_compressstoreu_ps(packed.as_mut_ptr().add(n), *m, x);
        n += m.count_ones() as usize;
    }
    near(v);
    far(&mut packed[..n.div_ceil(16) * 16]);
    let mut n = 0;
    for (c, &m) in v.chunks_exact_mut(16).zip(masks.iter()) {
        // SAFETY: reads popcount(m) values at packed[n..], all written above.
        let y = _mm512_mask_expandloadu_ps(_mm512_loadu_ps(c.as_ptr()), m, packed.as_ptr().add(n));
        _mm512_storeu_ps(c.as_mut_ptr(), y);
        n += m.count_ones() as usize;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn erf_avx2(v: &mut [f32]) {
    erf_lanes(v)
}

/// `v[i] = erff(v[i])`, libm's value bit for bit.
pub(crate) fn erf_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above); the function only
            // compiles the same safe loop with that feature enabled.
            return unsafe { erf_avx512(v) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above, for AVX2.
            return unsafe { erf_avx2(v) };
        }
    }
    erf_lanes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(xs: &[f32]) {
        crate::ops::testing::check_lanes("erf", xs, erf_in_place, candle_core::cpu::erf::erf_f32)
    }

    #[test]
    fn every_branch_matches_libm_bit_for_bit() {
        // Every 256th f32 bit pattern (16.8 M values: both signs, subnormals, every branch,
        // ±∞ and NaNs).
        let xs: Vec<f32> = (0..=u32::MAX / 256).map(|i| f32::from_bits(i * 256 + 17)).collect();
        check(&xs);
        // The branch edges and the values GELU feeds it, densely.
        let edges = [0.0f32, 2f32.powi(-28), 0.84375, 1.25, 1.0 / 0.35, 6.0, f32::INFINITY];
        let near: Vec<f32> = edges
            .iter()
            .flat_map(|&e| (-300i32..300).flat_map(move |d| [f32::from_bits((e.to_bits() as i32 + d).max(0) as u32)]))
            .flat_map(|v| [v, -v])
            .collect();
        check(&near);
        let dense: Vec<f32> = (0..2_000_000).map(|i| (i as f32 - 1e6) * 8e-6).collect();
        check(&dense);
    }
}
