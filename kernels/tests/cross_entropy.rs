//! Softmax cross-entropy on the fabric against a plain f64 CPU computation.

use wafersim_kernels::*;
use wafersim_sim::{Coord, FabricConfig, RunOptions};

/// A deterministic value in [-0.5, 0.5) from an index and a salt (a hash, not a RNG crate).
fn value(i: usize, salt: u64) -> f32 {
    let mut h =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h % 1_000_003) as f32 / 1_000_003.0 - 0.5
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

/// The loss and dZ in f64: for each predicted t (not the last of its sequence), with
/// `target = ids[t + 1]`: `loss += lse(z_t) - z_t[target]`, `dZ[t] = softmax(z_t) - onehot`;
/// both divided by the number N of predicted positions.
fn cpu(ids: &[u32], s: usize, v: usize, z: &[f32]) -> (f64, Vec<f64>) {
    let t_count = ids.len();
    let n = (t_count / s * (s - 1)) as f64;
    let mut loss = 0.0;
    let mut dz = vec![0.0; t_count * v];
    for t in 0..t_count {
        if t % s == s - 1 {
            continue;
        }
        let row: Vec<f64> = z[t * v..(t + 1) * v]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - m).exp()).sum();
        let target = ids[t + 1] as usize;
        loss += m + sum.ln() - row[target];
        for k in 0..v {
            let onehot = if k == target { 1.0 } else { 0.0 };
            dz[t * v + k] = ((row[k] - m).exp() / sum - onehot) / n;
        }
    }
    (loss / n, dz)
}

// T = 10 (B = 2 sequences of S = 5), V = 13: neither splits evenly over 2 or 3.
const IDS: [u32; 10] = [3, 7, 3, 0, 12, 7, 7, 1, 3, 5];
const S: usize = 5;
const V: usize = 13;

fn regions() -> Vec<(Region, u32, u32)> {
    let mut out: Vec<(Region, u32, u32)> = [(1, 1), (2, 3), (3, 2), (4, 5)]
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

#[test]
fn loss_and_gradient_match_the_cpu_on_every_layout() {
    // Logits in [-4, 4): a spread wide enough for the max shift to matter.
    let z: Vec<f32> = (0..IDS.len() * V).map(|i| 8.0 * value(i, 11)).collect();
    let (want_loss, want_dz) = cpu(&IDS, S, V, &z);
    for (region, w, h) in regions() {
        let config = FabricConfig::rectangle(w, h).unwrap();
        let kernel = SoftmaxCrossEntropy {
            region,
            ids: &IDS,
            seq_len: S,
            unscored_prefix: 0,
            vocab: V,
            logits: &z,
            loss_scale: 1.0,
        };
        let run = kernel.run(&config, RunOptions::default()).unwrap();
        let loss_err = (run.loss - want_loss).abs() / want_loss.abs();
        let dz_err = max_rel_error(&run.dz, &want_dz);
        assert!(
            loss_err < 1e-5,
            "{region:?}: loss {} vs {want_loss}",
            run.loss
        );
        assert!(dz_err < 1e-5, "{region:?}: dZ error {dz_err}");
        assert_eq!(run.plan.predicted, 8);
        assert_eq!(run.stats.total.fmacs, 0, "no matmul work");
        // The last position of each sequence gets no gradient at all.
        for t in [4, 9] {
            assert!(run.dz[t * V..(t + 1) * V].iter().all(|&d| d == 0.0));
        }
        let fullest = run
            .stats
            .pes
            .iter()
            .map(|(_, s)| s.sram_bytes)
            .max()
            .unwrap();
        assert!(
            fullest <= run.plan.sram_bytes,
            "{fullest} > {}",
            run.plan.sram_bytes
        );
        let estimate = kernel.estimate_cycles(&config);
        let ratio = estimate as f64 / run.stats.cycles as f64;
        eprintln!(
            "cross-entropy {}x{} at {}: estimate {estimate} exact {} ({ratio:.3}); loss {} vs \
             {want_loss} (rel {loss_err:.1e}), dZ error {dz_err:.1e}",
            region.cols, region.rows, region.origin, run.stats.cycles, run.loss
        );
        // Measured 1.002 to 1.097: the formula follows the largest tile's critical path.
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{estimate} vs {}",
            run.stats.cycles
        );
    }
}

#[test]
fn a_hand_worked_case_with_logits_too_big_for_a_plain_exp() {
    // One sequence of 2 tokens, ids [0, 1]: token 0 predicts 1, token 1 is the last position.
    // z_0 = [100, 102]: softmax = [1, e^2] / (1 + e^2) = [0.11920292, 0.88079708], so
    // loss = ln(1 + e^-2) = 0.12692801 and dZ_0 = [0.11920292, -0.11920292] (N = 1);
    // dZ_1 = 0. exp(100) overflows f32: only the max shift keeps this finite.
    let z = [100.0, 102.0, 5.0, -5.0];
    for cols in [1, 2] {
        let kernel = SoftmaxCrossEntropy {
            region: Region::at_origin(cols, 2),
            ids: &[0, 1],
            seq_len: 2,
            unscored_prefix: 0,
            vocab: 2,
            logits: &z,
            loss_scale: 1.0,
        };
        let run = kernel
            .run(
                &FabricConfig::rectangle(cols, 2).unwrap(),
                RunOptions::default(),
            )
            .unwrap();
        assert!(
            (run.loss - 0.126_928_011_042_972_6).abs() < 1e-6,
            "{}",
            run.loss
        );
        let want = [0.119_202_922, -0.119_202_922, 0.0, 0.0];
        for (got, want) in run.dz.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{:?}", run.dz);
        }
    }
}

#[test]
fn bad_inputs_and_tiles_too_big_are_refused() {
    let config = FabricConfig::rectangle(2, 2).unwrap();
    let z = vec![0.0; IDS.len() * V];
    let mut ids = IDS;
    ids[7] = 13;
    let kernel = SoftmaxCrossEntropy {
        region: Region::at_origin(2, 2),
        ids: &ids,
        seq_len: S,
        unscored_prefix: 0,
        vocab: V,
        logits: &z,
        loss_scale: 1.0,
    };
    assert_eq!(
        kernel.plan(&config).unwrap_err().to_string(),
        "softmax_cross_entropy: token 7 has id 13, outside the feature axis of 13"
    );
    let single = SoftmaxCrossEntropy {
        ids: &IDS,
        seq_len: 1,
        unscored_prefix: 0,
        ..kernel
    };
    assert!(
        single
            .plan(&config)
            .unwrap_err()
            .to_string()
            .contains("at least 2")
    );
    // 200 tokens x 60 features on one PE: 4 x (12,000 + 6 x 200 + 3) = 52,812 bytes > 49,152.
    let ids = vec![0u32; 200];
    let z = vec![0.0; 200 * 60];
    let big = SoftmaxCrossEntropy {
        region: Region::at_origin(1, 1),
        ids: &ids,
        seq_len: 2,
        unscored_prefix: 0,
        vocab: 60,
        logits: &z,
        loss_scale: 1.0,
    };
    let err = big
        .plan(&FabricConfig::rectangle(1, 1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("softmax_cross_entropy does not fit: a PE needs 52812 bytes of SRAM"),
        "{err}"
    );
}

#[test]
fn the_estimate_tracks_bigger_shapes() {
    for (t, v, s, cols, rows) in [(64, 256, 16, 4, 4), (48, 500, 8, 8, 3), (96, 40, 32, 2, 6)] {
        let ids: Vec<u32> = (0..t).map(|i| (i * 37 % v) as u32).collect();
        let z: Vec<f32> = (0..t * v).map(|i| 8.0 * value(i, 5)).collect();
        let region = Region::at_origin(cols, rows);
        let config = FabricConfig::rectangle(cols, rows).unwrap();
        let kernel = SoftmaxCrossEntropy {
            region,
            ids: &ids,
            seq_len: s,
            unscored_prefix: 0,
            vocab: v,
            logits: &z,
            loss_scale: 1.0,
        };
        let run = kernel.run(&config, RunOptions::default()).unwrap();
        let (want_loss, want_dz) = cpu(&ids, s, v, &z);
        assert!((run.loss - want_loss).abs() / want_loss < 1e-5);
        assert!(max_rel_error(&run.dz, &want_dz) < 1e-5);
        let estimate = kernel.estimate_cycles(&config);
        let ratio = estimate as f64 / run.stats.cycles as f64;
        eprintln!(
            "cross-entropy T {t} V {v} on {cols}x{rows}: estimate {estimate} exact {} ({ratio:.3})",
            run.stats.cycles
        );
        // Measured up to 1.097: the formula follows the largest tile's critical path.
        assert!((0.9..=1.1).contains(&ratio));
    }
}

/// With an unscored prefix of 2, positions 0 and 1 of each sequence predict nothing: the loss
/// is the mean over the `B (S - 1 - 2)` = 4 positions 2 and 3 of each sequence, and the whole
/// prefix and last position get no gradient. The CPU side is the plain computation on the
/// scored positions only.
#[test]
fn an_unscored_prefix_leaves_its_positions_out_of_the_loss() {
    let z: Vec<f32> = (0..IDS.len() * V).map(|i| 8.0 * value(i, 5)).collect();
    let prefix = 2;
    // Score t with t % S in {2, 3}: cpu() over sequences cut to positions 2..5 does exactly that
    // (position 4 is the last), with the logits of those rows.
    let (mut cut_ids, mut cut_z) = (Vec::new(), Vec::new());
    for b in 0..IDS.len() / S {
        for s in prefix..S {
            let t = b * S + s;
            cut_ids.push(IDS[t]);
            cut_z.extend_from_slice(&z[t * V..(t + 1) * V]);
        }
    }
    let (want_loss, want_cut_dz) = cpu(&cut_ids, S - prefix, V, &cut_z);
    let config = FabricConfig::rectangle(3, 2).unwrap();
    let kernel = SoftmaxCrossEntropy {
        region: Region::at_origin(3, 2),
        ids: &IDS,
        seq_len: S,
        unscored_prefix: prefix,
        vocab: V,
        logits: &z,
        loss_scale: 1.0,
    };
    let run = kernel.run(&config, RunOptions::default()).unwrap();
    assert_eq!(run.plan.predicted, 4);
    assert!((run.loss - want_loss).abs() / want_loss.abs() < 1e-5);
    for b in 0..IDS.len() / S {
        for s in 0..S {
            let t = b * S + s;
            let got = &run.dz[t * V..(t + 1) * V];
            if s < prefix {
                assert!(got.iter().all(|&d| d == 0.0), "t {t}");
            } else {
                let c = b * (S - prefix) + s - prefix;
                let want = &want_cut_dz[c * V..(c + 1) * V];
                assert!(max_rel_error(got, want) < 1e-5, "t {t}");
            }
        }
    }
    let none_left = SoftmaxCrossEntropy {
        unscored_prefix: S - 1,
        ..kernel
    };
    assert!(
        none_left
            .plan(&config)
            .unwrap_err()
            .to_string()
            .contains("no scored position")
    );
}

/// Loss scaling by a power of two scales every `f32` value exactly (no value here is near the
/// ends of `f32`'s range): `dZ` is `L` times the unscaled run's, bit for bit, the loss comes back
/// the same, and the run costs the same cycles. A scale that is not a power of two is refused.
#[test]
fn a_power_of_two_loss_scale_scales_the_gradient_exactly_at_the_same_cost() {
    let z: Vec<f32> = (0..IDS.len() * V).map(|i| 8.0 * value(i, 11)).collect();
    let config = FabricConfig::rectangle(3, 2).unwrap();
    let plain = SoftmaxCrossEntropy {
        region: Region::at_origin(3, 2),
        ids: &IDS,
        seq_len: S,
        unscored_prefix: 0,
        vocab: V,
        logits: &z,
        loss_scale: 1.0,
    };
    let unscaled = plain.run(&config, RunOptions::default()).unwrap();
    for scale in [2.0f32, 1024.0, 65536.0] {
        let scaled = SoftmaxCrossEntropy {
            loss_scale: scale,
            ..plain
        }
        .run(&config, RunOptions::default())
        .unwrap();
        assert_eq!(
            scaled.loss.to_bits(),
            unscaled.loss.to_bits(),
            "scale {scale}"
        );
        for (s, u) in scaled.dz.iter().zip(&unscaled.dz) {
            assert_eq!(s.to_bits(), (u * scale).to_bits(), "scale {scale}");
        }
        assert_eq!(scaled.stats.cycles, unscaled.stats.cycles);
    }
    for bad in [1000.0f32, 0.0, -2.0, f32::INFINITY] {
        let err = SoftmaxCrossEntropy {
            loss_scale: bad,
            ..plain
        }
        .plan(&config)
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not a power of two"), "{bad}: {err}");
    }
}
