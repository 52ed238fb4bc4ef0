//! `wafersim step --trace PATH --trace-region X,Y,W,H --trace-cycles A..B`: the options that ask
//! for a Chrome / Perfetto trace of a window of the step, checked before anything runs, and the
//! writing of the trace.
//!
//! What this is not: the recording. The exact engine records the window kernel run by kernel run
//! (`runtime::StepHooks::trace`); the simulator writes the JSON (`wafersim_sim::Trace`).

use std::path::{Path, PathBuf};

use wafersim_sim::{Coord, FabricConfig, Trace, TraceWindow};

use super::{bad_input, guard};
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
    let size = u64::from(width) * u64::from(height) * (end - start);
    if size > MAX_PE_CYCLES {
        return Err(bad_input(
            "--trace-region/--trace-cycles",
            anyhow::anyhow!(
                "{width} x {height} PEs over {} cycles is {size} PE-cycles, more than {MAX_PE_CYCLES}: trace fewer PEs or cycles",
                end - start
            ),
        ));
    }
    guard::check_output_file("--trace", path)?;
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

/// Writes `trace` as Chrome trace-event JSON to the requested path.
pub fn write(request: &TraceRequest, trace: &Trace) -> anyhow::Result<()> {
    let path = &request.path;
    std::fs::write(path, trace.to_chrome_json())
        .map_err(|e| anyhow::anyhow!("writing the trace {}: {e}", path.display()))
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
        };
        assert_eq!(request(&none, &fabric(), Fidelity::Fast).unwrap(), None);
    }
}
