//! The same program run twice gives identical statistics, results and trace bytes.

mod common;

use common::spmv::{Spmv, build, gather};
use wafersim_sim::*;

fn once() -> (Stats, Vec<f32>, String) {
    let problem = Spmv::new(48, 40, 0.4);
    let (program, sinks) = build(&problem, FabricConfig::rectangle(5, 6).unwrap(), 6, 5);
    let window = TraceWindow {
        origin: Coord::new(1, 1),
        width: 3,
        height: 2,
        start: 10,
        end: 400,
    };
    let options = RunOptions {
        trace: Some(window),
        ..RunOptions::default()
    };
    let run = Simulator::new(program).unwrap().run(options).unwrap();
    let trace = run.stats.trace.as_ref().unwrap().to_chrome_json();
    (run.stats.clone(), gather(&run, &sinks), trace)
}

#[test]
fn two_runs_are_identical_to_the_byte() {
    let (s1, y1, t1) = once();
    let (s2, y2, t2) = once();
    assert_eq!(s1, s2);
    assert_eq!(
        y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        y2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(t1, t2);
    assert!(
        t1.contains("\"name\":\"axpy\""),
        "the window saw the AXPY tasks"
    );
    assert_eq!(
        serde_json::to_string(&s1).unwrap(),
        serde_json::to_string(&s2).unwrap()
    );
}
