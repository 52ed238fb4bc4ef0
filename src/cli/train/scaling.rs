//! `train --loss-scale`: a fixed power of two (`auto` or `L`, as `step` and `sweep` take it) or
//! dynamic loss scaling (`dynamic`, or `dynamic:L` to start at `L`; see
//! [`crate::training::loss_scale`]), and what `train.csv`, `train.json` and the progress lines
//! say of it.
//!
//! Key design decision: the run's shape keeps a fixed [`LossScale`] and a dynamic run's trainer
//! overrides it step by step, so `step` and `sweep` (one step each) keep their flag unchanged.
//! At the fast fidelity the numerics are the f32 CPU reference's and take no scale: `dynamic`
//! is accepted and does nothing there, as a fixed scale does (the scale columns stay empty).
//!
//! What it is not: the law itself (in the library), nor the state's reader.

use serde_json::{Value, json};

use crate::runtime::LossScale;
use crate::training::loss_scale::{DEFAULT_WINDOW, DynamicLossScale};
use crate::training::{StepRecord, Trainer};

/// What `--loss-scale` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScaleSetting {
    /// The same scale for every step.
    Fixed(LossScale),
    /// Dynamic, starting at `2^start`, or, without, where `auto` resolves.
    Dynamic { start: Option<u8> },
}

const DYNAMIC: &str = "dynamic";

impl ScaleSetting {
    /// `auto`, `L`, `dynamic` or `dynamic:L` (`L` a power of two from 1 to 2^24).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let expected = || {
            format!(
                "expected auto, a power of two from 1 to {} (1, 2, 4, ..., 1024, ...), dynamic or dynamic:L (L such a power of two, the start)",
                1u32 << LossScale::MAX_EXPONENT
            )
        };
        let (dynamic, power) = match text.strip_prefix(DYNAMIC) {
            Some("") => return Ok(Self::Dynamic { start: None }),
            Some(rest) => (true, rest.strip_prefix(':').ok_or_else(expected)?),
            None => (false, text),
        };
        let fixed = crate::cli::step::parse_loss_scale(power).map_err(|_| expected())?;
        match (dynamic, fixed) {
            (false, fixed) => Ok(Self::Fixed(fixed)),
            (true, LossScale::Power(e)) => Ok(Self::Dynamic { start: Some(e) }),
            (true, LossScale::Auto) => Err(expected()),
        }
    }

    /// As the command line spells it (and the state records it).
    pub(crate) fn text(self) -> String {
        match self {
            Self::Fixed(LossScale::Auto) => "auto".into(),
            Self::Fixed(LossScale::Power(e)) => (1u64 << e).to_string(),
            Self::Dynamic { start: None } => DYNAMIC.into(),
            Self::Dynamic { start: Some(e) } => format!("{DYNAMIC}:{}", 1u64 << e),
        }
    }

    pub(crate) fn is_dynamic(self) -> bool {
        matches!(self, Self::Dynamic { .. })
    }

    /// The scale the run's shape carries: the fixed one, or `auto` for a dynamic run (whose
    /// trainer replaces it with its own at every exact step).
    pub(crate) fn fixed(self) -> LossScale {
        match self {
            Self::Fixed(scale) => scale,
            Self::Dynamic { .. } => LossScale::Auto,
        }
    }

    /// A new dynamic run's scale: from its start, or from `2^auto` (what `auto` resolves to for
    /// this step), doubling after `window` clean steps. `None` for a fixed scale.
    pub(crate) fn start(
        self,
        auto: u8,
        window: Option<u64>,
    ) -> Result<Option<DynamicLossScale>, String> {
        let Self::Dynamic { start } = self else {
            return Ok(None);
        };
        let window = window.unwrap_or(DEFAULT_WINDOW);
        DynamicLossScale::new(start.unwrap_or(auto), window)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// `train.csv`'s `loss_scale` field: the scale, empty at the fast fidelity.
pub(crate) fn scale_field(record: &StepRecord) -> String {
    record.loss_scale.map_or(String::new(), |s| s.to_string())
}

/// The progress line's tail for a dynamic run: the scale, and what happened to it.
pub(crate) fn progress_note(record: &StepRecord, trainer: &Trainer) -> String {
    let (Some(used), Some(next)) = (record.loss_scale, trainer.dynamic_scale) else {
        return String::new();
    };
    if record.skipped {
        format!(
            ", loss scale {used}: SKIPPED (the loss or a gradient overflowed: no update; the scale halves to {})",
            next.scale()
        )
    } else {
        format!(", loss scale {used}")
    }
}

/// `train.json`'s `loss_scaling`: the policy and every step's scale and skip (null at the fast
/// fidelity, where no step scales its loss).
pub(crate) fn report(
    setting: ScaleSetting,
    exact: bool,
    trainer: &Trainer,
    log: &[StepRecord],
) -> Value {
    if !exact {
        return Value::Null;
    }
    let dynamic = trainer.dynamic_scale.filter(|_| setting.is_dynamic());
    let skipped: Vec<u64> = log.iter().filter(|r| r.skipped).map(|r| r.step).collect();
    json!({
        "policy": if dynamic.is_some() { "dynamic" } else { "fixed" },
        "flag": setting.text(),
        "window": dynamic.map(|d| d.window()),
        "next_scale": dynamic.map(|d| d.scale()),
        "clean_steps": dynamic.map(|d| d.clean_steps()),
        "per_step": log.iter().map(|r| r.loss_scale).collect::<Vec<_>>(),
        "skipped_steps": skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_fixed_and_dynamic_scales_and_spells_them_back() {
        let cases = [
            ("auto", ScaleSetting::Fixed(LossScale::Auto)),
            ("1", ScaleSetting::Fixed(LossScale::Power(0))),
            ("1024", ScaleSetting::Fixed(LossScale::Power(10))),
            ("dynamic", ScaleSetting::Dynamic { start: None }),
            (
                "dynamic:16777216",
                ScaleSetting::Dynamic { start: Some(24) },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ScaleSetting::parse(text), Ok(want), "{text}");
            assert_eq!(want.text(), text);
        }
        for bad in [
            "dynamic:",
            "dynamic:auto",
            "dynamic:3",
            "dynamic:33554432",
            "dynamics",
            "0",
        ] {
            let err = ScaleSetting::parse(bad).unwrap_err();
            assert!(
                err.starts_with("expected auto, a power of two"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_dynamic_run_starts_where_auto_resolves_unless_told() {
        let auto = ScaleSetting::Dynamic { start: None };
        let start = auto.start(5, None).unwrap().unwrap();
        assert_eq!((start.exponent(), start.window()), (5, DEFAULT_WINDOW));
        let told = ScaleSetting::Dynamic { start: Some(24) };
        let start = told.start(5, Some(3)).unwrap().unwrap();
        assert_eq!((start.scale(), start.window()), (16_777_216.0, 3));
        assert_eq!(
            ScaleSetting::Fixed(LossScale::Auto).start(5, None),
            Ok(None)
        );
        assert!(auto.start(0, Some(0)).unwrap_err().contains("at least 1"));
    }
}
