//! The instruction sequences one PE runs for its heads and tokens: scores, masked softmax and
//! context (forward); dP, the softmax gradient, dQ and the partial dK, dV (backward).
//!
//! A head may lie on several PE columns (the region's columns split the features, not the
//! heads): the PE then holds some of the head's features (`LocalHead::dims` of them), its
//! products over them are partial, and the forward's scores and the backward's dP must be summed
//! over the head's columns before the softmax (or its gradient) sees them. So each pass comes in
//! three pieces: the partial products of the shared heads (run first, so their sums can travel
//! while the PE works on), everything for the heads the PE holds whole, and the rest of the
//! shared heads once their sums are back. The context `P V`, `dQ`, `dK` and `dV` need only the
//! PE's own features, given `P` and `dS`.
//!
//! What it is not: no routing or collective; the K and V of every key the PE needs are already
//! in its window when these run. Matmul work (the four products counted by the FLOP convention)
//! uses `fmac` and `dot` only; softmax and its gradient use `scale`, `fill`, `max`, `sub`, `exp`,
//! `add`, `mul` and scalar reciprocals, never an FMAC instruction.
//!
//! Key design decision: every vector runs over the PE's tokens of one sequence segment
//! (feature-major tiles make `Q[f, tokens]` one contiguous vector, as the simulator's vectors
//! have no stride), and scores are kept key-major, `[key][token]`, so a key's scores for the
//! segment are one vector too and a whole block is one vector for `scale`, `exp` and `mul`.

use wafersim_sim::{Buf, TaskCtx, VecRef};

use super::geometry::{LocalHead, PeWork, Segment};

/// Elements `offset .. offset + len` of `v`.
pub(super) fn sub(v: VecRef, offset: u32, len: u32) -> VecRef {
    VecRef {
        buf: v.buf,
        offset: v.offset + offset,
        len,
    }
}

/// Key `j`'s scores for a segment of `len` tokens, in a key-major block.
fn key_row(block: VecRef, j: u32, len: u32) -> VecRef {
    sub(block, j * len, len)
}

impl PeWork {
    /// Head `h` (an index among the heads the buffer holds), segment `seg`: its `[key][token]`
    /// block of a `heads x tokens x keys` buffer.
    fn block(&self, buf: Buf, h: u32, seg: &Segment) -> VecRef {
        buf.slice(
            h * self.seq * self.n + self.seq * seg.start,
            self.seq * seg.len,
        )
    }

    /// Local feature `f` of the segment's tokens in a feature-major tile.
    fn tokens(&self, tile: Buf, f: u32, seg: &Segment) -> VecRef {
        tile.slice(f * self.n + seg.start, seg.len)
    }

    /// Key `j` of the segment's sequence: loads its K value of local feature `f` from the window.
    fn k_value(&self, ctx: &mut TaskCtx<'_>, window: Buf, seg: &Segment, j: u32, f: u32) -> f32 {
        let key = self.keys[(seg.keys + j) as usize];
        ctx.load(window.at(key.k(f)))
    }

    /// Key `j` of the segment's sequence: loads its V value of local feature `f` from the window.
    fn v_value(&self, ctx: &mut TaskCtx<'_>, window: Buf, seg: &Segment, j: u32, f: u32) -> f32 {
        let key = self.keys[(seg.keys + j) as usize];
        ctx.load(window.at(key.v(f, self.fc)))
    }
}

/// The buffers of the forward on one PE.
#[derive(Clone, Copy, Debug)]
pub(super) struct ForwardBufs {
    pub q: Buf,
    pub out: Buf,
    pub window: Buf,
    pub probs: Buf,
    /// Row maxima, then row sums, of one segment.
    pub max: Buf,
    pub sum: Buf,
}

/// The partial scores of the heads shared with other columns, over the PE's features.
pub(super) fn forward_shared_scores(ctx: &mut TaskCtx<'_>, w: &PeWork, b: &ForwardBufs) {
    for (i, head) in w.shared_heads() {
        for seg in &w.segments {
            scores(ctx, w, b, head, seg, w.block(b.probs, i, seg));
        }
    }
}

/// Scores, masked softmax and context for every head the PE holds whole.
pub(super) fn forward_whole(ctx: &mut TaskCtx<'_>, w: &PeWork, b: &ForwardBufs) {
    for (i, head) in w.whole_heads() {
        for seg in &w.segments {
            let block = w.block(b.probs, i, seg);
            scores(ctx, w, b, head, seg, block);
            softmax(ctx, w, seg, block, b.max, b.sum);
            context(ctx, w, b, head, seg, block);
        }
    }
}

/// Masked softmax and context for the shared heads, whose scores now hold the full sums.
pub(super) fn forward_shared_rest(ctx: &mut TaskCtx<'_>, w: &PeWork, b: &ForwardBufs) {
    for (i, head) in w.shared_heads() {
        for seg in &w.segments {
            let block = w.block(b.probs, i, seg);
            softmax(ctx, w, seg, block, b.max, b.sum);
            context(ctx, w, b, head, seg, block);
        }
    }
}

/// `block[j][t] = q_t . k_j` over the head's features on the PE, for every key of the
/// sequence, future ones included.
fn scores(
    ctx: &mut TaskCtx<'_>,
    w: &PeWork,
    b: &ForwardBufs,
    head: &LocalHead,
    seg: &Segment,
    block: VecRef,
) {
    for j in 0..w.seq {
        let row = key_row(block, j, seg.len);
        for f in head.first..head.first + head.dims {
            let k = w.k_value(ctx, b.window, seg, j, f);
            ctx.fmac(row, w.tokens(b.q, f, seg), k);
        }
    }
}
/// Scales the scores, masks future keys to `-inf`, and turns each token's scores into
/// probabilities: subtract the maximum, exponentiate, divide by the sum.
fn softmax(ctx: &mut TaskCtx<'_>, w: &PeWork, seg: &Segment, block: VecRef, max: Buf, sum: Buf) {
    let len = seg.len;
    ctx.scale(block, block, w.scale);
    for j in seg.first_pos + 1..w.seq {
        // Token t (position first_pos + t) may not see key j > first_pos + t.
        let masked = (j - seg.first_pos).min(len);
        ctx.fill(sub(block, j * len, masked), f32::NEG_INFINITY);
    }
    let (m, l) = (max.slice(0, len), sum.slice(0, len));
    ctx.mov(m, key_row(block, 0, len));
    for j in 1..w.seq {
        ctx.max(m, m, key_row(block, j, len));
    }
    for j in 0..w.seq {
        let row = key_row(block, j, len);
        ctx.sub(row, row, m);
    }
    ctx.exp(block, block);
    ctx.mov(l, key_row(block, 0, len));
    for j in 1..w.seq {
        ctx.add(l, l, key_row(block, j, len));
    }
    for t in 0..len {
        let x = ctx.load(sum.at(t));
        let r = ctx.recip(x);
        ctx.store(sum.at(t), r);
    }
    for j in 0..w.seq {
        let row = key_row(block, j, len);
        ctx.mul(row, row, l);
    }
}

/// `out[f, tokens] += p_j v_j[f]` over every key, for the head's features on the PE (AXPYs
/// over the segment's tokens).
fn context(
    ctx: &mut TaskCtx<'_>,
    w: &PeWork,
    b: &ForwardBufs,
    head: &LocalHead,
    seg: &Segment,
    block: VecRef,
) {
    for f in head.first..head.first + head.dims {
        let dst = w.tokens(b.out, f, seg);
        for j in 0..w.seq {
            let v = w.v_value(ctx, b.window, seg, j, f);
            ctx.fmac(dst, key_row(block, j, seg.len), v);
        }
    }
}

/// The buffers of the backward on one PE.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackwardBufs {
    pub q: Buf,
    pub d_out: Buf,
    pub probs: Buf,
    pub window: Buf,
    /// Partial dK, dV of every window key, in the window's layout.
    pub partial: Buf,
    pub dq: Buf,
    /// dP, then dS, of one segment: `[key][token]`.
    pub ds: Buf,
    /// Per-token sums of `P * dP`, and a scratch row.
    pub rowsum: Buf,
    pub tmp: Buf,
}

/// The partial dP of the shared heads over the PE's features, into `dp` (one
/// `tokens x keys` block per shared head, in the probabilities' layout).
pub(super) fn backward_shared_dp(ctx: &mut TaskCtx<'_>, w: &PeWork, b: &BackwardBufs, dp: Buf) {
    for (k, (_, head)) in w.shared_heads().enumerate() {
        for seg in &w.segments {
            grad_probs(ctx, w, b, head, seg, w.block(dp, k as u32, seg));
        }
    }
}

/// dP, dS, dQ and the partial dK, dV for every head the PE holds whole.
pub(super) fn backward_whole(ctx: &mut TaskCtx<'_>, w: &PeWork, b: &BackwardBufs) {
    for (i, head) in w.whole_heads() {
        for seg in &w.segments {
            let p = w.block(b.probs, i, seg);
            let ds = b.ds.slice(0, w.seq * seg.len);
            grad_probs(ctx, w, b, head, seg, ds);
            grad_scores(ctx, w, b, seg, p, ds);
            grad_queries(ctx, w, b, head, seg, ds);
            partial_key_grads(ctx, w, b, head, seg, p, ds);
        }
    }
}

/// dS (in place of the summed dP in `dp`), dQ and the partial dK, dV for the shared heads.
pub(super) fn backward_shared_rest(ctx: &mut TaskCtx<'_>, w: &PeWork, b: &BackwardBufs, dp: Buf) {
    for (k, (i, head)) in w.shared_heads().enumerate() {
        for seg in &w.segments {
            let p = w.block(b.probs, i, seg);
            let ds = w.block(dp, k as u32, seg);
            grad_scores(ctx, w, b, seg, p, ds);
            grad_queries(ctx, w, b, head, seg, ds);
            partial_key_grads(ctx, w, b, head, seg, p, ds);
        }
    }
}

/// `dP[j][t] = dO_t . v_j` (AXPYs of `dO[f, tokens]` scaled by `v_j[f]`).
fn grad_probs(
    ctx: &mut TaskCtx<'_>,
    w: &PeWork,
    b: &BackwardBufs,
    head: &LocalHead,
    seg: &Segment,
    ds: VecRef,
) {
    ctx.fill(ds, 0.0);
    for j in 0..w.seq {
        let row = key_row(ds, j, seg.len);
        for f in head.first..head.first + head.dims {
            let v = w.v_value(ctx, b.window, seg, j, f);
            ctx.fmac(row, w.tokens(b.d_out, f, seg), v);
        }
    }
}

/// In place: `dS = P * (dP - sum_j P_j dP_j) * scale` (the softmax gradient; masked entries have
/// `P = 0` and get `dS = 0`).
fn grad_scores(
    ctx: &mut TaskCtx<'_>,
    w: &PeWork,
    b: &BackwardBufs,
    seg: &Segment,
    p: VecRef,
    ds: VecRef,
) {
    let len = seg.len;
    let (rowsum, tmp) = (b.rowsum.slice(0, len), b.tmp.slice(0, len));
    ctx.mul(rowsum, key_row(p, 0, len), key_row(ds, 0, len));
    for j in 1..w.seq {
        ctx.mul(tmp, key_row(p, j, len), key_row(ds, j, len));
        ctx.add(rowsum, rowsum, tmp);
    }
    for j in 0..w.seq {
        let row = key_row(ds, j, len);
        ctx.sub(row, row, rowsum);
    }
    ctx.mul(ds, ds, p);
    ctx.scale(ds, ds, w.scale);
}

/// `dQ[f, tokens] += dS_j k_j[f]` over every key.
fn grad_queries(
    ctx: &mut TaskCtx<'_>,
    w: &PeWork,
    b: &BackwardBufs,
    head: &LocalHead,
    seg: &Segment,
    ds: VecRef,
) {
    for f in head.first..head.first + head.dims {
        let dst = w.tokens(b.dq, f, seg);
        for j in 0..w.seq {
            let k = w.k_value(ctx, b.window, seg, j, f);
            ctx.fmac(dst, key_row(ds, j, seg.len), k);
        }
    }
}

/// This PE's share of `dK_j = sum_t dS[j][t] q_t` and `dV_j = sum_t P[j][t] dO_t`: one dot over
/// the segment's tokens per key and feature, stored at the key's place in the partial buffer.
fn partial_key_grads(
    ctx: &mut TaskCtx<'_>,
    w: &PeWork,
    b: &BackwardBufs,
    head: &LocalHead,
    seg: &Segment,
    p: VecRef,
    ds: VecRef,
) {
    for j in 0..w.seq {
        let key = w.keys[(seg.keys + j) as usize];
        let (ds_j, p_j) = (key_row(ds, j, seg.len), key_row(p, j, seg.len));
        for f in head.first..head.first + head.dims {
            let dk = ctx.dot(ds_j, w.tokens(b.q, f, seg));
            ctx.store(b.partial.at(key.k(f)), dk);
            let dv = ctx.dot(p_j, w.tokens(b.d_out, f, seg));
            ctx.store(b.partial.at(key.v(f, w.fc)), dv);
        }
    }
}
