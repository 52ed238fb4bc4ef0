//! The embedding gather at the start of a training step and the gradient scatter-add that
//! answers it at the end of the backward pass.
//!
//! Forward ([`EmbeddingForward`]): `X0[t, :] = E[id_t, :] + P[t mod S, :]` for `T` tokens in
//! sequence-major order (`T = B S`, position `t mod S`), a token table `E [V x F]` and a
//! position table `P [n_positions x F]` that the host owns. `X0` lands in the shared layout
//! ([`crate::layout`]): PE (c, r) of an R x C region ends with `X0[T_r, F_c]`, feature-major.
//!
//! Backward ([`EmbeddingBackward`]): from `dX0 [T x F]`, on the wafer in the same layout, the
//! host gets `dE[v] = sum of dX0[t] over the tokens with id v` and `dP[p] = sum of dX0[t] over
//! the tokens at position p`. The fabric only streams `dX0` out; the scatter-add runs on the
//! host, as weight-streaming training does with every weight gradient (the optimizer lives
//! there too). Rows of `dE`/`dP` that no token touches are zero.
//!
//! # Forward placement and stream order
//!
//! The host feeds each PE column c from the fabric's north edge
//! ([`crate::chain::feed_column_from_north`]): one color, multicast to every PE of the column.
//! The stream of column c is, for region row 0, 1, ..., R - 1 in turn, that row's `E` tile and
//! then its `P` tile, each in the tile's feature-major order (`for f in F_c, for t in T_r`), so
//! `2 T |F_c|` wavelets in all. Every PE of the column sees every wavelet; PE (c, r) knows from
//! the splits alone how many values precede its own, and issues at cycle 0 a fixed list of
//! receives: the rows above it are received into a small scratch vector and dropped, its `E` tile
//! is stored into `X0` and its `P` tile is *added* into `X0` by the receive itself (`dst +=
//! wavelet`, CSL's `@fadds(x, x, fabin)`: the 1 non-matmul FLOP per element), and the rows below
//! are dropped again. No task runs per wavelet and no header is needed.
//!
//! Honest about timing: dropping costs a PE nothing but its ramp bandwidth, and the injection
//! port of a column delivers one wavelet per cycle anyway, so the column's stream takes
//! `2 T |F_c|` cycles whatever the routing; per-row colors would not be faster and would use up
//! to R colors. (A router able to filter wavelets by count would keep the foreign rows off the
//! ramp; the simulator has no such filter, and it would change nothing in time.)
//!
//! # Backward placement
//!
//! Each PE column is a south-bound chain ([`crate::chain::ColumnChain`], two alternating
//! colors): PE (c, r) first forwards everything the rows above it send (received into a small
//! scratch vector and sent on, `recv_store_send`), then sends its own tile. So the sink below
//! column c receives row 0's tile, then row 1's, ..., each feature-major, and the host knows
//! which token and feature every value is. Then it accumulates, in token order, in `f64`, and
//! rounds once to `f32`.
//!
//! # Color plan
//!
//! | color | kernel | use |
//! |---|---|---|
//! | 0 | forward | host stream down each PE column (multicast to all rows) |
//! | 1, 2 | backward | south-bound column chain, then the route past the region to the sink |
//!
//! # Cost
//!
//! Forward ([`EmbeddingForward::estimate_cycles`]): `2 T F_max + (origin.y + R) h + a + 1`
//! cycles, with `F_max` the widest column block, hop `h` and ramp `a`: the longest column stream
//! at one wavelet per cycle, then the last wavelet's trip to the lowest PE. (The receives are
//! issued at cycle `s + i` while the first wavelets are still on their way, and the queues absorb
//! the rest, so the start costs nothing.) Backward ([`EmbeddingBackward::estimate_cycles`]):
//! `s + i + T F_max - 1 + (R - 1)(2a + h) + a + (H - origin.y - R + 1) h` with task switch `s`,
//! issue `i` and fabric height `H`: row 0 starts sending after one task switch and one issue,
//! every hop through a PE adds `2a + h` (router to core and back, one link), and the bottom PE's
//! ramp carries the column's `T F_max` values at one per cycle.
//!
//! Neither executes an FMAC (no `fmac`/`dot`): the only arithmetic is the add inside the
//! forward receive, `T F` non-matmul FLOPs (the FLOP convention counts the lookup as free).
//!
//! What it is not: no table lives on the wafer (the host streams rows of `E` and `P`, one per
//! token, repeated tokens included), the backward does no arithmetic on the fabric, and neither
//! kernel knows what the tokens are: ids are plain indices into the host's tables.

use wafersim_sim::{
    Buf, Color, Coord, DType, FabricConfig, Port, Program, RecvMode, RunOptions, Simulator, SinkId,
    Stats, TaskCtx, Then, VecRef, Wavelet,
};

use crate::chain::{ChainColors, ColumnChain, feed_column_from_north};
use crate::check_region;
use crate::error::KernelError;
use crate::layout::{Region, Tiling};

/// Name of the forward kernel in errors and reports.
pub const FORWARD_KERNEL: &str = "embedding_forward";
/// Name of the backward kernel in errors and reports.
pub const BACKWARD_KERNEL: &str = "embedding_backward";

const VALUES: Color = Color(0);
const OUT: ColumnChain = ColumnChain {
    south: ChainColors([Color(1), Color(2)]),
};
/// Colors the kernel routes on: `0..COLORS`.
pub const COLORS: u8 = crate::colors_used(&[OUT.south], &[VALUES]);
/// Most `f32` elements of the scratch vector that dropped or forwarded wavelets pass through
/// (1 KiB); longer runs are received in several pieces, one receive each. (A CSL program would
/// receive a whole run into a stride-0 memory DSD with one operation; the simulator's vectors
/// have no stride, and the pieces cost only one issue cycle each, hidden behind the stream.)
pub const SCRATCH_LEN: usize = 256;

/// Tokens and the shapes of the host's tables, shared by both directions.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingShape<'a> {
    pub region: Region,
    /// Token ids, `T = B S` of them, sequence-major (token `t` is at position `t mod seq_len`).
    pub ids: &'a [u32],
    /// Tokens per sequence `S`.
    pub seq_len: usize,
    /// Rows of the token table `V`.
    pub vocab: usize,
    /// Rows of the position table (at least `S`).
    pub positions: usize,
    /// Features `F` (columns of both tables and of `X0`).
    pub features: usize,
}

/// The gather `X0 = E[ids] + P[positions]`.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingForward<'a> {
    pub shape: EmbeddingShape<'a>,
    /// `E`, `vocab x features` row-major.
    pub token_table: &'a [f32],
    /// `P`, `positions x features` row-major.
    pub position_table: &'a [f32],
}

/// The gradient of the gather: `dX0` streamed out, scatter-added on the host.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingBackward<'a> {
    pub shape: EmbeddingShape<'a>,
    /// `dX0`, `T x features` row-major (on the wafer in the region layout before cycle 0).
    pub dx: &'a [f32],
}

/// How the embedding is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingPlan {
    /// `X0` (or `dX0`) over the region.
    pub tiling: Tiling,
    /// Elements of the scratch vector each PE drops or forwards through (0 on one region row).
    pub scratch_len: usize,
    /// SRAM used by the fullest PE, in bytes.
    pub sram_bytes: u64,
}

/// The gathered activations and what they cost.
#[derive(Clone, Debug)]
pub struct EmbeddingRun {
    /// `X0`, `T x features` row-major.
    pub x: Vec<f32>,
    pub plan: EmbeddingPlan,
    pub stats: Stats,
}

/// The table gradients and what streaming them out cost.
#[derive(Clone, Debug)]
pub struct EmbeddingGradRun {
    /// `dE`, `vocab x features` row-major.
    pub d_token_table: Vec<f32>,
    /// `dP`, `positions x features` row-major.
    pub d_position_table: Vec<f32>,
    pub plan: EmbeddingPlan,
    pub stats: Stats,
}

impl EmbeddingShape<'_> {
    fn tokens(&self) -> usize {
        self.ids.len()
    }

    fn check(&self, kernel: &'static str, config: &FabricConfig) -> Result<(), KernelError> {
        let shape = |reason: String| Err(KernelError::Shape { kernel, reason });
        let (t, s) = (self.tokens(), self.seq_len);
        if s == 0 || !t.is_multiple_of(s) {
            return shape(format!(
                "{t} token ids are not a whole number of sequences of {s}"
            ));
        }
        if s > self.positions {
            return shape(format!(
                "sequences of {s} tokens need {s} position rows, the table has {}",
                self.positions
            ));
        }
        if let Some((i, id)) = self
            .ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= self.vocab)
        {
            return shape(format!(
                "token {i} has id {id}, outside the token table of {} rows",
                self.vocab
            ));
        }
        check_region(kernel, config, self.region, t, self.features)
    }

    /// The tiling, the scratch length and the SRAM check shared by both directions.
    fn plan(
        &self,
        kernel: &'static str,
        config: &FabricConfig,
    ) -> Result<EmbeddingPlan, KernelError> {
        self.check(kernel, config)?;
        let tiling = Tiling::new(self.region, self.tokens(), self.features);
        let tile = tiling.tokens.max_len() * tiling.features.max_len();
        let available = u64::from(config.sram_bytes);
        // Everything a column passes through a PE's scratch is at most the column's T x F_max
        // values; as much of SCRATCH_LEN as fits beside the tile (at least one element).
        let room = (available.saturating_sub(4 * tile as u64) / 4) as usize;
        let scratch_len = if self.region.rows > 1 {
            SCRATCH_LEN
                .min(self.tokens() * tiling.features.max_len())
                .min(room)
                .max(1)
        } else {
            0
        };
        let sram_bytes = 4 * (tile + scratch_len) as u64;
        if sram_bytes > available {
            return Err(KernelError::DoesNotFit {
                kernel,
                needed: sram_bytes,
                available,
                what: format!(
                    "tile {} tokens x {} features and a scratch of {scratch_len}",
                    tiling.tokens.max_len(),
                    tiling.features.max_len()
                ),
                hint: "spread the tokens over more PE rows or the features over more columns"
                    .into(),
            });
        }
        Ok(EmbeddingPlan {
            tiling,
            scratch_len,
            sram_bytes,
        })
    }

    /// Values of the widest PE column: `T x F_max`.
    fn column_volume(&self) -> u64 {
        let widest = self.features.div_ceil(self.region.cols.max(1) as usize);
        (self.tokens() * widest) as u64
    }

    /// Elements of column `c`'s tile of row `r`.
    fn tile_len(tiling: &Tiling, c: usize, r: usize) -> usize {
        tiling.tokens.block(r).len() * tiling.features.block(c).len()
    }

    /// Elements of column `c`'s tiles of the rows above `r`.
    fn above(tiling: &Tiling, c: usize, r: usize) -> usize {
        (0..r).map(|q| Self::tile_len(tiling, c, q)).sum()
    }

    /// The receives (or forwards) that pass `count` wavelets through `scratch`, in pieces.
    fn pieces(count: usize, scratch: Option<Buf>) -> Vec<VecRef> {
        let Some(scratch) = scratch else {
            return Vec::new();
        };
        let step = scratch.len() as usize;
        (0..count.div_ceil(step))
            .map(|k| scratch.slice(0, (count - k * step).min(step) as u32))
            .collect()
    }
}

impl EmbeddingForward<'_> {
    fn check_tables(&self) -> Result<(), KernelError> {
        let s = &self.shape;
        for (name, table, rows) in [
            ("token table", self.token_table, s.vocab),
            ("position table", self.position_table, s.positions),
        ] {
            if table.len() != rows * s.features {
                return Err(KernelError::Shape {
                    kernel: FORWARD_KERNEL,
                    reason: format!(
                        "the {name} has {} values, expected {rows} x {}",
                        table.len(),
                        s.features
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks shapes and ids and that every PE's tile and scratch fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<EmbeddingPlan, KernelError> {
        self.check_tables()?;
        self.shape.plan(FORWARD_KERNEL, config)
    }

    /// Cycles predicted by the formula in the module doc (shapes are not checked here: call
    /// [`Self::plan`] for that).
    pub fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
        let region = self.shape.region;
        let stream = 2 * self.shape.column_volume();
        let hops = u64::from(region.origin.y + region.rows) * u64::from(config.hop_latency);
        stream + hops + u64::from(config.ramp_latency) + 1
    }

    /// The program and the buffers holding `X0` (region row-major).
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, EmbeddingPlan, Vec<Buf>), KernelError> {
        let plan = self.plan(config)?;
        let region = self.shape.region;
        let mut p = Program::new(config.clone())?;
        let mut outputs = Vec::new();
        for r in 0..region.rows {
            for c in 0..region.cols {
                outputs.push(self.place_pe(&mut p, &plan, c, r)?);
            }
        }
        for c in 0..region.cols {
            let at = feed_column_from_north(&mut p, region, c, VALUES)?;
            p.inject(at, Port::North, self.stream(&plan.tiling, c as usize))?;
        }
        Ok((p, plan, outputs))
    }

    /// Builds, runs and reads back `X0`.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<EmbeddingRun, KernelError> {
        let (program, plan, outputs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let region = self.shape.region;
        let mut x = vec![0.0; self.shape.tokens() * self.shape.features];
        for (i, buf) in outputs.into_iter().enumerate() {
            let (c, r) = (i as u32 % region.cols, i as u32 / region.cols);
            let tile = read_tile(&executed, region.pe(c, r), buf, FORWARD_KERNEL)?;
            plan.tiling.untile(&tile, &mut x, c as usize, r as usize);
        }
        Ok(EmbeddingRun {
            x,
            plan,
            stats: executed.stats,
        })
    }

    /// Column `c`'s host stream: per region row, its `E` tile then its `P` tile, feature-major.
    fn stream(&self, tiling: &Tiling, c: usize) -> Vec<(Color, Wavelet)> {
        let s = &self.shape;
        let features = tiling.features.block(c);
        let mut out = Vec::with_capacity(2 * s.tokens() * features.len());
        for r in 0..tiling.tokens.parts {
            let tokens = tiling.tokens.block(r);
            let token_row = |t: usize| s.ids[t] as usize;
            let position_row = |t: usize| t % s.seq_len;
            for (table, row_of) in [
                (self.token_table, &token_row as &dyn Fn(usize) -> usize),
                (self.position_table, &position_row),
            ] {
                for f in features.clone() {
                    for t in tokens.clone() {
                        let value = table[row_of(t) * s.features + f];
                        out.push((VALUES, Wavelet::from_f32(value)));
                    }
                }
            }
        }
        out
    }

    /// The `X0` tile and the receives of one PE; returns the tile.
    fn place_pe(
        &self,
        p: &mut Program,
        plan: &EmbeddingPlan,
        c: u32,
        r: u32,
    ) -> Result<Buf, KernelError> {
        let pe = self.shape.region.pe(c, r);
        let t = &plan.tiling;
        let (cu, ru) = (c as usize, r as usize);
        let x = p.alloc_zeros(pe, "x0", DType::F32, EmbeddingShape::tile_len(t, cu, ru))?;
        let scratch = alloc_scratch(p, pe, plan)?;
        let rows = t.tokens.parts;
        let above = 2 * EmbeddingShape::above(t, cu, ru);
        let below = 2 * (EmbeddingShape::above(t, cu, rows) - EmbeddingShape::above(t, cu, ru + 1));
        let dropped = |n| {
            EmbeddingShape::pieces(n, scratch)
                .into_iter()
                .map(|v| (v, RecvMode::Store))
        };
        let receives: Vec<(VecRef, RecvMode)> = dropped(above)
            .chain([(x.all(), RecvMode::Store), (x.all(), RecvMode::Add)])
            .chain(dropped(below))
            .collect();
        let start = p.local_task(pe, "receive", move |ctx| {
            for &(dst, mode) in &receives {
                ctx.recv(VALUES, dst, mode, Then::Nothing);
            }
        })?;
        p.activate(pe, start)?;
        Ok(x)
    }
}

impl EmbeddingBackward<'_> {
    /// Checks shapes and ids and that every PE's tile and scratch fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<EmbeddingPlan, KernelError> {
        let s = &self.shape;
        if self.dx.len() != s.tokens() * s.features {
            return Err(KernelError::Shape {
                kernel: BACKWARD_KERNEL,
                reason: format!(
                    "dX0 has {} values, expected {} x {}",
                    self.dx.len(),
                    s.tokens(),
                    s.features
                ),
            });
        }
        s.plan(BACKWARD_KERNEL, config)
    }

    /// Cycles predicted by the formula in the module doc (shapes are not checked here: call
    /// [`Self::plan`] for that).
    pub fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
        let region = self.shape.region;
        let (a, h) = (
            u64::from(config.ramp_latency),
            u64::from(config.hop_latency),
        );
        let chain = u64::from(region.rows.saturating_sub(1)) * (2 * a + h);
        let below = u64::from(config.height.saturating_sub(region.origin.y + region.rows) + 1) * h;
        let start = u64::from(config.task_switch_cycles + config.issue_cycles);
        (start + self.shape.column_volume() + chain + a + below).saturating_sub(1)
    }

    /// The program, the plan and the sink below each PE column.
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, EmbeddingPlan, Vec<SinkId>), KernelError> {
        let plan = self.plan(config)?;
        let region = self.shape.region;
        let mut p = Program::new(config.clone())?;
        for r in 0..region.rows {
            for c in 0..region.cols {
                self.place_pe(&mut p, &plan, c, r)?;
            }
        }
        let sinks = (0..region.cols)
            .map(|c| OUT.install_exit(&mut p, region, c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((p, plan, sinks))
    }

    /// Builds and runs the stream-out, then scatter-adds `dX0` into `dE` and `dP` on the host.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<EmbeddingGradRun, KernelError> {
        let (program, plan, sinks) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let s = &self.shape;
        let mut dx = vec![0.0; s.tokens() * s.features];
        for (c, sink) in sinks.into_iter().enumerate() {
            let values: Vec<f32> = executed
                .sink(sink)
                .received
                .iter()
                .map(|(_, _, w)| w.f32())
                .collect();
            untile_column(&plan.tiling, c, &values, &mut dx)?;
        }
        let (d_token_table, d_position_table) = self.scatter_add(&dx);
        Ok(EmbeddingGradRun {
            d_token_table,
            d_position_table,
            plan,
            stats: executed.stats,
        })
    }

    /// `dE[id_t] += dX0[t]`, `dP[t mod S] += dX0[t]`, in token order, in `f64`, rounded once.
    fn scatter_add(&self, dx: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let s = &self.shape;
        let f = s.features;
        let mut de = vec![0.0f64; s.vocab * f];
        let mut dp = vec![0.0f64; s.positions * f];
        for (t, row) in dx.chunks_exact(f).enumerate() {
            let (e, p) = (s.ids[t] as usize * f, (t % s.seq_len) * f);
            for (k, &g) in row.iter().enumerate() {
                de[e + k] += f64::from(g);
                dp[p + k] += f64::from(g);
            }
        }
        let round = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        (round(de), round(dp))
    }

    /// The `dX0` tile and the chain step of one PE: forward the rows above, then send the tile.
    fn place_pe(
        &self,
        p: &mut Program,
        plan: &EmbeddingPlan,
        c: u32,
        r: u32,
    ) -> Result<(), KernelError> {
        let region = self.shape.region;
        let pe = region.pe(c, r);
        let t = &plan.tiling;
        let (cu, ru) = (c as usize, r as usize);
        let dx = p.alloc_f32(pe, "dx0", &t.tile(self.dx, cu, ru))?;
        let scratch = alloc_scratch(p, pe, plan)?;
        OUT.install(p, region, c, r)?;
        let (out, inp) = (OUT.south.out(ru), OUT.south.inp(ru));
        let forwards = EmbeddingShape::pieces(EmbeddingShape::above(t, cu, ru), scratch);
        let start = p.local_task(pe, "stream_out", move |ctx: &mut TaskCtx<'_>| {
            for &piece in &forwards {
                ctx.recv_store_send(inp, piece, out, Then::Nothing);
            }
            ctx.send(out, dx.all(), Then::Nothing);
        })?;
        p.activate(pe, start)?;
        Ok(())
    }
}

/// The scratch vector dropped or forwarded wavelets pass through, if the region has several rows.
fn alloc_scratch(
    p: &mut Program,
    pe: Coord,
    plan: &EmbeddingPlan,
) -> Result<Option<Buf>, KernelError> {
    if plan.scratch_len == 0 {
        return Ok(None);
    }
    Ok(Some(p.alloc_zeros(
        pe,
        "scratch",
        DType::F32,
        plan.scratch_len,
    )?))
}

/// Writes what left PE column `c` (row 0's tile, row 1's, ...) into the row-major `m`.
fn untile_column(
    tiling: &Tiling,
    c: usize,
    values: &[f32],
    m: &mut [f32],
) -> Result<(), KernelError> {
    let expected = tiling.tokens.total * tiling.features.block(c).len();
    if values.len() != expected {
        return Err(KernelError::Shape {
            kernel: BACKWARD_KERNEL,
            reason: format!(
                "PE column {c} streamed out {} values, expected {expected}",
                values.len()
            ),
        });
    }
    let mut rest = values;
    for r in 0..tiling.tokens.parts {
        let (tile, tail) = rest.split_at(EmbeddingShape::tile_len(tiling, c, r));
        tiling.untile(tile, m, c, r);
        rest = tail;
    }
    Ok(())
}

/// The final contents of a tile buffer.
fn read_tile(
    executed: &wafersim_sim::Executed,
    pe: Coord,
    buf: Buf,
    kernel: &'static str,
) -> Result<Vec<f32>, KernelError> {
    executed.read(pe, buf).ok_or_else(|| KernelError::Shape {
        kernel,
        reason: format!("no tile to read back on PE {pe}"),
    })
}
