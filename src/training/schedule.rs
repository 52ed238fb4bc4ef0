//! The learning rate of each optimizer step: linear warm-up, then cosine decay to a tenth of the
//! peak, as in the GPT-3 recipe the Cerebras Model Zoo configs follow.
//!
//! ```text
//! step s (0-based) of N, warm-up W:
//!   s <  W:  lr = peak (s + 1) / W
//!   s >= W:  lr = min + (peak - min) (1 + cos(pi p)) / 2,   p = (s - W) / max(1, N - W - 1),
//!            min = peak / 10
//! ```
//!
//! So the first step after warm-up runs at the peak and the last at exactly the minimum.
//! What it is not: a scheduler with restarts or per-group rates.

/// A warm-up-then-cosine schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
}

impl LrSchedule {
    /// The floor of the cosine decay, as a fraction of the peak.
    pub const MIN_FRACTION: f64 = 0.1;

    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self
            .total
            .saturating_sub(self.warmup)
            .saturating_sub(1)
            .max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let min = self.peak * Self::MIN_FRACTION;
        min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_is_linear_and_the_decay_ends_at_a_tenth() {
        let s = LrSchedule {
            peak: 1e-3,
            warmup: 4,
            total: 14,
        };
        // Warm-up: 1/4, 2/4, 3/4, 4/4 of the peak.
        assert_eq!(s.at(0), 2.5e-4);
        assert_eq!(s.at(3), 1e-3);
        // Decay over steps 4..=13 (span 9): step 4 peak, step 13 the floor 1e-4.
        assert_eq!(s.at(4), 1e-3);
        assert!((s.at(13) - 1e-4).abs() < 1e-18);
        // Half way (p = 4.5 / 9 = 0.5 is not a step; p = 0.5 at s = 8.5): cos(pi/2) = 0 gives
        // the mean of peak and floor, 5.5e-4; step 8 (p = 4/9) is just above it.
        let mid = 1e-4 + 9e-4 * 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 9.0).cos());
        assert!((s.at(8) - mid).abs() < 1e-18 && s.at(8) > 5.5e-4);
    }

    #[test]
    fn no_warm_up_and_a_single_step_run_at_the_peak() {
        let one = LrSchedule {
            peak: 0.5,
            warmup: 0,
            total: 1,
        };
        assert_eq!(one.at(0), 0.5);
    }
}
