//! The machine's parameters: fabric size, SRAM, clock, colors, queue depth, latencies, costs and
//! SIMD widths, with the `wse2` and `wse3` presets and file overrides.
//!
//! Every number the simulator uses to time anything lives here, so a reader can see (and a user
//! can change) the whole machine model in one struct. Each field's doc names its source (the
//! table of `docs/machine.md` too); values marked "assumption" are not published and are
//! parameters for that reason.
//!
//! A config is built from a spec string (`wse2`, `wse3`, `WxH` = the wse2 machine cut to that
//! rectangle) or from a TOML/JSON file whose `base` names a preset and whose other keys override
//! it. Unknown keys and out-of-range values are refused with the field named.

use serde::{Deserialize, Serialize};

/// Largest fabric side accepted, far beyond any wafer (WSE-3 is 762 x 1172), refused before
/// anything is allocated.
pub const MAX_SIDE: u32 = 4096;

/// Routable colors in hardware (WSE-2 and WSE-3: 0..=23).
pub const HARDWARE_COLORS: u8 = 24;

/// SIMD widths: elements per cycle of each vector operation class, by data type.
///
/// From the Cerebras SDK appendix table (WSE-2 column): `@fmach` 4, `@fmachs` 2, `@faddh`,
/// `@fmulh`, `@fmovh` 4, `@fadds`, `@fmovs` 2, `@fmaxh` 1. Not in the table and assumed:
/// `@fmacs` (fp32 FMAC) 1, fp32 multiply 2 (as `@fadds`), fp32 max 1 (as `@fmaxh`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimdWidths {
    /// fp16 x fp16 + fp16 (`@fmach`).
    pub fmac_f16: u32,
    /// fp16 x fp16 accumulated into fp32 (`@fmachs`).
    pub fmac_mixed: u32,
    /// fp32 FMAC (`@fmacs`; assumption: 1).
    pub fmac_f32: u32,
    /// fp16 add, subtract, multiply (`@faddh`, `@fsubh`, `@fmulh`).
    pub arith_f16: u32,
    /// fp32 add, subtract, multiply (`@fadds`; multiply assumed the same).
    pub arith_f32: u32,
    /// fp16 move (`@fmovh`).
    pub mov_f16: u32,
    /// fp32 move (`@fmovs`, `@mov32`).
    pub mov_f32: u32,
    /// max, either type (`@fmaxh`; fp32 assumed the same).
    pub max: u32,
}

/// Everything the simulator needs to know about the machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// A label for reports: `wse2`, `wse3`, `32x32`, a file's `name`, or for a file without one
    /// `<base> via <file name>`.
    pub name: String,
    /// PE columns of the program rectangle.
    pub width: u32,
    /// PE rows of the program rectangle.
    pub height: u32,
    /// SRAM per PE in bytes (48 KiB on WSE-2 and WSE-3).
    pub sram_bytes: u32,
    /// SRAM banks per PE (8 of 6 KiB on WSE-2); informational for now.
    pub sram_banks: u32,
    /// Clock in MHz, to turn cycles into seconds (WSE-2: 1100; the SDK examples time at 850).
    pub clock_mhz: u32,
    /// Routable colors (virtual channels); at most 24.
    pub colors: u8,
    /// Depth of each router input buffer and core queue, in wavelets (assumption: 4).
    pub queue_depth: u32,
    /// Cycles for a wavelet to cross one link between neighbouring routers (1).
    pub hop_latency: u32,
    /// Cycles between a router and its own core, either way (2, secondary source).
    pub ramp_latency: u32,
    /// Cycles to switch to and start a task (assumption: 3). At least 1: the engine relies on
    /// every task taking time.
    pub task_switch_cycles: u32,
    /// Cycles to issue one vector instruction before its elements stream (assumption: 1).
    pub issue_cycles: u32,
    /// Cycles per element of a transcendental (exp, tanh) or of a scalar routine the PE has no
    /// instruction for (reciprocal, `1/sqrt`, `ln`), done in software (assumption: 4).
    pub exp_cycles_per_element: u32,
    /// Elements per cycle of each vector instruction class.
    pub simd: SimdWidths,
}

/// What is wrong with a fabric config.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message documents it
#[non_exhaustive]
pub enum ConfigError {
    #[error(
        "unknown fabric \"{0}\" (expected wse2, wse3, WxH such as 32x32, or a .toml/.json file)"
    )]
    UnknownSpec(String),
    #[error("fabric field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("fabric config {path}: {reason}")]
    File { path: String, reason: String },
}

impl FabricConfig {
    /// Cycles of one vector instruction over `len` elements at `width` elements per cycle:
    /// `issue_cycles + ceil(len / width)`. The engine charges exactly this, and the kernels' cost
    /// formulas call it, so the two cannot disagree on an instruction's price.
    pub fn vector_cycles(&self, len: u64, width: u32) -> u64 {
        u64::from(self.issue_cycles) + len.div_ceil(u64::from(width.max(1)))
    }

    /// Cycles of one transcendental instruction (`exp`, `tanh`) over `len` elements:
    /// `issue_cycles + len x exp_cycles_per_element`. The engine charges exactly this, and the
    /// kernels' cost formulas call it.
    pub fn transcendental_cycles(&self, len: u64) -> u64 {
        u64::from(self.issue_cycles) + len * u64::from(self.exp_cycles_per_element)
    }

    /// Cycles of one scalar routine the PE has no instruction for (reciprocal, `1/sqrt`, `ln`):
    /// done in software, priced like one element of `exp` (`exp_cycles_per_element`). The engine
    /// charges exactly this ([`crate::TaskCtx::recip`] and its siblings), and the kernels' cost
    /// formulas call it.
    pub fn software_routine_cycles(&self) -> u64 {
        u64::from(self.exp_cycles_per_element)
    }

    /// The CS-2 (WSE-2): the largest SDK program rectangle, 750 x 994 PEs.
    pub fn wse2() -> Self {
        Self {
            name: "wse2".into(),
            width: 750,
            height: 994,
            sram_bytes: 48 * 1024,
            sram_banks: 8,
            clock_mhz: 1100,
            colors: HARDWARE_COLORS,
            queue_depth: 4,
            hop_latency: 1,
            ramp_latency: 2,
            task_switch_cycles: 3,
            issue_cycles: 1,
            exp_cycles_per_element: 4,
            simd: SimdWidths {
                fmac_f16: 4,
                fmac_mixed: 2,
                fmac_f32: 1,
                arith_f16: 4,
                arith_f32: 2,
                mov_f16: 4,
                mov_f32: 2,
                max: 1,
            },
        }
    }

    /// The CS-3 (WSE-3): fabric 762 x 1172 less the same memcpy margins as WSE-2 (7 columns,
    /// 2 rows), SIMD widths doubled, the same 48 KiB per PE.
    pub fn wse3() -> Self {
        let base = Self::wse2();
        let s = &base.simd;
        Self {
            name: "wse3".into(),
            width: 762 - 7,
            height: 1172 - 2,
            simd: SimdWidths {
                fmac_f16: 2 * s.fmac_f16,
                fmac_mixed: 2 * s.fmac_mixed,
                fmac_f32: 2 * s.fmac_f32,
                arith_f16: 2 * s.arith_f16,
                arith_f32: 2 * s.arith_f32,
                mov_f16: 2 * s.mov_f16,
                mov_f32: 2 * s.mov_f32,
                max: 2 * s.max,
            },
            ..base
        }
    }

    /// The WSE-2 machine cut to a `width x height` rectangle.
    pub fn rectangle(width: u32, height: u32) -> Result<Self, ConfigError> {
        let config = Self {
            name: format!("{width}x{height}"),
            width,
            height,
            ..Self::wse2()
        };
        config.validate()?;
        Ok(config)
    }

    /// `wse2`, `wse3` or `WxH`. (Files are read by [`FabricConfig::from_file_text`].)
    pub fn from_spec(spec: &str) -> Result<Self, ConfigError> {
        match spec {
            "wse2" => Ok(Self::wse2()),
            "wse3" => Ok(Self::wse3()),
            _ => {
                let (w, h) = spec
                    .split_once(['x', 'X'])
                    .ok_or_else(|| ConfigError::UnknownSpec(spec.to_string()))?;
                let parse = |s: &str| s.trim().parse::<u32>().ok();
                match (parse(w), parse(h)) {
                    (Some(w), Some(h)) => Self::rectangle(w, h),
                    _ => Err(ConfigError::UnknownSpec(spec.to_string())),
                }
            }
        }
    }

    /// A config file's text: TOML, or JSON when `is_json`. The optional key `base` names the
    /// preset or `WxH` the other keys override (default `wse2`); `simd` may be given in part.
    /// Without a `name`, the machine is called `<base> via <file name>`.
    pub fn from_file_text(path: &str, text: &str, is_json: bool) -> Result<Self, ConfigError> {
        let file_error = |reason: String| ConfigError::File {
            path: path.to_string(),
            reason,
        };
        let overrides: serde_json::Value = if is_json {
            serde_json::from_str(text).map_err(|e| file_error(e.to_string()))?
        } else {
            let value: toml::Value = toml::from_str(text).map_err(|e| file_error(one_line(&e)))?;
            serde_json::to_value(value).map_err(|e| file_error(e.to_string()))?
        };
        let serde_json::Value::Object(mut overrides) = overrides else {
            return Err(file_error("expected a table of fields".into()));
        };
        let mut base = match overrides.remove("base") {
            None => Self::wse2(),
            Some(serde_json::Value::String(spec)) => Self::from_spec(&spec)?,
            Some(other) => return Err(file_error(format!("`base` must be a string, got {other}"))),
        };
        // Unnamed, the machine is the base as the file changes it: say so in every report.
        let file_name = std::path::Path::new(path).file_name();
        let file_name = file_name.map_or(path.into(), |n| n.to_string_lossy());
        // A control character in the file's name would make the label unprintable.
        let file_name: String = file_name.chars().filter(|c| !c.is_control()).collect();
        base.name = format!("{} via {file_name}", base.name);
        let mut merged = serde_json::to_value(&base).map_err(|e| file_error(e.to_string()))?;
        merge(&mut merged, serde_json::Value::Object(overrides));
        let config: Self = serde_path_to_error::deserialize(merged)
            .map_err(|e| file_error(format!("field `{}`: {}", e.path(), e.inner())))?;
        config.validate()?;
        Ok(config)
    }

    /// Number of PEs in the program rectangle.
    pub fn pe_count(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// Checks every field's range; the simulator relies on these.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        for (field, value) in [("width", self.width), ("height", self.height)] {
            if value == 0 || value > MAX_SIDE {
                return invalid(field, format!("{value} is outside 1..={MAX_SIDE}"));
            }
        }
        if self.name.trim().is_empty() || self.name.chars().any(char::is_control) {
            return invalid(
                "name",
                format!("{:?} must be some printable text", self.name),
            );
        }
        if self.colors == 0 || self.colors > HARDWARE_COLORS {
            return invalid(
                "colors",
                format!("{} is outside 1..={HARDWARE_COLORS}", self.colors),
            );
        }
        if self.sram_bytes < 4 || !self.sram_bytes.is_multiple_of(4) || self.sram_bytes > 1 << 24 {
            return invalid(
                "sram_bytes",
                format!("{} must be a multiple of 4 in 4..=16 MiB", self.sram_bytes),
            );
        }
        let at_least_one = [
            ("queue_depth", self.queue_depth),
            ("hop_latency", self.hop_latency),
            ("ramp_latency", self.ramp_latency),
            ("clock_mhz", self.clock_mhz),
            ("task_switch_cycles", self.task_switch_cycles),
            ("sram_banks", self.sram_banks),
            ("exp_cycles_per_element", self.exp_cycles_per_element),
            ("simd.fmac_f16", self.simd.fmac_f16),
            ("simd.fmac_mixed", self.simd.fmac_mixed),
            ("simd.fmac_f32", self.simd.fmac_f32),
            ("simd.arith_f16", self.simd.arith_f16),
            ("simd.arith_f32", self.simd.arith_f32),
            ("simd.mov_f16", self.simd.mov_f16),
            ("simd.mov_f32", self.simd.mov_f32),
            ("simd.max", self.simd.max),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.queue_depth > 1024 {
            return invalid("queue_depth", format!("{} is above 1024", self.queue_depth));
        }
        Ok(())
    }
}

/// Recursively overwrites `base` with the fields present in `over`.
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (key, value) in o {
                match b.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        b.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_sized_as_sourced() {
        let w2 = FabricConfig::wse2();
        w2.validate().unwrap();
        assert_eq!((w2.width, w2.height, w2.pe_count()), (750, 994, 745_500));
        let w3 = FabricConfig::wse3();
        w3.validate().unwrap();
        assert_eq!((w3.width, w3.height), (755, 1170));
        assert_eq!(w3.simd.fmac_f16, 8);
        assert_eq!(w3.sram_bytes, 48 * 1024);
    }

    #[test]
    fn specs() {
        assert_eq!(
            FabricConfig::from_spec("wse2").unwrap(),
            FabricConfig::wse2()
        );
        let r = FabricConfig::from_spec("32x16").unwrap();
        assert_eq!((r.width, r.height, r.name.as_str()), (32, 16, "32x16"));
        assert_eq!(r.simd, FabricConfig::wse2().simd);
        for bad in ["", "wse9", "32x", "x4", "0x4", "4x0", "5000x5000", "-1x3"] {
            assert!(FabricConfig::from_spec(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn toml_overrides_a_base() {
        let text = "base = \"8x4\"\nqueue_depth = 2\nclock_mhz = 850\n[simd]\nfmac_f32 = 2\n";
        let c = FabricConfig::from_file_text("m.toml", text, false).unwrap();
        assert_eq!(
            (c.width, c.height, c.queue_depth, c.clock_mhz),
            (8, 4, 2, 850)
        );
        assert_eq!(c.simd.fmac_f32, 2);
        assert_eq!(c.simd.fmac_f16, 4, "fields not given keep the base's value");
        assert_eq!(
            c.name, "8x4 via m.toml",
            "unnamed: the base as the file changes it"
        );
        let named = FabricConfig::from_file_text("dir/m.toml", "name = \"lab\"", false).unwrap();
        assert_eq!(named.name, "lab");
        let empty = FabricConfig::from_file_text("m.toml", "name = \" \"", false).unwrap_err();
        assert!(empty.to_string().contains("name"), "{empty}");
    }

    #[test]
    fn json_overrides_and_round_trips() {
        let c =
            FabricConfig::from_file_text("m.json", r#"{"base":"wse3","colors":16}"#, true).unwrap();
        assert_eq!((c.colors, c.width), (16, 755));
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            FabricConfig::from_file_text("m.json", &text, true).unwrap(),
            c
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("queue_depth = 0", "queue_depth"),
            ("colors = 25", "colors"),
            ("width = 0", "width"),
            ("hop_latency = 0", "hop_latency"),
            ("sram_bytes = 6", "sram_bytes"),
            ("[simd]\nmax = 0", "simd.max"),
            ("qeueu_depth = 3", "qeueu_depth"),
            ("colors = \"many\"", "colors"),
            ("queue_depth = ", "m.toml"),
        ];
        for (text, field) in cases {
            let err = FabricConfig::from_file_text("m.toml", text, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
            assert!(!err.contains('\n'), "{text}: multi-line error {err}");
        }
    }
}
