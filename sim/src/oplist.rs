//! Long lists of fabric operations, issued at once and taken up a few at a time: [`OpList`].
//!
//! A task that issues `n` asynchronous operations leaves its PE holding `n` pending operations
//! until they finish. A row reduce-scatter over `C` columns issues about `C` per PE per chunk, so
//! at the wafer's width (750 columns) those lists alone would take tens of KB per PE of host
//! memory. [`crate::TaskCtx::issue_list`] takes a generator instead: the task is charged for
//! every operation at once, exactly as if it had issued them one by one, and the PE takes an
//! operation up (holds it) only once it could start or must be seen to block another.
//!
//! Why that changes nothing: operations run in issue order per color read and per color
//! written, so an operation that reads (writes) a color an earlier pending one reads (writes)
//! cannot start. The PE holds, for each color read and each color written, the first operation
//! of the list using it that has no earlier pending operation using it, taking operations up out
//! of order where needed (a row reduce-scatter's eastward chain and its westward one each have
//! their head held); every other operation waits behind a held one. Positions in the PE's
//! round-robin over its operations are counted as if the whole list were held. Timing, values
//! and statistics are those of issuing one by one (the tests compare them), with
//! one difference: a listed send reads its values when it is taken up (at the latest when the
//! operation before it on its color finishes), as the hardware's DSD reads memory as it streams,
//! where [`crate::TaskCtx::send`] reads them at issue. Issue a list only of sources that stay
//! unchanged until it finishes.
//!
//! What this is not: a limit on outstanding operations (the hardware's microthreads). A list
//! costs the same cycles and moves the same wavelets as the operations issued one by one.

use crate::config::HARDWARE_COLORS;
use crate::memory::{DType, Sram, VecRef};
use crate::program::Then;
use crate::task::{AsyncKind, AsyncOp, CoreLinks, RecvMode};
use crate::wavelet::{Color, Wavelet};

/// One asynchronous fabric operation (see [`crate::TaskCtx::issue`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FabricOp {
    /// Send `src` on `out` ([`crate::TaskCtx::send`]).
    Send {
        /// The color sent on.
        out: Color,
        /// The values sent.
        src: VecRef,
    },
    /// Receive into `dst` from `inp` ([`crate::TaskCtx::recv`]).
    Recv {
        /// The color received from.
        inp: Color,
        /// Where the values land.
        dst: VecRef,
        /// Stored or added.
        mode: RecvMode,
    },
    /// Receive from `inp`, add `local`, send on `out` ([`crate::TaskCtx::recv_add_send`]).
    RecvAddSend {
        /// The color received from.
        inp: Color,
        /// The values added (`f32`).
        local: VecRef,
        /// The color the sums go out on.
        out: Color,
    },
    /// Receive from `inp`, store into `dst`, send on `out` ([`crate::TaskCtx::recv_store_send`]).
    RecvStoreSend {
        /// The color received from.
        inp: Color,
        /// Where the values land.
        dst: VecRef,
        /// The color they go on out on.
        out: Color,
    },
}

impl FabricOp {
    /// `(color read, color written)`.
    pub fn colors(self) -> (Option<Color>, Option<Color>) {
        match self {
            FabricOp::Send { out, .. } => (None, Some(out)),
            FabricOp::Recv { inp, .. } => (Some(inp), None),
            FabricOp::RecvAddSend { inp, out, .. } | FabricOp::RecvStoreSend { inp, out, .. } => {
                (Some(inp), Some(out))
            }
        }
    }

    /// Wavelets it moves.
    pub fn len(self) -> u32 {
        self.vector().len
    }

    /// Whether it moves no wavelet.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The vector it reads or writes.
    pub fn vector(self) -> VecRef {
        match self {
            FabricOp::Send { src: v, .. }
            | FabricOp::Recv { dst: v, .. }
            | FabricOp::RecvAddSend { local: v, .. }
            | FabricOp::RecvStoreSend { dst: v, .. } => v,
        }
    }
}

/// Operations generated on demand, in issue order, each with what it does when it finishes.
///
/// [`crate::TaskCtx::issue_list`] charges them all at issue but the PE takes them up only while
/// one of the rest could start: a list over `C` columns costs a PE a few pending operations, not
/// `C`. Timing and values are those of issuing them one by one, except that a send reads its
/// source when taken up (so the sources must not change until the list finishes).
pub trait OpList: Send {
    /// How many operations.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Operation `i` (`i < len()`).
    fn get(&self, i: usize) -> (FabricOp, Then);
}

impl OpList for Vec<(FabricOp, Then)> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn get(&self, i: usize) -> (FabricOp, Then) {
        self[i]
    }
}

const COLORS: usize = HARDWARE_COLORS as usize;
/// `list_index` of an operation issued on its own (or by a list no longer being taken up).
pub(crate) const NOT_LISTED: u32 = u32::MAX;
const NEVER: u32 = u32::MAX;

/// What makes two operations run in issue order: reading the same color (key `c`) or writing
/// the same color (key `COLORS + c`).
fn keys(op: FabricOp) -> [Option<usize>; 2] {
    let (read, written) = op.colors();
    [read.map(|c| c.index()), written.map(|c| COLORS + c.index())]
}

fn has_key(op: &AsyncOp, key: usize) -> bool {
    if key < COLORS {
        op.in_color.is_some_and(|c| c.index() == key)
    } else {
        op.out_color.is_some_and(|c| COLORS + c.index() == key)
    }
}

/// A list being taken up by its PE.
///
/// The PE holds some of its operations ("taken up", in list order after everything issued
/// before the list) and not the others. Invariant after [`take_up`]: for every key, the first
/// operation not taken up with that key has an earlier pending operation with the same key. So
/// every operation not taken up waits behind a held one, and a held operation waits exactly
/// when it would with the whole list held: whatever would block it is held or waits behind a
/// held operation of the same key that comes earlier still.
pub(crate) struct LazyOps {
    list: Box<dyn OpList>,
    /// `list.len()`, asked often (the list's own may be a virtual call that computes it).
    len: usize,
    /// Start cycle of operation 0; each later one starts `issue` cycles after the one before.
    first_start: u64,
    issue: u64,
    issued_by: &'static str,
    /// Operations taken up (held or finished), one bit each.
    taken: Vec<u64>,
    taken_count: usize,
    /// Per key, the first operation not taken up with it, or `NEVER`; exact after [`take_up`].
    first_untaken: [u32; 2 * COLORS],
    /// The keys the list uses, one bit each.
    keys: u64,
}

impl LazyOps {
    pub(crate) fn new(
        list: Box<dyn OpList>,
        first_start: u64,
        issue: u64,
        issued_by: &'static str,
    ) -> Self {
        let mut first_untaken = [NEVER; 2 * COLORS];
        for i in (0..list.len()).rev() {
            for key in keys(list.get(i).0).into_iter().flatten() {
                first_untaken[key] = i as u32;
            }
        }
        let keys = (0..2 * COLORS)
            .filter(|&k| first_untaken[k] != NEVER)
            .fold(0u64, |mask, k| mask | 1 << k);
        LazyOps {
            keys,
            len: list.len(),
            taken: vec![0; list.len().div_ceil(64)],
            taken_count: 0,
            list,
            first_start,
            issue,
            issued_by,
            first_untaken,
        }
    }

    /// Operations not taken up yet.
    pub(crate) fn remaining(&self) -> usize {
        self.len - self.taken_count
    }

    /// The task that issued the list.
    pub(crate) fn issued_by(&self) -> &'static str {
        self.issued_by
    }

    /// Whether an operation not taken up yet reads `color`.
    pub(crate) fn rest_reads(&self, color: Color) -> bool {
        self.first_untaken[color.index()] != NEVER
    }

    fn is_taken(&self, i: usize) -> bool {
        self.taken[i / 64] >> (i % 64) & 1 == 1
    }

    /// Operations below `i` not taken up yet.
    fn untaken_below(&self, i: usize) -> usize {
        let (words, bits) = (i / 64, i % 64);
        let whole: u32 = self.taken[..words].iter().map(|w| w.count_ones()).sum();
        let part = if bits == 0 {
            0
        } else {
            (self.taken[words] & ((1u64 << bits) - 1)).count_ones()
        };
        i - (whole + part) as usize
    }

    /// Moves `first_untaken[key]` past the operations taken up since.
    fn advance(&mut self, key: usize) -> Option<usize> {
        let mut i = self.first_untaken[key];
        while i != NEVER {
            let j = i as usize;
            if !self.is_taken(j) && keys(self.list.get(j).0).contains(&Some(key)) {
                return Some(j);
            }
            i = if j + 1 < self.len {
                j as u32 + 1
            } else {
                NEVER
            };
            self.first_untaken[key] = i;
        }
        None
    }

    /// Takes operation `i` up into `ops`, after everything issued before the list and the held
    /// operations listed before it.
    fn take(&mut self, i: usize, ops: &mut Vec<AsyncOp>, sram: &Sram, links: CoreLinks<'_>) {
        let (op, then) = self.list.get(i);
        let start_at = self.first_start + self.issue * i as u64;
        let mut pending = async_op(op, then, sram, links, start_at, self.issued_by);
        pending.list_index = i as u32;
        let later = ops
            .iter()
            .rev()
            .take_while(|o| o.list_index != NOT_LISTED && o.list_index as usize > i)
            .count();
        ops.insert(ops.len() - later, pending);
        self.taken[i / 64] |= 1 << (i % 64);
        self.taken_count += 1;
    }
}

/// Where held operation `ops[p]` would stand with the whole list held (the simulator's
/// round-robin over a PE's operations counts positions): its index plus the operations of its
/// list before it not taken up yet, which change only when [`take_up`] takes some up.
pub(crate) fn position_of(ops: &[AsyncOp], p: usize) -> usize {
    p + ops[p].untaken_before as usize
}

/// Takes operations of `lazy` up into `ops` until every one not taken up waits behind a held
/// one (`all`: every one, before another operation is issued behind the list); drops the list
/// once it is all taken up. Returns how many were taken up.
pub(crate) fn take_up(
    ops: &mut Vec<AsyncOp>,
    lazy: &mut Option<Box<LazyOps>>,
    sram: &Sram,
    links: CoreLinks<'_>,
    all: bool,
) -> usize {
    let Some(l) = lazy.as_mut() else {
        return 0;
    };
    let before = l.taken_count;
    if all {
        for i in 0..l.len {
            if !l.is_taken(i) {
                l.take(i, ops, sram, links);
            }
        }
    } else {
        let mut changed = true;
        while changed {
            changed = false;
            let keys = l.keys;
            for key in (0..2 * COLORS).filter(|&k| keys >> k & 1 == 1) {
                let Some(i) = l.advance(key) else {
                    continue;
                };
                let waits = ops.iter().any(|o| {
                    (o.list_index == NOT_LISTED || (o.list_index as usize) < i) && has_key(o, key)
                });
                if !waits {
                    l.take(i, ops, sram, links);
                    changed = true;
                }
            }
        }
    }
    let taken = l.taken_count - before;
    if taken > 0 {
        for op in ops.iter_mut().filter(|o| o.list_index != NOT_LISTED) {
            op.untaken_before = l.untaken_below(op.list_index as usize) as u32;
        }
    }
    if l.remaining() == 0 {
        *lazy = None;
    }
    taken
}

/// The pending form of `op`, checked when it was issued.
pub(crate) fn async_op(
    op: FabricOp,
    then: Then,
    sram: &Sram,
    links: CoreLinks<'_>,
    start_at: u64,
    issued_by: &'static str,
) -> AsyncOp {
    let (in_color, out_color) = op.colors();
    let at = sram.range(op.vector()).expect("checked at issue").start;
    let kind = match op {
        FabricOp::Send { src, .. } => AsyncKind::Send {
            wavelets: wavelets_of(sram, src),
        },
        FabricOp::Recv { dst, mode, .. } => AsyncKind::Recv {
            dtype: dst.dtype(),
            at,
            mode,
        },
        FabricOp::RecvAddSend { .. } => AsyncKind::RecvAddSend { at },
        FabricOp::RecvStoreSend { dst, .. } => AsyncKind::RecvStoreSend {
            dtype: dst.dtype(),
            at,
        },
    };
    AsyncOp {
        kind,
        in_queue: in_color.map(|c| links.input(c).expect("checked at issue")),
        out_queue: out_color.map(|c| links.output(c).expect("checked at issue")),
        in_color,
        out_color,
        done: 0,
        len: op.len(),
        start_at,
        next_at: start_at,
        stalled_since: None,
        then,
        issued_by,
        list_index: NOT_LISTED,
        untaken_before: 0,
    }
}

/// The wavelets sending `src` puts on the fabric: `f32` payloads, or for `f16` the sparse form
/// with the element's position in `src` as index.
pub(crate) fn wavelets_of(sram: &Sram, src: VecRef) -> Vec<Wavelet> {
    let range = sram.range(src).expect("checked at issue");
    match src.dtype() {
        DType::F32 => sram.f32s[range]
            .iter()
            .map(|&v| Wavelet::from_f32(v))
            .collect(),
        DType::F16 => sram.f16s[range]
            .iter()
            .enumerate()
            .map(|(i, &v)| Wavelet::sparse(v, i as u16))
            .collect(),
    }
}
