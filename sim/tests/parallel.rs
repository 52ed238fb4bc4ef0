//! Parallel runs: the fabric cut into 1, 2 or 4 regions stepped by as many threads gives the
//! same results, statistics and trace bytes, including when backpressure, multicasts and chain
//! reductions cross region boundaries, with other latencies and depths, and when a run fails.

mod common;

use common::spmv::{Spmv, build, gather};
use wafersim_sim::*;

/// Everything a run produced, in comparable form.
#[derive(Debug, PartialEq)]
struct Outcome {
    stats: Stats,
    y_bits: Vec<u32>,
    trace: String,
}

fn whole_window() -> TraceWindow {
    TraceWindow {
        origin: Coord::new(0, 0),
        width: 64,
        height: 64,
        start: 0,
        end: u64::MAX,
    }
}

fn spmv_run(problem: &Spmv, config: FabricConfig, rows: u32, cols: u32, threads: usize) -> Outcome {
    let (program, sinks) = build(problem, config, rows, cols);
    let options = RunOptions {
        trace: Some(whole_window()),
        threads,
        ..RunOptions::default()
    };
    let run = Simulator::new(program).unwrap().run(options).unwrap();
    Outcome {
        y_bits: gather(&run, &sinks).iter().map(|v| v.to_bits()).collect(),
        trace: run.stats.trace.as_ref().unwrap().to_chrome_json(),
        stats: run.stats,
    }
}

fn assert_same_for_1_2_4(name: &str, run: impl Fn(usize) -> Outcome) {
    let one = run(1);
    for threads in [2, 4] {
        let many = run(threads);
        assert!(
            one == many,
            "{name}: {threads} threads differ from 1 (cycles {} vs {}, events {} vs {})",
            one.stats.cycles,
            many.stats.cycles,
            one.stats.events,
            many.stats.events
        );
    }
}

#[test]
fn spmv_is_identical_on_1_2_and_4_threads_wide_and_tall() {
    // Wide (cut into column strips: the partial sums' east chain crosses the boundaries) and
    // tall (row strips: x's multicast down the columns crosses them).
    let problem = Spmv::new(96, 80, 0.4);
    for (cols, rows) in [(8u32, 3u32), (3, 8)] {
        let config = FabricConfig::rectangle(cols, rows).unwrap();
        let name = format!("spmv {cols} x {rows}");
        assert_same_for_1_2_4(&name, |threads| {
            spmv_run(&problem, config.clone(), rows, cols, threads)
        });
    }
}

#[test]
fn spmv_is_identical_with_long_hops_and_shallow_buffers() {
    // Hop latency 3 (pushes across a boundary land three cycles later) and one-wavelet buffers
    // (every link is backpressured).
    let problem = Spmv::new(40, 48, 0.5);
    let config = FabricConfig {
        hop_latency: 3,
        queue_depth: 1,
        ..FabricConfig::rectangle(6, 4).unwrap()
    };
    assert_same_for_1_2_4("spmv, hop 3, depth 1", |threads| {
        spmv_run(&problem, config.clone(), 4, 6, threads)
    });
}

/// A row of `k` PEs passing color 0 east to a slow core at the east end, which does a 56-cycle
/// task per wavelet.
fn slow_row(k: u32, n: u64) -> (Program, Coord, Buf) {
    let c = Color(0);
    let mut p = Program::new(FabricConfig::rectangle(k, 1).unwrap()).unwrap();
    for x in 0..k - 1 {
        p.route(Coord::new(x, 0), c, Port::West, Port::East)
            .unwrap();
    }
    let last = Coord::new(k - 1, 0);
    p.route(last, c, Port::West, Port::Ramp).unwrap();
    let scratch = p.alloc_zeros(last, "scratch", DType::F32, 100).unwrap();
    let acc = p.alloc_f32(last, "acc", &[0.0]).unwrap();
    p.data_task(last, c, "slow", move |ctx| {
        let v = ctx.wavelet().f32();
        ctx.fill(scratch.all(), v);
        let old = ctx.load(acc.at(0));
        ctx.store(acc.at(0), old + v);
    })
    .unwrap();
    p.inject(
        Coord::new(0, 0),
        Port::West,
        (0..n).map(|i| (c, Wavelet::from_f32(i as f32))),
    )
    .unwrap();
    (p, last, acc)
}

#[test]
fn backpressure_across_boundaries_keeps_the_hand_worked_timing() {
    // Wavelet 0 is injected at 0, visible at PE 0 at 1; router x forwards at x + 1, so the last
    // router (k - 1) sends it down the ramp at k and the core has it at k + 2. Each task costs
    // 3 + (1 + 50) + 2 = 56 cycles and the full buffers behind the core keep it fed: task i
    // starts at k + 2 + 56 i and the run ends at k + 2 + 56 n. The row holds 8 x 4 + 4 wavelets,
    // fewer than the 60 sent, so every buffer of the row fills.
    let (k, n) = (8u32, 60u64);
    let mut first: Option<(Stats, String)> = None;
    for threads in [1, 2, 4] {
        let (p, last, acc) = slow_row(k, n);
        let run = Simulator::new(p)
            .unwrap()
            .run(RunOptions {
                trace: Some(whole_window()),
                threads,
                ..RunOptions::default()
            })
            .unwrap();
        let starts: Vec<u64> = run
            .stats
            .trace
            .as_ref()
            .unwrap()
            .events
            .iter()
            .filter_map(|e| match *e {
                TraceEvent::Task { start, .. } => Some(start),
                _ => None,
            })
            .collect();
        let expected: Vec<u64> = (0..n).map(|i| u64::from(k) + 2 + 56 * i).collect();
        assert_eq!(starts, expected, "{threads} threads");
        assert_eq!(run.stats.cycles, u64::from(k) + 2 + 56 * n);
        // 0 + 1 + ... + 59.
        assert_eq!(run.read(last, acc).unwrap(), vec![1770.0]);
        for x in 0..k {
            let pe = run.stats.pe(Coord::new(x, 0)).unwrap();
            assert_eq!(pe.queue_high_water, 4, "PE {x}, {threads} threads");
        }
        // Beyond the timing: every counter (router waits included) and the trace.
        let outcome = (
            run.stats.clone(),
            run.stats.trace.clone().unwrap().to_chrome_json(),
        );
        match &first {
            None => first = Some(outcome),
            Some(one) => assert!(*one == outcome, "{threads} threads differ from 1"),
        }
    }
}

fn failure(threads: usize, make: impl Fn() -> Program) -> String {
    let options = RunOptions {
        threads,
        cycle_limit: Some(400),
        ..RunOptions::default()
    };
    match Simulator::new(make()).unwrap().run(options) {
        Ok(_) => panic!("the run should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn failures_are_reported_identically_whatever_the_thread_count() {
    // A deadlock: the east end's data task is blocked, so the row fills up and stops.
    let blocked = || {
        let (mut p, last, _) = slow_row(6, 40);
        p.block(last, TaskId(0)).unwrap();
        p
    };
    // A cycle limit: the slow row needs 6 + 2 + 56 * 40 cycles.
    let slow = || slow_row(6, 40).0;
    // Two PEs fail in the same cycle: the first by position is reported.
    let two_faults = || {
        let mut p = Program::new(FabricConfig::rectangle(6, 1).unwrap()).unwrap();
        for x in [1u32, 4] {
            let pe = Coord::new(x, 0);
            let a = p.alloc_zeros(pe, "v", DType::F32, 2).unwrap();
            let t = p
                .local_task(pe, "overrun", move |ctx| {
                    ctx.fmac(a.slice(1, 2), a.all(), 1.0)
                })
                .unwrap();
            p.activate(pe, t).unwrap();
        }
        p
    };
    let expected_fault =
        "PE (1, 0), task \"overrun\", cycle 0: fmac: elements 1..3 are outside buffer \"v\" of 2";
    assert_eq!(failure(1, two_faults), expected_fault);
    for make in [&blocked as &dyn Fn() -> Program, &slow, &two_faults] {
        let one = failure(1, make);
        for threads in [2, 3] {
            assert_eq!(failure(threads, make), one, "{threads} threads");
        }
    }
    assert!(failure(2, blocked).starts_with("deadlock at cycle"));
    assert!(failure(2, slow).starts_with("cycle limit 400 reached"));
}
