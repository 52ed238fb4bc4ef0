//! Timing laws of the fabric, each checked against cycle counts worked out by hand from the
//! default machine (hop 1, ramp 2, task switch 3, issue 1, queue depth 4).

use wafersim_sim::*;

fn fabric(w: u32, h: u32) -> Program {
    Program::new(FabricConfig::rectangle(w, h).unwrap()).unwrap()
}

fn run(p: Program) -> Executed {
    Simulator::new(p)
        .unwrap()
        .run(RunOptions::default())
        .unwrap()
}

fn traced(p: Program) -> Executed {
    let window = TraceWindow {
        origin: Coord::new(0, 0),
        width: 64,
        height: 64,
        start: 0,
        end: u64::MAX,
    };
    Simulator::new(p)
        .unwrap()
        .run(RunOptions {
            trace: Some(window),
            ..RunOptions::default()
        })
        .unwrap()
}

/// Start cycles of the tasks called `name` on `pe`, from the trace.
fn task_starts(run: &Executed, pe: Coord, name: &str) -> Vec<u64> {
    let events = &run.stats.trace.as_ref().unwrap().events;
    events
        .iter()
        .filter_map(|e| match *e {
            TraceEvent::Task {
                pe: p,
                name: n,
                start,
                ..
            } if p == pe && n == name => Some(start),
            _ => None,
        })
        .collect()
}

/// A row of `k` PEs passing `color` east, injected at the west edge and collected at the east.
fn row_pipe(k: u32, color: Color) -> (Program, SinkId) {
    let mut p = fabric(k, 1);
    for x in 0..k {
        p.route(Coord::new(x, 0), color, Port::West, Port::East)
            .unwrap();
    }
    let sink = p.collect(Coord::new(k - 1, 0), Port::East).unwrap();
    (p, sink)
}

#[test]
fn a_wavelet_crossing_k_routers_takes_k_plus_one_hops() {
    // Injected at cycle 0 into PE 0's west buffer: visible at 1. Router x forwards at x + 1 and
    // the sink east of router k-1 sees it at k + 1: k + 1 links of one cycle each.
    for k in [1u32, 2, 5, 17] {
        let color = Color(3);
        let (mut p, sink) = row_pipe(k, color);
        p.inject(Coord::new(0, 0), Port::West, [(color, Wavelet(42))])
            .unwrap();
        let r = run(p);
        assert_eq!(
            r.sink(sink).received,
            vec![(u64::from(k) + 1, color, Wavelet(42))],
            "k = {k}"
        );
        assert_eq!(r.stats.cycles, u64::from(k) + 1);
    }
}

#[test]
fn n_wavelets_over_one_link_take_n_cycles_plus_latency() {
    // One wavelet per cycle: the i-th (from 0) reaches the sink at k + 1 + i.
    let (k, n, color) = (4u32, 10u64, Color(0));
    let (mut p, sink) = row_pipe(k, color);
    p.inject(
        Coord::new(0, 0),
        Port::West,
        (0..n).map(|i| (color, Wavelet(i as u32))),
    )
    .unwrap();
    let r = run(p);
    let expected: Vec<(u64, Color, Wavelet)> = (0..n)
        .map(|i| (u64::from(k) + 1 + i, color, Wavelet(i as u32)))
        .collect();
    assert_eq!(r.sink(sink).received, expected);
    // Every router forwarded all n; every link on the way carried n.
    for x in 0..k {
        assert_eq!(r.stats.link(Coord::new(x, 0), color, Port::East), n);
    }
}

#[test]
fn a_core_to_core_message_pays_ramp_hops_ramp_and_the_task_switch() {
    // PE 0's start task runs at 0: switch 3 + issue 1, so its send starts at 4. The wavelet is on
    // PE 0's router at 4 + ramp 2 = 6, crosses k links (visible at PE k at 6 + k), reaches PE k's
    // core at 6 + k + 2 = 8 + k, where the data task starts.
    for k in [1u32, 3, 8] {
        let mut p = fabric(k + 1, 1);
        let c = Color(1);
        p.route(Coord::new(0, 0), c, Port::Ramp, Port::East)
            .unwrap();
        for x in 1..k {
            p.route(Coord::new(x, 0), c, Port::West, Port::East)
                .unwrap();
        }
        let dst = Coord::new(k, 0);
        p.route(dst, c, Port::West, Port::Ramp).unwrap();
        let src = p.alloc_f32(Coord::new(0, 0), "v", &[1.5]).unwrap();
        let start = p
            .local_task(Coord::new(0, 0), "start", move |ctx| {
                ctx.send(c, src.all(), Then::Nothing)
            })
            .unwrap();
        p.activate(Coord::new(0, 0), start).unwrap();
        let out = p.alloc_f32(dst, "out", &[0.0]).unwrap();
        p.data_task(dst, c, "receive", move |ctx| {
            let v = ctx.wavelet().f32();
            ctx.store(out.at(0), v);
        })
        .unwrap();
        let r = traced(p);
        assert_eq!(
            task_starts(&r, dst, "receive"),
            vec![8 + u64::from(k)],
            "k = {k}"
        );
        assert_eq!(r.read(dst, out).unwrap(), vec![1.5]);
        // The receive task costs switch 3 + one store 1: the run ends at 8 + k + 4.
        assert_eq!(r.stats.cycles, 12 + u64::from(k));
    }
}

#[test]
fn multicast_down_a_column_reaches_every_core() {
    // Injected north of PE (0, 0): visible there at 1; router y forwards at 1 + y to its core
    // (visible at 3 + y) and south. Each core adds the values it receives.
    let h = 6u32;
    let c = Color(5);
    let mut p = fabric(1, h);
    let mut sums = Vec::new();
    for y in 0..h {
        let pe = Coord::new(0, y);
        let tx = if y + 1 < h {
            PortSet::of(&[Port::Ramp, Port::South])
        } else {
            Port::Ramp.into()
        };
        p.route(pe, c, Port::North, tx).unwrap();
        let acc = p.alloc_f32(pe, "acc", &[0.0]).unwrap();
        p.data_task(pe, c, "accumulate", move |ctx| {
            let v = ctx.wavelet().f32();
            let old = ctx.load(acc.at(0));
            ctx.store(acc.at(0), old + v);
        })
        .unwrap();
        sums.push((pe, acc));
    }
    let values = [1.0f32, 2.0, 4.0];
    p.inject(
        Coord::new(0, 0),
        Port::North,
        values.iter().map(|&v| (c, Wavelet::from_f32(v))),
    )
    .unwrap();
    let r = traced(p);
    for (y, (pe, acc)) in sums.into_iter().enumerate() {
        assert_eq!(r.read(pe, acc).unwrap(), vec![7.0]);
        // Wavelet i reaches core y at 3 + y + i; each task takes 3 + 2 = 5 cycles, so later
        // ones queue: starts at 3 + y, 8 + y, 13 + y.
        let y = y as u64;
        assert_eq!(
            task_starts(&r, pe, "accumulate"),
            vec![3 + y, 8 + y, 13 + y]
        );
        let stats = r.stats.pe(pe).unwrap();
        assert_eq!(stats.wavelets_received, 3);
        assert_eq!(stats.tasks_run, 3);
    }
    // A multicast moves once per wavelet per router, but uses each of its output links.
    assert_eq!(r.stats.pe(Coord::new(0, 0)).unwrap().router_forwards, 3);
    assert_eq!(r.stats.link(Coord::new(0, 0), c, Port::Ramp), 3);
    assert_eq!(r.stats.link(Coord::new(0, 0), c, Port::South), 3);
}

#[test]
fn a_slow_consumer_backpressures_without_losing_anything() {
    // Each task fills 100 f32 at width 2: 3 + (1 + 50) = 54 cycles. The first wavelet reaches
    // the core at 3, so task i (from 0) starts at 3 + 54 i and the run ends at 3 + 54 n.
    let n = 20u64;
    let c = Color(0);
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    p.route(pe, c, Port::North, Port::Ramp).unwrap();
    let scratch = p.alloc_zeros(pe, "scratch", DType::F32, 100).unwrap();
    let acc = p.alloc_f32(pe, "acc", &[0.0]).unwrap();
    p.data_task(pe, c, "slow", move |ctx| {
        let v = ctx.wavelet().f32();
        ctx.fill(scratch.all(), v);
        let old = ctx.load(acc.at(0));
        ctx.store(acc.at(0), old + v);
        // The two scalar accesses cost 2 more cycles.
    })
    .unwrap();
    p.inject(
        pe,
        Port::North,
        (0..n).map(|i| (c, Wavelet::from_f32(i as f32))),
    )
    .unwrap();
    let r = traced(p);
    let per_task = 3 + 1 + 50 + 2;
    let starts: Vec<u64> = (0..n).map(|i| 3 + per_task * i).collect();
    assert_eq!(task_starts(&r, pe, "slow"), starts);
    assert_eq!(r.stats.cycles, 3 + per_task * n);
    // Every value arrived exactly once: 0 + 1 + ... + 19.
    assert_eq!(r.read(pe, acc).unwrap(), vec![190.0]);
    let s = r.stats.pe(pe).unwrap();
    assert_eq!(
        s.queue_high_water, 4,
        "both buffers fill to the configured depth"
    );
    assert!(
        s.router_wait_cycles > 0,
        "wavelets waited at the router for room"
    );
}

#[test]
fn vector_instruction_costs_follow_the_simd_table() {
    // fmac f32 width 1, f16 width 4, f16 into f32 width 2; add f32 width 2; exp 4 per element;
    // each plus one issue cycle. The task also pays the 3-cycle switch.
    let len = 10u32;
    let cases: Vec<(&str, u64)> = vec![
        ("fmac_f32", 1 + 10),
        ("fmac_f16", 1 + 3),
        ("fmac_mixed", 1 + 5),
        ("add_f32", 1 + 5),
        ("exp_f32", 1 + 40),
        ("max_f32", 1 + 10),
    ];
    for (name, cycles) in cases {
        let mut p = fabric(1, 1);
        let pe = Coord::new(0, 0);
        let a32 = p.alloc_f32(pe, "a32", &vec![0.5; len as usize]).unwrap();
        let b32 = p.alloc_zeros(pe, "b32", DType::F32, len as usize).unwrap();
        let a16 = p.alloc_zeros(pe, "a16", DType::F16, len as usize).unwrap();
        let b16 = p.alloc_zeros(pe, "b16", DType::F16, len as usize).unwrap();
        let op = name;
        let t = p
            .local_task(pe, "op", move |ctx| match op {
                "fmac_f32" => ctx.fmac(b32.all(), a32.all(), 2.0),
                "fmac_f16" => ctx.fmac(b16.all(), a16.all(), 2.0),
                "fmac_mixed" => ctx.fmac(b32.all(), a16.all(), 2.0),
                "add_f32" => ctx.add(b32.all(), a32.all(), a32.all()),
                "exp_f32" => ctx.exp(b32.all(), a32.all()),
                "max_f32" => ctx.max(b32.all(), a32.all(), b32.all()),
                _ => unreachable!(),
            })
            .unwrap();
        p.activate(pe, t).unwrap();
        let r = run(p);
        assert_eq!(r.stats.cycles, 3 + cycles, "{name}");
        let fmacs = if name.starts_with("fmac") {
            u64::from(len)
        } else {
            0
        };
        assert_eq!(r.stats.total.fmacs, fmacs, "{name}");
    }
}

/// `1/x`, `1/sqrt(x)` and `ln x` of one scalar: software routines at 4 cycles each (one element
/// of `exp`), with the f32 values. One task: switch 3, a load 1, the three routines 12, three
/// stores 3: 19 cycles.
#[test]
fn software_scalar_routines_cost_one_exp_element_each() {
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    let x = p.alloc_f32(pe, "x", &[6.25]).unwrap();
    let out = p.alloc_zeros(pe, "out", DType::F32, 3).unwrap();
    let t = p
        .local_task(pe, "routines", move |ctx| {
            let v = ctx.load(x.at(0));
            let (r, s, l) = (ctx.recip(v), ctx.rsqrt(v), ctx.ln(v));
            ctx.store(out.at(0), r);
            ctx.store(out.at(1), s);
            ctx.store(out.at(2), l);
        })
        .unwrap();
    p.activate(pe, t).unwrap();
    let r = run(p);
    assert_eq!(r.stats.cycles, 3 + 1 + 3 * 4 + 3);
    assert_eq!(r.read(pe, out).unwrap(), vec![0.16, 0.4, 6.25f32.ln()]);
}

#[test]
fn the_wse3_preset_doubles_simd_widths() {
    // fp16 FMAC of 10 elements at width 8: 1 + 2 cycles, plus the switch.
    let mut p = Program::new(FabricConfig {
        width: 1,
        height: 1,
        ..FabricConfig::wse3()
    })
    .unwrap();
    let pe = Coord::new(0, 0);
    let a = p.alloc_zeros(pe, "a", DType::F16, 10).unwrap();
    let b = p.alloc_zeros(pe, "b", DType::F16, 10).unwrap();
    let t = p
        .local_task(pe, "op", move |ctx| ctx.fmac(b.all(), a.all(), 1.0))
        .unwrap();
    p.activate(pe, t).unwrap();
    assert_eq!(run(p).stats.cycles, 3 + 1 + 2);
}

#[test]
fn colors_sharing_a_link_take_turns() {
    // Two host streams enter PE (0, 0) from the north and the west on colors 0 and 1, both
    // routed east. The east link carries one wavelet per cycle, so 2n wavelets need 2n cycles, and
    // round-robin arbitration alternates the colors.
    let n = 5u32;
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    p.route(pe, Color(0), Port::North, Port::East).unwrap();
    p.route(pe, Color(1), Port::West, Port::East).unwrap();
    let sink = p.collect(pe, Port::East).unwrap();
    p.inject(pe, Port::North, (0..n).map(|i| (Color(0), Wavelet(i))))
        .unwrap();
    p.inject(pe, Port::West, (0..n).map(|i| (Color(1), Wavelet(100 + i))))
        .unwrap();
    let r = run(p);
    let got = &r.sink(sink).received;
    assert_eq!(got.len(), 2 * n as usize);
    let cycles: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        cycles,
        (2..2 + 2 * u64::from(n)).collect::<Vec<_>>(),
        "one per cycle from cycle 2"
    );
    let colors: Vec<u8> = got.iter().map(|g| g.1.0).collect();
    assert_eq!(colors, vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
}
