//! Execution traces of a chosen rectangle and cycle window, written as Chrome / Perfetto trace
//! JSON.
//!
//! One process per PE (named by its coordinates) with three tracks: the core's tasks, the
//! router's forwards, and the core's asynchronous fabric operations. Timestamps are cycles shown
//! as nanoseconds (`ts = cycle / 1000` microseconds), written as exact decimals so the same run
//! gives the same bytes.

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
const ASYNC_TRACK: u32 = 2;

impl Trace {
    /// The trace as Chrome trace-event JSON (readable by Perfetto and `chrome://tracing`).
    pub fn to_chrome_json(&self) -> String {
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
            let pid = pid(*pe);
            emit(format!(
                "{{\"ph\":\"M\",\"pid\":{pid},\"name\":\"process_name\",\"args\":{{\"name\":\"PE ({}, {})\"}}}}",
                pe.x, pe.y
            ));
            for (tid, name) in [
                (CORE_TRACK, "core"),
                (ROUTER_TRACK, "router"),
                (ASYNC_TRACK, "fabric ops"),
            ] {
                emit(format!(
                    "{{\"ph\":\"M\",\"pid\":{pid},\"tid\":{tid},\"name\":\"thread_name\",\"args\":{{\"name\":\"{name}\"}}}}"
                ));
            }
        }
        for event in &self.events {
            emit(event_json(event));
        }
        out.push_str("\n]}\n");
        out
    }
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

fn event_json(event: &TraceEvent) -> String {
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
            "{{\"ph\":\"X\",\"pid\":{},\"tid\":{ASYNC_TRACK},\"name\":\"{}\",\"ts\":{},\"dur\":{}}}",
            pid(pe),
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
}
