//! Learning-rate schedules: linear warmup, then constant, linear decay to 0 (ivon-lora) or
//! cosine decay to 0.
use serde::{Deserialize, Serialize};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear decay to 0 at the last step (ivon-lora, HF `get_linear_schedule_with_warmup`).
    #[default]
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// The learning rate for 0-based `step` of `total`, with `warmup` linear warmup steps, as HF's
/// schedulers compute it (warmup: lr·(step+1)/warmup... HF uses step/warmup; we follow HF).
pub fn lr_at(base: f64, schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_linear_schedule_values() {
        // get_linear_schedule_with_warmup(opt, 2, 10) multipliers: 0, .5, 1, 7/8, ...
        assert_eq!(lr_at(1.0, Schedule::Linear, 0, 10, 2), 0.0);
        assert_eq!(lr_at(1.0, Schedule::Linear, 1, 10, 2), 0.5);
        assert_eq!(lr_at(1.0, Schedule::Linear, 2, 10, 2), 1.0);
        assert!((lr_at(1.0, Schedule::Linear, 3, 10, 2) - 0.875).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(0.3, Schedule::Constant, 9, 10, 0), 0.3);
    }
}
