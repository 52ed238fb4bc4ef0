//! Whether a step's attention kernels fit the PEs' SRAM beside the activations the step keeps,
//! as `step`, `sweep`, `recipe` and `train` report it: a warning line at the fast fidelity
//! (which costs them anyway), a refusal before anything is simulated at the exact one (whose
//! kernels could not be placed), and the bytes in the JSON reports.
//!
//! What it is not: the check itself, which is the compiler's (`StepPlan::attention_fits`, from
//! the kernels' own count, `AttentionShape::memory`).

use serde_json::{Value, json};
use wafersim_sim::FabricConfig;

use crate::compile::{AttentionBytes, StepPlan, attention_memory};
use crate::model::GptConfig;
use crate::runtime::Fidelity;

/// A plan's attention memory and whether it fits.
#[derive(Clone, Copy, Debug)]
pub struct AttentionFit {
    /// On the fullest PE of a full pass (`None` where the region refuses the kernels: the step
    /// reports that itself).
    memory: Option<AttentionBytes>,
    fits: bool,
    /// Bytes of activations a PE keeps for the backward pass.
    resident_bytes: u64,
    sram_bytes: u32,
}

impl AttentionFit {
    pub fn of(config: &GptConfig, plan: &StepPlan, fabric: &FabricConfig) -> Self {
        AttentionFit {
            memory: attention_memory(config, plan, fabric).ok(),
            fits: plan.attention_fits,
            resident_bytes: plan.resident_bytes,
            sram_bytes: fabric.sram_bytes,
        }
    }

    /// What is wrong, when the kernels do not fit (`None` when they do).
    fn overflow(&self) -> Option<String> {
        let m = self.memory.filter(|_| !self.fits)?;
        let held = match m.block_rows {
            None => "each PE keeps K and V of whole sequences for its features, and the probabilities of its heads".to_string(),
            Some(rows) => format!("each PE keeps K and V and the scores of its heads for a key block of {}, the least the blocked kernels take", super::step::rows_text(rows)),
        };
        Some(format!(
            "attention does not fit the PEs' SRAM: on the fullest PE its kernels need {} B (forward) and {} B (backward), of which {} B come on top of the {} B of activations kept for the backward pass, of {} B ({held})",
            m.forward, m.backward, m.beyond_resident, self.resident_bytes, self.sram_bytes
        ))
    }

    /// Refuses an exact step whose attention does not fit, before anything is simulated.
    pub fn refuse_if_exact(&self, fidelity: Fidelity) -> anyhow::Result<()> {
        match self.overflow() {
            Some(what) if fidelity == Fidelity::Exact => anyhow::bail!(
                "{what}: the exact fidelity cannot place it; use shorter sequences, or --fidelity fast to cost it anyway"
            ),
            _ => Ok(()),
        }
    }

    /// The warning line for a fast step whose attention does not fit.
    pub fn warning(&self) -> Option<String> {
        self.overflow().map(|what| {
            format!(
                "warning: {what}; the exact fidelity refuses this step, and the attention cycles here are the formula's for kernels that cannot be placed"
            )
        })
    }

    /// The bytes and the verdict for a JSON report (`null` where the region refuses the
    /// kernels).
    pub fn json(&self) -> Value {
        self.memory.map_or(Value::Null, |m| {
            json!({
                "forward_bytes_per_pe": m.forward, "backward_bytes_per_pe": m.backward,
                "beyond_resident_bytes_per_pe": m.beyond_resident,
                "blocked": m.block_rows.is_some(), "block_rows": m.block_rows,
                "fits": self.fits,
            })
        })
    }
}
