//! Collectives along the columns of a region: chains running south and north through the PEs
//! of a column, the column counterpart of [`crate::chain::RowChain`].
//!
//! - [`VerticalChain::all_gather`]: each row's segment is stored and forwarded (store-and-forward
//!   through each core, `recv_store_send`) southward and northward to the rows that want it.
//! - [`VerticalChain::reduce_scatter`]: the partial sums of each owner row's segment flow south
//!   (from the contributing rows north of the owner) and north (from those south of it), added on
//!   the way (`recv_add_send`), and land added into the owner's result.
//!
//! Each segment has a *reach*: the contiguous rows, owner included, that receive it (gather) or
//! contribute to it (reduction). `0..rows` everywhere gives the classic collectives; a narrower
//! reach truncates the chains, so rows never carry segments nobody beyond them needs. Reaches
//! must be monotone (a later owner's reach never starts or ends before an earlier one's), which
//! keeps every chain's order consistent; every PE passes the same reaches.
//!
//! What it is not: it does not place data or tasks; it returns the routes and the [`Op`]s one PE
//! issues. Issuing every PE's ops at once pipelines the collective, because operations of one
//! color run in issue order (sim/src/task.rs).
//!
//! Key design decisions: as the row chains, each direction alternates two colors by row parity
//! (row `r` sends south on `south.out(r)` and receives from the north on `south.inp(r)`), so
//! every route is a plain one-in, one-out route. And the returned ops interleave the two
//! directions: a core's async ops share its one ramp, and the earlier-issued op wins it each
//! cycle, so issuing all of one direction first would starve the other and serialise the two
//! chains.

use std::ops::Range;

use wafersim_sim::{BuildError, Port, Program, RecvMode, VecRef};

use crate::chain::ChainColors;
use crate::join::Op;
use crate::layout::Region;

/// The colors of the south- and north-bound chains of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerticalChain {
    /// Colors of the south-bound chain, alternating by row parity.
    pub south: ChainColors,
    /// Colors of the north-bound chain, alternating by row parity.
    pub north: ChainColors,
}

/// Another row's segment as one PE sees it in a collective.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    /// The row owning the segment.
    pub owner: usize,
    /// The rows receiving it (gather) or contributing to it (reduction), owner included.
    pub reach: Range<usize>,
    /// Where it lands on this PE (gather), or this PE's partial sums of it (reduction).
    pub data: VecRef,
}

/// Whether `reach` holds row `r - 1` (false for `r = 0`).
fn reaches_north_of(reach: &Range<usize>, r: usize) -> bool {
    r.checked_sub(1).is_some_and(|above| reach.contains(&above))
}

/// `a[0], b[0], a[1], b[1], ...` then the rest of the longer one.
fn interleave(a: Vec<Op>, b: Vec<Op>) -> Vec<Op> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

impl VerticalChain {
    /// The routes of region column `c`, row `r` (none on a one-row region).
    pub fn install(
        &self,
        p: &mut Program,
        region: Region,
        c: u32,
        r: u32,
    ) -> Result<(), BuildError> {
        let pe = region.pe(c, r);
        let ru = r as usize;
        if r + 1 < region.rows {
            p.route(pe, self.south.out(ru), Port::Ramp, Port::South)?;
            p.route(pe, self.north.inp(ru), Port::South, Port::Ramp)?;
        }
        if r > 0 {
            p.route(pe, self.south.inp(ru), Port::North, Port::Ramp)?;
            p.route(pe, self.north.out(ru), Port::Ramp, Port::North)?;
        }
        Ok(())
    }

    /// Row `r`'s part of gathering segments into the rows that want them. `parts` are the other
    /// rows' segments that reach row `r`, in increasing owner order, each with where it lands
    /// here; `own` is this PE's segment (sent as it is when issued), wanted by `own_reach`.
    pub fn all_gather(
        &self,
        r: usize,
        parts: &[Part],
        own: VecRef,
        own_reach: Range<usize>,
    ) -> Vec<Op> {
        let mut south = Vec::new();
        for p in parts.iter().filter(|p| p.owner < r) {
            south.push(if p.reach.contains(&(r + 1)) {
                Op::RecvStoreSend {
                    inp: self.south.inp(r),
                    dst: p.data,
                    out: self.south.out(r),
                }
            } else {
                Op::Recv {
                    inp: self.south.inp(r),
                    dst: p.data,
                    mode: RecvMode::Store,
                }
            });
        }
        if own_reach.contains(&(r + 1)) {
            south.push(Op::Send {
                out: self.south.out(r),
                src: own,
            });
        }
        let mut north = Vec::new();
        for p in parts.iter().rev().filter(|p| p.owner > r) {
            north.push(if reaches_north_of(&p.reach, r) {
                Op::RecvStoreSend {
                    inp: self.north.inp(r),
                    dst: p.data,
                    out: self.north.out(r),
                }
            } else {
                Op::Recv {
                    inp: self.north.inp(r),
                    dst: p.data,
                    mode: RecvMode::Store,
                }
            });
        }
        if reaches_north_of(&own_reach, r) {
            north.push(Op::Send {
                out: self.north.out(r),
                src: own,
            });
        }
        interleave(south, north)
    }

    /// Row `r`'s part of summing each segment into its owner. `parts` are the segments row `r`
    /// contributes to, in increasing owner order, its own included (whose `data` is not used);
    /// `result` holds the PE's own partial sums when issued and receives the others' added.
    pub fn reduce_scatter(&self, r: usize, parts: &[Part], result: VecRef) -> Vec<Op> {
        let own_reach = parts.iter().find(|p| p.owner == r).map(|p| p.reach.clone());
        let own_reach = own_reach.unwrap_or(r..r + 1);
        let mut north = Vec::new();
        for p in parts.iter().filter(|p| p.owner < r) {
            north.push(if p.reach.contains(&(r + 1)) {
                Op::RecvAddSend {
                    inp: self.north.inp(r),
                    local: p.data,
                    out: self.north.out(r),
                }
            } else {
                Op::Send {
                    out: self.north.out(r),
                    src: p.data,
                }
            });
        }
        if own_reach.contains(&(r + 1)) {
            north.push(Op::Recv {
                inp: self.north.inp(r),
                dst: result,
                mode: RecvMode::Add,
            });
        }
        let mut south = Vec::new();
        if reaches_north_of(&own_reach, r) {
            south.push(Op::Recv {
                inp: self.south.inp(r),
                dst: result,
                mode: RecvMode::Add,
            });
        }
        for p in parts.iter().filter(|p| p.owner > r) {
            south.push(if reaches_north_of(&p.reach, r) {
                Op::RecvAddSend {
                    inp: self.south.inp(r),
                    local: p.data,
                    out: self.south.out(r),
                }
            } else {
                Op::Send {
                    out: self.south.out(r),
                    src: p.data,
                }
            });
        }
        interleave(north, south)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::{self, Join};
    use wafersim_sim::{
        Buf, Color, Coord, DType, FabricConfig, RunOptions, Simulator, TaskId, Then,
    };

    const GATHER: VerticalChain = VerticalChain {
        south: ChainColors([Color(1), Color(2)]),
        north: ChainColors([Color(3), Color(4)]),
    };
    const REDUCE: VerticalChain = VerticalChain {
        south: ChainColors([Color(5), Color(6)]),
        north: ChainColors([Color(7), Color(8)]),
    };

    /// Row `b`'s segment has `b + 1` elements, so segments differ in length.
    fn seg_len(b: usize) -> u32 {
        b as u32 + 1
    }

    fn offset(b: usize) -> u32 {
        (0..b).map(seg_len).sum()
    }

    /// `(parts row r takes part in, with data in buf at each owner's offset)`.
    fn parts(
        r: usize,
        rows: usize,
        reach: fn(usize, usize) -> Range<usize>,
        buf: Buf,
    ) -> Vec<Part> {
        (0..rows)
            .filter(|&b| reach(b, rows).contains(&r))
            .map(|b| Part {
                owner: b,
                reach: reach(b, rows),
                data: buf.slice(offset(b), seg_len(b)),
            })
            .collect()
    }

    struct Placed {
        pe: Coord,
        gathered: Buf,
        result: Buf,
    }

    /// Row `r` owns `[b + 1; b + 1]` and holds the partial `10^r` everywhere. It gathers, then
    /// reduce-scatters; returns what every PE ended with.
    fn run(
        rows: usize,
        reach: fn(usize, usize) -> Range<usize>,
    ) -> (Vec<Placed>, wafersim_sim::Executed) {
        let region = Region::at_origin(1, rows as u32);
        let mut p = Program::new(FabricConfig::rectangle(1, rows as u32).unwrap()).unwrap();
        let total = offset(rows);
        let mut placed = Vec::new();
        for r in 0..rows {
            let pe = region.pe(0, r as u32);
            GATHER.install(&mut p, region, 0, r as u32).unwrap();
            REDUCE.install(&mut p, region, 0, r as u32).unwrap();
            let own_len = seg_len(r);
            let own = p
                .alloc_f32(pe, "own", &vec![own_len as f32; own_len as usize])
                .unwrap();
            let gathered = p.alloc_zeros(pe, "g", DType::F32, total as usize).unwrap();
            let partial = p
                .alloc_f32(pe, "p", &vec![10f32.powi(r as i32); total as usize])
                .unwrap();
            let result = p
                .alloc_zeros(pe, "res", DType::F32, own_len as usize)
                .unwrap();
            let reduce_id = TaskId(p.next_task_id(pe).unwrap().0 + join::ARMS as u16);
            let j = Join::place(&mut p, pe, reduce_id).unwrap();
            let reduce_parts = parts(r, rows, reach, partial);
            p.local_task(pe, "reduce", move |ctx| {
                ctx.mov(result.all(), partial.slice(offset(r), own_len));
                for op in REDUCE.reduce_scatter(r, &reduce_parts, result.all()) {
                    ctx.issue(op, Then::Nothing);
                }
            })
            .unwrap();
            let mut gather_parts = parts(r, rows, reach, gathered);
            gather_parts.retain(|part| part.owner != r);
            let start = p
                .local_task(pe, "gather", move |ctx| {
                    ctx.mov(gathered.slice(offset(r), own_len), own.all());
                    let ops = GATHER.all_gather(r, &gather_parts, own.all(), reach(r, rows));
                    join::issue(ctx, &ops, &j);
                })
                .unwrap();
            p.activate(pe, start).unwrap();
            placed.push(Placed {
                pe,
                gathered,
                result,
            });
        }
        (
            placed,
            Simulator::new(p)
                .unwrap()
                .run(RunOptions::default())
                .unwrap(),
        )
    }

    fn everyone(_: usize, rows: usize) -> Range<usize> {
        0..rows
    }

    fn neighbours(b: usize, rows: usize) -> Range<usize> {
        b.saturating_sub(1)..(b + 2).min(rows)
    }

    /// Every PE gathers every segment; each owner ends with `sum_r 10^r` = 1, 11, 111, ...
    #[test]
    fn full_gather_and_reduce_scatter_on_one_to_five_rows() {
        for rows in 1..=5 {
            let (placed, run) = run(rows, everyone);
            let want: Vec<f32> = (0..rows)
                .flat_map(|b| vec![seg_len(b) as f32; seg_len(b) as usize])
                .collect();
            let repunit: f32 = (0..rows as i32).map(|r| 10f32.powi(r)).sum();
            for (r, x) in placed.iter().enumerate() {
                assert_eq!(
                    run.read(x.pe, x.gathered).unwrap(),
                    want,
                    "{rows} rows, row {r}"
                );
                let res = run.read(x.pe, x.result).unwrap();
                assert_eq!(
                    res,
                    vec![repunit; seg_len(r) as usize],
                    "{rows} rows, row {r}"
                );
            }
        }
    }

    /// Segments reach only the neighbouring rows: row 2 of 5 holds segments 1, 2, 3 and zeros
    /// elsewhere; owner b gets `10^(b-1) + 10^b + 10^(b+1)` over the rows that exist.
    #[test]
    fn truncated_chains_reach_only_the_neighbours() {
        let rows = 5;
        let (placed, run) = run(rows, neighbours);
        for (r, x) in placed.iter().enumerate() {
            let want: Vec<f32> = (0..rows)
                .flat_map(|b| {
                    let v = if b.abs_diff(r) <= 1 {
                        seg_len(b) as f32
                    } else {
                        0.0
                    };
                    vec![v; seg_len(b) as usize]
                })
                .collect();
            assert_eq!(run.read(x.pe, x.gathered).unwrap(), want, "row {r}");
            let sum: f32 = neighbours(r, rows).map(|b| 10f32.powi(b as i32)).sum();
            let res = run.read(x.pe, x.result).unwrap();
            assert_eq!(res, vec![sum; seg_len(r) as usize], "row {r}");
        }
        // Row 2's segment never travels past rows 1 and 3: row 0's south output carries only
        // its own 1 element, row 4's north output only its own 5.
        let south0 = run
            .stats
            .link(placed[0].pe, GATHER.south.out(0), Port::South);
        let north4 = run
            .stats
            .link(placed[4].pe, GATHER.north.out(4), Port::North);
        assert_eq!((south0, north4), (1, 5));
    }
}
