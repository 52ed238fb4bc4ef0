//! wafersim-sim: a CS-2-style wafer-scale fabric simulator.
