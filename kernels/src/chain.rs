//! Collectives along the rows and columns of a region, built as chains of neighbouring PEs.
//!
//! A chain alternates two colors per direction ([`ChainColors`]: PE column `c` sends east on
//! `east.out(c)` and receives from the west on `east.inp(c)`, the other one), so each PE's input
//! and output of one direction are different colors and every route is a plain one-in, one-out
//! route. The plans below return the [`Op`]s one PE issues; because operations of one color run
//! in issue order, issuing the plans of every PE at once pipelines the whole collective.
//!
//! - [`RowChain::reduce_scatter`]: the partial sums of each owner's segment flow east (from the
//!   PEs west of the owner) and west (from the PEs east of it) and are added on the way;
//!   [`RowChain::reduce_scatter_ops`] makes the same operations one at a time, for long rows.
//! - [`RowChain::all_gather`]: every PE's segment is stored and forwarded by every other PE of the
//!   row, eastward and westward.
//! - [`ColumnChain::reduce_south`]: a vector summed down a column and sent off the fabric's
//!   south edge to the host.
//! - [`RowAllReduce`]: a vector summed along a row into its last column, then multicast back
//!   west to every PE of the row (two phases, each issued after the previous finished).

use std::ops::Range;

use wafersim_sim::{BuildError, Color, Port, PortSet, Program, RecvMode, VecRef};

use crate::join::{Op, OpSource};
use crate::layout::Region;

/// The two colors one direction of a chain alternates: the PE at position `i` along the chain
/// sends on `self.0[i % 2]` and receives from its predecessor on the other, so each PE's input
/// and output of one direction are different colors and every route is one-in, one-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainColors(pub [Color; 2]);

impl ChainColors {
    /// The color the PE at position `i` sends on.
    pub fn out(&self, i: usize) -> Color {
        self.0[i % 2]
    }

    /// The color the PE at position `i` receives on: its predecessor's output.
    pub fn inp(&self, i: usize) -> Color {
        self.0[(i + 1) % 2]
    }
}

/// The colors of the east- and west-bound chains of a row.
#[derive(Clone, Copy, Debug)]
pub struct RowChain {
    pub east: ChainColors,
    pub west: ChainColors,
}

impl RowChain {
    /// The routes of region column `c`, row `r`.
    pub fn install(
        &self,
        p: &mut Program,
        region: Region,
        c: u32,
        r: u32,
    ) -> Result<(), BuildError> {
        let pe = region.pe(c, r);
        let cu = c as usize;
        if c + 1 < region.cols {
            p.route(pe, self.east.out(cu), Port::Ramp, Port::East)?;
            p.route(pe, self.west.inp(cu), Port::East, Port::Ramp)?;
        }
        if c > 0 {
            p.route(pe, self.east.inp(cu), Port::West, Port::Ramp)?;
            p.route(pe, self.west.out(cu), Port::Ramp, Port::West)?;
        }
        Ok(())
    }

    /// PE column `c`'s part of summing `segments` into their owners. Each segment is
    /// `(owner column, this PE's partial sums, where the owner keeps the result)`; the result
    /// reference is used only on the owner, which must already hold its own partial sums there.
    /// Segments must come in increasing owner order, the same on every PE.
    pub fn reduce_scatter(
        &self,
        c: usize,
        cols: usize,
        segments: &[(usize, VecRef, VecRef)],
    ) -> Vec<Op> {
        segments
            .iter()
            .flat_map(|&(b, partial, result)| self.segment_ops(c, cols, b, partial, result))
            .flatten()
            .collect()
    }

    /// The same operations as [`RowChain::reduce_scatter`] for the consecutive owners `owners`,
    /// made one at a time when the simulator takes them up: a PE of a row of `C` columns posts
    /// about `C` operations per reduce-scatter, too many to hold on every PE of a wafer.
    /// `segment(b)` gives owner `b`'s `(partial sums, result)` on this PE; none may be empty.
    pub fn reduce_scatter_ops<F>(
        &self,
        c: usize,
        cols: usize,
        owners: Range<usize>,
        segment: F,
    ) -> ReduceScatterOps<F>
    where
        F: Fn(usize) -> (VecRef, VecRef) + Send + 'static,
    {
        ReduceScatterOps {
            chain: *self,
            c,
            cols,
            owners,
            segment,
        }
    }

    /// Column `c`'s operations for owner `b`'s segment: one passing it on (or starting it) for
    /// another owner; for its own, a receive from each side that has columns.
    fn segment_ops(
        &self,
        c: usize,
        cols: usize,
        b: usize,
        partial: VecRef,
        result: VecRef,
    ) -> [Option<Op>; 2] {
        let add_into = |inp| Op::Recv {
            inp,
            dst: result,
            mode: RecvMode::Add,
        };
        if b > c {
            let op = match c {
                0 => Op::Send {
                    out: self.east.out(c),
                    src: partial,
                },
                _ => Op::RecvAddSend {
                    inp: self.east.inp(c),
                    local: partial,
                    out: self.east.out(c),
                },
            };
            [Some(op), None]
        } else if b < c {
            let op = if c + 1 == cols {
                Op::Send {
                    out: self.west.out(c),
                    src: partial,
                }
            } else {
                Op::RecvAddSend {
                    inp: self.west.inp(c),
                    local: partial,
                    out: self.west.out(c),
                }
            };
            [Some(op), None]
        } else {
            let from_west = (c > 0).then(|| add_into(self.east.inp(c)));
            let from_east = (c + 1 < cols).then(|| add_into(self.west.inp(c)));
            match (from_west, from_east) {
                (None, east) => [east, None],
                both => [both.0, both.1],
            }
        }
    }

    /// PE column `c`'s part of gathering every column's segment into every PE. Each entry is
    /// `(owner column, where the segment lands on this PE)`; `own` is this PE's segment, which
    /// the caller has already copied to its landing place. Entries in increasing owner order.
    pub fn all_gather(
        &self,
        c: usize,
        cols: usize,
        segments: &[(usize, VecRef)],
        own: VecRef,
    ) -> Vec<Op> {
        let mut ops = Vec::new();
        for &(b, dst) in segments.iter().filter(|(b, _)| *b < c) {
            debug_assert!(b < c);
            ops.push(if c + 1 == cols {
                Op::Recv {
                    inp: self.east.inp(c),
                    dst,
                    mode: RecvMode::Store,
                }
            } else {
                Op::RecvStoreSend {
                    inp: self.east.inp(c),
                    dst,
                    out: self.east.out(c),
                }
            });
        }
        if c + 1 < cols {
            ops.push(Op::Send {
                out: self.east.out(c),
                src: own,
            });
        }
        for &(_, dst) in segments.iter().rev().filter(|(b, _)| *b > c) {
            ops.push(if c == 0 {
                Op::Recv {
                    inp: self.west.inp(c),
                    dst,
                    mode: RecvMode::Store,
                }
            } else {
                Op::RecvStoreSend {
                    inp: self.west.inp(c),
                    dst,
                    out: self.west.out(c),
                }
            });
        }
        if c > 0 {
            ops.push(Op::Send {
                out: self.west.out(c),
                src: own,
            });
        }
        ops
    }
}

/// The colors of a row all-reduce: an east-bound summing chain and a west-bound multicast.
#[derive(Clone, Copy, Debug)]
pub struct RowAllReduce {
    pub east: ChainColors,
    pub broadcast: Color,
}

impl RowAllReduce {
    /// The routes of region column `c`, row `r`.
    pub fn install(
        &self,
        p: &mut Program,
        region: Region,
        c: u32,
        r: u32,
    ) -> Result<(), BuildError> {
        let pe = region.pe(c, r);
        let cu = c as usize;
        if region.cols == 1 {
            return Ok(());
        }
        if c + 1 < region.cols {
            p.route(pe, self.east.out(cu), Port::Ramp, Port::East)?;
            let tx = if c > 0 {
                PortSet::of(&[Port::Ramp, Port::West])
            } else {
                Port::Ramp.into()
            };
            p.route(pe, self.broadcast, Port::East, tx)?;
        } else {
            p.route(pe, self.broadcast, Port::Ramp, Port::West)?;
        }
        if c > 0 {
            p.route(pe, self.east.inp(cu), Port::West, Port::Ramp)?;
        }
        Ok(())
    }

    /// Phase 1 at column `c`: sum `v` eastward; the last column ends with the row's total.
    pub fn reduce_ops(&self, c: usize, cols: usize, v: VecRef) -> Vec<Op> {
        let (out, inp) = (self.east.out(c), self.east.inp(c));
        match (c, c + 1 == cols) {
            (_, true) if cols == 1 => vec![],
            (0, _) => vec![Op::Send { out, src: v }],
            (_, true) => vec![Op::Recv {
                inp,
                dst: v,
                mode: RecvMode::Add,
            }],
            _ => vec![Op::RecvAddSend { inp, local: v, out }],
        }
    }

    /// Phase 2 at column `c`, issued once phase 1 has finished there: the last column sends the
    /// total west, every other column receives it into `v`.
    pub fn broadcast_ops(&self, c: usize, cols: usize, v: VecRef) -> Vec<Op> {
        if cols == 1 {
            vec![]
        } else if c + 1 == cols {
            vec![Op::Send {
                out: self.broadcast,
                src: v,
            }]
        } else {
            vec![Op::Recv {
                inp: self.broadcast,
                dst: v,
                mode: RecvMode::Store,
            }]
        }
    }
}

/// The colors of a south-bound chain down a column, ending off the fabric's south edge.
#[derive(Clone, Copy, Debug)]
pub struct ColumnChain {
    pub south: ChainColors,
}

impl ColumnChain {
    /// The routes of region column `c`, row `r`; the last row's output continues through the PEs
    /// below the region to the fabric's south edge.
    pub fn install(
        &self,
        p: &mut Program,
        region: Region,
        c: u32,
        r: u32,
    ) -> Result<(), BuildError> {
        let pe = region.pe(c, r);
        p.route(pe, self.south.out(r as usize), Port::Ramp, Port::South)?;
        if r > 0 {
            p.route(pe, self.south.inp(r as usize), Port::North, Port::Ramp)?;
        }
        Ok(())
    }

    /// Routes carrying region column `c`'s output past the region to the south edge, and the
    /// sink collecting it there.
    pub fn install_exit(
        &self,
        p: &mut Program,
        region: Region,
        c: u32,
    ) -> Result<wafersim_sim::SinkId, BuildError> {
        let color = self.south.out(region.rows as usize - 1);
        let bottom = p.config().height;
        let x = region.origin.x + c;
        for y in region.origin.y + region.rows..bottom {
            p.route(
                wafersim_sim::Coord::new(x, y),
                color,
                Port::North,
                Port::South,
            )?;
        }
        p.collect(wafersim_sim::Coord::new(x, bottom - 1), Port::South)
    }

    /// Row `r`'s part of summing `v` down the column and out of the south edge.
    pub fn reduce_south(&self, r: usize, v: VecRef) -> Op {
        if r == 0 {
            Op::Send {
                out: self.south.out(r),
                src: v,
            }
        } else {
            Op::RecvAddSend {
                inp: self.south.inp(r),
                local: v,
                out: self.south.out(r),
            }
        }
    }
}

/// Routes a host stream of `color` from the fabric's north edge down region column `c`,
/// delivering it to every PE of the column; returns where to inject it.
pub fn feed_column_from_north(
    p: &mut Program,
    region: Region,
    c: u32,
    color: Color,
) -> Result<wafersim_sim::Coord, BuildError> {
    let x = region.origin.x + c;
    for y in 0..region.origin.y {
        p.route(
            wafersim_sim::Coord::new(x, y),
            color,
            Port::North,
            Port::South,
        )?;
    }
    for r in 0..region.rows {
        let tx = if r + 1 < region.rows {
            PortSet::of(&[Port::Ramp, Port::South])
        } else {
            Port::Ramp.into()
        };
        p.route(region.pe(c, r), color, Port::North, tx)?;
    }
    Ok(wafersim_sim::Coord::new(x, 0))
}

/// A row reduce-scatter made one operation at a time ([`RowChain::reduce_scatter_ops`]).
pub struct ReduceScatterOps<F> {
    chain: RowChain,
    c: usize,
    cols: usize,
    owners: Range<usize>,
    segment: F,
}

impl<F> ReduceScatterOps<F> {
    /// Owners west of this column, and this column's own operations (0 if it owns nothing).
    fn counts(&self) -> (usize, usize) {
        let west = self.c.clamp(self.owners.start, self.owners.end) - self.owners.start;
        let own = if self.owners.contains(&self.c) {
            usize::from(self.c > 0) + usize::from(self.c + 1 < self.cols)
        } else {
            0
        };
        (west, own)
    }

    fn owns(&self) -> bool {
        self.owners.contains(&self.c)
    }
}

impl<F> OpSource for ReduceScatterOps<F>
where
    F: Fn(usize) -> (VecRef, VecRef) + Send + 'static,
{
    fn len(&self) -> usize {
        let (_, own) = self.counts();
        self.owners.len() - usize::from(self.owns()) + own
    }

    fn op(&self, i: usize) -> Op {
        let (west, own) = self.counts();
        let (b, k) = if i < west {
            (self.owners.start + i, 0)
        } else if i < west + own {
            (self.c, i - west)
        } else {
            let east = i - west - own;
            (
                self.owners.start + west + usize::from(self.owns()) + east,
                0,
            )
        };
        let (partial, result) = (self.segment)(b);
        self.chain
            .segment_ops(self.c, self.cols, b, partial, result)[k]
            .expect("an index below len() names an operation")
    }
}

#[cfg(test)]
mod tests {
    use wafersim_sim::{Buf, Coord, DType, FabricConfig};

    use super::*;

    const ROW: RowChain = RowChain {
        east: ChainColors([Color(1), Color(2)]),
        west: ChainColors([Color(3), Color(4)]),
    };

    fn buffer() -> Buf {
        let mut p = Program::new(FabricConfig::rectangle(1, 1).unwrap()).unwrap();
        p.alloc_zeros(Coord::new(0, 0), "sums", DType::F32, 200)
            .unwrap()
    }

    #[test]
    fn made_one_at_a_time_the_reduce_scatter_is_the_listed_one() {
        for cols in 1..6 {
            for c in 0..cols {
                for lo in 0..cols {
                    for hi in lo + 1..=cols {
                        // Owner b's partial sums at 4 b and its result at 100 + 4 b, 4 long.
                        let buf = buffer();
                        let segment = move |b: usize| {
                            (buf.slice(4 * b as u32, 4), buf.slice(100 + 4 * b as u32, 4))
                        };
                        let listed: Vec<(usize, VecRef, VecRef)> =
                            (lo..hi).map(|b| (b, segment(b).0, segment(b).1)).collect();
                        let listed = ROW.reduce_scatter(c, cols, &listed);
                        let made = ROW.reduce_scatter_ops(c, cols, lo..hi, segment);
                        let made: Vec<Op> = (0..made.len()).map(|i| made.op(i)).collect();
                        assert_eq!(made, listed, "column {c} of {cols}, owners {lo}..{hi}");
                    }
                }
            }
        }
    }
}
