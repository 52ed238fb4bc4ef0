//! What each operation of a step cost, and the step's totals by phase and by operation.

use crate::flops::{OpKind, Phase};
use crate::model::SparseKind;

/// One operation of the step: which kernel run it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// The block, or `None` for the embedding and the head.
    pub layer: Option<usize>,
    /// Short name (`q`, `attention`, `ln_2`, `lm_head`, ...).
    pub name: &'static str,
    pub phase: Phase,
    /// The matmuls of the FLOP convention this kernel run executes (its FMACs must equal their
    /// analytic count); empty for non-matmul work.
    pub matmuls: &'static [OpKind],
    /// Whether the kernel streams a sparse matrix (its dense baseline is timed separately).
    pub sparse: bool,
}

impl Op {
    /// A non-matmul operation.
    pub fn plain(layer: Option<usize>, name: &'static str, phase: Phase) -> Self {
        Op {
            layer,
            name,
            phase,
            matmuls: &[],
            sparse: false,
        }
    }

    /// One of the six sparse linear layers.
    pub fn linear(layer: usize, kind: SparseKind, phase: Phase) -> Self {
        let matmuls: &'static [OpKind] = match kind {
            SparseKind::Q => &[OpKind::Linear(SparseKind::Q)],
            SparseKind::K => &[OpKind::Linear(SparseKind::K)],
            SparseKind::V => &[OpKind::Linear(SparseKind::V)],
            SparseKind::AttnProj => &[OpKind::Linear(SparseKind::AttnProj)],
            SparseKind::Fc => &[OpKind::Linear(SparseKind::Fc)],
            SparseKind::FcProj => &[OpKind::Linear(SparseKind::FcProj)],
        };
        Op {
            layer: Some(layer),
            name: kind.name(),
            phase,
            matmuls,
            sparse: true,
        }
    }

    /// The attention kernel (scores, softmax, values).
    pub fn attention(layer: usize, phase: Phase) -> Self {
        Op {
            layer: Some(layer),
            name: "attention",
            phase,
            matmuls: &[OpKind::AttnScores, OpKind::AttnValues],
            sparse: false,
        }
    }

    /// A matmul of the LM head.
    pub fn lm_head(phase: Phase) -> Self {
        Op {
            layer: None,
            name: "lm_head",
            phase,
            matmuls: &[OpKind::LmHead],
            sparse: false,
        }
    }

    /// `layer.name.phase`, for errors.
    pub fn label(&self) -> String {
        match self.layer {
            Some(l) => format!("layer {l} {} ({})", self.name, self.phase.name()),
            None => format!("{} ({})", self.name, self.phase.name()),
        }
    }
}

/// One kernel run's cost.
#[derive(Clone, Debug, PartialEq)]
pub struct OpRecord {
    pub op: Op,
    /// The pass of the step that ran it (`StepPlan::passes`; 0 for a step of one pass).
    pub pass: usize,
    pub cycles: u64,
    /// The same kernel streaming every weight (equal to `cycles` unless `op.sparse`).
    pub dense_cycles: u64,
    /// FMACs executed: counted by the simulator (exact), the analytic count (fast).
    pub fmacs: u64,
    /// Core cycles spent running tasks, summed over the region (exact fidelity only).
    pub busy_cycles: Option<u64>,
    /// Wavelets moved by routers, summed over the region (exact fidelity only).
    pub router_forwards: Option<u64>,
}

/// Every kernel run of a step, in execution order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepCost {
    pub records: Vec<OpRecord>,
}

impl StepCost {
    pub fn push(&mut self, record: OpRecord) {
        self.records.push(record);
    }

    /// Cycles of the step.
    pub fn cycles(&self) -> u64 {
        self.records.iter().map(|r| r.cycles).sum()
    }

    /// Cycles of the same step with every weight streamed.
    pub fn dense_cycles(&self) -> u64 {
        self.records.iter().map(|r| r.dense_cycles).sum()
    }

    /// FLOPs of the matmuls the fabric executed (2 per FMAC of the matmul kernels).
    pub fn executed_matmul_flops(&self) -> u64 {
        self.records
            .iter()
            .filter(|r| !r.op.matmuls.is_empty())
            .map(|r| 2 * r.fmacs)
            .sum()
    }

    /// `(phase, cycles, dense cycles)` for the three phases.
    pub fn by_phase(&self) -> Vec<(Phase, u64, u64)> {
        Phase::ALL
            .iter()
            .map(|&p| {
                let of = self.records.iter().filter(|r| r.op.phase == p);
                let (c, d) = of.fold((0, 0), |(c, d), r| (c + r.cycles, d + r.dense_cycles));
                (p, c, d)
            })
            .collect()
    }

    /// `(operation name, cycles, dense cycles)` summed over layers and phases, in first-run order.
    pub fn by_op(&self) -> Vec<(&'static str, u64, u64)> {
        let mut out: Vec<(&'static str, u64, u64)> = Vec::new();
        for r in &self.records {
            match out.iter_mut().find(|(n, _, _)| *n == r.op.name) {
                Some(entry) => {
                    entry.1 += r.cycles;
                    entry.2 += r.dense_cycles;
                }
                None => out.push((r.op.name, r.cycles, r.dense_cycles)),
            }
        }
        out
    }
}
