//! The model side of the runtime: GPT shapes and presets, parameters, initialisation and
//! Hugging Face GPT-2 checkpoints.
//!
//! This module only describes and stores models. It does no arithmetic of a training step: the
//! oracle for that is `crate::reference`, and the fabric's version is compiled by
//! `crate::compile`.

pub mod checkpoint;
pub mod config;
pub mod init;
pub mod params;

use std::path::PathBuf;

pub use checkpoint::{load_checkpoint, save_checkpoint};
pub use config::{GptConfig, PRESETS, Preset};
pub use init::init_params;
pub use params::{Block, GptParams, LayerNorm, Linear, Matrix, SparseKind};

/// What can go wrong reading, checking or writing a model.
///
/// Every message is one line. Errors about a file name it; an underlying cause (an I/O error, a
/// safetensors parse error, a config error inside a `config.json`) is not repeated in the
/// message but exposed as [`std::error::Error::source`], so `{:#}` in `anyhow` prints the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("unknown model preset \"{name}\" (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("config.json is not a valid GPT-2 config: {0}")]
    ConfigJson(String),
    /// A `config.json` was read but refused; the reason is the source.
    #[error("{}", .path.display())]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
    /// Reading, writing, creating or renaming a file or folder failed.
    #[error("cannot {action} {}", .path.display())]
    Io {
        /// What was being done: "read", "write", "create folder", ...
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed safetensors file (truncated, bad header, bad offsets).
    #[error("{} is not a valid safetensors file", .path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: missing tensor `{name}`", .path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: unexpected tensor `{name}` (not a parameter of this GPT-2 config)", .path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    /// The same tensor appears twice, e.g. with and without the `transformer.` prefix.
    #[error("{}: tensor `{name}` appears more than once", .path.display())]
    DuplicateTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", .path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor handed to a writer holds a different number of values than its shape says.
    #[error("{}: tensor `{name}` has {got} values but its shape {shape:?} needs {expected}", .path.display())]
    DataLength {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{}: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 are supported", .path.display())]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}: tensor `{name}` has a non-finite value ({value}) at flat index {index}", .path.display())]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },
    /// `lm_head.weight` is stored and differs from the token embedding it must be tied to.
    #[error(
        "{}: `{name}` differs from the token embedding at flat index {index} ({got} vs {expected}); an untied LM head is not supported",
        .path.display()
    )]
    UntiedLmHead {
        path: PathBuf,
        name: String,
        index: usize,
        got: f32,
        expected: f32,
    },
}
