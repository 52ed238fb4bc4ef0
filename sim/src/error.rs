//! The simulator's errors: a program that cannot be built, and a run that cannot finish.
//!
//! Every variant names where the problem is (PE coordinates, color, port, task, buffer) so the
//! message alone is enough to find it. Messages are one line.

use crate::config::ConfigError;
use crate::geometry::{Coord, Port};
use crate::wavelet::Color;

/// A program rejected while it is built or validated, before cycle 0.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message documents it
#[non_exhaustive]
pub enum BuildError {
    #[error("PE {pe} is outside the {width} x {height} fabric")]
    OutsideFabric { pe: Coord, width: u32, height: u32 },
    #[error("PE {pe}: {color} is not below the fabric's {colors} colors")]
    BadColor { pe: Coord, color: Color, colors: u8 },
    #[error("PE {pe}: {color} already has a route")]
    RouteExists { pe: Coord, color: Color },
    #[error("PE {pe}: route for {color} has an empty {which} set")]
    EmptyRoute {
        pe: Coord,
        color: Color,
        which: &'static str,
    },
    #[error("PE {pe}: {color} is sent {port} but {reason}")]
    DanglingRoute {
        pe: Coord,
        color: Color,
        port: Port,
        reason: String,
    },
    #[error(
        "PE {pe}: SRAM overflow allocating buffer \"{buffer}\": {asked} bytes asked, {free} of {capacity} free"
    )]
    SramOverflow {
        pe: Coord,
        buffer: String,
        asked: u64,
        free: u64,
        capacity: u64,
    },
    #[error("PE {pe}: {color} already has a data task")]
    DataTaskExists { pe: Coord, color: Color },
    #[error("PE {pe}: {color} reaches the core (RAMP) but has no route receiving it")]
    NoRoute { pe: Coord, color: Color },
    #[error("PE {pe}: cannot inject through {port}: {reason}")]
    BadInjection {
        pe: Coord,
        port: Port,
        reason: String,
    },
    #[error("PE {pe}: no task {task} (the PE has {count})")]
    NoSuchTask { pe: Coord, task: u16, count: usize },
    #[error("PE {pe}: too many {what} (limit {limit})")]
    TooMany {
        pe: Coord,
        what: &'static str,
        limit: usize,
    },
}

/// Where a stuck PE is stuck: reported by deadlocks and cycle limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Stuck {
    /// The PE.
    pub pe: Coord,
    /// Human-readable items: "color 3 from NORTH: 4 wavelets waiting", "task reduce: blocked".
    pub what: Vec<String>,
}

impl std::fmt::Display for Stuck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PE {}: {}", self.pe, self.what.join(", "))
    }
}

/// Joins the first stuck PEs for a one-line message.
pub fn describe_stuck(stuck: &[Stuck], total: usize) -> String {
    let mut s: Vec<String> = stuck.iter().map(Stuck::to_string).collect();
    if total > stuck.len() {
        s.push(format!("and {} more PEs", total - stuck.len()));
    }
    s.join("; ")
}

/// A run that could not finish.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message documents it
#[non_exhaustive]
pub enum RunError {
    #[error("deadlock at cycle {cycle}: nothing can move but work remains: {}", describe_stuck(.stuck, *.stuck_pes))]
    Deadlock {
        cycle: u64,
        stuck: Vec<Stuck>,
        stuck_pes: usize,
    },
    #[error("cycle limit {limit} reached with work remaining: {}", describe_stuck(.stuck, *.stuck_pes))]
    CycleLimit {
        limit: u64,
        stuck: Vec<Stuck>,
        stuck_pes: usize,
    },
    #[error("PE {pe}, task \"{task}\", cycle {cycle}: {reason}")]
    Task {
        pe: Coord,
        task: &'static str,
        cycle: u64,
        reason: String,
    },
}

/// Any simulator error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The fabric config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The program was refused before cycle 0.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The run could not finish.
    #[error(transparent)]
    Run(#[from] RunError),
}
