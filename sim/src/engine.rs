//! The exact, event-driven engine: routers, cores, host streams and sinks advanced wavelet by
//! wavelet in a deterministic order.
//!
//! # Model
//!
//! - Every router has one input buffer per (arrival port, color) its routes accept, each of
//!   `queue_depth` wavelets. Every core has one input queue per color routed to RAMP. A core's
//!   sends go into the router's RAMP buffer of that color.
//! - A link (each direction of each port, RAMP included) carries at most one wavelet per cycle. A
//!   wavelet takes `hop_latency` cycles between routers and `ramp_latency` between a router and
//!   its core. Its slot in the destination buffer is reserved when it is sent, so a full buffer
//!   stalls the sender and nothing is ever dropped.
//! - A router moves at most one wavelet per output port per cycle. A multicast moves when every
//!   destination has room and every output port is free. Colors compete round-robin.
//! - A core runs one task at a time; its asynchronous fabric operations progress alongside, one
//!   wavelet per cycle each, the core-to-router ramp carrying at most one wavelet per cycle.
//!
//! # Determinism
//!
//! The engine wakes components (an injector, a router or a core) at cycles ([`Calendar`]); a
//! component woken twice in one cycle runs once. Every interaction between
//! components has a latency of at least one cycle, in both directions: a wavelet pushed at cycle
//! `t` is visible from `t + latency`, and room freed by a pop at `t` is visible from `t + 1`. So
//! what a component does at cycle `t` depends only on the state at the start of `t`, whatever
//! the processing order within the cycle (trace events are sorted at the end for the same
//! reason). That is also what lets regions be stepped in parallel.
//!
//! Idle cycles cost nothing: the engine jumps from one wake to the next.

use std::collections::VecDeque;

use crate::calendar::Calendar;

use crate::config::FabricConfig;
use crate::error::{BuildError, RunError, SimError, Stuck};
use crate::geometry::{Coord, Port, PortSet};
use crate::memory::{Buf, DType, Sram, VecRef};
use crate::program::{Program, SinkId, TaskBody, Then, Trigger};
use crate::stats::{LinkUse, PeStats, Stats};
use crate::task::{AsyncKind, AsyncOp, CoreLinks, RecvMode, TaskCtx, TaskFlags};
use crate::trace::{Trace, TraceEvent, TraceWindow};
use crate::wavelet::{Color, Wavelet};

/// How to run a program.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Stop with [`RunError::CycleLimit`] if work remains past this cycle.
    pub cycle_limit: Option<u64>,
    /// Record a trace of this window.
    pub trace: Option<TraceWindow>,
}

const NONE: u32 = u32::MAX;
const SINK_BIT: u32 = 1 << 31;
/// Component kinds within a PE, in processing order: injectors on the four edge ports, then the
/// router, then the core.
const ROUTER: u64 = 4;
const CORE: u64 = 5;
const KIND_BITS: u32 = 3;

/// A component to wake: `(pe slot << 3) | kind`.
type Comp = u64;

fn comp(pe: u32, kind: u64) -> Comp {
    (u64::from(pe) << KIND_BITS) | kind
}

fn injector_kind(port: Port) -> u64 {
    port.index() as u64 - 1
}

/// A FIFO of wavelets with the cycle each becomes visible.
struct Queue {
    items: VecDeque<(Wavelet, u64)>,
    color: Color,
    /// Index of the owner's route for `color`.
    route: u16,
    /// Position in the owner's router buffers (router buffers only).
    slot: u8,
    /// Where its wavelets arrive from (RAMP for a router buffer fed by the core, and for a
    /// core input queue).
    port: Port,
    owner: u32,
    core_input: bool,
    producer: Option<Comp>,
    consumer: Comp,
    freed_at: u64,
    freed: u32,
    high_water: u32,
}

impl Queue {
    /// Free slots as seen by a producer at cycle `t` (pops at `t` count from `t + 1`).
    fn room(&self, depth: u32, t: u64) -> u32 {
        let just_freed = if self.freed_at == t { self.freed } else { 0 };
        depth.saturating_sub(self.items.len() as u32 + just_freed)
    }

    fn head_ready(&self, t: u64) -> Option<Wavelet> {
        self.items
            .front()
            .filter(|(_, ready)| *ready <= t)
            .map(|(w, _)| *w)
    }

    fn pop(&mut self, t: u64) -> (Wavelet, u64) {
        let item = self.items.pop_front().expect("pop only after head_ready");
        if self.freed_at != t {
            self.freed_at = t;
            self.freed = 0;
        }
        self.freed += 1;
        item
    }

    fn push(&mut self, w: Wavelet, ready: u64) {
        self.items.push_back((w, ready));
        self.high_water = self.high_water.max(self.items.len() as u32);
    }
}

struct RouteState {
    color: Color,
    rx: PortSet,
    tx: PortSet,
    /// Destination per output port: a queue id, `SINK_BIT | sink`, or `NONE`.
    dest: [u32; 5],
    sent: [u64; 5],
}

struct TaskInfo {
    name: &'static str,
    trigger: Trigger,
}

struct Pe {
    coord: Coord,
    routes: Vec<RouteState>,
    /// Router input buffers in arbitration order.
    inbufs: Vec<u32>,
    /// Bit `i` set when `inbufs[i]` holds a wavelet.
    occupied: u128,
    rr: usize,
    core_in: Vec<(Color, u32)>,
    core_out: Vec<(Color, u32)>,
    injectors: [u32; 4],
    sram: Sram,
    tasks: Vec<TaskInfo>,
    flags: Vec<TaskFlags>,
    bodies: Vec<TaskBody>,
    ops: Vec<AsyncOp>,
    busy_until: u64,
    /// Cycle of the last wavelet the core put on its ramp.
    last_ramp_push: Option<u64>,
    /// The asynchronous operation that gets the first chance at the ramp next cycle.
    ramp_next: usize,
    /// Last cycle each component (four injectors, router, core) was woken, to drop duplicate
    /// wakes.
    woken: [u64; 6],
    stats: PeStats,
}

impl Pe {
    fn route(&self, color: Color) -> Option<usize> {
        self.routes.iter().position(|r| r.color == color)
    }
}

struct Injector {
    pe: u32,
    port: Port,
    stream: Vec<(Color, Wavelet)>,
    pos: usize,
}

/// Wavelets that left the fabric at one edge port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkLog {
    /// The edge PE.
    pub pe: Coord,
    /// The port leading off the fabric.
    pub port: Port,
    /// `(arrival cycle, color, wavelet)` in arrival order.
    pub received: Vec<(u64, Color, Wavelet)>,
}

/// A validated program, ready to run.
pub struct Simulator {
    config: FabricConfig,
    pe_slot: Vec<u32>,
    pes: Vec<Pe>,
    queues: Vec<Queue>,
    injectors: Vec<Injector>,
    sinks: Vec<SinkLog>,
}

/// A finished run: statistics, final SRAM contents, sink logs and the trace.
pub struct Executed {
    config: FabricConfig,
    pe_slot: Vec<u32>,
    srams: Vec<Sram>,
    /// What the run measured.
    pub stats: Stats,
    /// What left the fabric, per sink, in [`SinkId`] order.
    pub sinks: Vec<SinkLog>,
    /// The recorded window, if one was asked for.
    pub trace: Option<Trace>,
}

impl Executed {
    /// The machine it ran on.
    pub fn config(&self) -> &FabricConfig {
        &self.config
    }

    /// The final contents of `buf` on `pe`, widened to `f32`.
    pub fn read(&self, pe: Coord, buf: Buf) -> Option<Vec<f32>> {
        if pe.x >= self.config.width || pe.y >= self.config.height {
            return None;
        }
        let slot = self.pe_slot[(pe.y * self.config.width + pe.x) as usize];
        let sram = self.srams.get(slot as usize)?;
        sram.read(buf).ok()
    }

    /// What reached the sink `id`.
    pub fn sink(&self, id: SinkId) -> &SinkLog {
        &self.sinks[id.0 as usize]
    }
}

impl Simulator {
    /// Checks that every route connects and builds the run state.
    pub fn new(program: Program) -> Result<Self, SimError> {
        let Program {
            config,
            pe_slot,
            pes: programs,
            injections,
            sinks,
        } = program;
        let mut sim = Simulator {
            sinks: sinks
                .iter()
                .map(|&(pe, port)| SinkLog {
                    pe,
                    port,
                    received: Vec::new(),
                })
                .collect(),
            config,
            pe_slot,
            pes: Vec::with_capacity(programs.len()),
            queues: Vec::new(),
            injectors: Vec::new(),
        };
        for (slot, p) in programs.into_iter().enumerate() {
            let flags = p.tasks.iter().map(|t| TaskFlags {
                active: t.active,
                blocked: t.blocked,
            });
            let flags = flags.collect();
            let (tasks, bodies): (Vec<_>, Vec<_>) = p
                .tasks
                .into_iter()
                .map(|t| {
                    (
                        TaskInfo {
                            name: t.name,
                            trigger: t.trigger,
                        },
                        t.body,
                    )
                })
                .unzip();
            let stats = PeStats {
                sram_bytes: p.sram.used_bytes,
                ..PeStats::default()
            };
            let routes = p
                .routes
                .iter()
                .map(|r| RouteState {
                    color: r.color,
                    rx: r.rx,
                    tx: r.tx,
                    dest: [NONE; 5],
                    sent: [0; 5],
                })
                .collect();
            sim.pes.push(Pe {
                coord: p.coord,
                routes,
                inbufs: Vec::new(),
                occupied: 0,
                rr: 0,
                core_in: Vec::new(),
                core_out: Vec::new(),
                injectors: [NONE; 4],
                sram: p.sram,
                tasks,
                flags,
                bodies,
                ops: Vec::new(),
                busy_until: 0,
                last_ramp_push: None,
                ramp_next: 0,
                woken: [u64::MAX; 6],
                stats,
            });
            sim.create_queues(slot as u32)?;
        }
        sim.connect_routes()?;
        sim.check_data_tasks()?;
        for inj in injections {
            sim.add_injector(inj.pe, inj.port, inj.wavelets)?;
        }
        Ok(sim)
    }

    fn slot_of(&self, pe: Coord) -> Option<u32> {
        let s = self.pe_slot[(pe.y * self.config.width + pe.x) as usize];
        (s != NONE).then_some(s)
    }

    fn new_queue(&mut self, owner: u32, color: Color, port: Port, core_input: bool) -> u32 {
        let consumer = comp(owner, if core_input { CORE } else { ROUTER });
        let route = self.pes[owner as usize]
            .route(color)
            .expect("queues exist only for routes");
        self.queues.push(Queue {
            items: VecDeque::new(),
            color,
            route: route as u16,
            slot: self.pes[owner as usize].inbufs.len() as u8,
            port,
            owner,
            core_input,
            producer: None,
            consumer,
            freed_at: u64::MAX,
            freed: 0,
            high_water: 0,
        });
        self.queues.len() as u32 - 1
    }

    /// One router buffer per (rx port, color); one core queue per color routed to RAMP.
    fn create_queues(&mut self, slot: u32) -> Result<(), BuildError> {
        let routes: Vec<(Color, PortSet, PortSet)> = self.pes[slot as usize]
            .routes
            .iter()
            .map(|r| (r.color, r.rx, r.tx))
            .collect();
        for (color, rx, tx) in routes {
            for port in rx.iter() {
                if self.pes[slot as usize].inbufs.len() >= 128 {
                    let pe = self.pes[slot as usize].coord;
                    return Err(BuildError::TooMany {
                        pe,
                        what: "router input buffers",
                        limit: 128,
                    });
                }
                let q = self.new_queue(slot, color, port, false);
                if port == Port::Ramp {
                    self.queues[q as usize].producer = Some(comp(slot, CORE));
                    self.pes[slot as usize].core_out.push((color, q));
                }
                self.pes[slot as usize].inbufs.push(q);
            }
            if tx.contains(Port::Ramp) {
                let q = self.new_queue(slot, color, Port::Ramp, true);
                self.queues[q as usize].producer = Some(comp(slot, ROUTER));
                let pe = &mut self.pes[slot as usize];
                pe.core_in.push((color, q));
                let r = pe.route(color).expect("route exists");
                pe.routes[r].dest[Port::Ramp.index()] = q;
            }
        }
        Ok(())
    }

    /// Resolves every non-RAMP output port to the neighbour's buffer or an edge sink.
    fn connect_routes(&mut self) -> Result<(), BuildError> {
        let (w, h) = (self.config.width, self.config.height);
        for slot in 0..self.pes.len() {
            let coord = self.pes[slot].coord;
            for r in 0..self.pes[slot].routes.len() {
                let (color, tx) = (self.pes[slot].routes[r].color, self.pes[slot].routes[r].tx);
                for port in tx.iter().filter(|&p| p != Port::Ramp) {
                    let dest = match coord.neighbour(port, w, h) {
                        Some(n) => self.neighbour_buffer(coord, n, color, port)?,
                        None => self.edge_sink(coord, color, port)?,
                    };
                    if dest & SINK_BIT == 0 {
                        self.queues[dest as usize].producer = Some(comp(slot as u32, ROUTER));
                    }
                    self.pes[slot].routes[r].dest[port.index()] = dest;
                }
            }
        }
        Ok(())
    }

    fn neighbour_buffer(
        &self,
        from: Coord,
        to: Coord,
        color: Color,
        port: Port,
    ) -> Result<u32, BuildError> {
        let dangling = |reason: String| BuildError::DanglingRoute {
            pe: from,
            color,
            port,
            reason,
        };
        let slot = self
            .slot_of(to)
            .ok_or_else(|| dangling(format!("PE {to} has no route for it")))?;
        let arrival = port.opposite();
        self.pes[slot as usize]
            .inbufs
            .iter()
            .copied()
            .find(|&q| {
                self.queues[q as usize].color == color && self.queues[q as usize].port == arrival
            })
            .ok_or_else(|| dangling(format!("PE {to} does not accept it from {arrival}")))
    }

    fn edge_sink(&self, pe: Coord, color: Color, port: Port) -> Result<u32, BuildError> {
        self.sinks
            .iter()
            .position(|s| s.pe == pe && s.port == port)
            .map(|i| SINK_BIT | i as u32)
            .ok_or_else(|| BuildError::DanglingRoute {
                pe,
                color,
                port,
                reason: "it leaves the fabric there and no sink collects it".into(),
            })
    }

    /// A data task must listen on a color that reaches its core.
    fn check_data_tasks(&self) -> Result<(), BuildError> {
        for pe in &self.pes {
            for t in &pe.tasks {
                if let Trigger::Data(color) = t.trigger
                    && !pe.core_in.iter().any(|(c, _)| *c == color)
                {
                    return Err(BuildError::NoRoute {
                        pe: pe.coord,
                        color,
                    });
                }
            }
        }
        Ok(())
    }

    fn add_injector(
        &mut self,
        pe: Coord,
        port: Port,
        stream: Vec<(Color, Wavelet)>,
    ) -> Result<(), BuildError> {
        let slot = self.slot_of(pe).expect("inject() created the PE");
        for &(color, _) in &stream {
            let q =
                self.injector_queue(slot, port, color)
                    .ok_or_else(|| BuildError::BadInjection {
                        pe,
                        port,
                        reason: format!("no route at this PE accepts {color} from {port}"),
                    })?;
            self.queues[q as usize].producer = Some(comp(slot, injector_kind(port)));
        }
        let id = self.injectors.len() as u32;
        self.pes[slot as usize].injectors[injector_kind(port) as usize] = id;
        self.injectors.push(Injector {
            pe: slot,
            port,
            stream,
            pos: 0,
        });
        Ok(())
    }

    fn injector_queue(&self, slot: u32, port: Port, color: Color) -> Option<u32> {
        self.pes[slot as usize].inbufs.iter().copied().find(|&q| {
            self.queues[q as usize].color == color && self.queues[q as usize].port == port
        })
    }

    /// Runs the program to completion.
    pub fn run(self, options: RunOptions) -> Result<Executed, SimError> {
        let mut run = Run::new(self, options);
        run.start();
        run.event_loop()?;
        Ok(run.finish())
    }
}

/// The state of a run in progress.
struct Run {
    sim: Simulator,
    options: RunOptions,
    wakes: Calendar,
    /// One past the last cycle with any activity.
    end: u64,
    events: u64,
    trace: Vec<TraceEvent>,
}

impl Run {
    fn new(sim: Simulator, options: RunOptions) -> Self {
        Run {
            sim,
            options,
            wakes: Calendar::new(),
            end: 0,
            events: 0,
            trace: Vec::new(),
        }
    }

    fn wake(&mut self, at: u64, c: Comp) {
        self.wakes.push(at, c);
    }

    fn start(&mut self) {
        for i in 0..self.sim.injectors.len() {
            let inj = &self.sim.injectors[i];
            let c = comp(inj.pe, injector_kind(inj.port));
            self.wake(0, c);
        }
        for slot in 0..self.sim.pes.len() {
            if self.sim.pes[slot].flags.iter().any(|f| f.active) {
                self.wake(0, comp(slot as u32, CORE));
            }
        }
    }

    fn event_loop(&mut self) -> Result<(), SimError> {
        let mut batch = Vec::new();
        while let Some(t) = self.wakes.pop_cycle(&mut batch) {
            if let Some(limit) = self.options.cycle_limit
                && t > limit
            {
                let (stuck, stuck_pes) = self.stuck();
                return Err(RunError::CycleLimit {
                    limit,
                    stuck,
                    stuck_pes,
                }
                .into());
            }
            for c in batch.drain(..) {
                let slot = (c >> KIND_BITS) as u32;
                let kind = c & ((1 << KIND_BITS) - 1);
                let woken = &mut self.sim.pes[slot as usize].woken[kind as usize];
                if *woken == t {
                    continue;
                }
                *woken = t;
                self.events += 1;
                match kind {
                    ROUTER => self.router_step(slot, t),
                    CORE => self.core_step(slot, t)?,
                    kind => self.injector_step(slot, kind as usize, t),
                }
            }
        }
        let (stuck, stuck_pes) = self.stuck();
        if stuck_pes > 0 {
            return Err(RunError::Deadlock {
                cycle: self.end,
                stuck,
                stuck_pes,
            }
            .into());
        }
        Ok(())
    }

    fn traced(&self, pe: Coord, from: u64, to: u64) -> bool {
        self.options.trace.is_some_and(|w| w.covers(pe, from, to))
    }

    /// Pushes `w` into queue `q` at cycle `t` with `latency`, waking its consumer.
    fn deliver(&mut self, q: u32, w: Wavelet, t: u64, latency: u64) {
        let ready = t + latency;
        let queue = &mut self.sim.queues[q as usize];
        queue.push(w, ready);
        let consumer = queue.consumer;
        if !queue.core_input {
            let bit = 1u128 << queue.slot;
            self.sim.pes[queue.owner as usize].occupied |= bit;
        }
        self.end = self.end.max(ready);
        self.wake(ready, consumer);
    }

    /// Pops the head of `q` at cycle `t`, waking its producer for the freed room.
    fn take(&mut self, q: u32, t: u64) -> (Wavelet, u64) {
        let queue = &mut self.sim.queues[q as usize];
        let item = queue.pop(t);
        let producer = queue.producer;
        if !queue.core_input && queue.items.is_empty() {
            let bit = 1u128 << queue.slot;
            self.sim.pes[queue.owner as usize].occupied &= !bit;
        }
        if let Some(p) = producer {
            self.wake(t + 1, p);
        }
        self.end = self.end.max(t + 1);
        item
    }

    fn room(&self, q: u32, t: u64) -> bool {
        self.sim.queues[q as usize].room(self.sim.config.queue_depth, t) > 0
    }

    fn injector_step(&mut self, slot: u32, kind: usize, t: u64) {
        let id = self.sim.pes[slot as usize].injectors[kind];
        let inj = &self.sim.injectors[id as usize];
        let Some(&(color, w)) = inj.stream.get(inj.pos) else {
            return;
        };
        let port = inj.port;
        let q = self
            .sim
            .injector_queue(slot, port, color)
            .expect("checked when built");
        if !self.room(q, t) {
            return; // the router's pop wakes us
        }
        let latency = u64::from(self.sim.config.hop_latency);
        self.deliver(q, w, t, latency);
        let inj = &mut self.sim.injectors[id as usize];
        inj.pos += 1;
        if inj.pos < inj.stream.len() {
            self.wake(t + 1, comp(slot, kind as u64));
        }
    }

    fn router_step(&mut self, slot: u32, t: u64) {
        let pe = &self.sim.pes[slot as usize];
        let (n, start) = (pe.inbufs.len(), pe.rr);
        let mut used = PortSet::EMPTY;
        let mut again = false;
        let mut last_granted = None;
        // The occupied buffers, rotated so that bit k is buffer (start + k) mod n.
        let low = pe.occupied & ((1u128 << start) - 1);
        let mut pending = (pe.occupied >> start) | if start == 0 { 0 } else { low << (n - start) };
        while pending != 0 {
            let k = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let i = if start + k < n {
                start + k
            } else {
                start + k - n
            };
            let q = self.sim.pes[slot as usize].inbufs[i];
            let queue = &self.sim.queues[q as usize];
            let Some(w) = queue.head_ready(t) else {
                continue;
            };
            let r = usize::from(queue.route);
            let route = &self.sim.pes[slot as usize].routes[r];
            if route.tx.intersects(used) {
                again = true; // lost arbitration for a port: try next cycle
                continue;
            }
            let blocked = route.tx.iter().any(|p| {
                let d = route.dest[p.index()];
                d & SINK_BIT == 0 && !self.room(d, t)
            });
            if blocked {
                continue; // the destination's pop wakes us
            }
            let tx = route.tx;
            let (_, ready) = self.take(q, t);
            self.forward(slot, r, w, t);
            let stats = &mut self.sim.pes[slot as usize].stats;
            stats.router_forwards += 1;
            stats.router_wait_cycles += t - ready;
            used = used.union(tx);
            last_granted = Some(k);
            if self.sim.queues[q as usize].head_ready(t + 1).is_some() {
                again = true;
            }
        }
        if let Some(k) = last_granted {
            self.sim.pes[slot as usize].rr = (start + k + 1) % n;
        }
        if again {
            self.wake(t + 1, comp(slot, ROUTER));
        }
    }

    /// Sends `w` out of every tx port of route `r` of PE `slot` at cycle `t`.
    fn forward(&mut self, slot: u32, r: usize, w: Wavelet, t: u64) {
        let (hop, ramp) = (
            u64::from(self.sim.config.hop_latency),
            u64::from(self.sim.config.ramp_latency),
        );
        let (color, tx, dest) = {
            let route = &self.sim.pes[slot as usize].routes[r];
            (route.color, route.tx, route.dest)
        };
        for port in tx.iter() {
            let latency = if port == Port::Ramp { ramp } else { hop };
            let d = dest[port.index()];
            if d & SINK_BIT != 0 {
                let arrival = t + latency;
                self.sim.sinks[(d & !SINK_BIT) as usize]
                    .received
                    .push((arrival, color, w));
                self.end = self.end.max(arrival);
            } else {
                self.deliver(d, w, t, latency);
            }
            self.sim.pes[slot as usize].routes[r].sent[port.index()] += 1;
        }
        let pe = self.sim.pes[slot as usize].coord;
        if self.traced(pe, t, t) {
            self.trace.push(TraceEvent::Forward {
                pe,
                color,
                cycle: t,
                ports: tx,
            });
        }
    }

    fn core_step(&mut self, slot: u32, t: u64) -> Result<(), SimError> {
        self.step_async_ops(slot, t)?;
        let pe = &self.sim.pes[slot as usize];
        if pe.busy_until <= t
            && let Some(task) = self.pick_task(slot, t)
        {
            self.run_task(slot, task, t)?;
        }
        Ok(())
    }

    /// Advances each eligible asynchronous operation by at most one wavelet.
    fn step_async_ops(&mut self, slot: u32, t: u64) -> Result<(), SimError> {
        let mut again = false;
        let mut finished = Vec::new();
        let count = self.sim.pes[slot as usize].ops.len();
        // Operations compete for the ramp round-robin, from the one after the last to use it.
        let first = self.sim.pes[slot as usize].ramp_next % count.max(1);
        for j in 0..count {
            let i = (first + j) % count;
            let pe = &self.sim.pes[slot as usize];
            let op = &pe.ops[i];
            if op.next_at > t {
                let at = op.next_at;
                self.wake(at, comp(slot, CORE));
                continue;
            }
            // Operations sharing a color run in issue order.
            let waits = pe.ops[..i].iter().any(|o| {
                (op.in_color.is_some() && o.in_color == op.in_color)
                    || (op.out_color.is_some() && o.out_color == op.out_color)
            });
            if waits {
                continue;
            }
            if op.done < op.len {
                match self.step_one(slot, i, t)? {
                    Step::Moved => again = true,
                    Step::RampBusy => {
                        again = true;
                        continue;
                    }
                    Step::Waiting => continue,
                }
            }
            let op = &self.sim.pes[slot as usize].ops[i];
            if op.done == op.len {
                finished.push(i);
                again = true;
            }
        }
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let op = self.sim.pes[slot as usize].ops.remove(i);
            self.complete(slot, op, t);
        }
        if again {
            self.wake(t + 1, comp(slot, CORE));
        }
        Ok(())
    }

    fn complete(&mut self, slot: u32, op: AsyncOp, t: u64) {
        let pe = &mut self.sim.pes[slot as usize];
        match op.then {
            Then::Nothing => {}
            Then::Activate(task) => pe.flags[usize::from(task.0)].active = true,
            Then::Unblock(task) => pe.flags[usize::from(task.0)].blocked = false,
        }
        self.end = self.end.max(t + 1);
        let coord = pe.coord;
        if self.traced(coord, op.start_at, t + 1) {
            self.trace.push(TraceEvent::Async {
                pe: coord,
                name: op.issued_by,
                start: op.start_at,
                end: t + 1,
            });
        }
    }

    /// Moves one wavelet of operation `i`.
    fn step_one(&mut self, slot: u32, i: usize, t: u64) -> Result<Step, SimError> {
        let ramp = u64::from(self.sim.config.ramp_latency);
        let pe = &self.sim.pes[slot as usize];
        let op = &pe.ops[i];
        let needs_ramp = op.out_queue.is_some();
        if needs_ramp && pe.last_ramp_push == Some(t) {
            return Ok(Step::RampBusy);
        }
        let input = match op.in_queue {
            Some(q) => match self.sim.queues[q as usize].head_ready(t) {
                Some(_) => Some(q),
                None => return Ok(Step::Waiting), // the arrival wakes us
            },
            None => None,
        };
        if let Some(q) = op.out_queue
            && !self.room(q, t)
        {
            let stats = &mut self.sim.pes[slot as usize].stats;
            stats.send_stall_cycles += 1;
            return Ok(Step::Waiting); // the router's pop wakes us
        }
        let received = input.map(|q| self.take(q, t).0);
        let pe = &mut self.sim.pes[slot as usize];
        if received.is_some() {
            pe.stats.wavelets_received += 1;
        }
        let op = &mut pe.ops[i];
        let k = op.done;
        let outgoing = match &op.kind {
            AsyncKind::Send { wavelets } => Some(wavelets[k as usize]),
            AsyncKind::Recv { dst, mode } => {
                let (dst, mode) = (*dst, *mode);
                store_received(
                    &mut pe.sram,
                    dst,
                    k,
                    received.expect("recv has an input"),
                    mode,
                );
                None
            }
            AsyncKind::RecvAddSend { local } => {
                let local = *local;
                let range = pe.sram.range(local).expect("checked at issue");
                let sum =
                    received.expect("has an input").f32() + pe.sram.f32s[range.start + k as usize];
                Some(Wavelet::from_f32(sum))
            }
            AsyncKind::RecvStoreSend { dst } => {
                let dst = *dst;
                let w = received.expect("has an input");
                store_received(&mut pe.sram, dst, k, w, RecvMode::Store);
                Some(w)
            }
        };
        let op = &mut pe.ops[i];
        op.done += 1;
        op.next_at = t + 1;
        if let (Some(w), Some(q)) = (outgoing, op.out_queue) {
            pe.last_ramp_push = Some(t);
            pe.ramp_next = i + 1;
            pe.stats.wavelets_sent += 1;
            self.deliver(q, w, t, ramp);
        }
        Ok(Step::Moved)
    }

    /// The lowest-numbered runnable task, if any.
    fn pick_task(&self, slot: u32, t: u64) -> Option<usize> {
        let pe = &self.sim.pes[slot as usize];
        (0..pe.tasks.len()).find(|&i| {
            let flags = pe.flags[i];
            if flags.blocked {
                return false;
            }
            match pe.tasks[i].trigger {
                Trigger::Local => flags.active,
                Trigger::Data(color) => {
                    let owned_by_op = pe.ops.iter().any(|o| o.in_color == Some(color));
                    let q = pe
                        .core_in
                        .iter()
                        .find(|(c, _)| *c == color)
                        .map(|&(_, q)| q);
                    !owned_by_op
                        && q.is_some_and(|q| self.sim.queues[q as usize].head_ready(t).is_some())
                }
            }
        })
    }

    fn run_task(&mut self, slot: u32, task: usize, t: u64) -> Result<(), SimError> {
        let trigger = self.sim.pes[slot as usize].tasks[task].trigger;
        let wavelet = match trigger {
            Trigger::Local => {
                self.sim.pes[slot as usize].flags[task].active = false;
                None
            }
            Trigger::Data(color) => {
                let pe = &self.sim.pes[slot as usize];
                let q = pe
                    .core_in
                    .iter()
                    .find(|(c, _)| *c == color)
                    .map(|&(_, q)| q)
                    .expect("picked");
                let (w, _) = self.take(q, t);
                self.sim.pes[slot as usize].stats.wavelets_received += 1;
                Some(w)
            }
        };
        let ops_before = self.sim.pes[slot as usize].ops.len();
        let (cycles, error, name) = self.execute_body(slot, task, wavelet, t);
        let pe = &mut self.sim.pes[slot as usize];
        let coord = pe.coord;
        if let Some(reason) = error {
            return Err(RunError::Task {
                pe: coord,
                task: name,
                cycle: t,
                reason,
            }
            .into());
        }
        let cost = u64::from(self.sim.config.task_switch_cycles) + cycles;
        pe.busy_until = t + cost;
        pe.stats.busy_cycles += cost;
        pe.stats.tasks_run += 1;
        let new_ops: Vec<u64> = pe.ops[ops_before..].iter().map(|o| o.start_at).collect();
        self.end = self.end.max(t + cost);
        self.wake(t + cost, comp(slot, CORE));
        for at in new_ops {
            self.wake(at, comp(slot, CORE));
        }
        if self.traced(coord, t, t + cost) {
            self.trace.push(TraceEvent::Task {
                pe: coord,
                name,
                start: t,
                cycles: cost,
            });
        }
        Ok(())
    }

    /// Calls the task's body; returns its cycles, its error if any, and its name.
    fn execute_body(
        &mut self,
        slot: u32,
        task: usize,
        wavelet: Option<Wavelet>,
        t: u64,
    ) -> (u64, Option<String>, &'static str) {
        let config = &self.sim.config;
        let pe = &mut self.sim.pes[slot as usize];
        let name = pe.tasks[task].name;
        let Pe {
            coord,
            sram,
            flags,
            ops,
            stats,
            core_in,
            core_out,
            bodies,
            ..
        } = pe;
        let mut ctx = TaskCtx {
            config,
            coord: *coord,
            now: t,
            cycles: 0,
            wavelet,
            sram,
            tasks: flags,
            ops,
            stats,
            links: CoreLinks {
                inputs: core_in,
                outputs: core_out,
            },
            name,
            error: None,
        };
        (bodies[task])(&mut ctx);
        (ctx.cycles, ctx.error, name)
    }

    /// PEs with work left: waiting wavelets, unfinished operations, activated tasks, host data.
    fn stuck(&self) -> (Vec<Stuck>, usize) {
        const SHOWN: usize = 4;
        let mut stuck = Vec::new();
        let mut count = 0;
        for (slot, pe) in self.sim.pes.iter().enumerate() {
            let what = self.work_left(slot as u32, pe);
            if !what.is_empty() {
                count += 1;
                if stuck.len() < SHOWN {
                    stuck.push(Stuck { pe: pe.coord, what });
                }
            }
        }
        (stuck, count)
    }

    fn work_left(&self, slot: u32, pe: &Pe) -> Vec<String> {
        let mut what = Vec::new();
        let queues = pe.inbufs.iter().chain(pe.core_in.iter().map(|(_, q)| q));
        for &q in queues {
            let queue = &self.sim.queues[q as usize];
            debug_assert_eq!(queue.owner, slot);
            if queue.items.is_empty() {
                continue;
            }
            let n = queue.items.len();
            if queue.core_input {
                let task = pe
                    .tasks
                    .iter()
                    .enumerate()
                    .find(|(_, t)| t.trigger == Trigger::Data(queue.color));
                let why = match task {
                    Some((i, t)) if pe.flags[i].blocked => {
                        format!("data task \"{}\" is blocked", t.name)
                    }
                    Some((_, t)) => format!("data task \"{}\"", t.name),
                    None => "no data task or receive takes it".into(),
                };
                what.push(format!(
                    "{} wavelets of {} wait at the core ({why})",
                    n, queue.color
                ));
            } else {
                what.push(format!(
                    "{} wavelets of {} wait in the router from {}",
                    n, queue.color, queue.port
                ));
            }
        }
        for op in &pe.ops {
            let color = op
                .in_color
                .or(op.out_color)
                .map_or(String::new(), |c| format!(" on {c}"));
            what.push(format!(
                "fabric op of task \"{}\"{color} moved {} of {}",
                op.issued_by, op.done, op.len
            ));
        }
        for (i, t) in pe.tasks.iter().enumerate() {
            if pe.flags[i].active {
                let state = if pe.flags[i].blocked {
                    "activated but blocked"
                } else {
                    "activated"
                };
                what.push(format!("task \"{}\" {state}", t.name));
            }
        }
        for &id in pe.injectors.iter().filter(|&&id| id != NONE) {
            let inj = &self.sim.injectors[id as usize];
            if inj.pos < inj.stream.len() {
                what.push(format!(
                    "host stream from {} sent {} of {}",
                    inj.port,
                    inj.pos,
                    inj.stream.len()
                ));
            }
        }
        what
    }

    fn finish(self) -> Executed {
        let Run {
            sim,
            options,
            end,
            events,
            trace,
            ..
        } = self;
        let Simulator {
            config,
            pe_slot,
            pes,
            queues,
            sinks,
            ..
        } = sim;
        let mut pe_stats = Vec::with_capacity(pes.len());
        let mut links = Vec::new();
        let mut srams = Vec::with_capacity(pes.len());
        for pe in pes {
            let mut s = pe.stats;
            let own = pe.inbufs.iter().chain(pe.core_in.iter().map(|(_, q)| q));
            s.queue_high_water = own
                .map(|&q| queues[q as usize].high_water)
                .max()
                .unwrap_or(0);
            for r in &pe.routes {
                for port in r.tx.iter() {
                    links.push(LinkUse {
                        pe: pe.coord,
                        color: r.color,
                        port,
                        wavelets: r.sent[port.index()],
                    });
                }
            }
            pe_stats.push((pe.coord, s));
            srams.push(pe.sram);
        }
        let mut order: Vec<usize> = (0..pe_stats.len()).collect();
        order.sort_by_key(|&i| (pe_stats[i].0.y, pe_stats[i].0.x));
        let pes_sorted: Vec<(Coord, PeStats)> =
            order.iter().map(|&i| pe_stats[i].clone()).collect();
        links.sort_by_key(|l| (l.pe.y, l.pe.x, l.color, l.port));
        let mut total = PeStats::default();
        for (_, s) in &pes_sorted {
            total.accumulate(s);
        }
        let trace = options.trace.map(|window| {
            let mut events = trace;
            events.sort_by_key(trace_order);
            Trace { window, events }
        });
        let stats = Stats {
            cycles: end,
            events,
            pes: pes_sorted,
            links,
            total,
            trace: trace.clone(),
        };
        Executed {
            config,
            pe_slot,
            srams,
            stats,
            sinks,
            trace,
        }
    }
}

/// The order of trace events: by start cycle, then PE, then kind (independent of the order the
/// engine happened to process a cycle's components in).
fn trace_order(e: &TraceEvent) -> (u64, u32, u32, u8) {
    match *e {
        TraceEvent::Task { pe, start, .. } => (start, pe.y, pe.x, 0),
        TraceEvent::Forward { pe, cycle, .. } => (cycle, pe.y, pe.x, 1),
        TraceEvent::Async { pe, start, .. } => (start, pe.y, pe.x, 2),
    }
}

enum Step {
    Moved,
    Waiting,
    RampBusy,
}

fn store_received(sram: &mut Sram, dst: VecRef, k: u32, w: Wavelet, mode: RecvMode) {
    let range = sram.range(dst).expect("checked at issue");
    let i = range.start + k as usize;
    match dst.dtype() {
        DType::F32 => match mode {
            RecvMode::Store => sram.f32s[i] = w.f32(),
            RecvMode::Add => sram.f32s[i] += w.f32(),
        },
        DType::F16 => {
            let v = w.value_f16();
            sram.f16s[i] = match mode {
                RecvMode::Store => v,
                RecvMode::Add => half::f16::from_f32(sram.f16s[i].to_f32() + v.to_f32()),
            };
        }
    }
}
