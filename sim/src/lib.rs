//! wafersim-sim: a CS-2-style wafer-scale fabric simulator.
//!
//! The machine is a rectangle of processing elements (PEs). Each PE is a router, a core and a
//! private SRAM. Routers move 32-bit [`Wavelet`]s between neighbours on static per-[`Color`]
//! routes (with multicast); cores run data-triggered tasks, one at a time, whose instructions are
//! vector operations over SRAM and asynchronous fabric sends and receives. Zero skipping is
//! structural: the simulator only ever does work for wavelets that are sent, so a program that
//! never sends a zero weight never pays for one.
//!
//! What this crate is not: it knows nothing of tensors, layers or transformers. Programs are
//! built by `wafersim-kernels`; this crate only executes them and counts what they did.
//!
//! Lifecycle: build a [`Program`] (routes, buffers, tasks, host streams, sinks), hand it to
//! [`Simulator::new`], which checks that every route connects, then [`Simulator::run`] it to get
//! an [`Executed`] with the [`Stats`], the final SRAM contents, what reached the sinks, and an
//! optional [`Trace`].
//!
//! ```
//! use wafersim_sim::*;
//!
//! // PE (0, 0) sends 3.0 east to PE (1, 0), whose data task doubles it into a buffer.
//! let mut p = Program::new(FabricConfig::rectangle(2, 1).unwrap()).unwrap();
//! let (a, b, c) = (Coord::new(0, 0), Coord::new(1, 0), Color(0));
//! p.route(a, c, Port::Ramp, Port::East).unwrap();
//! p.route(b, c, Port::West, Port::Ramp).unwrap();
//! let src = p.alloc_f32(a, "src", &[3.0]).unwrap();
//! let dst = p.alloc_f32(b, "dst", &[0.0]).unwrap();
//! let go = p.local_task(a, "send", move |ctx| ctx.send(c, src.all(), Then::Nothing)).unwrap();
//! p.activate(a, go).unwrap();
//! p.data_task(b, c, "double", move |ctx| {
//!     let x = ctx.wavelet().f32();
//!     ctx.store(dst.at(0), 2.0 * x);
//! })
//! .unwrap();
//! let run = Simulator::new(p).unwrap().run(RunOptions::default()).unwrap();
//! assert_eq!(run.read(b, dst).unwrap(), vec![6.0]);
//! ```

#![deny(missing_docs)]

mod calendar;
mod config;
mod engine;
mod error;
mod geometry;
mod memory;
mod oplist;
mod parallel;
mod program;
mod region;
mod shard;
mod stats;
mod task;
mod trace;
mod wavelet;

pub use config::{ConfigError, FabricConfig, HARDWARE_COLORS, MAX_SIDE, SimdWidths};
pub use engine::{Executed, RunOptions, Simulator, SinkLog, events_processed};
pub use error::{BuildError, RunError, SimError, Stuck};
pub use geometry::{Coord, Port, PortSet};
pub use memory::{Buf, DType, VecRef};
pub use oplist::{FabricOp, OpList};
pub use program::{MAX_TASKS_PER_PE, Program, Route, SinkId, TaskBody, TaskId, Then, Trigger};
pub use stats::{LinkUse, PeStats, Stats};
pub use task::{RecvMode, TaskCtx};
pub use trace::{Trace, TraceEvent, TraceWindow};
pub use wavelet::{Color, Wavelet};
