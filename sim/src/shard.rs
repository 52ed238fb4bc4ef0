//! One region's share of a run: its PEs (routers, cores, SRAM), the router buffers and core
//! queues they own, the host streams and sinks at their edges, its calendar of wakes, and the
//! messages it sends to the regions next to it.
//!
//! A single-threaded run is one shard holding every PE. A parallel run splits the fabric into
//! rectangular regions ([`crate::region`]), one shard each, stepped cycle by cycle in lockstep
//! ([`crate::parallel`]). What is NOT here: deciding regions, threads and synchronisation.
//!
//! Key design decision: a shard never touches another shard's state. The only interactions that
//! cross a region boundary are router-to-router links, and both directions have at least one
//! cycle of latency: a wavelet pushed at `t` is visible from `t + hop_latency`, room freed by a
//! pop at `t` is visible from `t + 1`. So a push into a neighbour region's buffer becomes a
//! [`Msg::Push`] and a pop from a buffer fed by a neighbour region becomes a [`Msg::Credit`], both
//! applied between cycles. A producer reads the room of such a buffer from its own
//! [`Remote`] counter (wavelets sent minus credits received), which holds exactly what the
//! buffer's owner would report at the start of the cycle.
//!
//! Wakes are precise: a consumer wakes its producer after a pop only when that producer found no
//! room (`producer_waiting`), so a wake that could change nothing is never scheduled. Whether it
//! is scheduled does not depend on the order of a cycle's components (see `note_no_room`).
//!
//! Memory: every queue is a ring of `queue_depth` slots in one arena per shard; routes and router
//! buffer lists are arenas too, so a PE costs a few hundred bytes plus the SRAM its program
//! allocated.

use crate::calendar::{Calendar, WakeSet};
use crate::config::FabricConfig;
use crate::error::{RunError, SimError, Stuck};
use crate::geometry::{Coord, Port, PortSet};
use crate::memory::{DType, Sram};
use crate::oplist::{self, LazyOps};
use crate::program::{TaskBody, Then, Trigger};
use crate::stats::PeStats;
use crate::task::{AsyncKind, AsyncOp, CoreLinks, RecvMode, TaskCtx, TaskStates};
use crate::trace::{TraceEvent, TraceWindow};
use crate::wavelet::{Color, Wavelet};

pub(crate) const NONE: u32 = u32::MAX;
/// A route destination that is a sink: `SINK_BIT | sink index in the shard`.
pub(crate) const SINK_BIT: u32 = 1 << 31;
/// A route destination in another shard: `REMOTE_BIT | index in the shard's remotes`.
pub(crate) const REMOTE_BIT: u32 = 1 << 30;
/// Component kinds within a PE: injectors on the four edge ports (0..4), the router, the core.
pub(crate) const ROUTER: u32 = 4;
pub(crate) const CORE: u32 = 5;
const KIND_BITS: u32 = 3;
const KIND_MASK: u32 = (1 << KIND_BITS) - 1;

/// A component to wake: `(local pe << 3) | kind`.
pub(crate) type Comp = u32;

pub(crate) fn comp(pe: u32, kind: u32) -> Comp {
    (pe << KIND_BITS) | kind
}

pub(crate) fn comp_pe(c: Comp) -> u32 {
    c >> KIND_BITS
}

pub(crate) fn comp_kind(c: Comp) -> u32 {
    c & KIND_MASK
}

pub(crate) fn injector_kind(port: Port) -> u32 {
    port.index() as u32 - 1
}

/// What the run needs to know about the machine and the options, shared by every shard.
pub(crate) struct Env<'a> {
    pub config: &'a FabricConfig,
    pub trace: Option<TraceWindow>,
    pub depth: u32,
    pub hop: u64,
    pub ramp: u64,
    pub switch: u64,
}

impl<'a> Env<'a> {
    pub fn new(config: &'a FabricConfig, trace: Option<TraceWindow>) -> Self {
        Env {
            config,
            trace,
            depth: config.queue_depth,
            hop: u64::from(config.hop_latency),
            ramp: u64::from(config.ramp_latency),
            switch: u64::from(config.task_switch_cycles),
        }
    }

    fn traced(&self, pe: Coord, from: u64, to: u64) -> bool {
        self.trace.is_some_and(|w| w.covers(pe, from, to))
    }
}

/// A wavelet in a queue with the cycle it becomes visible.
#[derive(Clone, Copy, Default)]
pub(crate) struct Item {
    pub ready: u64,
    pub w: Wavelet,
}

/// Who fills a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Producer {
    /// Nobody (a buffer no route or stream feeds).
    None,
    /// A component of this shard.
    Local(Comp),
    /// A router of another shard, which counts room in its remote `link`.
    Remote { shard: u32, link: u32 },
}

/// A FIFO of at most `queue_depth` wavelets: a router input buffer or a core input queue.
/// Fields are ordered by how often the router reads them.
pub(crate) struct Queue {
    /// Cycle the oldest wavelet becomes visible (`u64::MAX` when empty): what the consumer checks
    /// most, kept beside the counts.
    pub head_at: u64,
    /// A router buffer's copy of its route's output ports and destinations (saves the router a
    /// lookup per wavelet).
    pub tx: PortSet,
    pub dest: [u32; 5],
    /// First slot of its ring in the shard's item arena.
    pub base: u32,
    /// Ring position of the oldest wavelet.
    pub head: u32,
    pub len: u32,
    /// Cycle of the last pop (at most one pop per cycle), `u64::MAX` before any.
    pub popped_at: u64,
    pub high_water: u32,
    /// Local index of the owning PE.
    pub owner: u32,
    pub producer: Producer,
    /// The producer found no room and waits for a pop to wake it.
    pub producer_waiting: bool,
    /// Index of the owner's route for `color`.
    pub route: u8,
    /// Position in the owner's router buffers (router buffers only).
    pub slot: u8,
    pub core_input: bool,
    pub color: Color,
    /// Where its wavelets arrive from (RAMP for a router buffer fed by the core, and for a core
    /// input queue).
    pub port: Port,
    /// Wavelets the router forwarded from it (each went out of every tx port of its route): the
    /// route's per-link counts are the sums over its buffers.
    pub forwarded: u64,
}

/// A router buffer of another shard that a router of this shard feeds.
pub(crate) struct Remote {
    pub shard: u32,
    /// The buffer's index in its shard.
    pub queue: u32,
    /// Wavelets sent minus pops reported: the buffer's occupancy as its producer may know it.
    pub outstanding: u32,
    /// The producer found no room and waits for a credit to wake it.
    pub waiting: bool,
    /// The local router feeding it.
    pub producer: Comp,
}

/// What one shard tells another between two cycles.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Msg {
    /// A wavelet for the receiver's buffer `queue`, visible from `ready`.
    Push { queue: u32, w: Wavelet, ready: u64 },
    /// A wavelet was popped from a buffer the receiver feeds through its remote `link`.
    Credit { link: u32 },
}

pub(crate) struct RouteState {
    pub color: Color,
    pub rx: PortSet,
    pub tx: PortSet,
    /// Destination per output port: a queue, `SINK_BIT | sink`, `REMOTE_BIT | remote` or `NONE`.
    pub dest: [u32; 5],
}

/// A task, with its body: what the core reads to pick it and to run it lies together.
pub(crate) struct TaskInfo {
    pub trigger: Trigger,
    /// The core input queue of a data task's color (`NONE` for a local task).
    pub queue: u32,
    pub name: &'static str,
    pub body: TaskBody,
}

/// One PE's state. Laid out by use (`repr(C)`, cache-line aligned): the router's fields and
/// what a push into the core's queue checks come first, then the core's, then what tasks and
/// operations use, then what only building and reports read; most events touch the first two or
/// three cache lines only.
#[repr(C, align(64))]
pub(crate) struct Pe {
    /// Bit `i` set when router buffer `i` holds a wavelet.
    pub occupied: u128,
    /// First of its router buffers in the shard's `inbufs`, in arbitration order.
    pub inbuf_start: u32,
    pub inbuf_len: u32,
    /// Router buffer that gets the first chance next (round-robin).
    pub rr: u32,
    /// Index in the program (the order PEs were first touched).
    pub slot: u32,
    /// `PeStats::router_wait_cycles`, kept here beside the router's other fields (the router
    /// forwards, `PeStats::router_forwards`, are counted per buffer); merged at the end.
    pub router_wait_cycles: u64,
    pub coord: Coord,
    pub busy_until: u64,
    /// Cycle the last task started, and the last asynchronous operation finished.
    pub task_started_at: u64,
    pub op_done_at: u64,
    /// Cycle of the last wavelet the core put on its ramp (`u64::MAX` for none).
    pub last_ramp_push: u64,
    /// The asynchronous operation that gets the first chance at the ramp next cycle.
    pub ramp_next: usize,
    pub ops: Vec<AsyncOp>,
    /// A list of operations not all taken up into `ops` yet (`crate::oplist`): every one not
    /// taken up waits behind one in `ops`.
    pub lazy: Option<Box<LazyOps>>,
    /// Bit `i` set when task `i` is a data task.
    pub data_tasks: u64,
    pub task_states: TaskStates,
    /// First of its tasks in the shard's `tasks` (`task_states.count` of them).
    pub task_start: u32,
    /// The operations of `ops` that may move (see [`first_of_each_color`]) with the counts that
    /// go with them, or `None` when an operation was issued, taken up or finished since they were
    /// last found: they depend on the operations' colors and on how many are held or listed.
    pub eligible: Option<Eligible>,
    pub stats: PeStats,
    pub sram: Sram,
    /// `(color, core input queue)` per route delivering to RAMP.
    pub core_in: Vec<(Color, u32)>,
    /// `(color, router RAMP buffer)` per route accepting from RAMP.
    pub core_out: Vec<(Color, u32)>,
    /// First of its routes in the shard's `routes`.
    pub route_start: u32,
    pub route_len: u32,
    pub injectors: [u32; 4],
}

/// A host stream entering at one edge port.
pub(crate) struct Injector {
    pub pe: u32,
    pub port: Port,
    pub stream: Vec<(Color, Wavelet)>,
    pub pos: usize,
    /// The PE's buffer for each color arriving from `port` (`NONE` where no route accepts it).
    pub queue_of: Vec<u32>,
}

/// Wavelets leaving the fabric through one edge port of a PE of this shard.
pub(crate) struct ShardSink {
    /// Index among the program's sinks.
    pub id: u32,
    pub received: Vec<(u64, Color, Wavelet)>,
}

/// The first task error of a cycle (by PE position).
pub(crate) struct TaskFailure {
    pub pe: Coord,
    pub error: SimError,
}

pub(crate) struct Shard {
    pub pes: Vec<Pe>,
    /// Every PE's tasks, PE after PE: a sweep over the PEs reads them in memory order.
    pub tasks: Vec<TaskInfo>,
    pub routes: Vec<RouteState>,
    pub inbufs: Vec<u32>,
    pub queues: Vec<Queue>,
    pub items: Vec<Item>,
    /// Ring size of every queue (a power of two at least `queue_depth`) minus one.
    pub ring_mask: u32,
    pub remotes: Vec<Remote>,
    pub injectors: Vec<Injector>,
    pub sinks: Vec<ShardSink>,
    pub cal: Calendar,
    /// One past the last cycle with any activity.
    pub end: u64,
    pub events: u64,
    pub trace: Vec<TraceEvent>,
    pub failure: Option<TaskFailure>,
    /// Messages for each shard, sent at the end of the cycle.
    pub outbox: Vec<Vec<Msg>>,
    batch: Vec<u32>,
    wake_set: WakeSet,
}

enum Step {
    Moved,
    Waiting,
    RampBusy,
}

impl Shard {
    pub fn new(depth: u32) -> Self {
        Shard {
            pes: Vec::new(),
            tasks: Vec::new(),
            routes: Vec::new(),
            inbufs: Vec::new(),
            queues: Vec::new(),
            items: Vec::new(),
            ring_mask: depth.next_power_of_two() - 1,
            remotes: Vec::new(),
            injectors: Vec::new(),
            sinks: Vec::new(),
            cal: Calendar::new(),
            end: 0,
            events: 0,
            trace: Vec::new(),
            failure: None,
            outbox: Vec::new(),
            batch: Vec::new(),
            wake_set: WakeSet::default(),
        }
    }

    /// Adds an empty queue owned by local PE `owner`; returns its index.
    pub fn add_queue(&mut self, owner: u32, color: Color, port: Port, core_input: bool) -> u32 {
        let ring = self.ring_mask + 1;
        let base = self.items.len() as u32;
        self.items
            .extend(std::iter::repeat_n(Item::default(), ring as usize));
        let pe = &self.pes[owner as usize];
        let route = self.routes[pe.route_start as usize..][..pe.route_len as usize]
            .iter()
            .position(|r| r.color == color)
            .expect("queues exist only for routes");
        self.queues.push(Queue {
            tx: PortSet::EMPTY,
            dest: [NONE; 5],
            base,
            head: 0,
            len: 0,
            head_at: u64::MAX,
            popped_at: u64::MAX,
            high_water: 0,
            owner,
            producer: Producer::None,
            producer_waiting: false,
            route: route as u8,
            slot: if core_input { 0 } else { pe.inbuf_len as u8 },
            core_input,
            color,
            port,
            forwarded: 0,
        });
        self.queues.len() as u32 - 1
    }

    /// Copies each route's output ports and destinations into its router buffers (once the
    /// destinations are final).
    pub fn copy_routes_into_buffers(&mut self) {
        for queue in self.queues.iter_mut().filter(|q| !q.core_input) {
            let pe = &self.pes[queue.owner as usize];
            let route = &self.routes[pe.route_start as usize + usize::from(queue.route)];
            queue.tx = route.tx;
            queue.dest = route.dest;
        }
    }

    pub fn pe_routes(&self, p: u32) -> &[RouteState] {
        let pe = &self.pes[p as usize];
        &self.routes[pe.route_start as usize..][..pe.route_len as usize]
    }

    pub fn pe_tasks(&self, p: u32) -> &[TaskInfo] {
        let pe = &self.pes[p as usize];
        &self.tasks[pe.task_start as usize..][..pe.task_states.count as usize]
    }

    pub fn pe_inbufs(&self, p: u32) -> &[u32] {
        let pe = &self.pes[p as usize];
        &self.inbufs[pe.inbuf_start as usize..][..pe.inbuf_len as usize]
    }

    #[inline]
    fn wake(&mut self, at: u64, c: Comp) {
        self.cal.push(at, c);
    }

    /// The wakes of cycle 0: host streams and cores with an activated task.
    pub fn start(&mut self) {
        for i in 0..self.injectors.len() {
            let inj = &self.injectors[i];
            let c = comp(inj.pe, injector_kind(inj.port));
            self.wake(0, c);
        }
        for p in 0..self.pes.len() {
            if self.pes[p].task_states.active != 0 {
                self.wake(0, comp(p as u32, CORE));
            }
        }
    }

    /// Runs every component woken at cycle `t` (the calendar's next cycle). A task error is kept
    /// in `failure` (the one of the PE first by position) and the cycle is finished.
    pub fn run_cycle(&mut self, env: &Env<'_>, t: u64) {
        let mut batch = std::mem::take(&mut self.batch);
        self.cal.take(t, &mut batch);
        // In PE order: the cycle's memory accesses sweep the shard's arrays once, and a
        // component woken several times runs once.
        self.wake_set.sort_dedup(&mut batch);
        for &c in &batch {
            let p = comp_pe(c);
            let kind = c & KIND_MASK;
            self.events += 1;
            match kind {
                ROUTER => self.router_step(env, p, t),
                CORE => {
                    if let Err(error) = self.core_step(env, p, t) {
                        self.keep_failure(p, error);
                    }
                }
                kind => self.injector_step(env, p, kind as usize, t),
            }
        }
        batch.clear();
        self.batch = batch;
    }

    fn keep_failure(&mut self, p: u32, error: SimError) {
        let pe = self.pes[p as usize].coord;
        let first = self
            .failure
            .as_ref()
            .is_none_or(|f| (pe.y, pe.x) < (f.pe.y, f.pe.x));
        if first {
            self.failure = Some(TaskFailure { pe, error });
        }
    }

    // ----- queues -----

    fn is_ready(&self, q: u32, t: u64) -> bool {
        self.queues[q as usize].head_at <= t
    }

    /// Whether destination `d` (a queue, remote buffer or sink) has a free slot for a producer at
    /// `t` (pops at `t` count from `t + 1`).
    fn has_room(&self, env: &Env<'_>, d: u32, t: u64) -> bool {
        if d & SINK_BIT != 0 {
            true
        } else if d & REMOTE_BIT != 0 {
            self.remotes[(d & !REMOTE_BIT) as usize].outstanding < env.depth
        } else {
            let queue = &self.queues[d as usize];
            queue.len + u32::from(queue.popped_at == t) < env.depth
        }
    }

    /// Producer `me` found no room in `d` at `t`: it must be woken when room appears. If the
    /// consumer already popped this cycle (room at `t + 1`), the producer wakes itself; otherwise
    /// the consumer's next pop wakes it. Either way the wake lands at the same cycle whatever
    /// order the cycle's components run in.
    fn note_no_room(&mut self, d: u32, t: u64, me: Comp) {
        if d & REMOTE_BIT != 0 {
            self.remotes[(d & !REMOTE_BIT) as usize].waiting = true;
            return;
        }
        let queue = &mut self.queues[d as usize];
        if queue.popped_at == t {
            self.wake(t + 1, me);
        } else {
            queue.producer_waiting = true;
        }
    }

    /// Pushes `w` into local queue `q` at cycle `t`, visible from `ready`, and wakes its
    /// consumer then.
    #[inline]
    pub fn push_local(&mut self, q: u32, w: Wavelet, t: u64, ready: u64) {
        let mask = self.ring_mask;
        let queue = &mut self.queues[q as usize];
        let tail = (queue.head + queue.len) & mask;
        self.items[(queue.base + tail) as usize] = Item { ready, w };
        if queue.len == 0 {
            queue.head_at = ready;
        }
        queue.len += 1;
        // Slots held as the producer sees them: a pop at `t` frees its slot at `t + 1`.
        let held = queue.len + u32::from(queue.popped_at == t);
        queue.high_water = queue.high_water.max(held);
        let owner = queue.owner;
        if queue.core_input {
            if !self.core_idle_through(owner, t, ready) {
                self.wake(ready, comp(owner, CORE));
            }
        } else {
            self.pes[owner as usize].occupied |= 1u128 << queue.slot;
            self.wake(ready, comp(owner, ROUTER));
        }
    }

    /// Whether waking core `p` at `ready` for a wavelet pushed at `t` would find it with nothing
    /// to do: a task runs through `ready` (it wakes the core when it ends) and no asynchronous
    /// operation could take the wavelet. Decided on state that no component running at `t`
    /// changes unnoticed (a task started or an operation finished at `t` means "wake"), so the
    /// answer does not depend on the order of the cycle's components.
    fn core_idle_through(&self, p: u32, t: u64, ready: u64) -> bool {
        let pe = &self.pes[p as usize];
        pe.busy_until > ready && pe.task_started_at != t && pe.ops.is_empty() && pe.op_done_at != t
    }

    /// Sends `w` to destination `d` (local queue or remote buffer) at `t` with `latency`.
    #[inline]
    fn deliver(&mut self, d: u32, w: Wavelet, t: u64, latency: u64) {
        let ready = t + latency;
        if d & REMOTE_BIT != 0 {
            let remote = &mut self.remotes[(d & !REMOTE_BIT) as usize];
            remote.outstanding += 1;
            let (shard, queue) = (remote.shard, remote.queue);
            self.outbox[shard as usize].push(Msg::Push { queue, w, ready });
        } else {
            self.push_local(d, w, t, ready);
        }
        self.end = self.end.max(ready);
    }

    /// Pops the head of `q` at cycle `t`, waking or crediting its producer.
    #[inline]
    fn take(&mut self, q: u32, t: u64) -> Item {
        let mask = self.ring_mask;
        let queue = &mut self.queues[q as usize];
        let item = self.items[(queue.base + queue.head) as usize];
        queue.head = (queue.head + 1) & mask;
        queue.len -= 1;
        queue.head_at = if queue.len == 0 {
            u64::MAX
        } else {
            self.items[(queue.base + queue.head) as usize].ready
        };
        queue.popped_at = t;
        if !queue.core_input && queue.len == 0 {
            let bit = 1u128 << queue.slot;
            self.pes[queue.owner as usize].occupied &= !bit;
        }
        match queue.producer {
            Producer::Local(p) if queue.producer_waiting => {
                queue.producer_waiting = false;
                self.wake(t + 1, p);
            }
            Producer::Remote { shard, link } => {
                self.outbox[shard as usize].push(Msg::Credit { link });
            }
            _ => {}
        }
        self.end = self.end.max(t + 1);
        item
    }

    /// Applies a message another shard sent during cycle `t`.
    pub fn receive(&mut self, msg: Msg, t: u64) {
        match msg {
            Msg::Push { queue, w, ready } => self.push_local(queue, w, t, ready),
            Msg::Credit { link } => {
                let remote = &mut self.remotes[link as usize];
                remote.outstanding -= 1;
                if remote.waiting {
                    remote.waiting = false;
                    let p = remote.producer;
                    self.wake(t + 1, p);
                }
            }
        }
    }

    // ----- host streams -----

    fn injector_step(&mut self, env: &Env<'_>, p: u32, kind: usize, t: u64) {
        let id = self.pes[p as usize].injectors[kind];
        let inj = &self.injectors[id as usize];
        let Some(&(color, w)) = inj.stream.get(inj.pos) else {
            return;
        };
        let q = inj.queue_of[color.index()];
        let me = comp(p, kind as u32);
        if !self.has_room(env, q, t) {
            self.note_no_room(q, t, me);
            return;
        }
        self.deliver(q, w, t, env.hop);
        let inj = &mut self.injectors[id as usize];
        inj.pos += 1;
        if inj.pos < inj.stream.len() {
            self.wake(t + 1, me);
        }
    }

    // ----- routers -----

    fn router_step(&mut self, env: &Env<'_>, p: u32, t: u64) {
        let pe = &self.pes[p as usize];
        let (n, start, inbuf_start) = (pe.inbuf_len as usize, pe.rr as usize, pe.inbuf_start);
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
            let q = self.inbufs[inbuf_start as usize + i];
            let queue = &self.queues[q as usize];
            if queue.head_at > t {
                continue;
            }
            let (tx, dest, color) = (queue.tx, queue.dest, queue.color);
            if tx.intersects(used) {
                again = true; // lost arbitration for a port: try next cycle
                continue;
            }
            if !self.all_have_room(env, tx, &dest, t, comp(p, ROUTER)) {
                continue; // a destination's pop wakes us
            }
            let item = self.take(q, t);
            self.queues[q as usize].forwarded += 1;
            self.forward(env, p, color, tx, &dest, item.w, t);
            self.pes[p as usize].router_wait_cycles += t - item.ready;
            used = used.union(tx);
            last_granted = Some(k);
            if self.is_ready(q, t + 1) {
                again = true;
            }
        }
        if let Some(k) = last_granted {
            self.pes[p as usize].rr = ((start + k + 1) % n) as u32;
        }
        if again {
            self.wake(t + 1, comp(p, ROUTER));
        }
    }

    /// Whether every destination of a route has room; marks the full ones as awaited.
    fn all_have_room(
        &mut self,
        env: &Env<'_>,
        tx: PortSet,
        dest: &[u32; 5],
        t: u64,
        me: Comp,
    ) -> bool {
        let mut ok = true;
        for port in tx.iter() {
            let d = dest[port.index()];
            if !self.has_room(env, d, t) {
                self.note_no_room(d, t, me);
                ok = false;
            }
        }
        ok
    }

    /// Sends `w` of `color` out of ports `tx` of PE `p` (to `dest` per port) at cycle `t`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        env: &Env<'_>,
        p: u32,
        color: Color,
        tx: PortSet,
        dest: &[u32; 5],
        w: Wavelet,
        t: u64,
    ) {
        for port in tx.iter() {
            let latency = if port == Port::Ramp {
                env.ramp
            } else {
                env.hop
            };
            let d = dest[port.index()];
            if d & SINK_BIT != 0 {
                let arrival = t + latency;
                self.sinks[(d & !SINK_BIT) as usize]
                    .received
                    .push((arrival, color, w));
                self.end = self.end.max(arrival);
            } else {
                self.deliver(d, w, t, latency);
            }
        }
        let pe = self.pes[p as usize].coord;
        if env.traced(pe, t, t) {
            self.trace.push(TraceEvent::Forward {
                pe,
                color,
                cycle: t,
                ports: tx,
            });
        }
    }

    // ----- cores -----

    fn core_step(&mut self, env: &Env<'_>, p: u32, t: u64) -> Result<(), SimError> {
        if !self.pes[p as usize].ops.is_empty() {
            self.step_async_ops(env, p, t);
        }
        if self.pes[p as usize].busy_until <= t
            && let Some(task) = self.pick_task(p, t)
        {
            self.run_task(env, p, task, t)?;
        }
        Ok(())
    }

    /// Advances each eligible asynchronous operation by at most one wavelet. Operations sharing
    /// a color run in issue order, so only the first one of each color is eligible; they compete
    /// for the ramp round-robin, from the one after the last to use it.
    fn step_async_ops(&mut self, env: &Env<'_>, p: u32, t: u64) {
        let pe = &mut self.pes[p as usize];
        let found = pe
            .eligible
            .get_or_insert_with(|| first_of_each_color(&pe.ops, pe.lazy.as_deref()));
        let count = found.count;
        // Positions count the operations not taken up yet, as if they were all held.
        let first = pe.ramp_next % found.held;
        let ops = &pe.ops;
        let from = found
            .as_slice()
            .partition_point(|&i| oplist::position_of(ops, i as usize) < first);
        let mut again = false;
        let mut finished: u64 = 0;
        let mut finished_late = Vec::new();
        // Nothing below changes the eligible operations until the loop ends (finished ones are
        // removed after it), so each index is read where it is, not copied out.
        for n in 0..count {
            // From `from` round to `from - 1` (`from <= count`, so one wrap at most).
            let k = if from + n < count {
                from + n
            } else {
                from + n - count
            };
            let Some(i) = self.pes[p as usize].eligible.as_ref().map(|e| e.index[k]) else {
                break;
            };
            let i = i as usize;
            let op = &self.pes[p as usize].ops[i];
            if op.next_at > t {
                let at = op.next_at;
                self.wake(at, comp(p, CORE));
                continue;
            }
            if op.done < op.len {
                match self.step_one(env, p, i, t) {
                    Step::Moved => again = true,
                    Step::RampBusy => {
                        again = true;
                        continue;
                    }
                    Step::Waiting => continue,
                }
            }
            let op = &self.pes[p as usize].ops[i];
            if op.done == op.len {
                if i < 64 {
                    finished |= 1 << i;
                } else {
                    finished_late.push(i);
                }
                again = true;
            }
        }
        let any_finished = finished != 0 || !finished_late.is_empty();
        if any_finished {
            self.pes[p as usize].eligible = None;
        }
        // Remove from the highest index down.
        finished_late.sort_unstable();
        for &i in finished_late.iter().rev() {
            let op = self.pes[p as usize].ops.remove(i);
            self.complete(env, p, op, t);
        }
        while finished != 0 {
            let i = 63 - finished.leading_zeros() as usize;
            finished &= !(1 << i);
            let op = self.pes[p as usize].ops.remove(i);
            self.complete(env, p, op, t);
        }
        if any_finished && self.pes[p as usize].lazy.is_some() {
            self.take_up(p, t);
        }
        if again {
            self.wake(t + 1, comp(p, CORE));
        }
    }

    /// Takes up operations of PE `p`'s list that could now start, and wakes the core when they
    /// may (as issuing them would have).
    fn take_up(&mut self, p: u32, t: u64) {
        let pe = &mut self.pes[p as usize];
        let Pe {
            ops,
            lazy,
            sram,
            core_in,
            core_out,
            ..
        } = pe;
        let links = CoreLinks {
            inputs: core_in,
            outputs: core_out,
        };
        if oplist::take_up(ops, lazy, sram, links, false) == 0 {
            return;
        }
        pe.eligible = None;
        // Taken up out of order, the new operations need not be the last ones; a wake for one
        // that already had it is a duplicate, which the engine drops.
        for k in 0..self.pes[p as usize].ops.len() {
            let at = self.pes[p as usize].ops[k].start_at;
            if at > t {
                self.wake(at, comp(p, CORE));
            }
        }
    }

    fn complete(&mut self, env: &Env<'_>, p: u32, op: AsyncOp, t: u64) {
        let pe = &mut self.pes[p as usize];
        pe.op_done_at = t;
        match op.then {
            Then::Nothing => {}
            Then::Activate(task) => pe.task_states.set_active(usize::from(task.0), true),
            Then::Unblock(task) => pe.task_states.set_blocked(usize::from(task.0), false),
        }
        self.end = self.end.max(t + 1);
        let coord = pe.coord;
        if env.traced(coord, op.start_at, t + 1) {
            self.trace.push(TraceEvent::Async {
                pe: coord,
                name: op.issued_by,
                start: op.start_at,
                end: t + 1,
            });
        }
    }

    /// Moves one wavelet of operation `i`.
    fn step_one(&mut self, env: &Env<'_>, p: u32, i: usize, t: u64) -> Step {
        let pe = &self.pes[p as usize];
        let op = &pe.ops[i];
        let (in_queue, out_queue) = (op.in_queue, op.out_queue);
        if out_queue.is_some() && pe.last_ramp_push == t {
            return Step::RampBusy;
        }
        if let Some(q) = out_queue {
            if !self.has_room(env, q, t) {
                let op = &mut self.pes[p as usize].ops[i];
                op.stalled_since.get_or_insert(t);
                self.note_no_room(q, t, comp(p, CORE));
                return Step::Waiting; // the router's pop wakes us
            }
            let pe = &mut self.pes[p as usize];
            if let Some(since) = pe.ops[i].stalled_since.take() {
                pe.stats.send_stall_cycles += t - since;
            }
        }
        let received = match in_queue {
            Some(q) if self.is_ready(q, t) => Some(self.take(q, t).w),
            Some(_) => return Step::Waiting, // the arrival wakes us
            None => None,
        };
        let pe = &mut self.pes[p as usize];
        if received.is_some() {
            pe.stats.wavelets_received += 1;
        }
        let op = &mut pe.ops[i];
        let k = op.done;
        let outgoing = match &op.kind {
            AsyncKind::Send { wavelets } => Some(wavelets[k as usize]),
            AsyncKind::Recv { dtype, at, mode } => {
                let w = received.expect("recv has an input");
                store_received(&mut pe.sram, *dtype, at + k as usize, w, *mode);
                None
            }
            AsyncKind::RecvAddSend { at } => {
                let sum = received.expect("has an input").f32() + pe.sram.f32s[at + k as usize];
                Some(Wavelet::from_f32(sum))
            }
            AsyncKind::RecvStoreSend { dtype, at } => {
                let w = received.expect("has an input");
                store_received(&mut pe.sram, *dtype, at + k as usize, w, RecvMode::Store);
                Some(w)
            }
        };
        let op = &mut pe.ops[i];
        op.done += 1;
        op.next_at = t + 1;
        if let (Some(w), Some(q)) = (outgoing, out_queue) {
            pe.last_ramp_push = t;
            pe.ramp_next = oplist::position_of(&pe.ops, i) + 1;
            pe.stats.wavelets_sent += 1;
            self.deliver(q, w, t, env.ramp);
        }
        Step::Moved
    }

    /// The lowest-numbered runnable task, if any: an activated local task, or a data task with
    /// a wavelet ready that no pending operation reads; neither blocked.
    fn pick_task(&self, p: u32, t: u64) -> Option<usize> {
        let pe = &self.pes[p as usize];
        let states = pe.task_states;
        let mut candidates = ((states.active & !pe.data_tasks) | pe.data_tasks) & !states.blocked;
        while candidates != 0 {
            let i = candidates.trailing_zeros() as usize;
            candidates &= candidates - 1;
            if pe.data_tasks >> i & 1 == 0 {
                return Some(i);
            }
            let task = &self.tasks[pe.task_start as usize + i];
            let Trigger::Data(color) = task.trigger else {
                continue;
            };
            let held_reads = match &pe.eligible {
                Some(e) => e.reads,
                None => colors_read(&pe.ops),
            };
            if self.is_ready(task.queue, t)
                && held_reads & 1 << color.index() == 0
                && pe.lazy.as_ref().is_none_or(|l| !l.rest_reads(color))
            {
                return Some(i);
            }
        }
        None
    }

    fn run_task(&mut self, env: &Env<'_>, p: u32, task: usize, t: u64) -> Result<(), SimError> {
        let info = &self.tasks[self.pes[p as usize].task_start as usize + task];
        let (trigger, queue, name) = (info.trigger, info.queue, info.name);
        let wavelet = match trigger {
            Trigger::Local => {
                self.pes[p as usize].task_states.set_active(task, false);
                None
            }
            Trigger::Data(_) => {
                let w = self.take(queue, t).w;
                self.pes[p as usize].stats.wavelets_received += 1;
                Some(w)
            }
        };
        let ops_before = self.pes[p as usize].ops.len();
        let held_before = held(&self.pes[p as usize]);
        let task_index = self.pes[p as usize].task_start as usize + task;
        let (cycles, error) = execute_body(
            env.config,
            &mut self.pes[p as usize],
            &mut self.tasks[task_index].body,
            name,
            wavelet,
            t,
        );
        let pe = &mut self.pes[p as usize];
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
        let cost = env.switch + cycles;
        pe.busy_until = t + cost;
        pe.task_started_at = t;
        pe.stats.busy_cycles += cost;
        pe.stats.tasks_run += 1;
        self.end = self.end.max(t + cost);
        self.wake(t + cost, comp(p, CORE));
        // Anything issued adds to the operations held or listed (a list may add none to `ops`).
        if held(&self.pes[p as usize]) != held_before {
            self.pes[p as usize].eligible = None;
        }
        for k in ops_before..self.pes[p as usize].ops.len() {
            let at = self.pes[p as usize].ops[k].start_at;
            self.wake(at, comp(p, CORE));
        }
        if env.traced(coord, t, t + cost) {
            self.trace.push(TraceEvent::Task {
                pe: coord,
                name,
                start: t,
                cycles: cost,
            });
        }
        Ok(())
    }

    // ----- reports -----

    /// This shard's PEs with work left, as `(program slot, what)`, and how many there are;
    /// only the `shown` first by slot are described.
    pub fn stuck(&self, shown: usize) -> (Vec<(u32, Stuck)>, usize) {
        let mut stuck = Vec::new();
        let mut count = 0;
        for p in 0..self.pes.len() as u32 {
            if !self.has_work_left(p) {
                continue;
            }
            count += 1;
            let pe = &self.pes[p as usize];
            stuck.push((pe.slot, p));
        }
        stuck.sort_unstable();
        stuck.truncate(shown);
        let described = stuck
            .into_iter()
            .map(|(slot, p)| {
                let what = self.work_left(p);
                let pe = self.pes[p as usize].coord;
                (slot, Stuck { pe, what })
            })
            .collect();
        (described, count)
    }

    fn has_work_left(&self, p: u32) -> bool {
        let pe = &self.pes[p as usize];
        let queued = self
            .pe_inbufs(p)
            .iter()
            .chain(pe.core_in.iter().map(|(_, q)| q))
            .any(|&q| self.queues[q as usize].len > 0);
        let streaming =
            pe.injectors.iter().filter(|&&id| id != NONE).any(|&id| {
                self.injectors[id as usize].pos < self.injectors[id as usize].stream.len()
            });
        queued || !pe.ops.is_empty() || pe.task_states.active != 0 || streaming
    }

    /// What PE `p` still has to do: waiting wavelets, unfinished operations, activated tasks,
    /// host data.
    fn work_left(&self, p: u32) -> Vec<String> {
        let pe = &self.pes[p as usize];
        let mut what = Vec::new();
        let queues = self
            .pe_inbufs(p)
            .iter()
            .chain(pe.core_in.iter().map(|(_, q)| q));
        for &q in queues {
            let queue = &self.queues[q as usize];
            if queue.len == 0 {
                continue;
            }
            let n = queue.len;
            if queue.core_input {
                let task = self
                    .pe_tasks(p)
                    .iter()
                    .enumerate()
                    .find(|(_, t)| t.trigger == Trigger::Data(queue.color));
                let why = match task {
                    Some((i, t)) if pe.task_states.is_blocked(i) => {
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
        if let Some(l) = &pe.lazy {
            what.push(format!(
                "{} more fabric ops of task \"{}\" not started",
                l.remaining(),
                l.issued_by()
            ));
        }
        for (i, t) in self.pe_tasks(p).iter().enumerate() {
            if pe.task_states.is_active(i) {
                let state = if pe.task_states.is_blocked(i) {
                    "activated but blocked"
                } else {
                    "activated"
                };
                what.push(format!("task \"{}\" {state}", t.name));
            }
        }
        for &id in pe.injectors.iter().filter(|&&id| id != NONE) {
            let inj = &self.injectors[id as usize];
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

    /// The most wavelets any one of PE `p`'s queues held.
    pub fn queue_high_water(&self, p: u32) -> u32 {
        let pe = &self.pes[p as usize];
        self.pe_inbufs(p)
            .iter()
            .chain(pe.core_in.iter().map(|(_, q)| q))
            .map(|&q| self.queues[q as usize].high_water)
            .max()
            .unwrap_or(0)
    }
}

/// Most operations that can be eligible at once: each claims a color (below
/// [`crate::HARDWARE_COLORS`], checked when routes are made) that no earlier operation uses, as
/// input or as output.
const MAX_ELIGIBLE: usize = 2 * crate::config::HARDWARE_COLORS as usize;

/// What a PE's core finds about its operations, valid until they change (an operation issued,
/// taken up or finished). Laid out with the counts first: a step reads one cache line of it.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Eligible {
    count: usize,
    /// Operations held plus those of a list not taken up yet (positions run over these).
    held: usize,
    /// The colors held operations read, one bit each.
    reads: u32,
    /// Indices into the PE's operations, in index order.
    index: [u32; MAX_ELIGIBLE],
}

impl Eligible {
    fn as_slice(&self) -> &[u32] {
        &self.index[..self.count]
    }
}

/// Operations PE `pe` holds plus those of its list not taken up yet.
fn held(pe: &Pe) -> usize {
    pe.ops.len() + pe.lazy.as_deref().map_or(0, LazyOps::remaining)
}

/// The colors `ops` read, one bit each.
fn colors_read(ops: &[AsyncOp]) -> u32 {
    ops.iter()
        .filter_map(|o| o.in_color)
        .fold(0, |m, c| m | 1 << c.index())
}

/// The indices of the operations that no earlier operation shares a color with (in either
/// direction), in index order, with the counts that go with them.
fn first_of_each_color(ops: &[AsyncOp], lazy: Option<&LazyOps>) -> Eligible {
    let (mut seen_in, mut seen_out) = (0u32, 0u32);
    let bit = |c: Color| 1u32 << c.index();
    let mut eligible = Eligible {
        count: 0,
        held: ops.len() + lazy.map_or(0, LazyOps::remaining),
        reads: 0,
        index: [0; MAX_ELIGIBLE],
    };
    for (i, op) in ops.iter().enumerate() {
        let waits = op.in_color.is_some_and(|c| seen_in & bit(c) != 0)
            || op.out_color.is_some_and(|c| seen_out & bit(c) != 0);
        if !waits {
            eligible.index[eligible.count] = i as u32;
            eligible.count += 1;
        }
        seen_in |= op.in_color.map_or(0, bit);
        seen_out |= op.out_color.map_or(0, bit);
    }
    eligible.reads = seen_in;
    eligible
}

/// Calls the body of a task of `pe` (named `name`); returns its cycles and its error if any.
fn execute_body(
    config: &FabricConfig,
    pe: &mut Pe,
    body: &mut TaskBody,
    name: &'static str,
    wavelet: Option<Wavelet>,
    t: u64,
) -> (u64, Option<String>) {
    let Pe {
        sram,
        task_states,
        ops,
        lazy,
        stats,
        core_in,
        core_out,
        ..
    } = pe;
    let mut ctx = TaskCtx {
        config,
        now: t,
        cycles: 0,
        wavelet,
        sram,
        tasks: task_states,
        ops,
        lazy,
        stats,
        links: CoreLinks {
            inputs: core_in,
            outputs: core_out,
        },
        name,
        error: None,
    };
    body(&mut ctx);
    (ctx.cycles, ctx.error)
}

/// Stores (or adds) `w` at arena index `i` of type `dtype`.
fn store_received(sram: &mut Sram, dtype: DType, i: usize, w: Wavelet, mode: RecvMode) {
    match dtype {
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
