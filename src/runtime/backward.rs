//! The backward pass on the fabric: input gradients through every kernel in reverse, weight
//! gradients streamed out, assembled into a [`GptParams`] of gradients.

use wafersim_kernels::{
    EmbeddingBackward, GeluBackward, LayerNormBackward, StreamedMatrix, WeightGrad,
};

use super::forward::{Activations, LayerActs, Normed};
use super::record::{Op, OpRecord};
use super::{Act, RuntimeError, Step, kernel_error};
use crate::flops::Phase;
use crate::model::{GptParams, LayerNorm as LnParams, Linear, SparseKind};

impl Step<'_> {
    pub(crate) fn backward(&mut self, acts: &Activations) -> Result<GptParams, RuntimeError> {
        let config = self.inputs.config;
        let mut grads = GptParams::zeros(config);
        let d_lnf = self.lm_head_backward(acts, &mut grads)?;
        let (mut dx, ln_f) = self.layer_norm_backward(
            None,
            "ln_f",
            &d_lnf,
            &acts.x_final,
            &acts.ln_f,
            &self.inputs.params.ln_f,
        )?;
        grads.ln_f = ln_f;
        for l in (0..config.n_layer).rev() {
            dx = self.block_backward(l, &acts.layers[l], &dx, &mut grads)?;
        }
        self.embedding_backward(&dx, &mut grads)?;
        Ok(grads)
    }

    /// `d ln_f = dlogits wte`; the head's part of `d wte = dlogits^T ln_f`.
    fn lm_head_backward(
        &mut self,
        acts: &Activations,
        grads: &mut GptParams,
    ) -> Result<Act, RuntimeError> {
        let wte = &self.inputs.params.wte;
        let head = StreamedMatrix::from_dense(wte.rows, wte.cols, &wte.data, None);
        let op = Op::lm_head(Phase::InputGrad);
        let (d_lnf, record) = self.matmul(op, &acts.dlogits, &head, None, || {
            unreachable!("the head is dense")
        })?;
        self.cost.push(record);
        let pattern = head.transpose();
        let (grad, _, record) = self.weight_grad(
            Op::lm_head(Phase::WeightGrad),
            &acts.ln_f.y,
            &acts.dlogits,
            &pattern,
            false,
        )?;
        self.cost.push(record);
        // `grad` is `[d, V]`: the transpose of wte's layout.
        let (d, v) = (wte.cols, wte.rows);
        for (i, g) in grad.to_dense().into_iter().enumerate() {
            grads.wte.data[(i % v) * d + i / v] += g;
        }
        Ok(d_lnf)
    }

    fn block_backward(
        &mut self,
        l: usize,
        a: &LayerActs,
        dx: &Act,
        grads: &mut GptParams,
    ) -> Result<Act, RuntimeError> {
        // x_out = h + fc_proj(gelu(fc(ln_2(h)))).
        let dg = self.linear_backward(l, SparseKind::FcProj, dx, &a.g, grads)?;
        let df = self.gelu_backward(l, &a.f, &dg)?;
        let dln2 = self.linear_backward(l, SparseKind::Fc, &df, &a.ln2.y, grads)?;
        let block = &self.inputs.params.blocks[l];
        let (dh_norm, ln_2) =
            self.layer_norm_backward(Some(l), "ln_2", &dln2, &a.h, &a.ln2, &block.ln_2)?;
        grads.blocks[l].ln_2 = ln_2;
        let dh = self.residual(Some(l), "residual_ffn", Phase::InputGrad, dx, &dh_norm)?;
        // h = x_in + attn_proj(attention(q, k, v)), q, k, v = ln_1(x_in) W.
        let dctx = self.linear_backward(l, SparseKind::AttnProj, &dh, &a.ctx, grads)?;
        let (dq, dk, dv) = self.attention_backward(l, a, &dctx)?;
        let dln1_q = self.linear_backward(l, SparseKind::Q, &dq, &a.ln1.y, grads)?;
        let dln1_k = self.linear_backward(l, SparseKind::K, &dk, &a.ln1.y, grads)?;
        let dln1_v = self.linear_backward(l, SparseKind::V, &dv, &a.ln1.y, grads)?;
        let dln1_qk =
            self.residual(Some(l), "sum_qkv_grads", Phase::InputGrad, &dln1_q, &dln1_k)?;
        let dln1 = self.residual(
            Some(l),
            "sum_qkv_grads",
            Phase::InputGrad,
            &dln1_qk,
            &dln1_v,
        )?;
        let block = &self.inputs.params.blocks[l];
        let (dx_norm, ln_1) =
            self.layer_norm_backward(Some(l), "ln_1", &dln1, &a.x_in, &a.ln1, &block.ln_1)?;
        grads.blocks[l].ln_1 = ln_1;
        self.residual(Some(l), "residual_attn", Phase::InputGrad, &dh, &dx_norm)
    }

    /// Input and weight gradients of sparse matrix `kind` of layer `l` given `dy` and its input
    /// `x`; stores the weight and bias gradients and returns `dx`.
    fn linear_backward(
        &mut self,
        l: usize,
        kind: SparseKind,
        dy: &Act,
        x: &Act,
        grads: &mut GptParams,
    ) -> Result<Act, RuntimeError> {
        let lin: &Linear = self.inputs.params.blocks[l].linear(kind);
        let dense =
            || StreamedMatrix::from_dense(lin.weight.rows, lin.weight.cols, &lin.weight.data, None);
        let wt = self.sparse[l][kind.index()].transpose();
        let (dx, record) =
            self.matmul(Op::linear(l, kind, Phase::InputGrad), dy, &wt, None, || {
                dense().transpose()
            })?;
        self.cost.push(record);
        let pattern = &self.sparse[l][kind.index()];
        let (grad, bias, record) =
            self.weight_grad(Op::linear(l, kind, Phase::WeightGrad), x, dy, pattern, true)?;
        self.cost.push(record);
        let target = grads.blocks[l].linear_mut(kind);
        target.weight.data = grad.to_dense();
        target.bias = bias.expect("asked for the bias gradient");
        Ok(dx)
    }

    /// The masked weight gradient `x^T dy` at `pattern`'s entries (and the bias gradient).
    fn weight_grad(
        &self,
        op: Op,
        x: &Act,
        dy: &Act,
        pattern: &StreamedMatrix,
        bias: bool,
    ) -> Result<(StreamedMatrix, Option<Vec<f32>>, OpRecord), RuntimeError> {
        let kernel = WeightGrad {
            region: self.region(),
            tokens: self.tokens(),
            x: &x.data,
            dy: &dy.data,
            pattern,
            bias,
            precision: self.precision(),
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.check_fmacs(
            &op,
            run.stats.total.fmacs,
            (self.tokens() * pattern.nnz()) as u64,
        )?;
        let dense_cycles = if op.sparse && self.inputs.dense_baseline {
            let all = StreamedMatrix::from_dense(
                pattern.rows(),
                pattern.cols(),
                &vec![0.0; pattern.rows() * pattern.cols()],
                None,
            );
            let kernel = WeightGrad {
                pattern: &all,
                ..kernel
            };
            kernel
                .run(self.fabric(), self.options())
                .map_err(kernel_error(&op))?
                .stats
                .cycles
        } else {
            run.stats.cycles
        };
        let record = OpRecord::new(op, &run.stats, dense_cycles);
        Ok((run.grad, run.bias_grad, record))
    }

    fn layer_norm_backward(
        &mut self,
        layer: Option<usize>,
        name: &'static str,
        dy: &Act,
        x: &Act,
        normed: &Normed,
        params: &LnParams,
    ) -> Result<(Act, LnParams), RuntimeError> {
        let op = Op::plain(layer, name, Phase::InputGrad);
        let kernel = LayerNormBackward {
            region: self.region(),
            tokens: self.tokens(),
            features: x.features,
            dy: &dy.data,
            x: &x.data,
            gamma: &params.gamma,
            mean: &normed.mean,
            rstd: &normed.rstd,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        Ok((
            Act {
                data: run.dx,
                features: x.features,
            },
            LnParams {
                gamma: run.dgamma,
                beta: run.dbeta,
            },
        ))
    }

    fn gelu_backward(&mut self, l: usize, f: &Act, dg: &Act) -> Result<Act, RuntimeError> {
        let op = Op::plain(Some(l), "gelu", Phase::InputGrad);
        let kernel = GeluBackward {
            region: self.region(),
            tokens: self.tokens(),
            features: f.features,
            x: &f.data,
            dy: &dg.data,
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

    fn embedding_backward(&mut self, dx: &Act, grads: &mut GptParams) -> Result<(), RuntimeError> {
        let op = Op::plain(None, "embedding", Phase::WeightGrad);
        let kernel = EmbeddingBackward {
            shape: self.embedding_shape(),
            dx: &dx.data,
        };
        let run = kernel
            .run(self.fabric(), self.options())
            .map_err(kernel_error(&op))?;
        self.record(op, &run.stats);
        for (g, d) in grads.wte.data.iter_mut().zip(&run.d_token_table) {
            *g += d;
        }
        grads.wpe.data = run.d_position_table;
        Ok(())
    }
}
