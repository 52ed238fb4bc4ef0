//! Sums over groups of neighbouring columns of a row: every PE of a group ends with the sum, over
//! the group's columns, of the vectors they hold. Neighbouring groups may share one column (a
//! PE whose features end one group and start the next), so one PE takes part in at most two
//! groups, one reaching west and one reaching east of it, or in one reaching both ways.
//!
//! Per group `c0..=c1` and vector `x`: the partial sums run east down the group as a chain
//! (`c0` sends, each column in between `recv_add_send`s, `c1` receives and adds), then `c1`
//! sends the total back west, store-and-forward (`recv_store_send` in between, a plain receive
//! at `c0`). A column starts a group's sum when its part is issued; it is done with a group when
//! the total has arrived (or, on `c1`, when it has been sent back west), and when it is done with
//! all its groups it activates the task it was given.
//!
//! Routes: an east-bound and a west-bound chain, each alternating two colors by column parity
//! (column `c` sends east on `east.out(c)`), installed only between two columns of one group.
//! Because a column's features are contiguous, at most one group spans any two neighbouring
//! columns, so every link carries at most one group's wavelets in each direction and the groups
//! of a row run at the same time without sharing a link.
//!
//! Cost for vectors of `m` elements over a group of `g` columns (hop `h = hop + 2 ramp + 1`,
//! task switch `s`, issue `i`): the chain `m + (g - 1) h`, the turnaround task on `c1`
//! `s + 2 i` once its core is free, the return `m + (g - 1) h`.
//!
//! What it is not: no reduce-scatter (every member ends with the whole sum, which is what a
//! softmax over a head's scores split by features needs); not pipelined between the two phases
//! (the last column must hold the total before it sends it back, since `recv_add_send` does not
//! store); no arithmetic counted as matmul work (the adds are `recv_add_send`/`recv` with add).
//!
//! Key design decision: chains rather than a multicast back: a multicast route would deliver
//! past the group's first column into the neighbouring group, whose columns do not expect it;
//! store-and-forward chains stop exactly at the group's ends.

use std::ops::Range;

use wafersim_sim::{
    Buf, BuildError, Coord, DType, Port, Program, RecvMode, TaskCtx, TaskId, Then, VecRef,
};

use crate::chain::ChainColors;
use crate::join::Op;
use crate::layout::Region;

/// The colors of the group sums of a row: the east-bound partial sums and the west-bound totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupAllReduce {
    /// Colors of the east-bound chain, alternating by column parity.
    pub east: ChainColors,
    /// Colors of the west-bound chain, alternating by column parity.
    pub west: ChainColors,
}

/// A vector one PE sums with a group of columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// The group's region columns, this PE's included; a group of one column is already summed.
    pub group: Range<usize>,
    /// This PE's partial sums, replaced by the group's sums.
    pub data: VecRef,
}

/// One PE's part of the group sums, placed by [`GroupAllReduce::place`].
#[derive(Clone, Debug)]
pub struct GroupPart {
    ops: Vec<(Op, Then)>,
    /// The count of groups still running, when the PE takes part in more than one.
    pending: Option<Buf>,
    groups: u32,
    done: TaskId,
}

/// Where column `c` sits in a group.
enum Position {
    First,
    Middle,
    Last,
}

fn position(c: usize, group: &Range<usize>) -> Position {
    if c == group.start {
        Position::First
    } else if c + 1 == group.end {
        Position::Last
    } else {
        Position::Middle
    }
}

/// The members that need any communication (groups of more than one column).
fn shared(members: &[Member]) -> impl Iterator<Item = &Member> {
    members.iter().filter(|m| m.group.len() > 1)
}

/// Counts one group done on this PE; the last one activates `done`.
fn count_down(ctx: &mut TaskCtx<'_>, pending: Option<Buf>, done: TaskId) {
    let Some(pending) = pending else {
        ctx.activate(done);
        return;
    };
    let left = ctx.load(pending.at(0)) - 1.0;
    ctx.store(pending.at(0), left);
    if left == 0.0 {
        ctx.activate(done);
    }
}

impl GroupAllReduce {
    /// The routes of region column `c`, row `r`, which takes part in `members`: links to the
    /// eastern (western) neighbour when a group holds it too.
    pub fn install(
        &self,
        p: &mut Program,
        region: Region,
        (c, r): (u32, u32),
        members: &[Member],
    ) -> Result<(), BuildError> {
        let pe = region.pe(c, r);
        let cu = c as usize;
        if members.iter().any(|m| m.group.contains(&(cu + 1))) {
            p.route(pe, self.east.out(cu), Port::Ramp, Port::East)?;
            p.route(pe, self.west.inp(cu), Port::East, Port::Ramp)?;
        }
        if members.iter().any(|m| m.group.start < cu) {
            p.route(pe, self.east.inp(cu), Port::West, Port::Ramp)?;
            p.route(pe, self.west.out(cu), Port::Ramp, Port::West)?;
        }
        Ok(())
    }

    /// Places column `c`'s part on `pe`: one task per group (it counts the group done, or on
    /// the group's last column sends the total back first), and a one-element f32 counter if
    /// there are several.
    /// `done` is activated once every member's data holds its group's sum. `members` must not
    /// overlap but at one column (the groups of a row's contiguous feature blocks never do).
    pub fn place(
        &self,
        p: &mut Program,
        pe: Coord,
        c: usize,
        members: &[Member],
        done: TaskId,
    ) -> Result<GroupPart, BuildError> {
        let groups = shared(members).count();
        let pending = if groups > 1 {
            Some(p.alloc_zeros(pe, "group_pending", DType::F32, 1)?)
        } else {
            None
        };
        let mut ops = Vec::new();
        for m in shared(members) {
            let x = m.data;
            match position(c, &m.group) {
                Position::First => {
                    let arm = p.local_task(pe, "group_done", move |ctx| {
                        count_down(ctx, pending, done);
                    })?;
                    ops.push((self.send_east(c, x), Then::Nothing));
                    ops.push((self.total_from_east(c, x, false), Then::Activate(arm)));
                }
                Position::Middle => {
                    let arm = p.local_task(pe, "group_done", move |ctx| {
                        count_down(ctx, pending, done);
                    })?;
                    ops.push((self.add_east(c, x), Then::Nothing));
                    ops.push((self.total_from_east(c, x, true), Then::Activate(arm)));
                }
                Position::Last => {
                    let back = Op::Send {
                        out: self.west.out(c),
                        src: x,
                    };
                    let turn = p.local_task(pe, "group_total", move |ctx| {
                        ctx.issue(back, Then::Nothing);
                        count_down(ctx, pending, done);
                    })?;
                    let total = Op::Recv {
                        inp: self.east.inp(c),
                        dst: x,
                        mode: RecvMode::Add,
                    };
                    ops.push((total, Then::Activate(turn)));
                }
            }
        }
        Ok(GroupPart {
            ops,
            pending,
            groups: groups as u32,
            done,
        })
    }

    fn send_east(&self, c: usize, x: VecRef) -> Op {
        Op::Send {
            out: self.east.out(c),
            src: x,
        }
    }

    fn add_east(&self, c: usize, x: VecRef) -> Op {
        Op::RecvAddSend {
            inp: self.east.inp(c),
            local: x,
            out: self.east.out(c),
        }
    }

    /// The total coming back from the east: stored, and passed on west unless `c` is first.
    fn total_from_east(&self, c: usize, x: VecRef, forward: bool) -> Op {
        if forward {
            Op::RecvStoreSend {
                inp: self.west.inp(c),
                dst: x,
                out: self.west.out(c),
            }
        } else {
            Op::Recv {
                inp: self.west.inp(c),
                dst: x,
                mode: RecvMode::Store,
            }
        }
    }
}

impl GroupPart {
    /// Whether the PE takes part in no group of more than one column.
    pub fn is_empty(&self) -> bool {
        self.groups == 0
    }

    /// Starts this PE's part (its members' data must hold its partial sums); the `done` task is
    /// activated when all its groups are summed (at once if there are none).
    pub fn issue(&self, ctx: &mut TaskCtx<'_>) {
        if self.groups == 0 {
            ctx.activate(self.done);
            return;
        }
        if let Some(pending) = self.pending {
            ctx.store(pending.at(0), self.groups as f32);
        }
        for &(op, then) in &self.ops {
            ctx.issue(op, then);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wafersim_sim::{Color, FabricConfig, RunOptions, Simulator};

    const SUMS: GroupAllReduce = GroupAllReduce {
        east: ChainColors([Color(1), Color(2)]),
        west: ChainColors([Color(3), Color(4)]),
    };

    /// The groups of the head holding each column's features: `features` split over `cols`
    /// columns as the layout splits them, heads of `hd` features.
    fn head_groups(features: usize, cols: usize, hd: usize) -> Vec<Vec<Range<usize>>> {
        let split = crate::layout::Split::new(features, cols);
        (0..cols)
            .map(|c| {
                let f = split.block(c);
                (f.start / hd..=(f.end - 1) / hd)
                    .map(|h| split.owner(h * hd)..split.owner((h + 1) * hd - 1) + 1)
                    .collect()
            })
            .collect()
    }

    /// Column `c`, group `k` of it holds `[10^c; 3]` plus `k`-dependent offsets; runs the sums
    /// on `rows` rows and returns every PE's data after the run.
    fn run(groups: &[Vec<Range<usize>>], rows: u32) -> (Vec<Vec<Vec<f32>>>, wafersim_sim::Stats) {
        let cols = groups.len() as u32;
        let region = Region::at_origin(cols, rows);
        let mut p = Program::new(FabricConfig::rectangle(cols, rows).unwrap()).unwrap();
        let mut bufs = Vec::new();
        for r in 0..rows {
            for (c, gs) in groups.iter().enumerate() {
                let pe = region.pe(c as u32, r);
                let init: Vec<f32> = gs
                    .iter()
                    .flat_map(|g| vec![10f32.powi(c as i32) * (g.start + 1) as f32; 3])
                    .collect();
                let data = p.alloc_f32(pe, "x", &init).unwrap();
                let members: Vec<Member> = gs
                    .iter()
                    .enumerate()
                    .map(|(k, g)| Member {
                        group: g.clone(),
                        data: data.slice(3 * k as u32, 3),
                    })
                    .collect();
                SUMS.install(&mut p, region, (c as u32, r), &members)
                    .unwrap();
                let flag = p.alloc_zeros(pe, "flag", DType::F32, 1).unwrap();
                let done = p
                    .local_task(pe, "done", move |ctx| ctx.store(flag.at(0), 1.0))
                    .unwrap();
                let part = SUMS.place(&mut p, pe, c, &members, done).unwrap();
                let start = p
                    .local_task(pe, "start", move |ctx| part.issue(ctx))
                    .unwrap();
                p.activate(pe, start).unwrap();
                bufs.push((pe, data, flag));
            }
        }
        let run = Simulator::new(p)
            .unwrap()
            .run(RunOptions::default())
            .unwrap();
        let mut out = vec![vec![]; rows as usize];
        for (i, (pe, data, flag)) in bufs.into_iter().enumerate() {
            assert_eq!(run.read(pe, flag).unwrap(), vec![1.0], "PE {pe} never done");
            let got = run.read(pe, data).unwrap();
            out[i / cols as usize].push(got);
        }
        (out, run.stats)
    }

    /// Each member of group `g` ends with `(g.start + 1) sum_{c in g} 10^c`.
    fn check(groups: &[Vec<Range<usize>>], rows: u32) -> wafersim_sim::Stats {
        let (out, stats) = run(groups, rows);
        for row in &out {
            for (c, gs) in groups.iter().enumerate() {
                let want: Vec<f32> = gs
                    .iter()
                    .flat_map(|g| {
                        let s: f32 = g.clone().map(|x| 10f32.powi(x as i32)).sum();
                        vec![s * (g.start + 1) as f32; 3]
                    })
                    .collect();
                assert_eq!(row[c], want, "column {c} of {groups:?}");
            }
        }
        stats
    }

    #[test]
    fn heads_over_two_and_three_columns() {
        // 2 heads of 4 over 4 columns: groups 0..2 and 2..4, no column shared.
        let groups = head_groups(8, 4, 4);
        assert_eq!(groups, vec![vec![0..2], vec![0..2], vec![2..4], vec![2..4]]);
        let stats = check(&groups, 2);
        // Column 1 sends nothing east: its group ends there.
        let east1 = stats.link(Coord::new(1, 0), SUMS.east.out(1), Port::East);
        assert_eq!(east1, 0);
        // 1 head of 6 over 3 columns, one row.
        check(&head_groups(6, 3, 6), 1);
    }

    #[test]
    fn columns_shared_by_two_groups_and_whole_heads() {
        // 3 heads of 4 over 5 columns (3, 3, 2, 2, 2 features): column 0 holds features 0-2
        // (head 0), column 1 features 3-5 (heads 0 and 1), column 2 6-7 (head 1), column 3
        // 8-9, column 4 10-11 (head 2).
        let groups = head_groups(12, 5, 4);
        assert_eq!(
            groups,
            vec![
                vec![0..2],
                vec![0..2, 1..3],
                vec![1..3],
                vec![3..5],
                vec![3..5]
            ]
        );
        check(&groups, 3);
        // 3 heads of 8 over 2 columns: column 0 holds head 0 and half of head 1, column 1 the
        // other half and head 2 (a whole head needs no communication).
        let groups = head_groups(24, 2, 8);
        assert_eq!(groups, vec![vec![0..1, 0..2], vec![0..2, 1..2]]);
        check(&groups, 1);
        // One head of 12 over 7 columns: five middle columns.
        check(&head_groups(12, 7, 12), 2);
    }
}
