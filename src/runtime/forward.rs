//! The forward pass and the loss on the fabric, keeping what the backward pass reads.

use wafersim_kernels::{
    EmbeddingForward, EmbeddingShape, Gelu, LayerNorm, ResidualAdd, SoftmaxCrossEntropy,
    StreamMatmul, StreamedMatrix,
};

use super::record::{Op, OpRecord};
use super::{Act, RuntimeError, Step, kernel_error};
use crate::flops::Phase;
use crate::model::{LayerNorm as LnParams, Linear, SparseKind};

/// What one block's backward pass reads.
pub(crate) struct LayerActs {
    pub x_in: Act,
    pub ln1: Normed,
    pub q: Act,
    pub k: Act,
    pub v: Act,
    pub probs: Vec<f32>,
    pub ctx: Act,
    pub h: Act,
    pub ln2: Normed,
    pub f: Act,
    pub g: Act,
}

/// A LayerNorm's output and its per-token statistics.
pub(crate) struct Normed {
    pub y: Act,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Everything the forward pass leaves for the backward pass.
pub(crate) struct Activations {
    pub layers: Vec<LayerActs>,
    /// Input of the final LayerNorm.
    pub x_final: Act,
    pub ln_f: Normed,
    /// Gradient of the loss with respect to the logits.
    pub dlogits: Act,
    pub loss: f64,
}

impl Step<'_> {
    pub(crate) fn forward(&mut self) -> Result<Activations, RuntimeError> {
        let mut x = self.embed()?;
        let mut layers = Vec::with_capacity(self.inputs.config.n_layer);
        for l in 0..self.inputs.config.n_layer {
            let (acts, ffn_out) = self.block_forward(l, x)?;
            x = self.residual(Some(l), "residual_ffn", Phase::Forward, &acts.h, &ffn_out)?;
            layers.push(acts);
        }
        let ln_f = self.layer_norm(None, "ln_f", &x, &self.inputs.params.ln_f)?;
        let logits = self.lm_head_forward(&ln_f.y)?;
        let (loss, dlogits) = self.cross_entropy(&logits)?;
        Ok(Activations {
            layers,
            x_final: x,
            ln_f,
            dlogits,
            loss,
        })
    }

    fn embed(&mut self) -> Result<Act, RuntimeError> {
        let (c, p) = (self.inputs.config, self.inputs.params);
        let op = Op::plain(None, "embedding", Phase::Forward);
        let kernel = EmbeddingForward {
            shape: self.embedding_shape(),
            token_table: &p.wte.data,
            position_table: &p.wpe.data,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        Ok(Act {
            data: run.x,
            features: c.n_embd,
        })
    }

    pub(crate) fn embedding_shape(&self) -> EmbeddingShape<'_> {
        let c = self.inputs.config;
        EmbeddingShape {
            region: self.region(),
            ids: &self.inputs.batch.tokens,
            seq_len: self.inputs.batch.seq,
            vocab: c.vocab_size,
            positions: c.n_positions,
            features: c.n_embd,
        }
    }

    /// One block up to its FFN output (the caller adds the residual).
    fn block_forward(&mut self, l: usize, x_in: Act) -> Result<(LayerActs, Act), RuntimeError> {
        let block = &self.inputs.params.blocks[l];
        let ln1 = self.layer_norm(Some(l), "ln_1", &x_in, &block.ln_1)?;
        let q = self.linear_forward(l, SparseKind::Q, &ln1.y)?;
        let k = self.linear_forward(l, SparseKind::K, &ln1.y)?;
        let v = self.linear_forward(l, SparseKind::V, &ln1.y)?;
        let (ctx, probs) = self.attention_forward(l, &q, &k, &v)?;
        let a = self.linear_forward(l, SparseKind::AttnProj, &ctx)?;
        let h = self.residual(Some(l), "residual_attn", Phase::Forward, &x_in, &a)?;
        let ln2 = self.layer_norm(Some(l), "ln_2", &h, &self.inputs.params.blocks[l].ln_2)?;
        let f = self.linear_forward(l, SparseKind::Fc, &ln2.y)?;
        let g = self.gelu(l, &f)?;
        let m = self.linear_forward(l, SparseKind::FcProj, &g)?;
        Ok((
            LayerActs {
                x_in,
                ln1,
                q,
                k,
                v,
                probs,
                ctx,
                h,
                ln2,
                f,
                g,
            },
            m,
        ))
    }

    pub(crate) fn layer_norm(
        &mut self,
        layer: Option<usize>,
        name: &'static str,
        x: &Act,
        params: &LnParams,
    ) -> Result<Normed, RuntimeError> {
        let op = Op::plain(layer, name, Phase::Forward);
        let kernel = LayerNorm {
            region: self.region(),
            tokens: self.tokens(),
            features: x.features,
            x: &x.data,
            gamma: &params.gamma,
            beta: &params.beta,
            eps: self.inputs.config.layer_norm_epsilon,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        Ok(Normed {
            y: Act {
                data: run.y,
                features: x.features,
            },
            mean: run.mean,
            rstd: run.rstd,
        })
    }

    /// `x W + b` for sparse matrix `kind` of layer `l`.
    fn linear_forward(&mut self, l: usize, kind: SparseKind, x: &Act) -> Result<Act, RuntimeError> {
        let op = Op::linear(l, kind, Phase::Forward);
        let lin: &Linear = self.inputs.params.blocks[l].linear(kind);
        let w = &self.sparse[l][kind.index()];
        let (y, record) = self.matmul(op, x, w, Some(&lin.bias), || {
            StreamedMatrix::from_dense(lin.weight.rows, lin.weight.cols, &lin.weight.data, None)
        })?;
        self.cost.push(record);
        Ok(y)
    }

    /// Runs `x w (+ bias)`; for a sparse `op` also times the same product streaming `dense()`.
    pub(crate) fn matmul(
        &self,
        op: Op,
        x: &Act,
        w: &StreamedMatrix,
        bias: Option<&[f32]>,
        dense: impl FnOnce() -> StreamedMatrix,
    ) -> Result<(Act, OpRecord), RuntimeError> {
        let kernel = StreamMatmul {
            region: self.region(),
            tokens: self.tokens(),
            x: &x.data,
            w,
            bias,
            precision: self.precision(),
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.check_fmacs(&op, run.stats.total.fmacs, (self.tokens() * w.nnz()) as u64)?;
        let dense_cycles = if op.sparse && self.inputs.dense_baseline {
            let all = dense();
            let kernel = StreamMatmul { w: &all, ..kernel };
            kernel
                .run(self.fabric(), self.options())
                .map_err(kernel_error(&op))?
                .stats
                .cycles
        } else {
            run.stats.cycles
        };
        let record = OpRecord::new(op, &run.stats, dense_cycles);
        Ok((
            Act {
                data: run.y,
                features: w.cols(),
            },
            record,
        ))
    }

    pub(crate) fn check_fmacs(
        &self,
        op: &Op,
        fmacs: u64,
        expected: u64,
    ) -> Result<(), RuntimeError> {
        if fmacs != expected {
            return Err(RuntimeError::FlopMismatch {
                op: op.label(),
                executed: 2 * fmacs,
                analytic: 2 * expected,
            });
        }
        Ok(())
    }

    pub(crate) fn residual(
        &mut self,
        layer: Option<usize>,
        name: &'static str,
        phase: Phase,
        a: &Act,
        b: &Act,
    ) -> Result<Act, RuntimeError> {
        let op = Op::plain(layer, name, phase);
        let kernel = ResidualAdd {
            region: self.region(),
            tokens: self.tokens(),
            features: a.features,
            a: &a.data,
            b: &b.data,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        Ok(Act {
            data: run.out,
            features: a.features,
        })
    }

    fn gelu(&mut self, l: usize, f: &Act) -> Result<Act, RuntimeError> {
        let op = Op::plain(Some(l), "gelu", Phase::Forward);
        let kernel = Gelu {
            region: self.region(),
            tokens: self.tokens(),
            features: f.features,
            x: &f.data,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        Ok(Act {
            data: run.out,
            features: f.features,
        })
    }

    /// The tied LM head, `logits = x wte^T`.
    fn lm_head_forward(&mut self, x: &Act) -> Result<Act, RuntimeError> {
        let wte = &self.inputs.params.wte;
        let head = StreamedMatrix::from_dense(wte.rows, wte.cols, &wte.data, None).transpose();
        let (logits, record) = self.matmul(Op::lm_head(Phase::Forward), x, &head, None, || {
            unreachable!("the head is dense")
        })?;
        self.cost.push(record);
        Ok(logits)
    }

    fn cross_entropy(&mut self, logits: &Act) -> Result<(f64, Act), RuntimeError> {
        let op = Op::plain(None, "cross_entropy", Phase::Forward);
        let kernel = SoftmaxCrossEntropy {
            region: self.region(),
            ids: &self.inputs.batch.tokens,
            seq_len: self.inputs.batch.seq,
            vocab: logits.features,
            logits: &logits.data,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        Ok((
            run.loss,
            Act {
                data: run.dz,
                features: logits.features,
            },
        ))
    }
}
