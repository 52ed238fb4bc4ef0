//! wafersim: sparse training on a simulated wafer-scale dataflow accelerator.
//!
//! This crate is the runtime on top of the machine (`wafersim-sim`) and its device programs
//! (`wafersim-kernels`): the GPT model and its checkpoints, static sparsity masks, the plain CPU
//! reference training step (the oracle), analytic FLOP accounting, the compiler from a model to
//! kernel instances on fabric regions, the host side of weight streaming, reports and the CLI.
//!
//! Dependencies point one way, `wafersim -> wafersim-kernels -> wafersim-sim`: nothing below
//! this crate knows what GPT is (the kernels are operations such as attention, LayerNorm and
//! weight-streamed products, with no model around them; the simulator knows only PEs, wavelets
//! and tasks). See `ARCHITECTURE.md` for the map.

pub mod breakdown;
pub mod cli;
pub mod compile;
pub mod flops;
pub mod gemm;
pub mod model;
pub mod plot;
pub mod recipe;
pub mod reference;
pub mod runtime;
pub mod sparsity;
pub mod sweep;
pub mod training;
pub mod tune;
pub mod utilisation;
