//! Building a program: the per-PE routes, SRAM buffers and tasks, plus the host streams that
//! feed the fabric's edges and the sinks that collect what leaves it.
//!
//! A [`Program`] is a plain description; nothing runs until it is handed to
//! [`crate::Simulator::new`], which checks that every route connects, and then run. PEs exist
//! only once something is placed on them, so a program that touches few PEs of a large fabric
//! stays small.
//!
//! Tasks are Rust closures over a [`TaskCtx`]: control flow is ordinary code and every data
//! operation goes through the context, which executes it and charges its cycles. This mirrors
//! CSL, where tasks are compiled code and the DSD builtins are the costed instructions.

use half::f16;

use crate::config::FabricConfig;
use crate::error::{BuildError, SimError};
use crate::geometry::{Coord, Port, PortSet};
use crate::memory::{Buf, DType, Sram};
use crate::task::TaskCtx;
use crate::wavelet::{Color, Wavelet};

/// The body of a task: runs to completion each time the task is picked.
pub type TaskBody = Box<dyn FnMut(&mut TaskCtx<'_>) + Send>;

/// A task of one PE (its index in creation order; lower ids win when several can run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u16);

/// What starts a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Runs once per wavelet arriving at the core on this color; receives its payload.
    Data(Color),
    /// Runs when activated (by the program at start, by another task, or by an async op).
    Local,
}

/// What an asynchronous operation does to a task when it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing happens.
    Nothing,
    /// The task is activated.
    Activate(TaskId),
    /// The task is unblocked.
    Unblock(TaskId),
}

/// A handle to a sink collecting what leaves the fabric at one edge port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SinkId(pub(crate) u32);

/// One route: wavelets of `color` accepted from the `rx` ports go out of every `tx` port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The color routed.
    pub color: Color,
    /// Ports it is accepted from.
    pub rx: PortSet,
    /// Ports it is sent out of.
    pub tx: PortSet,
}

pub(crate) struct TaskSpec {
    pub name: &'static str,
    pub trigger: Trigger,
    pub body: TaskBody,
    pub active: bool,
    pub blocked: bool,
}

/// Everything placed on one PE.
pub(crate) struct PeProgram {
    pub coord: Coord,
    pub routes: Vec<Route>,
    pub sram: Sram,
    pub tasks: Vec<TaskSpec>,
}

/// A host stream entering the fabric through an edge port, one wavelet per cycle at most.
pub(crate) struct Injection {
    pub pe: Coord,
    pub port: Port,
    pub wavelets: Vec<(Color, Wavelet)>,
}

/// Most tasks a PE may have (task ids are 5 bits in hardware; we allow more for local use).
pub const MAX_TASKS_PER_PE: usize = 64;

/// A program under construction.
pub struct Program {
    pub(crate) config: FabricConfig,
    /// `y * width + x` -> index into `pes`, or `u32::MAX` for a PE with nothing on it.
    pub(crate) pe_slot: Vec<u32>,
    pub(crate) pes: Vec<PeProgram>,
    pub(crate) injections: Vec<Injection>,
    pub(crate) sinks: Vec<(Coord, Port)>,
}

impl Program {
    /// An empty program for the fabric `config` (validated here).
    pub fn new(config: FabricConfig) -> Result<Self, SimError> {
        config.validate()?;
        let slots = config.pe_count() as usize;
        Ok(Self {
            config,
            pe_slot: vec![u32::MAX; slots],
            pes: Vec::new(),
            injections: Vec::new(),
            sinks: Vec::new(),
        })
    }

    /// The fabric this program is for.
    pub fn config(&self) -> &FabricConfig {
        &self.config
    }

    fn slot(&mut self, pe: Coord) -> Result<usize, BuildError> {
        let (width, height) = (self.config.width, self.config.height);
        if pe.x >= width || pe.y >= height {
            return Err(BuildError::OutsideFabric { pe, width, height });
        }
        let flat = (pe.y * width + pe.x) as usize;
        if self.pe_slot[flat] == u32::MAX {
            self.pe_slot[flat] = self.pes.len() as u32;
            self.pes.push(PeProgram {
                coord: pe,
                routes: Vec::new(),
                sram: Sram::default(),
                tasks: Vec::new(),
            });
        }
        Ok(self.pe_slot[flat] as usize)
    }

    fn pe_mut(&mut self, pe: Coord) -> Result<&mut PeProgram, BuildError> {
        let slot = self.slot(pe)?;
        Ok(&mut self.pes[slot])
    }

    fn check_color(&self, pe: Coord, color: Color) -> Result<(), BuildError> {
        if color.0 >= self.config.colors {
            return Err(BuildError::BadColor {
                pe,
                color,
                colors: self.config.colors,
            });
        }
        Ok(())
    }

    /// Routes `color` at `pe`: accepted from `rx`, sent out of every port of `tx`.
    pub fn route(
        &mut self,
        pe: Coord,
        color: Color,
        rx: impl Into<PortSet>,
        tx: impl Into<PortSet>,
    ) -> Result<(), BuildError> {
        self.check_color(pe, color)?;
        let (rx, tx) = (rx.into(), tx.into());
        for (which, set) in [("rx", rx), ("tx", tx)] {
            if set.is_empty() {
                return Err(BuildError::EmptyRoute { pe, color, which });
            }
        }
        let p = self.pe_mut(pe)?;
        if p.routes.iter().any(|r| r.color == color) {
            return Err(BuildError::RouteExists { pe, color });
        }
        p.routes.push(Route { color, rx, tx });
        Ok(())
    }

    fn check_capacity(&mut self, pe: Coord, name: &str, bytes: u64) -> Result<(), BuildError> {
        let capacity = u64::from(self.config.sram_bytes);
        let used = self.pe_mut(pe)?.sram.used_bytes;
        if used + bytes > capacity {
            return Err(BuildError::SramOverflow {
                pe,
                buffer: name.to_string(),
                asked: bytes,
                free: capacity - used,
                capacity,
            });
        }
        Ok(())
    }

    /// A buffer of `f32` on `pe` holding `init` (a host copy before cycle 0).
    pub fn alloc_f32(
        &mut self,
        pe: Coord,
        name: &'static str,
        init: &[f32],
    ) -> Result<Buf, BuildError> {
        self.check_capacity(pe, name, 4 * init.len() as u64)?;
        self.check_buffer_count(pe)?;
        Ok(self.pe_mut(pe)?.sram.push_f32(name, init))
    }

    /// A buffer of `f16` on `pe` holding `init`.
    pub fn alloc_f16(
        &mut self,
        pe: Coord,
        name: &'static str,
        init: &[f16],
    ) -> Result<Buf, BuildError> {
        self.check_capacity(pe, name, 2 * init.len() as u64)?;
        self.check_buffer_count(pe)?;
        Ok(self.pe_mut(pe)?.sram.push_f16(name, init))
    }

    /// A zeroed buffer of `len` elements.
    pub fn alloc_zeros(
        &mut self,
        pe: Coord,
        name: &'static str,
        dtype: DType,
        len: usize,
    ) -> Result<Buf, BuildError> {
        self.check_capacity(pe, name, dtype.bytes() * len as u64)?;
        self.check_buffer_count(pe)?;
        let sram = &mut self.pe_mut(pe)?.sram;
        Ok(match dtype {
            DType::F32 => sram.push_f32(name, &vec![0.0; len]),
            DType::F16 => sram.push_f16(name, &vec![f16::ZERO; len]),
        })
    }

    fn check_buffer_count(&mut self, pe: Coord) -> Result<(), BuildError> {
        let limit = u16::MAX as usize;
        if self.pe_mut(pe)?.sram.buffers.len() >= limit {
            return Err(BuildError::TooMany {
                pe,
                what: "buffers",
                limit,
            });
        }
        Ok(())
    }

    fn add_task(
        &mut self,
        pe: Coord,
        name: &'static str,
        trigger: Trigger,
        body: TaskBody,
    ) -> Result<TaskId, BuildError> {
        let p = self.pe_mut(pe)?;
        if p.tasks.len() >= MAX_TASKS_PER_PE {
            return Err(BuildError::TooMany {
                pe,
                what: "tasks",
                limit: MAX_TASKS_PER_PE,
            });
        }
        let id = TaskId(p.tasks.len() as u16);
        p.tasks.push(TaskSpec {
            name,
            trigger,
            body,
            active: false,
            blocked: false,
        });
        Ok(id)
    }

    /// The id the next task created on `pe` will get (tasks that refer to each other in a cycle
    /// can be written by naming ids before creating them).
    pub fn next_task_id(&mut self, pe: Coord) -> Result<TaskId, BuildError> {
        Ok(TaskId(self.pe_mut(pe)?.tasks.len() as u16))
    }

    /// A data task on `pe`: runs once per wavelet of `color` reaching the core.
    pub fn data_task(
        &mut self,
        pe: Coord,
        color: Color,
        name: &'static str,
        body: impl FnMut(&mut TaskCtx<'_>) + Send + 'static,
    ) -> Result<TaskId, BuildError> {
        self.check_color(pe, color)?;
        let p = self.pe_mut(pe)?;
        if p.tasks.iter().any(|t| t.trigger == Trigger::Data(color)) {
            return Err(BuildError::DataTaskExists { pe, color });
        }
        self.add_task(pe, name, Trigger::Data(color), Box::new(body))
    }

    /// A local task on `pe`: runs when activated.
    pub fn local_task(
        &mut self,
        pe: Coord,
        name: &'static str,
        body: impl FnMut(&mut TaskCtx<'_>) + Send + 'static,
    ) -> Result<TaskId, BuildError> {
        self.add_task(pe, name, Trigger::Local, Box::new(body))
    }

    fn task_mut(&mut self, pe: Coord, task: TaskId) -> Result<&mut TaskSpec, BuildError> {
        let p = self.pe_mut(pe)?;
        let count = p.tasks.len();
        p.tasks
            .get_mut(usize::from(task.0))
            .ok_or(BuildError::NoSuchTask {
                pe,
                task: task.0,
                count,
            })
    }

    /// Activates a local task at cycle 0 (the program's entry point).
    pub fn activate(&mut self, pe: Coord, task: TaskId) -> Result<(), BuildError> {
        self.task_mut(pe, task)?.active = true;
        Ok(())
    }

    /// Starts a task blocked: it cannot run until some task or async op unblocks it.
    pub fn block(&mut self, pe: Coord, task: TaskId) -> Result<(), BuildError> {
        self.task_mut(pe, task)?.blocked = true;
        Ok(())
    }

    /// Streams `wavelets` from the host into `pe` through the edge `port`, in order, at most one
    /// per cycle, from cycle 0. Several calls on the same port append to one stream.
    pub fn inject(
        &mut self,
        pe: Coord,
        port: Port,
        wavelets: impl IntoIterator<Item = (Color, Wavelet)>,
    ) -> Result<(), BuildError> {
        self.check_edge(pe, port)
            .map_err(|reason| BuildError::BadInjection { pe, port, reason })?;
        let wavelets: Vec<(Color, Wavelet)> = wavelets.into_iter().collect();
        for &(color, _) in &wavelets {
            self.check_color(pe, color)?;
        }
        self.slot(pe)?;
        match self
            .injections
            .iter_mut()
            .find(|i| i.pe == pe && i.port == port)
        {
            Some(existing) => existing.wavelets.extend(wavelets),
            None => self.injections.push(Injection { pe, port, wavelets }),
        }
        Ok(())
    }

    /// Collects every wavelet leaving the fabric at `pe` through the edge `port`.
    pub fn collect(&mut self, pe: Coord, port: Port) -> Result<SinkId, BuildError> {
        self.check_edge(pe, port)
            .map_err(|reason| BuildError::BadInjection { pe, port, reason })?;
        self.slot(pe)?;
        if let Some(i) = self.sinks.iter().position(|&s| s == (pe, port)) {
            return Ok(SinkId(i as u32));
        }
        self.sinks.push((pe, port));
        Ok(SinkId(self.sinks.len() as u32 - 1))
    }

    fn check_edge(&self, pe: Coord, port: Port) -> Result<(), String> {
        let (w, h) = (self.config.width, self.config.height);
        if pe.x >= w || pe.y >= h {
            return Err(format!("PE is outside the {w} x {h} fabric"));
        }
        if port == Port::Ramp {
            return Err("RAMP leads to the core, not off the fabric".into());
        }
        if pe.neighbour(port, w, h).is_some() {
            return Err("it leads to another PE, not off the fabric".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(w: u32, h: u32) -> Program {
        Program::new(FabricConfig::rectangle(w, h).unwrap()).unwrap()
    }

    #[test]
    fn sram_overflow_names_pe_buffer_and_bytes() {
        let mut p = program(2, 2);
        let pe = Coord::new(1, 0);
        p.alloc_f32(pe, "x", &vec![0.0; 12 * 1024 - 10]).unwrap();
        let err = p
            .alloc_zeros(pe, "psum", DType::F32, 11)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "PE (1, 0): SRAM overflow allocating buffer \"psum\": 44 bytes asked, 40 of 49152 free"
        );
        // 10 f32 still fit exactly.
        p.alloc_zeros(pe, "psum", DType::F32, 10).unwrap();
    }

    #[test]
    fn only_touched_pes_exist() {
        let mut p = Program::new(FabricConfig::wse2()).unwrap();
        p.alloc_f32(Coord::new(700, 900), "x", &[1.0]).unwrap();
        assert_eq!(p.pes.len(), 1);
    }

    #[test]
    fn bad_placements_are_refused() {
        let mut p = program(2, 2);
        assert!(p.alloc_f32(Coord::new(2, 0), "x", &[]).is_err());
        assert!(
            p.route(Coord::new(0, 0), Color(24), Port::Ramp, Port::East)
                .is_err()
        );
        assert!(
            p.route(Coord::new(0, 0), Color(1), PortSet::EMPTY, Port::East)
                .is_err()
        );
        p.route(Coord::new(0, 0), Color(1), Port::Ramp, Port::East)
            .unwrap();
        assert!(
            p.route(Coord::new(0, 0), Color(1), Port::Ramp, Port::South)
                .is_err()
        );
        p.data_task(Coord::new(0, 0), Color(2), "a", |_| {})
            .unwrap();
        assert!(
            p.data_task(Coord::new(0, 0), Color(2), "b", |_| {})
                .is_err()
        );
        assert!(
            p.inject(Coord::new(1, 0), Port::West, []).is_err(),
            "not an edge port"
        );
        assert!(p.inject(Coord::new(1, 0), Port::North, []).is_ok());
        assert!(p.activate(Coord::new(0, 0), TaskId(5)).is_err());
    }
}
