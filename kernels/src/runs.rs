//! What the caller of a kernel that runs the simulator several times (the blocked attention:
//! one run per key block) does around each run: the options of the next run (a trace window
//! shifted past the earlier runs, for instance) and what to keep of each finished one.
//!
//! What it is not: a scheduler; the kernel decides the runs and their order.

use wafersim_sim::{RunOptions, Stats};

/// Called around each simulated run of a multi-run kernel, in order.
pub trait Runs {
    /// The options of the next run.
    fn next(&mut self) -> RunOptions;

    /// The run just started with [`Runs::next`]'s options has finished.
    fn finished(&mut self, stats: &Stats);
}

/// The same options for every run, nothing kept.
impl Runs for RunOptions {
    fn next(&mut self) -> RunOptions {
        *self
    }

    fn finished(&mut self, _: &Stats) {}
}
