//! A row all-reduce taking the element-wise maximum: every PE of a region row ends with the
//! maximum, element by element, of the row's vectors.
//!
//! [`crate::chain::RowAllReduce`] only adds: its chain hops are `recv_add_send`, which the
//! microthreads perform on the fly. There is no "receive, max, send" microthread operation (nor
//! a max DSD with a fabric operand in the simulator), so a max cannot be pipelined wavelet by
//! wavelet the same way; and reducing `-z` does not help (a sum of negatives is no minimum).
//! Instead each hop is *store and forward*: column `c` receives its western neighbour's running
//! maximum into a scratch vector, a local task folds it in with one `max` instruction, and sends
//! the result east. The last column then holds the row's maximum and multicasts it west on the
//! broadcast color exactly as `RowAllReduce` does.
//!
//! Routes: the very same as [`crate::chain::RowAllReduce`] with the same colors (an east-bound
//! chain alternating two colors, a west-bound multicast), so a kernel that needs both a max and
//! a sum along its rows installs the routes once and runs the two collectives one after the
//! other on the same colors (each link is FIFO and each PE issues its operations of one color in
//! order, so the phases never mix).
//!
//! Cost for vectors of `n` elements over `C` columns (ramp latency `a`, hop `h`, task switch
//! `s`, issue `i`, max width `w`): each of the `C - 1` hops takes about
//! `n + 2a + h + s + (i + ceil(n / w)) + 2i` cycles (the whole vector crosses before the next
//! hop can start), then the broadcast about `n + 2a + (C - 1) h`.
//!
//! What it is not: not pipelined across hops (a chunked variant would be, at the price of a task
//! per chunk), and not a general reduction: max only. It does no arithmetic that the FLOP
//! convention counts as matmul work (no `fmac`/`dot`).

use wafersim_sim::{BuildError, Color, Program, RecvMode, TaskCtx, TaskId, Then, VecRef};

use crate::chain::{ChainColors, RowAllReduce};
use crate::layout::Region;

/// The colors of a row max all-reduce (the routes of a [`RowAllReduce`] on the same colors).
#[derive(Clone, Copy, Debug)]
pub struct RowMaxAllReduce {
    pub east: ChainColors,
    pub broadcast: Color,
}

/// One PE's part of a [`RowMaxAllReduce`], placed by [`RowMaxAllReduce::place`].
#[derive(Clone, Copy, Debug)]
pub struct RowMax {
    colors: RowMaxAllReduce,
    c: usize,
    cols: usize,
    v: VecRef,
    /// The folding task and its scratch vector (every column but the first).
    step: Option<(TaskId, VecRef)>,
    done: TaskId,
}

impl RowMaxAllReduce {
    /// The sum all-reduce with the same colors: same routes, usable on them afterwards.
    pub fn as_sum(&self) -> RowAllReduce {
        RowAllReduce {
            east: self.east,
            broadcast: self.broadcast,
        }
    }

    /// The routes of region column `c`, row `r` (those of [`RowAllReduce::install`]).
    pub fn install(
        &self,
        p: &mut Program,
        region: Region,
        c: u32,
        r: u32,
    ) -> Result<(), BuildError> {
        self.as_sum().install(p, region, c, r)
    }

    /// Places column `c`'s part on `region.pe(c, r)`: except on column 0, a scratch vector as long
    /// as `v` and the task folding the western neighbour's maximum in. `done` is activated once `v`
    /// holds the row's maximum on this PE.
    pub fn place(
        &self,
        p: &mut Program,
        region: Region,
        (c, r): (u32, u32),
        v: VecRef,
        done: TaskId,
    ) -> Result<RowMax, BuildError> {
        let pe = region.pe(c, r);
        let mut part = RowMax {
            colors: *self,
            c: c as usize,
            cols: region.cols as usize,
            v,
            step: None,
            done,
        };
        if c > 0 {
            let scratch = p.alloc_zeros(pe, "rowmax_scratch", v.dtype(), v.len as usize)?;
            let hop = part;
            let step = p.local_task(pe, "rowmax_step", move |ctx| hop.fold(ctx, scratch.all()))?;
            part.step = Some((step, scratch.all()));
        }
        Ok(part)
    }
}

impl RowMax {
    /// Starts the all-reduce on this PE; `v` must hold this PE's values.
    pub fn start(&self, ctx: &mut TaskCtx<'_>) {
        if self.cols == 1 {
            ctx.activate(self.done);
        } else if let Some((step, scratch)) = self.step {
            ctx.recv(
                self.colors.east.inp(self.c),
                scratch,
                RecvMode::Store,
                Then::Activate(step),
            );
        } else {
            ctx.send(self.colors.east.out(self.c), self.v, Then::Nothing);
            self.await_broadcast(ctx);
        }
    }

    /// Folds the western neighbour's maximum in and passes it on (or broadcasts it back).
    fn fold(&self, ctx: &mut TaskCtx<'_>, scratch: VecRef) {
        ctx.max(self.v, self.v, scratch);
        if self.c + 1 == self.cols {
            ctx.send(self.colors.broadcast, self.v, Then::Nothing);
            ctx.activate(self.done);
        } else {
            ctx.send(self.colors.east.out(self.c), self.v, Then::Nothing);
            self.await_broadcast(ctx);
        }
    }

    fn await_broadcast(&self, ctx: &mut TaskCtx<'_>) {
        ctx.recv(
            self.colors.broadcast,
            self.v,
            RecvMode::Store,
            Then::Activate(self.done),
        );
    }
}
