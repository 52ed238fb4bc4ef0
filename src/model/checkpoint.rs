//! Hugging Face GPT-2 checkpoints: a folder with `config.json` and `model.safetensors`.
//!
//! Reading accepts what `transformers` and the Hub actually hold: f32, f16 or bf16 tensors; names
//! with or without the `transformer.` prefix; `lm_head.weight` present (it must then equal the
//! token embedding exactly: the head is tied) or absent; the causal-mask buffers `attn.bias` and
//! `attn.masked_bias` (ignored). Conv1D weights are stored `[in, out]`, our layout, and
//! `attn.c_attn` packs Q | K | V along its output axis; it is split here. Anything else is refused
//! with an error naming the file and the tensor: a missing or unexpected tensor, a wrong shape or
//! dtype, a NaN or infinity.
//!
//! Writing produces exactly what `GPT2LMHeadModel.save_pretrained` of transformers 5 writes: f32,
//! every parameter under the `transformer.` prefix, no `lm_head.weight` (tied), and the metadata
//! `{"format": "pt"}`. [`hf_named_tensors`] gives those names and shapes for any [`GptParams`], so
//! gradients and optimizer moments are written under the same names as the weights.
//!
//! Key decision: every write is atomic. Bytes go to a hidden temporary file in the target folder,
//! are synced, and only then renamed over the target, so a failure never leaves a partial file nor
//! clobbers a good one. A checkpoint is two files: both are fully staged before either is renamed.
//!
//! Not here: sharded checkpoints (`model.safetensors.index.json`), untied heads, other
//! architectures, and any check that the weights are sensible beyond being finite.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensors};
use tempfile::NamedTempFile;

use super::ModelError;
use super::config::GptConfig;
use super::params::{Block, GptParams, LayerNorm, Linear, Matrix};

/// The config file of a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The prefix `GPT2LMHeadModel` puts before every parameter of its `GPT2Model`.
pub const HF_PREFIX: &str = "transformer.";
/// The tied LM head, stored by some exporters, never by us.
const LM_HEAD: &str = "lm_head.weight";
/// Causal-mask buffers older transformers versions (and the Hub's `gpt2`) store per block.
const MASK_BUFFERS: [&str; 2] = ["attn.bias", "attn.masked_bias"];

/// A tensor under its Hugging Face name: `(name, shape, values)`. Values are borrowed from the
/// parameters except for the packed `c_attn` tensors, which are built.
pub type HfTensor<'a> = (String, Vec<usize>, Cow<'a, [f32]>);

/// An f32 tensor to write: `(name, shape, values)`.
pub type F32Tensor<'a> = (String, Vec<usize>, &'a [f32]);

type Result<T> = std::result::Result<T, ModelError>;

// ---------------------------------------------------------------------------------------------
// Reading

/// Reads the checkpoint folder `dir` (`config.json` + `model.safetensors`).
pub fn load_checkpoint(dir: &Path) -> Result<(GptConfig, GptParams)> {
    let config = read_config(&dir.join(CONFIG_FILE))?;
    let params = read_params(&dir.join(WEIGHTS_FILE), &config)?;
    Ok((config, params))
}

/// Reads and checks a Hugging Face GPT-2 `config.json`.
pub fn read_config(path: &Path) -> Result<GptConfig> {
    let text = fs::read_to_string(path).map_err(|e| io_error("read", path, e))?;
    GptConfig::from_hf_json(&text).map_err(|e| ModelError::ConfigFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// Reads the parameters of a `config`-shaped GPT-2 from the safetensors file `path`.
///
/// Also reads files written with [`write_safetensors_atomic`] from [`hf_named_tensors`] of
/// gradients or moments, since they carry the same names and shapes.
pub fn read_params(path: &Path, config: &GptConfig) -> Result<GptParams> {
    let bytes = fs::read(path).map_err(|e| io_error("read", path, e))?;
    params_from_safetensors(path, &bytes, config)
}

/// [`read_params`] on the bytes of a safetensors file already in memory; `path` only names the
/// file in errors. Any bytes give parameters or an error, never a panic (this is the checkpoint
/// reader's fuzzing entry point).
pub fn params_from_safetensors(path: &Path, bytes: &[u8], config: &GptConfig) -> Result<GptParams> {
    let file = SafeTensors::deserialize(bytes).map_err(|source| ModelError::Safetensors {
        path: path.to_path_buf(),
        source,
    })?;
    let index = TensorIndex::new(path, &file, config)?;
    let params = params_from_index(&index, config)?;
    index.check_lm_head(&params.wte)?;
    Ok(params)
}

/// The tensors of one file, by name without the `transformer.` prefix, checked against a config.
struct TensorIndex<'a> {
    path: &'a Path,
    /// Bare name -> (name as stored, view).
    by_name: BTreeMap<String, (String, TensorView<'a>)>,
    /// How a missing tensor is named in errors: as the rest of the file names tensors.
    missing_prefix: &'static str,
}

impl<'a> TensorIndex<'a> {
    /// Indexes `file`, refusing unexpected and duplicate names and dropping the mask buffers.
    fn new(path: &'a Path, file: &SafeTensors<'a>, config: &GptConfig) -> Result<Self> {
        let expected: HashMap<String, Vec<usize>> = hf_layout(config).into_iter().collect();
        let mut stored: Vec<(String, TensorView<'a>)> = file.tensors();
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        let any_prefixed = stored.iter().any(|(n, _)| n.starts_with(HF_PREFIX));
        let mut by_name = BTreeMap::new();
        for (name, view) in stored {
            let bare = name.strip_prefix(HF_PREFIX).unwrap_or(&name).to_string();
            if is_mask_buffer(&bare, config.n_layer) {
                continue;
            }
            if !expected.contains_key(&bare) && bare != LM_HEAD {
                return Err(ModelError::UnexpectedTensor {
                    path: path.to_path_buf(),
                    name,
                });
            }
            if let Some((first, _)) = by_name.insert(bare, (name, view)) {
                return Err(ModelError::DuplicateTensor {
                    path: path.to_path_buf(),
                    name: first,
                });
            }
        }
        Ok(Self {
            path,
            by_name,
            missing_prefix: if any_prefixed { HF_PREFIX } else { "" },
        })
    }

    /// The values of tensor `bare`, checked for presence, shape, dtype and finiteness.
    fn fetch(&self, bare: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some((name, view)) = self.by_name.get(bare) else {
            return Err(ModelError::MissingTensor {
                path: self.path.to_path_buf(),
                name: format!("{}{bare}", self.missing_prefix),
            });
        };
        if view.shape() != shape {
            return Err(ModelError::Shape {
                path: self.path.to_path_buf(),
                name: name.clone(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let values = decode(view).ok_or_else(|| ModelError::Dtype {
            path: self.path.to_path_buf(),
            name: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                path: self.path.to_path_buf(),
                name: name.clone(),
                index,
                value,
            });
        }
        Ok(values)
    }

    /// If the file stores `lm_head.weight`, it must be the token embedding, value for value.
    fn check_lm_head(&self, wte: &Matrix) -> Result<()> {
        let Some((name, _)) = self.by_name.get(LM_HEAD) else {
            return Ok(());
        };
        let head = self.fetch(LM_HEAD, &[wte.rows, wte.cols])?;
        let first_difference = head
            .iter()
            .zip(&wte.data)
            .enumerate()
            .find(|(_, (h, w))| h != w);
        match first_difference {
            None => Ok(()),
            Some((index, (&got, &expected))) => Err(ModelError::UntiedLmHead {
                path: self.path.to_path_buf(),
                name: name.clone(),
                index,
                got,
                expected,
            }),
        }
    }

    fn matrix(&self, bare: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let data = self.fetch(bare, &[rows, cols])?;
        Ok(Matrix { rows, cols, data })
    }

    fn linear(&self, prefix: &str, fan_in: usize, fan_out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), fan_in, fan_out)?,
            bias: self.fetch(&format!("{prefix}.bias"), &[fan_out])?,
        })
    }

    fn layer_norm(&self, prefix: &str, d: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: self.fetch(&format!("{prefix}.weight"), &[d])?,
            beta: self.fetch(&format!("{prefix}.bias"), &[d])?,
        })
    }
}

/// `h.{l}.attn.bias` or `h.{l}.attn.masked_bias` for a layer of the model.
///
/// Parsed rather than compared against every layer's names, so a file of many tensors costs
/// one look per tensor whatever the layer count.
fn is_mask_buffer(bare: &str, n_layer: usize) -> bool {
    let Some((layer, buffer)) = bare
        .strip_prefix("h.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    let canonical_layer = layer
        .parse::<usize>()
        .is_ok_and(|l| l < n_layer && l.to_string() == layer);
    canonical_layer && MASK_BUFFERS.contains(&buffer)
}

/// Decodes little-endian f32, f16 or bf16 values to f32; `None` for any other dtype.
///
/// Works on any byte alignment: the values are assembled from byte chunks, never cast in place.
fn decode(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let bytes = view.data();
    match view.dtype() {
        Dtype::F32 => Some(
            bytes
                .as_chunks::<4>()
                .0
                .iter()
                .map(|b| f32::from_le_bytes(*b))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| half::f16::from_le_bytes(*b).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| half::bf16::from_le_bytes(*b).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// Builds the parameters from a checked index, splitting each `c_attn` into Q, K and V.
fn params_from_index(index: &TensorIndex<'_>, config: &GptConfig) -> Result<GptParams> {
    let d = config.n_embd;
    let blocks = (0..config.n_layer)
        .map(|l| block_from_index(index, l, d, config.n_inner))
        .collect::<Result<Vec<Block>>>()?;
    Ok(GptParams {
        wte: index.matrix("wte.weight", config.vocab_size, d)?,
        wpe: index.matrix("wpe.weight", config.n_positions, d)?,
        blocks,
        ln_f: index.layer_norm("ln_f", d)?,
    })
}

fn block_from_index(index: &TensorIndex<'_>, l: usize, d: usize, d_ffn: usize) -> Result<Block> {
    let h = |s: &str| format!("h.{l}.{s}");
    let [q, k, v] = split_qkv(&index.linear(&h("attn.c_attn"), d, 3 * d)?, d);
    Ok(Block {
        ln_1: index.layer_norm(&h("ln_1"), d)?,
        q,
        k,
        v,
        attn_proj: index.linear(&h("attn.c_proj"), d, d)?,
        ln_2: index.layer_norm(&h("ln_2"), d)?,
        fc: index.linear(&h("mlp.c_fc"), d, d_ffn)?,
        fc_proj: index.linear(&h("mlp.c_proj"), d_ffn, d)?,
    })
}

/// Splits a packed `[rows, 3 d]` projection (columns Q | K | V) into three `[rows, d]` ones.
fn split_qkv(packed: &Linear, d: usize) -> [Linear; 3] {
    let rows = packed.weight.rows;
    let mut parts: [Linear; 3] = std::array::from_fn(|_| Linear {
        weight: Matrix {
            rows,
            cols: d,
            data: Vec::with_capacity(rows * d),
        },
        bias: Vec::with_capacity(d),
    });
    let width = d.max(1);
    for packed_row in packed.weight.data.chunks_exact(3 * width) {
        for (part, piece) in parts.iter_mut().zip(packed_row.chunks_exact(width)) {
            part.weight.data.extend_from_slice(piece);
        }
    }
    for (part, piece) in parts.iter_mut().zip(packed.bias.chunks_exact(width)) {
        part.bias.extend_from_slice(piece);
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// Names and shapes

/// Names (without the prefix) and shapes of every parameter tensor of a `config`-shaped
/// checkpoint, in [`hf_named_tensors`] order.
fn hf_layout(config: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (config.n_embd, config.n_inner);
    let mut out = vec![
        ("wte.weight".to_string(), vec![config.vocab_size, d]),
        ("wpe.weight".to_string(), vec![config.n_positions, d]),
    ];
    for l in 0..config.n_layer {
        let block: [(&str, Vec<usize>); 12] = [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, f]),
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![f, d]),
            ("mlp.c_proj.bias", vec![d]),
        ];
        out.extend(
            block
                .into_iter()
                .map(|(s, shape)| (format!("h.{l}.{s}"), shape)),
        );
    }
    out.push(("ln_f.weight".to_string(), vec![d]));
    out.push(("ln_f.bias".to_string(), vec![d]));
    out
}

/// Every tensor of `params` under its Hugging Face name (with the `transformer.` prefix) and
/// shape, Q, K and V packed into `attn.c_attn`, in the order of [`GptParams::tensors`].
///
/// Works for anything shaped like the parameters (gradients, optimizer moments), so they can be
/// written with [`write_safetensors_atomic`] under the names of the weights.
pub fn hf_named_tensors(params: &GptParams) -> Vec<HfTensor<'_>> {
    let mut out: Vec<HfTensor<'_>> = Vec::new();
    push_matrix(&mut out, "wte.weight".into(), &params.wte);
    push_matrix(&mut out, "wpe.weight".into(), &params.wpe);
    for (l, block) in params.blocks.iter().enumerate() {
        push_block(&mut out, l, block);
    }
    push_layer_norm(&mut out, "ln_f", &params.ln_f);
    out
}

fn push_block<'a>(out: &mut Vec<HfTensor<'a>>, l: usize, b: &'a Block) {
    let h = |s: &str| format!("h.{l}.{s}");
    push_layer_norm(out, &h("ln_1"), &b.ln_1);
    let (weight, bias) = pack_qkv(&b.q, &b.k, &b.v);
    out.push((
        prefixed(&h("attn.c_attn.weight")),
        vec![weight.rows, weight.cols],
        weight.data.into(),
    ));
    out.push((
        prefixed(&h("attn.c_attn.bias")),
        vec![bias.len()],
        bias.into(),
    ));
    push_linear(out, &h("attn.c_proj"), &b.attn_proj);
    push_layer_norm(out, &h("ln_2"), &b.ln_2);
    push_linear(out, &h("mlp.c_fc"), &b.fc);
    push_linear(out, &h("mlp.c_proj"), &b.fc_proj);
}

fn push_matrix<'a>(out: &mut Vec<HfTensor<'a>>, bare: String, m: &'a Matrix) {
    out.push((
        prefixed(&bare),
        vec![m.rows, m.cols],
        Cow::Borrowed(&m.data),
    ));
}

fn push_vector<'a>(out: &mut Vec<HfTensor<'a>>, bare: String, v: &'a [f32]) {
    out.push((prefixed(&bare), vec![v.len()], Cow::Borrowed(v)));
}

fn push_linear<'a>(out: &mut Vec<HfTensor<'a>>, prefix: &str, lin: &'a Linear) {
    push_matrix(out, format!("{prefix}.weight"), &lin.weight);
    push_vector(out, format!("{prefix}.bias"), &lin.bias);
}

fn push_layer_norm<'a>(out: &mut Vec<HfTensor<'a>>, prefix: &str, ln: &'a LayerNorm) {
    push_vector(out, format!("{prefix}.weight"), &ln.gamma);
    push_vector(out, format!("{prefix}.bias"), &ln.beta);
}

fn prefixed(bare: &str) -> String {
    format!("{HF_PREFIX}{bare}")
}

/// Packs three `[rows, d]` projections into one `[rows, 3 d]` (columns Q | K | V) and their
/// biases into one `[3 d]`.
fn pack_qkv(q: &Linear, k: &Linear, v: &Linear) -> (Matrix, Vec<f32>) {
    let (rows, d) = (q.weight.rows, q.weight.cols);
    let width = d.max(1);
    let mut data = Vec::with_capacity(3 * q.weight.data.len());
    let row_triples = q
        .weight
        .data
        .chunks_exact(width)
        .zip(k.weight.data.chunks_exact(width))
        .zip(v.weight.data.chunks_exact(width));
    for ((qr, kr), vr) in row_triples {
        data.extend_from_slice(qr);
        data.extend_from_slice(kr);
        data.extend_from_slice(vr);
    }
    let bias = [q.bias.as_slice(), &k.bias, &v.bias].concat();
    let cols = 3 * d;
    (Matrix { rows, cols, data }, bias)
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Writes `params` and `config` as a Hugging Face GPT-2 checkpoint folder `dir`.
///
/// `dir` is created if missing (its parent must exist). Existing files are replaced atomically;
/// both files are staged before either is renamed. If the second rename fails and the first
/// file was new, it is removed again, and a folder created here is removed if left empty.
pub fn save_checkpoint(dir: &Path, config: &GptConfig, params: &GptParams) -> Result<()> {
    config.validate()?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let config_path = dir.join(CONFIG_FILE);
    let tensors = hf_named_tensors(params);
    check_against_config(&weights_path, config, &tensors)?;
    let created_dir = ensure_folder(dir)?;
    let result = stage_and_commit(&weights_path, &config_path, config, &tensors);
    if result.is_err() && created_dir {
        // Only succeeds if nothing is left in it.
        let _ = fs::remove_dir(dir);
    }
    result
}

fn stage_and_commit(
    weights_path: &Path,
    config_path: &Path,
    config: &GptConfig,
    tensors: &[HfTensor<'_>],
) -> Result<()> {
    let borrowed: Vec<F32Tensor<'_>> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), &d[..]))
        .collect();
    let weights = stage_safetensors(weights_path, &borrowed)?;
    let config_file = stage(config_path, |w| w.write_all(config.to_hf_json().as_bytes()))?;
    let weights_were_new = !weights_path.exists();
    weights.commit()?;
    if let Err(e) = config_file.commit() {
        if weights_were_new {
            let _ = fs::remove_file(weights_path);
        }
        return Err(e);
    }
    Ok(())
}

/// Refuses parameters whose shapes do not match `config` (they could not be read back).
fn check_against_config(path: &Path, config: &GptConfig, tensors: &[HfTensor<'_>]) -> Result<()> {
    let layout: Vec<(String, Vec<usize>)> = hf_layout(config)
        .into_iter()
        .map(|(bare, shape)| (prefixed(&bare), shape))
        .collect();
    let expected: HashMap<&str, &Vec<usize>> =
        layout.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let written: HashMap<&str, &Vec<usize>> =
        tensors.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
    if let Some((name, _, _)) = tensors
        .iter()
        .find(|(n, _, _)| !expected.contains_key(n.as_str()))
    {
        return Err(ModelError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        });
    }
    if let Some((name, _)) = layout
        .iter()
        .find(|(n, _)| !written.contains_key(n.as_str()))
    {
        return Err(ModelError::MissingTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        });
    }
    for (name, got, _) in tensors {
        match expected.get(name.as_str()) {
            Some(&want) if want != got => {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: want.clone(),
                    got: got.clone(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Writes f32 `tensors` `(name, shape, values)` to the safetensors file `path` atomically, with
/// the metadata `{"format": "pt"}` that `transformers` writes.
///
/// Names must be distinct and each `values` must hold `shape.iter().product()` numbers.
pub fn write_safetensors_atomic(path: &Path, tensors: &[F32Tensor<'_>]) -> Result<()> {
    stage_safetensors(path, tensors)?.commit()
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    stage(path, |w| w.write_all(bytes))?.commit()
}

/// Stages `bytes` for `path`: written to a temporary sibling and synced, but not yet in place.
///
/// For writers of several files that must all be written before any is replaced: stage each,
/// then [`Staged::commit`] each. Dropping a staged file removes it.
pub fn stage_bytes(path: &Path, bytes: &[u8]) -> Result<Staged> {
    stage(path, |w| w.write_all(bytes))
}

/// Stages the f32 safetensors file of `tensors` for `path` (see [`write_safetensors_atomic`] and
/// [`stage_bytes`]).
pub fn stage_f32_safetensors(path: &Path, tensors: &[F32Tensor<'_>]) -> Result<Staged> {
    stage_safetensors(path, tensors)
}

/// A fully written and synced temporary file waiting to be renamed over its target.
#[derive(Debug)]
pub struct Staged {
    temp: NamedTempFile,
    target: PathBuf,
}

impl Staged {
    /// The file this will replace.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The staged temporary file, written and synced: its bytes are what [`Staged::commit`]
    /// puts at the target (to digest them before they are moved into place).
    pub fn staged_path(&self) -> &Path {
        self.temp.path()
    }

    /// Renames the staged file over its target (atomic within a folder) and syncs the folder.
    pub fn commit(self) -> Result<()> {
        let target = self.target;
        self.temp
            .persist(&target)
            .map(|_| ())
            .map_err(|e| io_error("replace", &target, e.error))?;
        sync_folder(&target);
        Ok(())
    }
}

/// Writes a temporary sibling of `target` with `fill`, synced to disk; dropped unless committed.
fn stage(
    target: &Path,
    fill: impl FnOnce(&mut BufWriter<&fs::File>) -> std::io::Result<()>,
) -> Result<Staged> {
    if target.is_dir() {
        return Err(io_error(
            "replace",
            target,
            std::io::Error::other("it is a folder"),
        ));
    }
    let folder = parent_folder(target);
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{file_name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Like any new file: 0666 less the umask (tempfile's default is 0600).
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    let temp = builder
        .tempfile_in(folder)
        .map_err(|e| io_error("create a temporary file in", folder, e))?;
    let written = {
        let mut writer = BufWriter::with_capacity(1 << 20, temp.as_file());
        fill(&mut writer).and_then(|()| writer.flush())
    };
    written
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| io_error("write", temp.path(), e))?;
    Ok(Staged {
        temp,
        target: target.to_path_buf(),
    })
}

/// Stages a safetensors file of f32 tensors (data sorted by name, as `safetensors` does).
fn stage_safetensors(path: &Path, tensors: &[F32Tensor<'_>]) -> Result<Staged> {
    let sorted = sorted_checked(path, tensors)?;
    let header = safetensors_header(path, &sorted)?;
    stage(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, _, values) in &sorted {
            write_f32_le(w, values)?;
        }
        Ok(())
    })
}

/// `tensors` sorted by name, after checking names are distinct and sizes match shapes.
fn sorted_checked<'t, 'a>(
    path: &Path,
    tensors: &'t [F32Tensor<'a>],
) -> Result<Vec<&'t F32Tensor<'a>>> {
    for (name, shape, values) in tensors {
        let expected = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        if expected != Some(values.len()) {
            return Err(ModelError::DataLength {
                path: path.to_path_buf(),
                name: name.clone(),
                shape: shape.clone(),
                expected: expected.unwrap_or(usize::MAX),
                got: values.len(),
            });
        }
    }
    let mut sorted: Vec<&F32Tensor<'a>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(ModelError::DuplicateTensor {
            path: path.to_path_buf(),
            name: pair[0].0.clone(),
        });
    }
    Ok(sorted)
}

/// The JSON header, padded with spaces to a multiple of 8 bytes as `safetensors` does.
fn safetensors_header(path: &Path, sorted: &[&F32Tensor<'_>]) -> Result<Vec<u8>> {
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(sorted.len());
    for (name, shape, values) in sorted {
        let end = offset + 4 * values.len();
        let info = TensorInfo {
            dtype: Dtype::F32,
            shape: shape.clone(),
            data_offsets: (offset, end),
        };
        infos.push((name.clone(), info));
        offset = end;
    }
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let safetensors_error = |source| ModelError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let metadata = Metadata::new(Some(format), infos).map_err(safetensors_error)?;
    let mut header = serde_json::to_vec(&metadata)
        .map_err(|e| safetensors_error(safetensors::SafeTensorError::JsonError(e)))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// Writes `values` as little-endian f32 through a bounded buffer.
fn write_f32_le(w: &mut impl Write, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(4 * 16384);
    for chunk in values.chunks(16384) {
        bytes.clear();
        chunk
            .iter()
            .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// Creates `dir` if it does not exist (not its parents); returns whether it did.
fn ensure_folder(dir: &Path) -> Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    fs::create_dir(dir).map_err(|e| io_error("create folder", dir, e))?;
    Ok(true)
}

/// Makes the renames in the folder of `path` durable. Best effort: the rename is done, and some
/// file systems refuse to sync a folder.
fn sync_folder(path: &Path) {
    #[cfg(unix)]
    if let Ok(folder) = fs::File::open(parent_folder(path)) {
        let _ = folder.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The folder holding `path` (`.` for a bare file name).
fn parent_folder(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::init_params;

    fn tiny() -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_embd: 8,
            n_head: 2,
            n_positions: 16,
            vocab_size: 32,
            n_inner: 32,
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
        }
    }

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny")
    }

    fn bits(p: &GptParams) -> Vec<u32> {
        p.tensors()
            .iter()
            .flat_map(|(_, t)| t.iter().map(|v| v.to_bits()))
            .collect()
    }

    /// A raw tensor for hand-made files: `(name, dtype, shape, little-endian bytes)`.
    type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The tensors of `params` as HF writes them, each converted with `encode`.
    fn raw_tensors(params: &GptParams, dtype: Dtype, encode: fn(&[f32]) -> Vec<u8>) -> Vec<Raw> {
        hf_named_tensors(params)
            .into_iter()
            .map(|(name, shape, data)| (name, dtype, shape, encode(&data)))
            .collect()
    }

    fn f32_raw(params: &GptParams) -> Vec<Raw> {
        raw_tensors(params, Dtype::F32, f32_bytes)
    }

    /// Writes `tensors` with the safetensors crate itself (not our writer).
    fn write_raw(path: &Path, tensors: &[Raw]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dtype, shape, bytes)| {
                let view = TensorView::new(*dtype, shape.clone(), bytes).unwrap();
                (n.clone(), view)
            })
            .collect();
        fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// Writes `tensors` as `model.safetensors` in a fresh folder and reads it back for `tiny()`.
    fn read_raw(tensors: &[Raw]) -> Result<GptParams> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        write_raw(&path, tensors);
        read_params(&path, &tiny())
    }

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let mut params = init_params(&tiny(), 11);
        // Values a lossy path would bend: negative zero, a subnormal, the extremes.
        params.blocks[1].k.weight.data[..4].copy_from_slice(&[-0.0, 1e-45, f32::MAX, f32::MIN]);
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(dir.path(), &tiny(), &params).unwrap();
        let (config, back) = load_checkpoint(dir.path()).unwrap();
        assert_eq!(config, tiny());
        assert_eq!(bits(&back), bits(&params));
    }

    #[test]
    fn our_writer_matches_the_safetensors_crate_byte_for_byte() {
        // The crate sorts tensors by name (all are F32) and pads the header with spaces.
        let params = init_params(&tiny(), 2);
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.safetensors");
        let tensors = hf_named_tensors(&params);
        let borrowed: Vec<F32Tensor<'_>> = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), &d[..]))
            .collect();
        write_safetensors_atomic(&ours, &borrowed).unwrap();
        let views: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), f32_bytes(d)))
            .collect();
        let views = views.iter().map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        });
        let format = HashMap::from([("format".to_string(), "pt".to_string())]);
        let theirs = safetensors::serialize(views, Some(format)).unwrap();
        assert_eq!(fs::read(&ours).unwrap(), theirs);
    }

    #[test]
    fn the_transformers_fixture_loads_with_the_values_torch_saw() {
        // Expected values printed by `scripts/make_hf_fixture.py --print` (torch 2.15,
        // transformers 5.24); bits compared exactly. d = 16, so packed c_attn columns
        // 0..16 are Q, 16..32 K, 32..48 V.
        let (config, p) = load_checkpoint(&fixture_dir()).unwrap();
        assert_eq!(
            (
                config.n_layer,
                config.n_embd,
                config.n_head,
                config.n_positions
            ),
            (2, 16, 2, 32)
        );
        assert_eq!((config.vocab_size, config.n_inner), (64, 64));
        let checks: [(&str, f32, u32); 11] = [
            ("wte[3,5]", p.wte.at(3, 5), 0xbceccb9d),     // -0.028905684
            ("wpe[31,15]", p.wpe.at(31, 15), 0x3c8b1e2d), // 0.016982162
            // h.1 c_attn.weight[2, 1] lands in q, [2, 16+1] in k, [2, 32+1] in v.
            ("h.1 q[2,1]", p.blocks[1].q.weight.at(2, 1), 0xbcf8e24b), // -0.030381342
            ("h.1 k[2,1]", p.blocks[1].k.weight.at(2, 1), 0x3d0758eb), // 0.033043783
            ("h.1 v[2,1]", p.blocks[1].v.weight.at(2, 1), 0x3bfbba22), // 0.007682101
            // h.0 c_attn.bias[32+7] is v.bias[7].
            ("h.0 v.bias[7]", p.blocks[0].v.bias[7], 0x3d6f6d2b), // 0.05845372
            (
                "h.0 attn_proj[4,9]",
                p.blocks[0].attn_proj.weight.at(4, 9),
                0xbc0de626,
            ),
            (
                "h.1 fc[15,63]",
                p.blocks[1].fc.weight.at(15, 63),
                0x3c5fca92,
            ), // 0.013659136
            (
                "h.1 fc_proj[63,0]",
                p.blocks[1].fc_proj.weight.at(63, 0),
                0xbb4671cd,
            ),
            ("h.0 ln_2.gamma[3]", p.blocks[0].ln_2.gamma[3], 0x3b7cd738), // 0.0038580429
            ("ln_f.beta[10]", p.ln_f.beta[10], 0x3cb111e5),               // 0.021614978
        ];
        for (what, got, expected) in checks {
            assert_eq!(got.to_bits(), expected, "{what}: got {got}");
        }
        // The script also printed the parameter count: 8128.
        assert_eq!(p.numel(), 8128);
    }

    #[test]
    fn resaving_the_transformers_fixture_reproduces_its_bytes() {
        // Same names, dtype, metadata, order and padding as GPT2LMHeadModel.save_pretrained.
        let (config, params) = load_checkpoint(&fixture_dir()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(dir.path(), &config, &params).unwrap();
        let ours = fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let theirs = fs::read(fixture_dir().join(WEIGHTS_FILE)).unwrap();
        assert!(
            ours == theirs,
            "model.safetensors differs from the transformers one"
        );
    }

    #[test]
    fn c_attn_packs_q_k_v_along_the_output_axis() {
        // d = 2: row r of c_attn is q[r] | k[r] | v[r]; the bias is q.b | k.b | v.b.
        let lin = |w: [f32; 4], b: [f32; 2]| Linear {
            weight: Matrix {
                rows: 2,
                cols: 2,
                data: w.to_vec(),
            },
            bias: b.to_vec(),
        };
        let q = lin([1., 2., 3., 4.], [10., 11.]);
        let k = lin([5., 6., 7., 8.], [12., 13.]);
        let v = lin([9., 0., -1., -2.], [14., 15.]);
        let (packed, bias) = pack_qkv(&q, &k, &v);
        assert_eq!((packed.rows, packed.cols), (2, 6));
        assert_eq!(
            packed.data,
            [1., 2., 5., 6., 9., 0., 3., 4., 7., 8., -1., -2.]
        );
        assert_eq!(bias, [10., 11., 12., 13., 14., 15.]);
        let [q2, k2, v2] = split_qkv(
            &Linear {
                weight: packed,
                bias,
            },
            2,
        );
        assert_eq!((q2, k2, v2), (q, k, v));
    }

    #[test]
    fn written_names_and_shapes_follow_the_layout() {
        let params = init_params(&tiny(), 0);
        let written: Vec<(String, Vec<usize>)> = hf_named_tensors(&params)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        let layout: Vec<(String, Vec<usize>)> = hf_layout(&tiny())
            .into_iter()
            .map(|(n, s)| (prefixed(&n), s))
            .collect();
        assert_eq!(written, layout);
        assert_eq!(written.len(), 2 + 12 * 2 + 2);
        assert_eq!(written[4].0, "transformer.h.0.attn.c_attn.weight");
        assert_eq!(written[4].1, [8, 24]);
    }

    #[test]
    fn f16_and_bf16_files_read_as_their_rounded_values() {
        let params = init_params(&tiny(), 4);
        type Encode = fn(&[f32]) -> Vec<u8>;
        type Round = fn(f32) -> f32;
        let cases: [(Dtype, Encode, Round); 2] = [
            (
                Dtype::F16,
                |v| {
                    v.iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect()
                },
                |x| half::f16::from_f32(x).to_f32(),
            ),
            (
                Dtype::BF16,
                |v| {
                    v.iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect()
                },
                |x| half::bf16::from_f32(x).to_f32(),
            ),
        ];
        for (dtype, encode, round) in cases {
            let back = read_raw(&raw_tensors(&params, dtype, encode)).unwrap();
            let mut expected = params.clone();
            for (_, t) in expected.tensors_mut() {
                t.iter_mut().for_each(|x| *x = round(*x));
            }
            assert_eq!(bits(&back), bits(&expected), "{dtype:?}");
            assert_ne!(bits(&back), bits(&params), "{dtype:?} did not round");
        }
    }

    #[test]
    fn decoding_does_not_need_aligned_bytes() {
        // f32 values starting at an odd address: a cast in place would panic.
        let values = [1.5_f32, -2.25, 3.0];
        let mut buffer = vec![0u8];
        buffer.extend(f32_bytes(&values));
        let view = TensorView::new(Dtype::F32, vec![3], &buffer[1..]).unwrap();
        assert_eq!(decode(&view).unwrap(), values);
    }

    #[test]
    fn names_with_or_without_the_prefix_read_the_same() {
        let params = init_params(&tiny(), 5);
        let mut bare = f32_raw(&params);
        for t in &mut bare {
            t.0 = t.0.trim_start_matches(HF_PREFIX).to_string();
        }
        assert_eq!(bits(&read_raw(&bare).unwrap()), bits(&params));
        assert_eq!(bits(&read_raw(&f32_raw(&params)).unwrap()), bits(&params));
    }

    #[test]
    fn the_same_tensor_with_and_without_prefix_is_refused() {
        let params = init_params(&tiny(), 5);
        let mut raw = f32_raw(&params);
        let mut copy = raw[0].clone();
        copy.0 = "wte.weight".into();
        raw.push(copy);
        let err = read_raw(&raw).unwrap_err();
        assert!(matches!(err, ModelError::DuplicateTensor { .. }), "{err}");
        assert!(err.to_string().contains("wte.weight"), "{err}");
    }

    #[test]
    fn a_stored_lm_head_equal_to_wte_is_accepted() {
        let params = init_params(&tiny(), 6);
        let mut raw = f32_raw(&params);
        raw.push((
            "lm_head.weight".into(),
            Dtype::F32,
            vec![32, 8],
            f32_bytes(&params.wte.data),
        ));
        assert_eq!(bits(&read_raw(&raw).unwrap()), bits(&params));
    }

    #[test]
    fn a_stored_lm_head_that_differs_from_wte_is_refused() {
        let params = init_params(&tiny(), 6);
        let mut head = params.wte.data.clone();
        head[9] += 1.0;
        let mut raw = f32_raw(&params);
        raw.push((
            "lm_head.weight".into(),
            Dtype::F32,
            vec![32, 8],
            f32_bytes(&head),
        ));
        let err = read_raw(&raw).unwrap_err();
        assert!(
            matches!(err, ModelError::UntiedLmHead { index: 9, ref name, .. } if name == "lm_head.weight"),
            "{err}"
        );
        // Wrong shape: refused as a shape error naming it.
        let mut raw = f32_raw(&params);
        raw.push((
            "lm_head.weight".into(),
            Dtype::F32,
            vec![8, 32],
            f32_bytes(&head),
        ));
        let err = read_raw(&raw).unwrap_err().to_string();
        assert!(
            err.contains("lm_head.weight") && err.contains("[32, 8]"),
            "{err}"
        );
    }

    #[test]
    fn causal_mask_buffers_are_ignored_but_other_extras_refused() {
        let params = init_params(&tiny(), 8);
        let mut raw = f32_raw(&params);
        // As the Hub's gpt2 stores them: a [1, 1, n_pos, n_pos] mask and a scalar.
        raw.push((
            "h.0.attn.bias".into(),
            Dtype::F32,
            vec![1, 1, 16, 16],
            f32_bytes(&[1.0; 256]),
        ));
        raw.push((
            "h.1.attn.masked_bias".into(),
            Dtype::F32,
            vec![],
            f32_bytes(&[-1e4]),
        ));
        assert_eq!(bits(&read_raw(&raw).unwrap()), bits(&params));
        for extra in [
            "h.2.attn.bias",
            "transformer.h.0.attn.c_attn.scale",
            "score.weight",
        ] {
            let mut raw = f32_raw(&params);
            raw.push((extra.into(), Dtype::F32, vec![1], f32_bytes(&[0.0])));
            let err = read_raw(&raw).unwrap_err();
            assert!(
                matches!(err, ModelError::UnexpectedTensor { ref name, .. } if name == extra),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_tensor_is_named_as_the_file_names_tensors() {
        let params = init_params(&tiny(), 9);
        let mut raw = f32_raw(&params);
        raw.retain(|t| t.0 != "transformer.h.1.mlp.c_fc.bias");
        let err = read_raw(&raw).unwrap_err();
        assert!(
            matches!(err, ModelError::MissingTensor { ref name, .. } if name == "transformer.h.1.mlp.c_fc.bias"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_shape_names_tensor_expected_and_got() {
        let params = init_params(&tiny(), 9);
        let mut raw = f32_raw(&params);
        let t = raw
            .iter_mut()
            .find(|t| t.0 == "transformer.wpe.weight")
            .unwrap();
        t.2 = vec![8, 16]; // same number of values, transposed
        let err = read_raw(&raw).unwrap_err().to_string();
        assert!(
            err.contains("transformer.wpe.weight")
                && err.contains("[8, 16]")
                && err.contains("[16, 8]"),
            "{err}"
        );
    }

    #[test]
    fn an_unsupported_dtype_is_named() {
        let params = init_params(&tiny(), 9);
        let mut raw = f32_raw(&params);
        let t = raw
            .iter_mut()
            .find(|t| t.0 == "transformer.ln_f.bias")
            .unwrap();
        t.1 = Dtype::I32;
        let err = read_raw(&raw).unwrap_err();
        assert!(
            matches!(err, ModelError::Dtype { ref name, ref dtype, .. } if name == "transformer.ln_f.bias" && dtype == "I32"),
            "{err}"
        );
    }

    #[test]
    fn nan_and_infinity_are_refused_with_the_tensor_and_index() {
        for bad in [f32::NAN, f32::NEG_INFINITY] {
            let mut params = init_params(&tiny(), 10);
            params.blocks[0].fc_proj.weight.data[17] = bad;
            let err = read_raw(&f32_raw(&params)).unwrap_err();
            assert!(
                matches!(err, ModelError::NonFinite { ref name, index: 17, .. } if name == "transformer.h.0.mlp.c_proj.weight"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_truncated_file_is_a_safetensors_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(dir.path(), &tiny(), &init_params(&tiny(), 1)).unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        let bytes = fs::read(&path).unwrap();
        for keep in [0, 5, 100, bytes.len() - 1] {
            fs::write(&path, &bytes[..keep]).unwrap();
            let err = read_params(&path, &tiny()).unwrap_err();
            assert!(
                matches!(err, ModelError::Safetensors { .. }),
                "{keep}: {err}"
            );
            assert!(err.to_string().contains("model.safetensors"), "{err}");
        }
    }

    #[test]
    fn a_bad_config_names_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        fs::write(
            &path,
            tiny().to_hf_json().replace("\"gelu_new\"", "\"relu\""),
        )
        .unwrap();
        let err = read_config(&path).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert!(
            chain.contains("config.json") && chain.contains("activation_function"),
            "{chain}"
        );
    }

    /// Files in `dir`, sorted, to show nothing temporary is left.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint_untouched() {
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(dir.path(), &tiny(), &init_params(&tiny(), 1)).unwrap();
        let before = fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        // config.json replaced by a folder: the second file cannot be staged.
        fs::remove_file(dir.path().join(CONFIG_FILE)).unwrap();
        fs::create_dir(dir.path().join(CONFIG_FILE)).unwrap();
        let err = save_checkpoint(dir.path(), &tiny(), &init_params(&tiny(), 2)).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");
        assert_eq!(fs::read(dir.path().join(WEIGHTS_FILE)).unwrap(), before);
        assert_eq!(listing(dir.path()), [CONFIG_FILE, WEIGHTS_FILE]);
    }

    #[test]
    fn params_that_do_not_fit_the_config_are_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        let mut other = tiny();
        other.n_inner = 16;
        let err = save_checkpoint(&out, &tiny(), &init_params(&other, 1)).unwrap_err();
        assert!(
            matches!(err, ModelError::Shape { ref name, .. } if name == "transformer.h.0.mlp.c_fc.weight"),
            "{err}"
        );
        assert!(!out.exists());
        // One layer too many or too few: the first extra or missing tensor is named.
        let (mut more, mut fewer) = (tiny(), tiny());
        more.n_layer = 3;
        fewer.n_layer = 1;
        let err = save_checkpoint(&out, &tiny(), &init_params(&more, 1)).unwrap_err();
        assert!(
            matches!(err, ModelError::UnexpectedTensor { ref name, .. } if name == "transformer.h.2.ln_1.weight"),
            "{err}"
        );
        let err = save_checkpoint(&out, &tiny(), &init_params(&fewer, 1)).unwrap_err();
        assert!(
            matches!(err, ModelError::MissingTensor { ref name, .. } if name == "transformer.h.1.ln_1.weight"),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn a_malformed_tensor_list_is_refused_before_touching_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grads.safetensors");
        fs::write(&path, b"previous").unwrap();
        let values = [1.0_f32, 2.0, 3.0];
        let bad_length = [("a".to_string(), vec![2, 2], &values[..])];
        let err = write_safetensors_atomic(&path, &bad_length).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::DataLength {
                    expected: 4,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
        let twice = [
            ("a".to_string(), vec![3], &values[..]),
            ("a".to_string(), vec![3], &values[..]),
        ];
        let err = write_safetensors_atomic(&path, &twice).unwrap_err();
        assert!(matches!(err, ModelError::DuplicateTensor { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"previous");
        assert_eq!(listing(dir.path()), ["grads.safetensors"]);
    }

    #[test]
    fn gradients_shaped_like_the_params_round_trip_under_the_same_names() {
        // hf_named_tensors works on any GptParams; read_params reads them back.
        let grads = init_params(&tiny(), 12);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grads.safetensors");
        let tensors = hf_named_tensors(&grads);
        let borrowed: Vec<F32Tensor<'_>> = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), &d[..]))
            .collect();
        write_safetensors_atomic(&path, &borrowed).unwrap();
        assert_eq!(bits(&read_params(&path, &tiny()).unwrap()), bits(&grads));
    }
}
