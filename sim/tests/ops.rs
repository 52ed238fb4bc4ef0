//! Instructions and their numbers: f16 arithmetic, receives, store-and-forward, unblocking by an
//! asynchronous operation, and region aggregates of the statistics.

use half::f16;
use wafersim_sim::*;

fn one_pe() -> (Program, Coord) {
    (
        Program::new(FabricConfig::rectangle(1, 1).unwrap()).unwrap(),
        Coord::new(0, 0),
    )
}

fn run(p: Program) -> Executed {
    Simulator::new(p)
        .unwrap()
        .run(RunOptions::default())
        .unwrap()
}

#[test]
fn f16_instructions_round_each_result_once() {
    // 1 + 2^-11 is not an f16 (the spacing above 1 is 2^-10): 1.0 + 0.5 * 2^-10 rounds to even,
    // back to 1.0; in f32 it would be 1.00048828125.
    let (mut p, pe) = one_pe();
    let a = p
        .alloc_f16(pe, "a", &[f16::from_f32(1.0), f16::from_f32(3.0)])
        .unwrap();
    let b = p
        .alloc_f16(
            pe,
            "b",
            &[f16::from_f32(2.0f32.powi(-10)), f16::from_f32(0.25)],
        )
        .unwrap();
    let c = p.alloc_zeros(pe, "c", DType::F16, 2).unwrap();
    let acc = p.alloc_f32(pe, "acc", &[1.0, 1.0]).unwrap();
    let t = p
        .local_task(pe, "ops", move |ctx| {
            ctx.mov(c.all(), a.all());
            ctx.fmac(c.all(), b.all(), 0.5); // [1 + 2^-11 -> 1, 3.125]
            ctx.fmac(acc.all(), b.all(), 0.5); // mixed: f32 accumulator keeps 1 + 2^-11
        })
        .unwrap();
    p.activate(pe, t).unwrap();
    let r = run(p);
    assert_eq!(r.read(pe, c).unwrap(), vec![1.0, 3.125]);
    assert_eq!(
        r.read(pe, acc).unwrap(),
        vec![1.0 + 2.0f32.powi(-11), 1.125]
    );
    assert_eq!(r.stats.total.fmacs, 4);
}

#[test]
fn an_async_receive_unblocks_a_task_when_it_completes() {
    // PE 0 sends [1, 2, 3] east; PE 1 receives them (adding into [10, 20, 30]) and the
    // completion unblocks its "use" task, which was activated at cycle 0 but blocked.
    let mut p = Program::new(FabricConfig::rectangle(2, 1).unwrap()).unwrap();
    let (a, b, color) = (Coord::new(0, 0), Coord::new(1, 0), Color(4));
    p.route(a, color, Port::Ramp, Port::East).unwrap();
    p.route(b, color, Port::West, Port::Ramp).unwrap();
    let src = p.alloc_f32(a, "src", &[1.0, 2.0, 3.0]).unwrap();
    let dst = p.alloc_f32(b, "dst", &[10.0, 20.0, 30.0]).unwrap();
    let total = p.alloc_zeros(b, "total", DType::F32, 1).unwrap();
    let send = p
        .local_task(a, "send", move |ctx| {
            ctx.send(color, src.all(), Then::Nothing)
        })
        .unwrap();
    p.activate(a, send).unwrap();
    // The receive is created next, then the task it unblocks.
    let use_id = TaskId(p.next_task_id(b).unwrap().0 + 1);
    let recv = p
        .local_task(b, "recv", move |ctx| {
            ctx.recv(color, dst.all(), RecvMode::Add, Then::Unblock(use_id))
        })
        .unwrap();
    let use_task = p
        .local_task(b, "use", move |ctx| {
            let s = ctx.sum(dst.all());
            ctx.store(total.at(0), s);
        })
        .unwrap();
    assert_eq!(use_task, use_id);
    p.activate(b, recv).unwrap();
    p.activate(b, use_task).unwrap();
    p.block(b, use_task).unwrap();
    let r = run(p);
    assert_eq!(r.read(b, dst).unwrap(), vec![11.0, 22.0, 33.0]);
    assert_eq!(
        r.read(b, total).unwrap(),
        vec![66.0],
        "the sum ran after all three arrived"
    );
}

#[test]
fn store_and_forward_passes_values_on_unchanged() {
    // A -> B -> C: B keeps a copy and forwards every value, in f32 and in f16.
    for dtype in [DType::F32, DType::F16] {
        let mut p = Program::new(FabricConfig::rectangle(3, 1).unwrap()).unwrap();
        let (a, b, c) = (Coord::new(0, 0), Coord::new(1, 0), Coord::new(2, 0));
        p.route(a, Color(0), Port::Ramp, Port::East).unwrap();
        p.route(b, Color(0), Port::West, Port::Ramp).unwrap();
        p.route(b, Color(1), Port::Ramp, Port::East).unwrap();
        p.route(c, Color(1), Port::West, Port::Ramp).unwrap();
        let vals = [0.5f32, -1.25, 3.0];
        let src = match dtype {
            DType::F32 => p.alloc_f32(a, "src", &vals).unwrap(),
            DType::F16 => p.alloc_f16(a, "src", &vals.map(f16::from_f32)).unwrap(),
        };
        let mid = p.alloc_zeros(b, "mid", dtype, 3).unwrap();
        let end = p.alloc_zeros(c, "end", dtype, 3).unwrap();
        let t = p
            .local_task(a, "send", move |ctx| {
                ctx.send(Color(0), src.all(), Then::Nothing)
            })
            .unwrap();
        p.activate(a, t).unwrap();
        let t = p
            .local_task(b, "forward", move |ctx| {
                ctx.recv_store_send(Color(0), mid.all(), Color(1), Then::Nothing)
            })
            .unwrap();
        p.activate(b, t).unwrap();
        let t = p
            .local_task(c, "recv", move |ctx| {
                ctx.recv(Color(1), end.all(), RecvMode::Store, Then::Nothing)
            })
            .unwrap();
        p.activate(c, t).unwrap();
        let r = run(p);
        assert_eq!(r.read(b, mid).unwrap(), vals.to_vec(), "{dtype:?}");
        assert_eq!(r.read(c, end).unwrap(), vals.to_vec(), "{dtype:?}");
        assert_eq!(r.stats.pe(b).unwrap().wavelets_sent, 3);
    }
}

#[test]
fn region_aggregates_sum_their_pes() {
    // Four PEs each run one task of 3 + (1 + 8) cycles (fill of 16 f32 at width 2).
    let mut p = Program::new(FabricConfig::rectangle(4, 4).unwrap()).unwrap();
    for (x, y) in [(0, 0), (1, 0), (0, 1), (3, 3)] {
        let pe = Coord::new(x, y);
        let v = p.alloc_zeros(pe, "v", DType::F32, 16).unwrap();
        let t = p
            .local_task(pe, "fill", move |ctx| ctx.fill(v.all(), 1.0))
            .unwrap();
        p.activate(pe, t).unwrap();
    }
    let r = run(p);
    let top_left = r.stats.region(Coord::new(0, 0), 2, 2);
    assert_eq!(top_left.busy_cycles, 3 * 12);
    assert_eq!(top_left.tasks_run, 3);
    assert_eq!(top_left.sram_bytes, 3 * 64);
    assert_eq!(r.stats.total.busy_cycles, 4 * 12);
    assert_eq!(r.stats.cycles, 12);
    // Idle is what the makespan leaves: every PE was busy all 12 cycles.
    assert_eq!(
        r.stats
            .pe(Coord::new(3, 3))
            .unwrap()
            .idle_cycles(r.stats.cycles),
        0
    );
    assert_eq!(
        r.stats.pe(Coord::new(2, 2)),
        None,
        "an untouched PE has no state"
    );
}
