//! What can go wrong placing or running a kernel.

use wafersim_sim::{BuildError, SimError};

/// A kernel that cannot be placed, does not fit, or whose run failed.
#[allow(missing_docs)] // each variant's message documents it
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(
        "{kernel} does not fit: a PE needs {needed} bytes of SRAM ({what}) but has {available}; {hint}"
    )]
    DoesNotFit {
        kernel: &'static str,
        needed: u64,
        available: u64,
        what: String,
        hint: String,
    },
    #[error("{kernel}: {reason}")]
    Shape {
        kernel: &'static str,
        reason: String,
    },
}

impl From<BuildError> for KernelError {
    fn from(e: BuildError) -> Self {
        KernelError::Sim(SimError::Build(e))
    }
}
