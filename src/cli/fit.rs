//! Whether a step's attention kernels fit the PEs' SRAM, as `step`, `sweep`, `recipe` and
//! `train` report it: a warning line at the fast fidelity (which costs them anyway), a refusal
//! before anything is simulated at the exact one (whose kernels would refuse them when their
//! turn came), and the bytes in the JSON reports.
//!
//! What it is not: the check itself, which is the kernels' (`AttentionShape::memory`, the same
//! count their plans check).

use serde_json::{Value, json};
use wafersim_kernels::AttentionMemory;
use wafersim_sim::FabricConfig;

use crate::compile::StepPlan;
use crate::model::GptConfig;
use crate::runtime::{Fidelity, attention_memory};

/// The attention kernels' SRAM on the fullest PE of a full pass (`None` where the region
/// refuses them: the step reports that itself).
pub fn attention(
    config: &GptConfig,
    plan: &StepPlan,
    fabric: &FabricConfig,
) -> Option<AttentionMemory> {
    attention_memory(config, plan, fabric).ok()
}

/// What is wrong when the attention kernels need more SRAM than a PE has (`None` when they
/// fit). The fast fidelity costs them anyway ([`attention_warning`]); the exact one refuses
/// the step before simulating anything.
fn attention_overflow(memory: AttentionMemory, fabric: &FabricConfig) -> Option<String> {
    (!memory.fits(fabric.sram_bytes)).then(|| {
        format!(
            "attention does not fit the PEs' SRAM: the fullest PE needs {} B in the forward and {} B in the backward, of {} B (each PE keeps K and V of whole sequences for its features, and the probabilities of its heads)",
            memory.forward_bytes, memory.backward_bytes, fabric.sram_bytes
        )
    })
}

/// Refuses an exact step or sweep whose attention does not fit the SRAM, before anything is
/// simulated (the kernel would refuse it when its turn came).
pub fn refuse_unplaceable_attention(
    memory: Option<AttentionMemory>,
    fabric: &FabricConfig,
    fidelity: Fidelity,
) -> anyhow::Result<()> {
    match memory.and_then(|m| attention_overflow(m, fabric)) {
        Some(what) if fidelity == Fidelity::Exact => anyhow::bail!(
            "{what}: the exact fidelity cannot place it; use shorter sequences, or --fidelity fast to cost it anyway"
        ),
        _ => Ok(()),
    }
}

/// The attention kernels' SRAM on the fullest PE for a report (`null` where the region refuses
/// them).
pub fn attention_json(memory: Option<AttentionMemory>, fabric: &FabricConfig) -> Value {
    memory.map_or(Value::Null, |m| {
        json!({
            "forward_bytes_per_pe": m.forward_bytes, "backward_bytes_per_pe": m.backward_bytes,
            "fits": m.fits(fabric.sram_bytes),
        })
    })
}

/// A warning line for a fast step or sweep whose attention does not fit the SRAM.
pub fn attention_warning(memory: AttentionMemory, fabric: &FabricConfig) -> Option<String> {
    attention_overflow(memory, fabric).map(|what| {
        format!(
            "warning: {what}; the exact fidelity refuses this step, and the attention cycles here are the formula's for a kernel that cannot be placed"
        )
    })
}
