//! The embedding gather and its scatter-add gradient against plain f64 CPU computations.

use wafersim_kernels::*;
use wafersim_sim::{Color, Coord, FabricConfig, Port, RunOptions};

/// A deterministic value in [-0.5, 0.5) from an index and a salt (a hash, not a RNG crate).
fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h % 1_000_003) as f32 / 1_000_003.0 - 0.5
}

fn matrix(len: usize, salt: u64) -> Vec<f32> {
    (0..len).map(|i| value(i, salt)).collect()
}

/// Largest |got - want| over the largest |want|.
fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs() / scale)
        .fold(0.0, f64::max)
}

// T = 10 tokens (B = 2 sequences of S = 5), F = 14 features, V = 13 token rows, 7 position rows.
// Ids repeat (3 three times, 7 three times) and rows 2, 4, 6, 8, 9, 10, 11 are never used.
const IDS: [u32; 10] = [3, 7, 3, 0, 12, 7, 7, 1, 3, 5];
const S: usize = 5;
const F: usize = 14;
const V: usize = 13;
const NP: usize = 7;

fn shape(region: Region) -> EmbeddingShape<'static> {
    EmbeddingShape {
        region,
        ids: &IDS,
        seq_len: S,
        vocab: V,
        positions: NP,
        features: F,
    }
}

/// `X0[t, f] = E[id_t, f] + P[t mod S, f]`.
fn cpu_gather(e: &[f32], p: &[f32]) -> Vec<f64> {
    let mut x = Vec::new();
    for (t, &id) in IDS.iter().enumerate() {
        for f in 0..F {
            x.push(f64::from(e[id as usize * F + f]) + f64::from(p[(t % S) * F + f]));
        }
    }
    x
}

/// `dE[v] = sum of dX0[t] with id_t = v`, `dP[q] = sum of dX0[t] with t mod S = q`.
fn cpu_scatter(dx: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (mut de, mut dp) = (vec![0.0; V * F], vec![0.0; NP * F]);
    for (t, &id) in IDS.iter().enumerate() {
        for f in 0..F {
            de[id as usize * F + f] += f64::from(dx[t * F + f]);
            dp[(t % S) * F + f] += f64::from(dx[t * F + f]);
        }
    }
    (de, dp)
}

/// Regions as (region, fabric width, fabric height): the three shapes at the origin, and one
/// placed with PE rows above (the feed passes through them) and below (the exit does).
fn regions() -> Vec<(Region, u32, u32)> {
    let mut out: Vec<(Region, u32, u32)> = [(1, 1), (2, 3), (3, 2)]
        .into_iter()
        .map(|(c, r)| (Region::at_origin(c, r), c, r))
        .collect();
    let shifted = Region {
        origin: Coord::new(1, 2),
        cols: 3,
        rows: 2,
    };
    out.push((shifted, 5, 6));
    out
}

fn report(what: &str, region: Region, estimate: u64, exact: u64) {
    let ratio = estimate as f64 / exact as f64;
    eprintln!(
        "{what} {}x{} at {}: estimate {estimate} exact {exact} ({ratio:.3})",
        region.cols, region.rows, region.origin
    );
    // Measured 1.000 to 1.010.
    assert!(
        (0.98..=1.02).contains(&ratio),
        "{what}: {estimate} vs {exact}"
    );
}

#[test]
fn the_gather_adds_token_and_position_rows_on_every_layout() {
    let e = matrix(V * F, 1);
    let p = matrix(NP * F, 2);
    let want = cpu_gather(&e, &p);
    for (region, w, h) in regions() {
        let config = FabricConfig::rectangle(w, h).unwrap();
        let kernel = EmbeddingForward {
            shape: shape(region),
            token_table: &e,
            position_table: &p,
        };
        let run = kernel.run(&config, RunOptions::default()).unwrap();
        let err = max_rel_error(&run.x, &want);
        assert!(err < 1e-5, "{region:?}: error {err}");
        eprintln!("gather {region:?}: error {err:.1e}");
        assert_eq!(run.stats.total.fmacs, 0);
        let fullest = run
            .stats
            .pes
            .iter()
            .map(|(_, s)| s.sram_bytes)
            .max()
            .unwrap();
        assert_eq!(fullest, run.plan.sram_bytes);
        // Column c's stream is 2 T |F_c| wavelets through one port at one per cycle: with
        // F_max = ceil(14 / cols), no run can be shorter than 2 x 10 x F_max cycles.
        let f_max = F.div_ceil(region.cols as usize) as u64;
        assert!(run.stats.cycles >= 2 * 10 * f_max);
        report(
            "gather",
            region,
            kernel.estimate_cycles(&config),
            run.stats.cycles,
        );
    }
}

#[test]
fn the_gradient_scatter_adds_on_the_host_and_leaves_unused_rows_zero() {
    let dx = matrix(IDS.len() * F, 3);
    let (want_e, want_p) = cpu_scatter(&dx);
    for (region, w, h) in regions() {
        let config = FabricConfig::rectangle(w, h).unwrap();
        let kernel = EmbeddingBackward {
            shape: shape(region),
            dx: &dx,
        };
        let run = kernel.run(&config, RunOptions::default()).unwrap();
        let err_e = max_rel_error(&run.d_token_table, &want_e);
        let err_p = max_rel_error(&run.d_position_table, &want_p);
        assert!(err_e < 1e-5 && err_p < 1e-5, "{region:?}: {err_e} {err_p}");
        eprintln!("scatter {region:?}: dE error {err_e:.1e}, dP error {err_p:.1e}");
        for unused in [2, 4, 6, 8, 9, 10, 11] {
            assert!(
                run.d_token_table[unused * F..(unused + 1) * F]
                    .iter()
                    .all(|&g| g == 0.0)
            );
        }
        assert!(run.d_position_table[S * F..].iter().all(|&g| g == 0.0));
        assert_eq!(run.stats.total.fmacs, 0);
        // Every value of dX0 leaves once: T x F wavelets reach the sinks.
        let sunk: usize = (0..region.cols)
            .map(|c| {
                run.stats.link(
                    Coord::new(region.origin.x + c, h - 1),
                    Color(1),
                    Port::South,
                ) + run.stats.link(
                    Coord::new(region.origin.x + c, h - 1),
                    Color(2),
                    Port::South,
                )
            })
            .sum::<u64>() as usize;
        assert_eq!(sunk, IDS.len() * F);
        report(
            "scatter",
            region,
            kernel.estimate_cycles(&config),
            run.stats.cycles,
        );
    }
}

#[test]
fn a_repeated_token_gets_the_sum_of_its_gradients() {
    // Hand check: one sequence of 3 tokens with ids [1, 1, 0], F = 2, dX0 = [[1, 2], [10, 20],
    // [100, 200]] on 2 rows x 2 columns: dE[0] = [100, 200], dE[1] = [11, 22]; each position
    // occurs once, so dP = dX0.
    let dx = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
    let kernel = EmbeddingBackward {
        shape: EmbeddingShape {
            region: Region::at_origin(2, 2),
            ids: &[1, 1, 0],
            seq_len: 3,
            vocab: 2,
            positions: 3,
            features: 2,
        },
        dx: &dx,
    };
    let run = kernel
        .run(
            &FabricConfig::rectangle(2, 2).unwrap(),
            RunOptions::default(),
        )
        .unwrap();
    assert_eq!(run.d_token_table, vec![100.0, 200.0, 11.0, 22.0]);
    assert_eq!(run.d_position_table, dx.to_vec());
}

#[test]
fn bad_ids_and_tiles_too_big_are_refused() {
    let e = matrix(V * F, 1);
    let p = matrix(NP * F, 2);
    let config = FabricConfig::rectangle(2, 2).unwrap();
    let mut ids = IDS;
    ids[4] = 13;
    let kernel = EmbeddingForward {
        shape: EmbeddingShape {
            ids: &ids,
            ..shape(Region::at_origin(2, 2))
        },
        token_table: &e,
        position_table: &p,
    };
    let err = kernel.plan(&config).unwrap_err().to_string();
    assert_eq!(
        err,
        "embedding_forward: token 4 has id 13, outside the token table of 13 rows"
    );
    // 1,000 tokens x 14 features on one PE: 56,000 bytes of tile > 49,152.
    let many = vec![0u32; 1000];
    let dx = vec![0.0; 1000 * F];
    let kernel = EmbeddingBackward {
        shape: EmbeddingShape {
            region: Region::at_origin(1, 1),
            ids: &many,
            ..shape(Region::at_origin(1, 1))
        },
        dx: &dx,
    };
    let err = kernel
        .plan(&FabricConfig::rectangle(1, 1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("embedding_backward does not fit: a PE needs 56000 bytes of SRAM"),
        "{err}"
    );
    assert!(err.contains("49152"), "{err}");
}

#[test]
fn the_estimates_track_bigger_shapes() {
    for (t, f, cols, rows) in [(64, 96, 4, 4), (128, 40, 6, 3), (32, 200, 8, 8)] {
        let (v, s) = (50, 16);
        let ids: Vec<u32> = (0..t).map(|i| (i * 7 % v) as u32).collect();
        let region = Region::at_origin(cols, rows);
        let config = FabricConfig::rectangle(cols, rows).unwrap();
        let shape = EmbeddingShape {
            region,
            ids: &ids,
            seq_len: s,
            vocab: v,
            positions: s,
            features: f,
        };
        let (e, p, dx) = (matrix(v * f, 4), matrix(s * f, 5), matrix(t * f, 6));
        let forward = EmbeddingForward {
            shape,
            token_table: &e,
            position_table: &p,
        };
        let run = forward.run(&config, RunOptions::default()).unwrap();
        let want: Vec<f64> = (0..t * f)
            .map(|i| {
                let (tok, k) = (i / f, i % f);
                f64::from(e[ids[tok] as usize * f + k]) + f64::from(p[(tok % s) * f + k])
            })
            .collect();
        assert!(max_rel_error(&run.x, &want) < 1e-5);
        report(
            "gather",
            region,
            forward.estimate_cycles(&config),
            run.stats.cycles,
        );
        let backward = EmbeddingBackward { shape, dx: &dx };
        let run = backward.run(&config, RunOptions::default()).unwrap();
        let want_p: Vec<f64> = (0..s * f)
            .map(|i| (0..t / s).map(|b| f64::from(dx[(b * s) * f + i])).sum())
            .collect();
        assert!(max_rel_error(&run.d_position_table, &want_p) < 1e-5);
        report(
            "scatter",
            region,
            backward.estimate_cycles(&config),
            run.stats.cycles,
        );
    }
}
