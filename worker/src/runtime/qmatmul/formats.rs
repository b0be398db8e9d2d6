//! The GGUF block formats the kernels read, and how each is repacked into
//! kandle's one layout: 32-value blocks of small unsigned integers `u` with a
//! scale `d` and an offset `m`, so that a weight is `d * u + m`. Super-block
//! formats (the K-quants) become their 32-value sub-blocks with the super
//! block's scales folded in; Q6_K keeps a scale per 16 values (a block has two
//! `d` and two `m`). Signed formats store `u = q + offset` and `m = -offset * d`.
//!
//! Block layouts are GGUF's (ggml's `block_q4_0` … `block_q6_K`): little-endian
//! f16 scales, packed low/high nibbles, separate high-bit planes.

use half::f16;

/// A GGUF block format with a kandle kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// How repacked values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Two 4-bit values per byte (the layout says which two).
    Nibbles,
    /// One value per byte.
    Bytes,
}

impl Storage {
    pub fn values_per_byte(self) -> usize {
        match self {
            Self::Nibbles => 2,
            Self::Bytes => 1,
        }
    }
}

impl Format {
    pub const ALL: [Self; 8] =
        [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q5_1, Self::Q8_0, Self::Q4_K, Self::Q5_K, Self::Q6_K];

    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match dtype {
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            G::Q4K => Self::Q4_K,
            G::Q5K => Self::Q5_K,
            G::Q6K => Self::Q6_K,
            _ => return None,
        })
    }

    /// Values per GGUF block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
            _ => 32,
        }
    }

    /// Bytes per GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    pub fn storage(self) -> Storage {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q4_K => Storage::Nibbles,
            _ => Storage::Bytes,
        }
    }

    /// Scales per 32-value block: 2 for Q6_K (one per 16 values), else 1.
    pub fn scales_per_block(self) -> usize {
        if self == Self::Q6_K {
            2
        } else {
            1
        }
    }

    /// Repacked values reach 255 (Q8_0's signed bytes plus 128), which an
    /// unsigned × signed byte multiply-add pair can overflow in 16 bits.
    pub fn wide(self) -> bool {
        self == Self::Q8_0
    }
}

/// One 32-value block, decoded.
pub struct Block {
    pub u: [u8; 32],
    /// Scale and offset: one each, or (Q6_K) one per 16 values.
    pub d: [f32; 2],
    pub m: [f32; 2],
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Low nibbles of `qs[..16]` then high nibbles: GGUF's order of a 32-value block.
fn nibbles(qs: &[u8], u: &mut [u8; 32]) {
    for j in 0..16 {
        u[j] = qs[j] & 0x0f;
        u[j + 16] = qs[j] >> 4;
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K / Q5_K super block.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    };
    (f32::from(d), f32::from(m))
}

/// Decodes one GGUF block (`format.block_bytes()` bytes) into its 32-value
/// blocks, appended to `out`.
pub fn decode(format: Format, b: &[u8], out: &mut Vec<Block>) {
    let single = |d: f32, m: f32| Block { u: [0; 32], d: [d; 2], m: [m; 2] };
    match format {
        Format::Q4_0 => {
            let d = f16_at(b, 0);
            let mut blk = single(d, -8.0 * d);
            nibbles(&b[2..18], &mut blk.u);
            out.push(blk);
        }
        Format::Q4_1 => {
            let mut blk = single(f16_at(b, 0), f16_at(b, 2));
            nibbles(&b[4..20], &mut blk.u);
            out.push(blk);
        }
        Format::Q5_0 | Format::Q5_1 => {
            let (mut blk, rest) = if format == Format::Q5_0 {
                let d = f16_at(b, 0);
                (single(d, -16.0 * d), &b[2..])
            } else {
                (single(f16_at(b, 0), f16_at(b, 2)), &b[4..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            nibbles(&rest[4..20], &mut blk.u);
            for (j, u) in blk.u.iter_mut().enumerate() {
                *u |= (((qh >> j) & 1) as u8) << 4;
            }
            out.push(blk);
        }
        Format::Q8_0 => {
            let d = f16_at(b, 0);
            let mut blk = single(d, -128.0 * d);
            for (u, q) in blk.u.iter_mut().zip(&b[2..34]) {
                *u = q ^ 0x80;
            }
            out.push(blk);
        }
        Format::Q4_K | Format::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if format == Format::Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for pair in 0..4 {
                let q = &qs[pair * 32..pair * 32 + 32];
                for half in 0..2 {
                    let sub = 2 * pair + half;
                    let (sc, mn) = scale_min_k4(sub, scales);
                    let mut blk = single(d * sc, -dmin * mn);
                    for l in 0..32 {
                        let nibble = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                        let high = qh.map_or(0, |h| ((h[l] >> sub) & 1) << 4);
                        blk.u[l] = nibble | high;
                    }
                    out.push(blk);
                }
            }
        }
        Format::Q6_K => {
            let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
            // Two halves of 128 values; each is four 32-value blocks.
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[n * 64..n * 64 + 64], &qh[n * 32..n * 32 + 32], &sc[n * 8..n * 8 + 8]);
                for part in 0..4 {
                    let scale = |i: usize| d * f32::from(sc[i] as i8);
                    let (lo, hi) = (scale(2 * part), scale(2 * part + 1));
                    let mut blk = Block { u: [0; 32], d: [lo, hi], m: [-32.0 * lo, -32.0 * hi] };
                    for l in 0..32 {
                        let low = match part {
                            0 => ql[l] & 0x0f,
                            1 => ql[l + 32] & 0x0f,
                            2 => ql[l] >> 4,
                            _ => ql[l + 32] >> 4,
                        };
                        blk.u[l] = low | (((qh[l] >> (2 * part)) & 3) << 4);
                    }
                    out.push(blk);
                }
            }
        }
    }
}
