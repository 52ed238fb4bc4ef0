//! The parameters of a GPT model as plain `f32` tensors, in the layout the runtime computes with.
//!
//! Layout choices (and why):
//! - Linear weights are `[in, out]` row-major (the Hugging Face `Conv1D` layout), so a layer is
//!   `Y[T x out] = X[T x in] W[in x out] + b`, the `X W` form the fabric kernels stream.
//! - Q, K and V are three separate [`Linear`]s, not the packed `c_attn`: each is its own sparse
//!   matrix with its own mask. Packing and unpacking happens only in checkpoint I/O.
//! - The LM head is tied to `wte` and has no tensor of its own.
//!
//! The same [`GptParams`] type holds weights, gradients and optimizer moments, so element-wise
//! passes (AdamW, gradient checks) walk two of them side by side with [`GptParams::tensors`].
//!
//! Not here: initialisation and checkpoint I/O (see [`super::checkpoint`]), masks
//! (`crate::sparsity`), any arithmetic of the forward or backward pass.

use super::config::GptConfig;

/// A dense row-major `rows x cols` matrix of `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// A `rows x cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Element `(r, c)`.
    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    /// Row `r` as a slice.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// An affine layer `y = x W + b` with `W` stored `[in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// `[in, out]`.
    pub weight: Matrix,
    /// `[out]`.
    pub bias: Vec<f32>,
}

impl Linear {
    /// A zero layer with `fan_in` inputs and `fan_out` outputs.
    pub fn zeros(fan_in: usize, fan_out: usize) -> Self {
        Self {
            weight: Matrix::zeros(fan_in, fan_out),
            bias: vec![0.0; fan_out],
        }
    }
}

/// LayerNorm's scale and shift.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl LayerNorm {
    /// Zero scale and shift (for gradients and moments; see `init` for weights).
    pub fn zeros(d: usize) -> Self {
        Self {
            gamma: vec![0.0; d],
            beta: vec![0.0; d],
        }
    }
}

/// The six weight matrices of a block that MediSwift sparsifies, in a fixed order.
///
/// The order is part of the seed contract: the mask of matrix `kind` in layer `l` is drawn from
/// stream `6 * l + kind.index()` (see `crate::sparsity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SparseKind {
    /// Query projection, `[d, d]`.
    Q,
    /// Key projection, `[d, d]`.
    K,
    /// Value projection, `[d, d]`.
    V,
    /// Attention output projection (`attn.c_proj`), `[d, d]`.
    AttnProj,
    /// First FFN matrix (`mlp.c_fc`), `[d, d_ffn]`.
    Fc,
    /// Second FFN matrix (`mlp.c_proj`), `[d_ffn, d]`.
    FcProj,
}

impl SparseKind {
    /// All six, in stream order.
    pub const ALL: [SparseKind; 6] = [
        SparseKind::Q,
        SparseKind::K,
        SparseKind::V,
        SparseKind::AttnProj,
        SparseKind::Fc,
        SparseKind::FcProj,
    ];

    /// Position in [`SparseKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// `(in, out)` of the matrix in a model of `config`: `[d, d]` for Q, K, V and the attention
    /// output, `[d, d_ffn]` for fc, `[d_ffn, d]` for fc_proj.
    pub fn shape(self, config: &GptConfig) -> (usize, usize) {
        let (d, f) = (config.n_embd, config.n_inner);
        match self {
            SparseKind::Q | SparseKind::K | SparseKind::V | SparseKind::AttnProj => (d, d),
            SparseKind::Fc => (d, f),
            SparseKind::FcProj => (f, d),
        }
    }

    /// A short name used in reports (`q`, `k`, `v`, `attn_proj`, `fc`, `fc_proj`).
    pub fn name(self) -> &'static str {
        match self {
            SparseKind::Q => "q",
            SparseKind::K => "k",
            SparseKind::V => "v",
            SparseKind::AttnProj => "attn_proj",
            SparseKind::Fc => "fc",
            SparseKind::FcProj => "fc_proj",
        }
    }
}

/// One pre-LayerNorm decoder block.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    /// `attn.c_proj`.
    pub attn_proj: Linear,
    pub ln_2: LayerNorm,
    /// `mlp.c_fc`.
    pub fc: Linear,
    /// `mlp.c_proj`.
    pub fc_proj: Linear,
}

impl Block {
    /// The sparsifiable linear layer `kind`.
    pub fn linear(&self, kind: SparseKind) -> &Linear {
        match kind {
            SparseKind::Q => &self.q,
            SparseKind::K => &self.k,
            SparseKind::V => &self.v,
            SparseKind::AttnProj => &self.attn_proj,
            SparseKind::Fc => &self.fc,
            SparseKind::FcProj => &self.fc_proj,
        }
    }

    /// The sparsifiable linear layer `kind`, mutably.
    pub fn linear_mut(&mut self, kind: SparseKind) -> &mut Linear {
        match kind {
            SparseKind::Q => &mut self.q,
            SparseKind::K => &mut self.k,
            SparseKind::V => &mut self.v,
            SparseKind::AttnProj => &mut self.attn_proj,
            SparseKind::Fc => &mut self.fc,
            SparseKind::FcProj => &mut self.fc_proj,
        }
    }
}

/// All parameters of a GPT-2-style model (or, with the same shapes, its gradients or moments).
#[derive(Clone, Debug, PartialEq)]
pub struct GptParams {
    /// Token embedding `[vocab, d]`; also the tied LM head.
    pub wte: Matrix,
    /// Position embedding `[n_positions, d]`.
    pub wpe: Matrix,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
}

impl GptParams {
    /// Every tensor zero, shaped for `config`.
    pub fn zeros(config: &GptConfig) -> Self {
        let d = config.n_embd;
        let f = config.n_inner;
        let block = Block {
            ln_1: LayerNorm::zeros(d),
            q: Linear::zeros(d, d),
            k: Linear::zeros(d, d),
            v: Linear::zeros(d, d),
            attn_proj: Linear::zeros(d, d),
            ln_2: LayerNorm::zeros(d),
            fc: Linear::zeros(d, f),
            fc_proj: Linear::zeros(f, d),
        };
        Self {
            wte: Matrix::zeros(config.vocab_size, d),
            wpe: Matrix::zeros(config.n_positions, d),
            blocks: vec![block; config.n_layer],
            ln_f: LayerNorm::zeros(d),
        }
    }

    /// Every tensor with an internal name, in a fixed order.
    ///
    /// Names follow Hugging Face GPT-2 without the `transformer.` prefix, except that Q, K and V
    /// appear unpacked as `h.{l}.attn.q.weight` etc. (checkpoint I/O packs them into `c_attn`).
    pub fn tensors(&self) -> Vec<(String, &[f32])> {
        let mut out: Vec<(String, &[f32])> = vec![
            ("wte.weight".into(), &self.wte.data),
            ("wpe.weight".into(), &self.wpe.data),
        ];
        for (l, b) in self.blocks.iter().enumerate() {
            let p = |s: &str| format!("h.{l}.{s}");
            out.push((p("ln_1.weight"), &b.ln_1.gamma));
            out.push((p("ln_1.bias"), &b.ln_1.beta));
            for (name, lin) in [
                ("attn.q", &b.q),
                ("attn.k", &b.k),
                ("attn.v", &b.v),
                ("attn.c_proj", &b.attn_proj),
            ] {
                out.push((p(&format!("{name}.weight")), &lin.weight.data));
                out.push((p(&format!("{name}.bias")), &lin.bias));
            }
            out.push((p("ln_2.weight"), &b.ln_2.gamma));
            out.push((p("ln_2.bias"), &b.ln_2.beta));
            for (name, lin) in [("mlp.c_fc", &b.fc), ("mlp.c_proj", &b.fc_proj)] {
                out.push((p(&format!("{name}.weight")), &lin.weight.data));
                out.push((p(&format!("{name}.bias")), &lin.bias));
            }
        }
        out.push(("ln_f.weight".into(), &self.ln_f.gamma));
        out.push(("ln_f.bias".into(), &self.ln_f.beta));
        out
    }

    /// The same tensors as [`GptParams::tensors`], mutably and in the same order.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut [f32])> {
        let mut out: Vec<(String, &mut [f32])> = vec![
            ("wte.weight".into(), &mut self.wte.data),
            ("wpe.weight".into(), &mut self.wpe.data),
        ];
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let p = |s: &str| format!("h.{l}.{s}");
            out.push((p("ln_1.weight"), &mut b.ln_1.gamma));
            out.push((p("ln_1.bias"), &mut b.ln_1.beta));
            for (name, lin) in [
                ("attn.q", &mut b.q),
                ("attn.k", &mut b.k),
                ("attn.v", &mut b.v),
                ("attn.c_proj", &mut b.attn_proj),
            ] {
                out.push((p(&format!("{name}.weight")), &mut lin.weight.data));
                out.push((p(&format!("{name}.bias")), &mut lin.bias));
            }
            out.push((p("ln_2.weight"), &mut b.ln_2.gamma));
            out.push((p("ln_2.bias"), &mut b.ln_2.beta));
            for (name, lin) in [("mlp.c_fc", &mut b.fc), ("mlp.c_proj", &mut b.fc_proj)] {
                out.push((p(&format!("{name}.weight")), &mut lin.weight.data));
                out.push((p(&format!("{name}.bias")), &mut lin.bias));
            }
        }
        out.push(("ln_f.weight".into(), &mut self.ln_f.gamma));
        out.push(("ln_f.bias".into(), &mut self.ln_f.beta));
        out
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> GptConfig {
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

    #[test]
    fn numel_matches_the_gpt2_formula() {
        // GPT-2 parameter count: V d + P d + L (12 d^2 + 13 d) + 2 d for n_inner = 4 d:
        // per block: 4 d^2 + 4 d (attention), 8 d^2 + 5 d (FFN), 4 d (two LayerNorms).
        let c = tiny_config();
        let (v, p, l, d) = (32, 16, 2, 8);
        let expected = v * d + p * d + l * (12 * d * d + 13 * d) + 2 * d;
        assert_eq!(GptParams::zeros(&c).numel(), expected);
    }

    #[test]
    fn tensors_and_tensors_mut_agree_on_names_and_order() {
        let mut p = GptParams::zeros(&tiny_config());
        let names: Vec<String> = p.tensors().into_iter().map(|(n, _)| n).collect();
        let names_mut: Vec<String> = p.tensors_mut().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, names_mut);
        assert_eq!(names.len(), 2 + 2 * 16 + 2);
        assert_eq!(names[4], "h.0.attn.q.weight");
    }
}
