//! Where IVON's ε ~ N(0, I) comes from: a seeded, resumable generator, or a hook that supplies
//! ε exactly (golden tests replay the reference's draws through it).
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Elements per independently seeded block of a draw. Blocks are filled in parallel; the result
/// does not depend on the number of threads.
const BLOCK: usize = 1 << 16;

/// State of the seeded noise generator: all it needs to continue exactly where it stopped
/// (saved with the posterior, so a resumed run draws the same ε as an uninterrupted one).
///
/// Draw `d` (one per group and per sample) fills block `b` of its vector from ChaCha8 seeded
/// with `seed`, stream `d`, word position `b·2^40`: counter-based, so blocks are independent
/// and parallel. Differs from ivon-opt: the reference uses torch's global RNG, which it
/// shares with dropout; ours is a separate stream (reference/ivon.md §5.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseState {
    /// The user's seed.
    pub seed: u64,
    /// Number of vectors drawn so far.
    pub draws: u64,
}

impl NoiseState {
    /// A fresh generator.
    pub fn new(seed: u64) -> Self {
        Self { seed, draws: 0 }
    }

    /// Fills `out` with independent standard normal f32 draws and advances the state.
    pub fn fill(&mut self, out: &mut [f32]) {
        let (seed, draw) = (self.seed, self.draws);
        self.draws += 1;
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(block, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(draw);
            rng.set_word_pos((block as u128) << 40);
            for x in chunk {
                *x = StandardNormal.sample(&mut rng);
            }
        });
    }
}

/// A user-supplied source of ε: called once per group and per sample with the group index and
/// the buffer to fill with standard normal values (not yet scaled by σ).
pub type NoiseFn = Box<dyn FnMut(usize, &mut [f32]) + Send>;

/// The noise source of an optimizer.
pub(crate) enum Noise {
    Seeded(NoiseState),
    Injected(NoiseFn),
}

impl Noise {
    pub fn fill(&mut self, group: usize, out: &mut [f32]) {
        match self {
            Noise::Seeded(s) => s.fill(out),
            Noise::Injected(f) => f(group, out),
        }
    }

    pub fn state(&self) -> Option<NoiseState> {
        match self {
            Noise::Seeded(s) => Some(*s),
            Noise::Injected(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_standard() {
        let mut a = NoiseState::new(7);
        let mut b = NoiseState::new(7);
        let mut x = vec![0f32; 200_000];
        let mut y = vec![0f32; 200_000];
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        a.fill(&mut x);
        assert_ne!(x, y, "the second draw must differ");
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "mean {mean} var {var}");
    }
}
