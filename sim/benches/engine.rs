//! Engine throughput: events and wavelet hops per second of host time.
//!
//! `cargo bench -p wafersim-sim` prints, per case, the time per run and the throughput in
//! engine events (`elem/s`). The cases:
//! - `spmv_64x64`: the SDK-style sparse matrix-vector product on a 64 x 64 fabric
//!   (A 2048 x 2048, x 25 % dense): AXPY tasks, column multicasts and row reductions.
//! - `hops_row_256`: 4096 wavelets streamed through a row of 256 routers (pure routing).

#[path = "../tests/common/spmv.rs"]
mod spmv;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wafersim_sim::*;

fn spmv_64x64(c: &mut Criterion) {
    let problem = spmv::Spmv::new(2048, 2048, 0.25);
    let config = FabricConfig::rectangle(64, 64).unwrap();
    let run = || {
        let (program, _) = spmv::build(&problem, config.clone(), 64, 64);
        Simulator::new(program)
            .unwrap()
            .run(RunOptions::default())
            .unwrap()
    };
    let stats = run().stats;
    eprintln!(
        "spmv_64x64: {} cycles, {} events, {} FMACs, {} router forwards",
        stats.cycles, stats.events, stats.total.fmacs, stats.total.router_forwards
    );
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(stats.events));
    group.bench_function("spmv_64x64", |b| b.iter(run));
    group.finish();
}

fn hops_row(c: &mut Criterion) {
    let (k, n) = (256u32, 4096u32);
    let build = || {
        let mut p = Program::new(FabricConfig::rectangle(k, 1).unwrap()).unwrap();
        for x in 0..k {
            p.route(Coord::new(x, 0), Color(0), Port::West, Port::East)
                .unwrap();
        }
        p.collect(Coord::new(k - 1, 0), Port::East).unwrap();
        p.inject(
            Coord::new(0, 0),
            Port::West,
            (0..n).map(|i| (Color(0), Wavelet(i))),
        )
        .unwrap();
        p
    };
    let stats = Simulator::new(build())
        .unwrap()
        .run(RunOptions::default())
        .unwrap()
        .stats;
    eprintln!(
        "hops_row_256: {} hops, {} events",
        stats.total.router_forwards, stats.events
    );
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(stats.total.router_forwards));
    group.bench_function("hops_row_256", |b| {
        b.iter(|| {
            Simulator::new(build())
                .unwrap()
                .run(RunOptions::default())
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, spmv_64x64, hops_row);
criterion_main!(benches);
