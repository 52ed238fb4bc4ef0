//! Analytic timing of the row collectives the weight-streamed kernels use
//! ([`crate::chain::RowChain`]): when each PE of a row finishes its part of a reduce-scatter or an
//! all-gather, given when it issued its operations and how long each owner's segment is.
//!
//! Key design decision: a collective is timed from counts only (segment lengths, issue times),
//! PE by PE along each direction of the chain, in O(columns): no wavelet is simulated. Three
//! things bound when a PE finishes:
//!
//! - the chain: a wavelet reaches the next core `L = 2 ramp + hop` cycles after it left, and a
//!   PE takes its inputs only once it has issued its operations, one per cycle; back the other
//!   way, once the buffers between are full, a PE that issued late holds back the PEs feeding it;
//! - its ramps: the router hands the core one wavelet per cycle whatever the color, and the core
//!   puts one per cycle on the fabric, so everything a PE receives (or sends) once the PEs holding
//!   its streams back have issued takes one cycle per wavelet (less the buffers' slack);
//! - the crossing of the east- and west-bound streams: where both pass a PE they share its ramps
//!   round-robin, each at half rate, and the meeting point travels with the streams, so a
//!   crossing costs about the two streams' wavelets together rather than the longer one's.
//!
//! What it is not: exact. The buffers between cores are a count of wavelets (`hop_slack`, and the
//! back-pressure of `hold_back`), not queues. The crossing terms were shaped on runs of the exact
//! engine with equal issue times, the slack's weight on rows whose first columns hold one input
//! feature more (the constants are named where they are used); the round-robin order of
//! individual wavelets is not modelled. `docs/fidelity.md` lists the measured agreement, and
//! where it is worse (rows of more than eight columns).

use wafersim_sim::FabricConfig;

/// Cycles from a core putting a wavelet on its ramp to the neighbouring core being able to take
/// it: up the ramp, one hop, down the ramp.
pub(crate) fn core_to_core(config: &FabricConfig) -> u64 {
    2 * u64::from(config.ramp_latency) + u64::from(config.hop_latency)
}

/// Wavelets the buffers between two neighbouring cores hold: the sender's router buffer from its
/// ramp, the receiver's router buffer and its core queue.
fn hop_slack(config: &FabricConfig) -> u64 {
    3 * u64::from(config.queue_depth)
}

/// Sums of consecutive segments in O(1).
struct Prefix {
    /// `sums[i]` = segments `0..i`.
    sums: Vec<u64>,
}

impl Prefix {
    fn new(segments: &[u64]) -> Self {
        let mut sums = Vec::with_capacity(segments.len() + 1);
        sums.push(0);
        for s in segments {
            sums.push(sums.last().copied().unwrap_or(0) + s);
        }
        Prefix { sums }
    }

    /// Segments `range`.
    fn sum(&self, range: std::ops::Range<usize>) -> u64 {
        self.sums[range.end] - self.sums[range.start]
    }

    fn cols(&self) -> usize {
        self.sums.len() - 1
    }
}

/// The wavelets each PE of a row moves in a reduce-scatter: received from the west (east-bound
/// chain) and from the east, sent east and west.
struct Volumes {
    prefix: Prefix,
}

impl Volumes {
    fn cols(&self) -> usize {
        self.prefix.cols()
    }

    fn east_in(&self, k: usize) -> u64 {
        if k == 0 {
            0
        } else {
            self.prefix.sum(k..self.cols())
        }
    }

    fn west_in(&self, k: usize) -> u64 {
        if k + 1 == self.cols() {
            0
        } else {
            self.prefix.sum(0..k + 1)
        }
    }

    fn east_out(&self, k: usize) -> u64 {
        if k + 1 == self.cols() {
            0
        } else {
            self.prefix.sum(k + 1..self.cols())
        }
    }

    fn west_out(&self, k: usize) -> u64 {
        if k == 0 { 0 } else { self.prefix.sum(0..k) }
    }
}

/// One direction of the chain at one PE: when its inputs arrive and when its outputs leave
/// (`None` where it receives or sends nothing that way).
#[derive(Clone, Copy, Debug, Default)]
struct Leg {
    input: Option<(u64, u64)>,
    output: Option<(u64, u64)>,
}

/// What a PE does with the stream passing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Reduce-scatter, east-bound: absorb its own segment, then forward the rest.
    AbsorbThenForward,
    /// Reduce-scatter, west-bound: forward the earlier owners' segments, absorb its own last.
    ForwardThenAbsorb,
    /// All-gather: forward everything it receives, then send its own segment.
    ForwardThenSend,
}

/// One direction of a chain, PE by PE from its source end: `order` lists the PEs from the
/// source, `volumes(k)` the wavelets PE `k` receives and sends that way and sends the other way
/// at the same time (its ramp out alternates between the two: the smaller volume `a` leaves by
/// `2a`, the larger `b` by `a + b`). Each PE takes its input from its issue on, at most one
/// wavelet per cycle and no sooner than `l` after it left the previous PE.
fn chain(
    l: u64,
    slack: u64,
    issue: &[u64],
    segments: &[u64],
    order: impl Iterator<Item = usize>,
    volumes: impl Fn(usize) -> (u64, u64, u64),
    pass: Pass,
) -> Vec<Leg> {
    let order: Vec<usize> = order.collect();
    let mut legs = vec![Leg::default(); issue.len()];
    let mut upstream: Option<(u64, u64)> = None; // first and last wavelet leaving the previous PE
    for &k in &order {
        let (inp, out, other) = volumes(k);
        let mut output = (issue[k], issue[k] + out);
        if inp > 0
            && let Some((first, last)) = upstream
        {
            let start = (first + l).max(issue[k]);
            let end = (last + l).max(start + inp);
            legs[k].input = Some((start, end));
            output = match pass {
                Pass::AbsorbThenForward => (start + segments[k], end),
                Pass::ForwardThenAbsorb => (start, end - segments[k]),
                Pass::ForwardThenSend => (start, end + segments[k]),
            };
        }
        let shared = if out <= other { 2 * out } else { out + other };
        output.1 = output.1.max(output.0 + shared);
        upstream = (out > 0).then_some(output);
        legs[k].output = upstream;
    }
    hold_back(&mut legs, &order, segments, slack, pass);
    legs
}

/// Back-pressure along a chain: the buffers between two cores hold `slack` wavelets, so a PE's
/// last wavelet out leaves no sooner than the next PE takes the one `slack` before its last,
/// and a PE that forwards takes its own input only as fast as it sends. Walking back from the
/// far end, a PE that takes its input late (it issued late, behind a heavier weight stream)
/// holds back every PE feeding it. The next PE takes its inputs at half rate where the two
/// streams cross, so the buffered wavelets are counted as `2 slack` cycles. (Measured on rows
/// whose first columns hold one input feature more, `docs/fidelity.md`: with `slack` cycles
/// the formula ran 2 to 5 % high, with `2 slack` within 1.6 %; without back-pressure up to
/// 11 % low.)
fn hold_back(legs: &mut [Leg], order: &[usize], segments: &[u64], slack: u64, pass: Pass) {
    for pair in order.windows(2).rev() {
        let (k, next) = (pair[0], pair[1]);
        let (Some((first, last)), Some((_, taken))) = (legs[k].output, legs[next].input) else {
            continue;
        };
        let held = taken.saturating_sub(2 * slack);
        if held <= last {
            continue;
        }
        legs[k].output = Some((first, held));
        if let Some((start, end)) = legs[k].input {
            let needed = match pass {
                Pass::AbsorbThenForward => held,
                Pass::ForwardThenAbsorb => held + segments[k],
                Pass::ForwardThenSend => held.saturating_sub(segments[k]),
            };
            legs[k].input = Some((start, end.max(needed)));
        }
    }
}

/// When each PE of a row finishes its operations of a reduce-scatter (one past the cycle its
/// last operation moved its last wavelet). `issue[k]` is when PE column `k` issued its operations
/// (it takes nothing before), `segments[b]` the wavelets owner column `b` receives from each other
/// column (0 for an owner outside the chunk). A PE with nothing to do finishes at its issue time.
pub(crate) fn reduce_scatter(config: &FabricConfig, issue: &[u64], segments: &[u64]) -> Vec<u64> {
    let cols = issue.len();
    let (l, slack) = (core_to_core(config), hop_slack(config));
    let v = Volumes {
        prefix: Prefix::new(segments),
    };
    let east = chain(
        l,
        slack,
        issue,
        segments,
        0..cols,
        |k| (v.east_in(k), v.east_out(k), 0),
        Pass::AbsorbThenForward,
    );
    let west = chain(
        l,
        slack,
        issue,
        segments,
        (0..cols).rev(),
        |k| (v.west_in(k), v.west_out(k), 0),
        Pass::ForwardThenAbsorb,
    );
    let ramps = ramp_bound(config, issue, segments, &v);
    let mut done: Vec<u64> = (0..cols)
        .map(|k| {
            let legs = [east[k], west[k]];
            let ends = legs.iter().flat_map(|g| [g.input, g.output]).flatten();
            ends.map(|(_, e)| e).fold(ramps[k], u64::max) + 1
        })
        .collect();
    crossing(config, issue, &v.prefix, segments, &east, &west, &mut done);
    done
}

/// The ramps: the router hands a core one wavelet per cycle, so PE `k` cannot finish before any
/// PE `j` has issued plus the wavelets `k` still receives once `j` has (less the buffer slack
/// between them, `3 x queue depth` per hop). Streams are FIFO: everything the east-bound chain
/// brings `k` passes every PE west of it first; the west-bound stream into `k` starts with the
/// westernmost owner's segment, so a PE `j` west of `k` at or past the first owner holds all of
/// it back; and of the east-bound stream into `k`, a PE `j` east of `k` holds back the segments
/// of owners from `j` on. `j = k` gives `issue + everything received`. O(columns).
fn ramp_bound(config: &FabricConfig, issue: &[u64], segments: &[u64], v: &Volumes) -> Vec<u64> {
    let cols = issue.len();
    let slack = 3 * u64::from(config.queue_depth);
    let lo = segments.iter().position(|&s| s > 0).unwrap_or(cols);
    let mut bound: Vec<u64> = (0..cols)
        .map(|k| issue[k] + v.east_in(k) + v.west_in(k))
        .collect();
    // PEs west of k: `issue_j + slack j` maximised separately before and from the first owner.
    let (mut before, mut from): (Option<u64>, Option<u64>) = (None, None);
    for k in 0..cols {
        let shift = |m: u64| (m + v.east_in(k)).saturating_sub(slack * k as u64);
        if let Some(m) = before {
            bound[k] = bound[k].max(shift(m));
        }
        if let Some(m) = from {
            bound[k] = bound[k].max(shift(m) + v.west_in(k));
        }
        let here = issue[k] + slack * k as u64;
        if k < lo {
            before = Some(before.map_or(here, |m| m.max(here)));
        } else {
            from = Some(from.map_or(here, |m| m.max(here)));
        }
    }
    // PEs east of k: `issue_j - slack j + (segments of owners from j on)`, kept shifted by
    // `slack (cols - j)` to stay unsigned.
    let mut after: Option<u64> = None;
    let mut suffix = 0;
    for k in (0..cols).rev() {
        if let Some(m) = after
            && k > 0
        {
            let through = (m + slack * k as u64 + v.west_in(k)).saturating_sub(slack * cols as u64);
            bound[k] = bound[k].max(through);
        }
        suffix += segments[k];
        let here = issue[k] + suffix + slack * (cols - k) as u64;
        after = Some(after.map_or(here, |m| m.max(here)));
    }
    bound
}

/// The crossing of the two streams inside the span of owners. Started together, the streams
/// meet at the span's PEs while those absorb their own segments, each at half rate, and the
/// meeting point moves east through the span: the PE where they meet receives both streams
/// whole, so from PE `k` of the span on (it takes nothing before its issue) the crossing takes
/// the east-bound stream's wavelets from `k` plus the west-bound stream's into the span and two
/// hops, less the slack of the span's buffers (measured: `2 x queue depth` per owner beyond
/// three). How much of that extra time over the chains applies is the fraction of their two
/// segments during which the chains alone would have the streams meet at the span's PEs (a
/// west-bound stream that started earlier has passed before the east-bound one arrives). The
/// last owner finishes then; a PE `d` columns away `d (L + queue depth)` earlier (the tail of a
/// full chain, one wavelet behind a full queue per hop).
fn crossing(
    config: &FabricConfig,
    issue: &[u64],
    prefix: &Prefix,
    segments: &[u64],
    east: &[Leg],
    west: &[Leg],
    done: &mut [u64],
) {
    let cols = segments.len();
    let owners: Vec<usize> = (0..cols).filter(|&b| segments[b] > 0).collect();
    let (Some(&lo), Some(&hi)) = (owners.first(), owners.last()) else {
        return;
    };
    let both = |k: usize| k > 0 && k + 1 < cols;
    if !(lo..=hi).any(both) {
        return;
    }
    let l = core_to_core(config);
    let depth = u64::from(config.queue_depth);
    let west_volume = prefix.sum(0..hi + 1) - if hi + 1 == cols { segments[hi] } else { 0 };
    let slack = 2 * depth * ((hi - lo + 1) as u64).saturating_sub(3);
    let zone_end = (lo..=hi)
        .map(|k| {
            let east_volume = prefix.sum(k..cols) - if k == 0 { segments[0] } else { 0 };
            (issue[k] + east_volume + west_volume + 2 * l).saturating_sub(slack)
        })
        .max()
        .unwrap_or(0);
    let chain_end = done[lo..=hi].iter().copied().max().unwrap_or(0);
    if zone_end <= chain_end {
        return;
    }
    let (mut met, mut possible) = (0, 0);
    for k in (lo..=hi).filter(|&k| both(k)) {
        let meeting = 2 * segments[k];
        if let (Some((e0, e1)), Some((w0, w1))) = (east[k].input, west[k].input) {
            met += (e1.min(w1).saturating_sub(e0.max(w0))).min(meeting);
        }
        possible += meeting;
    }
    let possible = possible.max(1);
    let end = chain_end + (zone_end - chain_end) * met / possible;
    for (j, d) in done.iter_mut().enumerate() {
        let away = j.abs_diff(hi) as u64;
        *d = (*d).max(end.saturating_sub(away * (l + depth)));
    }
}

/// When each PE of a row finishes its part of an all-gather (one past the cycle its last
/// operation moved its last wavelet): `issue[k]` is when PE column `k` issued its operations,
/// `segments[b]` the wavelets of owner column `b` every other column receives. Every PE forwards
/// what it receives from one side to the other, so each waits for all the others: its ramps
/// carry everything after the latest issue, less the buffer slack between them. Where the two
/// streams cross (three owners or more) they share each core's ramp out: the crossing takes at
/// least the busiest PE's sends, and measured with equal issue times (`docs/fidelity.md`) the
/// longest stream moves at four sevenths of a wavelet per cycle through it (half rate while
/// crossing, less the buffers' slack). How much of that applies is, as for [`reduce_scatter`],
/// the fraction of the crossing the chains alone would have; every PE of the row receives the
/// last segments then.
pub(crate) fn all_gather(config: &FabricConfig, issue: &[u64], segments: &[u64]) -> Vec<u64> {
    let cols = issue.len();
    let (l, slack) = (core_to_core(config), hop_slack(config));
    let prefix = Prefix::new(segments);
    let east_in = |k: usize| prefix.sum(0..k);
    let west_in = |k: usize| prefix.sum(k + 1..cols);
    let east_out = |k: usize| {
        if k + 1 == cols {
            0
        } else {
            prefix.sum(0..k + 1)
        }
    };
    let west_out = |k: usize| if k == 0 { 0 } else { prefix.sum(k..cols) };
    let pass = Pass::ForwardThenSend;
    let east = chain(
        l,
        slack,
        issue,
        segments,
        0..cols,
        |k| (east_in(k), east_out(k), west_out(k)),
        pass,
    );
    let west = chain(
        l,
        slack,
        issue,
        segments,
        (0..cols).rev(),
        |k| (west_in(k), west_out(k), east_out(k)),
        pass,
    );
    let reach = latest_issue(config, issue);
    let chained: Vec<u64> = (0..cols)
        .map(|k| {
            let legs = [east[k], west[k]];
            let ends = legs.iter().flat_map(|g| [g.input, g.output]).flatten();
            let ports = (east_in(k) + west_in(k)).max(east_out(k) + west_out(k));
            ends.map(|(_, e)| e).fold(reach[k] + ports, u64::max) + 1
        })
        .collect();
    let owners = segments.iter().filter(|&&s| s > 0).count() as u64;
    let chain_end = chained.iter().copied().max().unwrap_or(0);
    if owners < 3 {
        return chained;
    }
    let busiest = (0..cols)
        .map(|k| east_out(k) + west_out(k))
        .max()
        .unwrap_or(0);
    let longest = (0..cols)
        .map(|k| east_out(k).max(west_out(k)))
        .max()
        .unwrap_or(0);
    let zone = busiest.max(7 * longest / 4) + 2 * l;
    let zone_end = issue.iter().copied().max().unwrap_or(0) + zone;
    if zone_end <= chain_end {
        return chained;
    }
    let (mut met, mut possible) = (0, 0);
    for k in 0..cols {
        if let (Some((e0, e1)), Some((w0, w1))) = (east[k].output, west[k].output) {
            let meeting = (e1 - e0).min(w1 - w0);
            met += (e1.min(w1).saturating_sub(e0.max(w0))).min(meeting);
            possible += meeting;
        }
    }
    let extra = (zone_end - chain_end) * met / possible.max(1);
    chained.into_iter().map(|d| d + extra).collect()
}

/// `max_j (issue_j - slack |k - j|)` for every PE `k`: the latest issue that still holds `k`
/// back, less the slack of the buffers between (`3 x queue depth` per hop).
fn latest_issue(config: &FabricConfig, issue: &[u64]) -> Vec<u64> {
    let slack = 3 * u64::from(config.queue_depth);
    let mut reach = issue.to_vec();
    for k in 1..reach.len() {
        reach[k] = reach[k].max(reach[k - 1].saturating_sub(slack));
    }
    for k in (0..reach.len().saturating_sub(1)).rev() {
        reach[k] = reach[k].max(reach[k + 1].saturating_sub(slack));
    }
    reach
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FabricConfig {
        // hop 1, ramp 2: L = 5; queue depth 4.
        FabricConfig::rectangle(8, 2).unwrap()
    }

    #[test]
    fn two_columns_exchange_their_segments_along_one_hop() {
        // PE 1 sends owner 0's 10 wavelets west from cycle 0; they reach PE 0 from cycle 5 and
        // the last one at 15: PE 0 finishes at 16. PE 0's 6 wavelets for PE 1 arrive by 11.
        assert_eq!(reduce_scatter(&config(), &[0, 0], &[10, 6]), vec![16, 12]);
        // An all-gather moves the same wavelets: each receives the other's segment.
        assert_eq!(all_gather(&config(), &[0, 0], &[10, 6]), vec![12, 16]);
    }

    #[test]
    fn a_late_column_holds_the_row_back_by_what_still_has_to_pass_it() {
        // PE 0 issues at 100, PE 1 at 0. PE 0's east-bound 6 wavelets leave from 100 and reach
        // PE 1 by 111: PE 1 finishes at 112. PE 1's 10 wavelets wait in the 12 buffer slots
        // between them; PE 0 takes them one per cycle from 100 and finishes at 111.
        assert_eq!(
            reduce_scatter(&config(), &[100, 0], &[10, 6]),
            vec![111, 112]
        );
        // With 40 wavelets for owner 0, 12 wait and 28 still have to cross the hop after 100:
        // PE 0 takes all 40 from 100 on and finishes at 141.
        assert_eq!(reduce_scatter(&config(), &[100, 0], &[40, 6])[0], 141);
    }

    #[test]
    fn three_columns_started_together_cross_in_the_middle() {
        // Segments of 64. PE 1 receives both streams whole (owner 1's from each side, and owner
        // 2's and owner 0's passing): 4 x 64 wavelets, at half rate each, plus two hops of 5:
        // the last owner finishes at 266; PE 1 one column away 5 + 4 cycles earlier, PE 0 two.
        // (The exact engine measures [245, 261, 266].)
        assert_eq!(
            reduce_scatter(&config(), &[0, 0, 0], &[64, 64, 64]),
            vec![248, 257, 266]
        );
    }
}
