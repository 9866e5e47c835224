//! How vectors are stored: float32, float16, or a quantized `tq` tier ([`super::tq`]).
//! Every write rounds a vector to its stored value first ([`Precision::round_in_place`]), so
//! what a later read returns is exactly what was written.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{tq, EngineError};

/// How vectors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    /// `tq12`, `tq8`, `tq6`, `tq4`: this many bits per dimension after a rotation
    /// ([`tq`]).
    Tq(u8),
}

impl Precision {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" => Some(Self::F32),
            "float16" => Some(Self::F16),
            "tq12" => Some(Self::Tq(12)),
            "tq8" => Some(Self::Tq(8)),
            "tq6" => Some(Self::Tq(6)),
            "tq4" => Some(Self::Tq(4)),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Tq(12) => "tq12",
            Self::Tq(8) => "tq8",
            Self::Tq(6) => "tq6",
            Self::Tq(_) => "tq4",
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Tq(12) => 2,
            Self::Tq(8) => 3,
            Self::Tq(6) => 4,
            Self::Tq(_) => 5,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            2 => Some(Self::Tq(12)),
            3 => Some(Self::Tq(8)),
            4 => Some(Self::Tq(6)),
            5 => Some(Self::Tq(4)),
            _ => None,
        }
    }
    /// Bytes one stored vector of `dim` dimensions takes.
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            Self::F32 => 4 * dim,
            Self::F16 => 2 * dim,
            Self::Tq(bits) => tq::row_bytes(dim, bits),
        }
    }
    /// Give `v` (one vector) the value it will have after a store/load round trip
    /// (float16 converts through a small stack buffer, whole slices at a time, with no
    /// allocation).
    pub fn round_in_place(self, v: &mut [f32]) {
        match self {
            Self::F32 => {}
            Self::F16 => {
                let mut h = [f16::ZERO; 64];
                for c in v.chunks_mut(64) {
                    let h = &mut h[..c.len()];
                    h.convert_from_f32_slice(c);
                    h.convert_to_f32_slice(c);
                }
            }
            Self::Tq(bits) => tq::round_in_place(v, bits),
        }
    }
    /// Append the stored form of `v`, rows of `dim` values.
    pub fn encode_into(self, v: &[f32], dim: usize, out: &mut Vec<u8>) {
        out.reserve(v.len() / dim.max(1) * self.row_bytes(dim));
        match self {
            // Little-endian hosts store f32 as it lies in memory: one copy, no per-value work.
            #[cfg(target_endian = "little")]
            Self::F32 => out.extend_from_slice(bytemuck::cast_slice(v)),
            #[cfg(not(target_endian = "little"))]
            Self::F32 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            #[cfg(target_endian = "little")]
            Self::F16 => {
                use half::slice::HalfFloatSliceExt as _;
                out.extend_from_slice(bytemuck::cast_slice(to_f16(v).reinterpret_cast()))
            }
            #[cfg(not(target_endian = "little"))]
            Self::F16 => to_f16(v)
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::Tq(bits) => {
                for row in v.chunks_exact(dim.max(1)) {
                    tq::encode(row, bits, out);
                }
            }
        }
    }
    /// `rows` stored vectors of `dim` values from `raw`.
    pub fn decode(self, raw: &[u8], rows: usize, dim: usize) -> Result<Vec<f32>, EngineError> {
        if Some(raw.len()) != rows.checked_mul(self.row_bytes(dim)) {
            return Err(EngineError::Corrupt(
                "vector data has the wrong length".into(),
            ));
        }
        Ok(match self {
            Self::F32 => {
                let mut out = vec![0f32; rows * dim];
                if cfg!(target_endian = "little") {
                    // The stored form is the in-memory form: one copy.
                    bytemuck::cast_slice_mut::<f32, u8>(&mut out).copy_from_slice(raw);
                } else {
                    for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                out
            }
            Self::F16 => {
                let h: Vec<f16> = raw
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                let mut out = vec![0f32; rows * dim];
                h.convert_to_f32_slice(&mut out);
                out
            }
            Self::Tq(bits) => {
                let mut out = vec![0f32; rows * dim];
                if dim > 0 {
                    for (row, o) in raw
                        .chunks_exact(self.row_bytes(dim))
                        .zip(out.chunks_exact_mut(dim))
                    {
                        tq::decode(row, bits, o).map_err(|e| EngineError::Corrupt(e.into()))?;
                    }
                }
                out
            }
        })
    }
}

impl Precision {
    /// One stored row of `out.len()` values from `raw` (`row_bytes` long), exactly as
    /// [`Precision::decode`] gives it.
    pub fn decode_row(self, raw: &[u8], out: &mut [f32]) -> Result<(), &'static str> {
        if raw.len() != self.row_bytes(out.len()) {
            return Err("vector data has the wrong length");
        }
        match self {
            Self::F32 => {
                for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Self::F16 => {
                // Through a small aligned buffer, whole slices at a time (F16C when present).
                let mut h = [f16::ZERO; 64];
                for (o, c) in out.chunks_mut(64).zip(raw.chunks(128)) {
                    let h = &mut h[..o.len()];
                    for (x, b) in h.iter_mut().zip(c.chunks_exact(2)) {
                        *x = f16::from_le_bytes([b[0], b[1]]);
                    }
                    h.convert_to_f32_slice(o);
                }
            }
            Self::Tq(bits) => tq::decode(raw, bits, out)?,
        }
        Ok(())
    }

    /// One stored row as a block scan reads it: `tq` rows in the rotated domain
    /// ([`tq::decode_rotated`], no transform), others as [`Precision::decode_row`].
    pub fn decode_row_for_scan(self, raw: &[u8], out: &mut [f32]) -> Result<(), &'static str> {
        match self {
            Self::Tq(bits) => tq::decode_rotated(raw, bits, out),
            _ => self.decode_row(raw, out),
        }
    }
}

/// Whole-slice conversion: `half` uses the CPU's F16C instructions eight values at a time
/// when present (detected at run time), where per-value conversion goes one by one.
fn to_f16(v: &[f32]) -> Vec<f16> {
    let mut h = vec![f16::ZERO; v.len()];
    h.convert_from_f32_slice(v);
    h
}
