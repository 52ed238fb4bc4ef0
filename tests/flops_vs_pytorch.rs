//! The dense matmul FLOPs of `wafersim::flops` against PyTorch's `FlopCounterMode`, pinned.
//!
//! Each expected number was printed by `scripts/flop_counter_check.py` (torch 2.x,
//! transformers 5.x): a Hugging Face `GPT2LMHeadModel` with eager attention and no dropout, one
//! forward with `labels=input_ids` and `loss.backward()` under `FlopCounterMode`. PyTorch splits
//! its count by kernel, which maps onto our operations exactly: `aten.addmm` = the forward of the
//! six linears (Conv1D with bias), `aten.bmm` = attention `Q K^T` and `A V` in all phases,
//! `aten.mm` = the linears' two backward matmuls and the LM head's three (it has no bias).

use wafersim::flops::{FlopOptions, NnzSource, OpKind, Phase, StepShape, step_flops};
use wafersim::model::GptConfig;

/// What `FlopCounterMode` printed for one shape.
struct PyTorchCount {
    total: u64,
    addmm: u64,
    bmm: u64,
    mm: u64,
}

fn config(
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    n_inner: usize,
    vocab: usize,
    n_positions: usize,
) -> GptConfig {
    GptConfig {
        n_layer,
        n_embd,
        n_head,
        n_positions,
        vocab_size: vocab,
        n_inner,
        layer_norm_epsilon: 1e-5,
        scale_attn_weights: true,
    }
}

fn check(config: &GptConfig, batch: usize, seq: usize, torch: PyTorchCount) {
    let shape = StepShape { batch, seq };
    let r = step_flops(
        config,
        shape,
        &NnzSource::dense(config),
        FlopOptions::default(),
    )
    .unwrap();
    assert_eq!(r.matmul_dense(), torch.total);
    assert_eq!(torch.addmm + torch.bmm + torch.mm, torch.total);
    let linear_forward: u64 = r
        .ops()
        .iter()
        .filter(|e| matches!(e.op, OpKind::Linear(_)) && e.phase == Phase::Forward)
        .map(|e| e.dense)
        .sum();
    let attention: u64 = r
        .ops()
        .iter()
        .filter(|e| matches!(e.op, OpKind::AttnScores | OpKind::AttnValues))
        .map(|e| e.dense)
        .sum();
    assert_eq!(linear_forward, torch.addmm);
    assert_eq!(attention, torch.bmm);
    assert_eq!(r.matmul_dense() - linear_forward - attention, torch.mm);
}

#[test]
fn tiny_shape_matches_flop_counter_mode() {
    // /opt/torchenv/bin/python scripts/flop_counter_check.py --n-layer 2 --n-embd 64 --n-head 4 \
    //     --vocab 256 --n-positions 64 --batch 2 --seq 32
    let torch = PyTorchCount {
        total: 47_185_920,
        addmm: 12_582_912,
        bmm: 3_145_728,
        mm: 31_457_280,
    };
    check(&GptConfig::preset("tiny").unwrap(), 2, 32, torch);
}

#[test]
fn gpt2_small_shape_matches_flop_counter_mode() {
    // /opt/torchenv/bin/python scripts/flop_counter_check.py --n-layer 12 --n-embd 768 \
    //     --n-head 12 --vocab 50257 --n-positions 1024 --batch 1 --seq 128
    let torch = PyTorchCount {
        total: 96_684_539_904,
        addmm: 21_743_271_936,
        bmm: 1_811_939_328,
        mm: 73_129_328_640,
    };
    check(&GptConfig::preset("gpt2-small").unwrap(), 1, 128, torch);
}

#[test]
fn odd_shape_matches_flop_counter_mode() {
    // Odd sizes everywhere, d_ffn not 4 d, batch 3, a sequence shorter than n_positions:
    // /opt/torchenv/bin/python scripts/flop_counter_check.py --n-layer 3 --n-embd 48 --n-head 3 \
    //     --n-inner 80 --vocab 101 --n-positions 20 --batch 3 --seq 17
    let torch = PyTorchCount {
        total: 18_492_192,
        addmm: 5_170_176,
        bmm: 1_498_176,
        mm: 11_823_840,
    };
    check(&config(3, 48, 3, 80, 101, 20), 3, 17, torch);
}
