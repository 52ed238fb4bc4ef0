//! The engine's event queue: a calendar of wakes, one bucket per cycle over a sliding window,
//! with a heap for wakes beyond the window.
//!
//! Every wake the engine schedules is at least one cycle in the future (all latencies and task
//! costs are at least one cycle), so the engine can take a whole cycle's bucket at once. Within a
//! cycle the order does not matter (see the engine's determinism note), so buckets keep push
//! order and may hold duplicates, which the engine drops: O(1) per wake.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Cycles covered by the buckets (a power of two).
const WINDOW: u64 = 1 << 12;

pub(crate) struct Calendar {
    buckets: Vec<Vec<u64>>,
    /// The first cycle not yet taken.
    now: u64,
    /// Wakes held in buckets.
    near: usize,
    /// Wakes at or beyond `now + WINDOW`.
    far: BinaryHeap<Reverse<(u64, u64)>>,
}

impl Calendar {
    pub fn new() -> Self {
        Calendar {
            buckets: vec![Vec::new(); WINDOW as usize],
            now: 0,
            near: 0,
            far: BinaryHeap::new(),
        }
    }

    /// Schedules component `c` at cycle `at` (not before the first cycle not yet taken).
    pub fn push(&mut self, at: u64, c: u64) {
        debug_assert!(
            at >= self.now,
            "wake at {at} is in the past (now {})",
            self.now
        );
        if at < self.now + WINDOW {
            self.buckets[(at % WINDOW) as usize].push(c);
            self.near += 1;
        } else {
            self.far.push(Reverse((at, c)));
        }
    }

    /// The next cycle with wakes, its components (in push order, with any duplicates) moved into
    /// `out` (which must be empty), or `None` when nothing is scheduled.
    pub fn pop_cycle(&mut self, out: &mut Vec<u64>) -> Option<u64> {
        debug_assert!(out.is_empty());
        if self.near == 0 {
            let Reverse((at, _)) = *self.far.peek()?;
            self.now = at;
        }
        while let Some(&Reverse((at, c))) = self.far.peek() {
            if at >= self.now + WINDOW {
                break;
            }
            self.far.pop();
            self.buckets[(at % WINDOW) as usize].push(c);
            self.near += 1;
        }
        while self.buckets[(self.now % WINDOW) as usize].is_empty() {
            self.now += 1;
        }
        let t = self.now;
        std::mem::swap(&mut self.buckets[(t % WINDOW) as usize], out);
        self.near -= out.len();
        self.now += 1;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(cal: &mut Calendar) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        let mut batch = Vec::new();
        while let Some(t) = cal.pop_cycle(&mut batch) {
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
        while let Some(t) = cal.pop_cycle(&mut batch) {
            for c in batch.drain(..) {
                seen.push((t, c));
                if t < 3 * WINDOW {
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
}
