//! `wafersim step --trace PATH --trace-region X,Y,W,H --trace-cycles A..B`: the options that ask
//! for a Chrome / Perfetto trace of a window of the step, checked before anything runs, and the
//! staging of the trace (it is moved into place with the step's other outputs, or not at all).
//!
//! What this is not: the recording. The exact engine records the window kernel run by kernel run
//! (`runtime::StepHooks::trace`); the simulator writes the JSON (`wafersim_sim::Trace`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use wafersim_sim::{Coord, FabricConfig, Trace, TraceWindow};

use super::{bad_input, guard};
use crate::model::checkpoint::Staged;
use crate::runtime::Fidelity;

/// The largest window, in PEs times cycles: beyond it the events would not fit a reasonable
/// trace file (every PE can record several events per cycle).
pub const MAX_PE_CYCLES: u64 = 200_000_000;

/// A checked request for a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRequest {
    pub path: PathBuf,
    pub window: TraceWindow,
}

/// The flags as given (clap makes `--trace-region` and `--trace-cycles` require `--trace`).
pub struct TraceFlags<'a> {
    pub path: Option<&'a Path>,
    pub region: Option<&'a str>,
    pub cycles: Option<&'a str>,
    /// The step's `--out` folder, created by the step if it does not exist: the trace may go
    /// into it.
    pub out: &'a Path,
}

/// Checks the trace flags against the fabric and the fidelity: `None` without `--trace`.
pub fn request(
    flags: &TraceFlags<'_>,
    fabric: &FabricConfig,
    fidelity: Fidelity,
) -> anyhow::Result<Option<TraceRequest>> {
    let Some(path) = flags.path else {
        return Ok(None);
    };
    if fidelity != Fidelity::Exact {
        return Err(bad_input(
            "--trace",
            anyhow::anyhow!(
                "a trace needs --fidelity exact (the fast fidelity simulates no wavelet)"
            ),
        ));
    }
    let region = flags.region.ok_or_else(|| {
        bad_input(
            "--trace",
            anyhow::anyhow!("give --trace-region X,Y,W,H too"),
        )
    })?;
    let cycles = flags
        .cycles
        .ok_or_else(|| bad_input("--trace", anyhow::anyhow!("give --trace-cycles A..B too")))?;
    let (origin, width, height) = parse_region(region, fabric)
        .map_err(|e| bad_input(format!("--trace-region {region}"), anyhow::anyhow!(e)))?;
    let (start, end) = parse_cycles(cycles)
        .map_err(|e| bad_input(format!("--trace-cycles {cycles}"), anyhow::anyhow!(e)))?;
    // Exact in 128 bits: (2^32 - 1)^2 (2^64 - 1) < 2^128, so no window can wrap past the cap.
    let size = u128::from(width) * u128::from(height) * u128::from(end - start);
    if size > u128::from(MAX_PE_CYCLES) {
        return Err(bad_input(
            "--trace-region/--trace-cycles",
            anyhow::anyhow!(
                "{width} x {height} PEs over {} cycles is {size} PE-cycles, more than {MAX_PE_CYCLES}: trace fewer PEs or cycles",
                end - start
            ),
        ));
    }
    guard::check_output_file_in("--trace", path, flags.out)?;
    let window = TraceWindow {
        origin,
        width,
        height,
        start,
        end,
    };
    Ok(Some(TraceRequest {
        path: path.to_path_buf(),
        window,
    }))
}

/// `X,Y,W,H`: the north-west PE, columns and rows, inside the fabric.
pub fn parse_region(text: &str, fabric: &FabricConfig) -> Result<(Coord, u32, u32), String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [x, y, w, h] = parts[..] else {
        return Err("expected X,Y,W,H (four whole numbers)".into());
    };
    let number = |name: &str, s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{name} = {s:?} is not a whole number"))
    };
    let (x, y, w, h) = (
        number("X", x)?,
        number("Y", y)?,
        number("W", w)?,
        number("H", h)?,
    );
    if w == 0 || h == 0 {
        return Err("W and H must be at least 1".into());
    }
    let inside = |at: u32, len: u32, side: u32| at.checked_add(len).is_some_and(|e| e <= side);
    if !inside(x, w, fabric.width) || !inside(y, h, fabric.height) {
        return Err(format!(
            "the rectangle reaches past the {} x {} fabric",
            fabric.width, fabric.height
        ));
    }
    Ok((Coord::new(x, y), w, h))
}

/// `A..B`: cycles from `A` up to `B` excluded, `A < B`.
pub fn parse_cycles(text: &str) -> Result<(u64, u64), String> {
    let Some((a, b)) = text.split_once("..") else {
        return Err("expected A..B (cycles from A up to B)".into());
    };
    let number = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not a whole number of cycles"))
    };
    let (a, b) = (number(a)?, number(b)?);
    if a >= b {
        return Err(format!("the end {b} must be after the start {a}"));
    }
    Ok((a, b))
}

/// Stages `trace` as Chrome trace-event JSON for the requested path, to be moved into place with
/// the step's other outputs by [`guard::write_all`] (a device such as `/dev/null` is written at
/// once: see [`guard::stage_output`]).
pub fn stage(request: &TraceRequest, trace: &Trace) -> anyhow::Result<Option<Staged>> {
    let path = &request.path;
    guard::stage_output(path, trace.to_chrome_json().as_bytes())
        .with_context(|| format!("writing the trace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabric() -> FabricConfig {
        FabricConfig::rectangle(8, 4).unwrap()
    }

    #[test]
    fn regions_parse_inside_the_fabric_only() {
        assert_eq!(
            parse_region("1,2,3,2", &fabric()),
            Ok((Coord::new(1, 2), 3, 2))
        );
        assert_eq!(parse_region(" 0, 0, 8, 4", &fabric()).map(|r| r.1), Ok(8));
        for bad in [
            "1,2,3",
            "1,2,3,4,5",
            "a,0,1,1",
            "0,0,0,1",
            "6,0,3,1",
            "0,3,1,2",
            "-1,0,1,1",
        ] {
            assert!(parse_region(bad, &fabric()).is_err(), "{bad}");
        }
        assert!(
            parse_region("4294967295,0,1,1", &fabric()).is_err(),
            "overflow"
        );
    }

    #[test]
    fn cycles_parse_as_a_half_open_range() {
        assert_eq!(parse_cycles("0..100"), Ok((0, 100)));
        assert_eq!(parse_cycles("5 .. 6"), Ok((5, 6)));
        for bad in ["5..5", "9..3", "..4", "3..", "3-4", "a..b", "-1..4"] {
            assert!(parse_cycles(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_need_exact_and_a_small_enough_window() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.json");
        let flags = TraceFlags {
            path: Some(&path),
            region: Some("0,0,2,2"),
            cycles: Some("10..20"),
            out: tmp.path(),
        };
        let got = request(&flags, &fabric(), Fidelity::Exact)
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.window.start, got.window.end, got.window.width),
            (10, 20, 2)
        );
        assert!(request(&flags, &fabric(), Fidelity::Fast).is_err());
        let huge = TraceFlags {
            cycles: Some("0..100000000"),
            ..flags
        };
        // 2 x 2 PEs x 1e8 cycles = 4e8 > 2e8.
        assert!(request(&huge, &fabric(), Fidelity::Exact).is_err());
        let none = TraceFlags {
            path: None,
            region: None,
            cycles: None,
            out: tmp.path(),
        };
        assert_eq!(request(&none, &fabric(), Fidelity::Fast).unwrap(), None);
    }

    #[test]
    fn a_window_whose_size_overflows_64_bits_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.json");
        // 8 x 4 PEs x 2^59 cycles = 2^64 PE-cycles: 0 in wrapping u64 arithmetic.
        let flags = TraceFlags {
            path: Some(&path),
            region: Some("0,0,8,4"),
            cycles: Some("0..576460752303423488"),
            out: tmp.path(),
        };
        let err = request(&flags, &fabric(), Fidelity::Exact).unwrap_err();
        assert!(is_bad_input(&err), "{err:#}");
        assert!(
            format!("{err:#}").contains("is 18446744073709551616 PE-cycles, more than 200000000"),
            "{err:#}"
        );
        // The largest window there is: (2^32 - 1)^2 PEs over 2^64 - 1 cycles, still exact.
        let widest = FabricConfig {
            width: u32::MAX,
            height: u32::MAX,
            ..fabric()
        };
        let flags = TraceFlags {
            region: Some("0,0,4294967295,4294967295"),
            cycles: Some("0..18446744073709551615"),
            ..flags
        };
        let err = request(&flags, &widest, Fidelity::Exact).unwrap_err();
        let size = "340282366762482138434845932253270245375"; // (2^32 - 1)^2 (2^64 - 1)
        assert!(format!("{err:#}").contains(size), "{err:#}");
    }

    #[test]
    fn a_trace_may_go_into_the_out_folder_the_step_creates() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("new");
        let inside = out.join("t.json");
        let flags = TraceFlags {
            path: Some(&inside),
            region: Some("0,0,1,1"),
            cycles: Some("0..10"),
            out: &out,
        };
        assert!(request(&flags, &fabric(), Fidelity::Exact).is_ok());
        // Another folder that does not exist is still refused.
        let elsewhere = tmp.path().join("other").join("t.json");
        let flags = TraceFlags {
            path: Some(&elsewhere),
            ..flags
        };
        let err = request(&flags, &fabric(), Fidelity::Exact).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    }

    fn is_bad_input(err: &anyhow::Error) -> bool {
        err.downcast_ref::<super::super::BadInput>().is_some()
    }
}
