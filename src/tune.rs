//! The step's region shape chosen by costing candidates with the fast fidelity (issue 5, item
//! 4): the widest region is not always the fastest, since the per-nonzero cost, the row
//! reductions (longer over more columns) and the load imbalance of the busiest column trade off
//! differently at each sparsity.
//!
//! Candidates: the fabric's columns (at most the model width) and 3/4, 1/2 and 1/4 of them,
//! each with all rows and with half of them; each is planned by [`plan_step_within`] (its own
//! micro-batch and recompute choice) and costed on a one-block proxy: the embedding, block 0
//! (with its own masks) and the head, the block's cycles counted `n_layer` times. The blocks
//! share one shape and their masks are drawn alike, so block 0 stands for all of them; the
//! chosen plan is then costed (or simulated) in full by the caller.
//!
//! What this is not: a per-layer choice. All kernels of a step share one region (the exact
//! runtime has no re-layout between kernels); with identical blocks the per-layer optimum is
//! this one up to mask noise (`docs/scale.md`).

use rayon::prelude::*;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

use crate::compile::{CompileError, RegionLimit, StepPlan, plan_step_within};
use crate::model::GptConfig;
use crate::reference::Batch;
use crate::runtime::{CostInputs, GradientSet, StepCost, cost_step};
use crate::sparsity::ModelMasks;

/// One candidate shape and what it came to.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionTrial {
    pub limit: RegionLimit,
    /// Its plan, or why it has none.
    pub plan: Result<StepPlan, String>,
    /// Cycles of the step as the proxy estimates them (`None`: not planned or not costed).
    pub estimated_cycles: Option<u64>,
}

/// The chosen plan and every candidate tried, in the order tried.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionChoice {
    pub plan: StepPlan,
    pub trials: Vec<RegionTrial>,
}

/// What the search needs.
#[derive(Clone, Copy)]
pub struct RegionSearch<'a> {
    pub config: &'a GptConfig,
    pub masks: &'a ModelMasks,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub precision: Precision,
    /// Whether a plan may recompute the attention (not for the exact fidelity).
    pub allow_recompute: bool,
    /// Prompt vectors in front of every sequence (they take positions like tokens).
    pub prompt_len: usize,
    /// Which gradients the step computes.
    pub gradients: GradientSet,
}

impl RegionSearch<'_> {
    /// `(sequences, positions per sequence)` the plan is made for.
    fn shape(&self) -> (usize, usize) {
        (self.batch.batch, self.batch.seq + self.prompt_len)
    }
}

/// The candidate shapes, widest first, without repeats.
pub fn candidates(config: &GptConfig, fabric: &FabricConfig) -> Vec<RegionLimit> {
    let cols = (fabric.width as usize).min(config.n_embd).max(1);
    let rows = (fabric.height as usize).max(1);
    let mut out: Vec<RegionLimit> = Vec::new();
    for c in [
        cols,
        (3 * cols).div_ceil(4),
        cols.div_ceil(2),
        cols.div_ceil(4),
    ] {
        for r in [rows, rows.div_ceil(2)] {
            let limit = RegionLimit { cols: c, rows: r };
            if !out.contains(&limit) {
                out.push(limit);
            }
        }
    }
    out
}

/// Costs every candidate and keeps the one with the fewest estimated cycles (the first of
/// equals, so the widest on a tie). Fails only if no candidate can be planned: then with the
/// widest's reason.
pub fn choose_region(search: RegionSearch<'_>) -> Result<RegionChoice, CompileError> {
    // Independent trials, collected in candidate order: the same choice on any thread count.
    let trials: Vec<RegionTrial> = candidates(search.config, search.fabric)
        .into_par_iter()
        .map(|limit| trial(search, limit))
        .collect();
    let best = trials
        .iter()
        .filter_map(|t| Some((t.estimated_cycles?, t.plan.as_ref().ok()?)))
        .min_by_key(|(cycles, _)| *cycles)
        .map(|(_, plan)| plan.clone());
    match best {
        Some(plan) => Ok(RegionChoice { plan, trials }),
        None => {
            let widest = plan_step_within(
                search.config,
                search.shape(),
                search.fabric,
                search.precision,
                RegionLimit::fabric(search.fabric),
            )?;
            Ok(RegionChoice {
                plan: widest,
                trials,
            })
        }
    }
}

fn trial(search: RegionSearch<'_>, limit: RegionLimit) -> RegionTrial {
    let plan = plan_step_within(
        search.config,
        search.shape(),
        search.fabric,
        search.precision,
        limit,
    )
    .map_err(|e| e.to_string())
    .and_then(|plan| {
        if plan.recompute_attention && !search.allow_recompute {
            Err("needs the attention recomputed".to_string())
        } else {
            Ok(plan)
        }
    });
    let estimated_cycles = plan.as_ref().ok().and_then(|p| proxy_cycles(search, p));
    RegionTrial {
        limit,
        plan,
        estimated_cycles,
    }
}

/// The step's cycles estimated from the embedding, block 0 and the head (`None` if a kernel
/// refuses the region).
fn proxy_cycles(search: RegionSearch<'_>, plan: &StepPlan) -> Option<u64> {
    let layers = search.config.n_layer;
    let one_block = GptConfig {
        n_layer: layers.min(1),
        ..search.config.clone()
    };
    let masks = search.masks.first_layers(1);
    let cost = cost_step(CostInputs {
        config: &one_block,
        masks: &masks,
        batch: search.batch,
        fabric: search.fabric,
        plan,
        dense_baseline: false,
        prompt_len: search.prompt_len,
        gradients: search.gradients,
    })
    .ok()?;
    Some(scaled(&cost, layers as u64))
}

/// Cycles outside the blocks plus `layers` times those of block 0.
fn scaled(cost: &StepCost, layers: u64) -> u64 {
    cost.records
        .iter()
        .map(|r| match r.op.layer {
            Some(_) => layers * r.cycles,
            None => r.cycles,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_fractions_of_the_widest_region_without_repeats() {
        let xl = GptConfig::preset("mediswift-xl").unwrap();
        let shapes: Vec<(usize, usize)> = candidates(&xl, &FabricConfig::wse2())
            .iter()
            .map(|l| (l.cols, l.rows))
            .collect();
        // 750 columns (fewer than 2048 features), 3/4 = 562.5 -> 563, 375, 187.5 -> 188; 994
        // rows and 497.
        assert_eq!(
            shapes,
            vec![
                (750, 994),
                (750, 497),
                (563, 994),
                (563, 497),
                (375, 994),
                (375, 497),
                (188, 994),
                (188, 497)
            ]
        );
        // A 2 x 1 fabric: 2, 2, 1, 1 columns and 1, 1 rows: two shapes.
        let tiny = GptConfig::preset("tiny").unwrap();
        let small = FabricConfig::rectangle(2, 1).unwrap();
        assert_eq!(candidates(&tiny, &small).len(), 2);
    }

    #[test]
    fn the_cheapest_candidate_wins_and_its_estimate_is_the_full_step_for_one_block() {
        let mut config = GptConfig::preset("tiny").unwrap();
        config.n_layer = 1;
        let masks = ModelMasks::random(&config, 0.75, 1).unwrap();
        let tokens = (0..32).map(|i| (i * 7 % 256) as u32).collect();
        let batch = Batch::new(&config, 2, 16, tokens).unwrap();
        let fabric = FabricConfig::rectangle(16, 16).unwrap();
        let search = RegionSearch {
            config: &config,
            masks: &masks,
            batch: &batch,
            fabric: &fabric,
            precision: Precision::F32,
            allow_recompute: true,
            prompt_len: 0,
            gradients: GradientSet::All,
        };
        let choice = choose_region(search).unwrap();
        let best = choice
            .trials
            .iter()
            .filter_map(|t| t.estimated_cycles)
            .min()
            .unwrap();
        // With one block the proxy is the whole step: the chosen plan costs exactly its
        // estimate, and no candidate costs less.
        let full = cost_step(CostInputs {
            config: &config,
            masks: &masks,
            batch: &batch,
            fabric: &fabric,
            plan: &choice.plan,
            dense_baseline: false,
            prompt_len: 0,
            gradients: GradientSet::All,
        })
        .unwrap();
        assert_eq!(full.cycles(), best);
        assert_eq!(choice.trials.len(), 8);
        for t in &choice.trials {
            let plan = t.plan.as_ref().unwrap();
            assert!(plan.region.cols as usize <= t.limit.cols);
            assert!(plan.region.rows as usize <= t.limit.rows);
        }
    }
}
