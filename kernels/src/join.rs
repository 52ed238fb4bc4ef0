//! Waiting for several asynchronous fabric operations at once.
//!
//! Operations on the same color finish in issue order, so a set of operations has finished when,
//! for every color it uses, the last operation using that color has. [`issue`] finds those final
//! operations (at most one per color) and arms one distinct *arm* task per final operation; each
//! arm counts down a counter in SRAM and the last one activates the join's target. Distinct arm
//! tasks matter: activating an already active task is idempotent on the hardware, so one shared
//! task could miss a completion.

use wafersim_sim::{
    Buf, BuildError, Color, Coord, DType, Program, RecvMode, TaskCtx, TaskId, Then, VecRef,
};

/// One asynchronous fabric operation to issue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// Send `src` on `out`.
    Send { out: Color, src: VecRef },
    /// Receive into `dst` from `inp`.
    Recv {
        inp: Color,
        dst: VecRef,
        mode: RecvMode,
    },
    /// Receive from `inp`, add `local`, send on `out`.
    RecvAddSend {
        inp: Color,
        local: VecRef,
        out: Color,
    },
    /// Receive from `inp`, store into `dst`, send on `out`.
    RecvStoreSend { inp: Color, dst: VecRef, out: Color },
}

impl Op {
    fn colors(self) -> (Option<Color>, Option<Color>) {
        match self {
            Op::Send { out, .. } => (None, Some(out)),
            Op::Recv { inp, .. } => (Some(inp), None),
            Op::RecvAddSend { inp, out, .. } | Op::RecvStoreSend { inp, out, .. } => {
                (Some(inp), Some(out))
            }
        }
    }

    fn len(self) -> u32 {
        match self {
            Op::Send { src: v, .. }
            | Op::Recv { dst: v, .. }
            | Op::RecvAddSend { local: v, .. }
            | Op::RecvStoreSend { dst: v, .. } => v.len,
        }
    }

    /// Starts the operation, doing `then` when it finishes.
    pub fn issue(self, ctx: &mut TaskCtx<'_>, then: Then) {
        match self {
            Op::Send { out, src } => ctx.send(out, src, then),
            Op::Recv { inp, dst, mode } => ctx.recv(inp, dst, mode, then),
            Op::RecvAddSend { inp, local, out } => ctx.recv_add_send(inp, local, out, then),
            Op::RecvStoreSend { inp, dst, out } => ctx.recv_store_send(inp, dst, out, then),
        }
    }
}

/// Most final operations one join can wait for.
pub const ARMS: usize = 4;

/// The arm tasks and counter of one PE's join, activating `target` when all armed ops finish.
#[derive(Clone, Copy, Debug)]
pub struct Join {
    arms: [TaskId; ARMS],
    pending: Buf,
    target: TaskId,
}

impl Join {
    /// Creates the arm tasks and the counter on `pe`.
    pub fn place(p: &mut Program, pe: Coord, target: TaskId) -> Result<Join, BuildError> {
        let pending = p.alloc_zeros(pe, "join_pending", DType::F32, 1)?;
        let mut arms = [TaskId(0); ARMS];
        for arm in &mut arms {
            *arm = p.local_task(pe, "join_arm", move |ctx| {
                let left = ctx.load(pending.at(0)) - 1.0;
                ctx.store(pending.at(0), left);
                if left == 0.0 {
                    ctx.activate(target);
                }
            })?;
        }
        Ok(Join {
            arms,
            pending,
            target,
        })
    }
}

/// Issues the non-empty `ops` in order and makes `join` activate its target once all of them
/// have finished (at once if there are none).
pub fn issue(ctx: &mut TaskCtx<'_>, ops: &[Op], join: &Join) {
    let ops: Vec<Op> = ops.iter().copied().filter(|op| op.len() > 0).collect();
    let finals: Vec<bool> = (0..ops.len())
        .map(|i| {
            let (a_in, a_out) = ops[i].colors();
            !ops[i + 1..].iter().any(|later| {
                let (b_in, b_out) = later.colors();
                (a_in.is_some() && a_in == b_in) || (a_out.is_some() && a_out == b_out)
            })
        })
        .collect();
    let count = finals.iter().filter(|&&f| f).count();
    assert!(
        count <= ARMS,
        "a join waits for at most {ARMS} final operations, got {count}"
    );
    if count == 0 {
        ctx.activate(join.target);
        return;
    }
    ctx.store(join.pending.at(0), count as f32);
    let mut arm = 0;
    for (op, is_final) in ops.into_iter().zip(finals) {
        let then = if is_final {
            arm += 1;
            Then::Activate(join.arms[arm - 1])
        } else {
            Then::Nothing
        };
        op.issue(ctx, then);
    }
}
