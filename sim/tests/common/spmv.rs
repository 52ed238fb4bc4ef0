//! A sparse-vector matrix product `y = A x` laid out as in the Cerebras SDK's
//! `gemv-checkerboard-pattern` example, used by the tests and the benches.
//!
//! `A` (M x N, f32) is cut into an R x C checkerboard: PE (c, r) holds the rows of block r and
//! the columns of block c, column-major, so one column is one contiguous vector. The nonzeros of
//! `x` in column block c are streamed from the host down PE column c as (fp16 value, local
//! column index) wavelets; zeros are never sent. Each arriving element fires a data task that
//! does one AXPY into the PE's partial `y`. When its last element has arrived, a PE joins the
//! eastward chain reduction of its row (receive from the west, add, send east, alternating two
//! colors); the easternmost PE sends the finished rows off the east edge into a sink.

#![allow(dead_code)] // each includer uses a different part

use half::f16;
use wafersim_sim::*;

pub const X: Color = Color(0);
pub const PARTIAL: [Color; 2] = [Color(1), Color(2)];

/// A problem: the dense matrix and the sparse vector.
pub struct Spmv {
    pub m: usize,
    pub n: usize,
    /// Row-major M x N.
    pub a: Vec<f32>,
    /// The vector, already rounded to fp16 (what the wavelets carry).
    pub x: Vec<f16>,
}

impl Spmv {
    /// A deterministic problem with about `density` of x nonzero.
    pub fn new(m: usize, n: usize, density: f64) -> Self {
        let a = (0..m * n)
            .map(|k| ((k * 7919 % 251) as f32) / 251.0 - 0.5)
            .collect();
        let keep = |j: usize| ((j * 2654435761usize) % 1000) as f64 / 1000.0 < density;
        let x = (0..n)
            .map(|j| {
                if keep(j) {
                    f16::from_f32(((j % 13) as f32 - 6.0) / 8.0 + 0.0625)
                } else {
                    f16::ZERO
                }
            })
            .collect();
        Spmv { m, n, a, x }
    }

    pub fn nonzeros(&self) -> usize {
        self.x.iter().filter(|v| v.to_f32() != 0.0).count()
    }

    /// `A x` in f64.
    pub fn reference(&self) -> Vec<f64> {
        (0..self.m)
            .map(|i| {
                (0..self.n)
                    .map(|j| f64::from(self.a[i * self.n + j]) * f64::from(self.x[j].to_f32()))
                    .sum()
            })
            .collect()
    }
}

/// Start and length of block `b` of `total` cut into `blocks` near-equal parts.
pub fn block(total: usize, blocks: usize, b: usize) -> (usize, usize) {
    let base = total / blocks;
    let extra = total % blocks;
    let start = b * base + b.min(extra);
    (start, base + usize::from(b < extra))
}

/// The program on an R x C region at the north-west corner of `config`, and the sinks that
/// collect each row block of `y`.
pub fn build(problem: &Spmv, config: FabricConfig, rows: u32, cols: u32) -> (Program, Vec<SinkId>) {
    let mut p = Program::new(config).unwrap();
    let mut sinks = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            place_pe(&mut p, problem, rows, cols, r, c);
        }
        sinks.push(p.collect(Coord::new(cols - 1, r), Port::East).unwrap());
    }
    for c in 0..cols {
        let (j0, nj) = block(problem.n, cols as usize, c as usize);
        let stream = (0..nj)
            .filter(|&j| problem.x[j0 + j].to_f32() != 0.0)
            .map(|j| (X, Wavelet::sparse(problem.x[j0 + j], j as u16)));
        p.inject(Coord::new(c, 0), Port::North, stream).unwrap();
    }
    (p, sinks)
}

fn place_pe(p: &mut Program, problem: &Spmv, rows: u32, cols: u32, r: u32, c: u32) {
    let pe = Coord::new(c, r);
    let (i0, ni) = block(problem.m, rows as usize, r as usize);
    let (j0, nj) = block(problem.n, cols as usize, c as usize);
    // x comes down the column.
    let tx = if r + 1 < rows {
        PortSet::of(&[Port::Ramp, Port::South])
    } else {
        Port::Ramp.into()
    };
    p.route(pe, X, Port::North, tx).unwrap();
    // Partial sums go east, alternating colors so each PE's input and output differ.
    let out = PARTIAL[c as usize % 2];
    p.route(pe, out, Port::Ramp, Port::East).unwrap();
    if c > 0 {
        p.route(pe, PARTIAL[(c as usize + 1) % 2], Port::West, Port::Ramp)
            .unwrap();
    }
    let tile: Vec<f32> = (0..nj)
        .flat_map(|j| (0..ni).map(move |i| (i, j)))
        .map(|(i, j)| problem.a[(i0 + i) * problem.n + j0 + j])
        .collect();
    let tile = p.alloc_f32(pe, "a_tile", &tile).unwrap();
    let y = p.alloc_zeros(pe, "y_partial", DType::F32, ni).unwrap();
    let input = PARTIAL[(c as usize + 1) % 2];
    let reduce = p
        .local_task(pe, "reduce", move |ctx| {
            if c == 0 {
                ctx.send(out, y.all(), Then::Nothing);
            } else {
                ctx.recv_add_send(input, y.all(), out, Then::Nothing);
            }
        })
        .unwrap();
    let mut remaining = (0..nj)
        .filter(|&j| problem.x[j0 + j].to_f32() != 0.0)
        .count();
    if remaining == 0 {
        p.activate(pe, reduce).unwrap();
    }
    let rows_here = ni as u32;
    p.data_task(pe, X, "axpy", move |ctx| {
        let w = ctx.wavelet();
        let column = tile.slice(u32::from(w.index()) * rows_here, rows_here);
        ctx.fmac(y.all(), column, w.value_f16().to_f32());
        remaining -= 1;
        if remaining == 0 {
            ctx.activate(reduce);
        }
    })
    .unwrap();
}

/// The finished `y` from the sinks, in row order.
pub fn gather(run: &Executed, sinks: &[SinkId]) -> Vec<f32> {
    sinks
        .iter()
        .flat_map(|&s| run.sink(s).received.iter().map(|(_, _, w)| w.f32()))
        .collect()
}
