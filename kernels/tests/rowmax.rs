//! The row max all-reduce on its own: every PE of each row ends with the row's element-wise max.

use wafersim_kernels::chain::ChainColors;
use wafersim_kernels::layout::Region;
use wafersim_kernels::rowmax::RowMaxAllReduce;
use wafersim_sim::*;

/// PE (c, r) holds `[v0, v1, v2]` with `v0 = (3c + r) mod 5 - 2`, `v1 = -c - r`, `v2 = c - 10 r`:
/// row r's maxima are `max_c v0`, `-r` (column 0) and `cols - 1 - 10 r` (the last column).
fn values(c: u32, r: u32) -> [f32; 3] {
    let (c, r) = (c as i32, r as i32);
    [
        ((3 * c + r) % 5 - 2) as f32,
        (-c - r) as f32,
        (c - 10 * r) as f32,
    ]
}

#[test]
fn every_pe_of_a_row_ends_with_the_row_maximum() {
    for cols in [1u32, 2, 3, 6] {
        let rows = 2;
        let region = Region::at_origin(cols, rows);
        let max = RowMaxAllReduce {
            east: ChainColors([Color(4), Color(5)]),
            broadcast: Color(6),
        };
        let mut p = Program::new(FabricConfig::rectangle(cols, rows).unwrap()).unwrap();
        let mut bufs = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                let pe = region.pe(c, r);
                max.install(&mut p, region, c, r).unwrap();
                let v = p.alloc_f32(pe, "v", &values(c, r)).unwrap();
                let done = p.local_task(pe, "done", |_| {}).unwrap();
                let part = max.place(&mut p, region, (c, r), v.all(), done).unwrap();
                let start = p
                    .local_task(pe, "start", move |ctx| part.start(ctx))
                    .unwrap();
                p.activate(pe, start).unwrap();
                bufs.push((c, r, v));
            }
        }
        let run = Simulator::new(p)
            .unwrap()
            .run(RunOptions::default())
            .unwrap();
        for (c, r, v) in bufs {
            let want0 = (0..cols).map(|k| values(k, r)[0]).fold(f32::MIN, f32::max);
            let want = vec![want0, -(r as f32), (cols - 1) as f32 - 10.0 * r as f32];
            assert_eq!(
                run.read(region.pe(c, r), v).unwrap(),
                want,
                "cols {cols} at ({c}, {r})"
            );
        }
        assert_eq!(run.stats.total.fmacs, 0);
    }
}
