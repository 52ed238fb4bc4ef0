//! Cutting a program into rectangular regions for a parallel run: which PEs each region gets,
//! and the split of the one-shard program into one shard per region.
//!
//! Regions are strips across the longer side of the box holding the program's PEs (columns of
//! PEs for a wide program, rows for a tall one), cut so that each strip has about the same number
//! of PEs. Strips keep the boundary short in one direction and every boundary link a plain
//! east-west (or north-south) neighbour pair.
//!
//! What is NOT here: running the regions ([`crate::parallel`]). The split happens before cycle 0,
//! so every queue is empty and every calendar fresh; only ids are renumbered, and each route
//! leading into another region is given a [`Remote`] counter on the sending side.

use crate::shard::{
    Item, NONE, Producer, REMOTE_BIT, ROUTER, Remote, SINK_BIT, Shard, ShardSink, comp, comp_kind,
    comp_pe,
};

/// Splits `full` (every PE, in program order) into at most `wanted` shards; returns at least one.
pub(crate) fn split(full: Shard, wanted: usize) -> Vec<Shard> {
    let region_of = assign(&full, wanted);
    let regions = region_of.iter().max().map_or(1, |&r| r as usize + 1);
    if regions == 1 {
        return vec![full];
    }
    Splitter::new(full, region_of, regions).run()
}

/// The region of each PE: balanced strips along the longer side of the PEs' bounding box.
fn assign(full: &Shard, wanted: usize) -> Vec<u32> {
    let coords: Vec<(u32, u32)> = full.pes.iter().map(|p| (p.coord.x, p.coord.y)).collect();
    let (Some(x0), Some(x1)) = (
        coords.iter().map(|c| c.0).min(),
        coords.iter().map(|c| c.0).max(),
    ) else {
        return Vec::new();
    };
    let y0 = coords.iter().map(|c| c.1).min().unwrap_or(0);
    let y1 = coords.iter().map(|c| c.1).max().unwrap_or(0);
    let by_column = x1 - x0 >= y1 - y0;
    let (lo, hi) = if by_column { (x0, x1) } else { (y0, y1) };
    let line = |c: &(u32, u32)| (if by_column { c.0 } else { c.1 } - lo) as usize;
    let mut per_line = vec![0usize; (hi - lo) as usize + 1];
    for c in &coords {
        per_line[line(c)] += 1;
    }
    let cut = cut_lines(&per_line, wanted);
    coords.iter().map(|c| cut[line(c)]).collect()
}

/// The region of each line so that regions are contiguous, non-empty and about equal in PEs.
fn cut_lines(per_line: &[usize], wanted: usize) -> Vec<u32> {
    let busy = per_line.iter().filter(|&&n| n > 0).count();
    let regions = wanted.clamp(1, busy.clamp(1, 64));
    let total: usize = per_line.iter().sum();
    let mut region_of = vec![0u32; per_line.len()];
    let (mut region, mut seen, mut busy_seen) = (0usize, 0usize, 0usize);
    for (i, &n) in per_line.iter().enumerate() {
        // Start the next region once this one has its share, keeping a busy line for each of
        // the regions still to come.
        let share_done = seen * regions >= (region + 1) * total;
        let lines_left = busy - busy_seen;
        if n > 0 && region + 1 < regions && (share_done || lines_left < regions - region) {
            region += 1;
        }
        region_of[i] = region as u32;
        seen += n;
        busy_seen += usize::from(n > 0);
    }
    region_of
}

/// Moves PEs, queues, routes, streams and sinks from one shard into per-region shards.
struct Splitter {
    full: Shard,
    region_of: Vec<u32>,
    /// New index of each PE in its region.
    local_pe: Vec<u32>,
    /// Region and new index of each queue.
    queue_at: Vec<(u32, u32)>,
    /// The sending region's remote link for each queue fed across a boundary.
    remote_of: Vec<u32>,
    /// Index of each program sink in the shard of its PE.
    sink_local: Vec<u32>,
    shards: Vec<Shard>,
}

impl Splitter {
    fn new(full: Shard, region_of: Vec<u32>, regions: usize) -> Self {
        let depth = full.ring_mask + 1;
        let mut counts = vec![0u32; regions];
        let local_pe = region_of
            .iter()
            .map(|&r| {
                counts[r as usize] += 1;
                counts[r as usize] - 1
            })
            .collect();
        let shards = (0..regions)
            .map(|_| {
                let mut s = Shard::new(depth);
                s.ring_mask = full.ring_mask;
                s.outbox = vec![Vec::new(); regions];
                s
            })
            .collect();
        let queues = full.queues.len();
        Splitter {
            full,
            region_of,
            local_pe,
            queue_at: Vec::with_capacity(queues),
            remote_of: vec![NONE; queues],
            sink_local: Vec::new(),
            shards,
        }
    }

    fn run(mut self) -> Vec<Shard> {
        self.move_pes();
        self.move_queues();
        self.move_injectors();
        for shard in &mut self.shards {
            shard.copy_routes_into_buffers();
        }
        self.shards
    }

    /// Gives each queue its region and index there, in program order.
    fn number_queues(&mut self) {
        let mut counts = vec![0u32; self.shards.len()];
        for q in &self.full.queues {
            let r = self.region_of[q.owner as usize];
            self.queue_at.push((r, counts[r as usize]));
            counts[r as usize] += 1;
        }
    }

    fn move_pes(&mut self) {
        self.number_queues();
        let pes = std::mem::take(&mut self.full.pes);
        // Routes and router buffer lists are stored PE after PE, in program order.
        let mut routes = std::mem::take(&mut self.full.routes).into_iter();
        let mut inbufs = std::mem::take(&mut self.full.inbufs).into_iter();
        let mut tasks = std::mem::take(&mut self.full.tasks).into_iter();
        for (p, mut pe) in pes.into_iter().enumerate() {
            let r = self.region_of[p] as usize;
            pe.route_start = self.shards[r].routes.len() as u32;
            for mut route in routes.by_ref().take(pe.route_len as usize) {
                for d in route.dest.iter_mut().filter(|d| **d != NONE) {
                    *d = self.dest_from(r, p as u32, *d);
                }
                self.shards[r].routes.push(route);
            }
            pe.inbuf_start = self.shards[r].inbufs.len() as u32;
            for q in inbufs.by_ref().take(pe.inbuf_len as usize) {
                let local = self.queue_at[q as usize].1;
                self.shards[r].inbufs.push(local);
            }
            for (_, q) in pe.core_in.iter_mut().chain(pe.core_out.iter_mut()) {
                *q = self.queue_at[*q as usize].1;
            }
            pe.task_start = self.shards[r].tasks.len() as u32;
            for mut task in tasks.by_ref().take(pe.task_states.count as usize) {
                if task.queue != NONE {
                    task.queue = self.queue_at[task.queue as usize].1;
                }
                self.shards[r].tasks.push(task);
            }
            pe.injectors = [NONE; 4];
            self.shards[r].pes.push(pe);
        }
    }

    /// Route destination `d` of PE `p` (global ids) as seen from its region `r`.
    fn dest_from(&mut self, r: usize, p: u32, d: u32) -> u32 {
        if d & SINK_BIT != 0 {
            let id = (d & !SINK_BIT) as usize;
            if self.sink_local.len() <= id {
                self.sink_local.resize(id + 1, NONE);
            }
            if self.sink_local[id] == NONE {
                // Several colors may leave through one sink; they share its log.
                let shard = &mut self.shards[r];
                shard.sinks.push(ShardSink {
                    id: id as u32,
                    received: Vec::new(),
                });
                self.sink_local[id] = shard.sinks.len() as u32 - 1;
            }
            return SINK_BIT | self.sink_local[id];
        }
        let (owner_region, q) = self.queue_at[d as usize];
        if owner_region as usize == r {
            return q;
        }
        let shard = &mut self.shards[r];
        shard.remotes.push(Remote {
            shard: owner_region,
            queue: q,
            outstanding: 0,
            waiting: false,
            producer: comp(self.local_pe[p as usize], ROUTER),
        });
        let link = shard.remotes.len() as u32 - 1;
        self.remote_of[d as usize] = link;
        REMOTE_BIT | link
    }

    fn move_queues(&mut self) {
        let queues = std::mem::take(&mut self.full.queues);
        for (i, mut queue) in queues.into_iter().enumerate() {
            let owner = queue.owner as usize;
            let r = self.region_of[owner];
            queue.producer = match queue.producer {
                Producer::Local(c) => {
                    let producer = comp_pe(c) as usize;
                    let kind = comp_kind(c);
                    if self.region_of[producer] == r {
                        Producer::Local(comp(self.local_pe[producer], kind))
                    } else {
                        Producer::Remote {
                            shard: self.region_of[producer],
                            link: self.remote_of[i],
                        }
                    }
                }
                other => other,
            };
            queue.owner = self.local_pe[owner];
            let shard = &mut self.shards[r as usize];
            queue.base = shard.items.len() as u32;
            let ring = shard.ring_mask as usize + 1;
            shard
                .items
                .extend(std::iter::repeat_n(Item::default(), ring));
            debug_assert_eq!(shard.queues.len() as u32, self.queue_at[i].1);
            shard.queues.push(queue);
        }
    }

    fn move_injectors(&mut self) {
        let injectors = std::mem::take(&mut self.full.injectors);
        for mut inj in injectors {
            let p = inj.pe as usize;
            let r = self.region_of[p] as usize;
            inj.pe = self.local_pe[p];
            for q in inj.queue_of.iter_mut().filter(|q| **q != NONE) {
                *q = self.queue_at[*q as usize].1;
            }
            let kind = crate::shard::injector_kind(inj.port) as usize;
            let shard = &mut self.shards[r];
            let id = shard.injectors.len() as u32;
            shard.pes[inj.pe as usize].injectors[kind] = id;
            shard.injectors.push(inj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_into_balanced_contiguous_regions() {
        assert_eq!(cut_lines(&[4, 4, 4, 4], 2), vec![0, 0, 1, 1]);
        assert_eq!(cut_lines(&[4, 4, 4, 4], 4), vec![0, 1, 2, 3]);
        // 12 PEs in 3 regions: 4 each, as near as whole lines allow.
        assert_eq!(cut_lines(&[1, 1, 1, 1, 8], 2), vec![0, 0, 0, 0, 1]);
        // More regions than busy lines: one per busy line; empty lines join a neighbour.
        assert_eq!(cut_lines(&[3, 0, 3], 4), vec![0, 0, 1]);
        assert_eq!(cut_lines(&[5], 3), vec![0]);
    }
}
