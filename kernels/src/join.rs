//! Waiting for several asynchronous fabric operations at once.
//!
//! Operations on the same color finish in issue order, so a set of operations has finished when,
//! for every color it uses, the last operation using that color has. [`issue`] finds those final
//! operations (at most one per color) and arms one distinct *arm* task per final operation; each
//! arm counts down a counter in SRAM and the last one activates the join's target. Distinct arm
//! tasks matter: activating an already active task is idempotent on the hardware, so one shared
//! task could miss a completion. [`issue_generated`] does the same for operations made on demand
//! (an [`OpSource`]); both hand the simulator one list, so a PE holds only the operations that
//! could start.

use wafersim_sim::{Buf, BuildError, Color, Coord, DType, OpList, Program, TaskCtx, TaskId, Then};

/// One asynchronous fabric operation to issue (the simulator's [`wafersim_sim::FabricOp`]).
pub use wafersim_sim::FabricOp as Op;

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

/// Operations generated on demand, in issue order, none of them empty: for lists too long to
/// hold on every PE (a row reduce-scatter posts one per column), see [`issue_generated`].
pub trait OpSource: Send + 'static {
    /// How many operations.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Operation `i` (`i < len()`).
    fn op(&self, i: usize) -> Op;
}

impl OpSource for Vec<Op> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn op(&self, i: usize) -> Op {
        self[i]
    }
}

/// Issues the non-empty `ops` in order and makes `join` activate its target once all of them
/// have finished (at once if there are none).
pub fn issue(ctx: &mut TaskCtx<'_>, ops: &[Op], join: &Join) {
    let ops: Vec<Op> = ops.iter().copied().filter(|op| !op.is_empty()).collect();
    issue_generated(ctx, ops, join);
}

/// Issues the operations of `source` in order (as one [`wafersim_sim::OpList`], so the PE holds
/// only the few that could start) and makes `join` activate its target once all of them have
/// finished (at once if there are none).
pub fn issue_generated<S: OpSource>(ctx: &mut TaskCtx<'_>, source: S, join: &Join) {
    let finals = final_ops(&source);
    if finals.is_empty() {
        ctx.activate(join.target);
        return;
    }
    ctx.store(join.pending.at(0), finals.len() as f32);
    let mut arms = [None; ARMS];
    for (arm, &i) in finals.iter().enumerate() {
        arms[arm] = Some((i, join.arms[arm]));
    }
    ctx.issue_list(Box::new(Joined { source, arms }));
}

/// The operations no later one shares a color with (the input color as input, the output color
/// as output), in order: when they have finished, all have. At most [`ARMS`].
fn final_ops<S: OpSource>(source: &S) -> Vec<usize> {
    let bit = |c: Option<Color>| c.map_or(0, |c| 1u32 << c.index());
    let (mut later_in, mut later_out) = (0u32, 0u32);
    let mut finals = Vec::new();
    for i in (0..source.len()).rev() {
        let op = source.op(i);
        debug_assert!(!op.is_empty(), "an op source yields no empty operation");
        let (a_in, a_out) = op.colors();
        if bit(a_in) & later_in == 0 && bit(a_out) & later_out == 0 {
            finals.push(i);
        }
        later_in |= bit(a_in);
        later_out |= bit(a_out);
    }
    assert!(
        finals.len() <= ARMS,
        "a join waits for at most {ARMS} final operations, got {}",
        finals.len()
    );
    finals.reverse();
    finals
}

/// A source with its final operations armed: operation `i` activates the arm paired with it.
struct Joined<S> {
    source: S,
    arms: [Option<(usize, TaskId)>; ARMS],
}

impl<S: OpSource> OpList for Joined<S> {
    fn len(&self) -> usize {
        self.source.len()
    }

    fn get(&self, i: usize) -> (Op, Then) {
        let then = self
            .arms
            .iter()
            .flatten()
            .find(|(final_op, _)| *final_op == i)
            .map_or(Then::Nothing, |&(_, arm)| Then::Activate(arm));
        (self.source.op(i), then)
    }
}
