//! Stepping several shards (regions of the fabric) in parallel, in lockstep, one cycle at a time.
//!
//! # Synchronisation
//!
//! Conservative and windowed, with a window of one cycle. A wavelet crossing a region boundary
//! at `t` is visible from `t + hop_latency`, but room freed by a pop at `t` is visible to the
//! producer from `t + 1`, and that pop wakes the producer at `t + 1`: so the lookahead is one
//! cycle whatever `hop_latency` is (with `hop_latency = 1`, the default, both directions agree).
//! Each round, every thread:
//!
//! 1. runs its shard's wakes of the round's cycle `t`, if it has any, collecting messages for the
//!    other shards (pushes into their buffers, credits for the room it freed in them);
//! 2. posts the messages in mailboxes and publishes its earliest next wake (counting the wakes its
//!    messages will cause), then waits at a barrier;
//! 3. applies the messages posted to it and takes the smallest published next wake as the next
//!    round's cycle: idle cycles are skipped by every region at once.
//!
//! One barrier per busy cycle; mailboxes and published values alternate between two copies by
//! round parity, so a thread can post round `k + 1`'s messages while a slower one still reads
//! round `k`'s. The barrier spins briefly then yields, since runs are often on shared machines.
//!
//! What is NOT here: the engine's behaviour within a cycle ([`crate::shard`]).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::shard::{Env, Msg, Shard};

/// How a run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing is scheduled any more (finished, or deadlocked if work remains).
    Finished,
    /// Work was scheduled past the cycle limit.
    CycleLimit,
    /// A task failed; the shard keeps the error.
    Failed,
}

const RUNNING: u8 = 0;
const FAILED: u8 = 1;
const OVER_LIMIT: u8 = 2;

/// What the threads share.
struct Shared {
    n: usize,
    barrier: SpinBarrier,
    /// `[(from * n + to) * 2 + parity]`.
    mail: Vec<Mutex<Vec<Msg>>>,
    /// Per `[shard * 2 + parity]`: earliest next wake, status, and the set of shards it wrote to.
    next: Vec<AtomicU64>,
    status: Vec<AtomicU8>,
    wrote_to: Vec<AtomicU64>,
    /// Set when a thread panics, so that the others stop waiting for it.
    poisoned: AtomicBool,
}

impl Shared {
    fn new(n: usize) -> Self {
        Shared {
            n,
            barrier: SpinBarrier::new(n),
            mail: (0..n * n * 2).map(|_| Mutex::new(Vec::new())).collect(),
            next: (0..n * 2).map(|_| AtomicU64::new(u64::MAX)).collect(),
            status: (0..n * 2).map(|_| AtomicU8::new(RUNNING)).collect(),
            wrote_to: (0..n * 2).map(|_| AtomicU64::new(0)).collect(),
            poisoned: AtomicBool::new(false),
        }
    }

    fn mailbox(&self, from: usize, to: usize, parity: usize) -> &Mutex<Vec<Msg>> {
        &self.mail[(from * self.n + to) * 2 + parity]
    }
}

/// Runs `shards` (at most 64) to the end, one thread each, and says how they stopped.
pub(crate) fn run(shards: &mut [Shard], env: &Env<'_>, limit: Option<u64>) -> Outcome {
    assert!(shards.len() <= 64, "at most 64 regions");
    for shard in shards.iter_mut() {
        shard.start();
    }
    let Some(first) = shards.iter_mut().filter_map(|s| s.cal.next_cycle()).min() else {
        return Outcome::Finished;
    };
    let shared = Shared::new(shards.len());
    std::thread::scope(|scope| {
        let (head, rest) = shards.split_first_mut().expect("at least one shard");
        for (i, shard) in rest.iter_mut().enumerate() {
            let shared = &shared;
            scope.spawn(move || lane(shard, i + 1, shared, env, limit, first));
        }
        lane(head, 0, &shared, env, limit, first)
    })
}

/// Sets `poisoned` if the thread unwinds.
struct PoisonOnPanic<'a>(&'a AtomicBool);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// One thread's loop over the rounds, from cycle `t`.
fn lane(
    shard: &mut Shard,
    me: usize,
    shared: &Shared,
    env: &Env<'_>,
    limit: Option<u64>,
    mut t: u64,
) -> Outcome {
    let _guard = PoisonOnPanic(&shared.poisoned);
    let mut parity = 0;
    let mut inbox = Vec::new();
    loop {
        let status = step(shard, env, limit, t);
        let sent_next = post(shard, me, shared, parity, t);
        let next = shard.cal.next_cycle().unwrap_or(u64::MAX).min(sent_next);
        shared.next[me * 2 + parity].store(next, Ordering::Relaxed);
        shared.status[me * 2 + parity].store(status, Ordering::Relaxed);
        shared.barrier.wait(&shared.poisoned);

        let mut global_next = u64::MAX;
        let mut stop = None;
        for other in 0..shared.n {
            global_next = global_next.min(shared.next[other * 2 + parity].load(Ordering::Relaxed));
            match shared.status[other * 2 + parity].load(Ordering::Relaxed) {
                FAILED => stop = Some(Outcome::Failed),
                OVER_LIMIT => stop = Some(Outcome::CycleLimit),
                _ => {}
            }
            let wrote = shared.wrote_to[other * 2 + parity].load(Ordering::Relaxed);
            if wrote & (1 << me) != 0 {
                let mut mailbox = shared
                    .mailbox(other, me, parity)
                    .lock()
                    .expect("no thread panics holding a mailbox");
                std::mem::swap(&mut *mailbox, &mut inbox);
                drop(mailbox);
                for msg in inbox.drain(..) {
                    shard.receive(msg, t);
                }
            }
        }
        if let Some(stop) = stop {
            return stop;
        }
        if global_next == u64::MAX {
            return Outcome::Finished;
        }
        shard.cal.advance(t + 1);
        t = global_next;
        parity ^= 1;
    }
}

/// Runs the shard's wakes of cycle `t`, if it has any; returns its status.
fn step(shard: &mut Shard, env: &Env<'_>, limit: Option<u64>, t: u64) -> u8 {
    if shard.cal.next_cycle() != Some(t) {
        return RUNNING;
    }
    if limit.is_some_and(|l| t > l) {
        return OVER_LIMIT;
    }
    shard.run_cycle(env, t);
    if shard.failure.is_some() {
        FAILED
    } else {
        RUNNING
    }
}

/// Posts the shard's outgoing messages of cycle `t`; returns the earliest wake they cause.
fn post(shard: &mut Shard, me: usize, shared: &Shared, parity: usize, t: u64) -> u64 {
    let mut earliest = u64::MAX;
    let mut wrote = 0u64;
    for to in 0..shared.n {
        let outbox = &mut shard.outbox[to];
        if outbox.is_empty() {
            continue;
        }
        for msg in outbox.iter() {
            let at = match *msg {
                Msg::Push { ready, .. } => ready,
                Msg::Credit { .. } => t + 1, // if the producer waits for it
            };
            earliest = earliest.min(at);
        }
        let mut mailbox = shared
            .mailbox(me, to, parity)
            .lock()
            .expect("no thread panics holding a mailbox");
        if mailbox.is_empty() {
            std::mem::swap(&mut *mailbox, outbox);
        } else {
            mailbox.append(outbox);
        }
        wrote |= 1 << to;
    }
    shared.wrote_to[me * 2 + parity].store(wrote, Ordering::Relaxed);
    earliest
}

/// A reusable barrier for a fixed number of threads: waiters spin briefly (the usual wait is a
/// few microseconds), then sleep on a condition variable, so that on a busy machine a thread
/// that has to wait gives its processor to the one it waits for.
struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// Waiters asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl SpinBarrier {
    /// Spins before sleeping.
    const SPINS: u32 = 1000;

    fn new(n: usize) -> Self {
        SpinBarrier {
            n,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Waits until all `n` threads have called `wait` for this round. Everything a thread wrote
    /// before its call is visible to every thread after theirs.
    fn wait(&self, poisoned: &AtomicBool) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation
                .store(generation.wrapping_add(1), Ordering::SeqCst);
            if self.sleepers.load(Ordering::SeqCst) > 0 {
                // Taking the lock orders this wake after any sleeper's last check.
                drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
                self.wake.notify_all();
            }
            return;
        }
        for _ in 0..Self::SPINS {
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            std::hint::spin_loop();
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.generation.load(Ordering::SeqCst) == generation {
            assert!(
                !poisoned.load(Ordering::Relaxed),
                "another region's thread panicked"
            );
            let timeout = std::time::Duration::from_millis(10);
            guard = match self.wake.wait_timeout(guard, timeout) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_barrier_orders_rounds_across_threads() {
        // Each thread adds its id to a shared sum every round; after each barrier every thread
        // sees the full sum of that round: 0 + 1 + 2 + 3 = 6 per round.
        let n = 4;
        let barrier = SpinBarrier::new(n);
        let poisoned = AtomicBool::new(false);
        let sums: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|s| {
            for id in 0..n as u64 {
                let (barrier, poisoned, sums) = (&barrier, &poisoned, &sums);
                s.spawn(move || {
                    for round in 0..200u64 {
                        let slot = &sums[(round % 2) as usize];
                        slot.fetch_add(id, Ordering::Relaxed);
                        barrier.wait(poisoned);
                        assert_eq!(slot.load(Ordering::Relaxed), 6 * (round / 2 + 1));
                        barrier.wait(poisoned);
                    }
                });
            }
        });
    }
}
