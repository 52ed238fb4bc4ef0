//! AdamW on the host, as `torch.optim.AdamW` computes it, with sparsity masks respected.
//!
//! Per element, at step `t` (counted from 1), with decoupled weight decay `wd` on weight
//! matrices only:
//!
//! ```text
//! w <- w * (1 - lr * wd)                      (wte, wpe and Linear weights; not biases/LN)
//! m <- beta1 m + (1 - beta1) g
//! v <- beta2 v + (1 - beta2) g^2
//! w <- w - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Pruned weights and their moments are set to exactly 0 and never updated. The arithmetic is
//! `f64`; weights and moments are stored back as `f32` after every step (as a host optimizer
//! keeping `f32` state does).

use super::ReferenceError;
use super::check::check_same_layout;
use crate::model::{Block, GptParams, LayerNorm, Linear, SparseKind};
use crate::sparsity::{Mask, ModelMasks};

/// AdamW hyperparameters. [`AdamW::new`] takes the GPT-3 paper's settings, which the Cerebras
/// Model Zoo GPT-3 configs also use: `beta1 = 0.9`, `beta2 = 0.95`, `eps = 1e-8`,
/// `weight_decay = 0.1`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The optimizer's state: first and second moments shaped like the parameters, and the number
/// of steps taken.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    pub m: GptParams,
    pub v: GptParams,
    pub t: u64,
}

impl AdamState {
    /// Zero moments for parameters shaped like `params`, no step taken.
    pub fn new(params: &GptParams) -> Self {
        let mut m = params.clone();
        for (_, tensor) in m.tensors_mut() {
            tensor.fill(0.0);
        }
        Self {
            v: m.clone(),
            m,
            t: 0,
        }
    }
}

/// Constants of one step.
struct StepScalars {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// `1 - lr * weight_decay`.
    decay_factor: f64,
    /// `lr / (1 - beta1^t)`.
    step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    bias_correction2_sqrt: f64,
}

/// One tensor's weights, gradient and moments.
struct Slot<'a> {
    w: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
}

impl AdamW {
    /// The GPT-3 / Cerebras Model Zoo defaults with learning rate `lr`.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }

    /// Checks `lr, weight_decay >= 0`, `0 <= beta < 1`, `eps > 0`, all finite.
    pub fn validate(&self) -> Result<(), ReferenceError> {
        let checks = [
            ("lr", self.lr, self.lr >= 0.0, "must be finite and >= 0"),
            (
                "beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "must be finite and in [0, 1)",
            ),
            (
                "beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "must be finite and in [0, 1)",
            ),
            ("eps", self.eps, self.eps > 0.0, "must be finite and > 0"),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "must be finite and >= 0",
            ),
        ];
        for (field, value, ok, reason) in checks {
            if !(ok && value.is_finite()) {
                return Err(ReferenceError::Optimizer {
                    field,
                    value,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// One AdamW step in place: updates `params` from `grads`, advances `state`.
    pub fn step(
        &self,
        params: &mut GptParams,
        grads: &GptParams,
        masks: &ModelMasks,
        state: &mut AdamState,
    ) -> Result<(), ReferenceError> {
        self.validate()?;
        check_same_layout(params, grads, "grads")?;
        check_same_layout(params, &state.m, "adam m")?;
        check_same_layout(params, &state.v, "adam v")?;
        masks.check_matches(params)?;
        let t = state.t.saturating_add(1);
        let k = self.scalars(t);
        let AdamState { m, v, .. } = state;
        k.update(
            slot(
                &mut params.wte.data,
                &grads.wte.data,
                &mut m.wte.data,
                &mut v.wte.data,
            ),
            true,
            None,
        );
        k.update(
            slot(
                &mut params.wpe.data,
                &grads.wpe.data,
                &mut m.wpe.data,
                &mut v.wpe.data,
            ),
            true,
            None,
        );
        let blocks = params.blocks.iter_mut().zip(&grads.blocks);
        let moments = m.blocks.iter_mut().zip(v.blocks.iter_mut());
        for (((w, g), (bm, bv)), layer_masks) in blocks.zip(moments).zip(masks.layers()) {
            k.update_block(w, g, bm, bv, layer_masks);
        }
        k.update_layer_norm(&mut params.ln_f, &grads.ln_f, &mut m.ln_f, &mut v.ln_f);
        state.t = t;
        Ok(())
    }

    /// One AdamW step of a single tensor outside [`GptParams`] (such as prompt vectors): `w`
    /// from its gradient `g` and moments `m`, `v`, at step `t` (counted from 1), with weight
    /// decay if `decay`. All four slices must have the same length.
    #[allow(clippy::too_many_arguments)]
    pub fn step_tensor(
        &self,
        w: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        t: u64,
        decay: bool,
    ) -> Result<(), ReferenceError> {
        self.validate()?;
        if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
            return Err(ReferenceError::Shape {
                role: "AdamW",
                tensor: "step_tensor".into(),
                expected: format!("{} values in w, g, m and v", w.len()),
                got: format!("{}, {}, {}", g.len(), m.len(), v.len()),
            });
        }
        self.scalars(t.max(1)).update(slot(w, g, m, v), decay, None);
        Ok(())
    }

    fn scalars(&self, t: u64) -> StepScalars {
        let t = t as f64;
        StepScalars {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay_factor: 1.0 - self.lr * self.weight_decay,
            step_size: self.lr / (1.0 - self.beta1.powf(t)),
            bias_correction2_sqrt: (1.0 - self.beta2.powf(t)).sqrt(),
        }
    }
}

fn slot<'a>(w: &'a mut [f32], g: &'a [f32], m: &'a mut [f32], v: &'a mut [f32]) -> Slot<'a> {
    Slot { w, g, m, v }
}

impl StepScalars {
    fn update_block(
        &self,
        w: &mut Block,
        g: &Block,
        m: &mut Block,
        v: &mut Block,
        masks: &[Mask; 6],
    ) {
        self.update_layer_norm(&mut w.ln_1, &g.ln_1, &mut m.ln_1, &mut v.ln_1);
        self.update_layer_norm(&mut w.ln_2, &g.ln_2, &mut m.ln_2, &mut v.ln_2);
        for kind in SparseKind::ALL {
            let mask = &masks[kind.index()];
            self.update_linear(
                w.linear_mut(kind),
                g.linear(kind),
                m.linear_mut(kind),
                v.linear_mut(kind),
                mask,
            );
        }
    }

    fn update_linear(
        &self,
        w: &mut Linear,
        g: &Linear,
        m: &mut Linear,
        v: &mut Linear,
        mask: &Mask,
    ) {
        let weight = slot(
            &mut w.weight.data,
            &g.weight.data,
            &mut m.weight.data,
            &mut v.weight.data,
        );
        self.update(weight, true, Some(&mask.keep()));
        self.update(
            slot(&mut w.bias, &g.bias, &mut m.bias, &mut v.bias),
            false,
            None,
        );
    }

    fn update_layer_norm(
        &self,
        w: &mut LayerNorm,
        g: &LayerNorm,
        m: &mut LayerNorm,
        v: &mut LayerNorm,
    ) {
        self.update(
            slot(&mut w.gamma, &g.gamma, &mut m.gamma, &mut v.gamma),
            false,
            None,
        );
        self.update(
            slot(&mut w.beta, &g.beta, &mut m.beta, &mut v.beta),
            false,
            None,
        );
    }

    /// Updates every element of one tensor; `keep` marks the unpruned ones (all if `None`).
    fn update(&self, s: Slot<'_>, decay: bool, keep: Option<&[bool]>) {
        for i in 0..s.w.len() {
            if keep.is_some_and(|k| !k[i]) {
                (s.w[i], s.m[i], s.v[i]) = (0.0, 0.0, 0.0);
                continue;
            }
            let (w, m, v) = self.update_one(s.w[i], s.g[i], s.m[i], s.v[i], decay);
            (s.w[i], s.m[i], s.v[i]) = (w as f32, m as f32, v as f32);
        }
    }

    /// The AdamW update of one element, in `f64`.
    fn update_one(&self, w: f32, g: f32, m: f32, v: f32, decay: bool) -> (f64, f64, f64) {
        let g = f64::from(g);
        let mut w = f64::from(w);
        if decay {
            w *= self.decay_factor;
        }
        let m = self.beta1 * f64::from(m) + (1.0 - self.beta1) * g;
        let v = self.beta2 * f64::from(v) + (1.0 - self.beta2) * g * g;
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        w -= self.step_size * m / denom;
        (w, m, v)
    }
}
