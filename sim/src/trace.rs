//! Execution traces of a chosen rectangle and cycle window, written as Chrome / Perfetto trace
//! JSON.
//!
//! One process per PE (named by its coordinates) with three kinds of track: the core's tasks,
//! the router's forwards, and the core's asynchronous fabric operations. Timestamps are cycles
//! shown as nanoseconds (`ts = cycle / 1000` microseconds), written as exact decimals so the same
//! run gives the same bytes. It is not the recorder (the engine pushes the events) nor a reader.
//!
//! Key design decision: complete (`"X"`) events on one track must nest, or Perfetto drops the
//! ones that partially overlap. Tasks never overlap and forwards overlap only as identical
//! cycles, but a PE's fabric operations run side by side, so they are laid out on as many lanes
//! ("fabric ops", "fabric ops 2", ...) as needed: greedy interval partitioning in start order,
//! each operation on the first lane whose last operation ended at or before its start. The
//! lanes depend on the events only, so the bytes stay the same for any thread count.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::geometry::{Coord, PortSet};
use crate::wavelet::Color;

/// Which PEs and cycles to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceWindow {
    /// North-west PE of the rectangle.
    pub origin: Coord,
    /// Columns of the rectangle.
    pub width: u32,
    /// Rows of the rectangle.
    pub height: u32,
    /// First cycle recorded.
    pub start: u64,
    /// Cycles at or after this are not recorded.
    pub end: u64,
}

impl TraceWindow {
    /// Whether activity on `pe` during `[from, to)` (or at `from` when `to == from`) is kept.
    pub fn covers(&self, pe: Coord, from: u64, to: u64) -> bool {
        let inside = pe.x >= self.origin.x
            && pe.x - self.origin.x < self.width
            && pe.y >= self.origin.y
            && pe.y - self.origin.y < self.height;
        inside && from < self.end && to.max(from + 1) > self.start
    }
}

/// One recorded activity.
#[allow(missing_docs)] // fields are named by what they hold
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// A task ran on the core for `cycles` from `start`.
    Task {
        pe: Coord,
        name: &'static str,
        start: u64,
        cycles: u64,
    },
    /// The router forwarded one wavelet of `color` out of `ports` at `cycle`.
    Forward {
        pe: Coord,
        color: Color,
        cycle: u64,
        ports: PortSet,
    },
    /// An asynchronous fabric operation issued by task `name` ran from `start` to `end`.
    Async {
        pe: Coord,
        name: &'static str,
        start: u64,
        end: u64,
    },
}

impl TraceEvent {
    /// The same event `by` cycles later (a run placed at cycle `by` of a longer timeline).
    pub fn shifted(&self, by: u64) -> TraceEvent {
        let mut e = self.clone();
        match &mut e {
            TraceEvent::Task { start, .. } => *start += by,
            TraceEvent::Forward { cycle, .. } => *cycle += by,
            TraceEvent::Async { start, end, .. } => {
                *start += by;
                *end += by;
            }
        }
        e
    }

    /// The cycle it starts at.
    pub fn start(&self) -> u64 {
        match *self {
            TraceEvent::Task { start, .. } | TraceEvent::Async { start, .. } => start,
            TraceEvent::Forward { cycle, .. } => cycle,
        }
    }
}

/// The events of one run inside a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// What was recorded.
    pub window: TraceWindow,
    /// In the order they happened (cycle, then PE).
    pub events: Vec<TraceEvent>,
}

const CORE_TRACK: u32 = 0;
const ROUTER_TRACK: u32 = 1;
/// The first lane of the fabric operations; lane `k` is track `ASYNC_TRACK + k`.
const ASYNC_TRACK: u32 = 2;

impl Trace {
    /// The trace as Chrome trace-event JSON (readable by Perfetto and `chrome://tracing`).
    pub fn to_chrome_json(&self) -> String {
        let lanes = AsyncLanes::lay_out(&self.events);
        let mut pes: Vec<Coord> = self.events.iter().map(event_pe).collect();
        pes.sort_by_key(|c| (c.y, c.x));
        pes.dedup();
        let mut out = String::from("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
        let mut first = true;
        let mut emit = |line: String| {
            if !first {
                out.push_str(",\n");
            }
            first = false;
            out.push_str(&line);
        };
        for pe in &pes {
            for line in pe_metadata(*pe, lanes.count(*pe)) {
                emit(line);
            }
        }
        for (event, lane) in self.events.iter().zip(&lanes.lane_of) {
            emit(event_json(event, *lane));
        }
        out.push_str("\n]}\n");
        out
    }
}

/// The lane of each asynchronous fabric operation, per PE.
struct AsyncLanes {
    /// Per event, in the trace's order: its lane (0 for tasks and forwards).
    lane_of: Vec<u32>,
    /// Per PE with fabric operations: how many lanes they take.
    lanes_per_pe: BTreeMap<Coord, u32>,
}

impl AsyncLanes {
    /// Greedy interval partitioning of each PE's operations, taken in start order (ties in the
    /// trace's order): an operation goes on the first lane whose last operation ended at or
    /// before its start, else on a new lane. No two operations on a lane overlap, and (for
    /// operations of a cycle or more) the lanes are as few as the most in flight at once.
    fn lay_out(events: &[TraceEvent]) -> AsyncLanes {
        let mut order: Vec<(Coord, u64, usize, u64)> = events
            .iter()
            .enumerate()
            .filter_map(|(index, event)| match *event {
                TraceEvent::Async { pe, start, end, .. } => {
                    Some((pe, start, index, end.max(start)))
                }
                _ => None,
            })
            .collect();
        order.sort_unstable();
        let mut lane_of = vec![0; events.len()];
        let mut lane_ends: BTreeMap<Coord, Vec<u64>> = BTreeMap::new();
        for (pe, start, index, end) in order {
            let lane = place(lane_ends.entry(pe).or_default(), start, end);
            if let Some(slot) = lane_of.get_mut(index) {
                *slot = lane;
            }
        }
        let lanes_per_pe = lane_ends
            .into_iter()
            .map(|(pe, ends)| (pe, ends.len() as u32))
            .collect();
        AsyncLanes {
            lane_of,
            lanes_per_pe,
        }
    }

    /// The lanes `pe`'s fabric operations take (at least one, so every PE shows the track).
    fn count(&self, pe: Coord) -> u32 {
        self.lanes_per_pe.get(&pe).copied().unwrap_or(0).max(1)
    }
}

/// Puts `[start, end)` on the first lane (given by the cycle its last operation ends) free at
/// `start`, opening a new lane if none is; returns the lane.
fn place(lane_ends: &mut Vec<u64>, start: u64, end: u64) -> u32 {
    if let Some((lane, last)) = lane_ends
        .iter_mut()
        .enumerate()
        .find(|(_, last)| **last <= start)
    {
        *last = end;
        return lane as u32;
    }
    lane_ends.push(end);
    (lane_ends.len() - 1) as u32
}

/// The metadata naming `pe`'s process and its tracks: core, router, and `async_lanes` lanes of
/// fabric operations ("fabric ops", "fabric ops 2", ...).
fn pe_metadata(pe: Coord, async_lanes: u32) -> Vec<String> {
    let pid = pid(pe);
    let mut lines = vec![format!(
        "{{\"ph\":\"M\",\"pid\":{pid},\"name\":\"process_name\",\"args\":{{\"name\":\"PE ({}, {})\"}}}}",
        pe.x, pe.y
    )];
    let mut tracks = vec![
        (CORE_TRACK, "core".to_string()),
        (ROUTER_TRACK, "router".to_string()),
        (ASYNC_TRACK, "fabric ops".to_string()),
    ];
    tracks.extend(
        (1..async_lanes).map(|lane| (ASYNC_TRACK + lane, format!("fabric ops {}", lane + 1))),
    );
    for (tid, name) in tracks {
        lines.push(format!(
            "{{\"ph\":\"M\",\"pid\":{pid},\"tid\":{tid},\"name\":\"thread_name\",\"args\":{{\"name\":\"{name}\"}}}}"
        ));
    }
    lines
}

fn event_pe(event: &TraceEvent) -> Coord {
    match *event {
        TraceEvent::Task { pe, .. }
        | TraceEvent::Forward { pe, .. }
        | TraceEvent::Async { pe, .. } => pe,
    }
}

/// A process id that sorts PEs by row then column.
fn pid(pe: Coord) -> u64 {
    u64::from(pe.y) * 100_000 + u64::from(pe.x)
}

/// `cycle` as microseconds with nanosecond precision, exactly.
fn micros(cycle: u64) -> String {
    format!("{}.{:03}", cycle / 1000, cycle % 1000)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// One event as a complete event; `async_lane` places a fabric operation (see [`AsyncLanes`]).
fn event_json(event: &TraceEvent, async_lane: u32) -> String {
    match *event {
        TraceEvent::Task {
            pe,
            name,
            start,
            cycles,
        } => format!(
            "{{\"ph\":\"X\",\"pid\":{},\"tid\":{CORE_TRACK},\"name\":\"{}\",\"ts\":{},\"dur\":{}}}",
            pid(pe),
            escape(name),
            micros(start),
            micros(cycles)
        ),
        TraceEvent::Forward {
            pe,
            color,
            cycle,
            ports,
        } => format!(
            "{{\"ph\":\"X\",\"pid\":{},\"tid\":{ROUTER_TRACK},\"name\":\"color {} -> {}\",\"ts\":{},\"dur\":{}}}",
            pid(pe),
            color.0,
            escape(&ports.to_string()),
            micros(cycle),
            micros(1)
        ),
        TraceEvent::Async {
            pe,
            name,
            start,
            end,
        } => format!(
            "{{\"ph\":\"X\",\"pid\":{},\"tid\":{},\"name\":\"{}\",\"ts\":{},\"dur\":{}}}",
            pid(pe),
            ASYNC_TRACK + async_lane,
            escape(name),
            micros(start),
            micros(end.saturating_sub(start))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Port;

    #[test]
    fn one_cycle_is_one_nanosecond() {
        assert_eq!(micros(0), "0.000");
        assert_eq!(micros(1), "0.001");
        assert_eq!(micros(123_456), "123.456");
    }

    #[test]
    fn window_covers_rectangle_and_cycles() {
        let w = TraceWindow {
            origin: Coord::new(1, 1),
            width: 2,
            height: 1,
            start: 10,
            end: 20,
        };
        assert!(w.covers(Coord::new(2, 1), 15, 16));
        assert!(!w.covers(Coord::new(3, 1), 15, 16));
        assert!(!w.covers(Coord::new(1, 0), 15, 16));
        assert!(
            w.covers(Coord::new(1, 1), 5, 11),
            "a span reaching into the window"
        );
        assert!(!w.covers(Coord::new(1, 1), 5, 10));
        assert!(!w.covers(Coord::new(1, 1), 20, 20));
        assert!(w.covers(Coord::new(1, 1), 19, 19), "an instant inside");
    }

    #[test]
    fn chrome_json_parses_and_names_tracks() {
        let trace = Trace {
            window: TraceWindow {
                origin: Coord::new(0, 0),
                width: 1,
                height: 1,
                start: 0,
                end: 99,
            },
            events: vec![
                TraceEvent::Task {
                    pe: Coord::new(0, 0),
                    name: "axpy",
                    start: 5,
                    cycles: 12,
                },
                TraceEvent::Forward {
                    pe: Coord::new(0, 0),
                    color: Color(3),
                    cycle: 2,
                    ports: PortSet::of(&[Port::Ramp, Port::South]),
                },
            ],
        };
        let v: serde_json::Value = serde_json::from_str(&trace.to_chrome_json()).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        assert_eq!(
            events.len(),
            1 + 3 + 2,
            "process name, three thread names, two events"
        );
        let task = &events[4];
        assert_eq!(task["name"], "axpy");
        assert_eq!(task["ts"].as_f64().unwrap(), 0.005);
        assert_eq!(task["dur"].as_f64().unwrap(), 0.012);
        assert_eq!(events[5]["name"], "color 3 -> {RAMP, SOUTH}");
    }

    fn fabric_op(x: u32, name: &'static str, start: u64, end: u64) -> TraceEvent {
        TraceEvent::Async {
            pe: Coord::new(x, 0),
            name,
            start,
            end,
        }
    }

    /// `(pid, tid, name)`: of an event, or of a thread.
    type OnTrack = (u64, u64, String);

    /// The complete events, and the thread names.
    fn tracks(trace: &Trace) -> (Vec<OnTrack>, Vec<OnTrack>) {
        let v: serde_json::Value = serde_json::from_str(&trace.to_chrome_json()).unwrap();
        let key = |e: &serde_json::Value, name: &serde_json::Value| {
            (
                e["pid"].as_u64().unwrap(),
                e["tid"].as_u64().unwrap(),
                name.as_str().unwrap().to_string(),
            )
        };
        let events = v["traceEvents"].as_array().unwrap();
        let spans = events
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| key(e, &e["name"]))
            .collect();
        let threads = events
            .iter()
            .filter(|e| e["name"] == "thread_name")
            .map(|e| key(e, &e["args"]["name"]))
            .collect();
        (spans, threads)
    }

    #[test]
    fn overlapping_fabric_ops_go_on_the_first_free_lane() {
        // PE (0, 0): a [0, 10) opens lane 0; b [5, 15) starts before a ends: lane 1; c [10, 20)
        // starts as a ends: lane 0 again (now busy to 20); d [12, 14): lane 0 busy to 20, lane
        // 1 to 15, so lane 2. PE (1, 0): e [3, 4) has lane 0 of its own. The core task stays
        // on track 0. Lane k is track 2 + k.
        let events = vec![
            fabric_op(0, "a", 0, 10),
            fabric_op(1, "e", 3, 4),
            TraceEvent::Task {
                pe: Coord::new(0, 0),
                name: "t",
                start: 4,
                cycles: 2,
            },
            fabric_op(0, "b", 5, 15),
            fabric_op(0, "c", 10, 20),
            fabric_op(0, "d", 12, 14),
        ];
        let window = TraceWindow {
            origin: Coord::new(0, 0),
            width: 2,
            height: 1,
            start: 0,
            end: 99,
        };
        let expected_spans = [
            (0, 2, "a"),
            (1, 2, "e"),
            (0, 0, "t"),
            (0, 3, "b"),
            (0, 2, "c"),
            (0, 4, "d"),
        ];
        let expected_threads = [
            (0, 0, "core"),
            (0, 1, "router"),
            (0, 2, "fabric ops"),
            (0, 3, "fabric ops 2"),
            (0, 4, "fabric ops 3"),
            (1, 0, "core"),
            (1, 1, "router"),
            (1, 2, "fabric ops"),
        ];
        let owned = |v: &[(u64, u64, &str)]| -> Vec<OnTrack> {
            v.iter().map(|&(p, t, n)| (p, t, n.to_string())).collect()
        };
        let in_order = Trace {
            window,
            events: events.clone(),
        };
        let (spans, threads) = tracks(&in_order);
        assert_eq!(spans, owned(&expected_spans));
        assert_eq!(threads, owned(&expected_threads));

        // The lanes follow the start cycles, not the order the events are listed in.
        let reversed = Trace {
            window,
            events: events.into_iter().rev().collect(),
        };
        let (mut spans, threads) = tracks(&reversed);
        spans.reverse();
        assert_eq!(spans, owned(&expected_spans));
        assert_eq!(threads, owned(&expected_threads));
    }
}
