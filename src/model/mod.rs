//! The model side of the runtime: GPT shapes and presets, parameters, initialisation and
//! Hugging Face GPT-2 checkpoints.
//!
//! This module only describes and stores models. It does no arithmetic of a training step: the
//! oracle for that is `crate::reference`, and the fabric's version is compiled by
//! `crate::compile`.

pub mod config;
pub mod params;

pub use config::{GptConfig, PRESETS, Preset};
pub use params::{Block, GptParams, LayerNorm, Linear, Matrix, SparseKind};

/// What can go wrong reading, checking or writing a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("unknown model preset \"{name}\" (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("config.json is not a valid GPT-2 config: {0}")]
    ConfigJson(String),
}
