//! Checks the commands make before any work starts, and on results before they are written, so
//! that a run is refused at once for its inputs (exit code 2) and never writes a wrong or partial
//! file.
//!
//! - Output paths: the folder of every output must exist (or be creatable) and accept a new file,
//!   and no target may be a folder; checked with a probe file before the simulation, not found
//!   out after it.
//! - Host memory: a request whose tensors alone exceed the memory the OS says is available
//!   (`MemAvailable` of `/proc/meminfo`, Linux only) is refused before allocating, instead of
//!   aborting in the allocator.
//! - Results: a non-finite loss, gradient or updated weight is refused (exit code 1, naming the
//!   tensor) rather than written as `null` in JSON or as a checkpoint our own reader refuses.
//! - Writing several files: all are staged (written and synced beside their targets) before any
//!   is renamed into place, so a failure leaves every old file as it was. A target that is a
//!   device or a FIFO (`/dev/null`) is written in place instead (renaming over it would replace
//!   the device), still before any staged file is renamed.
//! - Stale outputs: a file or folder an earlier run left in an output folder and this run did not
//!   write is named on stderr, never silently left beside the new ones.
//! - Planning errors: which [`CompileError`]s are the input's fault ([`plan_error`]).
//!
//! Not here: argument parsing and the checks of the libraries (configs, checkpoints, masks),
//! which return their own typed errors.

use std::path::{Path, PathBuf};

use super::bad_input;
use crate::compile::CompileError;
use crate::model::checkpoint::{Staged, hf_named_tensors, stage_bytes};
use crate::model::{GptConfig, GptParams};
use crate::reference::BatchError;

/// The folder holding `path` (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `dir` exists, is a folder, and a file can be created in it (checked by creating one).
fn check_writable_folder(flag: &str, dir: &Path) -> anyhow::Result<()> {
    let what = || format!("{flag} {}", dir.display());
    if !dir.exists() {
        return Err(bad_input(
            what(),
            anyhow::anyhow!("folder {} does not exist", dir.display()),
        ));
    }
    if !dir.is_dir() {
        return Err(bad_input(
            what(),
            anyhow::anyhow!("{} is not a folder", dir.display()),
        ));
    }
    tempfile::Builder::new()
        .prefix(".wafersim-probe.")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| {
            bad_input(
                what(),
                anyhow::anyhow!("cannot create a file in {}: {e}", dir.display()),
            )
        })
}

/// The output file `path` (given with `flag`) can be written: it is not a folder and its folder
/// accepts new files (or it is a device or FIFO, written in place: see [`stage_output`]).
pub fn check_output_file(flag: &str, path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        return Err(bad_input(
            format!("{flag} {}", path.display()),
            anyhow::anyhow!("it is a folder, not a file"),
        ));
    }
    if is_special_file(path) {
        return Ok(());
    }
    check_writable_folder(flag, folder_of(path))
}

/// [`check_output_file`] for a file that may go into `out`, an output folder the run creates
/// when it does not exist (its parent checked by [`check_output_folder`]): while `out` does not
/// exist, a file directly in it is accepted.
pub fn check_output_file_in(flag: &str, path: &Path, out: &Path) -> anyhow::Result<()> {
    if !out.exists() && same_folder(folder_of(path), out) {
        return Ok(());
    }
    check_output_file(flag, path)
}

/// `a` and `b` name the same folder, compared after resolving `.`, `..` and links where they
/// exist (a folder that does not exist yet by its parent's resolved path and its name).
pub fn same_folder(a: &Path, b: &Path) -> bool {
    resolved(a) == resolved(b)
}

fn resolved(path: &Path) -> PathBuf {
    if let Ok(path) = path.canonicalize() {
        return path;
    }
    match (path.file_name(), folder_of(path).canonicalize()) {
        (Some(name), Ok(parent)) => parent.join(name),
        _ => path.to_path_buf(),
    }
}

/// An existing target that is neither a regular file nor a folder: a device or a FIFO.
fn is_special_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// The output folder `dir` (given with `flag`) can receive the files `names`: it is a writable
/// folder whose `names` are not folders, or it does not exist yet and its parent is writable.
pub fn check_output_folder(flag: &str, dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    if !dir.exists() {
        return check_writable_folder(flag, folder_of(dir));
    }
    check_writable_folder(flag, dir)?;
    match names.iter().map(|n| dir.join(n)).find(|p| p.is_dir()) {
        Some(target) => Err(bad_input(
            format!("{flag} {}", dir.display()),
            anyhow::anyhow!("{} is a folder, not a file", target.display()),
        )),
        None => Ok(()),
    }
}

/// [`check_output_folder`] for the folder `sub` inside the output folder `dir`: nothing to check
/// while `dir` does not exist (the run creates both).
pub fn check_output_subfolder(
    flag: &str,
    dir: &Path,
    sub: &str,
    names: &[&str],
) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    check_output_folder(flag, &dir.join(sub), names)
}

/// Checks a batch shape given by flags (`flag`) before its tokens are drawn: `batch >= 1`,
/// `2 <= seq <= n_positions`, and `batch * seq` tokens that fit host memory.
pub fn check_batch_shape(
    flag: &str,
    config: &GptConfig,
    batch: usize,
    seq: usize,
) -> anyhow::Result<()> {
    let shape_error = if batch == 0 {
        Some(BatchError::EmptyBatch)
    } else if seq < 2 {
        Some(BatchError::SeqTooShort { seq })
    } else if seq > config.n_positions {
        Some(BatchError::SeqTooLong {
            seq,
            n_positions: config.n_positions,
        })
    } else {
        None
    };
    if let Some(e) = shape_error {
        return Err(bad_input(flag, e));
    }
    let tokens = batch.checked_mul(seq).map(|t| t as u64);
    check_host_memory("the batch's tokens", tokens.and_then(|t| t.checked_mul(4)))
        .map_err(|e| bad_input(flag, e))
}

/// Refuses (exit code 1) a request whose `bytes` of host memory exceed what is available;
/// `None` means the size overflowed 64 bits. `what` names the tensors.
pub fn check_host_memory(what: &str, bytes: Option<u64>) -> anyhow::Result<()> {
    let available = available_memory();
    match (bytes, available) {
        (None, _) => anyhow::bail!("{what} would need more than 2^64 bytes of host memory"),
        (Some(b), Some(a)) if b > a => anyhow::bail!(
            "{what} would need {:.1} GiB of host memory but {:.1} GiB is available",
            b as f64 / GIB,
            a as f64 / GIB
        ),
        _ => Ok(()),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// `MemAvailable` of `/proc/meminfo` in bytes; `None` where it cannot be read.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Says so when new masks are drawn over a checkpoint whose sparsifiable matrices already hold
/// zeros (more than 1 %): those weights stay zero but are no longer the mask, so they are
/// streamed and counted as kept. `hint` ends the line (how to keep them, where there is a way).
pub fn note_new_masks_over_zeros(params: &GptParams, hint: &str) {
    let (mut zeros, mut weights) = (0usize, 0usize);
    for block in &params.blocks {
        for kind in crate::model::SparseKind::ALL {
            let w = &block.linear(kind).weight.data;
            zeros += w.iter().filter(|&&x| x == 0.0).count();
            weights += w.len();
        }
    }
    let zeros = zeros as f64 / weights.max(1) as f64;
    if zeros > 0.01 {
        eprintln!(
            "note: the masks are drawn anew; the checkpoint's zeros ({:.1} % of the sparsifiable weights) are not its mask here{hint}",
            100.0 * zeros
        );
    }
}

/// Weights drawn from `seed` as GPT-2 initialises them, refused (exit code 1) before allocating
/// if one f32 copy of them exceeds the memory the host has.
pub fn seeded_params(config: &GptConfig, seed: u64) -> anyhow::Result<GptParams> {
    check_host_memory(
        "the model's parameters",
        f32_bytes(config.total_params() as u64),
    )?;
    Ok(crate::model::init_params(config, seed))
}

/// Bytes of one f32 copy of a model with `params` parameters.
fn f32_bytes(params: u64) -> Option<u64> {
    params.checked_mul(4)
}

/// Refuses (exit code 1) parameters holding a NaN or an infinity, naming `what`, the tensor and
/// the index: a result that must not be reported or written.
pub fn check_finite(what: &str, params: &GptParams) -> anyhow::Result<()> {
    for (name, _, values) in hf_named_tensors(params) {
        if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            anyhow::bail!(
                "{what}: tensor `{name}` has a non-finite value ({value}) at flat index {index}; nothing was written"
            );
        }
    }
    Ok(())
}

/// Moves staged files into place in `dir`, creating `dir` first if needed (its parent exists).
///
/// `stage` writes every file beside its target; only when all are staged is any renamed. If
/// anything fails, the staged files are removed, and a folder created here is removed again if it
/// is empty, so a failed run leaves the folder as it found it.
pub fn write_all(
    dir: &Path,
    stage: impl FnOnce(&Path) -> anyhow::Result<Vec<Staged>>,
) -> anyhow::Result<()> {
    let created = if dir.is_dir() {
        false
    } else {
        std::fs::create_dir(dir)
            .map_err(|e| anyhow::anyhow!("cannot create folder {}: {e}", dir.display()))?;
        true
    };
    let result = stage(dir).and_then(commit_all);
    if result.is_err() && created {
        let _ = std::fs::remove_dir(dir);
    }
    result
}

/// Stages `bytes` for the output file `path`, to be committed by [`write_all`]. A target that is a
/// device or a FIFO (`/dev/null`, `/dev/stdout`) cannot be replaced by a rename without replacing
/// the device itself, so it is written in place now (`None`): a failure to write it still comes
/// before any staged file is committed.
pub fn stage_output(path: &Path, bytes: &[u8]) -> anyhow::Result<Option<Staged>> {
    if is_special_file(path) {
        std::fs::write(path, bytes)?;
        return Ok(None);
    }
    Ok(Some(stage_bytes(path, bytes)?))
}

/// Names on stderr a file or folder that an earlier run left in an output folder and this run
/// did not write: it is left as it was, beside this run's outputs.
pub fn note_stale(path: &Path) {
    eprintln!(
        "note: {} is from an earlier run (this run did not write it)",
        path.display()
    );
}

/// A step that cannot be planned, as an error with its exit code: a model that does not fit the
/// fabric is a run failure (exit code 1: the inputs are valid, the machine is too small, and
/// `recipe` searches for the longest sequence that fits); a fabric with too few colors, or a
/// shape with no PE column or no token to place, is bad input (exit code 2). Every variant is
/// named, so a new one has to be classed here.
pub fn plan_error(e: CompileError) -> anyhow::Error {
    match e {
        e @ CompileError::DoesNotFit { .. } => anyhow::Error::new(e),
        e @ (CompileError::NoRegion { .. } | CompileError::TooFewColors { .. }) => {
            bad_input("--fabric", e)
        }
    }
}

fn commit_all(staged: Vec<Staged>) -> anyhow::Result<()> {
    for file in staged {
        let target: PathBuf = file.target().to_path_buf();
        file.commit()
            .map_err(|e| anyhow::Error::new(e).context(format!("writing {}", target.display())))?;
    }
    Ok(())
}

/// Whether `err` is bad input (exit code 2).
#[cfg(test)]
fn is_bad_input(err: &anyhow::Error) -> bool {
    err.downcast_ref::<super::BadInput>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_files_need_an_existing_writable_folder_and_must_not_be_folders() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(check_output_file("--json", &tmp.path().join("a.json")).is_ok());
        let missing = check_output_file("--json", &tmp.path().join("no/a.json")).unwrap_err();
        assert!(is_bad_input(&missing));
        assert!(
            format!("{missing:#}").contains("does not exist"),
            "{missing:#}"
        );
        let folder = check_output_file("--json", tmp.path()).unwrap_err();
        assert!(format!("{folder:#}").contains("is a folder"), "{folder:#}");
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn output_folders_may_be_new_but_their_targets_must_not_be_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        assert!(check_output_folder("--out", &out, &["r.json"]).is_ok());
        std::fs::create_dir_all(out.join("r.json")).unwrap();
        let err = check_output_folder("--out", &out, &["r.json"]).unwrap_err();
        assert!(is_bad_input(&err));
        assert!(format!("{err:#}").contains("r.json is a folder"), "{err:#}");
        let nested = check_output_folder("--out", &tmp.path().join("a/b"), &[]).unwrap_err();
        assert!(
            format!("{nested:#}").contains("does not exist"),
            "{nested:#}"
        );
    }

    #[test]
    fn absurd_memory_requests_are_refused_before_allocating() {
        assert!(check_host_memory("x", None).is_err());
        assert!(check_host_memory("x", Some(u64::MAX)).is_err() || available_memory().is_none());
        assert!(check_host_memory("x", Some(1)).is_ok());
    }

    #[test]
    fn a_plan_that_does_not_fit_fails_the_run_and_a_malformed_one_is_bad_input() {
        let does_not_fit = CompileError::DoesNotFit {
            needed: 2,
            per_layer: 1,
            layers: 1,
            head: 1,
            working: 1,
            available: 1,
        };
        assert!(!is_bad_input(&plan_error(does_not_fit)));
        let colors = CompileError::TooFewColors {
            needed: 12,
            available: 11,
        };
        let no_region = CompileError::NoRegion {
            reason: "the batch has no token".into(),
        };
        for e in [colors, no_region] {
            let err = plan_error(e);
            assert!(is_bad_input(&err), "{err:#}");
            assert!(format!("{err:#}").starts_with("--fabric: "), "{err:#}");
        }
    }

    #[test]
    fn a_file_may_go_into_an_output_folder_not_yet_created() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("new");
        // The same folder spelt another way still counts.
        let dotted = tmp.path().join(".").join("new").join("t.json");
        assert!(check_output_file_in("--trace", &out.join("t.json"), &out).is_ok());
        assert!(check_output_file_in("--trace", &dotted, &out).is_ok());
        let other = tmp.path().join("other").join("t.json");
        let err = check_output_file_in("--trace", &other, &out).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        // Once the folder exists, it is checked as any other.
        std::fs::create_dir_all(out.join("t.json")).unwrap();
        let err = check_output_file_in("--trace", &out.join("t.json"), &out).unwrap_err();
        assert!(format!("{err:#}").contains("is a folder"), "{err:#}");
        assert!(same_folder(&out, &tmp.path().join("new/../new")));
        assert!(!same_folder(&out, tmp.path()));
    }

    #[test]
    fn a_subfolder_is_checked_only_inside_an_existing_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        assert!(check_output_subfolder("--out", &out, "checkpoint", &["m"]).is_ok());
        std::fs::create_dir(&out).unwrap();
        assert!(check_output_subfolder("--out", &out, "checkpoint", &["m"]).is_ok());
        std::fs::write(out.join("checkpoint"), "a file").unwrap();
        let err = check_output_subfolder("--out", &out, "checkpoint", &["m"]).unwrap_err();
        assert!(is_bad_input(&err));
        assert!(format!("{err:#}").contains("is not a folder"), "{err:#}");
        std::fs::remove_file(out.join("checkpoint")).unwrap();
        std::fs::create_dir_all(out.join("checkpoint/m")).unwrap();
        let err = check_output_subfolder("--out", &out, "checkpoint", &["m"]).unwrap_err();
        assert!(format!("{err:#}").contains("m is a folder"), "{err:#}");
    }

    #[test]
    fn a_device_is_written_in_place_and_a_file_only_when_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("t.json");
        std::fs::write(&file, "old").unwrap();
        let staged = stage_output(&file, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "old");
        commit_all(staged.into_iter().collect()).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
        let null = Path::new("/dev/null");
        if null.exists() {
            assert!(check_output_file("--trace", null).is_ok());
            assert!(stage_output(null, b"x").unwrap().is_none());
            assert!(is_special_file(null), "still the device");
        }
    }

    #[test]
    fn a_failed_stage_leaves_no_new_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let err = write_all(&out, |_| anyhow::bail!("boom")).unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert!(!out.exists());
    }
}
