//! Seeded random initialisation of a GPT model, as Hugging Face GPT-2 does it.
//!
//! The rule is `GPT2PreTrainedModel._init_weights` with `initializer_range = 0.02`: every linear
//! weight and both embeddings are drawn from `N(0, 0.02)`, except the two residual-path
//! projections `attn.c_proj.weight` and `mlp.c_proj.weight`, drawn from
//! `N(0, 0.02 / sqrt(2 n_layer))`; biases are 0; LayerNorm scales are 1 and shifts 0. Q, K and V
//! are drawn separately, which is the same distribution as HF's packed `c_attn`.
//!
//! Key decision: tensor `i` of [`GptParams::tensors`] draws from its own ChaCha8 stream
//! (`seed_from_u64(seed)` then `set_stream(i)`), so every tensor's values depend only on the seed
//! and its position, never on thread count, visiting order or the other tensors' sizes.
//!
//! Not here: the values are not those of `torch.manual_seed` (a different generator), and no
//! sparsity masks are applied (`crate::sparsity` does that on top).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::GptConfig;
use super::params::GptParams;

/// Standard deviation of weights and embeddings (HF `initializer_range`).
pub const INITIALIZER_RANGE: f32 = 0.02;

/// How one tensor starts out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rule {
    /// Every element `N(0, std)`.
    Normal { std: f32 },
    /// Every element the same constant.
    Constant(f32),
}

/// Freshly initialised parameters for `config`; the same `(config, seed)` gives the same bits.
pub fn init_params(config: &GptConfig, seed: u64) -> GptParams {
    let mut params = GptParams::zeros(config);
    let residual_std = residual_projection_std(config.n_layer);
    for (stream, (name, values)) in params.tensors_mut().into_iter().enumerate() {
        match rule_for(&name, residual_std) {
            Rule::Constant(c) => values.fill(c),
            Rule::Normal { std } => fill_normal(values, std, seed, stream as u64),
        }
    }
    params
}

/// `0.02 / sqrt(2 n_layer)`: two residual additions per block (attention and FFN).
fn residual_projection_std(n_layer: usize) -> f32 {
    let paths = 2.0 * n_layer.max(1) as f64;
    (f64::from(INITIALIZER_RANGE) / paths.sqrt()) as f32
}

/// The rule for the tensor called `name` in [`GptParams::tensors`] naming.
fn rule_for(name: &str, residual_std: f32) -> Rule {
    let is_layer_norm = name.starts_with("ln_f.") || name.contains(".ln_");
    if is_layer_norm {
        let gamma = name.ends_with(".weight");
        return Rule::Constant(if gamma { 1.0 } else { 0.0 });
    }
    if name.ends_with(".bias") {
        return Rule::Constant(0.0);
    }
    if name.ends_with("attn.c_proj.weight") || name.ends_with("mlp.c_proj.weight") {
        return Rule::Normal { std: residual_std };
    }
    Rule::Normal {
        std: INITIALIZER_RANGE,
    }
}

/// Fills `values` with `N(0, std)` draws from stream `stream` of the generator seeded by `seed`.
fn fill_normal(values: &mut [f32], std: f32, seed: u64, stream: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    match Normal::new(0.0_f32, std) {
        Ok(normal) => values.iter_mut().for_each(|v| *v = normal.sample(&mut rng)),
        // `std` comes from the constants above and is always finite and positive.
        Err(_) => values.fill(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n_layer: usize, n_embd: usize, vocab_size: usize) -> GptConfig {
        GptConfig {
            n_layer,
            n_embd,
            n_head: 4,
            n_positions: 32,
            vocab_size,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
        }
    }

    /// Sample mean and (population) standard deviation, accumulated in f64 in index order.
    fn mean_std(values: &[f32]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    /// Checks mean and std of `n` i.i.d. N(0, sigma) draws within 5 standard errors:
    /// se(mean) = sigma / sqrt(n), se(std) ~= sigma / sqrt(2 n) (normal samples).
    fn assert_normal(values: &[f32], sigma: f64, what: &str) {
        let n = values.len() as f64;
        let (mean, std) = mean_std(values);
        let mean_tol = 5.0 * sigma / n.sqrt();
        let std_tol = 5.0 * sigma / (2.0 * n).sqrt();
        assert!(
            mean.abs() < mean_tol,
            "{what}: mean {mean} (tol {mean_tol})"
        );
        assert!(
            (std - sigma).abs() < std_tol,
            "{what}: std {std}, expected {sigma} +- {std_tol}"
        );
    }

    #[test]
    fn embeddings_and_weights_are_normal_with_std_0_02() {
        // wte is 4096 x 64 = 262,144 draws: tolerances 5 * 0.02 / 512 = 1.95e-4 on the mean and
        // 5 * 0.02 / 724 = 1.38e-4 on the std.
        let p = init_params(&config(2, 64, 4096), 7);
        assert_normal(&p.wte.data, 0.02, "wte");
        // q of layer 1: 64 x 64 = 4096 draws.
        assert_normal(&p.blocks[1].q.weight.data, 0.02, "h.1.q");
        // c_fc of layer 0: 64 x 256 = 16,384 draws.
        assert_normal(&p.blocks[0].fc.weight.data, 0.02, "h.0.fc");
    }

    #[test]
    fn residual_projections_are_scaled_by_one_over_sqrt_two_n_layer() {
        // n_layer = 8: std 0.02 / sqrt(16) = 0.005 for attn.c_proj and mlp.c_proj.
        let p = init_params(&config(8, 64, 64), 3);
        for (l, b) in p.blocks.iter().enumerate() {
            assert_normal(
                &b.attn_proj.weight.data,
                0.005,
                &format!("h.{l}.attn.c_proj"),
            );
            assert_normal(&b.fc_proj.weight.data, 0.005, &format!("h.{l}.mlp.c_proj"));
        }
        // The other matrices of the same blocks keep 0.02.
        assert_normal(&p.blocks[3].v.weight.data, 0.02, "h.3.v");
    }

    #[test]
    fn biases_are_zero_and_layer_norms_are_identity() {
        let p = init_params(&config(2, 16, 64), 1);
        for (name, values) in p.tensors() {
            let expected = if name.contains("ln_") && name.ends_with(".weight") {
                Some(1.0)
            } else if name.ends_with(".bias") {
                Some(0.0)
            } else {
                None
            };
            if let Some(c) = expected {
                assert!(values.iter().all(|&v| v == c), "{name} is not all {c}");
            } else {
                assert!(values.iter().any(|&v| v != 0.0), "{name} was not drawn");
            }
        }
    }

    #[test]
    fn same_seed_same_bits_other_seed_other_values() {
        let c = config(2, 16, 64);
        let bits = |p: &GptParams| -> Vec<u32> {
            p.tensors()
                .iter()
                .flat_map(|(_, t)| t.iter().map(|v| v.to_bits()))
                .collect()
        };
        let a = bits(&init_params(&c, 42));
        assert_eq!(a, bits(&init_params(&c, 42)));
        let b = bits(&init_params(&c, 43));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // Only the constant tensors (biases and LayerNorms) agree: per block 4 LN vectors of 16,
        // 4 attention biases of 16, c_fc bias 64, c_proj bias 16 -> 208; ln_f 32; two blocks.
        assert_eq!(same, 2 * 208 + 32);
    }

    #[test]
    fn a_tensor_depends_only_on_its_stream_not_on_the_others() {
        // Growing the vocabulary changes the size of tensor 0 (wte) but not the values of the
        // tensors after it: each has its own stream.
        let small = init_params(&config(2, 16, 64), 5);
        let large = init_params(&config(2, 16, 100), 5);
        assert_eq!(small.wpe, large.wpe);
        assert_eq!(small.blocks, large.blocks);
        assert_eq!(&large.wte.data[..64 * 16], &small.wte.data[..]);
    }
}
