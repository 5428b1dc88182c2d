//! What the multithreaded CPU ops (`layer_norm`, `rms_norm`, `swiglu`, `cpu_attention`) share:
//! the float types they run in ([`Float`], f32 and f64), candle's f32 row sum bit for bit
//! ([`row_sum`]), and contiguous storage access ([`slice`], [`tensor_vec`]).
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};

/// The float types the CPU ops run in.
pub(crate) trait Float:
    Copy + Send + Sync + Default + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn sqrt(self) -> Self;
    /// `v[i] = e^v[i]`, as candle's `exp` (std's, which calls the platform libm) per element;
    /// f32 in SIMD lanes with the same values (`ops::exp`).
    fn exp_in_place(v: &mut [Self]);
    fn neg(self) -> Self;
    fn is_finite(self) -> bool;
    fn from_f64(v: f64) -> Self;
    /// A contiguous row's sum in candle's `vec_reduce_sum` order.
    fn row_sum(row: &[Self]) -> Self;
    fn cpu(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Float for f32 {
    fn mul(self, o: Self) -> Self {
        self * o
    }
    fn div(self, o: Self) -> Self {
        self / o
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn exp_in_place(v: &mut [Self]) {
        super::exp::exp_in_place(v)
    }
    fn neg(self) -> Self {
        -self
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn row_sum(row: &[Self]) -> Self {
        row_sum(row)
    }
    fn cpu(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    fn mul(self, o: Self) -> Self {
        self * o
    }
    fn div(self, o: Self) -> Self {
        self / o
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn exp_in_place(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.exp())
    }
    fn neg(self) -> Self {
        -self
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn row_sum(row: &[Self]) -> Self {
        row.iter().fold(0.0, |a, &v| a + v)
    }
    fn cpu(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// candle's f32 row sum: with AVX2, four 8-lane accumulators over blocks of 32, the tree
/// `(a0 + a1) + (a2 + a3)`, the two 128-bit halves added, two horizontal adds, then the tail in
/// order (`cpu::avx::vec_sum`); without, a plain left-to-right sum.
pub(crate) fn row_sum(row: &[f32]) -> f32 {
    if !avx2() {
        return row.iter().fold(0.0, |a, &v| a + v);
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        // SAFETY: the CPU has AVX2 (checked above); the function compiles the same safe code
        // with it enabled (8-lane adds instead of pairs of 4-lane ones, the same sums).
        unsafe { row_sum_avx2(row) }
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        row_sum_blocks(row)
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
unsafe fn row_sum_avx2(row: &[f32]) -> f32 {
    row_sum_blocks(row)
}

/// [`row_sum`]'s AVX2 order.
#[inline(always)]
fn row_sum_blocks(row: &[f32]) -> f32 {
    let np = row.len() & !31;
    let mut acc = [[0f32; 8]; 4];
    for block in row[..np].chunks_exact(32) {
        for (j, acc) in acc.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += block[j * 8 + l];
            }
        }
    }
    let x: [f32; 8] = std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    let t0: [f32; 4] = std::array::from_fn(|l| x[l] + x[l + 4]);
    let mut sum = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for &v in &row[np..] {
        sum += v;
    }
    sum
}

fn avx2() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// A contiguous CPU storage's values of type `T`; `what` names it in errors.
pub(crate) fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some(v) = T::cpu(s) else { candle_core::bail!("{what} has dtype {:?}", s.dtype()) };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// A frozen CPU tensor's values; `what` names it in errors ("layer_norm weight").
pub(crate) fn tensor_vec<T: Float>(t: &Tensor, what: &str) -> Result<Vec<T>> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else { candle_core::bail!("{what} is not on the CPU") };
    Ok(slice::<T>(s, layout, what)?.to_vec())
}

/// A new vector of `n` elements written by `f(chunk)` on rayon tasks of `chunk` elements each:
/// each task fills its chunk with `T::default()` first, while the chunk is in cache, so `f`
/// gets initialized memory without a serial `memset` of the whole buffer (or a pass of the
/// pool over it) before the work.
pub(crate) fn par_build<T: Copy + Send + Sync + Default>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut out: Vec<T> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| {
        f(i * chunk, init(c));
    });
    // SAFETY: every chunk of the first n elements was initialized by `init`.
    unsafe { out.set_len(n) };
    out
}

/// [`par_build`] for two outputs of `n` elements each, chunk for chunk.
pub(crate) fn par_build2<T: Copy + Send + Sync + Default>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let (mut a, mut b): (Vec<T>, Vec<T>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    fill_pairs(&mut a.spare_capacity_mut()[..n], &mut b.spare_capacity_mut()[..n], chunk, f);
    // SAFETY: `fill_pairs` initialized the first n elements of both.
    unsafe {
        a.set_len(n);
        b.set_len(n);
    }
    (a, b)
}

/// [`par_build2`] into one buffer of `2 n` elements, the two outputs stacked (`[2, ..]`): for
/// ops that return both halves as one tensor (the allocation's zero fill no longer runs serially
/// on the calling thread).
pub(crate) fn par_build_stacked<T: Copy + Send + Sync + Default>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(2 * n);
    let (a, b) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    fill_pairs(a, b, chunk, f);
    // SAFETY: `fill_pairs` initialized both halves.
    unsafe { out.set_len(2 * n) };
    out
}

/// The task loop of [`par_build2`] and [`par_build_stacked`]: chunk i of `a` and of `b` (equal
/// lengths) initialized by [`init`] and handed to `f(i · chunk, ..)` on one rayon task.
fn fill_pairs<T: Copy + Send + Sync + Default>(
    a: &mut [std::mem::MaybeUninit<T>],
    b: &mut [std::mem::MaybeUninit<T>],
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    a.par_chunks_mut(chunk).zip(b.par_chunks_mut(chunk)).enumerate().for_each(|(i, (ca, cb))| {
        f(i * chunk, init(ca), init(cb));
    });
}

/// `c` filled with `T::default()`, as an initialized slice.
fn init<T: Copy + Default>(c: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    c.fill(std::mem::MaybeUninit::new(T::default()));
    // SAFETY: every element was written on the line above; MaybeUninit<T> has T's layout.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// Elements per independently positioned block of [`seeded_uniform_map`].
const UNIFORM_BLOCK: usize = 1 << 14;

/// `f(u_i)` for the first `n` draws `u_i = rng.random::<f32>()` of
/// `rand::rngs::StdRng::seed_from_u64(seed)`, bit for bit, computed in parallel. StdRng is
/// ChaCha12 and an f32 draw takes one 32-bit word, so draw `i` is word `i` of the stream and a
/// block of draws can start anywhere with `set_word_pos`: the CPU dropout masks keep the exact
/// sequence the demo's numbers and bit-for-bit resume depend on, without one thread drawing
/// them all while the others wait.
pub(crate) fn seeded_uniform_map<T: Send>(n: usize, seed: u64, f: impl Fn(f32) -> T + Sync) -> Vec<T> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    let start = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
    let mut out: Vec<T> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n].par_chunks_mut(UNIFORM_BLOCK).enumerate().for_each(|(b, chunk)| {
        let mut rng = start.clone();
        rng.set_word_pos((b * UNIFORM_BLOCK) as u128);
        for x in chunk {
            x.write(f(rng.random::<f32>()));
        }
    });
    // SAFETY: the loop above wrote each of the first n elements exactly once.
    unsafe { out.set_len(n) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element is written, each chunk at its own offset.
    #[test]
    fn par_build_hands_each_chunk_its_offset() {
        for n in [0, 1, 999, 1000, 2 * 1000 + 5] {
            let v = par_build(n, 1000, |at, c: &mut [f32]| {
                c.iter_mut().enumerate().for_each(|(i, x)| *x = (at + i) as f32)
            });
            assert_eq!(v, (0..n).map(|i| i as f32).collect::<Vec<_>>());
            let (a, b) = par_build2(n, 1000, |at, a: &mut [u32], b: &mut [u32]| {
                a.iter_mut().zip(b.iter_mut()).enumerate().for_each(|(i, (a, b))| (*a, *b) = ((at + i) as u32, 7))
            });
            assert_eq!((a, b), ((0..n as u32).collect(), vec![7; n]));
        }
    }

    /// The parallel blocks give StdRng's serial draws exactly, across block edges and for
    /// lengths that end inside a block.
    #[test]
    fn seeded_uniform_map_is_stdrng_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        for (n, seed) in [(0, 1), (5, 7), (UNIFORM_BLOCK, 3), (3 * UNIFORM_BLOCK + 17, 0xDEAD_BEEF)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let serial: Vec<u32> = (0..n).map(|_| rng.random::<f32>().to_bits()).collect();
            assert_eq!(seeded_uniform_map(n, seed, f32::to_bits), serial, "n {n} seed {seed}");
        }
    }
}
