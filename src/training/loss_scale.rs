//! Dynamic loss scaling of a training run (`train --loss-scale dynamic`): the power of two each
//! exact step scales its loss by, lowered after a step whose loss or gradients overflowed and
//! raised again after a window of clean steps, as mixed-precision trainers do.
//!
//! The law, per step, on the scale `L = 2^e` the step ran with:
//!
//! ```text
//! overflow (the loss or a gradient read back is not finite):
//!     the step is skipped; e = e - 1 and the clean count = 0;   at e = 0 the run stops
//! clean:
//!     clean count + 1; when it reaches the window W: e = min(e + 1, 24) and the clean count = 0
//! ```
//!
//! This is PyTorch's `torch.amp.GradScaler` (`backoff_factor` 0.5, `growth_factor` 2, the count
//! reset by an overflow and by a growth) with a floor of 1 and a ceiling of 2^24
//! ([`LossScale::MAX_EXPONENT`]). An overflow at the floor stops the run, as DeepSpeed's
//! `DynamicLossScaler` (`min_scale` 1, `raise_error_at_min_scale`) does: scaling by less than 1
//! could not help an overflow of gradients that are not scaled up, so the weights or the data
//! are at fault. A run therefore skips at most 24 steps in a row (from 2^24 down to 1).
//!
//! What it is not: hysteresis (Megatron's and DeepSpeed's tolerance of a few overflows before
//! halving) or a scale below 1; and it has no say at the fast fidelity, whose numerics are the
//! f32 CPU reference's and take no scale.
//!
//! Key design decision: the scale is a power of two held as its exponent, so it scales every f32
//! value exactly and its state is two integers that a checkpoint stores and a resumed run
//! continues from ([`super::state`]).

use crate::runtime::LossScale;

/// Clean steps before the scale doubles, without `--loss-scale-window`. PyTorch's 2000 (and
/// DeepSpeed's 1000) would never grow in runs of tens to thousands of steps. At 50
/// a scale sitting at its overflow edge skips one step in 51 (2 %), and a 200-step run can
/// still win back four halvings.
pub const DEFAULT_WINDOW: u64 = 50;

/// The state of dynamic loss scaling: the scale of the next step and the clean steps since the
/// last change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynamicLossScale {
    exponent: u8,
    clean_steps: u64,
    window: u64,
}

/// A state that cannot be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DynamicScaleError {
    #[error("the window is 0 steps; it must be at least 1")]
    EmptyWindow,
    #[error("the scale is 2^{exponent}; at most 2^{max} (LossScale::MAX_EXPONENT)", max = LossScale::MAX_EXPONENT)]
    ScaleTooLarge { exponent: u32 },
    #[error(
        "{clean_steps} clean steps counted, but the scale doubles after {window}: the count is below the window"
    )]
    CountNotBelowWindow { clean_steps: u64, window: u64 },
}

/// What the law did after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleChange {
    /// A clean step; the scale stays.
    Kept,
    /// The window's last clean step: the scale doubled (or stayed at the ceiling).
    Grew,
    /// An overflow: the scale halved.
    Halved,
}

impl DynamicLossScale {
    /// Starting at `2^exponent`, doubling after `window` clean steps.
    pub fn new(exponent: u8, window: u64) -> Result<Self, DynamicScaleError> {
        Self::restore(exponent, 0, window)
    }

    /// The state a checkpoint recorded: the next step's exponent and the clean steps counted.
    pub fn restore(exponent: u8, clean_steps: u64, window: u64) -> Result<Self, DynamicScaleError> {
        if window == 0 {
            return Err(DynamicScaleError::EmptyWindow);
        }
        if exponent > LossScale::MAX_EXPONENT {
            return Err(DynamicScaleError::ScaleTooLarge {
                exponent: u32::from(exponent),
            });
        }
        if clean_steps >= window {
            return Err(DynamicScaleError::CountNotBelowWindow {
                clean_steps,
                window,
            });
        }
        Ok(Self {
            exponent,
            clean_steps,
            window,
        })
    }

    /// The next step's scale as the runtime takes it.
    pub fn loss_scale(&self) -> LossScale {
        LossScale::Power(self.exponent)
    }

    /// The next step's scale, `2^exponent`.
    pub fn scale(&self) -> f64 {
        f64::from(1u32 << self.exponent)
    }

    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    /// Clean steps since the scale last changed (always below the window).
    pub fn clean_steps(&self) -> u64 {
        self.clean_steps
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Whether an overflow now would stop the run (the scale is 1: nothing below to try).
    pub fn at_floor(&self) -> bool {
        self.exponent == 0
    }

    /// After a clean step: one more counted; the window's last doubles the scale (at most
    /// 2^24) and restarts the count.
    pub fn after_clean(&mut self) -> ScaleChange {
        self.clean_steps += 1;
        if self.clean_steps < self.window {
            return ScaleChange::Kept;
        }
        self.clean_steps = 0;
        self.exponent = (self.exponent + 1).min(LossScale::MAX_EXPONENT);
        ScaleChange::Grew
    }

    /// After an overflow: the scale halves and the count restarts. `None` at the floor (scale 1),
    /// where the run stops instead; the state is left as it was.
    pub fn after_overflow(&mut self) -> Option<ScaleChange> {
        let lower = self.exponent.checked_sub(1)?;
        self.exponent = lower;
        self.clean_steps = 0;
        Some(ScaleChange::Halved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scale each step runs with and whether it is skipped, for a scripted sequence of
    /// outcomes (`true`: the step overflows).
    fn run(mut scale: DynamicLossScale, overflows: &[bool]) -> Vec<(f64, bool)> {
        overflows
            .iter()
            .map(|&overflow| {
                let used = scale.scale();
                if overflow {
                    scale.after_overflow().expect("not at the floor");
                } else {
                    scale.after_clean();
                }
                (used, overflow)
            })
            .collect()
    }

    #[test]
    fn halves_on_overflow_and_doubles_after_a_window_of_clean_steps() {
        // Start 2^10, window 3. Worked by hand:
        // step 1 clean    (count 1)            runs at 1024
        // step 2 clean    (count 2)            runs at 1024
        // step 3 overflow -> 2^9, count 0      runs at 1024, skipped
        // step 4 clean    (count 1)            runs at 512
        // step 5 clean    (count 2)            runs at 512
        // step 6 clean    (count 3 = W) -> 2^10, count 0: runs at 512
        // step 7 clean    (count 1)            runs at 1024
        // step 8 overflow -> 2^9               runs at 1024, skipped
        // step 9 overflow -> 2^8               runs at 512, skipped
        // step 10 clean   (count 1)            runs at 256
        let start = DynamicLossScale::new(10, 3).unwrap();
        let outcomes = [
            false, false, true, false, false, false, false, true, true, false,
        ];
        let want = [
            (1024.0, false),
            (1024.0, false),
            (1024.0, true),
            (512.0, false),
            (512.0, false),
            (512.0, false),
            (1024.0, false),
            (1024.0, true),
            (512.0, true),
            (256.0, false),
        ];
        assert_eq!(run(start, &outcomes), want);
        // Where it ends: 2^8 with one clean step counted.
        let mut end = start;
        for &o in &outcomes {
            if o {
                end.after_overflow();
            } else {
                end.after_clean();
            }
        }
        assert_eq!((end.exponent(), end.clean_steps()), (8, 1));
    }

    #[test]
    fn the_scale_stays_within_one_and_two_to_the_24() {
        // At the ceiling a full window restarts the count and keeps 2^24.
        let mut top = DynamicLossScale::new(24, 2).unwrap();
        assert_eq!(top.after_clean(), ScaleChange::Kept);
        assert_eq!(top.after_clean(), ScaleChange::Grew);
        assert_eq!((top.exponent(), top.clean_steps()), (24, 0));
        assert_eq!(top.scale(), 16_777_216.0);
        // At the floor an overflow is refused and changes nothing.
        let mut one = DynamicLossScale::restore(1, 4, 5).unwrap();
        assert_eq!(one.after_overflow(), Some(ScaleChange::Halved));
        assert!(one.at_floor());
        assert_eq!(one.after_overflow(), None);
        assert_eq!(
            (one.exponent(), one.clean_steps(), one.scale()),
            (0, 0, 1.0)
        );
        // From 2^24 it takes exactly 24 overflows to reach the floor.
        let mut high = DynamicLossScale::new(24, 50).unwrap();
        let halvings = std::iter::from_fn(|| high.after_overflow()).count();
        assert_eq!(halvings, 24);
    }

    #[test]
    fn impossible_states_are_refused() {
        assert_eq!(
            DynamicLossScale::new(3, 0),
            Err(DynamicScaleError::EmptyWindow)
        );
        assert_eq!(
            DynamicLossScale::new(25, 1),
            Err(DynamicScaleError::ScaleTooLarge { exponent: 25 })
        );
        assert_eq!(
            DynamicLossScale::restore(3, 7, 7).unwrap_err().to_string(),
            "7 clean steps counted, but the scale doubles after 7: the count is below the window"
        );
        assert_eq!(
            DynamicLossScale::new(2, 1).unwrap().loss_scale(),
            LossScale::Power(2)
        );
    }
}
