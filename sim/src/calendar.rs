//! The engine's event queue: a calendar of wakes, one bucket per cycle over a sliding window,
//! with a heap for wakes beyond the window.
//!
//! Every wake the engine schedules is at least one cycle after the cycle being processed (all
//! latencies and task costs are at least one cycle), so the engine takes a whole cycle's bucket
//! at once. Within a cycle the order does not matter (see the engine's determinism note), so
//! buckets keep push order and may hold duplicates, which the engine drops: O(1) per wake.
//!
//! A region stepped in parallel with others may have nothing to do at the cycle all regions are
//! at; its calendar then only learns that no wake will come before the next cycle
//! ([`Calendar::advance`]), and wakes that other regions send it land at that cycle or later.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Cycles covered by the buckets (a power of two).
const WINDOW: u64 = 1 << 12;
/// Largest bucket buffer kept for reuse, in wakes. A bucket that once held a wake for every PE
/// of a wafer would otherwise lend its megabytes to a bucket of a few wakes, and every bucket in
/// use could end up holding one: beyond this, buffers go back to the allocator.
const SPARE_CAPACITY: usize = 1 << 12;

pub(crate) struct Calendar {
    buckets: Vec<Vec<u32>>,
    /// No wake is pushed before this cycle: the first cycle not yet taken.
    floor: u64,
    /// No bucket before this cycle (and at or after `floor`) holds a wake.
    cursor: u64,
    /// Wakes held in buckets (all in `floor .. floor + WINDOW`).
    near: usize,
    /// Wakes at or beyond `floor + WINDOW`.
    far: BinaryHeap<Reverse<(u64, u32)>>,
    /// Emptied bucket buffers, handed to buckets that get their first wake: buffers circulate
    /// among the few buckets in use instead of every bucket keeping the largest it ever held.
    spare: Vec<Vec<u32>>,
}

impl Calendar {
    pub fn new() -> Self {
        Calendar {
            buckets: vec![Vec::new(); WINDOW as usize],
            floor: 0,
            cursor: 0,
            near: 0,
            far: BinaryHeap::new(),
            spare: Vec::new(),
        }
    }

    /// Schedules component `c` at cycle `at` (not before the first cycle not yet taken).
    /// Inlined: the engine calls it about once per event, nearly always for a bucket in use.
    #[inline]
    pub fn push(&mut self, at: u64, c: u32) {
        debug_assert!(
            at >= self.floor,
            "wake at {at} is in the past (floor {})",
            self.floor
        );
        if at < self.floor + WINDOW {
            self.push_near(at, c);
        } else {
            self.far.push(Reverse((at, c)));
        }
    }

    #[inline]
    fn push_near(&mut self, at: u64, c: u32) {
        let bucket = &mut self.buckets[(at % WINDOW) as usize];
        if bucket.len() == bucket.capacity() {
            Self::make_room(bucket, &mut self.spare);
        }
        bucket.push(c);
        self.near += 1;
        self.cursor = self.cursor.min(at);
    }

    /// Gives a full bucket room for one more wake: a spare buffer if it has none yet.
    #[cold]
    #[inline(never)]
    fn make_room(bucket: &mut Vec<u32>, spare: &mut Vec<Vec<u32>>) {
        if bucket.capacity() == 0
            && let Some(buffer) = spare.pop()
        {
            *bucket = buffer;
        }
        bucket.reserve(1);
    }

    /// The earliest cycle with wakes, or `None` when nothing is scheduled.
    pub fn next_cycle(&mut self) -> Option<u64> {
        if self.near == 0 {
            return self.far.peek().map(|Reverse((at, _))| *at);
        }
        while self.buckets[(self.cursor % WINDOW) as usize].is_empty() {
            self.cursor += 1;
        }
        Some(self.cursor)
    }

    /// Declares that no wake remains or will be pushed before `cycle`.
    pub fn advance(&mut self, cycle: u64) {
        if cycle <= self.floor {
            return;
        }
        debug_assert!(self.next_cycle().is_none_or(|t| t >= cycle));
        self.floor = cycle;
        self.cursor = self.cursor.max(cycle);
        while let Some(&Reverse((at, c))) = self.far.peek() {
            if at >= self.floor + WINDOW {
                break;
            }
            self.far.pop();
            self.push_near(at, c);
        }
    }

    /// Moves the wakes of cycle `t` (the value of [`Calendar::next_cycle`]) into `out` (which
    /// must be empty), in push order with any duplicates.
    pub fn take(&mut self, t: u64, out: &mut Vec<u32>) {
        debug_assert!(out.is_empty());
        self.advance(t);
        let bucket = &mut self.buckets[(t % WINDOW) as usize];
        std::mem::swap(bucket, out);
        let emptied = std::mem::take(bucket);
        if (1..=SPARE_CAPACITY).contains(&emptied.capacity()) {
            self.spare.push(emptied);
        }
        self.near -= out.len();
        self.advance(t + 1);
    }
}

/// A cycle's wakes, distinct and in increasing order: what sorting them and dropping
/// duplicates gives, by way of a bitmap over components (one bit per component; above
/// [`WakeSet::FLAT_WORDS`] words, a summary bit per word too) instead of a comparison sort. Its
/// cost per cycle is one bit per wake plus a scan of the words (or of the summary), so a cycle
/// with few wakes among many components sorts them instead.
#[derive(Default)]
pub(crate) struct WakeSet {
    words: Vec<u64>,
    summary: Vec<u64>,
}

impl WakeSet {
    /// Up to this many words (16,384 components), scanning them all costs less than keeping a
    /// summary.
    const FLAT_WORDS: usize = 256;

    /// Replaces `wakes` by its distinct values in increasing order.
    pub fn sort_dedup(&mut self, wakes: &mut Vec<u32>) {
        let Some(&max) = wakes.iter().max() else {
            return;
        };
        let used = max as usize / 64 + 1;
        if self.words.len() < used {
            self.words.resize(used, 0);
            self.summary.resize(used.div_ceil(64), 0);
        }
        let flat = used <= Self::FLAT_WORDS;
        // A comparison sort wins when the scan would dwarf the wakes.
        let scanned = if flat { used } else { used.div_ceil(64) };
        if wakes.len() < 64 || wakes.len() * 4 < scanned {
            wakes.sort_unstable();
            wakes.dedup();
            return;
        }
        let words = &mut self.words[..used];
        if flat {
            for &c in wakes.iter() {
                words[c as usize / 64] |= 1 << (c % 64);
            }
            wakes.clear();
            for (w, word) in words.iter_mut().enumerate() {
                drain_word(w, std::mem::take(word), wakes);
            }
            return;
        }
        let summary = &mut self.summary[..used.div_ceil(64)];
        for &c in wakes.iter() {
            let w = c as usize / 64;
            words[w] |= 1 << (c % 64);
            summary[w / 64] |= 1 << (w % 64);
        }
        wakes.clear();
        for (s, marked) in summary.iter_mut().enumerate() {
            let mut marked = std::mem::take(marked);
            while marked != 0 {
                let w = s * 64 + marked.trailing_zeros() as usize;
                marked &= marked - 1;
                drain_word(w, std::mem::take(&mut words[w]), wakes);
            }
        }
    }
}

/// Appends the components of word `w`'s set bits, in order.
fn drain_word(w: usize, mut bits: u64, out: &mut Vec<u32>) {
    while bits != 0 {
        out.push((w * 64) as u32 + bits.trailing_zeros());
        bits &= bits - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(cal: &mut Calendar) -> Vec<(u64, u32)> {
        let mut got = Vec::new();
        let mut batch = Vec::new();
        while let Some(t) = cal.next_cycle() {
            cal.take(t, &mut batch);
            got.extend(batch.drain(..).map(|c| (t, c)));
        }
        got
    }

    #[test]
    fn wakes_come_out_by_cycle_in_push_order() {
        let mut cal = Calendar::new();
        for (at, c) in [
            (5, 3),
            (2, 9),
            (5, 1),
            (2, 9),
            (WINDOW * 3 + 7, 2),
            (WINDOW + 1, 4),
            (0, 0),
        ] {
            cal.push(at, c);
        }
        assert_eq!(
            drain(&mut cal),
            vec![
                (0, 0),
                (2, 9),
                (2, 9),
                (5, 3),
                (5, 1),
                (WINDOW + 1, 4),
                (WINDOW * 3 + 7, 2)
            ]
        );
    }

    #[test]
    fn pushes_while_draining_land_in_order() {
        let mut cal = Calendar::new();
        cal.push(1, 1);
        let mut batch = Vec::new();
        let mut seen = Vec::new();
        while let Some(t) = cal.next_cycle() {
            cal.take(t, &mut batch);
            for c in batch.drain(..) {
                seen.push((t, c));
                if t < 3 * u64::from(WINDOW as u32) {
                    cal.push(t + WINDOW - 1, c + 1); // just inside the window
                    cal.push(t + 2 * WINDOW, 100 + c); // far away
                }
            }
        }
        assert!(
            seen.windows(2).all(|w| w[0].0 <= w[1].0),
            "cycles never go back"
        );
        assert!(seen.len() > 4);
    }

    #[test]
    fn an_idle_region_advances_and_still_takes_later_wakes_in_order() {
        // A region with a wake far ahead is told, cycle after cycle, that nothing comes before
        // the next cycle; wakes pushed meanwhile (as other regions send them) come out first.
        let mut cal = Calendar::new();
        cal.push(WINDOW * 2 + 5, 7);
        for t in 0..10 {
            assert_eq!(cal.next_cycle(), Some(WINDOW * 2 + 5));
            cal.advance(t + 1);
        }
        cal.push(12, 3);
        cal.push(11, 4);
        assert_eq!(cal.next_cycle(), Some(11));
        assert_eq!(drain(&mut cal), vec![(11, 4), (12, 3), (WINDOW * 2 + 5, 7)]);
    }

    #[test]
    fn a_huge_bucket_buffer_is_not_kept_for_reuse() {
        // A cycle with a wake for every PE of a big region hands its buffer to the caller; when
        // the caller gives it back with the next cycle's take, it is freed, not lent to the next
        // bucket that gets a wake.
        let mut cal = Calendar::new();
        let many = 4 * SPARE_CAPACITY as u32;
        for c in 0..many {
            cal.push(1, c);
        }
        let mut batch = Vec::new();
        cal.take(1, &mut batch);
        assert_eq!(batch.len(), many as usize);
        batch.clear();
        cal.push(2, 0);
        cal.push(3, 0);
        cal.take(2, &mut batch);
        assert!(cal.spare.iter().all(|b| b.capacity() <= SPARE_CAPACITY));
        assert!(cal.buckets.iter().all(|b| b.capacity() <= SPARE_CAPACITY));
        assert_eq!(batch, vec![0]);
    }

    #[test]
    fn a_wake_set_sorts_and_drops_duplicates() {
        // Wakes pushed in an arbitrary order, with duplicates, as a cycle collects them: both the
        // bitmap (many wakes) and the comparison sort (few wakes among many components) give
        // the sorted distinct values, and the set is empty again afterwards.
        let mut set = WakeSet::default();
        let mut check = |mut wakes: Vec<u32>| {
            let mut want = wakes.clone();
            want.sort_unstable();
            want.dedup();
            set.sort_dedup(&mut wakes);
            assert_eq!(wakes, want);
            assert!(set.words.iter().chain(&set.summary).all(|&w| w == 0));
        };
        let mut many: Vec<u32> = (0..500u32).map(|i| (i * 7919) % 4099).collect();
        many.extend([0, 4098, 4098, 63, 64, 65, 4095]);
        check(many);

        // Beyond FLAT_WORDS words the summary is used.
        let mut wide: Vec<u32> = (0..3000u32).map(|i| (i * 104_729) % 200_003).collect();
        wide.extend([199_999, 0, 0]);
        check(wide);

        let mut few = vec![1 << 20, 5, 1 << 20, 3];
        set.sort_dedup(&mut few);
        assert_eq!(few, vec![3, 5, 1 << 20]);
        let mut again = vec![9, 2, 9, 70, 2, 1];
        again.extend(128..200u32);
        let mut want: Vec<u32> = vec![1, 2, 9, 70];
        want.extend(128..200u32);
        set.sort_dedup(&mut again);
        assert_eq!(again, want);
    }
}
