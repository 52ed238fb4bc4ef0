//! Whether the complete events of a Chrome trace nest on every track, as Perfetto requires (it
//! drops events that partially overlap an earlier one on their track). Shared by the engine's
//! trace test and the command line's (`tests/cli_trace.rs` includes this file by path).

#![allow(dead_code)] // each includer uses a different part

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde_json::Value;

/// Microseconds with nanosecond decimals (1 cycle = 1 ns) back to cycles.
pub fn cycles(micros: &Value) -> u64 {
    (micros.as_f64().unwrap() * 1000.0).round() as u64
}

/// Every partial overlap among the complete events of one `(pid, tid)` track. Sorted by start
/// (longer first on ties), each event must end at or before the start of the next one it does
/// not contain; a stack holds the ends of the events around the current one.
pub fn partial_overlaps(events: &[Value]) -> Vec<String> {
    let mut tracks: BTreeMap<(u64, u64), Vec<(u64, u64)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let start = cycles(&e["ts"]);
        let track = (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
        tracks
            .entry(track)
            .or_default()
            .push((start, start + cycles(&e["dur"])));
    }
    let mut found = Vec::new();
    for (track, mut spans) in tracks {
        spans.sort_by_key(|&(start, end)| (start, Reverse(end)));
        let mut around: Vec<u64> = Vec::new();
        for (start, end) in spans {
            while around.last().is_some_and(|&outer| outer <= start) {
                around.pop();
            }
            if let Some(&outer) = around.last().filter(|&&outer| end > outer) {
                found.push(format!(
                    "track {track:?}: [{start}, {end}) crosses the end {outer} of an event around it"
                ));
            }
            around.push(end);
        }
    }
    found
}
