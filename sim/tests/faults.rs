//! Programs that cannot finish or cannot be built are reported with the PE, task and color
//! involved; runs never hang and never panic.

mod common;

use wafersim_sim::*;

fn fabric(w: u32, h: u32) -> Program {
    Program::new(FabricConfig::rectangle(w, h).unwrap()).unwrap()
}

fn run_err(p: Program, options: RunOptions) -> String {
    match Simulator::new(p) {
        Err(e) => e.to_string(),
        Ok(sim) => sim
            .run(options)
            .err()
            .expect("the run should fail")
            .to_string(),
    }
}

#[test]
fn a_blocked_consumer_is_a_deadlock_naming_pe_task_and_color() {
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    p.route(pe, Color(7), Port::North, Port::Ramp).unwrap();
    let t = p.data_task(pe, Color(7), "consume", |ctx| {
        ctx.wavelet();
    });
    p.block(pe, t.unwrap()).unwrap();
    p.inject(pe, Port::North, (0..10).map(|i| (Color(7), Wavelet(i))))
        .unwrap();
    let err = run_err(p, RunOptions::default());
    assert!(err.starts_with("deadlock at cycle"), "{err}");
    assert!(err.contains("PE (0, 0)"), "{err}");
    assert!(err.contains("data task \"consume\" is blocked"), "{err}");
    assert!(err.contains("color 7"), "{err}");
    // 4 wait at the core, 4 in the router, and the host still holds 2.
    assert!(
        err.contains("4 wavelets of color 7 wait at the core"),
        "{err}"
    );
    assert!(err.contains("host stream from NORTH sent 8 of 10"), "{err}");
}

#[test]
fn a_receive_that_never_gets_its_data_is_a_deadlock() {
    let mut p = fabric(2, 1);
    let (a, b) = (Coord::new(0, 0), Coord::new(1, 0));
    p.route(a, Color(2), Port::Ramp, Port::East).unwrap();
    p.route(b, Color(2), Port::West, Port::Ramp).unwrap();
    let src = p.alloc_f32(a, "src", &[1.0, 2.0]).unwrap();
    let dst = p.alloc_zeros(b, "dst", DType::F32, 3).unwrap();
    let send = p
        .local_task(a, "send2", move |ctx| {
            ctx.send(Color(2), src.all(), Then::Nothing)
        })
        .unwrap();
    let recv = p
        .local_task(b, "recv3", move |ctx| {
            ctx.recv(Color(2), dst.all(), RecvMode::Store, Then::Nothing)
        })
        .unwrap();
    p.activate(a, send).unwrap();
    p.activate(b, recv).unwrap();
    let err = run_err(p, RunOptions::default());
    assert!(
        err.contains("PE (1, 0): fabric op of task \"recv3\" on color 2 moved 2 of 3"),
        "{err}"
    );
}

#[test]
fn the_cycle_limit_stops_a_long_run_and_says_where_work_remains() {
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    p.route(pe, Color(0), Port::North, Port::Ramp).unwrap();
    p.data_task(pe, Color(0), "work", |ctx| ctx.scalar_cycles(100))
        .unwrap();
    p.inject(pe, Port::North, (0..50).map(|i| (Color(0), Wavelet(i))))
        .unwrap();
    let err = run_err(
        p,
        RunOptions {
            cycle_limit: Some(1000),
            ..RunOptions::default()
        },
    );
    assert!(err.starts_with("cycle limit 1000 reached"), "{err}");
    assert!(err.contains("data task \"work\""), "{err}");
}

#[test]
fn a_misused_instruction_stops_the_run_naming_the_task() {
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    let a = p.alloc_zeros(pe, "psum", DType::F32, 4).unwrap();
    let t = p
        .local_task(pe, "overrun", move |ctx| {
            ctx.fmac(a.slice(2, 4), a.slice(0, 4), 1.0)
        })
        .unwrap();
    p.activate(pe, t).unwrap();
    let err = run_err(p, RunOptions::default());
    assert_eq!(
        err,
        "PE (0, 0), task \"overrun\", cycle 0: fmac: elements 2..6 are outside buffer \"psum\" of 4"
    );
}

#[test]
fn sending_on_a_color_without_a_route_is_an_error() {
    let mut p = fabric(1, 1);
    let pe = Coord::new(0, 0);
    let a = p.alloc_zeros(pe, "v", DType::F32, 4).unwrap();
    let t = p
        .local_task(pe, "send", move |ctx| {
            ctx.send(Color(9), a.all(), Then::Nothing)
        })
        .unwrap();
    p.activate(pe, t).unwrap();
    let err = run_err(p, RunOptions::default());
    assert!(
        err.contains("send: no route on color 9 accepts it from RAMP"),
        "{err}"
    );
}

#[test]
fn routes_that_lead_nowhere_are_refused_before_cycle_zero() {
    let mut p = fabric(2, 1);
    p.route(Coord::new(0, 0), Color(1), Port::Ramp, Port::East)
        .unwrap();
    let err = run_err(p, RunOptions::default());
    assert_eq!(
        err,
        "PE (0, 0): color 1 is sent EAST but PE (1, 0) has no route for it"
    );

    let mut p = fabric(2, 1);
    p.route(Coord::new(0, 0), Color(1), Port::Ramp, Port::East)
        .unwrap();
    p.route(Coord::new(1, 0), Color(1), Port::North, Port::Ramp)
        .unwrap();
    let err = run_err(p, RunOptions::default());
    assert_eq!(
        err,
        "PE (0, 0): color 1 is sent EAST but PE (1, 0) does not accept it from WEST"
    );

    let mut p = fabric(1, 1);
    p.route(Coord::new(0, 0), Color(1), Port::Ramp, Port::East)
        .unwrap();
    let err = run_err(p, RunOptions::default());
    assert!(
        err.contains("it leaves the fabric there and no sink collects it"),
        "{err}"
    );

    let mut p = fabric(1, 1);
    p.data_task(Coord::new(0, 0), Color(3), "orphan", |_| {})
        .unwrap();
    let err = run_err(p, RunOptions::default());
    assert_eq!(
        err,
        "PE (0, 0): color 3 reaches the core (RAMP) but has no route receiving it"
    );

    let mut p = fabric(1, 1);
    p.route(Coord::new(0, 0), Color(1), Port::West, Port::Ramp)
        .unwrap();
    p.inject(Coord::new(0, 0), Port::North, [(Color(1), Wavelet(0))])
        .unwrap();
    let err = run_err(p, RunOptions::default());
    assert!(
        err.contains("no route at this PE accepts color 1 from NORTH"),
        "{err}"
    );
}
