//! Causal multi-head self-attention, forward and backward, on a region of PEs.
//!
//! Forward: `O = softmax(mask(scale Q K^T)) V` per sequence and head; the probabilities `P` stay
//! on the wafer for the backward (and are returned to the host). Backward: from `dO`, `Q`, `K`,
//! `V` and `P`: `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP)) * scale`, `dQ = dS K`,
//! `dK = dS^T Q`, `dV = P^T dO`.
//!
//! # Placement
//!
//! `Q`, `K`, `V`, `O` (and `dO`, `dQ`, `dK`, `dV`) are `[T x F]` in the shared layout
//! ([`crate::layout`]): tokens over region rows, features over region columns, feature-major
//! tiles. `T = batch x seq_len` tokens are sequence-major; head `h` owns features
//! `h hd .. (h + 1) hd`. Any region with no more columns than features works: PE column `c`
//! holds the layout's feature block `F_c` (near-equal contiguous blocks), and with it whole
//! heads, parts of heads, or both. A head's *column group* is the columns holding any of its
//! features: one column when the columns divide the heads (`heads / cols` whole heads each);
//! `g` consecutive columns when `cols = g heads` and `g` divides `hd`; in general a head may
//! start or end mid-column, so a column may end one group and start the next (at most two
//! groups per column, and at most one group per pair of neighbouring columns). PE (c, r)
//! computes its tokens `T_r` against the heads its features touch, over its own features.
//!
//! Each PE keeps a *window*: the K and V tiles of the region rows holding any token of the
//! sequences its own tokens touch (at least one sequence, plus the rows' spill-over), one slot
//! `[K tile | V tile]` per row. Windows are contiguous and never move backwards from one row to
//! the next, so the rows wanting a given row's tiles are contiguous too (its *reach*), and the
//! tiles get there by an all-gather down each PE column whose chains stop where the reach ends
//! ([`crate::vchain::VerticalChain`], store-and-forward chains south and north): a PE moves only
//! the K and V of its own sequences (and of its own features), never a whole column's. Then,
//! per local head and per *segment* (the PE's tokens of one sequence), the PE computes:
//!
//! - scores `s[j][t] = q_t . k_j` over the head's features on the PE, for all `S` keys of the
//!   sequence, future ones included, as AXPYs over the segment's tokens
//!   (`fmac(s[j], Q[f, tokens], k_j[f])`): key-major blocks whose rows are contiguous vectors,
//!   so the feature-major tiles need no transpose;
//! - for a head whose group has several columns, those scores are partial: every PE of the
//!   group sums them along its row ([`crate::rowgroup::GroupAllReduce`]: a chain east, the
//!   totals back west), so each ends with the full scores of its tokens;
//! - scale, mask future keys to `-inf` (`fill`), softmax with `max`/`sub`/`exp`/`add`, one scalar
//!   reciprocal per token, and `mul`: `P` in place (every PE of a group computes the same `P`:
//!   the softmax is repeated rather than communicated);
//! - `O[f, tokens] += p_j v_j[f]` (AXPYs) over the PE's own features of `V`, which lands `O` in
//!   the shared layout.
//!
//! The order on a PE: the shared heads' partial scores first, then the group sums are issued
//! and travel while the same task does everything for the heads the PE holds whole; a second
//! task, activated when the sums are back, finishes the shared heads.
//!
//! The backward gathers K and V the same way, computes per head and segment `dP` (AXPYs over
//! the PE's features, summed over the head's group like the scores), `dS` (non-FMAC vector ops),
//! `dQ` (AXPYs), and for every key of the window and local feature the PE's share of
//! `dK_j[f] = dS_j . Q[f, tokens]` and `dV_j[f] = P_j . dO[f, tokens]` (`dot`): given `P` and
//! `dS`, all three need only the PE's own features. The partial `dK`, `dV`, laid out like the
//! window, are reduce-scattered up and down each column over the same reaches, so each row ends
//! with the `dK`, `dV` of its own tokens, in the shared layout.
//!
//! Key design decision: products as AXPYs over the tokens of a segment rather than one dot
//! product over a head's features per (query, key) pair. The pairwise form would need every Q,
//! K, V tile transposed to token-major first (one move per element); AXPYs use the feature-major
//! layout as it is, leave `O`, `dQ` in it, and execute the same FMACs. And heads split by the
//! layout's feature split, not by a split of their own: the tiles the neighbouring kernels leave
//! are used where they are, at the price of summing `S n` scores per shared head and row.
//!
//! # Matmul and non-matmul work
//!
//! The four products the FLOP convention counts (`Q K^T`, `P V` forward; `dO V^T`, `dS K`,
//! `dS^T Q`, `P^T dO` backward) use `fmac`/`dot` only, every `(query, key)` pair of a sequence
//! computed in full and masked afterwards, as PyTorch eager does. A head's features are
//! partitioned among its columns, so its partial products add up to exactly one full product:
//! the forward executes exactly `2 B heads S^2 hd` FMACs, the backward `4 B heads S^2 hd`, on
//! any region. The group sums add with `recv`/`recv_add_send`; softmax and its gradient never use
//! an FMAC instruction. Everything is `f32`.
//!
//! # Color plan
//!
//! | colors | use |
//! |---|---|
//! | 0, 1 | K/V all-gather, south-bound chain (alternating by row parity) |
//! | 2, 3 | K/V all-gather, north-bound chain |
//! | 4, 5 | backward: dK/dV reduce-scatter, south-bound chain |
//! | 6, 7 | backward: dK/dV reduce-scatter, north-bound chain |
//! | 8, 9 | shared heads' partial scores or dP, east-bound chain (by column parity) |
//! | 10, 11 | shared heads' totals back, west-bound chain |
//!
//! # Cost
//!
//! [`Attention::estimate_cycles`] and [`AttentionBackward::estimate_cycles`] add three terms:
//!
//! 1. the all-gather in the widest column: the busiest core moves one wavelet per cycle through
//!    its ramp, taking in the `2 F_c n_b` values of every other row of its window and sending out
//!    what it forwards plus its own slot once per direction its reach goes, plus one
//!    store-and-forward hop (`h = hop + 2 ramp + 1` cycles) per row of the longest reach;
//! 2. the slowest row's compute, on a timeline per row. Instruction costs are summed in closed
//!    form: per local head of `d` features on the PE and segment of `L` tokens,
//!    `S d (issue + issue + ceil(L / fmac_f32))` per product (a load and an AXPY or a dot per
//!    key and feature), `O(S)` vector instructions of length `L` for the softmax or its
//!    gradient, `exp_cycles S L` for the `exp`. Each PE's first task takes `A_c` to its shared
//!    heads' partial products and `W_c` more for its whole heads; a group of `g` columns sums
//!    `m = S n_r` values per head once its slowest member is ready (`max A_c`), in
//!    `m + (g - 1) h` along the chain, then `s + 3 issue` for the turnaround task once the last
//!    column's core is free, and `m + (g - 1) h` back; each PE's second task (the shared heads'
//!    softmax and context, or dS, dQ, dK, dV) starts when both its first task and its groups are
//!    done. With whole heads only this is the first task alone, as before;
//! 3. backward only: the reduce-scatter, which moves the gather's wavelets the other way round.
//!
//! The products dominate: about `2 S F_c (n_r + 2)` cycles per PE forward and twice that
//! backward, against `2 F_c W` wavelets of gather and `2 S n_r` per shared head of group sums,
//! so widening the region divides the products by the columns until the sums (which do not
//! shrink with the width) and the repeated softmax take over. Measured against the exact engine
//! in `kernels/tests/attention.rs`, the estimate is within 6 % on every tested shape (0.949 to
//! 1.024 of the exact cycles; the test asserts the 6 %).
//!
//! # Memory per PE (f32 elements; `n` tokens, window of `W` tokens, longest segment `L`)
//!
//! `H_c` heads touch column `c` (whole or in part), `G_c <= 2` of them shared with other columns.
//!
//! - forward: Q, K, V, O tiles `4 F_c n`; window `2 F_c W`; probabilities `H_c S n`; row max
//!   and sum `2 L`; one join counter, and a group counter if `G_c = 2`.
//! - backward: Q, K, V, dO tiles `4 F_c n`; probabilities `H_c S n`; window and partial dK/dV
//!   `4 F_c W`; `dS` `S L`; two rows `2 L`; dP of the shared heads `G_c S n`; dQ `F_c n`; dK/dV
//!   `2 F_c n`; one join counter, and a group counter if `G_c = 2`.
//!
//! `W >= S`, so the window alone needs `8 F_c S` bytes forward and `16 F_c S` backward: with 64
//! features per column, sequences longer than 93 tokens (forward) or 45 (backward) do not fit
//! 48 KiB, whatever the rows; more columns shrink `F_c` but not the probabilities, which every
//! column of a head keeps whole. A shape that does not fit is refused with
//! [`KernelError::DoesNotFit`] naming the fullest PE and its bytes. Longer sequences take the
//! blocked kernels ([`BlockedAttention`], [`BlockedAttentionBackward`]): the same placement, K
//! and V gathered one key block of region rows at a time, an online softmax, the probabilities
//! recomputed block by block in the backward (FlashAttention's schedule), so a PE holds one
//! block whatever the sequence length.
//!
//! What this is not: no dropout, no attention bias, no cross-attention, no fp16; the gather
//! finishes before any compute starts; the softmax of a head over several columns is repeated
//! on each of them, not split among them.

mod blocked;
mod blocked_backward;
mod blocked_backward_cost;
mod blocked_cost;
mod blocked_memory;
mod blocks;
mod cost;
mod geometry;
mod online;
mod online_backward;
mod pe;

pub use blocked::{BLOCKED_KERNEL, BlockedAttention, BlockedAttentionRun, BlockedPlan};
pub use blocked_backward::{
    BLOCKED_BACKWARD_KERNEL, BlockedAttentionBackward, BlockedAttentionGrads,
};
pub use blocked_memory::BlockedMemory;

use std::ops::Range;

use wafersim_sim::{
    Buf, BuildError, Color, Coord, DType, Executed, FabricConfig, Program, RunOptions, Simulator,
    Stats, TaskId, Then, VecRef,
};

use crate::chain::ChainColors;
use crate::check_region;
use crate::error::KernelError;
use crate::join::{self, ARMS, Join};
use crate::layout::{Region, Tiling};
use crate::rowgroup::{GroupAllReduce, GroupPart, Member};
use crate::vchain::{Part, VerticalChain};
use cost::Pass;
use geometry::{Geometry, PeWork};
use pe::{BackwardBufs, ForwardBufs};

/// Name of the forward kernel in errors and reports.
pub const KERNEL: &str = "attention";
/// Name of the backward kernel in errors and reports.
pub const BACKWARD_KERNEL: &str = "attention_backward";

const GATHER: VerticalChain = VerticalChain {
    south: ChainColors([Color(0), Color(1)]),
    north: ChainColors([Color(2), Color(3)]),
};
const REDUCE: VerticalChain = VerticalChain {
    south: ChainColors([Color(4), Color(5)]),
    north: ChainColors([Color(6), Color(7)]),
};
const SUMS: GroupAllReduce = GroupAllReduce {
    east: ChainColors([Color(8), Color(9)]),
    west: ChainColors([Color(10), Color(11)]),
};
/// Colors the kernel routes on: `0..COLORS`.
pub const COLORS: u8 = crate::colors_used(
    &[
        GATHER.south,
        GATHER.north,
        REDUCE.south,
        REDUCE.north,
        SUMS.east,
        SUMS.west,
    ],
    &[],
);

/// The attention problem: `batch` sequences of `seq_len` tokens, `features = heads x head_dim`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub features: usize,
    /// Multiplies the scores before the softmax (`1 / sqrt(head_dim)`, or 1).
    pub scale: f32,
}

impl AttentionShape {
    /// Tokens `T = batch x seq_len`.
    pub fn tokens(&self) -> usize {
        self.batch.saturating_mul(self.seq_len)
    }

    /// Features per head (0 without heads).
    pub fn head_dim(&self) -> usize {
        self.features.checked_div(self.heads).unwrap_or(0)
    }

    /// Entries of the probabilities, `[batch][head][query][key]`.
    pub fn probs_len(&self) -> usize {
        [self.heads, self.seq_len, self.seq_len]
            .iter()
            .fold(self.batch, |acc, &x| acc.saturating_mul(x))
    }
}

/// SRAM the fullest PE of a region needs for the two attention kernels, whether or not it has
/// that much: what [`Attention::plan`] and [`AttentionBackward::plan`] check against
/// `FabricConfig::sram_bytes`, from the shape alone (no data), and the part of it a training
/// step does not already keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionMemory {
    /// Bytes of the forward's buffers (tiles, the K/V window, the probabilities of every local
    /// head, softmax rows).
    pub forward_bytes: u64,
    /// Bytes of the backward's buffers (the forward's, with the partial dK/dV beside the window,
    /// dS, the shared heads' dP and the gradient tiles).
    pub backward_bytes: u64,
    /// The most either kernel holds beyond its Q, K, V (and O) tiles and the probabilities: what
    /// a step that keeps those for the backward pass needs on top of them (fullest PE).
    pub scratch_bytes: u64,
}

impl AttentionShape {
    /// The SRAM the attention kernels need on `region` of `config`'s fabric (the fullest PE of
    /// each); an error when the region refuses the shape.
    pub fn memory(
        &self,
        config: &FabricConfig,
        region: Region,
    ) -> Result<AttentionMemory, KernelError> {
        let g = geometry(KERNEL, config, region, self)?;
        let columns: Vec<ColumnFacts> = (0..g.cols).map(|c| ColumnFacts::of(&g, c)).collect();
        let mut most = [0; 3];
        for r in 0..g.rows {
            let row = RowFacts::of(&g, r);
            for &col in &columns {
                let (forward, backward) = (forward_parts(col, row), backward_parts(col, row));
                let scratch = forward.scratch.max(backward.scratch);
                let pe = [forward.total(), backward.total(), scratch];
                for (m, x) in most.iter_mut().zip(pe) {
                    *m = (*m).max(x);
                }
            }
        }
        let [forward, backward, scratch] = most.map(|elements| 4 * elements);
        Ok(AttentionMemory {
            forward_bytes: forward,
            backward_bytes: backward,
            scratch_bytes: scratch,
        })
    }
}

/// The forward pass to run.
#[derive(Clone, Copy, Debug)]
pub struct Attention<'a> {
    pub region: Region,
    pub shape: AttentionShape,
    /// `Q`, `K`, `V`: `T x F` row-major.
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// The backward pass to run.
#[derive(Clone, Copy, Debug)]
pub struct AttentionBackward<'a> {
    pub region: Region,
    pub shape: AttentionShape,
    /// `Q`, `K`, `V`, `dO`: `T x F` row-major.
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub d_out: &'a [f32],
    /// The forward's probabilities, `[batch][head][query][key]`.
    pub probs: &'a [f32],
}

/// How attention is cut over a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// `Q`, `K`, `V`, `O` and their gradients over the region.
    pub tiling: Tiling,
    /// Per head, the PE columns holding its features (one column, or several whose partial
    /// scores and dP are summed along each row).
    pub head_columns: Vec<Range<usize>>,
    pub head_dim: usize,
    /// Per region row, the rows whose K and V it keeps.
    pub windows: Vec<Range<usize>>,
    /// SRAM used by the fullest PE, in bytes.
    pub sram_bytes: u64,
}

/// The forward's results.
#[derive(Clone, Debug)]
pub struct AttentionRun {
    /// `O`, `T x F` row-major.
    pub out: Vec<f32>,
    /// `P`, `[batch][head][query][key]` (0 above the diagonal).
    pub probs: Vec<f32>,
    pub plan: AttentionPlan,
    pub stats: Stats,
}

/// The backward's results, each `T x F` row-major.
#[derive(Clone, Debug)]
pub struct AttentionGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub plan: AttentionPlan,
    pub stats: Stats,
}

/// Where one PE keeps the forward's outputs (for a following kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardBuffers {
    /// Its `O` tile, feature-major.
    pub out: Buf,
    /// Its probabilities: per head with features on its column (in head order), per sequence
    /// segment, `[key][token]`.
    pub probs: Buf,
}

/// Where one PE keeps the backward's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardBuffers {
    /// Its `dQ` tile, feature-major.
    pub dq: Buf,
    /// Its `dK` tile then its `dV` tile, feature-major.
    pub dkv: Buf,
}

/// Checks the shape against the region and the fabric; returns the cut.
fn geometry(
    kernel: &'static str,
    config: &FabricConfig,
    region: Region,
    shape: &AttentionShape,
) -> Result<Geometry, KernelError> {
    let refuse = |reason: String| Err(KernelError::Shape { kernel, reason });
    let AttentionShape {
        batch,
        seq_len,
        heads,
        features,
        scale,
    } = *shape;
    if batch == 0 || seq_len == 0 || heads == 0 {
        return refuse(format!(
            "batch ({batch}), seq_len ({seq_len}) and heads ({heads}) must be positive"
        ));
    }
    if !features.is_multiple_of(heads) {
        return refuse(format!(
            "{features} features do not split into {heads} heads"
        ));
    }
    if !scale.is_finite() {
        return refuse(format!("the scale {scale} is not finite"));
    }
    let Some(tokens) = batch.checked_mul(seq_len) else {
        return refuse(format!("{batch} x {seq_len} tokens overflow"));
    };
    check_region(kernel, config, region, tokens, features)?;
    Ok(Geometry::new(
        region,
        tokens,
        seq_len,
        heads,
        features / heads,
    ))
}

/// Checks that each `(name, values)` tensor has `want` values.
fn check_lengths(
    kernel: &'static str,
    tensors: &[(&str, usize)],
    want: usize,
    what: &str,
) -> Result<(), KernelError> {
    match tensors.iter().find(|(_, got)| *got != want) {
        Some((name, got)) => Err(KernelError::Shape {
            kernel,
            reason: format!("{name} has {got} values, expected {want} ({what})"),
        }),
        None => Ok(()),
    }
}

/// What the SRAM of a PE depends on in its column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColumnFacts {
    /// Features.
    fc: u64,
    /// Heads with features on the column, and those of them shared with other columns.
    heads: u64,
    shared: u64,
    /// The group sums' counter.
    counter: u64,
}

/// What the SRAM of a PE depends on in its row.
#[derive(Clone, Copy, Debug)]
struct RowFacts {
    n: u64,
    window: u64,
    longest: u64,
    seq: u64,
}

impl ColumnFacts {
    fn of(g: &Geometry, c: usize) -> Self {
        let heads = g.local_heads(c);
        let shared = heads.iter().filter(|h| h.shared()).count() as u64;
        ColumnFacts {
            fc: g.fc(c) as u64,
            heads: heads.len() as u64,
            shared,
            counter: u64::from(shared > 1),
        }
    }
}

impl RowFacts {
    fn of(g: &Geometry, r: usize) -> Self {
        RowFacts {
            n: g.n(r) as u64,
            window: g.window_tokens(r) as u64,
            longest: g.longest_segment(r) as u64,
            seq: g.seq as u64,
        }
    }
}

/// One PE's f32 elements of a kernel, in the three parts a training step tells apart.
#[derive(Clone, Copy, Debug)]
struct Parts {
    /// The Q, K, V (and the forward's O) tiles: activations a step keeps for its backward pass.
    tiles: u64,
    /// The probabilities of every head touching the column, for the PE's tokens.
    probs: u64,
    /// Everything else: the K/V window, softmax rows, gradients, counters.
    scratch: u64,
}

impl Parts {
    fn total(self) -> u64 {
        self.tiles + self.probs + self.scratch
    }
}

/// A kernel's parts on a PE given its column's and row's facts, and their description.
struct Kernel {
    name: &'static str,
    parts: fn(ColumnFacts, RowFacts) -> Parts,
    describe: fn(ColumnFacts, RowFacts) -> String,
}

const FORWARD: Kernel = Kernel {
    name: KERNEL,
    parts: forward_parts,
    describe: describe_forward,
};

const BACKWARD: Kernel = Kernel {
    name: BACKWARD_KERNEL,
    parts: backward_parts,
    describe: describe_backward,
};

/// The fullest PE by `count`: `(f32 elements, column, row)`, the first in row order among
/// equals.
fn fullest_pe(g: &Geometry, count: impl Fn(ColumnFacts, RowFacts) -> u64) -> (u64, usize, usize) {
    let columns: Vec<ColumnFacts> = (0..g.cols).map(|c| ColumnFacts::of(g, c)).collect();
    let rows: Vec<RowFacts> = (0..g.rows).map(|r| RowFacts::of(g, r)).collect();
    let mut worst = (0, 0, 0);
    for (r, row) in rows.iter().enumerate() {
        for (c, col) in columns.iter().enumerate() {
            let elements = count(*col, *row);
            if elements > worst.0 {
                worst = (elements, c, r);
            }
        }
    }
    worst
}

/// The plan, if the fullest PE's buffers of `kernel` fit its SRAM.
fn plan(
    config: &FabricConfig,
    g: &Geometry,
    kernel: &Kernel,
) -> Result<AttentionPlan, KernelError> {
    let (count, c, r) = fullest_pe(g, |col, row| (kernel.parts)(col, row).total());
    let (needed, available) = (4 * count, u64::from(config.sram_bytes));
    if needed > available {
        let what = (kernel.describe)(ColumnFacts::of(g, c), RowFacts::of(g, r));
        return Err(KernelError::DoesNotFit {
            kernel: kernel.name,
            needed,
            available,
            what: format!("PE column {c}, row {r}: {what}"),
            hint: "the K/V window holds at least one whole sequence per PE: use shorter \
                   sequences or more region columns (fewer features per PE)"
                .into(),
        });
    }
    Ok(AttentionPlan {
        tiling: g.tiling,
        head_columns: (0..g.heads).map(|h| g.head_columns(h)).collect(),
        head_dim: g.hd,
        windows: (0..g.rows).map(|r| g.window(r)).collect(),
        sram_bytes: needed,
    })
}

/// Elements of the parts every PE holds in both passes: `(tile of n tokens x F_c, window,
/// probabilities)`.
fn common_parts(col: ColumnFacts, row: RowFacts) -> [u64; 3] {
    let tile = col.fc * row.n;
    let window = 2 * col.fc * row.window;
    [tile, window, col.heads * row.n * row.seq]
}

/// Bytes in a description.
fn bytes(elements: u64) -> String {
    format!("{} B", 4 * elements)
}

/// The forward's f32 elements on a PE: Q, K, V, O tiles, probabilities, and as scratch the
/// window, the softmax rows and the counters.
fn forward_parts(col: ColumnFacts, row: RowFacts) -> Parts {
    let [tile, window, probs] = common_parts(col, row);
    Parts {
        tiles: 4 * tile,
        probs,
        scratch: window + 2 * row.longest + 1 + col.counter,
    }
}

fn describe_forward(col: ColumnFacts, row: RowFacts) -> String {
    let [tile, window, probs] = common_parts(col, row);
    format!(
        "Q, K, V, O tiles {}, K/V window of {} tokens {}, \
         probabilities {} heads x {} tokens x {} keys {}, softmax rows {}, counters {}",
        bytes(4 * tile),
        row.window,
        bytes(window),
        col.heads,
        row.n,
        row.seq,
        bytes(probs),
        bytes(2 * row.longest),
        bytes(1 + col.counter)
    )
}

/// The backward's f32 elements on a PE: Q, K, V tiles, probabilities, and as scratch the dO
/// tile, the window and partial dK/dV, dS and its rows, the shared heads' dP, the dQ, dK, dV
/// tiles and the counters.
fn backward_parts(col: ColumnFacts, row: RowFacts) -> Parts {
    let [tile, window, probs] = common_parts(col, row);
    let ds = row.seq * row.longest + 2 * row.longest;
    let dp = col.shared * row.n * row.seq;
    Parts {
        tiles: 3 * tile,
        probs,
        scratch: tile + 2 * window + ds + dp + 3 * tile + 1 + col.counter,
    }
}

fn describe_backward(col: ColumnFacts, row: RowFacts) -> String {
    let [tile, window, probs] = common_parts(col, row);
    let ds = row.seq * row.longest + 2 * row.longest;
    let dp = col.shared * row.n * row.seq;
    format!(
        "Q, K, V, dO tiles {}, probabilities {}, K/V window and partial dK/dV of {} tokens {}, \
         dS and rows {}, dP of {} shared heads {}, dQ, dK, dV tiles {}, counters {}",
        bytes(4 * tile),
        bytes(probs),
        row.window,
        bytes(2 * window),
        bytes(ds),
        col.shared,
        bytes(dp),
        bytes(3 * tile),
        bytes(1 + col.counter)
    )
}

/// Every PE of the region, row by row: `(column, row)`.
fn region_pes(region: Region) -> impl Iterator<Item = (u32, u32)> {
    (0..region.rows).flat_map(move |r| (0..region.cols).map(move |c| (c, r)))
}

/// PE (c, r)'s view of every row slot of its window, as parts of a column collective: where it
/// sits in `buf` (the window, or the partial dK/dV in the window's layout) and its reach.
fn window_parts(g: &Geometry, c: usize, r: usize, buf: Buf) -> Vec<Part> {
    g.window(r)
        .map(|b| Part {
            owner: b,
            reach: g.reach(b),
            data: buf.slice(g.slot(c, r, b), g.slot_len(c, b)),
        })
        .collect()
}

/// Which heads a buffer of `tokens x keys` blocks holds, one block per head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocks {
    /// Every local head (the probabilities).
    AllHeads,
    /// The shared heads only (the backward's dP).
    SharedHeads,
}

/// The shared heads' blocks of `buf` (`block` elements each, laid out as `blocks` says) as
/// members of their column groups.
fn members(w: &PeWork, buf: Buf, block: u32, blocks: Blocks) -> Vec<Member> {
    w.shared_heads()
        .enumerate()
        .map(|(k, (i, head))| {
            let at = match blocks {
                Blocks::AllHeads => i,
                Blocks::SharedHeads => k as u32,
            };
            Member {
                group: head.group.clone(),
                data: buf.slice(at * block, block),
            }
        })
        .collect()
}

/// The buffers the K/V gather uses on one PE.
#[derive(Clone, Copy, Debug)]
struct GatherBufs {
    k: Buf,
    v: Buf,
    window: Buf,
}

/// The task that copies the PE's K and V into its window slot and starts the all-gather; the
/// join activates the compute task when it is done.
fn place_gather(
    p: &mut Program,
    pe: Coord,
    g: &Geometry,
    (c, r): (usize, usize),
    b: GatherBufs,
    join: Join,
) -> Result<TaskId, BuildError> {
    let own_at = g.slot(c, r, r);
    let half = (g.fc(c) * g.n(r)) as u32;
    let mut parts = window_parts(g, c, r, b.window);
    parts.retain(|part| part.owner != r);
    let reach = g.reach(r);
    p.local_task(pe, "gather_kv", move |ctx| {
        ctx.mov(b.window.slice(own_at, half), b.k.all());
        ctx.mov(b.window.slice(own_at + half, half), b.v.all());
        let own = b.window.slice(own_at, 2 * half);
        let ops = GATHER.all_gather(r, &parts, own, reach.clone());
        join::issue(ctx, &ops, &join);
    })
}

/// The final contents of a buffer the kernel placed.
fn read(executed: &Executed, pe: Coord, buf: Buf) -> Vec<f32> {
    executed
        .read(pe, buf)
        .expect("the kernel placed this buffer on this PE")
}

impl Attention<'_> {
    fn checked(&self, config: &FabricConfig) -> Result<Geometry, KernelError> {
        let g = geometry(KERNEL, config, self.region, &self.shape)?;
        let lengths = [
            ("Q", self.q.len()),
            ("K", self.k.len()),
            ("V", self.v.len()),
        ];
        let want = self.shape.tokens().saturating_mul(self.shape.features);
        check_lengths(KERNEL, &lengths, want, "tokens x features")?;
        Ok(g)
    }

    /// Checks the shapes and that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<AttentionPlan, KernelError> {
        plan(config, &self.checked(config)?, &FORWARD)
    }

    /// The program, the plan, and each PE's output buffers (PEs row by row).
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, AttentionPlan, Vec<ForwardBuffers>), KernelError> {
        let g = self.checked(config)?;
        let plan = plan(config, &g, &FORWARD)?;
        let mut p = Program::new(config.clone())?;
        let mut outputs = Vec::new();
        for (c, r) in region_pes(self.region) {
            outputs.push(self.place_pe(&mut p, &g, c, r)?);
        }
        Ok((p, plan, outputs))
    }

    /// Builds, runs and reads back `O` and `P`.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<AttentionRun, KernelError> {
        let g = self.checked(config)?;
        let (program, plan, outputs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let mut out = vec![0.0; self.shape.tokens() * self.shape.features];
        let mut probs = vec![0.0; self.shape.probs_len()];
        for ((c, r), bufs) in region_pes(self.region).zip(outputs) {
            let pe = self.region.pe(c, r);
            let (cu, ru) = (c as usize, r as usize);
            g.tiling
                .untile(&read(&executed, pe, bufs.out), &mut out, cu, ru);
            let tile = read(&executed, pe, bufs.probs);
            let indices = g.probs_indices(cu, ru);
            let block = g.head_block_len(ru).max(1);
            let heads = g.local_heads(cu);
            let chunks = tile.chunks(block).zip(indices.chunks(block));
            // A head over several columns has the same probabilities on each: read its first.
            for (head, (values, at)) in heads.iter().zip(chunks) {
                if head.group.start == cu {
                    for (&value, &i) in values.iter().zip(at) {
                        probs[i] = value;
                    }
                }
            }
        }
        Ok(AttentionRun {
            out,
            probs,
            plan,
            stats: executed.stats,
        })
    }

    /// Cycles the forward takes by the analytic formula (module doc, "Cost"), or why the region
    /// refuses the shape.
    pub fn estimate_cycles(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        self.estimate(config, Pass::Forward)
    }

    fn estimate(&self, config: &FabricConfig, pass: Pass) -> Result<u64, KernelError> {
        let g = geometry(KERNEL, config, self.region, &self.shape)?;
        Ok(cost::total(config, &g, pass))
    }

    /// Buffers, routes and tasks of PE (c, r).
    fn place_pe(
        &self,
        p: &mut Program,
        g: &Geometry,
        c: u32,
        r: u32,
    ) -> Result<ForwardBuffers, KernelError> {
        let pe = self.region.pe(c, r);
        let (cu, ru) = (c as usize, r as usize);
        let tile = |m: &[f32]| g.tiling.tile(m, cu, ru);
        let (n, longest, fc) = (g.n(ru), g.longest_segment(ru), g.fc(cu));
        let q = p.alloc_f32(pe, "q", &tile(self.q))?;
        let k = p.alloc_f32(pe, "k", &tile(self.k))?;
        let v = p.alloc_f32(pe, "v", &tile(self.v))?;
        let bufs = ForwardBufs {
            q,
            out: p.alloc_zeros(pe, "out", DType::F32, fc * n)?,
            window: p.alloc_zeros(pe, "kv_window", DType::F32, 2 * fc * g.window_tokens(ru))?,
            probs: p.alloc_zeros(pe, "probs", DType::F32, g.probs_len(cu, ru))?,
            max: p.alloc_zeros(pe, "row_max", DType::F32, longest)?,
            sum: p.alloc_zeros(pe, "row_sum", DType::F32, longest)?,
        };
        let work = g.work(cu, ru, self.shape.scale);
        let members = members(
            &work,
            bufs.probs,
            g.head_block_len(ru) as u32,
            Blocks::AllHeads,
        );
        GATHER.install(p, self.region, c, r)?;
        SUMS.install(p, self.region, (c, r), &members)?;

        // The shared heads' softmax and context, once their scores are summed.
        let sums = if members.is_empty() {
            None
        } else {
            let rest = work.clone();
            let task = p.local_task(pe, "attention_shared", move |ctx| {
                pe::forward_shared_rest(ctx, &rest, &bufs)
            })?;
            Some(SUMS.place(p, pe, cu, &members, task)?)
        };
        let compute_id = TaskId(p.next_task_id(pe)?.0 + ARMS as u16);
        let join = Join::place(p, pe, compute_id)?;
        let compute = p.local_task(pe, "attention", move |ctx| {
            pe::forward_shared_scores(ctx, &work, &bufs);
            issue_sums(ctx, sums.as_ref());
            pe::forward_whole(ctx, &work, &bufs);
        })?;
        debug_assert_eq!(compute, compute_id);
        let gather = GatherBufs {
            k,
            v,
            window: bufs.window,
        };
        let start = place_gather(p, pe, g, (cu, ru), gather, join)?;
        p.activate(pe, start)?;
        Ok(ForwardBuffers {
            out: bufs.out,
            probs: bufs.probs,
        })
    }
}

/// Starts the PE's part of the group sums, if it takes part in any.
fn issue_sums(ctx: &mut wafersim_sim::TaskCtx<'_>, sums: Option<&GroupPart>) {
    if let Some(part) = sums {
        part.issue(ctx);
    }
}

impl AttentionBackward<'_> {
    fn checked(&self, config: &FabricConfig) -> Result<Geometry, KernelError> {
        let g = geometry(BACKWARD_KERNEL, config, self.region, &self.shape)?;
        let lengths = [
            ("Q", self.q.len()),
            ("K", self.k.len()),
            ("V", self.v.len()),
            ("dO", self.d_out.len()),
        ];
        let want = self.shape.tokens().saturating_mul(self.shape.features);
        check_lengths(BACKWARD_KERNEL, &lengths, want, "tokens x features")?;
        let probs = [("P", self.probs.len())];
        let want = self.shape.probs_len();
        check_lengths(
            BACKWARD_KERNEL,
            &probs,
            want,
            "batch x heads x seq_len x seq_len",
        )?;
        Ok(g)
    }

    /// Checks the shapes and that every PE's buffers fit its SRAM.
    pub fn plan(&self, config: &FabricConfig) -> Result<AttentionPlan, KernelError> {
        plan(config, &self.checked(config)?, &BACKWARD)
    }

    /// The program, the plan, and each PE's output buffers (PEs row by row).
    pub fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, AttentionPlan, Vec<BackwardBuffers>), KernelError> {
        let g = self.checked(config)?;
        let plan = plan(config, &g, &BACKWARD)?;
        let mut p = Program::new(config.clone())?;
        let mut outputs = Vec::new();
        for (c, r) in region_pes(self.region) {
            outputs.push(self.place_pe(&mut p, &g, c, r)?);
        }
        Ok((p, plan, outputs))
    }

    /// Builds, runs and reads back `dQ`, `dK`, `dV`.
    pub fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<AttentionGrads, KernelError> {
        let g = self.checked(config)?;
        let (program, plan, outputs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let len = self.shape.tokens() * self.shape.features;
        let (mut dq, mut dk, mut dv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
        for ((c, r), bufs) in region_pes(self.region).zip(outputs) {
            let pe = self.region.pe(c, r);
            let (cu, ru) = (c as usize, r as usize);
            g.tiling
                .untile(&read(&executed, pe, bufs.dq), &mut dq, cu, ru);
            let dkv = read(&executed, pe, bufs.dkv);
            let (k_tile, v_tile) = dkv.split_at(dkv.len() / 2);
            g.tiling.untile(k_tile, &mut dk, cu, ru);
            g.tiling.untile(v_tile, &mut dv, cu, ru);
        }
        Ok(AttentionGrads {
            dq,
            dk,
            dv,
            plan,
            stats: executed.stats,
        })
    }

    /// Cycles the backward takes by the analytic formula (module doc, "Cost"), or why the
    /// region refuses the shape.
    pub fn estimate_cycles(&self, config: &FabricConfig) -> Result<u64, KernelError> {
        let g = geometry(BACKWARD_KERNEL, config, self.region, &self.shape)?;
        Ok(cost::total(config, &g, Pass::Backward))
    }

    /// Buffers, routes and tasks of PE (c, r).
    fn place_pe(
        &self,
        p: &mut Program,
        g: &Geometry,
        c: u32,
        r: u32,
    ) -> Result<BackwardBuffers, KernelError> {
        let pe = self.region.pe(c, r);
        let (cu, ru) = (c as usize, r as usize);
        let tile = |m: &[f32]| g.tiling.tile(m, cu, ru);
        let (n, longest, fc) = (g.n(ru), g.longest_segment(ru), g.fc(cu));
        let window_len = 2 * fc * g.window_tokens(ru);
        let probs: Vec<f32> = g
            .probs_indices(cu, ru)
            .into_iter()
            .map(|i| self.probs[i])
            .collect();
        let k = p.alloc_f32(pe, "k", &tile(self.k))?;
        let v = p.alloc_f32(pe, "v", &tile(self.v))?;
        let bufs = BackwardBufs {
            q: p.alloc_f32(pe, "q", &tile(self.q))?,
            d_out: p.alloc_f32(pe, "d_out", &tile(self.d_out))?,
            probs: p.alloc_f32(pe, "probs", &probs)?,
            window: p.alloc_zeros(pe, "kv_window", DType::F32, window_len)?,
            partial: p.alloc_zeros(pe, "dkv_partial", DType::F32, window_len)?,
            dq: p.alloc_zeros(pe, "dq", DType::F32, fc * n)?,
            ds: p.alloc_zeros(pe, "ds", DType::F32, g.seq * longest)?,
            rowsum: p.alloc_zeros(pe, "rowsum", DType::F32, longest)?,
            tmp: p.alloc_zeros(pe, "row_tmp", DType::F32, longest)?,
        };
        let dkv = p.alloc_zeros(pe, "dkv", DType::F32, 2 * fc * n)?;
        let work = g.work(cu, ru, self.shape.scale);
        let shared = work.shared_heads().count();
        let block = g.head_block_len(ru);
        let dp = if shared > 0 {
            Some(p.alloc_zeros(pe, "dp_shared", DType::F32, shared * block)?)
        } else {
            None
        };
        let members = dp.map_or_else(Vec::new, |dp| {
            members(&work, dp, block as u32, Blocks::SharedHeads)
        });
        GATHER.install(p, self.region, c, r)?;
        REDUCE.install(p, self.region, c, r)?;
        SUMS.install(p, self.region, (c, r), &members)?;

        let reduce = ReduceStep::new(g, (cu, ru), bufs.partial, dkv);
        // The shared heads' dS, dQ and partial dK, dV once their dP is summed, then the
        // reduce-scatter.
        let sums = match dp {
            None => None,
            Some(dp) => {
                let (rest, reduce) = (work.clone(), reduce.clone());
                let task = p.local_task(pe, "attention_backward_shared", move |ctx| {
                    pe::backward_shared_rest(ctx, &rest, &bufs, dp);
                    reduce.issue(ctx);
                })?;
                Some((SUMS.place(p, pe, cu, &members, task)?, dp))
            }
        };
        let compute_id = TaskId(p.next_task_id(pe)?.0 + ARMS as u16);
        let join = Join::place(p, pe, compute_id)?;
        let compute = p.local_task(pe, "attention_backward", move |ctx| {
            if let Some((part, dp)) = &sums {
                pe::backward_shared_dp(ctx, &work, &bufs, *dp);
                part.issue(ctx);
            }
            pe::backward_whole(ctx, &work, &bufs);
            if sums.is_none() {
                reduce.issue(ctx);
            }
        })?;
        debug_assert_eq!(compute, compute_id);
        let gather = GatherBufs {
            k,
            v,
            window: bufs.window,
        };
        let start = place_gather(p, pe, g, (cu, ru), gather, join)?;
        p.activate(pe, start)?;
        Ok(BackwardBuffers { dq: bufs.dq, dkv })
    }
}

/// One PE's part of the dK/dV reduce-scatter, issued when its compute is done.
#[derive(Clone, Debug)]
struct ReduceStep {
    r: usize,
    own: VecRef,
    result: Buf,
    parts: Vec<Part>,
}

impl ReduceStep {
    fn new(g: &Geometry, (c, r): (usize, usize), partial: Buf, result: Buf) -> Self {
        ReduceStep {
            r,
            own: partial.slice(g.slot(c, r, r), g.slot_len(c, r)),
            result,
            parts: window_parts(g, c, r, partial),
        }
    }

    /// Copies the PE's own partial sums into its result and starts the collective; nothing
    /// waits for it.
    fn issue(&self, ctx: &mut wafersim_sim::TaskCtx<'_>) {
        ctx.mov(self.result.all(), self.own);
        for op in REDUCE.reduce_scatter(self.r, &self.parts, self.result.all()) {
            ctx.issue(op, Then::Nothing);
        }
    }
}
