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
//! What this is not: a per-layer choice. All kernels of a step share one region (neither
//! runtime has a re-layout of the activations between kernels). Instead the search measures what
//! a per-layer choice could gain: [`RegionChoice::per_operation_bound`] costs every operation on
//! its own cheapest candidate, as if activations moved between shapes for free. On the presets
//! that bound is within 2.5 % of the chosen shape: every weight-streamed kernel prefers the
//! widest region at every sparsity, and only the small LayerNorm and loss kernels would rather
//! have fewer columns (`docs/scale.md`).

use std::collections::BTreeMap;

use rayon::prelude::*;
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

use crate::compile::{CompileError, RegionLimit, StepPlan, plan_step_within};
use crate::flops::Phase;
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
    /// The same estimate split by operation (empty when not costed).
    pub operations: BTreeMap<OperationKey, u64>,
}

/// One operation of the step, all blocks together: whether it is in the blocks (else the
/// embedding or the head), its name and its phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OperationKey {
    pub in_blocks: bool,
    pub name: &'static str,
    pub phase: Phase,
}

/// One operation of the chosen plan against its cheapest candidate shape.
#[derive(Clone, Debug, PartialEq)]
pub struct OperationChoice {
    pub key: OperationKey,
    /// Its estimated cycles on the chosen shape.
    pub chosen_cycles: u64,
    /// Its fewest estimated cycles on any candidate, and that candidate's region.
    pub best_cycles: u64,
    pub best_cols: u32,
    pub best_rows: u32,
}

/// The chosen plan and every candidate tried, in the order tried.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionChoice {
    pub plan: StepPlan,
    pub trials: Vec<RegionTrial>,
}

impl RegionChoice {
    fn chosen_trial(&self) -> Option<&RegionTrial> {
        self.trials
            .iter()
            .find(|t| t.plan.as_ref().ok() == Some(&self.plan) && t.estimated_cycles.is_some())
    }

    /// The proxy's cycles on the chosen plan (`None` if it was not costed).
    pub fn chosen_cycles(&self) -> Option<u64> {
        self.chosen_trial()?.estimated_cycles
    }

    /// Every operation of the chosen plan with its cheapest candidate shape, in key order
    /// (empty if the chosen plan was not costed). When the chosen plan's attention fits, only
    /// candidates whose attention fits compete, as they did for the choice.
    pub fn per_operation(&self) -> Vec<OperationChoice> {
        let Some(chosen) = self.chosen_trial() else {
            return Vec::new();
        };
        let placeable = |plan: &StepPlan| plan.attention_fits || !self.plan.attention_fits;
        chosen
            .operations
            .iter()
            .map(|(&key, &chosen_cycles)| {
                let (best_cycles, region) = self
                    .trials
                    .iter()
                    .filter_map(|t| {
                        let plan = t.plan.as_ref().ok().filter(|p| placeable(p))?;
                        Some((*t.operations.get(&key)?, plan.region))
                    })
                    .min_by_key(|(cycles, _)| *cycles)
                    .expect("the chosen trial has the operation");
                OperationChoice {
                    key,
                    chosen_cycles,
                    best_cycles,
                    best_cols: region.cols,
                    best_rows: region.rows,
                }
            })
            .collect()
    }

    /// The proxy's cycles if every operation of the chosen plan ran on its own cheapest
    /// candidate with the activations re-laid out between shapes for free (and each candidate's
    /// own micro-batches): what a per-layer choice of region could at best come to. `None` if
    /// the chosen plan was not costed.
    pub fn per_operation_bound(&self) -> Option<u64> {
        self.chosen_trial()?;
        Some(self.per_operation().iter().map(|o| o.best_cycles).sum())
    }
}

/// What the search needs.
#[derive(Clone, Copy)]
pub struct RegionSearch<'a> {
    pub config: &'a GptConfig,
    pub masks: &'a ModelMasks,
    pub batch: &'a Batch,
    pub fabric: &'a FabricConfig,
    pub precision: Precision,
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
/// equals, so the widest on a tie) among those whose attention kernels fit, or among all if
/// none does. Fails only if no candidate can be planned: then with the widest's reason.
pub fn choose_region(search: RegionSearch<'_>) -> Result<RegionChoice, CompileError> {
    // Independent trials, collected in candidate order: the same choice on any thread count.
    let trials: Vec<RegionTrial> = candidates(search.config, search.fabric)
        .into_par_iter()
        .map(|limit| trial(search, limit))
        .collect();
    match cheapest(&trials).cloned() {
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

/// The plan of the costed trial with the fewest cycles whose attention kernels fit beside the
/// kept activations, else of the cheapest of all (which the fast fidelity costs with a warning
/// and the exact one refuses); the first of equals.
fn cheapest(trials: &[RegionTrial]) -> Option<&StepPlan> {
    let costed = || {
        trials
            .iter()
            .filter_map(|t| Some((t.estimated_cycles?, t.plan.as_ref().ok()?)))
    };
    costed()
        .filter(|(_, plan)| plan.attention_fits)
        .min_by_key(|(cycles, _)| *cycles)
        .or_else(|| costed().min_by_key(|(cycles, _)| *cycles))
        .map(|(_, plan)| plan)
}

fn trial(search: RegionSearch<'_>, limit: RegionLimit) -> RegionTrial {
    let plan = plan_step_within(
        search.config,
        search.shape(),
        search.fabric,
        search.precision,
        limit,
    )
    .map_err(|e| e.to_string());
    let operations = plan
        .as_ref()
        .ok()
        .and_then(|p| proxy_cost(search, p))
        .map(|cost| by_operation(&cost, search.config.n_layer as u64))
        .unwrap_or_default();
    let estimated_cycles = (!operations.is_empty()).then(|| operations.values().sum());
    RegionTrial {
        limit,
        plan,
        estimated_cycles,
        operations,
    }
}

/// The cost of the embedding, block 0 and the head (`None` if a kernel refuses the region).
fn proxy_cost(search: RegionSearch<'_>, plan: &StepPlan) -> Option<StepCost> {
    let one_block = GptConfig {
        n_layer: search.config.n_layer.min(1),
        ..search.config.clone()
    };
    let masks = search.masks.first_layers(1);
    cost_step(CostInputs {
        config: &one_block,
        masks: &masks,
        batch: search.batch,
        fabric: search.fabric,
        plan,
        dense_baseline: false,
        prompt_len: search.prompt_len,
        gradients: search.gradients,
    })
    .ok()
}

/// The proxy's cycles per operation over every pass: those outside the blocks as they are,
/// block 0's counted `layers` times.
fn by_operation(cost: &StepCost, layers: u64) -> BTreeMap<OperationKey, u64> {
    let mut out = BTreeMap::new();
    for r in &cost.records {
        let key = OperationKey {
            in_blocks: r.op.layer.is_some(),
            name: r.op.name,
            phase: r.op.phase,
        };
        let times = if key.in_blocks { layers } else { 1 };
        *out.entry(key).or_default() += times * r.cycles;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A search for a whole fp32 training step, recompute allowed, without a prompt.
    fn search_on<'a>(
        config: &'a GptConfig,
        masks: &'a ModelMasks,
        batch: &'a Batch,
        fabric: &'a FabricConfig,
    ) -> RegionSearch<'a> {
        RegionSearch {
            config,
            masks,
            batch,
            fabric,
            precision: Precision::F32,
            prompt_len: 0,
            gradients: GradientSet::All,
        }
    }

    #[test]
    fn a_plan_whose_attention_fits_wins_over_a_cheaper_one_that_does_not() {
        let tiny = GptConfig::preset("tiny").unwrap();
        let fabric = FabricConfig::rectangle(4, 4).unwrap();
        let plan = plan_step_within(
            &tiny,
            (2, 8),
            &fabric,
            Precision::F32,
            RegionLimit::fabric(&fabric),
        )
        .unwrap();
        let trial = |rows: usize, cycles: Option<u64>, fits: bool| RegionTrial {
            limit: RegionLimit { cols: 4, rows },
            plan: Ok(StepPlan {
                attention_fits: fits,
                ..plan.clone()
            }),
            estimated_cycles: cycles,
            operations: BTreeMap::new(),
        };
        let fits_of = |t: &[RegionTrial]| -> Option<bool> { cheapest(t).map(|p| p.attention_fits) };
        // The cheapest that fits, though one that does not is cheaper still.
        let trials = [
            trial(4, Some(300), false),
            trial(3, Some(500), true),
            trial(2, Some(400), true),
            trial(1, None, true),
        ];
        let best = cheapest(&trials).unwrap();
        assert!(best.attention_fits);
        assert_eq!(trials[2].plan.as_ref().ok(), Some(best));
        // None fits: the cheapest of all.
        let none = [trial(4, Some(300), false), trial(3, Some(200), false)];
        assert_eq!(none[1].plan.as_ref().ok(), cheapest(&none));
        assert_eq!(fits_of(&none), Some(false));
        // Nothing costed: nothing to pick.
        assert_eq!(fits_of(&[trial(4, None, true)]), None);
    }

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
        let search = search_on(&config, &masks, &batch, &fabric);
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

    /// The search for tiny at 75 %, batch 2 x 32, on 16 x 16 PEs.
    fn tiny_choice() -> RegionChoice {
        let config = GptConfig::preset("tiny").unwrap();
        let masks = ModelMasks::random(&config, 0.75, 3).unwrap();
        let tokens = (0..64).map(|i| (i * 5 % 256) as u32).collect();
        let batch = Batch::new(&config, 2, 32, tokens).unwrap();
        let fabric = FabricConfig::rectangle(16, 16).unwrap();
        choose_region(search_on(&config, &masks, &batch, &fabric)).unwrap()
    }

    #[test]
    fn the_per_operation_bound_takes_each_operation_at_its_cheapest_shape() {
        let choice = tiny_choice();
        let chosen = choice.chosen_cycles();
        // Every candidate's attention fits here, so the chosen one is the cheapest.
        let cheapest = choice
            .trials
            .iter()
            .filter_map(|t| t.estimated_cycles)
            .min();
        assert_eq!(chosen, cheapest);
        let ops = choice.per_operation();
        // The chosen cycles split by operation add back to the estimate; each operation's best
        // is the minimum over the candidates' own splits, never above its chosen cost.
        assert_eq!(Some(ops.iter().map(|o| o.chosen_cycles).sum()), chosen);
        for o in &ops {
            let cheapest = choice
                .trials
                .iter()
                .filter_map(|t| t.operations.get(&o.key))
                .min()
                .copied();
            assert_eq!(Some(o.best_cycles), cheapest, "{:?}", o.key);
            assert!(o.best_cycles <= o.chosen_cycles);
        }
        let bound = choice.per_operation_bound().unwrap();
        assert_eq!(bound, ops.iter().map(|o| o.best_cycles).sum::<u64>());
        assert!(bound <= chosen.unwrap());
    }

    /// While the chosen plan's attention fits, a candidate whose attention does not fit is no
    /// operation's best shape (it could not have been chosen either), however cheap.
    #[test]
    fn unplaceable_candidates_are_no_operations_best_shape() {
        let mut choice = tiny_choice();
        let chosen = choice.plan.clone();
        let other = (choice.trials.iter())
            .position(|t| t.plan.as_ref().is_ok_and(|p| *p != chosen))
            .expect("a second shape");
        // The bound without that candidate at all.
        let mut without = choice.clone();
        without.trials.remove(other);
        let bound = without.per_operation_bound();
        let trial = &mut choice.trials[other];
        trial.operations.values_mut().for_each(|cycles| *cycles = 0);
        if let Ok(plan) = trial.plan.as_mut() {
            plan.attention_fits = false;
        }
        assert_eq!(choice.per_operation_bound(), bound);
        for t in &mut choice.trials {
            if let Ok(plan) = t.plan.as_mut() {
                plan.attention_fits = true;
            }
        }
        assert_eq!(
            choice.per_operation_bound(),
            Some(0),
            "placeable, it wins every operation"
        );
    }

    #[test]
    fn with_one_candidate_the_per_operation_bound_is_its_estimate() {
        let mut config = GptConfig::preset("tiny").unwrap();
        config.n_layer = 1;
        let masks = ModelMasks::random(&config, 0.5, 3).unwrap();
        let batch = Batch::new(&config, 1, 4, vec![1, 2, 3, 4]).unwrap();
        let fabric = FabricConfig::rectangle(1, 1).unwrap();
        let choice = choose_region(search_on(&config, &masks, &batch, &fabric)).unwrap();
        assert_eq!(choice.trials.len(), 1);
        assert!(choice.trials[0].estimated_cycles.is_some());
        assert_eq!(
            choice.per_operation_bound(),
            choice.trials[0].estimated_cycles
        );
    }
}
