//! The instructions a task can execute, with their cost: [`TaskCtx`].
//!
//! A task body runs to completion when the core picks it. Each call on the context executes one
//! instruction on the PE's SRAM at once and adds its cycles to the task's running total; the core
//! is busy for `task_switch_cycles` plus that total. Vector instructions cost
//! `issue_cycles + ceil(len / simd_width)` with the width of their class and types
//! ([`crate::SimdWidths`]); transcendentals cost `exp_cycles_per_element` per element, and so
//! does each scalar routine the PE has no instruction for (reciprocal, `1/sqrt`, `ln`).
//!
//! Fabric input and output are asynchronous, as DSD operations with `.async = true` are on the
//! hardware: [`TaskCtx::send`], [`TaskCtx::recv`] and [`TaskCtx::recv_add_send`] (or
//! [`TaskCtx::issue`] with a [`FabricOp`]) start a microthread that moves at most one wavelet per
//! cycle in the background and may activate or unblock a task when it finishes. Operations on the
//! same color run one after another in issue order. Values to send are read when the send is
//! issued. [`TaskCtx::issue_list`] issues a long list at once without holding it
//! (`oplist.rs`).
//!
//! Numerics: `f32` instructions compute in `f32`; `f16` instructions compute each element in
//! `f32` and round the result to `f16` once. Operands are read before the destination is written
//! (an instruction whose destination overlaps a source at another offset sees the old values).
//!
//! A misused instruction (wrong types, out-of-bounds vector, a color without a route to or from
//! the core) does nothing but records an error; the run then stops with [`crate::RunError::Task`].

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::config::FabricConfig;
use crate::memory::{DType, Sram, VecRef};
use crate::oplist::{self, FabricOp, LazyOps, OpList};
use crate::program::{TaskId, Then};
use crate::stats::PeStats;
use crate::wavelet::{Color, Wavelet};

/// Run state of a PE's tasks (at most [`crate::MAX_TASKS_PER_PE`] = 64): bit `i` of `active`
/// (`blocked`) set when task `i` is activated (blocked). Bits make the core's search for the
/// first runnable task a few word operations.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TaskStates {
    pub active: u64,
    pub blocked: u64,
    /// How many tasks the PE has.
    pub count: u32,
}

impl TaskStates {
    pub fn is_active(&self, task: usize) -> bool {
        self.active >> task & 1 == 1
    }

    pub fn is_blocked(&self, task: usize) -> bool {
        self.blocked >> task & 1 == 1
    }

    pub fn set_active(&mut self, task: usize, on: bool) {
        set_bit(&mut self.active, task, on);
    }

    pub fn set_blocked(&mut self, task: usize, on: bool) {
        set_bit(&mut self.blocked, task, on);
    }
}

fn set_bit(word: &mut u64, bit: usize, on: bool) {
    if on {
        *word |= 1 << bit;
    } else {
        *word &= !(1 << bit);
    }
}

/// How a receive combines each arriving value with the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvMode {
    /// `dst[i] = wavelet`.
    Store,
    /// `dst[i] += wavelet`.
    Add,
}

/// A microthread operation in progress.
#[derive(Debug)]
pub(crate) struct AsyncOp {
    pub kind: AsyncKind,
    /// Queue read from (core input queue), if any.
    pub in_queue: Option<u32>,
    /// Queue written to (the router's RAMP input buffer), if any.
    pub out_queue: Option<u32>,
    pub in_color: Option<Color>,
    pub out_color: Option<Color>,
    pub done: u32,
    pub len: u32,
    /// Earliest cycle of the first element.
    pub start_at: u64,
    /// Earliest cycle of the next element (one per cycle).
    pub next_at: u64,
    /// First cycle of the current wait for room in the router's buffer, if waiting.
    pub stalled_since: Option<u64>,
    pub then: Then,
    pub issued_by: &'static str,
    /// Its position in the list being taken up (`oplist::NOT_LISTED` otherwise).
    pub list_index: u32,
    /// Operations of its list before it not taken up yet (0 when not listed): kept up to date
    /// by `oplist::take_up`, the only place operations are taken up (see `oplist::position_of`).
    pub untaken_before: u32,
}

/// What an operation does per wavelet. `at` is the arena index of the vector's first element,
/// found when the operation is issued (a PE's buffers do not move during a run), so moving a
/// wavelet does not look its buffer up again.
#[derive(Debug)]
pub(crate) enum AsyncKind {
    Send {
        wavelets: Vec<Wavelet>,
    },
    Recv {
        dtype: DType,
        at: usize,
        mode: RecvMode,
    },
    RecvAddSend {
        at: usize,
    },
    RecvStoreSend {
        dtype: DType,
        at: usize,
    },
}

/// The colors a core can read from and write to, with their queue ids.
#[derive(Clone, Copy)]
pub(crate) struct CoreLinks<'a> {
    /// `(color, core input queue)` for every route delivering to RAMP.
    pub inputs: &'a [(Color, u32)],
    /// `(color, router RAMP input buffer)` for every route accepting from RAMP.
    pub outputs: &'a [(Color, u32)],
}

impl CoreLinks<'_> {
    /// The core input queue of `color`, if a route delivers it to RAMP.
    pub fn input(&self, color: Color) -> Option<u32> {
        find_queue(self.inputs, color)
    }

    /// The router buffer taking `color` from RAMP, if a route accepts it.
    pub fn output(&self, color: Color) -> Option<u32> {
        find_queue(self.outputs, color)
    }
}

fn find_queue(table: &[(Color, u32)], color: Color) -> Option<u32> {
    table.iter().find(|(c, _)| *c == color).map(|&(_, q)| q)
}

/// What a running task sees of its PE: the instruction set.
pub struct TaskCtx<'a> {
    pub(crate) config: &'a FabricConfig,
    pub(crate) now: u64,
    pub(crate) cycles: u64,
    pub(crate) wavelet: Option<Wavelet>,
    pub(crate) sram: &'a mut Sram,
    pub(crate) tasks: &'a mut TaskStates,
    pub(crate) ops: &'a mut Vec<AsyncOp>,
    /// A list issued by [`TaskCtx::issue_list`] and not all taken up yet.
    pub(crate) lazy: &'a mut Option<Box<LazyOps>>,
    pub(crate) stats: &'a mut PeStats,
    pub(crate) links: CoreLinks<'a>,
    pub(crate) name: &'static str,
    pub(crate) error: Option<String>,
}

impl TaskCtx<'_> {
    /// The payload that triggered this data task (a local task gets an error and `0`).
    pub fn wavelet(&mut self) -> Wavelet {
        match self.wavelet {
            Some(w) => w,
            None => {
                self.fail("a local task has no wavelet".into());
                Wavelet(0)
            }
        }
    }

    /// Cycles charged to this task so far (excluding the task switch).
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Charges `n` cycles of scalar work (address arithmetic, loop control, scalar math).
    pub fn scalar_cycles(&mut self, n: u64) {
        self.cycles += n;
    }

    fn fail(&mut self, reason: String) {
        if self.error.is_none() {
            self.error = Some(reason);
        }
    }

    fn checked(&mut self, op: &str, v: VecRef) -> Option<std::ops::Range<usize>> {
        match self.sram.range(v) {
            Ok(r) => Some(r),
            Err(e) => {
                self.fail(format!("{op}: {e}"));
                None
            }
        }
    }

    fn same_len(&mut self, op: &str, dst: VecRef, src: VecRef) -> bool {
        if dst.len != src.len {
            self.fail(format!(
                "{op}: operand lengths differ ({} vs {})",
                dst.len, src.len
            ));
            return false;
        }
        true
    }

    fn charge_vector(&mut self, len: u32, width: u32) {
        self.cycles += self.config.vector_cycles(u64::from(len), width);
        self.stats.vector_elements += u64::from(len);
    }

    fn arith_width(&self, dtype: DType) -> u32 {
        match dtype {
            DType::F32 => self.config.simd.arith_f32,
            DType::F16 => self.config.simd.arith_f16,
        }
    }

    fn fmac_width(&mut self, op: &str, dst: DType, src: DType) -> Option<u32> {
        let s = &self.config.simd;
        match (dst, src) {
            (DType::F32, DType::F32) => Some(s.fmac_f32),
            (DType::F16, DType::F16) => Some(s.fmac_f16),
            (DType::F32, DType::F16) => Some(s.fmac_mixed),
            (DType::F16, DType::F32) => {
                self.fail(format!("{op}: cannot accumulate f32 products into f16"));
                None
            }
        }
    }

    fn get(&self, dtype: DType, i: usize) -> f32 {
        match dtype {
            DType::F32 => self.sram.f32s[i],
            DType::F16 => self.sram.f16s[i].to_f32(),
        }
    }

    fn set(&mut self, dtype: DType, i: usize, value: f32) {
        match dtype {
            DType::F32 => self.sram.f32s[i] = value,
            DType::F16 => self.sram.f16s[i] = f16::from_f32(value),
        }
    }

    /// A copy of `v`'s elements widened to f32.
    fn gather(&self, v: VecRef, range: std::ops::Range<usize>) -> Vec<f32> {
        match v.dtype() {
            DType::F32 => self.sram.f32s[range].to_vec(),
            DType::F16 => self.sram.f16s[range].iter().map(|h| h.to_f32()).collect(),
        }
    }

    /// `dst[i] = f(dst[i], a[i], b[i])` for same-length operands; `b` may be absent.
    fn elementwise(
        &mut self,
        op: &str,
        dst: VecRef,
        a: VecRef,
        b: Option<VecRef>,
        f: impl Fn(f32, f32, f32) -> f32,
    ) -> bool {
        if !self.same_len(op, dst, a) || b.is_some_and(|b| !self.same_len(op, dst, b)) {
            return false;
        }
        let (Some(rd), Some(ra)) = (self.checked(op, dst), self.checked(op, a)) else {
            return false;
        };
        let rb = match b {
            Some(b) => match self.checked(op, b) {
                Some(r) => Some((b, r)),
                None => return false,
            },
            None => None,
        };
        // A source overlapping the destination at another offset must be read before any write.
        let shifted = |v: VecRef, r: &std::ops::Range<usize>| {
            v.dtype() == dst.dtype() && r.start != rd.start && r.start < rd.end && rd.start < r.end
        };
        if shifted(a, &ra) || rb.as_ref().is_some_and(|(b, r)| shifted(*b, r)) {
            let va = self.gather(a, ra);
            let vb = rb.map(|(b, r)| self.gather(b, r));
            for (k, i) in rd.enumerate() {
                let old = self.get(dst.dtype(), i);
                let y = vb.as_ref().map_or(0.0, |vb| vb[k]);
                self.set(dst.dtype(), i, f(old, va[k], y));
            }
            return true;
        }
        for (k, i) in rd.enumerate() {
            let old = self.get(dst.dtype(), i);
            let x = self.get(a.dtype(), ra.start + k);
            let y = rb
                .as_ref()
                .map_or(0.0, |(b, r)| self.get(b.dtype(), r.start + k));
            self.set(dst.dtype(), i, f(old, x, y));
        }
        true
    }

    fn require_same_type(&mut self, op: &str, dst: VecRef, others: &[VecRef]) -> bool {
        if others.iter().any(|o| o.dtype() != dst.dtype()) {
            self.fail(format!("{op}: operands must all be {}", dst.dtype().name()));
            return false;
        }
        true
    }

    /// AXPY: `dst += a * s` (`@fmacs`/`@fmach`/`@fmachs` by types). Counts `len` FMACs.
    pub fn fmac(&mut self, dst: VecRef, a: VecRef, s: f32) {
        let Some(width) = self.fmac_width("fmac", dst.dtype(), a.dtype()) else {
            return;
        };
        if !self.same_len("fmac", dst, a) {
            return;
        }
        let (Some(rd), Some(ra)) = (self.checked("fmac", dst), self.checked("fmac", a)) else {
            return;
        };
        let s = round_to(a.dtype(), s);
        match (dst.dtype(), a.dtype()) {
            (DType::F32, DType::F32) => axpy_f32(&mut self.sram.f32s, rd, ra, s),
            (DType::F32, DType::F16) => axpy_mixed(&mut self.sram.f32s[rd], &self.sram.f16s[ra], s),
            _ => {
                if !self.elementwise("fmac", dst, a, None, |d, x, _| d + x * s) {
                    return;
                }
            }
        }
        self.stats.fmacs += u64::from(dst.len);
        self.charge_vector(dst.len, width);
    }

    fn arith(&mut self, op: &str, dst: VecRef, a: VecRef, b: VecRef, f: fn(f32, f32) -> f32) {
        if !self.require_same_type(op, dst, &[a, b]) {
            return;
        }
        if self.elementwise(op, dst, a, Some(b), |_, x, y| f(x, y)) {
            let width = self.arith_width(dst.dtype());
            self.charge_vector(dst.len, width);
        }
    }

    /// `dst = a + b`.
    pub fn add(&mut self, dst: VecRef, a: VecRef, b: VecRef) {
        self.arith("add", dst, a, b, |x, y| x + y);
    }

    /// `dst = a - b`.
    pub fn sub(&mut self, dst: VecRef, a: VecRef, b: VecRef) {
        self.arith("sub", dst, a, b, |x, y| x - y);
    }

    /// `dst = a * b` element-wise.
    pub fn mul(&mut self, dst: VecRef, a: VecRef, b: VecRef) {
        self.arith("mul", dst, a, b, |x, y| x * y);
    }

    /// `dst = max(a, b)` element-wise.
    pub fn max(&mut self, dst: VecRef, a: VecRef, b: VecRef) {
        if !self.require_same_type("max", dst, &[a, b]) {
            return;
        }
        if self.elementwise("max", dst, a, Some(b), |_, x, y| x.max(y)) {
            self.charge_vector(dst.len, self.config.simd.max);
        }
    }

    fn with_scalar(&mut self, op: &str, dst: VecRef, a: VecRef, s: f32, f: fn(f32, f32) -> f32) {
        if !self.require_same_type(op, dst, &[a]) {
            return;
        }
        let s = round_to(a.dtype(), s);
        if self.elementwise(op, dst, a, None, |_, x, _| f(x, s)) {
            let width = self.arith_width(dst.dtype());
            self.charge_vector(dst.len, width);
        }
    }

    /// `dst = a * s`.
    pub fn scale(&mut self, dst: VecRef, a: VecRef, s: f32) {
        self.with_scalar("scale", dst, a, s, |x, s| x * s);
    }

    /// `dst = a + s`.
    pub fn add_scalar(&mut self, dst: VecRef, a: VecRef, s: f32) {
        self.with_scalar("add_scalar", dst, a, s, |x, s| x + s);
    }

    /// `dst = a`, converting between `f32` and `f16` if the types differ (at width 1).
    pub fn mov(&mut self, dst: VecRef, a: VecRef) {
        let width = match (dst.dtype(), a.dtype()) {
            (DType::F32, DType::F32) => self.config.simd.mov_f32,
            (DType::F16, DType::F16) => self.config.simd.mov_f16,
            _ => 1,
        };
        if self.elementwise("mov", dst, a, None, |_, x, _| x) {
            self.charge_vector(dst.len, width);
        }
    }

    /// `dst = s` everywhere.
    pub fn fill(&mut self, dst: VecRef, s: f32) {
        let Some(rd) = self.checked("fill", dst) else {
            return;
        };
        match dst.dtype() {
            DType::F32 => self.sram.f32s[rd].fill(s),
            DType::F16 => self.sram.f16s[rd].fill(f16::from_f32(s)),
        }
        let width = match dst.dtype() {
            DType::F32 => self.config.simd.mov_f32,
            DType::F16 => self.config.simd.mov_f16,
        };
        self.charge_vector(dst.len, width);
    }

    fn transcendental(&mut self, op: &str, dst: VecRef, a: VecRef, f: fn(f32) -> f32) {
        if !self.require_same_type(op, dst, &[a]) {
            return;
        }
        if self.elementwise(op, dst, a, None, |_, x, _| f(x)) {
            self.cycles += self.config.transcendental_cycles(u64::from(dst.len));
            self.stats.vector_elements += u64::from(dst.len);
        }
    }

    /// `dst = exp(a)`.
    pub fn exp(&mut self, dst: VecRef, a: VecRef) {
        self.transcendental("exp", dst, a, f32::exp);
    }

    /// `dst = tanh(a)`.
    pub fn tanh(&mut self, dst: VecRef, a: VecRef) {
        self.transcendental("tanh", dst, a, f32::tanh);
    }

    /// A scalar routine the PE has no instruction for, done in software:
    /// [`FabricConfig::software_routine_cycles`].
    fn software_scalar(&mut self, x: f32, f: fn(f32) -> f32) -> f32 {
        self.cycles += self.config.software_routine_cycles();
        f(x)
    }

    /// `1 / x` of one scalar (in software: the PE has no divide).
    pub fn recip(&mut self, x: f32) -> f32 {
        self.software_scalar(x, f32::recip)
    }

    /// `1 / sqrt(x)` of one scalar (in software), as the f32 `1 / sqrt(x)`.
    pub fn rsqrt(&mut self, x: f32) -> f32 {
        self.software_scalar(x, |v| 1.0 / v.sqrt())
    }

    /// `ln x` of one scalar (in software).
    pub fn ln(&mut self, x: f32) -> f32 {
        self.software_scalar(x, f32::ln)
    }

    /// The sum of `a`, accumulated in `f32` in element order.
    pub fn sum(&mut self, a: VecRef) -> f32 {
        let Some(ra) = self.checked("sum", a) else {
            return 0.0;
        };
        let total =
            (0..a.len as usize).fold(0.0f32, |acc, k| acc + self.get(a.dtype(), ra.start + k));
        let width = self.arith_width(a.dtype());
        self.charge_vector(a.len, width);
        total
    }

    /// The dot product of `a` and `b`, accumulated in `f32` in element order. Counts FMACs.
    pub fn dot(&mut self, a: VecRef, b: VecRef) -> f32 {
        if !self.same_len("dot", a, b) || !self.require_same_type("dot", a, &[b]) {
            return 0.0;
        }
        let (Some(ra), Some(rb)) = (self.checked("dot", a), self.checked("dot", b)) else {
            return 0.0;
        };
        let t = a.dtype();
        let total = (0..a.len as usize).fold(0.0f32, |acc, k| {
            acc + self.get(t, ra.start + k) * self.get(t, rb.start + k)
        });
        let width = self.fmac_width("dot", DType::F32, t).unwrap_or(1);
        self.stats.fmacs += u64::from(a.len);
        self.charge_vector(a.len, width);
        total
    }

    /// Element 0 of `v`, as a scalar load (one issue).
    pub fn load(&mut self, v: VecRef) -> f32 {
        let Some(r) = self.checked("load", v) else {
            return 0.0;
        };
        self.cycles += u64::from(self.config.issue_cycles);
        self.get(v.dtype(), r.start)
    }

    /// Writes `value` to element 0 of `v` (one issue).
    pub fn store(&mut self, v: VecRef, value: f32) {
        let Some(r) = self.checked("store", v) else {
            return;
        };
        self.cycles += u64::from(self.config.issue_cycles);
        self.set(v.dtype(), r.start, value);
    }

    /// Marks `task` runnable.
    pub fn activate(&mut self, task: TaskId) {
        if let Some(i) = self.task_index(task) {
            self.tasks.set_active(i, true);
        }
    }

    /// Blocks `task`: it will not be picked until unblocked.
    pub fn block(&mut self, task: TaskId) {
        if let Some(i) = self.task_index(task) {
            self.tasks.set_blocked(i, true);
        }
    }

    /// Unblocks `task`.
    pub fn unblock(&mut self, task: TaskId) {
        if let Some(i) = self.task_index(task) {
            self.tasks.set_blocked(i, false);
        }
    }

    fn task_index(&mut self, task: TaskId) -> Option<usize> {
        if u32::from(task.0) >= self.tasks.count {
            self.fail(format!("no task {} on this PE", task.0));
            return None;
        }
        Some(usize::from(task.0))
    }

    fn queue_of(&mut self, op: &str, color: Color, output: bool) -> Option<u32> {
        let found = if output {
            self.links.output(color)
        } else {
            self.links.input(color)
        };
        if found.is_none() {
            let dir = if output {
                "accepts it from RAMP"
            } else {
                "delivers it to RAMP"
            };
            self.fail(format!("{op}: no route on {color} {dir}"));
        }
        found
    }

    /// Checks `op` as this task issues it: its vector, its types, a route for each color.
    fn check_op(&mut self, op: FabricOp) -> bool {
        let (name, input, output) = match op {
            FabricOp::Send { out, .. } => ("send", None, Some(out)),
            FabricOp::Recv { inp, .. } => ("recv", Some(inp), None),
            FabricOp::RecvAddSend { inp, local, out } => {
                if local.dtype() != DType::F32 {
                    self.fail("recv_add_send: the local vector must be f32".into());
                    return false;
                }
                ("recv_add_send", Some(inp), Some(out))
            }
            FabricOp::RecvStoreSend { inp, out, .. } => ("recv_store_send", Some(inp), Some(out)),
        };
        self.checked(name, op.vector()).is_some()
            && input.is_none_or(|c| self.queue_of(name, c, false).is_some())
            && output.is_none_or(|c| self.queue_of(name, c, true).is_some())
    }

    /// The start cycle of an operation issued now, after charging its issue.
    fn charge_issue(&mut self) -> u64 {
        self.cycles += u64::from(self.config.issue_cycles);
        self.now + u64::from(self.config.task_switch_cycles) + self.cycles
    }

    /// Takes up the rest of an earlier list, so that what is issued now comes behind it; from
    /// then on its operations count as issued one by one.
    fn take_up_all(&mut self) {
        if self.lazy.is_some() {
            oplist::take_up(self.ops, self.lazy, self.sram, self.links, true);
        }
        for op in self.ops.iter_mut() {
            op.list_index = oplist::NOT_LISTED;
            op.untaken_before = 0;
        }
    }

    /// Starts `op`, doing `then` when it finishes.
    pub fn issue(&mut self, op: FabricOp, then: Then) {
        if !self.check_op(op) {
            return;
        }
        self.take_up_all();
        let start_at = self.charge_issue();
        let pending = oplist::async_op(op, then, self.sram, self.links, start_at, self.name);
        self.ops.push(pending);
    }

    /// Issues every operation of `list` in order, charged as [`TaskCtx::issue`] one by one; the
    /// PE holds only those that could start (see [`OpList`]). An operation that fails its
    /// checks stops the task before any of the list is issued.
    pub fn issue_list(&mut self, list: Box<dyn OpList>) {
        for i in 0..list.len() {
            if !self.check_op(list.get(i).0) {
                return;
            }
        }
        if list.is_empty() {
            return;
        }
        self.take_up_all();
        let issue = u64::from(self.config.issue_cycles);
        let first_start = self.charge_issue();
        self.cycles += issue * (list.len() as u64 - 1);
        *self.lazy = Some(Box::new(LazyOps::new(list, first_start, issue, self.name)));
        oplist::take_up(self.ops, self.lazy, self.sram, self.links, false);
    }

    /// Sends the elements of `src` on `color`, one wavelet each: an `f32` payload, or for `f16`
    /// the sparse form with the element's position in `src` as index.
    pub fn send(&mut self, color: Color, src: VecRef, then: Then) {
        self.issue(FabricOp::Send { out: color, src }, then);
    }

    /// Receives `dst.len` wavelets of `color` into `dst` (stored or added, as `f32` payloads, or
    /// as the fp16 low half for an `f16` destination).
    pub fn recv(&mut self, color: Color, dst: VecRef, mode: RecvMode, then: Then) {
        let op = FabricOp::Recv {
            inp: color,
            dst,
            mode,
        };
        self.issue(op, then);
    }

    /// For each element: receive a wavelet on `in_color`, add `local[i]`, send the sum on
    /// `out_color` (one step of a chain reduction, `@fadds(fabout, fabin, mem)`). `f32` only.
    pub fn recv_add_send(&mut self, in_color: Color, local: VecRef, out_color: Color, then: Then) {
        let op = FabricOp::RecvAddSend {
            inp: in_color,
            local,
            out: out_color,
        };
        self.issue(op, then);
    }

    /// For each element: receive a wavelet on `in_color`, store it in `dst[i]` (as `f32`, or the
    /// fp16 low half for an `f16` destination) and send it on unchanged on `out_color` (a
    /// store-and-forward hop of an all-gather through the core).
    pub fn recv_store_send(&mut self, in_color: Color, dst: VecRef, out_color: Color, then: Then) {
        let op = FabricOp::RecvStoreSend {
            inp: in_color,
            dst,
            out: out_color,
        };
        self.issue(op, then);
    }
}

fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => f16::from_f32(x).to_f32(),
    }
}

/// Elements converted from fp16 at a time (a stack buffer).
const CHUNK: usize = 64;

/// `dst += s * src` with `src` in fp16, each product and sum in `f32` (every fp16 value is
/// exact in `f32`, so how it is widened does not matter).
fn axpy_mixed(dst: &mut [f32], src: &[f16], s: f32) {
    // Below one SIMD conversion's width, the slice conversion copies through a buffer: element
    // by element is cheaper.
    if src.len() < 8 {
        for (d, x) in dst.iter_mut().zip(src) {
            *d += x.to_f32() * s;
        }
        return;
    }
    let mut wide = [0.0f32; CHUNK];
    for (d, x) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
        let wide = &mut wide[..x.len()];
        x.convert_to_f32_slice(wide);
        for (d, x) in d.iter_mut().zip(wide.iter()) {
            *d += x * s;
        }
    }
}

/// `y[rd] += s * x[ra]` within one arena, element by element in order when the ranges overlap.
fn axpy_f32(arena: &mut [f32], rd: std::ops::Range<usize>, ra: std::ops::Range<usize>, s: f32) {
    if rd.end <= ra.start || ra.end <= rd.start {
        let (dst, src) = if rd.start < ra.start {
            let (lo, hi) = arena.split_at_mut(ra.start);
            (&mut lo[rd], &hi[..ra.len()])
        } else {
            let (lo, hi) = arena.split_at_mut(rd.start);
            (&mut hi[..rd.len()], &lo[ra])
        };
        for (d, x) in dst.iter_mut().zip(src) {
            *d += x * s;
        }
    } else {
        let src: Vec<f32> = arena[ra].to_vec();
        for (d, x) in arena[rd].iter_mut().zip(&src) {
            *d += x * s;
        }
    }
}
