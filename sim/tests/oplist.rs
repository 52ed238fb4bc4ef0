//! `TaskCtx::issue_list` against issuing the same operations one by one: the same cycles,
//! statistics, trace and values, on a row of three PEs whose middle one passes chains both ways
//! (the pattern of a row reduce-scatter). Only the engine's event count may differ (the PE holds
//! fewer operations, so it is woken less).

use wafersim_sim::*;

const EAST_IN: Color = Color(1); // west PE -> middle
const EAST_OUT: Color = Color(2); // middle -> east PE
const WEST_IN: Color = Color(3); // east PE -> middle
const WEST_OUT: Color = Color(4); // middle -> west PE
const DIRECT: Color = Color(5); // middle -> east PE, plain sends
const SEGMENTS: u32 = 9;
/// Wavelets on the east PE's color after the list's receives, for the middle PE's data task.
const EXTRA: u32 = 3;

/// Lengths of segment `k` eastward and westward: 1 to 5, not in step.
fn lens(k: u32) -> (u32, u32) {
    (1 + (k * 7) % 5, 1 + (k * 3 + 2) % 5)
}

fn offsets() -> (Vec<u32>, Vec<u32>) {
    let (mut east, mut west) = (vec![0], vec![0]);
    for k in 0..SEGMENTS {
        east.push(east[k as usize] + lens(k).0);
        west.push(west[k as usize] + lens(k).1);
    }
    (east, west)
}

fn values(n: u32, scale: f32) -> Vec<f32> {
    (0..n).map(|i| scale * (i as f32 + 1.0)).collect()
}

struct Built {
    program: Program,
    /// `(pe, buffer)` to compare after the run.
    outputs: Vec<(Coord, Buf)>,
}

/// The middle PE's operations in issue order: per segment the eastward hop (add its values),
/// the westward one (store a copy) and a plain send of its values east on another color,
/// interleaved, or grouped (all eastward hops, then all westward ones, then the sends: three
/// streams competing for the ramp with operations not taken up between them); the last
/// operation of each of the first two directions activates its task of `done`.
fn middle_ops(
    local: Buf,
    copy: Buf,
    interleaved: bool,
    done: [TaskId; 2],
) -> Vec<(FabricOp, Then)> {
    let (east, west) = offsets();
    let east_ops: Vec<FabricOp> = (0..SEGMENTS as usize)
        .map(|k| FabricOp::RecvAddSend {
            inp: EAST_IN,
            local: local.slice(east[k], east[k + 1] - east[k]),
            out: EAST_OUT,
        })
        .collect();
    let west_ops: Vec<FabricOp> = (0..SEGMENTS as usize)
        .map(|k| FabricOp::RecvStoreSend {
            inp: WEST_IN,
            dst: copy.slice(west[k], west[k + 1] - west[k]),
            out: WEST_OUT,
        })
        .collect();
    let direct_ops: Vec<FabricOp> = (0..SEGMENTS as usize)
        .map(|k| FabricOp::Send {
            out: DIRECT,
            src: local.slice(east[k], east[k + 1] - east[k]),
        })
        .collect();
    let ordered: Vec<FabricOp> = if interleaved {
        (0..SEGMENTS as usize)
            .flat_map(|k| [east_ops[k], west_ops[k], direct_ops[k]])
            .collect()
    } else {
        [east_ops, west_ops, direct_ops].concat()
    };
    let last = |color: Color| ordered.iter().rposition(|op| op.colors().0 == Some(color));
    let finals = [last(EAST_IN), last(WEST_IN)];
    ordered
        .iter()
        .enumerate()
        .map(|(i, &op)| {
            let then = match finals.iter().position(|&f| f == Some(i)) {
                Some(d) => Then::Activate(done[d]),
                None => Then::Nothing,
            };
            (op, then)
        })
        .collect()
}

fn build(as_list: bool, interleaved: bool) -> Built {
    let mut p = Program::new(FabricConfig::rectangle(3, 1).unwrap()).unwrap();
    let (w, m, e) = (Coord::new(0, 0), Coord::new(1, 0), Coord::new(2, 0));
    let (east, west) = offsets();
    let (n_east, n_west) = (east[SEGMENTS as usize], west[SEGMENTS as usize]);
    for (pe, color, from, to) in [
        (w, EAST_IN, Port::Ramp, Port::East),
        (m, EAST_IN, Port::West, Port::Ramp),
        (m, EAST_OUT, Port::Ramp, Port::East),
        (e, EAST_OUT, Port::West, Port::Ramp),
        (e, WEST_IN, Port::Ramp, Port::West),
        (m, DIRECT, Port::Ramp, Port::East),
        (e, DIRECT, Port::West, Port::Ramp),
        (m, WEST_IN, Port::East, Port::Ramp),
        (m, WEST_OUT, Port::Ramp, Port::West),
        (w, WEST_OUT, Port::East, Port::Ramp),
    ] {
        p.route(pe, color, from, to).unwrap();
    }
    // The edges: the west PE starts the eastward chain and takes the westward one; the east PE
    // the other way round, plus EXTRA wavelets for the middle PE's data task.
    let w_src = p.alloc_f32(w, "w_src", &values(n_east, 1.0)).unwrap();
    let w_dst = p
        .alloc_zeros(w, "w_dst", DType::F32, n_west as usize)
        .unwrap();
    let go = p
        .local_task(w, "west", move |ctx| {
            ctx.send(EAST_IN, w_src.all(), Then::Nothing);
            ctx.recv(WEST_OUT, w_dst.all(), RecvMode::Store, Then::Nothing);
        })
        .unwrap();
    p.activate(w, go).unwrap();
    let e_src = p
        .alloc_f32(e, "e_src", &values(n_west + EXTRA, -0.5))
        .unwrap();
    let e_dst = p
        .alloc_zeros(e, "e_dst", DType::F32, n_east as usize)
        .unwrap();
    let e_direct = p
        .alloc_zeros(e, "e_direct", DType::F32, n_east as usize)
        .unwrap();
    let go = p
        .local_task(e, "east", move |ctx| {
            ctx.recv(DIRECT, e_direct.all(), RecvMode::Store, Then::Nothing);
            ctx.recv(EAST_OUT, e_dst.all(), RecvMode::Store, Then::Nothing);
            ctx.send(WEST_IN, e_src.all(), Then::Nothing);
        })
        .unwrap();
    p.activate(e, go).unwrap();
    // The middle PE: the list, a task marking each direction's final operation, and a data
    // task on WEST_IN that may run only once no operation reads that color any more.
    let local = p.alloc_f32(m, "local", &values(n_east, 10.0)).unwrap();
    let copy = p
        .alloc_zeros(m, "copy", DType::F32, n_west as usize)
        .unwrap();
    let seen = p.alloc_zeros(m, "seen", DType::F32, 3).unwrap();
    let mark = |p: &mut Program, slot: u32| {
        p.local_task(m, "done", move |ctx| ctx.store(seen.at(slot), 1.0))
            .unwrap()
    };
    let done = [mark(&mut p, 0), mark(&mut p, 1)];
    p.data_task(m, WEST_IN, "extra", move |ctx| {
        let sum = ctx.load(seen.at(2)) + ctx.wavelet().f32();
        ctx.store(seen.at(2), sum);
    })
    .unwrap();
    let ops = middle_ops(local, copy, interleaved, done);
    let go = p
        .local_task(m, "middle", move |ctx| {
            ctx.scalar_cycles(2);
            if as_list {
                ctx.issue_list(Box::new(ops.clone()));
            } else {
                for &(op, then) in &ops {
                    ctx.issue(op, then);
                }
            }
        })
        .unwrap();
    p.activate(m, go).unwrap();
    Built {
        program: p,
        outputs: vec![(w, w_dst), (e, e_dst), (m, copy), (m, seen), (e, e_direct)],
    }
}

fn run(built: Built) -> (Executed, Vec<Vec<f32>>) {
    let window = TraceWindow {
        origin: Coord::new(0, 0),
        width: 3,
        height: 1,
        start: 0,
        end: u64::MAX,
    };
    let options = RunOptions {
        trace: Some(window),
        ..RunOptions::default()
    };
    let run = Simulator::new(built.program).unwrap().run(options).unwrap();
    let values = built
        .outputs
        .iter()
        .map(|&(pe, buf)| run.read(pe, buf).unwrap())
        .collect();
    (run, values)
}

#[test]
fn a_list_runs_as_its_operations_issued_one_by_one() {
    for interleaved in [true, false] {
        let (one_by_one, expected) = run(build(false, interleaved));
        let (listed, got) = run(build(true, interleaved));
        let (a, b) = (&one_by_one.stats, &listed.stats);
        assert_eq!(a.cycles, b.cycles, "interleaved {interleaved}");
        assert_eq!(a.pes, b.pes, "interleaved {interleaved}");
        assert_eq!(a.links, b.links, "interleaved {interleaved}");
        assert_eq!(a.trace, b.trace, "interleaved {interleaved}");
        assert_eq!(expected, got, "interleaved {interleaved}");
    }
}

#[test]
fn the_values_are_the_chains_worked_by_hand() {
    let (_, out) = run(build(true, true));
    let (east, west) = offsets();
    let (n_east, n_west) = (east[SEGMENTS as usize], west[SEGMENTS as usize]);
    // Eastward: the west PE's i + 1 plus the middle's 10 (i + 1) arrive at the east PE.
    let sums: Vec<f32> = (0..n_east).map(|i| 11.0 * (i as f32 + 1.0)).collect();
    assert_eq!(out[1], sums);
    // Westward: the east PE's first n_west values, -0.5 (i + 1), stored in the middle and
    // forwarded to the west PE.
    let copies = values(n_west, -0.5);
    assert_eq!(out[0], copies);
    assert_eq!(out[2], copies);
    // Both final operations seen; the data task took the EXTRA values after the list.
    let extra: f32 = (n_west..n_west + EXTRA)
        .map(|i| -0.5 * (i as f32 + 1.0))
        .sum();
    assert_eq!(out[3], vec![1.0, 1.0, extra]);
    // The plain sends: the middle's own values, 10 (i + 1).
    assert_eq!(out[4], values(n_east, 10.0));
}
