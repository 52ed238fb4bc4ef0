//! The sweep's cause breakdown (issue 5: "the cause breakdown adds up to the measured gap"):
//! on real sweeps of the tiny model, at both fidelities, the five causes sum to the gap between
//! the FLOP reduction and the cycle reduction, in cycles and in reduction units, and every
//! weight-streamed kernel's parts sum to its cycles.

use proptest::prelude::*;
use wafersim::breakdown::Causes;
use wafersim::model::SparseKind;
use wafersim::model::{GptConfig, GptParams, init_params};
use wafersim::reference::Batch;
use wafersim::runtime::{Fidelity, LossScale};
use wafersim::sparsity::{Mask, stream_of};
use wafersim::sweep::{Sweep, SweepSetup, run_sweep, slowest_layer_heatmap};
use wafersim::utilisation::{LayerKernels, layer_heatmap};
use wafersim_kernels::Precision;
use wafersim_sim::FabricConfig;

fn sweep(
    fidelity: Fidelity,
    fabric: (u32, u32),
    seq: usize,
    seed: u64,
    sparsities: &[f64],
) -> Sweep {
    sweep_of(fidelity, fabric, (2, seq), seed, sparsities)
}

/// [`sweep`] of `(sequences, seq)`.
fn sweep_of(
    fidelity: Fidelity,
    fabric: (u32, u32),
    shape: (usize, usize),
    seed: u64,
    sparsities: &[f64],
) -> Sweep {
    let tiny = Tiny::new(fabric, shape, seed);
    run_sweep(&tiny.setup(fidelity, false), sparsities).unwrap()
}

/// The tiny model with weights and masks from `seed`, `sequences x seq` tokens, a fabric.
struct Tiny {
    config: GptConfig,
    params: GptParams,
    batch: Batch,
    fabric: FabricConfig,
    seed: u64,
}

impl Tiny {
    fn new((width, height): (u32, u32), (b, seq): (usize, usize), seed: u64) -> Self {
        let config = GptConfig::preset("tiny").unwrap();
        let params = init_params(&config, seed);
        let tokens = (0..(b * seq) as u32)
            .map(|i| (i * 7 + seed as u32) % 256)
            .collect();
        let batch = Batch::new(&config, b, seq, tokens).unwrap();
        let fabric = FabricConfig::rectangle(width, height).unwrap();
        Tiny {
            config,
            params,
            batch,
            fabric,
            seed,
        }
    }

    fn setup(&self, fidelity: Fidelity, numerics: bool) -> SweepSetup<'_> {
        SweepSetup {
            config: &self.config,
            params: Some(&self.params),
            batch: &self.batch,
            fabric: &self.fabric,
            precision: Precision::F32,
            seed: self.seed,
            fidelity,
            numerics,
            loss_scale: LossScale::Auto,
        }
    }
}

/// An exact sweep with numerics checks every point against the CPU reference: the check's loss
/// error is the distance of the point's loss from the reference's, computed here on the same
/// masks, and every point is within the tests' tolerance.
#[test]
fn an_exact_sweep_checks_every_point_against_the_reference() {
    use wafersim::reference;
    use wafersim::sparsity::ModelMasks;
    let tiny = Tiny::new((4, 4), (2, 8), 4);
    let sweep = run_sweep(&tiny.setup(Fidelity::Exact, true), &[0.0, 0.5]).unwrap();
    for point in &sweep.points {
        let check = point.check.as_ref().expect("exact with numerics");
        let masks = ModelMasks::random(&tiny.config, point.sparsity, 4).unwrap();
        let mut pruned = tiny.params.clone();
        masks.apply(&mut pruned).unwrap();
        let (want, _) =
            reference::loss_and_grads(&tiny.config, &pruned, &masks, &tiny.batch).unwrap();
        let want = f64::from(want);
        let rel = (point.loss.unwrap() - want).abs() / want;
        assert!(
            (check.loss_error - rel).abs() <= 1e-12,
            "{check:?} vs {rel}"
        );
        assert!(check.within(), "sparsity {}: {check:?}", point.sparsity);
    }
    let costed = sweep_of(Fidelity::Fast, (4, 4), (2, 8), 4, &[0.5]);
    assert!(costed.points.iter().all(|p| p.check.is_none()));
}

/// `|a - b|` within `1e-9` of `scale` (the sums are of a few hundred f64 terms).
fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * scale.max(1.0)
}

fn check_adds_up(sweep: &Sweep) {
    let dense = sweep.dense.cost.cycles() as f64;
    for p in &sweep.points {
        let g = &p.gap;
        // The gap measured from the figures the table prints.
        let (fr, cr) = (sweep.flop_reduction(p), sweep.cycle_reduction(p));
        let measured_cycles = p.cost.cycles() as f64 - dense / fr;
        assert!(
            close(g.gap_cycles, measured_cycles, dense),
            "s {}: gap {} vs measured {measured_cycles}",
            p.sparsity,
            g.gap_cycles
        );
        assert!(
            close(g.causes.total(), measured_cycles, dense),
            "s {}: causes {:?} sum to {}, the gap is {measured_cycles}",
            p.sparsity,
            g.causes,
            g.causes.total()
        );
        let in_x = g.causes_in_reduction();
        assert!(
            close(in_x.total(), fr - cr, fr),
            "s {}: causes sum to {}x, FLOP - cycle reduction is {}x",
            p.sparsity,
            in_x.total(),
            fr - cr
        );
        for (r, part) in p.cost.records.iter().zip(&p.parts) {
            assert_eq!(r.op.sparse, part.is_some(), "{}", r.op.label());
            if let Some(k) = part {
                let sum = k.per_nonzero + k.imbalance + k.fill_drain + k.communication;
                assert!(close(sum, r.cycles as f64, r.cycles as f64));
            }
        }
    }
}

#[test]
fn exact_sweep_causes_add_up_to_the_gap() {
    let s = sweep(Fidelity::Exact, (8, 8), 4, 3, &[0.0, 0.5, 0.9]);
    check_adds_up(&s);
    let zero = &s.points[0];
    assert_eq!(zero.gap.causes, Causes::default(), "sparsity 0 has no gap");
    // At 90 % the step is far from 1 / f: the gap is positive and communication (the
    // reductions that do not shrink with the weights) is part of it.
    let high = &s.points[2].gap;
    assert!(high.gap_cycles > 0.0 && high.causes.communication > 0.0);
}

#[test]
fn the_exact_heatmap_reruns_the_slowest_layers_kernels_as_the_step_ran_them() {
    let tiny = Tiny::new((8, 8), (1, 8), 5);
    let (params, fabric) = (&tiny.params, &tiny.fabric);
    let setup = tiny.setup(Fidelity::Exact, false);
    let s = run_sweep(&setup, &[0.9]).unwrap();
    let point = &s.points[0];
    let map = slowest_layer_heatmap(&setup, &s, point).unwrap().unwrap();
    // Same masks, same kernels: the 18 reruns take exactly the cycles the step's took.
    let step: u64 = point
        .cost
        .records
        .iter()
        .filter(|r| r.op.sparse && r.op.layer == Some(map.layer))
        .map(|r| r.cycles)
        .sum();
    assert_eq!((map.runs, map.cycles), (18, step));
    assert_eq!(map.busy.len(), 64);
    let u = map.mean();
    assert!(u > 0.0 && u < 1.0, "{u}");
    // The fast per-PE model of the same layer: within 5 % of the simulated mean, and every
    // PE column's mean within 10 %.
    let block = &params.blocks[map.layer];
    let masks: Vec<Mask> = SparseKind::ALL
        .iter()
        .map(|&k| {
            let w = &block.linear(k).weight;
            Mask::random(w.rows, w.cols, 0.9, 5, stream_of(map.layer, k)).unwrap()
        })
        .collect();
    let kernels = LayerKernels {
        layer: map.layer,
        masks: &masks,
        sparsity: 0.9,
        plan: &s.plan,
        fabric,
    };
    let fast = layer_heatmap(&kernels, &point.cost, Fidelity::Fast).unwrap();
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(rel(fast.mean(), u) < 0.05, "fast {} exact {u}", fast.mean());
    for c in 0..8 {
        let col = |m: &wafersim::utilisation::Heatmap| {
            (0..8).map(|r| m.utilisation(c, r)).sum::<f64>() / 8.0
        };
        assert!(rel(col(&fast), col(&map)) < 0.10, "column {c}");
    }
}

/// A step of two identical passes costs twice one pass, cause by cause, and its heatmap is
/// the pass's (the causes once planned every kernel with both passes' tokens at once).
#[test]
fn two_identical_passes_double_every_cause() {
    let one = sweep_of(Fidelity::Fast, (8, 8), (2, 64), 3, &[0.0, 0.5]);
    let two = sweep_of(Fidelity::Fast, (8, 8), (4, 64), 3, &[0.0, 0.5]);
    assert_eq!((one.plan.pass_count(), two.plan.pass_count()), (1, 2));
    let (p1, p2) = (&one.points[1], &two.points[1]);
    assert_eq!(p2.cost.cycles(), 2 * p1.cost.cycles());
    let (c1, c2) = (p1.gap.causes.values(), p2.gap.causes.values());
    for (name, (a, b)) in Causes::NAMES.iter().zip(c1.iter().zip(c2)) {
        assert!(
            close(b, 2.0 * a, p2.cost.cycles() as f64),
            "{name}: {a} then {b}"
        );
    }
    let map = |s: &Sweep, b: usize| {
        let tiny = Tiny::new((8, 8), (b, 64), 3);
        let setup = tiny.setup(Fidelity::Fast, false);
        slowest_layer_heatmap(&setup, s, &s.points[1])
            .unwrap()
            .unwrap()
    };
    assert_eq!(map(&one, 2), map(&two, 4));
}

#[test]
fn fast_parts_are_never_negative() {
    // In the formula every chunk waits for its busiest column after the fill, so the per-entry
    // work, the imbalance and the fill never exceed the estimate: communication >= 0.
    let s = sweep(Fidelity::Fast, (16, 16), 16, 1, &[0.5, 0.75, 0.9]);
    for p in &s.points {
        for k in p.parts.iter().flatten() {
            assert!(k.per_nonzero >= 0.0 && k.imbalance >= 0.0 && k.fill_drain >= 0.0);
            assert!(k.communication >= 0.0, "{k:?}");
        }
    }
    // One region for both steps: the per-entry work scales exactly with the kept entries.
    for p in &s.points {
        let c = p.gap.causes.per_nonzero_overhead;
        assert!(close(c, 0.0, s.dense.cost.cycles() as f64), "{c}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn fast_sweep_causes_add_up_to_the_gap(
        seed in 0u64..1000,
        sparsity in 0.05f64..0.95,
        fabric in prop::sample::select(vec![(4, 4), (8, 8), (16, 8), (16, 16)]),
    ) {
        let s = sweep(Fidelity::Fast, fabric, 8, seed, &[sparsity, 0.5]);
        check_adds_up(&s);
    }
}
