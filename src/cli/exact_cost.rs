//! What an exact run will cost the host, said before it starts: a floor on its memory, refused
//! when the machine does not have it, and the simulated work, announced on stderr when it is
//! long, with the fast fidelity named as the way to cost the same step in seconds.
//!
//! Without it, `step --model mediswift-xl --fabric wse2` (the exact fidelity is the default) grew
//! to the machine's memory in about a minute and was killed by the kernel, with no message.
//!
//! What it is not: a prediction of the peak. The floor counts only the copies of the model every
//! exact step holds at once (the weights, the gradients the fabric returns, the kept weights in
//! streaming order, the token table the embedding reads, the CPU reference's gradients when the
//! step is checked, AdamW's moments in training) and the engine's own state for each PE of the
//! region; the programs' SRAM, host streams and activations come on top. So it refuses only runs
//! that cannot fit, and a run it lets through may still be too large. Nor is the work a limit:
//! a long exact run is allowed, only announced.

use crate::flops::nnz_for;
use crate::gemm::ENGINE_BYTES_PER_PE;
use crate::model::{GptConfig, SparseKind};

use super::guard;

/// PE-cycles the exact engine simulates per host second on one thread, rounded down from
/// `wafersim bench` on the 2-core machine of `docs/performance.md` (gemm256-full: 22,543 cycles
/// on 1,024 PEs in 0.63 s, 37 M; the tiny model's step on 16 x 16 PEs, 39 M). A rough rate, good
/// to a factor of about two: the events per PE-cycle differ between kernels, and larger regions
/// run slower per PE-cycle (the tiny model's step on 64 x 64 PEs, 135,112 cycles, took 34.6 s:
/// 16 M).
const PE_CYCLES_PER_SECOND: f64 = 3.5e7;

/// Announced beyond this many estimated seconds.
const LONG_RUN_SECONDS: f64 = 60.0;

/// The copies of a model an exact run holds at once.
#[derive(Clone, Copy, Debug)]
pub struct ExactRun<'a> {
    pub config: &'a GptConfig,
    /// Kept weights of the sparsified matrices (a floor: 0 where not known before the weights
    /// are read).
    pub kept_weights: u64,
    /// PEs of the region the step's kernels run on.
    pub pes: u64,
    /// The step's gradients are checked against the CPU reference (which computes its own).
    pub checked: bool,
    /// AdamW's two moments per parameter are held (training).
    pub optimizer: bool,
}

impl ExactRun<'_> {
    /// The floor on host bytes (see the module doc), `None` if it overflows 64 bits.
    pub fn host_bytes_floor(&self) -> Option<u64> {
        let params = self.config.total_params() as u64;
        // Weights, the fabric's gradients, and the reference's and AdamW's moments if held.
        let copies = 2 + u64::from(self.checked) + 2 * u64::from(self.optimizer);
        let model = params.checked_mul(copies)?.checked_mul(4)?;
        // A kept weight in streaming order: its row (u32) and value (f32).
        let streamed = self.kept_weights.checked_mul(8)?;
        let token_table = (self.config.vocab_size as u64)
            .checked_mul(self.config.n_embd as u64)?
            .checked_mul(4)?;
        let engine = self.pes.checked_mul(ENGINE_BYTES_PER_PE)?;
        model
            .checked_add(streamed)?
            .checked_add(token_table)?
            .checked_add(engine)
    }

    /// Refuses (exit code 1) a run whose floor exceeds the memory available.
    pub fn check_memory(&self) -> anyhow::Result<()> {
        guard::check_host_memory(
            &format!(
                "the exact fidelity (the model's weights, gradients and streamed copies, and the engine's state for {} PEs; --fidelity fast costs the step without them)",
                self.pes
            ),
            self.host_bytes_floor(),
        )
    }
}

/// The kept weights of the sparsified matrices at `sparsity` (as the masks draw them,
/// [`nnz_for`]).
pub fn kept_weights(config: &GptConfig, sparsity: f64) -> u64 {
    let per_layer: u64 = SparseKind::ALL
        .iter()
        .map(|kind| {
            let (rows, cols) = kind.shape(config);
            nnz_for((rows * cols) as u64, sparsity)
        })
        .sum();
    per_layer * config.n_layer as u64
}

/// A line for stderr when simulating `cycles` on `pes` PEs (the fast fidelity's count, `what`
/// naming the run) would take more than a minute at [`PE_CYCLES_PER_SECOND`]; `None` otherwise.
pub fn long_run_note(what: &str, cycles: u64, pes: u64) -> Option<String> {
    let pe_cycles = cycles as f64 * pes as f64;
    let seconds = pe_cycles / PE_CYCLES_PER_SECOND;
    (seconds > LONG_RUN_SECONDS).then(|| {
        format!(
            "note: {what} simulates about {pe_cycles:.1e} PE-cycles ({cycles} cycles on {pes} PEs): roughly {} on one thread at the exact engine's {:.0} M PE-cycles per second, within a factor of two (docs/performance.md); --fidelity fast costs it in seconds",
            duration(seconds),
            PE_CYCLES_PER_SECOND / 1e6
        )
    })
}

/// `seconds` in the largest unit that keeps a number above 1.
fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 3600.0 => format!("{:.0} minutes", s / 60.0),
        s if s < 86400.0 => format!("{:.1} hours", s / 3600.0),
        s => format!("{:.1} days", s / 86400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_of_mediswift_xl_on_the_wafer_is_its_copies_worked_out_by_hand() {
        // MediSwift-XL: d = 2048, f = 8192, 24 layers, vocabulary 50257, 2048 positions.
        // Parameters: per layer 4 d^2 + 4 d + 2 d f + f + d + 4 d = 50,358,272 (x 24 =
        // 1,208,598,528), + 2 d (final norm) = 1,208,602,624; embeddings (50257 + 2048) x 2048
        // = 107,120,640: 1,315,723,264 in all.
        let config = GptConfig::preset("mediswift-xl").unwrap();
        assert_eq!(config.total_params(), 1_315_723_264);
        // Sparsified per layer: 4 d^2 + 2 d f = 50,331,648; at 75 % each matrix keeps a quarter
        // exactly (every numel is a multiple of 4): 12,582,912 per layer, 301,989,888 in all.
        let kept = kept_weights(&config, 0.75);
        assert_eq!(kept, 301_989_888);
        let run = ExactRun {
            config: &config,
            kept_weights: kept,
            pes: 750 * 994,
            checked: true,
            optimizer: false,
        };
        // 3 copies x 4 B x 1,315,723,264 = 15,788,679,168; streamed 8 x 301,989,888 =
        // 2,415,919,104; token table 50257 x 2048 x 4 = 411,705,344; engine 745,500 x 5,120 =
        // 3,816,960,000. Sum 22,433,263,616 B (20.9 GiB): above what a 24 GiB machine has free.
        assert_eq!(run.host_bytes_floor(), Some(22_433_263_616));
        // Training adds AdamW's two moments (2 x 4 B x parameters = 10,525,786,112).
        let training = ExactRun {
            optimizer: true,
            ..run
        };
        assert_eq!(training.host_bytes_floor(), Some(32_959_049_728));
    }

    #[test]
    fn the_floor_stays_below_measured_peaks() {
        // Peak RSS (`/usr/bin/time -f %M`, release, 2026-11-27): the tiny model's exact step on
        // 16 x 16 PEs (batch 2 x 32, checked) 13,808 kB; gpt2-small on 32 x 32 (region 32 x 16,
        // batch 1 x 16, --no-numerics) had reached 2,920,936 kB when stopped after 600 s. A
        // floor above either would refuse a run that fits.
        let tiny = GptConfig::preset("tiny").unwrap();
        let small = GptConfig::preset("gpt2-small").unwrap();
        // Above half of the larger peak too: most of a large model's peak is these copies (the
        // tiny model's is the process itself).
        let cases = [
            (&tiny, 256, true, 13_808u64, 0.0),
            (&small, 512, false, 2_920_936, 0.5),
        ];
        for (config, pes, checked, peak_kb, least_share) in cases {
            let run = ExactRun {
                config,
                kept_weights: kept_weights(config, 0.0),
                pes,
                checked,
                optimizer: false,
            };
            let share = run.host_bytes_floor().unwrap() as f64 / (peak_kb * 1024) as f64;
            assert!(
                share < 1.0 && share > least_share,
                "{}: {share}",
                config.n_embd
            );
        }
    }

    #[test]
    fn long_runs_are_announced_in_the_largest_fitting_unit() {
        // 35 M PE-cycles a second: 2,100 M PE-cycles is exactly 60 s, not announced.
        assert_eq!(long_run_note("x", 2_100_000, 1_000), None);
        // gpt2-small's fast count on 32 x 16 PEs: 101,449,420 x 512 / 3.5e7 = 1,484 s, 25 min.
        let note = long_run_note("the step", 101_449_420, 512).unwrap();
        assert!(note.contains("5.2e10 PE-cycles"), "{note}");
        assert!(note.contains("roughly 25 minutes"), "{note}");
        assert_eq!(duration(5400.0), "1.5 hours");
        assert_eq!(duration(3.0 * 86400.0), "3.0 days");
    }
}
