//! The cost of the whole MediSwift recipe: sparse pre-training, dense fine-tuning and prompt
//! tuning, each as (fast-fidelity cost of one step) x (steps to see its tokens), against the
//! same recipe with dense pre-training.
//!
//! Key design decision: one step per distinct step kind is costed, at the fast fidelity, with
//! weights that have shapes but no values (the fast engine reads shapes and masks only, never a
//! weight), so MediSwift-XL on the whole wafer needs its masks in memory (one bit per
//! sparsifiable weight, and their per-column counts) and nothing else. Three kinds exist: the
//! sparse step (pre-training), the dense step (fine-tuning, and pre-training in the dense
//! recipe) and the prompt step (a dense frozen model, no weight gradients). Steps are `ceil(tokens / tokens per step)`; a step of prompt
//! tuning carries `P` prompt vectors and `S - P` tokens per sequence, so that every phase runs
//! the same step shape `B x S`.
//!
//! What it is not: a simulation of the run (no numerics, no optimizer cost: AdamW runs on the
//! host, overlapped in weight streaming), or a model of data loading.

use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

use crate::compile::{CompileError, StepPlan, plan_step};
use crate::model::{Block, GptConfig, GptParams, LayerNorm, Linear, Matrix};
use crate::reference::Batch;
use crate::runtime::{
    Fidelity, GradientSet, LossScale, RuntimeError, StepCost, StepInputs, StepMode, simulate_step,
};
use crate::sparsity::{ModelMasks, SparsityError};

/// What the recipe trains on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecipeSpec {
    pub pretrain_tokens: u64,
    pub sparsity: f64,
    pub finetune_tokens: u64,
    pub prompt_tokens: u64,
    /// Prompt vectors per sequence in prompt tuning.
    pub prompt_len: usize,
    pub batch: usize,
    pub seq: usize,
}

/// What can stop a recipe estimate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecipeError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Sparsity(#[from] SparsityError),
    #[error("--prompt-len {prompt_len} leaves no token in sequences of {seq}")]
    PromptTooLong { prompt_len: usize, seq: usize },
}

/// The cost of one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseCost {
    pub name: &'static str,
    pub tokens: u64,
    pub steps: u64,
    /// Matmul FLOPs and cycles of one step.
    pub step_flops: u64,
    pub step_cycles: u64,
}

impl PhaseCost {
    pub fn flops(&self) -> u128 {
        u128::from(self.steps) * u128::from(self.step_flops)
    }

    pub fn cycles(&self) -> u128 {
        u128::from(self.steps) * u128::from(self.step_cycles)
    }
}

/// The recipe and its dense counterpart, phase by phase.
#[derive(Clone, Debug, PartialEq)]
pub struct RecipeCost {
    pub plan: StepPlan,
    pub sparse: Vec<PhaseCost>,
    pub dense: Vec<PhaseCost>,
}

impl RecipeCost {
    pub fn total(phases: &[PhaseCost]) -> (u128, u128) {
        phases
            .iter()
            .fold((0, 0), |(f, c), p| (f + p.flops(), c + p.cycles()))
    }
}

/// Costs the recipe `spec` of `config` on `fabric`.
pub fn recipe_cost(
    config: &GptConfig,
    fabric: &FabricConfig,
    spec: &RecipeSpec,
    seed: u64,
) -> Result<RecipeCost, RecipeError> {
    if spec.prompt_len >= spec.seq.saturating_sub(1) && spec.prompt_tokens > 0 {
        return Err(RecipeError::PromptTooLong {
            prompt_len: spec.prompt_len,
            seq: spec.seq,
        });
    }
    let plan = plan_step(config, spec.batch, spec.seq, fabric, Precision::F32)?;
    let params = shapes_only(config);
    let costing = Costing {
        config,
        fabric,
        plan: &plan,
        params: &params,
    };
    let step_tokens = (spec.batch * spec.seq) as u64;
    let dense = costing.step(&ModelMasks::dense(config), None, GradientSet::All)?;
    let sparse = if spec.pretrain_tokens > 0 {
        costing.step(
            &ModelMasks::random(config, spec.sparsity, seed)?,
            None,
            GradientSet::All,
        )?
    } else {
        dense.clone()
    };
    let prompt_step_tokens = (spec.batch * (spec.seq - spec.prompt_len.min(spec.seq))) as u64;
    let prompt = if spec.prompt_tokens > 0 {
        let vectors = Matrix::zeros(spec.prompt_len, config.n_embd);
        costing.step_prompt(&vectors, spec)?
    } else {
        dense.clone()
    };
    let phase = |name, tokens: u64, per_step: u64, cost: &StepCost| PhaseCost {
        name,
        tokens,
        steps: tokens.div_ceil(per_step.max(1)),
        step_flops: cost.executed_matmul_flops(),
        step_cycles: cost.cycles(),
    };
    let finetune = phase("dense-finetune", spec.finetune_tokens, step_tokens, &dense);
    let prompt = phase(
        "prompt-tune",
        spec.prompt_tokens,
        prompt_step_tokens,
        &prompt,
    );
    Ok(RecipeCost {
        plan,
        sparse: vec![
            phase(
                "sparse-pretrain",
                spec.pretrain_tokens,
                step_tokens,
                &sparse,
            ),
            finetune.clone(),
            prompt.clone(),
        ],
        dense: vec![
            phase("dense-pretrain", spec.pretrain_tokens, step_tokens, &dense),
            finetune,
            prompt,
        ],
    })
}

struct Costing<'a> {
    config: &'a GptConfig,
    fabric: &'a FabricConfig,
    plan: &'a StepPlan,
    params: &'a GptParams,
}

impl Costing<'_> {
    fn step(
        &self,
        masks: &ModelMasks,
        prompt: Option<&Matrix>,
        gradients: GradientSet,
    ) -> Result<StepCost, RecipeError> {
        let seq = self.plan.seq - prompt.map_or(0, |p| p.rows);
        let batch = Batch {
            batch: self.plan.batch,
            seq,
            tokens: vec![0; self.plan.batch * seq],
        };
        let inputs = StepInputs {
            config: self.config,
            params: self.params,
            masks,
            batch: &batch,
            fabric: self.fabric,
            plan: self.plan,
            dense_baseline: false,
            prompt,
            gradients,
            loss_scale: LossScale::Auto,
        };
        let mode = StepMode {
            fidelity: Fidelity::Fast,
            numerics: false,
            check: false,
        };
        Ok(simulate_step(inputs, mode)?.cost)
    }

    fn step_prompt(&self, vectors: &Matrix, spec: &RecipeSpec) -> Result<StepCost, RecipeError> {
        debug_assert_eq!(spec.seq, self.plan.seq);
        self.step(
            &ModelMasks::dense(self.config),
            Some(vectors),
            GradientSet::PromptOnly,
        )
    }
}

/// Parameters with the model's shapes and no values: all the fast engine reads.
fn shapes_only(config: &GptConfig) -> GptParams {
    let empty = |rows, cols| Matrix {
        rows,
        cols,
        data: Vec::new(),
    };
    let linear = |rows, cols| Linear {
        weight: empty(rows, cols),
        bias: Vec::new(),
    };
    let ln = LayerNorm {
        gamma: Vec::new(),
        beta: Vec::new(),
    };
    let (d, f) = (config.n_embd, config.n_inner);
    let block = Block {
        ln_1: ln.clone(),
        q: linear(d, d),
        k: linear(d, d),
        v: linear(d, d),
        attn_proj: linear(d, d),
        ln_2: ln.clone(),
        fc: linear(d, f),
        fc_proj: linear(f, d),
    };
    GptParams {
        wte: empty(config.vocab_size, d),
        wpe: empty(config.n_positions, d),
        blocks: vec![block; config.n_layer],
        ln_f: ln,
    }
}

/// The longest power-of-two sequence (at most `n_positions`) whose step of `batch` sequences
/// fits `fabric`, its attention kernels included, or `None`; an error where no sequence length
/// could fit (a fabric with too few colors or no region).
pub fn longest_fitting_seq(
    config: &GptConfig,
    batch: usize,
    fabric: &FabricConfig,
) -> Result<Option<usize>, CompileError> {
    let mut seq = config.n_positions.next_power_of_two();
    while seq >= 2 {
        let s = seq.min(config.n_positions);
        match plan_step(config, batch, s, fabric, Precision::F32) {
            Ok(plan) if plan.attention_fits => return Ok(Some(s)),
            Ok(_) | Err(CompileError::DoesNotFit { .. }) => seq /= 2,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_params;

    /// The fast engine reads shapes only: weights without values cost what real weights cost.
    #[test]
    fn shape_only_weights_cost_what_real_weights_cost() {
        let config = GptConfig::preset("tiny").unwrap();
        let fabric = FabricConfig::from_spec("4x4").unwrap();
        let plan = plan_step(&config, 2, 16, &fabric, Precision::F32).unwrap();
        let real = init_params(&config, 1);
        let masks = ModelMasks::random(&config, 0.75, 2).unwrap();
        let cost = |params: &GptParams| {
            let c = Costing {
                config: &config,
                fabric: &fabric,
                plan: &plan,
                params,
            };
            c.step(&masks, None, GradientSet::All).unwrap()
        };
        assert_eq!(cost(&real), cost(&shapes_only(&config)));
    }

    /// MediSwift-XL on wse2, one sequence per step: the unblocked attention would not fit
    /// beyond 512 tokens (at 1024 its backward's K/V window and partial dK/dV alone are
    /// 4 x 3 x 1024 f32 = 49,152 bytes, the whole PE), but the blocked kernels fit at the
    /// model's 2048 positions: one sequence keeps 4 x 3 (24 x 54 + 76) = 16,464 bytes per PE
    /// (two softmax statistics per head), and key blocks of some rows fit beside that.
    #[test]
    fn the_default_sequence_is_the_longest_whose_attention_fits() {
        let xl = GptConfig::preset("mediswift-xl").unwrap();
        let wse2 = FabricConfig::wse2();
        assert_eq!(longest_fitting_seq(&xl, 1, &wse2).unwrap(), Some(2048));
        let plan = plan_step(&xl, 1, 2048, &wse2, Precision::F32).unwrap();
        assert_eq!(plan.resident_bytes, 16_464);
        assert!(plan.recompute_attention() && plan.attention_fits);
        let memory = crate::compile::attention_memory(&xl, &plan, &wse2).unwrap();
        assert_eq!(memory.block_rows, Some(plan.attention_block_rows));
        assert!(plan.resident_bytes + memory.beyond_resident <= 49_152);
    }

    /// Tiny, B 2, S 16 (32 tokens per step): 100 pre-training tokens are 4 steps (ceil), the
    /// dense recipe's pre-training costs the fine-tuning step's FLOPs, and at 75 % the sparse
    /// step's FLOPs are the dense ones less 3/4 of the sparse matrices' (3 phases x 2 x T x
    /// 12 d^2 per layer).
    #[test]
    fn steps_round_up_and_only_pretraining_differs() {
        let config = GptConfig::preset("tiny").unwrap();
        let fabric = FabricConfig::from_spec("4x4").unwrap();
        let spec = RecipeSpec {
            pretrain_tokens: 100,
            sparsity: 0.75,
            finetune_tokens: 64,
            prompt_tokens: 50,
            prompt_len: 4,
            batch: 2,
            seq: 16,
        };
        let r = recipe_cost(&config, &fabric, &spec, 0).unwrap();
        assert_eq!(r.sparse[0].steps, 4);
        assert_eq!(r.sparse[1].steps, 2);
        // Prompt steps carry 2 x (16 - 4) = 24 tokens: ceil(50 / 24) = 3.
        assert_eq!(r.sparse[2].steps, 3);
        assert_eq!(r.sparse[1..], r.dense[1..]);
        assert_eq!(r.dense[0].step_flops, r.dense[1].step_flops);
        let sparse_matrix_flops = 3 * 2 * 32 * 2 * 12 * 64 * 64;
        assert_eq!(
            r.dense[0].step_flops - r.sparse[0].step_flops,
            sparse_matrix_flops * 3 / 4
        );
        assert!(r.sparse[2].step_cycles < r.sparse[1].step_cycles);
    }
}
