//! GPT model shapes: the [`GptConfig`] struct, the built-in presets, and reading and writing
//! the Hugging Face GPT-2 `config.json`.
//!
//! Only settings the runtime can execute are accepted: pre-LayerNorm GPT-2 blocks with the tanh
//! GELU, a tied LM head and no cross-attention. Anything else is refused with an error naming the
//! field, never silently approximated. Fields that do not change the computation (token ids,
//! dropout rates, `dtype`, ...) are ignored.

use serde::Deserialize;
use serde_json::json;

use super::ModelError;

/// The shape of a GPT-2-style decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    /// Number of decoder blocks `L`.
    pub n_layer: usize,
    /// Model width `d`.
    pub n_embd: usize,
    /// Attention heads; `n_embd` must be a multiple of it.
    pub n_head: usize,
    /// Maximum sequence length (rows of the position embedding).
    pub n_positions: usize,
    /// Vocabulary size `V` (rows of the token embedding and the tied LM head).
    pub vocab_size: usize,
    /// FFN width (`4 d` unless a checkpoint says otherwise).
    pub n_inner: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f32,
    /// Scale attention logits by `1 / sqrt(head_dim)`.
    pub scale_attn_weights: bool,
}

/// Largest `n_layer` accepted (GPT-3 175B has 96).
pub const MAX_LAYERS: usize = 1 << 10;
/// Largest `n_embd` accepted (GPT-3 175B has 12288).
pub const MAX_WIDTH: usize = 1 << 16;
/// Largest `n_inner` accepted (4 x [`MAX_WIDTH`]).
pub const MAX_FFN: usize = 1 << 18;
/// Largest `n_positions` accepted.
pub const MAX_POSITIONS: usize = 1 << 20;
/// Largest `vocab_size` accepted (token ids travel as `u32`).
pub const MAX_VOCAB: usize = 1 << 24;

/// A named built-in model shape.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    /// `(n_layer, n_embd, n_head, n_positions, vocab_size)`; `n_inner` is `4 n_embd`.
    shape: (usize, usize, usize, usize, usize),
}

/// The built-in models (`wafersim presets`). The MediSwift sizes are GPT-3 shapes with sequence
/// 2048 and the GPT-2 vocabulary; their non-embedding parameter counts `12 L d^2` equal the
/// paper's 302M (Med) and 1.21B (XL).
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        description: "2 x 64, byte vocabulary: a whole training step simulates in seconds",
        shape: (2, 64, 4, 64, 256),
    },
    Preset {
        name: "gpt2-small",
        description: "Hugging Face gpt2 (124M)",
        shape: (12, 768, 12, 1024, 50257),
    },
    Preset {
        name: "mediswift-med",
        description: "MediSwift-Med: GPT-3 Medium shape, 302M non-embedding parameters",
        shape: (24, 1024, 16, 2048, 50257),
    },
    Preset {
        name: "mediswift-large",
        description: "MediSwift-Large: GPT-3 Large-width shape, 679M non-embedding parameters",
        shape: (24, 1536, 16, 2048, 50257),
    },
    Preset {
        name: "mediswift-xl",
        description: "MediSwift-XL: GPT-3 XL shape, 1.21B non-embedding parameters",
        shape: (24, 2048, 16, 2048, 50257),
    },
];

impl Preset {
    /// The preset's configuration.
    pub fn config(&self) -> GptConfig {
        let (n_layer, n_embd, n_head, n_positions, vocab_size) = self.shape;
        GptConfig {
            n_layer,
            n_embd,
            n_head,
            n_positions,
            vocab_size,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
        }
    }
}

impl GptConfig {
    /// The preset called `name`, or an error listing the presets.
    pub fn preset(name: &str) -> Result<GptConfig, ModelError> {
        PRESETS
            .iter()
            .find(|p| p.name == name)
            .map(Preset::config)
            .ok_or_else(|| ModelError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters outside the embeddings: the blocks and the final LayerNorm.
    pub fn non_embedding_params(&self) -> usize {
        let (d, f) = (self.n_embd, self.n_inner);
        let attention = 4 * d * d + 4 * d;
        let ffn = 2 * d * f + f + d;
        let norms = 4 * d;
        self.n_layer * (attention + ffn + norms) + 2 * d
    }

    /// All parameters (the LM head is tied, so it adds none).
    pub fn total_params(&self) -> usize {
        self.non_embedding_params() + (self.vocab_size + self.n_positions) * self.n_embd
    }

    /// Checks the invariants every other module relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
            ("n_inner", self.n_inner),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::Config {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::Config {
                field: "n_head",
                reason: format!(
                    "n_embd {} is not divisible by n_head {}",
                    self.n_embd, self.n_head
                ),
            });
        }
        // Sizes beyond any GPT ever trained are refused here, before anything is allocated, so
        // that every count computed from a config (parameters, bytes, FLOPs) fits 64 bits.
        let bounded = [
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("n_embd", self.n_embd, MAX_WIDTH),
            ("n_inner", self.n_inner, MAX_FFN),
            ("n_positions", self.n_positions, MAX_POSITIONS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
        ];
        for (field, value, max) in bounded {
            if value > max {
                return Err(ModelError::Config {
                    field,
                    reason: format!("{value} is above the limit {max}"),
                });
            }
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(ModelError::Config {
                field: "layer_norm_epsilon",
                reason: format!(
                    "must be finite and positive, got {}",
                    self.layer_norm_epsilon
                ),
            });
        }
        Ok(())
    }

    /// Parses a Hugging Face GPT-2 `config.json`, refusing settings the runtime cannot run.
    pub fn from_hf_json(text: &str) -> Result<GptConfig, ModelError> {
        let raw: HfConfig =
            serde_json::from_str(text).map_err(|e| ModelError::ConfigJson(e.to_string()))?;
        raw.into_config()
    }

    /// The Hugging Face GPT-2 `config.json` for this shape.
    pub fn to_hf_json(&self) -> String {
        let value = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "vocab_size": self.vocab_size,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "tie_word_embeddings": true,
            "add_cross_attention": false,
            "scale_attn_by_inverse_layer_idx": false,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        });
        serde_json::to_string_pretty(&value).expect("a json! value always serialises") + "\n"
    }
}

/// The fields of a Hugging Face GPT-2 config that matter; everything else is ignored.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    n_positions: usize,
    vocab_size: usize,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f32>,
    tie_word_embeddings: Option<bool>,
    scale_attn_weights: Option<bool>,
    add_cross_attention: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
}

impl HfConfig {
    fn into_config(self) -> Result<GptConfig, ModelError> {
        let refuse =
            |field: &'static str, reason: String| Err(ModelError::Config { field, reason });
        if let Some(t) = &self.model_type
            && t != "gpt2"
        {
            return refuse(
                "model_type",
                format!("\"{t}\" is not supported (only \"gpt2\")"),
            );
        }
        let activation = self.activation_function.as_deref().unwrap_or("gelu_new");
        // Both names are GPT-2's tanh approximation of GELU.
        if !matches!(activation, "gelu_new" | "gelu_pytorch_tanh") {
            return refuse(
                "activation_function",
                format!("\"{activation}\" is not supported (only the tanh GELU \"gelu_new\")"),
            );
        }
        if self.tie_word_embeddings == Some(false) {
            return refuse(
                "tie_word_embeddings",
                "an untied LM head is not supported".into(),
            );
        }
        if self.add_cross_attention == Some(true) {
            return refuse(
                "add_cross_attention",
                "cross-attention is not supported".into(),
            );
        }
        if self.scale_attn_by_inverse_layer_idx == Some(true) {
            return refuse(
                "scale_attn_by_inverse_layer_idx",
                "per-layer attention scaling is not supported".into(),
            );
        }
        let config = GptConfig {
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_positions: self.n_positions,
            vocab_size: self.vocab_size,
            n_inner: self.n_inner.unwrap_or(self.n_embd.saturating_mul(4)),
            layer_norm_epsilon: self.layer_norm_epsilon.unwrap_or(1e-5),
            scale_attn_weights: self.scale_attn_weights.unwrap_or(true),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mediswift_non_embedding_params_match_the_paper() {
        // 12 L d^2 (the paper's 302M and 1.21B) plus the biases and LayerNorms, 13 L d + 2 d.
        for (name, l, d) in [("mediswift-med", 24, 1024), ("mediswift-xl", 24, 2048)] {
            let c = GptConfig::preset(name).unwrap();
            assert_eq!(
                c.non_embedding_params(),
                12 * l * d * d + 13 * l * d + 2 * d
            );
        }
        assert_eq!(
            GptConfig::preset("mediswift-med")
                .unwrap()
                .non_embedding_params()
                / 1_000_000,
            302
        );
    }

    #[test]
    fn gpt2_small_has_124m_parameters() {
        // Hugging Face gpt2: 124,439,808 parameters.
        assert_eq!(
            GptConfig::preset("gpt2-small").unwrap().total_params(),
            124_439_808
        );
    }

    #[test]
    fn hf_json_round_trips() {
        for p in PRESETS {
            let c = p.config();
            assert_eq!(GptConfig::from_hf_json(&c.to_hf_json()).unwrap(), c);
        }
    }

    #[test]
    fn a_transformers_v5_config_is_read_and_its_extra_fields_ignored() {
        let text = r#"{"activation_function":"gelu_new","architectures":["GPT2LMHeadModel"],
            "attn_pdrop":0.1,"bos_token_id":50256,"eos_token_id":50256,"dtype":"float32",
            "embd_pdrop":0.1,"initializer_range":0.02,"layer_norm_epsilon":1e-05,
            "model_type":"gpt2","n_ctx":32,"n_embd":16,"n_head":2,"n_inner":null,"n_layer":2,
            "n_positions":32,"reorder_and_upcast_attn":false,"resid_pdrop":0.1,
            "scale_attn_by_inverse_layer_idx":false,"scale_attn_weights":true,
            "transformers_version":"5.0.0","use_cache":true,"vocab_size":100}"#;
        let c = GptConfig::from_hf_json(text).unwrap();
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.vocab_size),
            (2, 16, 2, 64, 100)
        );
    }

    #[test]
    fn unsupported_settings_name_their_field() {
        let base = GptConfig::preset("tiny").unwrap().to_hf_json();
        let cases = [
            ("\"gelu_new\"", "\"relu\"", "activation_function"),
            (
                "\"tie_word_embeddings\": true",
                "\"tie_word_embeddings\": false",
                "tie_word_embeddings",
            ),
            (
                "\"add_cross_attention\": false",
                "\"add_cross_attention\": true",
                "add_cross_attention",
            ),
            ("\"n_head\": 4", "\"n_head\": 3", "n_head"),
            ("\"n_layer\": 2", "\"n_layer\": 0", "n_layer"),
        ];
        for (from, to, field) in cases {
            let text = base.replace(from, to);
            assert_ne!(text, base, "case {field} did not change the config");
            let err = GptConfig::from_hf_json(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn malformed_json_is_an_error() {
        assert!(GptConfig::from_hf_json("{\"n_layer\": 2").is_err());
        assert!(
            GptConfig::from_hf_json("{}")
                .unwrap_err()
                .to_string()
                .contains("n_layer")
        );
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = GptConfig::preset("gpt5").unwrap_err().to_string();
        assert!(
            err.contains("gpt5") && err.contains("mediswift-xl"),
            "{err}"
        );
    }
}
