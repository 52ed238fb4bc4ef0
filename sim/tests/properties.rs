//! Property tests of the router: random fabrics and random multicast pipes, each host stream
//! delivered to every endpoint exactly once and in order.
//!
//! A pipe is one color crossing the fabric in a straight line from an edge (injected by the host),
//! optionally forking at one PE into a perpendicular branch (a hardware multicast: one route with
//! two `tx` ports) and optionally tapped at one PE by its core (a third `tx` port, `RAMP`, with a
//! data task storing what arrives). Pipes cross and share links and edge ports with other pipes
//! on other colors, and the queues are 1 to 4 deep, so wavelets meet backpressure and round-robin
//! arbitration on every run.
//!
//! Properties: every endpoint (the far edge, the branch's edge, the core tap) receives exactly the
//! injected sequence of its pipe's color (nothing lost, duplicated, reordered or mixed with
//! another color), at strictly increasing cycles (one wavelet per link per cycle), and the run
//! ends without deadlock.

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use wafersim_sim::*;

/// One pipe: its line, direction, optional branch and tap, and stream length.
#[derive(Clone, Debug)]
struct Pipe {
    /// The direction the stream travels (`East`, `West`, `South` or `North`).
    dir: Port,
    /// Row (for east/west pipes) or column (for north/south pipes), modulo the fabric.
    line: u32,
    /// `(position along the line, direction)` of a perpendicular branch.
    branch: Option<(u32, bool)>,
    /// Position along the line of a core tap.
    tap: Option<u32>,
    len: usize,
}

#[derive(Clone, Debug)]
struct Case {
    width: u32,
    height: u32,
    queue_depth: u32,
    pipes: Vec<Pipe>,
}

fn direction() -> impl Strategy<Value = Port> {
    prop_oneof![
        Just(Port::East),
        Just(Port::West),
        Just(Port::South),
        Just(Port::North)
    ]
}

fn pipe() -> impl Strategy<Value = Pipe> {
    (
        direction(),
        0u32..8,
        proptest::option::of((0u32..8, any::<bool>())),
        proptest::option::of(0u32..8),
        0usize..24,
    )
        .prop_map(|(dir, line, branch, tap, len)| Pipe {
            dir,
            line,
            branch,
            tap,
            len,
        })
}

fn case() -> impl Strategy<Value = Case> {
    (
        1u32..=6,
        1u32..=6,
        1u32..=4,
        proptest::collection::vec(pipe(), 1..=8),
    )
        .prop_map(|(width, height, queue_depth, pipes)| Case {
            width,
            height,
            queue_depth,
            pipes,
        })
}

fn step(c: Coord, dir: Port) -> (i64, i64) {
    let (x, y) = (i64::from(c.x), i64::from(c.y));
    match dir {
        Port::East => (x + 1, y),
        Port::West => (x - 1, y),
        Port::South => (x, y + 1),
        Port::North => (x, y - 1),
        Port::Ramp => (x, y),
    }
}

/// The PEs from `start` to the edge of a `w x h` fabric going `dir`, `start` included.
fn walk(start: Coord, dir: Port, w: u32, h: u32) -> Vec<Coord> {
    let mut out = vec![start];
    loop {
        let (x, y) = step(*out.last().unwrap(), dir);
        if x < 0 || y < 0 || x >= i64::from(w) || y >= i64::from(h) {
            return out;
        }
        out.push(Coord::new(x as u32, y as u32));
    }
}

fn perpendicular(dir: Port, first: bool) -> Port {
    match (dir, first) {
        (Port::East | Port::West, true) => Port::South,
        (Port::East | Port::West, false) => Port::North,
        (_, true) => Port::East,
        (_, false) => Port::West,
    }
}

/// The value of wavelet `i` of pipe `p`: distinct across pipes and positions, exact in f32.
fn payload(p: usize, i: usize) -> Wavelet {
    Wavelet::from_f32((1000 * p + i) as f32)
}

/// Where one pipe's stream must arrive.
enum Endpoint {
    Sink(SinkId),
    Core(Coord, Buf),
}

/// Builds the pipes of `case`; returns the program and, per pipe, its color and endpoints.
fn build(case: &Case) -> (Program, Vec<(Color, Vec<Endpoint>)>) {
    let (w, h) = (case.width, case.height);
    let mut config = FabricConfig::rectangle(w, h).unwrap();
    config.queue_depth = case.queue_depth;
    let mut p = Program::new(config).unwrap();
    let mut expected = Vec::new();
    for (index, pipe) in case.pipes.iter().enumerate() {
        let color = Color(index as u8);
        let horizontal = matches!(pipe.dir, Port::East | Port::West);
        let (extent, lines) = if horizontal { (w, h) } else { (h, w) };
        let line = pipe.line % lines;
        let start_pos = if matches!(pipe.dir, Port::East | Port::South) {
            0
        } else {
            extent - 1
        };
        let at = |pos: u32| {
            if horizontal {
                Coord::new(pos, line)
            } else {
                Coord::new(line, pos)
            }
        };
        let main = walk(at(start_pos), pipe.dir, w, h);
        let branch_at = pipe
            .branch
            .map(|(pos, first)| (main[(pos % extent) as usize], first));
        let tap_at = pipe.tap.map(|pos| main[(pos % extent) as usize]);
        let mut endpoints = Vec::new();
        for &pe in &main {
            let mut tx = vec![pipe.dir];
            if let Some((b, first)) = branch_at
                && b == pe
            {
                tx.push(perpendicular(pipe.dir, first));
            }
            if tap_at == Some(pe) {
                tx.push(Port::Ramp);
                let buf = p
                    .alloc_zeros(pe, "tap", DType::F32, pipe.len.max(1))
                    .unwrap();
                let mut next = 0u32;
                p.data_task(pe, color, "tap", move |ctx| {
                    let value = ctx.wavelet().f32();
                    ctx.store(buf.at(next), value);
                    next += 1;
                })
                .unwrap();
                endpoints.push(Endpoint::Core(pe, buf));
            }
            let rx = PortSet::of(&[pipe.dir.opposite()]);
            p.route(pe, color, rx, PortSet::of(&tx)).unwrap();
        }
        endpoints.push(Endpoint::Sink(
            p.collect(*main.last().unwrap(), pipe.dir).unwrap(),
        ));
        if let Some((b, first)) = branch_at {
            let dir = perpendicular(pipe.dir, first);
            let arm = walk(b, dir, w, h);
            for &pe in &arm[1..] {
                p.route(pe, color, dir.opposite(), dir).unwrap();
            }
            endpoints.push(Endpoint::Sink(
                p.collect(*arm.last().unwrap(), dir).unwrap(),
            ));
        }
        p.inject(
            main[0],
            pipe.dir.opposite(),
            (0..pipe.len).map(|i| (color, payload(index, i))),
        )
        .unwrap();
        expected.push((color, endpoints));
    }
    (p, expected)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(0x0005_EED5),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn every_endpoint_gets_its_stream_exactly_once_in_order(case in case()) {
        let (program, expected) = build(&case);
        let run = Simulator::new(program)
            .expect("the pipes connect")
            .run(RunOptions::default())
            .expect("pipes never deadlock");
        for (index, (color, endpoints)) in expected.iter().enumerate() {
            let want: Vec<Wavelet> = (0..case.pipes[index].len).map(|i| payload(index, i)).collect();
            for endpoint in endpoints {
                match endpoint {
                    Endpoint::Sink(id) => {
                        let log = run.sink(*id);
                        let mine: Vec<&(u64, Color, Wavelet)> =
                            log.received.iter().filter(|(_, c, _)| c == color).collect();
                        let got: Vec<Wavelet> = mine.iter().map(|(_, _, w)| *w).collect();
                        prop_assert_eq!(&got, &want, "pipe {} at sink {} {}", index, log.pe, log.port);
                        prop_assert!(
                            mine.windows(2).all(|pair| pair[0].0 < pair[1].0),
                            "pipe {}: two wavelets left {} {} in one cycle", index, log.pe, log.port
                        );
                    }
                    Endpoint::Core(pe, buf) => {
                        let stored = run.read(*pe, *buf).expect("the tap buffer exists");
                        let got: Vec<Wavelet> =
                            stored[..want.len()].iter().map(|&v| Wavelet::from_f32(v)).collect();
                        prop_assert_eq!(&got, &want, "pipe {} at the core of {}", index, pe);
                    }
                }
            }
        }
        // Nothing arrives that was not sent: every sink wavelet is some pipe's, counted once.
        let sent_to_sinks: usize = expected
            .iter()
            .enumerate()
            .map(|(i, (_, eps))| {
                let sinks = eps.iter().filter(|e| matches!(e, Endpoint::Sink(_))).count();
                sinks * case.pipes[i].len
            })
            .sum();
        let mut seen_sinks = std::collections::HashSet::new();
        let received: usize = expected
            .iter()
            .flat_map(|(_, eps)| eps.iter())
            .filter_map(|e| match e {
                Endpoint::Sink(id) if seen_sinks.insert(*id) => Some(run.sink(*id).received.len()),
                _ => None,
            })
            .sum();
        prop_assert_eq!(received, sent_to_sinks);
    }
}
