//! A traced program whose asynchronous fabric operations overlap: in its Chrome trace every
//! track's complete events nest (Perfetto drops ones that partially overlap), and no fabric
//! operation is lost by spreading them over lanes.

mod common;

use common::trace_nesting::partial_overlaps;
use serde_json::Value;
use wafersim_sim::*;

/// One PE sends `short` (4 elements) east, then `long` (12) south without waiting; when the
/// short send completes it activates `again`, which sends 4 more east while `long` still runs.
fn overlapping_sends() -> Executed {
    let mut p = Program::new(FabricConfig::rectangle(1, 1).unwrap()).unwrap();
    let pe = Coord::new(0, 0);
    let (east, south) = (Color(1), Color(2));
    p.route(pe, east, Port::Ramp, Port::East).unwrap();
    p.route(pe, south, Port::Ramp, Port::South).unwrap();
    p.collect(pe, Port::East).unwrap();
    p.collect(pe, Port::South).unwrap();
    let short = p.alloc_f32(pe, "short", &[1.0; 4]).unwrap();
    let long = p.alloc_f32(pe, "long", &[2.0; 12]).unwrap();
    let again = p
        .local_task(pe, "again", move |ctx| {
            ctx.send(east, short.all(), Then::Nothing)
        })
        .unwrap();
    let start = p
        .local_task(pe, "start", move |ctx| {
            ctx.send(east, short.all(), Then::Activate(again));
            ctx.send(south, long.all(), Then::Nothing);
        })
        .unwrap();
    p.activate(pe, start).unwrap();
    let options = RunOptions {
        trace: Some(TraceWindow {
            origin: pe,
            width: 1,
            height: 1,
            start: 0,
            end: u64::MAX,
        }),
        ..RunOptions::default()
    };
    Simulator::new(p).unwrap().run(options).unwrap()
}

#[test]
fn overlapping_fabric_ops_nest_on_their_lanes_and_none_is_lost() {
    let run = overlapping_sends();
    let trace = run.stats.trace.as_ref().unwrap();
    let ops: Vec<(u64, u64)> = trace
        .events
        .iter()
        .filter_map(|e| match *e {
            TraceEvent::Async { start, end, .. } => Some((start, end)),
            _ => None,
        })
        .collect();
    // Three sends. The short one (4 wavelets, at most one a cycle) is still running when the
    // long one starts a few cycles later: the two partially overlap, so the old single
    // "fabric ops" track dropped one of them in Perfetto.
    assert_eq!(ops.len(), 3, "{ops:?}");
    let (first, long) = (ops[0], ops[1]);
    assert!(
        long.0 < first.1 && first.1 < long.1,
        "the sends do not partially overlap: {ops:?}"
    );
    assert!(
        ops[2].0 >= first.1,
        "the third send starts once the first is done: {ops:?}"
    );

    let v: Value = serde_json::from_str(&trace.to_chrome_json()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let overlaps = partial_overlaps(events);
    assert!(overlaps.is_empty(), "{overlaps:#?}");
    // Tracks 0 and 1 are the core and the router; the fabric ops are on tracks 2 and up.
    let spans: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let on_lanes = spans
        .iter()
        .filter(|e| e["tid"].as_u64().unwrap() >= 2)
        .count();
    assert_eq!(on_lanes, ops.len(), "every fabric op is still there");
    assert_eq!(spans.len(), trace.events.len());
    // At most two in flight at once: two lanes, the third send back on the first.
    let lanes: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "thread_name" && e["tid"].as_u64().unwrap() >= 2)
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(lanes, ["fabric ops", "fabric ops 2"]);
}
