//! The instruction sequences one PE runs in the blocked backward: a prelude (the per-token
//! `D = rowsum(dO * O)` and the reciprocals of the forward's sums), then per run the
//! probabilities of the run's keys recomputed from the forward's statistics, `dP`, `dS`, `dQ`,
//! and the partial `dK`, `dV` of the run's keys (FlashAttention-2's backward).
//!
//! Per local head, key `j` of the run and token `t`:
//!
//! ```text
//! p = exp(scale s - m) / l        dP = dO_t . v_j        dS = p (dP - D_t) scale
//! dQ_t += dS k_j                  dK_j += dS q_t         dV_j += p dO_t
//! ```
//!
//! with `D_t = sum_j p_j dP_j = dO_t . O_t` over the head's features, the identity that lets
//! each block be finished on its own. A head over several columns sums its partial scores and
//! `dP` along the row, like the unblocked backward.
//!
//! What it is not: no routing or collective. Matmul work uses `fmac` and `dot` only: per head,
//! segment and run, the recomputed scores, `dP`, `dQ`, `dK` and `dV`, `keys x dims x len` each,
//! so the runs together execute the unblocked backward's FMACs plus one `Q K^T` (the
//! recompute). The prelude's `dO * O` is `mul` and `add`, not FMAC work.
//!
//! Key design decision: the scores and `dP` of one head and run lie side by side
//! (`[scores | dP]`), so a shared head's group sum carries both in one collective.

use wafersim_sim::{Buf, TaskCtx, VecRef};

use super::blocks::{RunSegment, RunWork};
use super::geometry::LocalHead;
use super::online::scale_and_mask;
use super::pe::sub;

/// The buffers of the prelude on one PE.
#[derive(Clone, Copy, Debug)]
pub(super) struct PreludeBufs {
    pub d_out: Buf,
    pub out: Buf,
    /// `D` per local head and token, `[head][token]`.
    pub delta: Buf,
    /// The forward's sums, replaced by their reciprocals.
    pub sum: Buf,
    /// A row of the PE's tokens.
    pub tmp: Buf,
}

/// The buffers of one run of the blocked backward on one PE.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackwardRunBufs {
    pub q: Buf,
    pub d_out: Buf,
    /// The forward's maxima, the reciprocals of its sums and `D`, `[head][token]` each.
    pub max: Buf,
    pub recip_sum: Buf,
    pub delta: Buf,
    /// The run's K and V slots, and the partial dK, dV of its keys in the same layout.
    pub window: Buf,
    pub partial: Buf,
    /// Per local head `[scores | dP]` of the run's keys (`2 x head_scores`): scores, then
    /// probabilities; dP, then dS.
    pub work: Buf,
    /// The dQ accumulated over the runs, feature-major.
    pub dq: Buf,
}

/// The PE's tokens of local feature `f` in a feature-major tile of `n` tokens.
fn feature(tile: Buf, f: u32, n: u32) -> VecRef {
    tile.slice(f * n, n)
}

/// The partial `D` of every local head over the PE's features, for the shared heads (run first,
/// so their sums can travel) or the whole ones.
pub(super) fn prelude_partial_delta(
    ctx: &mut TaskCtx<'_>,
    heads: &[LocalHead],
    n: u32,
    b: &PreludeBufs,
    shared: bool,
) {
    let tmp = b.tmp.slice(0, n);
    for (i, head) in heads.iter().enumerate() {
        if head.shared() != shared {
            continue;
        }
        let delta = b.delta.slice(i as u32 * n, n);
        for f in head.first..head.first + head.dims {
            ctx.mul(tmp, feature(b.d_out, f, n), feature(b.out, f, n));
            ctx.add(delta, delta, tmp);
        }
    }
}

/// The reciprocals of the forward's sums, in place: one per local head and token.
pub(super) fn prelude_reciprocals(ctx: &mut TaskCtx<'_>, heads: usize, n: u32, b: &PreludeBufs) {
    for at in 0..heads as u32 * n {
        let l = ctx.load(b.sum.at(at));
        let r = ctx.recip(l);
        ctx.store(b.sum.at(at), r);
    }
}

impl RunWork {
    /// Local head `i`'s scores (`dp: false`) or dP (`dp: true`) block of `seg`, `[key][token]`.
    fn work_block(&self, work: Buf, i: u32, seg: &RunSegment, dp: bool) -> VecRef {
        let half = if dp { self.head_scores } else { 0 };
        work.slice(
            2 * i * self.head_scores + half + seg.scores_at,
            seg.keys.len() as u32 * seg.len,
        )
    }

    /// Local head `i`'s `[scores | dP]` of every segment: what a shared head sums over its
    /// columns.
    pub(super) fn head_work(&self, work: Buf, i: u32) -> VecRef {
        work.slice(2 * i * self.head_scores, 2 * self.head_scores)
    }
}

/// The partial scores and dP of the heads shared with other columns.
pub(super) fn shared_partials(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &BackwardRunBufs) {
    for (i, head) in w.shared_heads() {
        for seg in &w.segments {
            products(ctx, w, b, i, head, seg);
        }
    }
}

/// Everything for the heads the PE holds whole.
pub(super) fn whole(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &BackwardRunBufs) {
    for (i, head) in w.whole_heads() {
        for seg in &w.segments {
            products(ctx, w, b, i, head, seg);
            gradients(ctx, w, b, i, head, seg);
        }
    }
}

/// The rest for the shared heads, whose scores and dP now hold the full sums.
pub(super) fn shared_rest(ctx: &mut TaskCtx<'_>, w: &RunWork, b: &BackwardRunBufs) {
    for (i, head) in w.shared_heads() {
        for seg in &w.segments {
            gradients(ctx, w, b, i, head, seg);
        }
    }
}

/// The scores `q_t . k_j` and `dP = dO_t . v_j` over the head's features on the PE.
fn products(
    ctx: &mut TaskCtx<'_>,
    w: &RunWork,
    b: &BackwardRunBufs,
    i: u32,
    head: &LocalHead,
    seg: &RunSegment,
) {
    let (scores, dp) = (
        w.work_block(b.work, i, seg, false),
        w.work_block(b.work, i, seg, true),
    );
    for (j, key) in seg.keys.iter().enumerate() {
        let (s_row, dp_row) = (
            sub(scores, j as u32 * seg.len, seg.len),
            sub(dp, j as u32 * seg.len, seg.len),
        );
        for f in head.first..head.first + head.dims {
            let k = ctx.load(b.window.at(key.at.k(f)));
            ctx.fmac(s_row, w.tokens(b.q, f, seg), k);
            let v = ctx.load(b.window.at(key.at.v(f, w.fc)));
            ctx.fmac(dp_row, w.tokens(b.d_out, f, seg), v);
        }
    }
}

/// From full scores and dP: the probabilities, dS, then dQ and the partial dK, dV.
fn gradients(
    ctx: &mut TaskCtx<'_>,
    w: &RunWork,
    b: &BackwardRunBufs,
    i: u32,
    head: &LocalHead,
    seg: &RunSegment,
) {
    let len = seg.len;
    let (p, ds) = (
        w.work_block(b.work, i, seg, false),
        w.work_block(b.work, i, seg, true),
    );
    let row = |block: VecRef, j: usize| sub(block, j as u32 * len, len);
    // p = exp(scale s - m) / l, 0 for a key in the token's future.
    scale_and_mask(ctx, w.scale, seg, p);
    let m = w.statistic(b.max, i, seg);
    for j in 0..seg.keys.len() {
        ctx.sub(row(p, j), row(p, j), m);
    }
    ctx.exp(p, p);
    let recip = w.statistic(b.recip_sum, i, seg);
    for j in 0..seg.keys.len() {
        ctx.mul(row(p, j), row(p, j), recip);
    }
    // dS = p (dP - D) scale.
    let delta = w.statistic(b.delta, i, seg);
    for j in 0..seg.keys.len() {
        ctx.sub(row(ds, j), row(ds, j), delta);
    }
    ctx.mul(ds, ds, p);
    ctx.scale(ds, ds, w.scale);
    for f in head.first..head.first + head.dims {
        let dst = w.tokens(b.dq, f, seg);
        for (j, key) in seg.keys.iter().enumerate() {
            let k = ctx.load(b.window.at(key.at.k(f)));
            ctx.fmac(dst, row(ds, j), k);
        }
    }
    for (j, key) in seg.keys.iter().enumerate() {
        for f in head.first..head.first + head.dims {
            let dk = ctx.dot(row(ds, j), w.tokens(b.q, f, seg));
            ctx.store(b.partial.at(key.at.k(f)), dk);
            let dv = ctx.dot(row(p, j), w.tokens(b.d_out, f, seg));
            ctx.store(b.partial.at(key.at.v(f, w.fc)), dv);
        }
    }
}
