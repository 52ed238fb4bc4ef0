//! The instruction sequences one PE runs in one run of the blocked forward: the scores of the
//! keys the run brings, the online softmax update (FlashAttention's running max and sum, the
//! output rescaled), the context, and in the PE's last run the normalisation.
//!
//! Per local head and token the PE keeps a running maximum `m` (starting at `f32::MIN`, not
//! `-inf`, so that a run whose keys are all in a token's future gives `exp(m - m) = 1` and never
//! `exp(-inf + inf)`) and a running sum `l` of `exp(score - m)`; its output tile holds the
//! unnormalised `sum_j exp(s_j - m) v_j`. A run with keys `J`, for each token:
//!
//! ```text
//! m' = max(m, max_{j in J} s_j)      a = exp(m - m')
//! p_j = exp(s_j - m')                l' = a l + sum_j p_j      O' = a O + sum_j p_j v_j
//! ```
//!
//! and the last run divides `O` by `l`. Keys in a token's future score `-inf`, so `p_j = 0`.
//!
//! What it is not: no routing or collective (the run's K and V are in the block window), and
//! no backward. Matmul work uses `fmac` only, exactly `2 x keys x dims x len` per head, segment
//! and run, so the runs together execute the unblocked forward's FMACs.
//!
//! Key design decision: the same vector shapes as the unblocked kernel (`pe.rs`): every vector
//! runs over the tokens of one sequence segment and scores are key-major, so a key's scores are
//! one contiguous vector and a head's block is one vector for `scale` and `exp`.

use wafersim_sim::{Buf, TaskCtx, VecRef};

use super::blocks::{RunSegment, RunWork};
use super::geometry::LocalHead;
use super::pe::sub;

/// The buffers of one run of the blocked forward on one PE.
#[derive(Clone, Copy, Debug)]
pub(super) struct OnlineBufs {
    pub q: Buf,
    /// The unnormalised output tile (normalised by the last run), feature-major.
    pub out: Buf,
    /// The run's K and V slots.
    pub window: Buf,
    /// Scores, then probabilities, of the run's keys: per local head `head_scores` elements.
    pub scores: Buf,
    /// Running maximum and sum per local head and token: `[head][token]`.
    pub max: Buf,
    pub sum: Buf,
    /// Scratch rows: the new maximum and the run's sum (of the longest segment), and the
    /// rescale factor (of all the PE's tokens: the last run puts the reciprocals of the sums
    /// there).
    pub new_max: Buf,
    pub run_sum: Buf,
    pub rescale: Buf,
}

impl RunWork {
    /// Local head `i`'s scores of `seg`, `[key][token]`.
    fn block(&self, scores: Buf, i: u32, seg: &RunSegment) -> VecRef {
        scores.slice(
            i * self.head_scores + seg.scores_at,
            seg.keys.len() as u32 * seg.len,
        )
    }
}

/// The partial scores of the heads shared with other columns, over the PE's features.
pub(super) fn shared_scores(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &OnlineBufs) {
    for (i, head) in w.shared_heads() {
        for seg in &w.segments {
            scores(ctx, w, b, head, seg, w.block(b.scores, i, seg));
        }
    }
}

/// Scores, update and context for every head the PE holds whole.
pub(super) fn whole(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &OnlineBufs) {
    for (i, head) in w.whole_heads() {
        for seg in &w.segments {
            let block = w.block(b.scores, i, seg);
            scores(ctx, w, b, head, seg, block);
            update(ctx, w, b, i, seg, block);
            context(ctx, w, b, head, seg, block);
        }
    }
}

/// Update and context for the shared heads, whose scores now hold the full sums.
pub(super) fn shared_rest(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &OnlineBufs) {
    for (i, head) in w.shared_heads() {
        for seg in &w.segments {
            let block = w.block(b.scores, i, seg);
            update(ctx, w, b, i, seg, block);
            context(ctx, w, b, head, seg, block);
        }
    }
}

/// The last run's normalisation: `O[f, t] /= l[t]` for every local head, over all the PE's
/// tokens (one reciprocal per token and head; the sums stay, for the backward).
pub(super) fn normalise(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &OnlineBufs) {
    let reciprocals = b.rescale.slice(0, w.n);
    for (i, head) in w.heads.iter().enumerate() {
        for t in 0..w.n {
            let l = ctx.load(b.sum.at(i as u32 * w.n + t));
            let r = ctx.recip(l);
            ctx.store(b.rescale.at(t), r);
        }
        for f in head.first..head.first + head.dims {
            let row = b.out.slice(f * w.n, w.n);
            ctx.mul(row, row, reciprocals);
        }
    }
}

/// `block[j][t] = q_t . k_j` over the head's features on the PE, for the run's keys.
fn scores(
    ctx: &mut TaskCtx<'_>,
    w: &RunWork,
    b: &OnlineBufs,
    head: &LocalHead,
    seg: &RunSegment,
    block: VecRef,
) {
    for (j, key) in seg.keys.iter().enumerate() {
        let row = sub(block, j as u32 * seg.len, seg.len);
        for f in head.first..head.first + head.dims {
            let k = ctx.load(b.window.at(key.at.k(f)));
            ctx.fmac(row, w.tokens(b.q, f, seg), k);
        }
    }
}

/// Scales and masks the run's scores, then folds them into the running maximum and sum of
/// local head `i`, leaving `p_j = exp(s_j - m')` in the block and the rescale factor
/// `a = exp(m - m')` in `b.rescale`.
fn update(
    ctx: &mut TaskCtx<'_>,
    w: &RunWork,
    b: &OnlineBufs,
    i: u32,
    seg: &RunSegment,
    block: VecRef,
) {
    let len = seg.len;
    let row = |j: usize| sub(block, j as u32 * len, len);
    scale_and_mask(ctx, w.scale, seg, block);
    let (m, l) = (w.statistic(b.max, i, seg), w.statistic(b.sum, i, seg));
    let (new_max, rescale, run_sum) = (
        b.new_max.slice(0, len),
        b.rescale.slice(0, len),
        b.run_sum.slice(0, len),
    );
    ctx.mov(new_max, row(0));
    for j in 1..seg.keys.len() {
        ctx.max(new_max, new_max, row(j));
    }
    ctx.max(new_max, new_max, m);
    ctx.sub(rescale, m, new_max);
    ctx.exp(rescale, rescale);
    ctx.mov(m, new_max);
    for j in 0..seg.keys.len() {
        ctx.sub(row(j), row(j), new_max);
    }
    ctx.exp(block, block);
    ctx.mov(run_sum, row(0));
    for j in 1..seg.keys.len() {
        ctx.add(run_sum, run_sum, row(j));
    }
    ctx.mul(l, l, rescale);
    ctx.add(l, l, run_sum);
}

/// Scales a segment's `[key][token]` scores and sets those of keys in a token's future to
/// `-inf`.
pub(super) fn scale_and_mask(ctx: &mut TaskCtx<'_>, scale: f32, seg: &RunSegment, block: VecRef) {
    let len = seg.len;
    ctx.scale(block, block, scale);
    for (j, key) in seg.keys.iter().enumerate() {
        // Token t (position first_pos + t) may not see a key at a later position.
        if key.pos > seg.first_pos {
            let masked = (key.pos - seg.first_pos).min(len);
            ctx.fill(sub(block, j as u32 * len, masked), f32::NEG_INFINITY);
        }
    }
}

/// `O[f, tokens] = a O[f, tokens] + sum_j p_j v_j[f]` for the head's features on the PE.
fn context(
    ctx: &mut TaskCtx<'_>,
    w: &RunWork,
    b: &OnlineBufs,
    head: &LocalHead,
    seg: &RunSegment,
    block: VecRef,
) {
    let rescale = b.rescale.slice(0, seg.len);
    for f in head.first..head.first + head.dims {
        let dst = w.tokens(b.out, f, seg);
        ctx.mul(dst, dst, rescale);
        for (j, key) in seg.keys.iter().enumerate() {
            let v = ctx.load(b.window.at(key.at.v(f, w.fc)));
            ctx.fmac(dst, sub(block, j as u32 * seg.len, seg.len), v);
        }
    }
}
