//! The weight-streamed sparse matrix product `Y[T x N] = X[T x K] W[K x N] (+ b)`: the forward
//! pass of a linear layer and, fed `dY` and `W^T`, its input gradient.
//!
//! Placement (the shared layout, [`crate::layout`]): PE (c, r) of an R x C region holds
//! `X[T_r, K_c]` feature-major. `W` is never resident: the host streams its kept entries down
//! each PE column, those with input index in `K_c` down column c, multicast to every row, output
//! column by output column. A pruned weight is never sent, so it never wakes a task and costs
//! nothing.
//!
//! Output columns are processed in chunks small enough for a partial-sum buffer `P[T_r x chunk]`
//! to fit the PE. Each streamed entry `(n, k, w)` fires the weight task once: one AXPY
//! `P[:, n] += w X[:, k]` of length `T_r`. The wavelet's 16-bit index carries
//! `(n - chunk start) * |K_c| + (k - K_c start)`, so the task needs no per-column header; index
//! `0xFFFF` ends the chunk. Then the row reduce-scatters its partial sums (chains east and west,
//! [`crate::chain::RowChain`]) so that output feature `n` lands on the PE column owning it in the
//! split of `N` over the columns: `Y[T_r, N_c]`, feature-major, exactly as a following kernel
//! wants its input. The weight task stays blocked until the reduction of its chunk is done.
//!
//! Precision: in `F16`, `X` is stored in fp16 and each weight travels as one sparse wavelet (fp16
//! value + index); products accumulate in fp32 (`@fmachs`). In `F32`, a weight needs two
//! wavelets, its index and then its fp32 value, so the weight task runs twice per weight.
//!
//! Color plan: 0 the weight stream, 1-2 the east-bound chain, 3-4 the west-bound chain.
//!
//! FMACs executed: `T x nnz(W)` exactly (every entry meets every token once).
//!
//! # Cost
//!
//! [`MatmulShape::estimate_cycles`] times a run from the shape and the kept entries per (chunk,
//! PE column) ([`StreamLoad`]), in O(nnz + chunks x columns), without simulating. With `s` the
//! task switch, `i` the issue cost, `t` the largest tile's tokens and `w` the FMAC width, the
//! cores of a PE column spend, per chunk:
//!
//! - per kept entry `E = s + 1 + i + ceil(t / w)` (fp16: `w = fmac_mixed`) or `s + E` with
//!   `w = fmac_f32` in fp32 (the index-only task first); the weight stream (one wavelet per cycle
//!   per column) is never the bottleneck, since every wavelet costs a task;
//! - the end-of-chunk task: `s`, the copy of its own piece (`i + ceil(own x t / mov_f32)`), a
//!   counter store and one issue per reduce-scatter operation;
//! - the reduce-scatter, timed by `flow::reduce_scatter` from each column's issue time
//!   and the owners' segment lengths (the busiest ramp, the hops, the crossing of the two
//!   streams), then a join arm (`s + 2i`) and `chunk_done` (`s + i + ceil(chunk x t / mov_f32)`,
//!   plus the bias adds after the last chunk).
//!
//! Each column starts the next chunk when its own `chunk_done` ends, so a column with more kept
//! entries holds the reduction back chunk by chunk (load imbalance). The first wavelet reaches
//! the slowest row (the last with `t` tokens) `hop (1 + y) + ramp` cycles after the start.
//! Agreement with the exact engine: `kernels/tests/matmul.rs` and `docs/fidelity.md`.

use std::ops::Range;

use half::f16;
use wafersim_sim::{
    Buf, Color, DType, FabricConfig, Program, RunOptions, Simulator, Stats, TaskId, VecRef, Wavelet,
};

use crate::chain::{ChainColors, RowChain, feed_column_from_north};
use crate::error::KernelError;
use crate::join::{self, ARMS, Join};
use crate::layout::{Region, Split, Tiling};
use crate::load::{StreamLoad, StreamTerms};
use crate::sparse::StreamedMatrix;
use crate::{Precision, check_region};

mod cost;

/// Name used in errors and reports.
pub const KERNEL: &str = "stream_matmul";

const WEIGHTS: Color = Color(0);
const ROW: RowChain = RowChain {
    east: ChainColors([Color(1), Color(2)]),
    west: ChainColors([Color(3), Color(4)]),
};
/// Colors the kernel routes on: `0..COLORS`.
pub const COLORS: u8 = crate::colors_used(&[ROW.east, ROW.west], &[WEIGHTS]);
/// The weight index that ends a chunk.
const END_OF_CHUNK: u16 = u16::MAX;

/// One product to run.
#[derive(Clone, Copy, Debug)]
pub struct StreamMatmul<'a> {
    pub region: Region,
    /// Tokens `T` (rows of `x`).
    pub tokens: usize,
    /// `X`, `T x K` row-major.
    pub x: &'a [f32],
    /// `W`, `K x N`: its kept entries are streamed.
    pub w: &'a StreamedMatrix,
    /// Added to every row of `Y` by the PEs owning each output feature.
    pub bias: Option<&'a [f32]>,
    pub precision: Precision,
}

/// How the product is cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulPlan {
    /// `X` over the region.
    pub input: Tiling,
    /// `Y` over the region.
    pub output: Tiling,
    /// Output-column chunks, in stream order.
    pub chunks: Vec<Range<usize>>,
    /// SRAM used by the fullest PE, in bytes.
    pub sram_bytes: u64,
}

/// The product and what it cost.
#[derive(Clone, Debug)]
pub struct MatmulRun {
    /// `Y`, `T x N` row-major.
    pub y: Vec<f32>,
    pub plan: MatmulPlan,
    pub stats: Stats,
}

/// The shape of a product without its values: what its plan and its cost depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    pub region: Region,
    /// Tokens `T`.
    pub tokens: usize,
    /// Input features `K` (rows of `W`).
    pub k: usize,
    /// Output features `N` (columns of `W`).
    pub n: usize,
    /// Whether a bias is added.
    pub bias: bool,
    pub precision: Precision,
}

impl MatmulShape {
    /// Cuts the product so that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<MatmulPlan, KernelError> {
        let (t, k, n) = (self.tokens, self.k, self.n);
        check_region(KERNEL, config, self.region, t, k.min(n))?;
        let input = Tiling::new(self.region, t, k);
        let output = Tiling::new(self.region, t, n);
        let (t_max, k_max, n_max) = (
            input.tokens.max_len(),
            input.features.max_len(),
            output.features.max_len(),
        );
        let x_bytes = (t_max * k_max) as u64 * self.precision.bytes();
        let fixed = x_bytes + (t_max * n_max) as u64 * 4 + n_max as u64 * 4 + 4;
        let available = u64::from(config.sram_bytes);
        let per_column = t_max as u64 * 4;
        let by_sram = available.saturating_sub(fixed) / per_column;
        let by_index = usize::from(END_OF_CHUNK) / k_max;
        let chunk = (by_sram as usize).min(by_index).min(n);
        if chunk == 0 {
            return Err(KernelError::DoesNotFit {
                kernel: KERNEL,
                needed: fixed + per_column,
                available,
                what: format!(
                    "X tile {t_max} x {k_max}, Y tile {t_max} x {n_max} and one partial-sum column"
                ),
                hint: "use a bigger fabric or fewer tokens".into(),
            });
        }
        let chunks = (0..n.div_ceil(chunk))
            .map(|i| i * chunk..((i + 1) * chunk).min(n))
            .collect();
        Ok(MatmulPlan {
            input,
            output,
            chunks,
            sram_bytes: fixed + per_column * chunk as u64,
        })
    }

    /// The cycles of a run streaming `load`'s entries, by the formula in the module doc.
    pub fn estimate_cycles(
        &self,
        config: &FabricConfig,
        plan: &MatmulPlan,
        load: &StreamLoad,
    ) -> u64 {
        cost::estimate(config, self, plan, load)
    }

    /// The per-entry cost and the fill latency of the formula (what a breakdown of the cycles
    /// by cause reads).
    pub fn terms(&self, config: &FabricConfig, plan: &MatmulPlan) -> StreamTerms {
        cost::terms(config, self, plan)
    }

    /// Core cycles of the tasks of each PE column (its slowest row) over a run streaming
    /// `load`, by the formula's terms: the per-PE model of busy cycles.
    pub fn busy_per_column(
        &self,
        config: &FabricConfig,
        plan: &MatmulPlan,
        load: &StreamLoad,
    ) -> Vec<u64> {
        cost::busy_per_column(config, self, plan, load)
    }
}

impl StreamMatmul<'_> {
    /// The product's shape.
    pub fn shape(&self) -> MatmulShape {
        MatmulShape {
            region: self.region,
            tokens: self.tokens,
            k: self.w.rows(),
            n: self.w.cols(),
            bias: self.bias.is_some(),
            precision: self.precision,
        }
    }

    fn check(&self) -> Result<(), KernelError> {
        let shape = |reason: String| {
            Err(KernelError::Shape {
                kernel: KERNEL,
                reason,
            })
        };
        let (t, k, n) = (self.tokens, self.w.rows(), self.w.cols());
        if self.x.len() != t * k {
            return shape(format!("X has {} values, expected {t} x {k}", self.x.len()));
        }
        if self.bias.is_some_and(|b| b.len() != n) {
            return shape(format!(
                "the bias has {} values, expected {n}",
                self.bias.map_or(0, <[f32]>::len)
            ));
        }
        Ok(())
    }

    /// Cuts the product so that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<MatmulPlan, KernelError> {
        self.check()?;
        self.shape().plan(config)
    }

    /// The cycles of a run by the formula in the module doc, or why the product cannot be
    /// planned.
    pub fn estimate_cycles(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        let shape = self.shape();
        let plan = shape.plan(config)?;
        let load = StreamLoad::of_matrix(self.w, plan.input.features, &plan.chunks);
        Ok(shape.estimate_cycles(config, &plan, &load))
    }

    /// The program and the buffers holding `Y`.
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, MatmulPlan, Vec<Buf>), KernelError> {
        let plan = self.plan(config)?;
        let mut p = Program::new(config.clone())?;
        let mut outputs = Vec::new();
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                outputs.push(self.place_pe(&mut p, &plan, c, r)?);
            }
        }
        for c in 0..self.region.cols {
            let at = feed_column_from_north(&mut p, self.region, c, WEIGHTS)?;
            p.inject(
                at,
                wafersim_sim::Port::North,
                self.stream(&plan, c as usize),
            )?;
        }
        Ok((p, plan, outputs))
    }

    /// Builds, runs and reads back the product.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<MatmulRun, KernelError> {
        let (program, plan, outputs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let mut y = vec![0.0; self.tokens * self.w.cols()];
        let mut i = 0;
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                let tile = executed
                    .read(self.region.pe(c, r), outputs[i])
                    .expect("placed");
                plan.output.untile(&tile, &mut y, c as usize, r as usize);
                i += 1;
            }
        }
        Ok(MatmulRun {
            y,
            plan,
            stats: executed.stats,
        })
    }

    /// The host stream of PE column `c`: per chunk, its kept entries then an end marker.
    fn stream(&self, plan: &MatmulPlan, c: usize) -> Vec<(Color, Wavelet)> {
        let ks = plan.input.features.block(c);
        let k_len = ks.len();
        let mut out = Vec::new();
        for chunk in &plan.chunks {
            for n in chunk.clone() {
                for (k, v) in self.w.column(n).filter(|(k, _)| ks.contains(k)) {
                    let index = ((n - chunk.start) * k_len + (k - ks.start)) as u16;
                    match self.precision {
                        Precision::F16 => {
                            out.push((WEIGHTS, Wavelet::sparse(f16::from_f32(v), index)))
                        }
                        Precision::F32 => {
                            out.push((WEIGHTS, Wavelet(u32::from(index))));
                            out.push((WEIGHTS, Wavelet::from_f32(v)));
                        }
                    }
                }
            }
            out.push((WEIGHTS, Wavelet::sparse(f16::ZERO, END_OF_CHUNK)));
        }
        out
    }

    /// Buffers, routes and tasks of one PE; returns its `Y` buffer.
    fn place_pe(
        &self,
        p: &mut Program,
        plan: &MatmulPlan,
        c: u32,
        r: u32,
    ) -> Result<Buf, KernelError> {
        let pe = self.region.pe(c, r);
        let (cu, ru) = (c as usize, r as usize);
        let t_len = plan.input.tokens.block(ru).len() as u32;
        let k_len = plan.input.features.block(cu).len() as u32;
        let outs = plan.output.features;
        let own = outs.block(cu);
        let chunk_max = plan.chunks.iter().map(|ch| ch.len()).max().unwrap_or(0) as u32;

        let tile = plan.input.tile(self.x, cu, ru);
        let x = match self.precision {
            Precision::F32 => p.alloc_f32(pe, "x", &tile)?,
            Precision::F16 => p.alloc_f16(
                pe,
                "x",
                &tile.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
            )?,
        };
        let y = p.alloc_zeros(pe, "y", DType::F32, own.len() * t_len as usize)?;
        let partial = p.alloc_zeros(pe, "partial", DType::F32, (chunk_max * t_len) as usize)?;
        let bias = match self.bias {
            Some(b) => Some(p.alloc_f32(pe, "bias", &b[own.clone()])?),
            None => None,
        };
        ROW.install(p, self.region, c, r)?;

        let base = p.next_task_id(pe)?.0;
        let finish_id = TaskId(base + ARMS as u16);
        let weights_id = TaskId(base + ARMS as u16 + 1);
        let join = Join::place(p, pe, finish_id)?;
        let chunks = plan.chunks.len();
        let own_columns = own.len() as u32;
        let mut finished = 0;
        let finish = p.local_task(pe, "chunk_done", move |ctx| {
            ctx.fill(partial.all(), 0.0);
            finished += 1;
            if finished == chunks
                && let Some(bias) = bias
            {
                for j in 0..own_columns {
                    let b = ctx.load(bias.at(j));
                    let column = y.slice(j * t_len, t_len);
                    ctx.add_scalar(column, column, b);
                }
            }
            ctx.unblock(weights_id);
        })?;
        debug_assert_eq!(finish, finish_id);

        let chunk_list = plan.chunks.clone();
        let cols = self.region.cols as usize;
        let precision = self.precision;
        let mut chunk_index = 0;
        let mut pending_index: Option<u16> = None;
        let weights = p.data_task(pe, WEIGHTS, "weight", move |ctx| {
            let w = ctx.wavelet();
            let (index, value) = match precision {
                Precision::F16 => (w.index(), w.value_f16().to_f32()),
                Precision::F32 => match pending_index.take() {
                    Some(index) => (index, w.f32()),
                    None if w.index() == END_OF_CHUNK => (END_OF_CHUNK, 0.0),
                    None => {
                        pending_index = Some(w.0 as u16);
                        return;
                    }
                },
            };
            if index == END_OF_CHUNK {
                ctx.block(weights_id);
                let chunk = chunk_list[chunk_index].clone();
                chunk_index += 1;
                let owners = owners_of(&chunk, outs);
                let segment = move |b| owner_segment(&chunk, outs, b, partial, y, t_len);
                if owners.contains(&cu) {
                    let (part, result) = segment(cu);
                    ctx.mov(result, part);
                }
                let ops = ROW.reduce_scatter_ops(cu, cols, owners, segment);
                join::issue_generated(ctx, ops, &join);
                return;
            }
            ctx.scalar_cycles(1); // split the index into (column, input feature)
            let (n, k) = (u32::from(index) / k_len, u32::from(index) % k_len);
            ctx.fmac(
                partial.slice(n * t_len, t_len),
                x.slice(k * t_len, t_len),
                value,
            );
        })?;
        debug_assert_eq!(weights, weights_id);
        Ok(y)
    }
}

/// The owner columns whose output features `chunk` touches, in order.
fn owners_of(chunk: &Range<usize>, outs: Split) -> Range<usize> {
    let first = outs.owner(chunk.start);
    first..first + outs.blocks_overlapping(chunk)
}

/// Owner `b`'s piece of `chunk`: this PE's partial sums of it and where the owner keeps them.
fn owner_segment(
    chunk: &Range<usize>,
    outs: Split,
    b: usize,
    partial: Buf,
    y: Buf,
    t_len: u32,
) -> (VecRef, VecRef) {
    let owned = outs.block(b);
    let (lo, hi) = (chunk.start.max(owned.start), chunk.end.min(owned.end));
    debug_assert!(lo < hi, "owner {b} has a piece of the chunk");
    let len = (hi - lo) as u32 * t_len;
    let part = partial.slice((lo - chunk.start) as u32 * t_len, len);
    let result = y.slice((lo - owned.start) as u32 * t_len, len);
    (part, result)
}
