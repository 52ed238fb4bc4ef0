//! The exact, event-driven engine: routers, cores, host streams and sinks advanced wavelet by
//! wavelet in a deterministic order, on one thread or on several regions of the fabric in
//! parallel with the same results.
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
//! The engine wakes components (an injector, a router or a core) at cycles (`Calendar`); a
//! component woken twice in one cycle runs once. Every interaction between
//! components has a latency of at least one cycle, in both directions: a wavelet pushed at cycle
//! `t` is visible from `t + latency`, and room freed by a pop at `t` is visible from `t + 1`. So
//! what a component does at cycle `t` depends only on the state at the start of `t`, whatever
//! the processing order within the cycle (trace events are sorted at the end for the same
//! reason; a queue's high-water mark counts a slot popped at `t` as held until `t + 1`, as its
//! producer sees it; of two task errors in one cycle, the PE first by position is reported).
//!
//! # Parallel runs
//!
//! That invariant is what lets regions be stepped in parallel ([`RunOptions::threads`]): the
//! fabric is cut into rectangular regions (`region.rs`), each stepped by its own thread, all in
//! lockstep one cycle at a time (`parallel.rs`); cycles where no region has anything to do are
//! skipped. Wavelets and freed room crossing a region boundary are exchanged as messages between
//! cycles (`shard.rs`). Results, statistics and traces are identical to the byte for any thread
//! count.
//!
//! Idle cycles cost nothing: the engine jumps from one wake to the next.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::FabricConfig;
use crate::error::{BuildError, RunError, SimError, Stuck};
use crate::geometry::{Coord, Port, PortSet};
use crate::memory::{Buf, Sram};
use crate::parallel::{self, Outcome};
use crate::program::{Program, SinkId, Trigger};
use crate::region;
use crate::shard::{
    CORE, Env, Injector, NONE, Pe, Producer, ROUTER, RouteState, SINK_BIT, Shard, ShardSink,
    TaskInfo, comp, injector_kind,
};
use crate::stats::{LinkUse, PeStats, Stats};
use crate::task::TaskStates;
use crate::trace::{Trace, TraceEvent, TraceWindow};
use crate::wavelet::{Color, Wavelet};

/// How to run a program.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Stop with [`RunError::CycleLimit`] if work remains past this cycle.
    pub cycle_limit: Option<u64>,
    /// Record a trace of this window.
    pub trace: Option<TraceWindow>,
    /// Threads stepping regions of the fabric in parallel. `0` (the default) is rayon's default,
    /// `rayon::current_num_threads()` (which honours `RAYON_NUM_THREADS`), lowered so that each
    /// thread has at least 128 PEs, and 1 when called from a rayon worker
    /// (the caller is already parallel). `n >= 1` asks for `n` regions (fewer if the program's
    /// PEs span fewer rows and columns). The results do not depend on it.
    pub threads: usize,
}

/// Engine events of every run that finished in this process (see [`events_processed`]).
static EVENTS_PROCESSED: AtomicU64 = AtomicU64::new(0);

/// Engine events processed by every run of this process so far: a counter for benchmarks of work
/// made of many runs (one run's own count is [`Stats::events`]).
pub fn events_processed() -> u64 {
    EVENTS_PROCESSED.load(Ordering::Relaxed)
}

/// With `threads: 0`, a parallel run gives each thread at least this many PEs: below it, the
/// cost of synchronising every cycle exceeds the work shared out.
const MIN_PES_PER_THREAD: usize = 128;

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

/// A validated program, ready to run: every PE in one shard, in program order.
pub struct Simulator {
    config: FabricConfig,
    pe_slot: Vec<u32>,
    shard: Shard,
    sinks: Vec<(Coord, Port)>,
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
        let mut shard = Shard::new(config.queue_depth);
        shard.sinks = (0..sinks.len() as u32)
            .map(|id| ShardSink {
                id,
                received: Vec::new(),
            })
            .collect();
        let mut sim = Simulator {
            config,
            pe_slot,
            shard,
            sinks,
        };
        sim.reserve(&programs);
        for (slot, p) in programs.into_iter().enumerate() {
            sim.add_pe(slot as u32, p)?;
        }
        sim.connect_routes()?;
        sim.shard.copy_routes_into_buffers();
        sim.check_data_tasks()?;
        for inj in injections {
            sim.add_injector(inj.pe, inj.port, inj.wavelets)?;
        }
        Ok(sim)
    }

    /// Sizes the shard's arrays for `programs` at once: grown by doubling, the largest of them
    /// would briefly take twice their size at a wafer's scale.
    fn reserve(&mut self, programs: &[crate::program::PeProgram]) {
        let routes = programs.iter().flat_map(|p| &p.routes);
        let inbufs: usize = routes.clone().map(|r| r.rx.len()).sum();
        let queues = inbufs + routes.clone().filter(|r| r.tx.contains(Port::Ramp)).count();
        let shard = &mut self.shard;
        shard.pes.reserve_exact(programs.len());
        shard
            .tasks
            .reserve_exact(programs.iter().map(|p| p.tasks.len()).sum());
        shard.routes.reserve_exact(routes.count());
        shard.inbufs.reserve_exact(inbufs);
        shard.queues.reserve_exact(queues);
        shard
            .items
            .reserve_exact(queues * (shard.ring_mask as usize + 1));
    }

    fn add_pe(&mut self, slot: u32, p: crate::program::PeProgram) -> Result<(), BuildError> {
        let shard = &mut self.shard;
        let mut task_states = TaskStates {
            count: p.tasks.len() as u32,
            ..TaskStates::default()
        };
        let mut data_tasks = 0u64;
        for (i, t) in p.tasks.iter().enumerate() {
            task_states.set_active(i, t.active);
            task_states.set_blocked(i, t.blocked);
            if matches!(t.trigger, Trigger::Data(_)) {
                data_tasks |= 1 << i;
            }
        }
        let task_start = shard.tasks.len() as u32;
        shard.tasks.extend(p.tasks.into_iter().map(|t| TaskInfo {
            trigger: t.trigger,
            queue: NONE,
            name: t.name,
            body: t.body,
        }));
        let sram_bytes = p.sram.used_bytes;
        let mut sram = p.sram;
        sram.shrink_to_fit();
        let route_start = shard.routes.len() as u32;
        shard.routes.extend(p.routes.iter().map(|r| RouteState {
            color: r.color,
            rx: r.rx,
            tx: r.tx,
            dest: [NONE; 5],
        }));
        shard.pes.push(Pe {
            coord: p.coord,
            slot,
            router_wait_cycles: 0,
            occupied: 0,
            inbuf_start: shard.inbufs.len() as u32,
            inbuf_len: 0,
            rr: 0,
            route_start,
            route_len: p.routes.len() as u32,
            injectors: [NONE; 4],
            busy_until: 0,
            task_started_at: u64::MAX,
            op_done_at: u64::MAX,
            last_ramp_push: u64::MAX,
            ramp_next: 0,
            eligible: None,
            ops: Vec::new(),
            lazy: None,
            task_start,
            task_states,
            data_tasks,
            core_in: Vec::new(),
            core_out: Vec::new(),
            sram,
            stats: PeStats {
                sram_bytes,
                ..PeStats::default()
            },
        });
        self.create_queues(slot)
    }

    /// One router buffer per (rx port, color); one core queue per color routed to RAMP.
    fn create_queues(&mut self, slot: u32) -> Result<(), BuildError> {
        let shard = &mut self.shard;
        let routes: Vec<(Color, PortSet, PortSet)> = shard
            .pe_routes(slot)
            .iter()
            .map(|r| (r.color, r.rx, r.tx))
            .collect();
        for (r, (color, rx, tx)) in routes.into_iter().enumerate() {
            for port in rx.iter() {
                if shard.pes[slot as usize].inbuf_len >= 128 {
                    return Err(BuildError::TooMany {
                        pe: shard.pes[slot as usize].coord,
                        what: "router input buffers",
                        limit: 128,
                    });
                }
                let q = shard.add_queue(slot, color, port, false);
                if port == Port::Ramp {
                    shard.queues[q as usize].producer = Producer::Local(comp(slot, CORE));
                    shard.pes[slot as usize].core_out.push((color, q));
                }
                shard.inbufs.push(q);
                shard.pes[slot as usize].inbuf_len += 1;
            }
            if tx.contains(Port::Ramp) {
                let q = shard.add_queue(slot, color, Port::Ramp, true);
                shard.queues[q as usize].producer = Producer::Local(comp(slot, ROUTER));
                let pe = &mut shard.pes[slot as usize];
                pe.core_in.push((color, q));
                let start = pe.route_start as usize;
                shard.routes[start + r].dest[Port::Ramp.index()] = q;
                let tasks = pe.task_start as usize..(pe.task_start + pe.task_states.count) as usize;
                for task in shard.tasks[tasks].iter_mut() {
                    if task.trigger == Trigger::Data(color) {
                        task.queue = q;
                    }
                }
            }
        }
        Ok(())
    }

    fn slot_of(&self, pe: Coord) -> Option<u32> {
        let s = self.pe_slot[(pe.y * self.config.width + pe.x) as usize];
        (s != NONE).then_some(s)
    }

    /// Resolves every non-RAMP output port to the neighbour's buffer or an edge sink.
    fn connect_routes(&mut self) -> Result<(), BuildError> {
        let (w, h) = (self.config.width, self.config.height);
        for slot in 0..self.shard.pes.len() as u32 {
            let coord = self.shard.pes[slot as usize].coord;
            let start = self.shard.pes[slot as usize].route_start as usize;
            for r in start..start + self.shard.pes[slot as usize].route_len as usize {
                let (color, tx) = (self.shard.routes[r].color, self.shard.routes[r].tx);
                for port in tx.iter().filter(|&p| p != Port::Ramp) {
                    let dest = match coord.neighbour(port, w, h) {
                        Some(n) => self.neighbour_buffer(coord, n, color, port)?,
                        None => self.edge_sink(coord, color, port)?,
                    };
                    if dest & SINK_BIT == 0 {
                        self.shard.queues[dest as usize].producer =
                            Producer::Local(comp(slot, ROUTER));
                    }
                    self.shard.routes[r].dest[port.index()] = dest;
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
        self.find_inbuf(slot, arrival, color)
            .ok_or_else(|| dangling(format!("PE {to} does not accept it from {arrival}")))
    }

    fn find_inbuf(&self, slot: u32, port: Port, color: Color) -> Option<u32> {
        self.shard.pe_inbufs(slot).iter().copied().find(|&q| {
            let queue = &self.shard.queues[q as usize];
            queue.color == color && queue.port == port
        })
    }

    fn edge_sink(&self, pe: Coord, color: Color, port: Port) -> Result<u32, BuildError> {
        self.sinks
            .iter()
            .position(|&s| s == (pe, port))
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
        for (p, pe) in self.shard.pes.iter().enumerate() {
            for t in self.shard.pe_tasks(p as u32) {
                if let Trigger::Data(color) = t.trigger
                    && t.queue == NONE
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
        let mut queue_of = vec![NONE; usize::from(self.config.colors)];
        for &(color, _) in &stream {
            if queue_of[color.index()] != NONE {
                continue;
            }
            let q = self
                .find_inbuf(slot, port, color)
                .ok_or_else(|| BuildError::BadInjection {
                    pe,
                    port,
                    reason: format!("no route at this PE accepts {color} from {port}"),
                })?;
            queue_of[color.index()] = q;
            self.shard.queues[q as usize].producer =
                Producer::Local(comp(slot, injector_kind(port)));
        }
        let id = self.shard.injectors.len() as u32;
        self.shard.pes[slot as usize].injectors[injector_kind(port) as usize] = id;
        self.shard.injectors.push(Injector {
            pe: slot,
            port,
            stream,
            pos: 0,
            queue_of,
        });
        Ok(())
    }

    /// Runs the program to completion.
    pub fn run(self, options: RunOptions) -> Result<Executed, SimError> {
        let Simulator {
            config,
            pe_slot,
            shard,
            sinks,
        } = self;
        let env = Env::new(&config, options.trace);
        let threads = resolve_threads(options.threads, shard.pes.len());
        let mut shards = if threads > 1 {
            region::split(shard, threads)
        } else {
            vec![shard]
        };
        let outcome = if shards.len() > 1 {
            parallel::run(&mut shards, &env, options.cycle_limit)
        } else {
            run_alone(&mut shards[0], &env, options.cycle_limit)
        };
        check_outcome(outcome, &mut shards, options.cycle_limit)?;
        Ok(finish(config, pe_slot, sinks, shards, options.trace))
    }
}

/// The number of regions to cut the program's `pes` PEs into.
fn resolve_threads(requested: usize, pes: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    if rayon::current_thread_index().is_some() {
        return 1;
    }
    rayon::current_num_threads()
        .min(pes / MIN_PES_PER_THREAD)
        .max(1)
}

/// Steps one shard holding every PE.
fn run_alone(shard: &mut Shard, env: &Env<'_>, limit: Option<u64>) -> Outcome {
    shard.start();
    while let Some(t) = shard.cal.next_cycle() {
        if limit.is_some_and(|l| t > l) {
            return Outcome::CycleLimit;
        }
        shard.run_cycle(env, t);
        if shard.failure.is_some() {
            return Outcome::Failed;
        }
    }
    Outcome::Finished
}

/// Turns how the run stopped into an error, if it is one.
fn check_outcome(
    outcome: Outcome,
    shards: &mut [Shard],
    limit: Option<u64>,
) -> Result<(), SimError> {
    match outcome {
        Outcome::Failed => {
            let failure = shards
                .iter_mut()
                .filter_map(|s| s.failure.take())
                .min_by_key(|f| (f.pe.y, f.pe.x))
                .expect("a shard failed");
            Err(failure.error)
        }
        Outcome::CycleLimit => {
            let (stuck, stuck_pes) = stuck(shards);
            Err(RunError::CycleLimit {
                limit: limit.unwrap_or(0),
                stuck,
                stuck_pes,
            }
            .into())
        }
        Outcome::Finished => {
            let (stuck, stuck_pes) = stuck(shards);
            if stuck_pes == 0 {
                return Ok(());
            }
            let cycle = shards.iter().map(|s| s.end).max().unwrap_or(0);
            Err(RunError::Deadlock {
                cycle,
                stuck,
                stuck_pes,
            }
            .into())
        }
    }
}

/// PEs with work left, the first few in program order described, and how many there are.
fn stuck(shards: &[Shard]) -> (Vec<Stuck>, usize) {
    const SHOWN: usize = 4;
    let mut all = Vec::new();
    let mut count = 0;
    for shard in shards {
        let (some, n) = shard.stuck(SHOWN);
        all.extend(some);
        count += n;
    }
    all.sort_by_key(|&(slot, _)| slot);
    (all.into_iter().take(SHOWN).map(|(_, s)| s).collect(), count)
}

/// Gathers the shards' PEs, sinks, counters and trace into the run's result.
fn finish(
    config: FabricConfig,
    pe_slot: Vec<u32>,
    sink_places: Vec<(Coord, Port)>,
    shards: Vec<Shard>,
    window: Option<TraceWindow>,
) -> Executed {
    let total_pes: usize = shards.iter().map(|s| s.pes.len()).sum();
    let mut srams: Vec<Sram> = (0..total_pes).map(|_| Sram::default()).collect();
    let mut pe_stats = Vec::with_capacity(total_pes);
    let mut links = Vec::new();
    let mut sinks: Vec<SinkLog> = sink_places
        .iter()
        .map(|&(pe, port)| SinkLog {
            pe,
            port,
            received: Vec::new(),
        })
        .collect();
    let (mut end, mut events, mut trace) = (0, 0, Vec::new());
    for mut shard in shards {
        for p in 0..shard.pes.len() as u32 {
            let high_water = shard.queue_high_water(p);
            let mut forwarded = vec![0u64; shard.pe_routes(p).len()];
            let mut router_forwards = 0;
            for &q in shard.pe_inbufs(p) {
                let queue = &shard.queues[q as usize];
                forwarded[usize::from(queue.route)] += queue.forwarded;
                router_forwards += queue.forwarded;
            }
            for (r, sent) in shard.pe_routes(p).iter().zip(forwarded) {
                for port in r.tx.iter() {
                    links.push(LinkUse {
                        pe: shard.pes[p as usize].coord,
                        color: r.color,
                        port,
                        wavelets: sent,
                    });
                }
            }
            let pe = &mut shard.pes[p as usize];
            let mut s = std::mem::take(&mut pe.stats);
            s.queue_high_water = high_water;
            s.router_forwards = router_forwards;
            s.router_wait_cycles = pe.router_wait_cycles;
            pe_stats.push((pe.coord, s));
            srams[pe.slot as usize] = std::mem::take(&mut pe.sram);
        }
        for sink in shard.sinks.drain(..) {
            sinks[sink.id as usize].received = sink.received;
        }
        end = end.max(shard.end);
        events += shard.events;
        trace.append(&mut shard.trace);
    }
    pe_stats.sort_by_key(|(c, _)| (c.y, c.x));
    links.sort_by_key(|l| (l.pe.y, l.pe.x, l.color, l.port));
    let mut total = PeStats::default();
    for (_, s) in &pe_stats {
        total.accumulate(s);
    }
    EVENTS_PROCESSED.fetch_add(events, Ordering::Relaxed);
    let trace = window.map(|window| {
        trace.sort_by_key(trace_order);
        Trace {
            window,
            events: trace,
        }
    });
    let stats = Stats {
        cycles: end,
        events,
        pes: pe_stats,
        links,
        total,
        trace,
    };
    Executed {
        config,
        pe_slot,
        srams,
        stats,
        sinks,
    }
}

/// The order of trace events: by start cycle, then PE, then kind (independent of the order the
/// engine happened to process a cycle's components in; events of one PE with equal keys keep
/// the order that PE produced them in, the same whatever the thread count).
fn trace_order(e: &TraceEvent) -> (u64, u32, u32, u8) {
    match *e {
        TraceEvent::Task { pe, start, .. } => (start, pe.y, pe.x, 0),
        TraceEvent::Forward { pe, cycle, .. } => (cycle, pe.y, pe.x, 1),
        TraceEvent::Async { pe, start, .. } => (start, pe.y, pe.x, 2),
    }
}
