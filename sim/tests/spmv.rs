//! The SDK-style sparse matrix-vector product on the fabric: right numbers, right FMAC count,
//! and hand-checked timing on the smallest case.

mod common;

use common::spmv::{Spmv, build, gather};
use wafersim_sim::*;

fn check(problem: &Spmv, rows: u32, cols: u32) -> Executed {
    let config = FabricConfig::rectangle(cols, rows).unwrap();
    let (program, sinks) = build(problem, config, rows, cols);
    let run = Simulator::new(program)
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    let y = gather(&run, &sinks);
    let expected = problem.reference();
    assert_eq!(y.len(), problem.m);
    let scale = expected.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (got, want)) in y.iter().zip(&expected).enumerate() {
        assert!(
            (f64::from(*got) - want).abs() <= 1e-5 * scale,
            "row {i}: {got} vs {want}"
        );
    }
    // One AXPY over every row of A per nonzero of x, and nothing for the zeros.
    assert_eq!(
        run.stats.total.fmacs,
        (problem.nonzeros() * problem.m) as u64
    );
    run
}

#[test]
fn spmv_matches_the_cpu_on_several_layouts() {
    for (m, n, density, rows, cols) in [
        (8, 8, 1.0, 1, 1),
        (16, 24, 0.5, 2, 3),
        (30, 17, 0.3, 4, 4),
        (64, 64, 0.25, 8, 8),
        (5, 40, 0.1, 5, 6),
    ] {
        let problem = Spmv::new(m, n, density);
        check(&problem, rows, cols);
    }
}

#[test]
fn zeros_are_never_sent_and_cost_nothing() {
    // The same matrix with x at 100 % and at 25 % density: the FMACs, the x wavelets through
    // the column routers and the AXPY tasks all scale with the nonzeros.
    let dense = Spmv::new(32, 32, 1.0);
    let mut sparse = Spmv::new(32, 32, 1.0);
    for j in 0..32 {
        if j % 4 != 0 {
            sparse.x[j] = half::f16::ZERO;
        }
    }
    let (rd, rs) = (check(&dense, 4, 4), check(&sparse, 4, 4));
    assert_eq!(rd.stats.total.fmacs, 32 * 32);
    assert_eq!(rs.stats.total.fmacs, 8 * 32);
    // x wavelets reaching cores: each nonzero meets 4 rows of PEs.
    let x_tasks = |r: &Executed| r.stats.total.tasks_run - 16; // one reduce task per PE
    assert_eq!(x_tasks(&rd), 32 * 4);
    assert_eq!(x_tasks(&rs), 8 * 4);
    assert!(rs.stats.cycles < rd.stats.cycles);
}

#[test]
fn the_smallest_spmv_is_timed_as_worked_out_by_hand() {
    // One PE, A 4 x 3, x = [a, 0, b]. The two nonzeros are injected at cycles 0 and 1, cross
    // the north link (visible at 1, 2), the router sends them down the ramp (core at 3, 4).
    // AXPY task: switch 3 + fmac (1 + 4 at width 1) = 8 cycles: 3..11, then 11..19, which
    // activates the reduce task: 19..23 (switch 3 + send issue 1). Its send starts at 23 and
    // puts one wavelet per cycle on the ramp (router at 25..28), which the router sends off the
    // east edge: the sink sees them at 26, 27, 28, 29.
    let mut problem = Spmv::new(4, 3, 1.0);
    problem.x[1] = half::f16::ZERO;
    let run = check(&problem, 1, 1);
    let config = FabricConfig::rectangle(1, 1).unwrap();
    let (program, sinks) = build(&problem, config, 1, 1);
    let again = Simulator::new(program)
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    let arrivals: Vec<u64> = again.sink(sinks[0]).received.iter().map(|r| r.0).collect();
    assert_eq!(arrivals, vec![26, 27, 28, 29]);
    assert_eq!(run.stats.cycles, 29);
    let pe = run.stats.pe(Coord::new(0, 0)).unwrap();
    assert_eq!(pe.busy_cycles, 8 + 8 + 4);
    assert_eq!(pe.tasks_run, 3);
    assert_eq!(pe.wavelets_sent, 4);
}
