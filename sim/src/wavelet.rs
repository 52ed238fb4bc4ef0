//! What travels on the fabric: 32-bit wavelets on colors.
//!
//! A wavelet is one 32-bit payload. Its two uses in the Cerebras SDK are both supported: a whole
//! `f32`, or the sparse form with an fp16 value in the low half and a 16-bit index in the high
//! half (SDK tutorial "sparse tensors"). The color (virtual channel) is not part of the payload:
//! it is the queue the wavelet travels in.

use std::fmt;

use half::f16;
use serde::Serialize;

/// A routable color (virtual channel), `0..colors` of the fabric config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Color(pub u8);

impl Color {
    /// The color as an index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "color {}", self.0)
    }
}

/// One 32-bit message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Wavelet(pub u32);

impl Wavelet {
    /// A wavelet carrying one `f32`.
    pub fn from_f32(value: f32) -> Self {
        Wavelet(value.to_bits())
    }

    /// The payload read as an `f32`.
    pub fn f32(self) -> f32 {
        f32::from_bits(self.0)
    }

    /// The sparse form: fp16 `value` in the low 16 bits, `index` in the high 16 bits.
    pub fn sparse(value: f16, index: u16) -> Self {
        Wavelet((u32::from(index) << 16) | u32::from(value.to_bits()))
    }

    /// The fp16 value of the sparse form.
    pub fn value_f16(self) -> f16 {
        f16::from_bits(self.0 as u16)
    }

    /// The 16-bit index of the sparse form.
    pub fn index(self) -> u16 {
        (self.0 >> 16) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_bit_exactly() {
        for v in [
            0.0f32,
            -0.0,
            1.5,
            f32::MIN_POSITIVE,
            -3.25e-7,
            f32::INFINITY,
        ] {
            assert_eq!(Wavelet::from_f32(v).f32().to_bits(), v.to_bits());
        }
    }

    #[test]
    fn sparse_form_packs_index_high_value_low() {
        let w = Wavelet::sparse(f16::from_f32(-2.5), 0xBEEF);
        assert_eq!(w.index(), 0xBEEF);
        assert_eq!(w.value_f16().to_f32(), -2.5);
        // -2.5 in fp16 is 0xC100.
        assert_eq!(w.0, 0xBEEF_C100);
    }
}
