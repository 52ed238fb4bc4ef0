//! Programs shared by the integration tests and the benches.

pub mod spmv;
pub mod trace_nesting;
