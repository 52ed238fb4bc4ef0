//! The row and column collectives, each run on its own and checked value by value.

use wafersim_kernels::chain::{ChainColors, ColumnChain, RowAllReduce, RowChain};
use wafersim_kernels::join::{self, Join};
use wafersim_kernels::layout::Region;
use wafersim_sim::*;

fn config(w: u32, h: u32) -> FabricConfig {
    FabricConfig::rectangle(w, h).unwrap()
}

/// Each PE of a row holds `[c + 1, 10 (c + 1)]`; after the all-reduce every PE holds the sums.
#[test]
fn row_all_reduce_leaves_the_total_everywhere() {
    for cols in [1u32, 2, 3, 6] {
        let region = Region::at_origin(cols, 1);
        let ar = RowAllReduce {
            east: ChainColors([Color(1), Color(2)]),
            broadcast: Color(3),
        };
        let mut p = Program::new(config(cols, 1)).unwrap();
        let mut bufs = Vec::new();
        for c in 0..cols {
            let pe = region.pe(c, 0);
            ar.install(&mut p, region, c, 0).unwrap();
            let v = p
                .alloc_f32(pe, "v", &[(c + 1) as f32, 10.0 * (c + 1) as f32])
                .unwrap();
            let base = p.next_task_id(pe).unwrap().0;
            // Tasks: join1 arms (4), join2 arms (4), phase2, done.
            let phase2 = TaskId(base + 8);
            let done = TaskId(base + 9);
            let j1 = Join::place(&mut p, pe, phase2).unwrap();
            let j2 = Join::place(&mut p, pe, done).unwrap();
            let (cu, n) = (c as usize, cols as usize);
            let t = p
                .local_task(pe, "broadcast", move |ctx| {
                    join::issue(ctx, &ar.broadcast_ops(cu, n, v.all()), &j2)
                })
                .unwrap();
            assert_eq!(t, phase2);
            let d = p.local_task(pe, "done", |_| {}).unwrap();
            assert_eq!(d, done);
            let start = p
                .local_task(pe, "reduce", move |ctx| {
                    join::issue(ctx, &ar.reduce_ops(cu, n, v.all()), &j1)
                })
                .unwrap();
            p.activate(pe, start).unwrap();
            bufs.push((pe, v));
        }
        let run = Simulator::new(p)
            .unwrap()
            .run(RunOptions::default())
            .unwrap();
        let total = (cols * (cols + 1) / 2) as f32;
        for (pe, v) in bufs {
            assert_eq!(
                run.read(pe, v).unwrap(),
                vec![total, 10.0 * total],
                "cols {cols} at {pe}"
            );
        }
    }
}

/// PE column c holds a partial vector `[c, c, c, c, c, c]`; segments of 2 are owned by columns
/// 0, 1, 2: each owner ends with 0 + 1 + 2 = 3 in its segment.
#[test]
fn row_reduce_scatter_and_all_gather() {
    let cols = 3u32;
    let region = Region::at_origin(cols, 1);
    let chain = RowChain {
        east: ChainColors([Color(1), Color(2)]),
        west: ChainColors([Color(3), Color(4)]),
    };
    let mut p = Program::new(config(cols, 1)).unwrap();
    let mut outs = Vec::new();
    for c in 0..cols {
        let pe = region.pe(c, 0);
        chain.install(&mut p, region, c, 0).unwrap();
        let partial = p.alloc_f32(pe, "partial", &[c as f32; 6]).unwrap();
        let result = p.alloc_zeros(pe, "result", DType::F32, 2).unwrap();
        let gathered = p.alloc_zeros(pe, "gathered", DType::F32, 6).unwrap();
        let base = p.next_task_id(pe).unwrap().0;
        let gather_id = TaskId(base + 8);
        let done_id = TaskId(base + 9);
        let j1 = Join::place(&mut p, pe, gather_id).unwrap();
        let j2 = Join::place(&mut p, pe, done_id).unwrap();
        let cu = c as usize;
        p.local_task(pe, "gather", move |ctx| {
            let own = gathered.slice(2 * c, 2);
            ctx.mov(own, result.all());
            let segs: Vec<(usize, VecRef)> = (0..3)
                .map(|b| (b, gathered.slice(2 * b as u32, 2)))
                .collect();
            join::issue(ctx, &chain.all_gather(cu, 3, &segs, result.all()), &j2);
        })
        .unwrap();
        p.local_task(pe, "done", |_| {}).unwrap();
        let start = p
            .local_task(pe, "reduce", move |ctx| {
                let segs: Vec<(usize, VecRef, VecRef)> = (0..3)
                    .map(|b| (b, partial.slice(2 * b as u32, 2), result.all()))
                    .collect();
                ctx.mov(result.all(), partial.slice(2 * c, 2));
                join::issue(ctx, &chain.reduce_scatter(cu, 3, &segs), &j1);
            })
            .unwrap();
        p.activate(pe, start).unwrap();
        outs.push((pe, result, gathered));
    }
    let run = Simulator::new(p)
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    for (pe, result, gathered) in outs {
        assert_eq!(run.read(pe, result).unwrap(), vec![3.0, 3.0], "{pe}");
        assert_eq!(run.read(pe, gathered).unwrap(), vec![3.0; 6], "{pe}");
    }
}

/// Rows hold `[r + 1; 3]`; the south edge sees `[1 + 2 + ... + R; 3]`, past two idle PEs.
#[test]
fn column_reduce_leaves_through_the_south_edge() {
    let rows = 4u32;
    let region = Region::at_origin(1, rows);
    let chain = ColumnChain {
        south: ChainColors([Color(5), Color(6)]),
    };
    let mut p = Program::new(config(1, rows + 2)).unwrap();
    let sink = chain.install_exit(&mut p, region, 0).unwrap();
    for r in 0..rows {
        let pe = region.pe(0, r);
        chain.install(&mut p, region, 0, r).unwrap();
        let v = p.alloc_f32(pe, "v", &[(r + 1) as f32; 3]).unwrap();
        let ru = r as usize;
        let t = p
            .local_task(pe, "reduce", move |ctx| {
                ctx.issue(chain.reduce_south(ru, v.all()), Then::Nothing)
            })
            .unwrap();
        p.activate(pe, t).unwrap();
    }
    let run = Simulator::new(p)
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    let got: Vec<f32> = run
        .sink(sink)
        .received
        .iter()
        .map(|(_, _, w)| w.f32())
        .collect();
    assert_eq!(got, vec![10.0; 3]);
}
