//! Dense element-wise kernels of a training step: GELU (tanh form) forward and backward, and the
//! residual add `Z = A + B`.
//!
//! What they compute, on a `[T x F]` matrix (tokens x features):
//! - [`Gelu`]: `y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
//! - [`GeluBackward`]: `dx = dy * gelu'(x)`, the exact derivative of that tanh form:
//!   `gelu'(x) = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`,
//!   `th = tanh(sqrt(2/pi) (x + 0.044715 x^3))`. It recomputes `th` from `x` (the forward's
//!   input stays on the wafer) rather than keeping the forward's output.
//! - [`ResidualAdd`]: `z = a + b`. Its backward needs no kernel: `dA = dB = dZ` is the same
//!   buffer handed on, and where a value forks into a branch and a skip connection, the
//!   gradients meeting there are summed by this same kernel (`dX = dZ + dBranch`).
//!
//! What they are not: bias adds (the matmul adds its bias), fused kernels, or f16 kernels.
//!
//! Placement: the shared layout ([`crate::layout`]): PE (c, r) holds the tile `[T_r, F_c]` of
//! every operand, feature-major, placed in SRAM before cycle 0 (activations and activation
//! gradients are already on the wafer, left there by the previous kernel). Because an
//! element-wise kernel does not care which element is which, a PE treats its whole tile as one
//! vector of `|T_r| |F_c|` elements, so each instruction is issued once per PE. The output stays
//! in SRAM in the same layout, ready for the next kernel; the host reads it back after the run.
//!
//! Color plan: none. No wavelet moves; each PE runs one local task, activated at cycle 0.
//!
//! Cost, for the largest tile of `n = max|T_r| max|F_c|` elements, with `s` the task switch, `V =
//! issue + ceil(n / arith_f32)` one f32 vector instruction and `H = issue + n exp_cycles` one
//! `tanh`: GELU `s + 7 V + H`, GELU backward `s + 15 V + H`, residual add `s + V`. This is
//! exact, not an approximation: there is nothing to overlap or wait for
//! ([`Gelu::estimate_cycles`] and friends return it).
//!
//! No FMAC instructions (`fmac`, `dot`): this is non-matmul work, so it must not count in
//! `stats.total.fmacs`; only `mul`, `add`, `scale`, `add_scalar` and `tanh` are used.
//!
//! Numerics: f32 throughout; `sqrt(2/pi)` and the other constants are computed in f64 and rounded
//! once. The polynomial is evaluated as `((x^2 (c k) + k) x)`, equal to `k (x + c x^3)`.

use std::f64::consts::PI;

use wafersim_sim::{Buf, DType, FabricConfig, Program, RunOptions, Simulator, Stats, TaskCtx};

use crate::check_region;
use crate::error::KernelError;
use crate::layout::{Region, Tiling};
use crate::tiles;

/// Name of the GELU forward kernel in errors and reports.
pub const GELU: &str = "gelu";
/// Name of the GELU backward kernel.
pub const GELU_BACKWARD: &str = "gelu_backward";
/// Name of the residual add kernel.
pub const RESIDUAL_ADD: &str = "residual_add";

/// The cubic coefficient of the tanh form of GELU.
const GELU_C: f64 = 0.044_715;

/// `sqrt(2 / pi)`.
fn gelu_k() -> f64 {
    (2.0 / PI).sqrt()
}

/// GELU forward, `y = gelu(x)` on every element.
#[derive(Clone, Copy, Debug)]
pub struct Gelu<'a> {
    pub region: Region,
    pub tokens: usize,
    pub features: usize,
    /// `X`, `tokens x features` row-major.
    pub x: &'a [f32],
}

/// GELU backward, `dx = dy * gelu'(x)`.
#[derive(Clone, Copy, Debug)]
pub struct GeluBackward<'a> {
    pub region: Region,
    pub tokens: usize,
    pub features: usize,
    /// The forward's input `X`, `tokens x features` row-major.
    pub x: &'a [f32],
    /// The gradient of the forward's output, same shape.
    pub dy: &'a [f32],
}

/// Residual add, `z = a + b`.
#[derive(Clone, Copy, Debug)]
pub struct ResidualAdd<'a> {
    pub region: Region,
    pub tokens: usize,
    pub features: usize,
    /// `A`, `tokens x features` row-major.
    pub a: &'a [f32],
    /// `B`, same shape.
    pub b: &'a [f32],
}

/// How an element-wise kernel is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementwisePlan {
    /// Every operand over the region.
    pub tiling: Tiling,
    /// SRAM used by the fullest PE, in bytes.
    pub sram_bytes: u64,
}

/// The result of an element-wise kernel and what it cost.
#[derive(Clone, Debug)]
pub struct ElementwiseRun {
    /// The output (`y`, `dx` or `z`), `tokens x features` row-major.
    pub out: Vec<f32>,
    pub plan: ElementwisePlan,
    pub stats: Stats,
}

/// The instruction sequence a PE runs over its tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Gelu,
    GeluBackward,
    Add,
}

impl Body {
    /// `(f32 vector instructions, tanh instructions)` per tile; must match [`Body::execute`].
    fn instructions(self) -> (u64, u64) {
        match self {
            Body::Gelu => (7, 1),
            Body::GeluBackward => (15, 1),
            Body::Add => (1, 0),
        }
    }

    /// Tile-sized scratch buffers needed besides the inputs and the output.
    fn scratch(self) -> usize {
        match self {
            Body::GeluBackward => 1,
            Body::Gelu | Body::Add => 0,
        }
    }

    /// Input tiles.
    fn inputs(self) -> usize {
        match self {
            Body::Gelu => 1,
            Body::GeluBackward | Body::Add => 2,
        }
    }

    /// f32 tiles a PE holds: the inputs, the output and the scratch.
    fn tiles(self) -> usize {
        self.inputs() + 1 + self.scratch()
    }

    /// SRAM of the fullest PE for `tokens x features` on `region`.
    fn sram_bytes(self, region: Region, tokens: usize, features: usize) -> u64 {
        let tiling = Tiling::new(region, tokens, features);
        let tile = (tiling.tokens.max_len() * tiling.features.max_len()) as u64;
        4 * tile * self.tiles() as u64
    }

    fn execute(self, ctx: &mut TaskCtx<'_>, inputs: &[Buf], out: Buf, scratch: &[Buf]) {
        let (k, c) = (gelu_k(), GELU_C);
        match (self, inputs, scratch) {
            (Body::Gelu, &[x], _) => {
                let (x, y) = (x.all(), out.all());
                ctx.mul(y, x, x);
                ctx.scale(y, y, (c * k) as f32);
                ctx.add_scalar(y, y, k as f32);
                ctx.mul(y, y, x); // u = k (x + c x^3)
                ctx.tanh(y, y);
                ctx.scale(y, y, 0.5);
                ctx.add_scalar(y, y, 0.5); // 0.5 (1 + th)
                ctx.mul(y, y, x);
            }
            (Body::GeluBackward, &[x, dy], &[s]) => {
                let (x, dy, d, s) = (x.all(), dy.all(), out.all(), s.all());
                ctx.mul(s, x, x);
                ctx.scale(d, s, (c * k) as f32);
                ctx.add_scalar(d, d, k as f32);
                ctx.mul(d, d, x);
                ctx.tanh(d, d); // th
                ctx.scale(s, s, (6.0 * c * k) as f32);
                ctx.add_scalar(s, s, (2.0 * k) as f32);
                ctx.mul(s, s, x); // 2 k x (1 + 3 c x^2)
                ctx.scale(d, d, -0.5);
                ctx.add_scalar(d, d, 0.5); // b = 0.5 (1 - th)
                ctx.mul(s, s, d); // k x (1 + 3 c x^2) (1 - th)
                ctx.add_scalar(s, s, 1.0);
                ctx.scale(d, d, -1.0);
                ctx.add_scalar(d, d, 1.0); // a = 1 - b = 0.5 (1 + th)
                // gelu' = a (1 + k x (1 + 3 c x^2) (1 - th)), since 1 - th^2 = (1 - th)(1 + th).
                ctx.mul(d, d, s);
                ctx.mul(d, d, dy);
            }
            (Body::Add, &[a, b], _) => ctx.add(out.all(), a.all(), b.all()),
            _ => unreachable!("operand counts are fixed per body"),
        }
    }
}

/// A kernel that runs one local task per PE over its tiles.
struct Local<'a> {
    kernel: &'static str,
    body: Body,
    region: Region,
    tokens: usize,
    features: usize,
    inputs: Vec<(&'static str, &'a [f32])>,
}

impl Local<'_> {
    fn plan(&self, config: &FabricConfig) -> Result<ElementwisePlan, KernelError> {
        for &(name, m) in &self.inputs {
            tiles::check_len(self.kernel, name, m, self.tokens, self.features)?;
        }
        check_region(self.kernel, config, self.region, self.tokens, self.features)?;
        debug_assert_eq!(self.inputs.len(), self.body.inputs());
        let tiling = Tiling::new(self.region, self.tokens, self.features);
        let tile = (tiling.tokens.max_len() * tiling.features.max_len()) as u64;
        let buffers = self.body.tiles();
        let needed = self
            .body
            .sram_bytes(self.region, self.tokens, self.features);
        let available = u64::from(config.sram_bytes);
        if needed > available {
            return Err(KernelError::DoesNotFit {
                kernel: self.kernel,
                needed,
                available,
                what: format!("{buffers} f32 tiles of {tile} elements"),
                hint: "spread the matrix over more PEs".into(),
            });
        }
        Ok(ElementwisePlan {
            tiling,
            sram_bytes: needed,
        })
    }

    fn build(
        &self,
        config: &FabricConfig,
    ) -> Result<(Program, ElementwisePlan, Vec<Buf>), KernelError> {
        let plan = self.plan(config)?;
        let mut p = Program::new(config.clone())?;
        let mut outputs = Vec::new();
        for r in 0..self.region.rows {
            for c in 0..self.region.cols {
                outputs.push(self.place_pe(&mut p, &plan.tiling, c, r)?);
            }
        }
        Ok((p, plan, outputs))
    }

    fn place_pe(
        &self,
        p: &mut Program,
        tiling: &Tiling,
        c: u32,
        r: u32,
    ) -> Result<Buf, KernelError> {
        let pe = self.region.pe(c, r);
        let mut inputs = Vec::new();
        for &(name, m) in &self.inputs {
            inputs.push(tiles::place_tile(p, self.region, tiling, name, m, (c, r))?);
        }
        let len = tiling.tokens.block(r as usize).len() * tiling.features.block(c as usize).len();
        let out = p.alloc_zeros(pe, "out", DType::F32, len)?;
        let mut scratch = Vec::new();
        for _ in 0..self.body.scratch() {
            scratch.push(p.alloc_zeros(pe, "scratch", DType::F32, len)?);
        }
        let body = self.body;
        let task = p.local_task(pe, self.kernel, move |ctx| {
            body.execute(ctx, &inputs, out, &scratch)
        })?;
        p.activate(pe, task)?;
        Ok(out)
    }

    fn run(
        &self,
        config: &FabricConfig,
        options: RunOptions,
    ) -> Result<ElementwiseRun, KernelError> {
        let (program, plan, outputs) = self.build(config)?;
        let executed = Simulator::new(program)?.run(options)?;
        let out = tiles::gather(&executed, self.region, &plan.tiling, &outputs);
        Ok(ElementwiseRun {
            out,
            plan,
            stats: executed.stats,
        })
    }

    /// `s + vectors * V + tanhs * H` over the largest tile (see the module doc).
    fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
        let tiling = Tiling::new(self.region, self.tokens, self.features);
        let n = tiling.tokens.max_len() * tiling.features.max_len();
        let (vectors, tanhs) = self.body.instructions();
        u64::from(config.task_switch_cycles)
            + vectors * tiles::arith(config, n)
            + tanhs * tiles::transcendental(config, n)
    }
}

/// The four entry points every element-wise kernel has, delegating to its [`Local`] form.
macro_rules! local_kernel {
    ($kernel:ident) => {
        impl $kernel<'_> {
            /// Checks shapes and that every PE's tiles fit its SRAM.
            pub fn plan(&self, config: &FabricConfig) -> Result<ElementwisePlan, KernelError> {
                self.local().plan(config)
            }

            /// The program and the buffers holding the output, one per PE, row by row.
            pub fn build(
                &self,
                config: &FabricConfig,
            ) -> Result<(Program, ElementwisePlan, Vec<Buf>), KernelError> {
                self.local().build(config)
            }

            /// Builds, runs and reads back the output.
            pub fn run(
                &self,
                config: &FabricConfig,
                options: RunOptions,
            ) -> Result<ElementwiseRun, KernelError> {
                self.local().run(config, options)
            }

            /// The cycles of a run, from the formula in the module doc.
            pub fn estimate_cycles(&self, config: &FabricConfig) -> u64 {
                self.local().estimate_cycles(config)
            }
        }
    };
}

local_kernel!(Gelu);
local_kernel!(GeluBackward);
local_kernel!(ResidualAdd);

impl Gelu<'_> {
    /// SRAM of the fullest PE for `tokens x features` on `region` (shapes only).
    pub fn sram_bytes(region: Region, tokens: usize, features: usize) -> u64 {
        Body::Gelu.sram_bytes(region, tokens, features)
    }

    fn local(&self) -> Local<'_> {
        Local {
            kernel: GELU,
            body: Body::Gelu,
            region: self.region,
            tokens: self.tokens,
            features: self.features,
            inputs: vec![("X", self.x)],
        }
    }
}

impl GeluBackward<'_> {
    /// SRAM of the fullest PE for `tokens x features` on `region` (shapes only).
    pub fn sram_bytes(region: Region, tokens: usize, features: usize) -> u64 {
        Body::GeluBackward.sram_bytes(region, tokens, features)
    }

    fn local(&self) -> Local<'_> {
        Local {
            kernel: GELU_BACKWARD,
            body: Body::GeluBackward,
            region: self.region,
            tokens: self.tokens,
            features: self.features,
            inputs: vec![("X", self.x), ("dY", self.dy)],
        }
    }
}

impl ResidualAdd<'_> {
    /// SRAM of the fullest PE for `tokens x features` on `region` (shapes only).
    pub fn sram_bytes(region: Region, tokens: usize, features: usize) -> u64 {
        Body::Add.sram_bytes(region, tokens, features)
    }

    fn local(&self) -> Local<'_> {
        Local {
            kernel: RESIDUAL_ADD,
            body: Body::Add,
            region: self.region,
            tokens: self.tokens,
            features: self.features,
            inputs: vec![("A", self.a), ("B", self.b)],
        }
    }
}
