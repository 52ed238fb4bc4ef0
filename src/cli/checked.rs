//! How the commands show an exact step's numerics against the CPU reference
//! ([`crate::runtime::ReferenceCheck`]): one line of distances, a warning beyond the tolerance
//! the tests hold, and the JSON object of the reports. Not the measuring itself
//! (`runtime::check`).

use serde_json::{Value, json};
use wafersim_kernels::Precision;

use crate::runtime::ReferenceCheck;

/// The storage type as the summaries' headers name it: `fp16 (loss scale 128)` when the step
/// scaled its loss (`--loss-scale`), the type alone otherwise.
pub(crate) fn dtype_label(precision: Precision, loss_scale: Option<f32>) -> String {
    match loss_scale {
        Some(scale) if scale != 1.0 => format!("{} (loss scale {scale})", precision.name()),
        _ => precision.name().to_string(),
    }
}

/// `checked against the CPU reference: loss within .., gradients within .. (..)`.
pub(crate) fn summary(check: &ReferenceCheck) -> String {
    format!(
        "checked against the CPU reference: loss within {:.1e}, gradients within {:.1e} (relative L2 per tensor, floored at {:.0e} of the gradient's norm; worst {})",
        check.loss_error, check.gradient_error, check.tolerance.floor, check.worst_gradient
    )
}

/// A `warning:` line when the distances exceed what the tests allow for `precision`.
pub(crate) fn warning(check: &ReferenceCheck, precision: Precision) -> Option<String> {
    let name = precision.name();
    let cause = match precision {
        Precision::F32 => "",
        Precision::F16 => ": fp16 rounding, underflow or overflow of these values",
    };
    (!check.within()).then(|| {
        format!(
            "warning: the fabric's loss and gradients are further from the CPU reference than the tests allow for {name} (loss {:.0e}, gradients {:.0e}){cause}",
            check.tolerance.loss, check.tolerance.gradient
        )
    })
}

/// The report's `reference_check` object.
pub(crate) fn json(check: &ReferenceCheck) -> Value {
    json!({
        "loss_relative_error": check.loss_error,
        "gradient_relative_l2": check.gradient_error,
        "worst_gradient": check.worst_gradient,
        "tolerance": { "loss": check.tolerance.loss, "gradient": check.tolerance.gradient, "floor": check.tolerance.floor },
        "within_tolerance": check.within(),
    })
}
