//! The learning rate of each optimizer step: linear warm-up, then cosine decay to a tenth of the
//! peak, as in the GPT-3 recipe the Cerebras Model Zoo configs follow.
//!
//! ```text
//! step s (0-based) of N, warm-up W:
//!   s <  W:  lr = peak (s + 1) / W
//!   s >= W:  lr = min + (peak - min) (1 + cos(pi p)) / 2,   min = peak / 10,
//!            p = min(1, (s - W) / (N - W - 1))      if N - W - 1 >= 1
//!            p = 1, but p = 0 at s = 0              if N - W - 1 <= 0
//! ```
//!
//! So warm-up's last step runs at the peak, the first step after warm-up too, and the run's last
//! step at exactly the minimum. The short runs:
//! - `W = N - 1 >= 1`: the one step after warm-up is the last, so it runs at the minimum (warm-up
//!   reached the peak the step before).
//! - `W = 0, N = 1`: the run's only step runs at the peak.
//! - `W >= N`: the run ends during warm-up: its last step runs at `peak N / W` (the peak itself
//!   when `W = N`) and the decay never starts ([`LrSchedule::ends_during_warm_up`]; `wafersim
//!   train` warns).
//!
//! What it is not: a scheduler with restarts or per-group rates. The rate is a function of the
//! step alone, so a resumed run (`train --resume`) continues the schedule by its step count; a
//! new run from a checkpoint (`train --checkpoint`) starts its own at step 0.

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
        let min = self.peak * Self::MIN_FRACTION;
        let progress = self.decay_progress(step);
        min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// Whether the run ends before the decay starts (`warmup >= total`): its last step runs at
    /// `peak total / warmup`, the peak only when the two are equal.
    pub fn ends_during_warm_up(&self) -> bool {
        self.warmup >= self.total
    }

    /// How far step `step` (not before warm-up's end) is through the cosine decay, 0 to 1.
    fn decay_progress(&self, step: u64) -> f64 {
        let span = self.total.saturating_sub(self.warmup).saturating_sub(1);
        match span {
            // A single step after warm-up is the run's last, so it runs at the floor, unless it
            // is the run's only step (no warm-up to reach the peak): that one runs at the peak.
            0 if step == 0 => 0.0,
            0 => 1.0,
            span => (step.saturating_sub(self.warmup) as f64 / span as f64).min(1.0),
        }
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
        assert!(!one.ends_during_warm_up());
        // Two steps, no warm-up: the peak, then the floor (p = 1 / 1).
        assert_lrs(LrSchedule { total: 2, ..one }, &[0.5, 0.05]);
    }

    /// Every step's rate, checked against `want` to rounding (peak / 10 is one more product).
    #[track_caller]
    fn assert_lrs(s: LrSchedule, want: &[f64]) {
        let got: Vec<f64> = (0..s.total).map(|step| s.at(step)).collect();
        let close = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 1e-15 * w);
        assert!(close, "{got:?} vs {want:?}");
    }

    #[test]
    fn one_step_after_warm_up_runs_at_the_floor() {
        // Steps 3, warm-up 2: 1/2 and 2/2 of the peak, then the last step at peak / 10.
        let s = LrSchedule {
            peak: 1e-3,
            warmup: 2,
            total: 3,
        };
        assert_lrs(s, &[5e-4, 1e-3, 1e-4]);
        assert!(!s.ends_during_warm_up());
        // Steps 2, warm-up 1: the peak, then the floor.
        let s = LrSchedule {
            peak: 0.5,
            warmup: 1,
            total: 2,
        };
        assert_lrs(s, &[0.5, 0.05]);
    }

    #[test]
    fn a_run_no_longer_than_its_warm_up_ends_during_it() {
        // Steps 3, warm-up 5: 1/5, 2/5, 3/5 of the peak, never the peak, never the decay.
        let s = LrSchedule {
            peak: 1e-3,
            warmup: 5,
            total: 3,
        };
        assert_lrs(s, &[2e-4, 4e-4, 6e-4]);
        assert!(s.ends_during_warm_up());
        // Steps 4, warm-up 4: 1/4 .. 4/4: the last step at the peak, no decay.
        let s = LrSchedule {
            peak: 1e-3,
            warmup: 4,
            total: 4,
        };
        assert_lrs(s, &[2.5e-4, 5e-4, 7.5e-4, 1e-3]);
        assert!(s.ends_during_warm_up());
    }
}
