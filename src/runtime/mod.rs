//! The host side of a training step on the fabric (weight streaming): runs every operation of
//! the forward pass, the loss and the backward pass as kernels on the step's region, streams
//! weights in (kept entries only for the sparse matrices) and gradients out, and returns the
//! loss, every parameter's gradient and what each operation cost.
//!
//! Activations never leave the wafer in the machine being modelled: each kernel leaves its output
//! where the next kernel reads its input (one region, one layout for the whole step). The
//! simulator runs one kernel at a time, so the runtime carries each output to the next kernel as a
//! host-side copy; that copy models data that stays in place and costs no cycles. Weights, biases
//! and LayerNorm parameters are streamed from the host inside the kernels (timed), and weight
//! gradients leave through the fabric's edges (timed).
//!
//! The optimizer runs on the host, as in weight streaming (see [`crate::reference::AdamW`]).
//!
//! Cycles of a step are the sum of its kernels' cycles: kernels do not overlap. For the dense
//! baseline, the kernels of the six sparse matrices are run a second time streaming every weight
//! (all other kernels cost the same either way, since their cycles do not depend on the values).

mod attention;
mod backward;
mod forward;
mod record;

pub use record::{OpRecord, StepCost};

use wafersim_kernels::{KernelError, Precision, Region, StreamedMatrix};
use wafersim_sim::{FabricConfig, RunOptions, Stats};

use crate::compile::StepPlan;
use crate::model::{GptConfig, GptParams, SparseKind};
use crate::reference::Batch;
use crate::sparsity::ModelMasks;

/// One training step to run.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    pub config: &'a GptConfig,
    /// The weights, pruned entries zero.
    pub params: &'a GptParams,
    pub masks: &'a ModelMasks,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub plan: &'a StepPlan,
    /// Also time the sparse matrices' kernels with every weight streamed.
    pub dense_baseline: bool,
}

/// What a step computed and cost.
#[derive(Clone, Debug)]
pub struct StepRun {
    /// Mean next-token cross-entropy, as the fabric computed it.
    pub loss: f64,
    /// Gradient of every parameter (pruned entries zero).
    pub grads: GptParams,
    pub cost: StepCost,
}

/// What can stop a step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: KernelError,
    },
    #[error("{op}: executed {executed} FLOPs, the analytic count is {analytic}: a simulator bug")]
    FlopMismatch {
        op: String,
        executed: u64,
        analytic: u64,
    },
}

/// Runs one training step on the fabric.
pub fn run_step(inputs: StepInputs<'_>) -> Result<StepRun, RuntimeError> {
    let mut step = Step::new(inputs);
    let acts = step.forward()?;
    let grads = step.backward(&acts)?;
    Ok(StepRun {
        loss: acts.loss,
        grads,
        cost: step.cost,
    })
}

/// A `tokens x features` activation, row-major, as the host sees it between kernels.
#[derive(Clone, Debug, Default)]
pub(crate) struct Act {
    pub data: Vec<f32>,
    pub features: usize,
}

/// The running step: inputs, the streamed form of every sparse matrix, and the cost so far.
pub(crate) struct Step<'a> {
    pub inputs: StepInputs<'a>,
    pub cost: StepCost,
    /// Per layer, the six sparse matrices `[in, out]` with their kept entries.
    pub sparse: Vec<[StreamedMatrix; 6]>,
}

impl<'a> Step<'a> {
    fn new(inputs: StepInputs<'a>) -> Self {
        let sparse = inputs
            .params
            .blocks
            .iter()
            .enumerate()
            .map(|(l, block)| {
                SparseKind::ALL.map(|kind| {
                    let w = &block.linear(kind).weight;
                    let mask = inputs.masks.get(l, kind).expect("masks match the model");
                    StreamedMatrix::from_dense(w.rows, w.cols, &w.data, Some(mask.keep()))
                })
            })
            .collect();
        Step {
            inputs,
            cost: StepCost::default(),
            sparse,
        }
    }

    pub fn region(&self) -> Region {
        self.inputs.plan.region
    }

    pub fn tokens(&self) -> usize {
        self.inputs.plan.tokens()
    }

    pub fn precision(&self) -> Precision {
        self.inputs.plan.precision
    }

    pub fn fabric(&self) -> &FabricConfig {
        self.inputs.fabric
    }

    pub fn options(&self) -> RunOptions {
        RunOptions::default()
    }

    /// Records a kernel's cost under `op` (dense cycles equal to its cycles).
    pub fn record(&mut self, op: record::Op, stats: &Stats) {
        self.cost.push(OpRecord::new(op, stats, stats.cycles));
    }
}

/// Wraps a kernel error with the operation it belongs to.
pub(crate) fn kernel_error(op: &record::Op) -> impl FnOnce(KernelError) -> RuntimeError + '_ {
    move |source| RuntimeError::Kernel {
        op: op.label(),
        source,
    }
}
