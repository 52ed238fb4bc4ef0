//! The tiny model at sparsity 0.5 on 8 x 8 PEs, with a deterministic batch: the fixture of the
//! library-level step tests (`tests/scale.rs`, `tests/loss_scale.rs`), included by path.

use wafersim::compile::StepPlan;
use wafersim::model::{GptConfig, GptParams, init_params};
use wafersim::reference::Batch;
use wafersim::runtime::{GradientSet, LossScale, StepInputs};
use wafersim::sparsity::ModelMasks;
use wafersim_sim::FabricConfig;

pub struct Tiny {
    pub config: GptConfig,
    pub params: GptParams,
    pub masks: ModelMasks,
    pub batch: Batch,
    pub fabric: FabricConfig,
}

/// `batch` sequences of `seq` tokens (`(i * 37 + 11) mod vocab`), weights from seed 3, masks
/// from seed 5.
pub fn tiny(batch: usize, seq: usize) -> Tiny {
    let config = GptConfig::preset("tiny").unwrap();
    let mut params = init_params(&config, 3);
    let masks = ModelMasks::random(&config, 0.5, 5).unwrap();
    masks.apply(&mut params).unwrap();
    let tokens = (0..batch * seq)
        .map(|i| ((i * 37 + 11) % config.vocab_size) as u32)
        .collect();
    let batch = Batch::new(&config, batch, seq, tokens).unwrap();
    let fabric = FabricConfig::rectangle(8, 8).unwrap();
    Tiny {
        config,
        params,
        masks,
        batch,
        fabric,
    }
}

impl Tiny {
    /// A step of the whole batch on `plan`, every gradient, no dense baseline, `auto` scaling.
    pub fn inputs<'a>(&'a self, plan: &'a StepPlan) -> StepInputs<'a> {
        StepInputs {
            config: &self.config,
            params: &self.params,
            masks: &self.masks,
            batch: &self.batch,
            fabric: &self.fabric,
            plan,
            dense_baseline: false,
            prompt: None,
            gradients: GradientSet::All,
            loss_scale: LossScale::Auto,
        }
    }
}
