//! A PE's SRAM: named buffers of `f32` or `f16`, allocated at build time against the PE's
//! capacity, and the vector references ([`VecRef`]) that instructions address them with.
//!
//! Storage grows with what the program allocates, never with the configured 48 KiB, so a large
//! fabric whose program touches a few PEs costs a few buffers. Each data type has its own arena
//! (`Vec<f32>`, `Vec<f16>`), which keeps every access aligned and typed; the byte accounting
//! against the capacity is what models the hardware limit.

use half::f16;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
}

impl DType {
    /// Size of one element.
    pub const fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// `f32` or `f16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
}

/// A handle to one buffer in one PE's SRAM (valid on the PE that allocated it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Buf {
    pub(crate) id: u16,
    pub(crate) dtype: DType,
    pub(crate) len: u32,
}

impl Buf {
    /// Elements in the buffer.
    pub fn len(self) -> u32 {
        self.len
    }

    /// Whether the buffer has no element.
    pub fn is_empty(self) -> bool {
        self.len == 0
    }

    /// Element type.
    pub fn dtype(self) -> DType {
        self.dtype
    }

    /// The whole buffer as a vector operand.
    pub fn all(self) -> VecRef {
        VecRef {
            buf: self,
            offset: 0,
            len: self.len,
        }
    }

    /// Elements `offset .. offset + len` (bounds are checked when an instruction uses it).
    pub fn slice(self, offset: u32, len: u32) -> VecRef {
        VecRef {
            buf: self,
            offset,
            len,
        }
    }

    /// Element `index` as a one-element vector.
    pub fn at(self, index: u32) -> VecRef {
        self.slice(index, 1)
    }
}

/// A contiguous run of elements of one buffer: an instruction operand (a `mem1d_dsd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VecRef {
    /// The buffer.
    pub buf: Buf,
    /// First element.
    pub offset: u32,
    /// Number of elements.
    pub len: u32,
}

impl VecRef {
    /// Element type.
    pub fn dtype(self) -> DType {
        self.buf.dtype
    }
}

#[derive(Clone, Debug)]
pub(crate) struct BufferMeta {
    pub name: &'static str,
    pub dtype: DType,
    pub start: usize,
    pub len: u32,
}

/// One PE's memory.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sram {
    pub f32s: Vec<f32>,
    pub f16s: Vec<f16>,
    pub buffers: Vec<BufferMeta>,
    pub used_bytes: u64,
}

/// Why a vector reference cannot be used.
#[derive(Debug, PartialEq)]
pub(crate) enum AccessError {
    NoBuffer(u16),
    OutOfBounds {
        name: &'static str,
        offset: u32,
        len: u32,
        buf_len: u32,
    },
}

impl std::fmt::Display for AccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessError::NoBuffer(id) => write!(f, "buffer #{id} does not exist on this PE"),
            AccessError::OutOfBounds {
                name,
                offset,
                len,
                buf_len,
            } => write!(
                f,
                "elements {offset}..{} are outside buffer \"{name}\" of {buf_len}",
                u64::from(*offset) + u64::from(*len)
            ),
        }
    }
}

impl Sram {
    /// Gives back the arenas' spare capacity (left by growing them buffer by buffer): once a
    /// program is built its buffers are fixed, and a wafer holds hundreds of thousands of PEs.
    pub fn shrink_to_fit(&mut self) {
        self.f32s.shrink_to_fit();
        self.f16s.shrink_to_fit();
        self.buffers.shrink_to_fit();
    }

    /// Adds an `f32` buffer holding `init`; the caller checked capacity.
    pub fn push_f32(&mut self, name: &'static str, init: &[f32]) -> Buf {
        let start = self.f32s.len();
        // Exactly what is asked: grown by doubling, a PE's arena would briefly hold up to twice
        // its buffers while a whole wafer's programs are built.
        self.f32s.reserve_exact(init.len());
        self.f32s.extend_from_slice(init);
        self.add_meta(name, DType::F32, start, init.len())
    }

    /// Adds an `f16` buffer holding `init`; the caller checked capacity.
    pub fn push_f16(&mut self, name: &'static str, init: &[f16]) -> Buf {
        let start = self.f16s.len();
        self.f16s.reserve_exact(init.len());
        self.f16s.extend_from_slice(init);
        self.add_meta(name, DType::F16, start, init.len())
    }

    fn add_meta(&mut self, name: &'static str, dtype: DType, start: usize, len: usize) -> Buf {
        let id = self.buffers.len() as u16;
        let len = len as u32;
        self.buffers.push(BufferMeta {
            name,
            dtype,
            start,
            len,
        });
        self.used_bytes += dtype.bytes() * u64::from(len);
        Buf { id, dtype, len }
    }

    /// The arena index range of `v`, checked against its buffer.
    pub fn range(&self, v: VecRef) -> Result<std::ops::Range<usize>, AccessError> {
        let meta = self
            .buffers
            .get(usize::from(v.buf.id))
            .ok_or(AccessError::NoBuffer(v.buf.id))?;
        let end = u64::from(v.offset) + u64::from(v.len);
        if end > u64::from(meta.len) || meta.dtype != v.buf.dtype {
            return Err(AccessError::OutOfBounds {
                name: meta.name,
                offset: v.offset,
                len: v.len,
                buf_len: meta.len,
            });
        }
        let start = meta.start + v.offset as usize;
        Ok(start..start + v.len as usize)
    }

    /// The buffer's contents widened to `f32`.
    pub fn read(&self, buf: Buf) -> Result<Vec<f32>, AccessError> {
        let range = self.range(buf.all())?;
        Ok(match buf.dtype {
            DType::F32 => self.f32s[range].to_vec(),
            DType::F16 => self.f16s[range].iter().map(|h| h.to_f32()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_account_bytes_by_type_and_read_back() {
        let mut s = Sram::default();
        let a = s.push_f32("a", &[1.0, 2.0, 3.0]);
        let b = s.push_f16("b", &[f16::from_f32(0.5); 5]);
        assert_eq!(s.used_bytes, 3 * 4 + 5 * 2);
        assert_eq!(s.read(a).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(s.read(b).unwrap(), vec![0.5; 5]);
        assert_eq!(s.range(a.slice(1, 2)).unwrap(), 1..3);
    }

    #[test]
    fn out_of_bounds_names_the_buffer() {
        let mut s = Sram::default();
        let a = s.push_f32("psum", &[0.0; 4]);
        let err = s.range(a.slice(3, 2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "elements 3..5 are outside buffer \"psum\" of 4"
        );
    }
}
