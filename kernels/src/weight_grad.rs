//! The masked weight gradient `G = X^T dY`, computed only at the kept entries of a pattern, and
//! the bias gradient `db = sum_t dY[t, :]`; both stream out of the fabric to the host.
//!
//! Placement: the layout of the forward product ([`crate::matmul`]): PE (c, r) holds
//! `X[T_r, K_c]` and `dY[T_r, N_c]`, feature-major. The host streams the pattern's kept entries
//! (indices only: their values are not needed) down each PE column as the forward pass streams
//! the weights, output column by output column, in chunks. For each chunk:
//!
//! 1. every row all-gathers its `dY[T_r, chunk]` (chains east and west,
//!    [`RowChain::all_gather`]), so each PE has the `dY` columns of the chunk;
//! 2. each streamed index `(n, k)` fires the index task: one dot product of length `T_r`,
//!    `X[:, k] . dY[:, n]`, into the next slot of the chunk's gradient buffer;
//! 3. the end-of-chunk marker sums the buffer down the column ([`ColumnChain::reduce_south`])
//!    and out of the south edge, where the host collects the column's gradients in stream order.
//!
//! After the last chunk each PE sums its own `dY` columns over its tokens and the column sums
//! them south the same way: the bias gradient of `N_c` follows the weight gradients.
//!
//! Color plan: 0 pattern stream, 1-2 east chain, 3-4 west chain, 5-6 south chain.
//!
//! FMACs executed: `T x nnz(pattern)` exactly; the bias sums are additions.
//!
//! # Cost
//!
//! [`WeightGradShape::estimate_cycles`] times a run from the shape and the kept entries per
//! (chunk, PE column) ([`StreamLoad`]), in O(nnz + chunks x columns), without simulating. Per
//! chunk and column, for the first region row and the last: `next_chunk` (`s`, the copy of the
//! own `dY` piece, a counter store and one issue per operation), the row's all-gather timed by
//! `flow::all_gather`, a join arm and `gathered` (`s`), then per kept entry
//! `s + 1 + i + ceil(t / w) + i` (the decode, the dot product at the FMAC width `w` of the
//! storage type, the store), the end-of-chunk task (`s + 2i`), and the column chain: the first
//! row's send ends `len` cycles after its issue, the last row's `rows - 1` hops of
//! `2 ramp + hop` after the first row's at the earliest. After the last chunk: the bias sums
//! (`s + own x (i + ceil(t / arith) + i) + i`) and their chain, and `ramp + hop (1 + rows below)`
//! for the last wavelet to reach the sink. Agreement with the exact engine:
//! `kernels/tests/weight_grad.rs` and `docs/fidelity.md`.

use std::ops::Range;

use half::f16;
use wafersim_sim::{
    Buf, Color, DType, FabricConfig, Program, RunOptions, Simulator, SinkId, Stats, TaskCtx,
    TaskId, VecRef, Wavelet,
};

use crate::chain::{ChainColors, ColumnChain, RowChain, feed_column_from_north};
use crate::error::KernelError;
use crate::join::{self, ARMS, Join};
use crate::layout::{Region, Split, Tiling};
use crate::load::{StreamLoad, StreamTerms};
use crate::sparse::StreamedMatrix;
use crate::{Precision, check_region};

mod cost;

/// Name used in errors and reports.
pub const KERNEL: &str = "weight_grad";

const PATTERN: Color = Color(0);
const ROW: RowChain = RowChain {
    east: ChainColors([Color(1), Color(2)]),
    west: ChainColors([Color(3), Color(4)]),
};
const COLUMN: ColumnChain = ColumnChain {
    south: ChainColors([Color(5), Color(6)]),
};
/// Colors the kernel routes on: `0..COLORS`.
pub const COLORS: u8 = crate::colors_used(&[ROW.east, ROW.west, COLUMN.south], &[PATTERN]);
const END_OF_CHUNK: u16 = u16::MAX;

/// One gradient to compute.
#[derive(Clone, Copy, Debug)]
pub struct WeightGrad<'a> {
    pub region: Region,
    /// Tokens `T`.
    pub tokens: usize,
    /// The layer input `X`, `T x K` row-major.
    pub x: &'a [f32],
    /// The output gradient `dY`, `T x N` row-major.
    pub dy: &'a [f32],
    /// Which entries of the `K x N` weight get a gradient (values ignored).
    pub pattern: &'a StreamedMatrix,
    /// Also compute the bias gradient.
    pub bias: bool,
    /// Storage of `X` and `dY` on the PEs (the dot products accumulate in fp32).
    pub precision: Precision,
}

/// How the gradient is cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightGradPlan {
    /// `X` over the region.
    pub input: Tiling,
    /// `dY` over the region.
    pub output: Tiling,
    /// Output-column chunks, in stream order.
    pub chunks: Vec<Range<usize>>,
    /// SRAM used by the fullest PE, in bytes.
    pub sram_bytes: u64,
}

/// The gradients and what they cost.
#[derive(Clone, Debug)]
pub struct WeightGradRun {
    /// The pattern with the gradients as values.
    pub grad: StreamedMatrix,
    /// `db`, if asked for.
    pub bias_grad: Option<Vec<f32>>,
    pub plan: WeightGradPlan,
    pub stats: Stats,
}

/// The shape of a weight gradient without its values: what its plan and its cost depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightGradShape {
    pub region: Region,
    /// Tokens `T`.
    pub tokens: usize,
    /// Input features `K` (rows of the pattern).
    pub k: usize,
    /// Output features `N` (columns of the pattern).
    pub n: usize,
    /// Whether the bias gradient is computed too.
    pub bias: bool,
    pub precision: Precision,
}

impl WeightGradShape {
    /// Cuts the gradient so that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<WeightGradPlan, KernelError> {
        let (t, k, n) = (self.tokens, self.k, self.n);
        check_region(KERNEL, config, self.region, t, k.min(n))?;
        let input = Tiling::new(self.region, t, k);
        let output = Tiling::new(self.region, t, n);
        let (t_max, k_max, n_max) = (
            input.tokens.max_len(),
            input.features.max_len(),
            output.features.max_len(),
        );
        let e = self.precision.bytes();
        let fixed =
            (t_max * k_max) as u64 * e + (t_max * n_max) as u64 * e + n_max as u64 * 4 + 4 * 2;
        // Per chunk column: the gathered dY column and, at worst, k_max gradient slots.
        let per_column = t_max as u64 * e + k_max as u64 * 4;
        let available = u64::from(config.sram_bytes);
        let by_sram = available.saturating_sub(fixed) / per_column;
        let by_index = usize::from(END_OF_CHUNK) / k_max;
        let chunk = (by_sram as usize).min(by_index).min(n);
        if chunk == 0 {
            return Err(KernelError::DoesNotFit {
                kernel: KERNEL,
                needed: fixed + per_column,
                available,
                what: format!(
                    "X tile {t_max} x {k_max}, dY tile {t_max} x {n_max} and one gathered column"
                ),
                hint: "use a bigger fabric or fewer tokens".into(),
            });
        }
        let chunks = (0..n.div_ceil(chunk))
            .map(|i| i * chunk..((i + 1) * chunk).min(n))
            .collect();
        Ok(WeightGradPlan {
            input,
            output,
            chunks,
            sram_bytes: fixed + per_column * chunk as u64,
        })
    }

    /// The cycles of a run over `load`'s entries, by the formula in the module doc.
    pub fn estimate_cycles(
        &self,
        config: &FabricConfig,
        plan: &WeightGradPlan,
        load: &StreamLoad,
    ) -> u64 {
        cost::estimate(config, self, plan, load)
    }

    /// The per-entry cost and the drain latency of the formula (what a breakdown of the cycles
    /// by cause reads).
    pub fn terms(&self, config: &FabricConfig, plan: &WeightGradPlan) -> StreamTerms {
        cost::terms(config, self, plan)
    }

    /// Core cycles of the tasks of each PE column (its first row) over a run with `load`'s
    /// entries, by the formula's terms: the per-PE model of busy cycles.
    pub fn busy_per_column(
        &self,
        config: &FabricConfig,
        plan: &WeightGradPlan,
        load: &StreamLoad,
    ) -> Vec<u64> {
        cost::busy_per_column(config, self, plan, load)
    }
}

impl WeightGrad<'_> {
    /// The gradient's shape.
    pub fn shape(&self) -> WeightGradShape {
        WeightGradShape {
            region: self.region,
            tokens: self.tokens,
            k: self.pattern.rows(),
            n: self.pattern.cols(),
            bias: self.bias,
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
        let (t, k, n) = (self.tokens, self.pattern.rows(), self.pattern.cols());
        if self.x.len() != t * k {
            return shape(format!("X has {} values, expected {t} x {k}", self.x.len()));
        }
        if self.dy.len() != t * n {
            return shape(format!(
                "dY has {} values, expected {t} x {n}",
                self.dy.len()
            ));
        }
        Ok(())
    }

    /// Cuts the gradient so that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<WeightGradPlan, KernelError> {
        self.check()?;
        self.shape().plan(config)
    }

    /// The cycles of a run by the formula in the module doc, or why the gradient cannot be
    /// planned.
    pub fn estimate_cycles(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        let shape = self.shape();
        let plan = shape.plan(config)?;
        let load = StreamLoad::of_matrix(self.pattern, plan.input.features, &plan.chunks);
        Ok(shape.estimate_cycles(config, &plan, &load))
    }

    /// The program, the plan and the sink below each PE column.
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, WeightGradPlan, Vec<SinkId>), KernelError> {
        let plan = self.plan(config)?;
        let mut p = Program::new(config.clone())?;
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                self.place_pe(&mut p, &plan, c, r)?;
            }
        }
        let mut sinks = Vec::new();
        for c in 0..self.region.cols {
            let at = feed_column_from_north(&mut p, self.region, c, PATTERN)?;
            p.inject(
                at,
                wafersim_sim::Port::North,
                self.stream(&plan, c as usize),
            )?;
            sinks.push(COLUMN.install_exit(&mut p, self.region, c)?);
        }
        Ok((p, plan, sinks))
    }

    /// Builds, runs and collects the gradients.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<WeightGradRun, KernelError> {
        let (p, plan, sinks) = self.build(config)?;
        let executed = Simulator::new(p)?.run(options)?;
        let received: Vec<Vec<f32>> = sinks
            .iter()
            .map(|&s| {
                executed
                    .sink(s)
                    .received
                    .iter()
                    .map(|(_, _, w)| w.f32())
                    .collect()
            })
            .collect();
        let (grad, bias_grad) = self.assemble(&plan, &received);
        Ok(WeightGradRun {
            grad,
            bias_grad,
            plan,
            stats: executed.stats,
        })
    }

    /// The kept entries of column block `c` in stream order: per chunk, by output column, then
    /// by input feature.
    fn entries<'b>(
        &'b self,
        plan: &'b WeightGradPlan,
        c: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> + 'b {
        let ks = plan.input.features.block(c);
        plan.chunks.iter().enumerate().flat_map(move |(i, chunk)| {
            let ks = ks.clone();
            chunk.clone().flat_map(move |n| {
                let ks = ks.clone();
                self.pattern
                    .column(n)
                    .filter(move |(k, _)| ks.contains(k))
                    .map(move |(k, _)| (i, n, k))
            })
        })
    }

    fn stream(&self, plan: &WeightGradPlan, c: usize) -> Vec<(Color, Wavelet)> {
        let ks = plan.input.features.block(c);
        let mut out = Vec::new();
        let mut current = 0;
        let end = (PATTERN, Wavelet::sparse(f16::ZERO, END_OF_CHUNK));
        for (chunk, n, k) in self.entries(plan, c) {
            while current < chunk {
                out.push(end);
                current += 1;
            }
            let index = (n - plan.chunks[chunk].start) * ks.len() + (k - ks.start);
            out.push((PATTERN, Wavelet::sparse(f16::ZERO, index as u16)));
        }
        while current < plan.chunks.len() {
            out.push(end);
            current += 1;
        }
        out
    }

    /// Maps each column's sink values back to the pattern entries and the bias.
    fn assemble(
        &self,
        plan: &WeightGradPlan,
        received: &[Vec<f32>],
    ) -> (StreamedMatrix, Option<Vec<f32>>) {
        let (k, n) = (self.pattern.rows(), self.pattern.cols());
        let mut dense = vec![0.0; k * n];
        let mut keep = vec![false; k * n];
        let mut bias = vec![0.0; n];
        for (c, values) in received.iter().enumerate() {
            let mut it = values.iter();
            for (_, col, row) in self.entries(plan, c) {
                dense[row * n + col] = *it.next().expect("one value per streamed entry");
                keep[row * n + col] = true;
            }
            if self.bias {
                for col in plan.output.features.block(c) {
                    bias[col] = *it.next().expect("one bias value per owned column");
                }
            }
            debug_assert!(it.next().is_none());
        }
        let grad = StreamedMatrix::from_dense(k, n, &dense, Some(&keep));
        (grad, self.bias.then_some(bias))
    }

    fn place_pe(
        &self,
        p: &mut Program,
        plan: &WeightGradPlan,
        c: u32,
        r: u32,
    ) -> Result<(), KernelError> {
        let pe = self.region.pe(c, r);
        let (cu, ru) = (c as usize, r as usize);
        let t_len = plan.input.tokens.block(ru).len() as u32;
        let k_len = plan.input.features.block(cu).len() as u32;
        let outs = plan.output.features;
        let own = outs.block(cu);
        let chunk_max = plan.chunks.iter().map(|ch| ch.len()).max().unwrap_or(0) as u32;
        let mut per_chunk = vec![0u32; plan.chunks.len()];
        for (chunk, _, _) in self.entries(plan, cu) {
            per_chunk[chunk] += 1;
        }
        let slots = per_chunk.into_iter().max().unwrap_or(0);

        let x = self.alloc_tile(p, pe, "x", &plan.input.tile(self.x, cu, ru))?;
        let dy = self.alloc_tile(p, pe, "dy", &plan.output.tile(self.dy, cu, ru))?;
        let gathered = p.alloc_zeros(
            pe,
            "dy_gathered",
            self.precision.dtype(),
            (chunk_max * t_len) as usize,
        )?;
        let grads = p.alloc_zeros(pe, "grads", DType::F32, slots.max(1) as usize)?;
        let bias_sums = p.alloc_zeros(pe, "bias_sums", DType::F32, own.len())?;
        ROW.install(p, self.region, c, r)?;
        COLUMN.install(p, self.region, c, r)?;

        // Task ids: gather join arms, reduce join arms, then the named tasks below in order.
        let base = p.next_task_id(pe)?.0;
        let start_id = TaskId(base + 2 * ARMS as u16);
        let gathered_id = TaskId(start_id.0 + 1);
        let index_id = TaskId(start_id.0 + 2);
        let gather_join = Join::place(p, pe, gathered_id)?;
        let reduce_join = Join::place(p, pe, start_id)?;

        let ctx_data = PeTasks {
            c: cu,
            cols: self.region.cols as usize,
            r: ru,
            t_len,
            k_len,
            outs,
            chunks: plan.chunks.clone(),
            x,
            dy,
            gathered,
            grads,
            bias_sums,
            with_bias: self.bias,
        };
        let mut next_chunk = 0;
        let d = ctx_data.clone();
        let start = p.local_task(pe, "next_chunk", move |ctx| {
            if next_chunk < d.chunks.len() {
                d.gather(ctx, next_chunk, &gather_join);
            } else if next_chunk == d.chunks.len() && d.with_bias {
                d.bias(ctx);
            }
            next_chunk += 1;
        })?;
        debug_assert_eq!(start, start_id);
        p.local_task(pe, "gathered", move |ctx| ctx.unblock(index_id))?;
        let d = ctx_data;
        let mut slot = 0u32;
        let index = p.data_task(pe, PATTERN, "grad_dot", move |ctx| {
            let w = ctx.wavelet();
            if w.index() == END_OF_CHUNK {
                ctx.block(index_id);
                let op = COLUMN.reduce_south(d.r, d.grads.slice(0, slot));
                join::issue(ctx, &[op], &reduce_join);
                slot = 0;
                return;
            }
            ctx.scalar_cycles(1); // split the index into (column, input feature)
            let (n, k) = (
                u32::from(w.index()) / d.k_len,
                u32::from(w.index()) % d.k_len,
            );
            let g = ctx.dot(
                d.x.slice(k * d.t_len, d.t_len),
                d.gathered.slice(n * d.t_len, d.t_len),
            );
            ctx.store(d.grads.at(slot), g);
            slot += 1;
        })?;
        debug_assert_eq!(index, index_id);
        p.block(pe, index_id)?;
        p.activate(pe, start_id)?;
        Ok(())
    }

    fn alloc_tile(
        &self,
        p: &mut Program,
        pe: wafersim_sim::Coord,
        name: &'static str,
        tile: &[f32],
    ) -> Result<Buf, KernelError> {
        Ok(match self.precision {
            Precision::F32 => p.alloc_f32(pe, name, tile)?,
            Precision::F16 => p.alloc_f16(
                pe,
                name,
                &tile.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
            )?,
        })
    }
}

/// What one PE's tasks need to know.
#[derive(Clone, Debug)]
struct PeTasks {
    c: usize,
    cols: usize,
    r: usize,
    t_len: u32,
    k_len: u32,
    outs: Split,
    chunks: Vec<Range<usize>>,
    x: Buf,
    dy: Buf,
    gathered: Buf,
    grads: Buf,
    bias_sums: Buf,
    with_bias: bool,
}

impl PeTasks {
    /// Starts the all-gather of `dY` for chunk `i` into `gathered`.
    fn gather(&self, ctx: &mut TaskCtx<'_>, i: usize, join: &Join) {
        let chunk = &self.chunks[i];
        let mut segments: Vec<(usize, VecRef)> = Vec::new();
        let mut own = None;
        for b in 0..self.outs.parts {
            let owned = self.outs.block(b);
            let (lo, hi) = (chunk.start.max(owned.start), chunk.end.min(owned.end));
            if lo >= hi {
                continue;
            }
            let len = (hi - lo) as u32 * self.t_len;
            let landing = self
                .gathered
                .slice((lo - chunk.start) as u32 * self.t_len, len);
            if b == self.c {
                let mine = self.dy.slice((lo - owned.start) as u32 * self.t_len, len);
                ctx.mov(landing, mine);
                own = Some(landing);
            }
            segments.push((b, landing));
        }
        let own = own.unwrap_or(self.gathered.slice(0, 0));
        join::issue(
            ctx,
            &ROW.all_gather(self.c, self.cols, &segments, own),
            join,
        );
    }

    /// Sums this PE's `dY` columns over its tokens and starts their sum down the column.
    fn bias(&self, ctx: &mut TaskCtx<'_>) {
        for j in 0..self.bias_sums.len() {
            let column = self.dy.slice(j * self.t_len, self.t_len);
            let s = ctx.sum(column);
            ctx.store(self.bias_sums.at(j), s);
        }
        let op = COLUMN.reduce_south(self.r, self.bias_sums.all());
        ctx.issue(op, wafersim_sim::Then::Nothing);
    }
}
