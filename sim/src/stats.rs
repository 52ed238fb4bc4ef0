//! What a run measured: per-PE counters, per-link traffic, totals and region aggregates.
//!
//! All counts are integers and every list is sorted by PE position (row, then column), so two
//! runs of the same program give equal `Stats`, field for field.

use serde::Serialize;

use crate::geometry::{Coord, Port};
use crate::wavelet::Color;

/// Counters of one PE (or, summed, of a region).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeStats {
    /// Cycles the core spent running tasks (task switch included).
    pub busy_cycles: u64,
    /// Tasks run.
    pub tasks_run: u64,
    /// Multiply-adds executed by vector instructions (one FMAC = 2 FLOPs).
    pub fmacs: u64,
    /// Elements processed by all vector instructions.
    pub vector_elements: u64,
    /// Wavelets the core put onto the fabric.
    pub wavelets_sent: u64,
    /// Wavelets the core took off the fabric.
    pub wavelets_received: u64,
    /// Wavelets the router moved out of its input buffers (a multicast counts once).
    pub router_forwards: u64,
    /// Cycles wavelets waited at the head of router buffers, ready but not moving (arbitration
    /// and backpressure), summed over wavelets.
    pub router_wait_cycles: u64,
    /// Cycles core sends waited for buffer space beyond one wavelet per cycle.
    pub send_stall_cycles: u64,
    /// Most wavelets held at once by any one of this PE's queues.
    pub queue_high_water: u32,
    /// SRAM the program allocated on this PE (summed over a region), in bytes.
    pub sram_bytes: u64,
}

impl PeStats {
    /// Cycles of a run of `cycles` the core spent without a task.
    pub fn idle_cycles(&self, cycles: u64) -> u64 {
        cycles.saturating_sub(self.busy_cycles)
    }

    /// Adds `other` into `self` (the queue high-water mark takes the maximum).
    pub fn accumulate(&mut self, other: &PeStats) {
        self.busy_cycles += other.busy_cycles;
        self.tasks_run += other.tasks_run;
        self.fmacs += other.fmacs;
        self.vector_elements += other.vector_elements;
        self.wavelets_sent += other.wavelets_sent;
        self.wavelets_received += other.wavelets_received;
        self.router_forwards += other.router_forwards;
        self.router_wait_cycles += other.router_wait_cycles;
        self.send_stall_cycles += other.send_stall_cycles;
        self.queue_high_water = self.queue_high_water.max(other.queue_high_water);
        self.sram_bytes += other.sram_bytes;
    }
}

/// Wavelets that left one PE's router through one port on one color.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkUse {
    /// The PE whose router sent them.
    pub pe: Coord,
    /// Their color.
    pub color: Color,
    /// The output port.
    pub port: Port,
    /// How many.
    pub wavelets: u64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Cycles from the start to the last activity of any PE (the makespan).
    pub cycles: u64,
    /// Component activations the engine processed (a measure of simulation work).
    pub events: u64,
    /// PEs with anything placed on them, sorted by (y, x).
    pub pes: Vec<(Coord, PeStats)>,
    /// Link traffic, sorted by (PE, color, port).
    pub links: Vec<LinkUse>,
    /// Sum over all PEs.
    pub total: PeStats,
    /// The recorded window, if the run was asked for one ([`crate::RunOptions::trace`]); not
    /// serialised.
    #[serde(skip)]
    pub trace: Option<crate::trace::Trace>,
}

impl Stats {
    /// The counters of `pe`, if the program placed anything on it.
    pub fn pe(&self, pe: Coord) -> Option<&PeStats> {
        let key = (pe.y, pe.x);
        self.pes
            .binary_search_by_key(&key, |(c, _)| (c.y, c.x))
            .ok()
            .map(|i| &self.pes[i].1)
    }

    /// Sum over the PEs of the rectangle at `origin` of `width x height`.
    pub fn region(&self, origin: Coord, width: u32, height: u32) -> PeStats {
        let mut sum = PeStats::default();
        for (c, s) in &self.pes {
            let inside = c.x >= origin.x
                && c.x < origin.x + width
                && c.y >= origin.y
                && c.y < origin.y + height;
            if inside {
                sum.accumulate(s);
            }
        }
        sum
    }

    /// Wavelets that crossed `port` of `pe` on `color`.
    pub fn link(&self, pe: Coord, color: Color, port: Port) -> u64 {
        self.links
            .iter()
            .find(|l| l.pe == pe && l.color == color && l.port == port)
            .map_or(0, |l| l.wavelets)
    }
}
