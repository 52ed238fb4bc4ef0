//! wafersim-kernels: per-PE programs for the operations of a training step.
