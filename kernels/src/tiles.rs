//! Small helpers shared by the dense kernels: checking a host matrix's length, placing its tiles
//! on a region before cycle 0, reading tiles back after a run, and the cost of one vector
//! instruction.
//!
//! What this module is not: a kernel. It knows the shared layout ([`Tiling`]) and nothing of
//! what a kernel computes.

use wafersim_sim::{Buf, BuildError, Executed, FabricConfig, Program};

use crate::error::KernelError;
use crate::layout::{Region, Tiling};

/// Checks that `values` holds `rows x cols` numbers (named `what` in the error).
pub(crate) fn check_len(
    kernel: &'static str,
    what: &str,
    values: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(), KernelError> {
    let expected = rows.checked_mul(cols);
    if expected != Some(values.len()) {
        return Err(KernelError::Shape {
            kernel,
            reason: format!(
                "{what} has {} values, expected {rows} x {cols}",
                values.len()
            ),
        });
    }
    Ok(())
}

/// Places PE (c, r)'s tile of the row-major `m` in a new buffer called `name`.
pub(crate) fn place_tile(
    p: &mut Program,
    region: Region,
    tiling: &Tiling,
    name: &'static str,
    m: &[f32],
    (c, r): (u32, u32),
) -> Result<Buf, BuildError> {
    let tile = tiling.tile(m, c as usize, r as usize);
    p.alloc_f32(region.pe(c, r), name, &tile)
}

/// Reads one tile per PE (listed row by row, west to east) back into a row-major matrix.
pub(crate) fn gather(
    executed: &Executed,
    region: Region,
    tiling: &Tiling,
    bufs: &[Buf],
) -> Vec<f32> {
    let mut m = vec![0.0; tiling.tokens.total * tiling.features.total];
    let pes = (0..region.rows).flat_map(|r| (0..region.cols).map(move |c| (c, r)));
    for ((c, r), &buf) in pes.zip(bufs) {
        let tile = executed
            .read(region.pe(c, r), buf)
            .expect("the kernel placed this buffer on this PE");
        tiling.untile(&tile, &mut m, c as usize, r as usize);
    }
    m
}

/// Cycles of one f32 add/sub/mul/scale/add_scalar over `len` elements (also `sum`).
pub(crate) fn arith(config: &FabricConfig, len: usize) -> u64 {
    config.vector_cycles(len as u64, config.simd.arith_f32)
}

/// Cycles of one f32 move over `len` elements.
pub(crate) fn mov(config: &FabricConfig, len: usize) -> u64 {
    config.vector_cycles(len as u64, config.simd.mov_f32)
}

/// Cycles of one transcendental (`exp`, `tanh`) over `len` elements.
pub(crate) fn transcendental(config: &FabricConfig, len: usize) -> u64 {
    config.transcendental_cycles(len as u64)
}
