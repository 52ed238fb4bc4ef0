//! The resumable state of a training run: what a checkpoint holds beside its weights so that
//! `wafersim train --resume DIR` continues the run that wrote it, step for step, to the same bytes.
//!
//! Two files, beside `config.json` and `model.safetensors` (which stay a plain Hugging Face
//! checkpoint) and, for prompt tuning, `prompt.safetensors`:
//!
//! - `train_state.json` (schema `wafersim.train-state/v1`, [`TrainState`]): the phase, the steps
//!   taken, the learning-rate schedule (peak, warm-up, total), the batch shape, the seed and how
//!   many batches the sampler has drawn, a digest of the token file, a digest of the checkpoint's
//!   `model.safetensors` (FNV-1a 64 of its bytes, checked on resume: the weights belong to this
//!   state), the fidelity, the dtype, the loss scale (and, with `--loss-scale dynamic`, the
//!   dynamic scale's window, next scale and clean-step count), the whole fabric config, AdamW's
//!   hyperparameters and step count (the updates applied: fewer than the steps by the steps
//!   dynamic loss scaling skipped), the masks' sparsity, the per-step log so far (so the
//!   continued run's `train.csv` holds every step) and the first applied step's reference check.
//! - `train_state.safetensors` ([`state_tensor_bytes`], [`read_state_tensors`]): AdamW's moments
//!   in PyTorch's names, `exp_avg.<name>` and `exp_avg_sq.<name>`, where `<name>` is the
//!   Hugging Face name of the weight (`exp_avg.transformer.h.0.attn.c_attn.weight`: Q, K, V
//!   packed as in `model.safetensors`), for every parameter the phase trains, or
//!   `exp_avg.prompt` and `exp_avg_sq.prompt` (`[P, d]`) in prompt tuning, whose model is frozen;
//!   and, in sparse pre-training, the masks as `BOOL` tensors `mask.h.<layer>.<kind>`
//!   (`[in, out]`, 1 = kept; kinds `q k v attn_proj fc fc_proj`), so that a kept weight that
//!   reached exactly 0.0 stays kept.
//!
//! Key design decision: the sampler is not serialised; it is replayed. Its order depends only on
//! the seed, the number of windows and the batch size, so [`crate::training::Sampler::skip`] over
//! the batches already drawn puts it where it was, for any run length. Floats in the JSON
//! round-trip exactly (serde_json's `float_roundtrip`), so the schedule recomputes the same rates.
//!
//! Compatibility: the fields added after the schema's first version (`weights_digest`,
//! `dynamic_loss_scale`, and the log's `loss_scale` and `skipped`) are optional with defaults
//! (no digest to check, a fixed scale, not skipped), so the schema stays `v1` and a state
//! written before them still resumes; a reader from before them refuses a state that has them
//! with its unknown-field error, as it would refuse a `v2`.
//!
//! What it is not: a general optimizer checkpoint (one optimizer, AdamW, with fixed betas), nor a
//! record of the machine's threads (results do not depend on them). Reading checks every file
//! (schema, fields, tensor names, dtypes, shapes, finiteness, non-negative second moments, 0/1
//! masks) and names the file and what is wrong; it never panics on bad bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use wafersim_sim::FabricConfig;

use super::corpus::{FNV_OFFSET, fnv1a64};
use super::loss_scale::DynamicLossScale;
use super::{StepRecord, TrainPhase, Trainer};
use crate::model::checkpoint::{hf_named_tensors, params_from_safetensors};
use crate::model::{GptConfig, GptParams, ModelError, SparseKind};
use crate::sparsity::Mask;

/// The JSON file of a run's state.
pub const STATE_JSON: &str = "train_state.json";
/// The tensors of a run's state (moments, masks).
pub const STATE_TENSORS: &str = "train_state.safetensors";
/// The schema [`STATE_JSON`] carries.
pub const SCHEMA: &str = "wafersim.train-state/v1";

const M_PREFIX: &str = "exp_avg.";
const V_PREFIX: &str = "exp_avg_sq.";
const MASK_PREFIX: &str = "mask.";
const PROMPT: &str = "prompt";

/// What is wrong with a state file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("{}: cannot read it: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Json { path: PathBuf, reason: String },
    #[error("{}: schema is {got}, expected \"{SCHEMA}\"", .path.display())]
    Schema { path: PathBuf, got: String },
    #[error("{}: `{field}` is {got}, {reason}", .path.display())]
    Field {
        path: PathBuf,
        field: &'static str,
        got: String,
        reason: String,
    },
    #[error("{}: not a valid safetensors file: {reason}", .path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: missing tensor `{name}`", .path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: unexpected tensor `{name}` (not part of a {phase} run's state)", .path.display())]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        phase: &'static str,
    },
    #[error("{}: tensor `{name}` is {got}, expected {expected}", .path.display())]
    Shape {
        path: PathBuf,
        name: String,
        /// Dtype and shape, `U8 [64, 64]`.
        got: String,
        expected: String,
    },
    #[error("{}: tensor `{name}` has a non-finite value ({value}) at flat index {index}", .path.display())]
    NonFinite {
        path: PathBuf,
        name: String,
        value: f32,
        index: usize,
    },
    #[error("{}: tensor `{name}` has a negative second moment ({value}) at flat index {index}", .path.display())]
    NegativeSecondMoment {
        path: PathBuf,
        name: String,
        value: f32,
        index: usize,
    },
    #[error("{}: mask `{name}` holds the byte {value} at flat index {index}; a mask holds 0 or 1", .path.display())]
    BadMask {
        path: PathBuf,
        name: String,
        value: u8,
        index: usize,
    },
    /// The moments of the model, read as the weights are (names, shapes, finiteness).
    #[error("AdamW's `{prefix}*` tensors: {source}")]
    Moments {
        prefix: &'static str,
        #[source]
        source: ModelError,
    },
    #[error("{}: cannot serialise the state: {reason}", .path.display())]
    Serialise { path: PathBuf, reason: String },
}

/// The learning-rate schedule of the run (see [`crate::training::LrSchedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleState {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
}

/// Where the sampler is: its seed and the batches it has drawn (replayed on resume).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerState {
    pub seed: u64,
    pub batches_drawn: u64,
}

/// Which token file the run reads: its digest ([`crate::training::Corpus::digest`]) and size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensState {
    /// `fnv1a64:` and 16 hex digits.
    pub digest: String,
    pub windows: usize,
    pub tokens: usize,
}

/// AdamW's settings and step count (its moments are in [`STATE_TENSORS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerState {
    /// `AdamW`.
    pub name: String,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (the bias correction's `t`).
    pub t: u64,
}

/// Dynamic loss scaling after the run's last step (see [`crate::training::loss_scale`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicScaleState {
    /// Clean steps after which the scale doubles (`--loss-scale-window`).
    pub window: u64,
    /// The scale the next step runs with: a power of two from 1 to 2^24.
    pub scale: u64,
    /// Clean steps since the scale last changed (below `window`).
    pub clean_steps: u64,
}

impl DynamicScaleState {
    /// The state of `scale`.
    pub fn of(scale: &DynamicLossScale) -> Self {
        Self {
            window: scale.window(),
            scale: 1u64 << scale.exponent(),
            clean_steps: scale.clean_steps(),
        }
    }

    /// The dynamic scale this records (`path`: the state file, named in errors).
    pub fn to_scale(&self, path: &Path) -> Result<DynamicLossScale, StateError> {
        let field = |field: &'static str, got: u64, reason: String| StateError::Field {
            path: path.to_path_buf(),
            field,
            got: got.to_string(),
            reason,
        };
        if !self.scale.is_power_of_two() {
            let reason = "expected a power of two from 1 to 16777216".to_string();
            return Err(field("dynamic_loss_scale.scale", self.scale, reason));
        }
        let exponent = u8::try_from(self.scale.trailing_zeros()).unwrap_or(u8::MAX);
        DynamicLossScale::restore(exponent, self.clean_steps, self.window).map_err(|e| {
            use crate::training::loss_scale::DynamicScaleError as E;
            match e {
                E::EmptyWindow => field("dynamic_loss_scale.window", self.window, e.to_string()),
                E::ScaleTooLarge { .. } => {
                    field("dynamic_loss_scale.scale", self.scale, e.to_string())
                }
                _ => field(
                    "dynamic_loss_scale.clean_steps",
                    self.clean_steps,
                    e.to_string(),
                ),
            }
        })
    }
}

/// The contents of [`STATE_JSON`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub schema: String,
    /// `sparse-pretrain`, `dense-finetune` or `prompt-tune`.
    pub phase: String,
    /// Optimizer steps taken.
    pub steps_done: u64,
    pub schedule: ScheduleState,
    pub batch: usize,
    pub seq: usize,
    /// The run's `--seed` (weights, masks, prompt and batch order were drawn from it).
    pub seed: u64,
    pub sampler: SamplerState,
    pub tokens: TokensState,
    /// [`bytes_digest`] of the checkpoint's `model.safetensors`, as [`digest_text`] writes it
    /// (`None` in states written before it existed: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_digest: Option<String>,
    /// `exact` or `fast`.
    pub fidelity: String,
    /// `fp32` or `fp16`.
    pub dtype: String,
    /// `auto`, a power of two, `dynamic` or `dynamic:L`, as `train --loss-scale` takes it.
    pub loss_scale: String,
    /// With `dynamic`: the dynamic scale after the last step (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_loss_scale: Option<DynamicScaleState>,
    pub fabric: FabricConfig,
    /// Prompt vectors in front of every sequence (0 outside prompt tuning).
    pub prompt_len: usize,
    /// The masks' recorded sparsity (requested, or measured from a checkpoint's zeros).
    pub sparsity: f64,
    pub optimizer: OptimizerState,
    /// Every step so far, as `train.csv` logs it.
    pub log: Vec<StepRecord>,
    /// The first applied step's reference check as `train.json` reports it (exact fidelity).
    pub reference_check: Option<serde_json::Value>,
}

impl TrainState {
    /// The state as pretty JSON (a trailing newline).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self).map(|text| text + "\n")
    }

    /// Parses [`STATE_JSON`]'s text (`path` names it in errors): the schema first, then every
    /// field; a missing, unknown or mistyped field is named.
    pub fn from_json(path: &Path, text: &str) -> Result<Self, StateError> {
        let json = |reason: String| StateError::Json {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| json(format!("not JSON: {e}")))?;
        match value.get("schema") {
            Some(serde_json::Value::String(s)) if s == SCHEMA => {}
            other => {
                return Err(StateError::Schema {
                    path: path.to_path_buf(),
                    got: other.map_or("missing".into(), ToString::to_string),
                });
            }
        }
        serde_json::from_value(value).map_err(|e| json(e.to_string()))
    }

    /// Reads and parses [`STATE_JSON`] in `dir`.
    pub fn read(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(STATE_JSON);
        let text = std::fs::read_to_string(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&path, &text)
    }

    /// The phase named by `phase`.
    pub fn train_phase(&self, path: &Path) -> Result<TrainPhase, StateError> {
        let phases = [
            TrainPhase::SparsePretrain,
            TrainPhase::DenseFinetune,
            TrainPhase::PromptTune,
        ];
        phases
            .into_iter()
            .find(|p| p.name() == self.phase)
            .ok_or_else(|| StateError::Field {
                path: path.to_path_buf(),
                field: "phase",
                got: format!("{:?}", self.phase),
                reason: "expected sparse-pretrain, dense-finetune or prompt-tune".into(),
            })
    }
}

/// The `fnv1a64:` digest text of a 64-bit hash.
pub fn digest_text(hash: u64) -> String {
    format!("fnv1a64:{hash:016x}")
}

/// FNV-1a 64 over `bytes` (the hash the token file's digest uses, over a file's bytes).
pub fn bytes_digest(bytes: &[u8]) -> u64 {
    fnv1a64(FNV_OFFSET, bytes)
}

/// [`bytes_digest`] of everything `reader` gives, read in blocks (a model file need not fit in
/// memory twice).
pub fn reader_digest(mut reader: impl std::io::Read) -> std::io::Result<u64> {
    let mut hash = FNV_OFFSET;
    let mut block = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut block) {
            Ok(0) => return Ok(hash),
            Ok(n) => hash = fnv1a64(hash, block.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What [`read_state_tensors`] found, by phase.
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensors {
    /// AdamW's first and second moments of the model (sparse pre-training, dense fine-tuning).
    pub moments: Option<(GptParams, GptParams)>,
    /// The prompt vectors' moments, `[P, d]` flattened (prompt tuning).
    pub prompt_moments: Option<(Vec<f32>, Vec<f32>)>,
    /// The masks, six per block in [`SparseKind::ALL`] order (sparse pre-training).
    pub masks: Option<Vec<[Mask; 6]>>,
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The name of a mask tensor.
fn mask_name(layer: usize, kind: SparseKind) -> String {
    format!("{MASK_PREFIX}h.{layer}.{}", kind.name())
}

/// The bytes of [`STATE_TENSORS`] for `trainer` (`path` names the file in errors): the moments
/// the phase trains, and the masks of sparse pre-training.
pub fn state_tensor_bytes(trainer: &Trainer, path: &Path) -> Result<Vec<u8>, StateError> {
    let mut tensors: Vec<RawTensor> = Vec::new();
    if let Some(prompt) = &trainer.prompt {
        let shape = vec![prompt.vectors.rows, prompt.vectors.cols];
        let (m, v) = prompt.moments();
        for (prefix, values) in [(M_PREFIX, m), (V_PREFIX, v)] {
            let name = format!("{prefix}{PROMPT}");
            tensors.push((name, Dtype::F32, shape.clone(), f32_bytes(values)));
        }
    } else {
        let adam = trainer.adam();
        for (prefix, moments) in [(M_PREFIX, &adam.m), (V_PREFIX, &adam.v)] {
            for (name, shape, values) in hf_named_tensors(moments) {
                tensors.push((
                    format!("{prefix}{name}"),
                    Dtype::F32,
                    shape,
                    f32_bytes(&values),
                ));
            }
        }
    }
    if trainer.phase == TrainPhase::SparsePretrain {
        for (layer, masks) in trainer.masks.layers().iter().enumerate() {
            for kind in SparseKind::ALL {
                let mask = &masks[kind.index()];
                let bytes = mask.keep().into_iter().map(u8::from).collect();
                let shape = vec![mask.rows(), mask.cols()];
                tensors.push((mask_name(layer, kind), Dtype::BOOL, shape, bytes));
            }
        }
    }
    serialise(&tensors, path)
}

fn serialise(tensors: &[RawTensor], path: &Path) -> Result<Vec<u8>, StateError> {
    let error = |reason: String| StateError::Serialise {
        path: path.to_path_buf(),
        reason,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, bytes) in tensors {
        let view =
            TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| error(e.to_string()))?;
        views.push((name.as_str(), view));
    }
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| error(e.to_string()))
}

/// Reads [`STATE_TENSORS`]' bytes (`path` names the file) for a `phase` run of a `config` model
/// with `prompt_len` prompt vectors: exactly the tensors that phase writes, every one checked.
pub fn read_state_tensors(
    path: &Path,
    bytes: &[u8],
    config: &GptConfig,
    phase: TrainPhase,
    prompt_len: usize,
) -> Result<StateTensors, StateError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| StateError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut groups: BTreeMap<&'static str, Vec<(String, TensorView<'_>)>> = BTreeMap::new();
    let prompt = phase == TrainPhase::PromptTune;
    let masked = phase == TrainPhase::SparsePretrain;
    let mut stored = file.tensors();
    // By name, so that the first of several wrong tensors named is the same on every read.
    stored.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in stored {
        // `exp_avg_sq.` before `exp_avg.`: the longer prefix first.
        let prefix = [V_PREFIX, M_PREFIX, MASK_PREFIX]
            .into_iter()
            .find(|p| name.starts_with(p));
        match prefix {
            Some(MASK_PREFIX) if !masked => return Err(unexpected(path, name, phase)),
            Some(p) if p == MASK_PREFIX || !prompt || name == format!("{p}{PROMPT}") => {
                groups.entry(p).or_default().push((name, view));
            }
            _ => return Err(unexpected(path, name, phase)),
        }
    }
    let mut take = |prefix| groups.remove(prefix).unwrap_or_default();
    let (m, v, masks) = (take(M_PREFIX), take(V_PREFIX), take(MASK_PREFIX));
    let shapes = TensorCheck { path };
    let prompt_moments = if prompt {
        let shape = [prompt_len, config.n_embd];
        let m = shapes.f32_tensor(&m, &format!("{M_PREFIX}{PROMPT}"), &shape)?;
        let v = shapes.f32_tensor(&v, &format!("{V_PREFIX}{PROMPT}"), &shape)?;
        shapes.non_negative(&format!("{V_PREFIX}{PROMPT}"), &v)?;
        Some((m, v))
    } else {
        None
    };
    let moments = if prompt {
        None
    } else {
        let m = moments_of(path, M_PREFIX, m, config)?;
        let v = moments_of(path, V_PREFIX, v, config)?;
        // Under the file's names and flat indices (Q, K, V packed).
        for (name, _, values) in hf_named_tensors(&v) {
            shapes.non_negative(&format!("{V_PREFIX}{name}"), &values)?;
        }
        Some((m, v))
    };
    let masks = if masked {
        Some(shapes.masks(&masks, config)?)
    } else {
        None
    };
    Ok(StateTensors {
        moments,
        prompt_moments,
        masks,
    })
}

fn unexpected(path: &Path, name: String, phase: TrainPhase) -> StateError {
    StateError::UnexpectedTensor {
        path: path.to_path_buf(),
        name,
        phase: phase.name(),
    }
}

/// The model-shaped moments under `prefix`, read as weights are read (names, shapes, dtypes,
/// finiteness: [`params_from_safetensors`]), from the tensors with the prefix taken off.
fn moments_of(
    path: &Path,
    prefix: &'static str,
    tensors: Vec<(String, TensorView<'_>)>,
    config: &GptConfig,
) -> Result<GptParams, StateError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .into_iter()
        .map(|(name, view)| (name[prefix.len()..].to_string(), view))
        .collect();
    let bytes = safetensors::serialize(views, None).map_err(|e| StateError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    params_from_safetensors(path, &bytes, config)
        .map_err(|source| StateError::Moments { prefix, source })
}

/// Checks of single tensors of one file.
struct TensorCheck<'a> {
    path: &'a Path,
}

impl TensorCheck<'_> {
    /// The tensor `name` of `group`: present, of `dtype` and `shape`.
    fn find<'t>(
        &self,
        group: &'t [(String, TensorView<'t>)],
        name: &str,
        dtype: Dtype,
        shape: &[usize],
    ) -> Result<&'t TensorView<'t>, StateError> {
        let Some((_, view)) = group.iter().find(|(n, _)| n == name) else {
            return Err(StateError::MissingTensor {
                path: self.path.to_path_buf(),
                name: name.into(),
            });
        };
        if view.dtype() != dtype || view.shape() != shape {
            return Err(StateError::Shape {
                path: self.path.to_path_buf(),
                name: name.into(),
                got: format!("{:?} {:?}", view.dtype(), view.shape()),
                expected: format!("{dtype:?} {shape:?}"),
            });
        }
        Ok(view)
    }

    /// The finite f32 values of tensor `name`.
    fn f32_tensor(
        &self,
        group: &[(String, TensorView<'_>)],
        name: &str,
        shape: &[usize],
    ) -> Result<Vec<f32>, StateError> {
        let view = self.find(group, name, Dtype::F32, shape)?;
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        match values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            Some((index, &value)) => Err(StateError::NonFinite {
                path: self.path.to_path_buf(),
                name: name.into(),
                value,
                index,
            }),
            None => Ok(values),
        }
    }

    /// A second moment is a mean of squares: never below zero.
    fn non_negative(&self, name: &str, values: &[f32]) -> Result<(), StateError> {
        match values.iter().enumerate().find(|(_, v)| **v < 0.0) {
            Some((index, &value)) => Err(StateError::NegativeSecondMoment {
                path: self.path.to_path_buf(),
                name: name.into(),
                value,
                index,
            }),
            None => Ok(()),
        }
    }

    /// The masks of every block, each `[in, out]` of 0/1 bytes.
    fn masks(
        &self,
        group: &[(String, TensorView<'_>)],
        config: &GptConfig,
    ) -> Result<Vec<[Mask; 6]>, StateError> {
        let expected: usize = config.n_layer * SparseKind::ALL.len();
        if let Some((name, _)) = group.iter().find(|(name, _)| {
            !(0..config.n_layer).any(|l| SparseKind::ALL.iter().any(|&k| *name == mask_name(l, k)))
        }) {
            return Err(StateError::UnexpectedTensor {
                path: self.path.to_path_buf(),
                name: name.clone(),
                phase: TrainPhase::SparsePretrain.name(),
            });
        }
        let mut layers = Vec::with_capacity(expected);
        for layer in 0..config.n_layer {
            let mut masks = Vec::with_capacity(6);
            for kind in SparseKind::ALL {
                masks.push(self.mask(group, layer, kind, config)?);
            }
            let six: [Mask; 6] = masks.try_into().map_err(|_| StateError::MissingTensor {
                path: self.path.to_path_buf(),
                name: format!("{MASK_PREFIX}h.{layer}.*"),
            })?;
            layers.push(six);
        }
        Ok(layers)
    }

    fn mask(
        &self,
        group: &[(String, TensorView<'_>)],
        layer: usize,
        kind: SparseKind,
        config: &GptConfig,
    ) -> Result<Mask, StateError> {
        let name = mask_name(layer, kind);
        let (rows, cols) = kind.shape(config);
        let view = self.find(group, &name, Dtype::BOOL, &[rows, cols])?;
        let bytes = view.data();
        if let Some((index, &value)) = bytes.iter().enumerate().find(|(_, b)| **b > 1) {
            return Err(StateError::BadMask {
                path: self.path.to_path_buf(),
                name,
                value,
                index,
            });
        }
        let keep = bytes.iter().map(|&b| b == 1).collect();
        Mask::from_keep(rows, cols, keep).map_err(|e| StateError::Field {
            path: self.path.to_path_buf(),
            field: "mask",
            got: name.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Matrix, init_params};
    use crate::sparsity::ModelMasks;
    use crate::training::{LrSchedule, PromptVectors};

    fn tiny() -> GptConfig {
        GptConfig::preset("tiny").unwrap()
    }

    fn schedule() -> LrSchedule {
        LrSchedule {
            peak: 1e-3,
            warmup: 1,
            total: 10,
        }
    }

    /// Moments with a distinct value everywhere (second moments made non-negative).
    fn moments(config: &GptConfig) -> (GptParams, GptParams) {
        let m = init_params(config, 1);
        let mut v = init_params(config, 2);
        for (_, t) in v.tensors_mut() {
            t.iter_mut().for_each(|x| *x = x.abs());
        }
        (m, v)
    }

    fn bits(p: &GptParams) -> Vec<u32> {
        p.tensors()
            .iter()
            .flat_map(|(_, t)| t.iter().map(|x| x.to_bits()))
            .collect()
    }

    fn path() -> PathBuf {
        PathBuf::from("ckpt/train_state.safetensors")
    }

    #[test]
    fn a_sparse_runs_moments_and_masks_round_trip_bit_for_bit() {
        let config = tiny();
        let masks = ModelMasks::random(&config, 0.5, 7).unwrap();
        let (m, v) = moments(&config);
        let trainer = Trainer::resume(
            TrainPhase::SparsePretrain,
            init_params(&config, 0),
            masks.clone(),
            schedule(),
            Some((m.clone(), v.clone())),
            None,
            3,
        );
        assert_eq!(trainer.adam().t, 3);
        let bytes = state_tensor_bytes(&trainer, &path()).unwrap();
        let back =
            read_state_tensors(&path(), &bytes, &config, TrainPhase::SparsePretrain, 0).unwrap();
        let (m2, v2) = back.moments.unwrap();
        assert_eq!((bits(&m2), bits(&v2)), (bits(&m), bits(&v)));
        assert_eq!(back.masks.unwrap(), masks.layers());
        assert!(back.prompt_moments.is_none());
        // 2 x 28 moment tensors (2 + 2 x 12 + 2 per set, Q | K | V packed) and 2 x 6 masks.
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.len(), 2 * 28 + 12);
        // The same state, the same bytes.
        assert_eq!(bytes, state_tensor_bytes(&trainer, &path()).unwrap());
    }

    #[test]
    fn a_prompt_runs_state_is_the_prompts_moments_alone() {
        let config = tiny();
        let vectors = Matrix {
            rows: 2,
            cols: 64,
            data: (0..128).map(|i| i as f32 / 128.0).collect(),
        };
        let m: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) * 1e-3).collect();
        let v: Vec<f32> = (0..128).map(|i| i as f32 * 1e-6).collect();
        let prompt = PromptVectors::with_moments(vectors.clone(), m.clone(), v.clone()).unwrap();
        assert!(PromptVectors::with_moments(vectors, m.clone(), vec![0.0; 3]).is_none());
        let params = init_params(&config, 0);
        let masks = ModelMasks::from_params_zeros(&params);
        let trainer = Trainer::resume(
            TrainPhase::PromptTune,
            params,
            masks,
            schedule(),
            None,
            Some(prompt),
            2,
        );
        let bytes = state_tensor_bytes(&trainer, &path()).unwrap();
        let names: Vec<String> = SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let back = read_state_tensors(&path(), &bytes, &config, TrainPhase::PromptTune, 2).unwrap();
        assert_eq!(back.prompt_moments, Some((m, v)));
        assert!(back.moments.is_none() && back.masks.is_none());
        // Read for another prompt length, or as another phase: refused, naming the tensor.
        let err = read_state_tensors(&path(), &bytes, &config, TrainPhase::PromptTune, 3)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "ckpt/train_state.safetensors: tensor `exp_avg.prompt` is F32 [2, 64], expected F32 [3, 64]"
        );
        let err =
            read_state_tensors(&path(), &bytes, &config, TrainPhase::DenseFinetune, 0).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Moments {
                    prefix: "exp_avg.",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// Tensors as (name, dtype, shape, bytes), serialised.
    fn file_of(tensors: &[RawTensor]) -> Vec<u8> {
        serialise(tensors, &path()).unwrap()
    }

    #[test]
    fn bad_prompt_moments_are_named_with_their_index() {
        let config = tiny();
        let mut m = vec![0.0f32; 64];
        m[9] = f32::INFINITY;
        let mut v = vec![0.0f32; 64];
        v[63] = -2.5;
        let ok = vec![0.0f32; 64];
        let read = |tensors: &[RawTensor]| {
            read_state_tensors(
                &path(),
                &file_of(tensors),
                &config,
                TrainPhase::PromptTune,
                1,
            )
            .unwrap_err()
            .to_string()
        };
        let t = |name: &str, values: &[f32]| {
            (name.to_string(), Dtype::F32, vec![1, 64], f32_bytes(values))
        };
        assert_eq!(
            read(&[t("exp_avg.prompt", &m), t("exp_avg_sq.prompt", &ok)]),
            "ckpt/train_state.safetensors: tensor `exp_avg.prompt` has a non-finite value (inf) at flat index 9"
        );
        assert_eq!(
            read(&[t("exp_avg.prompt", &ok), t("exp_avg_sq.prompt", &v)]),
            "ckpt/train_state.safetensors: tensor `exp_avg_sq.prompt` has a negative second moment (-2.5) at flat index 63"
        );
        assert_eq!(
            read(&[t("exp_avg.prompt", &ok)]),
            "ckpt/train_state.safetensors: missing tensor `exp_avg_sq.prompt`"
        );
        let mask = (
            "mask.h.0.q".to_string(),
            Dtype::BOOL,
            vec![64, 64],
            vec![1; 4096],
        );
        assert_eq!(
            read(&[t("exp_avg.prompt", &ok), t("exp_avg_sq.prompt", &ok), mask]),
            "ckpt/train_state.safetensors: unexpected tensor `mask.h.0.q` (not part of a prompt-tune run's state)"
        );
        assert_eq!(
            read_state_tensors(
                &path(),
                b"not safetensors",
                &config,
                TrainPhase::PromptTune,
                1
            )
            .unwrap_err()
            .to_string()
            .split(':')
            .take(2)
            .collect::<Vec<_>>(),
            [
                "ckpt/train_state.safetensors",
                " not a valid safetensors file"
            ]
        );
    }

    fn state() -> TrainState {
        let record = |step, loss| StepRecord {
            step,
            loss,
            lr: 0.1 + 0.2,
            flops: 13_369_344,
            cycles: 353_166,
            loss_scale: None,
            skipped: false,
        };
        TrainState {
            schema: SCHEMA.into(),
            phase: "dense-finetune".into(),
            steps_done: 2,
            schedule: ScheduleState {
                peak: 0.1 + 0.2,
                warmup: 1,
                total: 5,
            },
            batch: 2,
            seq: 16,
            seed: u64::MAX,
            sampler: SamplerState {
                seed: u64::MAX,
                batches_drawn: 2,
            },
            tokens: TokensState {
                digest: digest_text(0x0123_4567_89ab_cdef),
                windows: 56,
                tokens: 896,
            },
            weights_digest: Some(digest_text(0xfedc_ba98_7654_3210)),
            fidelity: "fast".into(),
            dtype: "fp32".into(),
            loss_scale: "auto".into(),
            dynamic_loss_scale: None,
            fabric: FabricConfig::from_spec("8x8").unwrap(),
            prompt_len: 0,
            sparsity: 0.0,
            optimizer: OptimizerState {
                name: "AdamW".into(),
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                t: 2,
            },
            log: vec![record(1, 5.542840003967285), record(2, 1.0 / 3.0)],
            reference_check: None,
        }
    }

    #[test]
    fn the_json_round_trips_every_float_exactly() {
        // 0.1 + 0.2 = 0.30000000000000004 and 1/3 need all 17 digits back: the schedule and the
        // log are recomputed and rewritten from them.
        let state = state();
        let text = state.to_json().unwrap();
        assert!(
            text.contains("\"digest\": \"fnv1a64:0123456789abcdef\""),
            "{text}"
        );
        let back = TrainState::from_json(&path(), &text).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.schedule.peak.to_bits(), (0.1f64 + 0.2).to_bits());
        assert_eq!(back.to_json().unwrap(), text);
        assert_eq!(
            back.train_phase(&path()).unwrap(),
            TrainPhase::DenseFinetune
        );
    }

    #[test]
    fn bad_json_is_named_by_file_and_field() {
        let p = PathBuf::from("ckpt/train_state.json");
        let text = state().to_json().unwrap();
        let err = |text: &str| TrainState::from_json(&p, text).unwrap_err().to_string();
        assert_eq!(
            err(&text.replace("train-state/v1", "train-state/v2")),
            "ckpt/train_state.json: schema is \"wafersim.train-state/v2\", expected \"wafersim.train-state/v1\""
        );
        assert_eq!(
            err("{}"),
            "ckpt/train_state.json: schema is missing, expected \"wafersim.train-state/v1\""
        );
        assert!(err("[1,").starts_with("ckpt/train_state.json: not JSON: "));
        assert_eq!(
            err(&text.replace("\"batch\": 2,", "")),
            "ckpt/train_state.json: missing field `batch`"
        );
        assert!(
            err(&text.replace("\"batch\": 2,", "\"batch\": 2, \"colour\": 1,"))
                .starts_with("ckpt/train_state.json: unknown field `colour`"),
        );
        let mut bad = state();
        bad.phase = "pretrain".into();
        assert_eq!(
            bad.train_phase(&p).unwrap_err().to_string(),
            "ckpt/train_state.json: `phase` is \"pretrain\", expected sparse-pretrain, dense-finetune or prompt-tune"
        );
    }

    #[test]
    fn a_dynamic_runs_state_and_a_skipped_steps_nan_loss_round_trip() {
        let mut state = state();
        state.loss_scale = "dynamic:16777216".into();
        state.dynamic_loss_scale = Some(DynamicScaleState {
            window: 3,
            scale: 1 << 20,
            clean_steps: 2,
        });
        state.log[0].loss = f64::NAN;
        state.log[0].skipped = true;
        state.log[0].loss_scale = Some(16_777_216.0);
        state.log[1].loss = f64::INFINITY;
        state.optimizer.t = 1;
        let text = state.to_json().unwrap();
        assert!(text.contains("\"loss\": \"NaN\""), "{text}");
        assert!(text.contains("\"loss\": \"inf\""), "{text}");
        let back = TrainState::from_json(&path(), &text).unwrap();
        assert!(back.log[0].loss.is_nan() && back.log[0].skipped);
        assert_eq!(back.log[1].loss, f64::INFINITY);
        assert_eq!(back.dynamic_loss_scale, state.dynamic_loss_scale);
        assert_eq!(back.to_json().unwrap(), text);
        let scale = back.dynamic_loss_scale.unwrap().to_scale(&path()).unwrap();
        assert_eq!(
            (scale.exponent(), scale.clean_steps(), scale.window()),
            (20, 2, 3)
        );
        let err = TrainState::from_json(&path(), &text.replace("\"NaN\"", "\"lots\""));
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("loss \"lots\": expected a number"),
            "{text}"
        );
    }

    #[test]
    fn a_state_written_before_the_optional_fields_still_reads() {
        // No weights digest, no dynamic scale, log rows without `loss_scale` and `skipped`: the
        // state of a run written by the first v1 writer.
        let mut old = state();
        old.weights_digest = None;
        let text = old.to_json().unwrap();
        assert!(!text.contains("weights_digest") && !text.contains("dynamic_loss_scale"));
        let text = text
            .replace(",\n      \"loss_scale\": null", "")
            .replace(",\n      \"skipped\": false", "");
        assert!(!text.contains("skipped"), "{text}");
        let back = TrainState::from_json(&path(), &text).unwrap();
        assert_eq!(back, old);
    }

    #[test]
    fn the_weights_digest_is_fnv1a_of_the_files_bytes() {
        // FNV-1a 64's published test vectors: "" is the offset basis, "a" and "foobar".
        assert_eq!(bytes_digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(bytes_digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(bytes_digest(b"foobar"), 0x8594_4171_f739_67e8);
        // Read in blocks of 64 KiB, the same as in one piece.
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let blocks = reader_digest(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(blocks, bytes_digest(&bytes));
        assert_ne!(blocks, bytes_digest(&bytes[1..]));
    }

    #[test]
    fn an_impossible_dynamic_scale_is_named_by_its_field() {
        let p = PathBuf::from("ckpt/train_state.json");
        let bad = |window, scale, clean_steps| {
            DynamicScaleState {
                window,
                scale,
                clean_steps,
            }
            .to_scale(&p)
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            bad(50, 1000, 0),
            "ckpt/train_state.json: `dynamic_loss_scale.scale` is 1000, expected a power of two from 1 to 16777216"
        );
        assert_eq!(
            bad(50, 1 << 25, 0),
            "ckpt/train_state.json: `dynamic_loss_scale.scale` is 33554432, the scale is 2^25; at most 2^24 (LossScale::MAX_EXPONENT)"
        );
        assert_eq!(
            bad(0, 8, 0),
            "ckpt/train_state.json: `dynamic_loss_scale.window` is 0, the window is 0 steps; it must be at least 1"
        );
        assert_eq!(
            bad(4, 8, 4),
            "ckpt/train_state.json: `dynamic_loss_scale.clean_steps` is 4, 4 clean steps counted, but the scale doubles after 4: the count is below the window"
        );
    }
}
