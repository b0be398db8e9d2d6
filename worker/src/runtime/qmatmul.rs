//! A matrix-matrix kernel for GGUF Q4_1 and Q8_0 weights: each weight block is
//! loaded once and used for every row of the step (a batch of decode tokens,
//! or a prefill chunk), instead of once per row as a matrix-vector product would.
//!
//! Q4_1 stores 32 weights per block as `d * q + m` with 4-bit unsigned `q`;
//! Q8_0 as `d * q` with 8-bit signed `q`. Activations are quantized per
//! 32-value block to 8 bits (`x ≈ da * qa`, with `sa = da * Σ qa`), so a
//! block's dot product is `dw * da * Σ q·qa (+ mw * sa)`: an integer dot
//! product and one or two scalings.
//!
//! Weights are repacked once at load into separate arrays of scales, minimums
//! and nibbles. The integer dot product has a scalar reference and an AVX2
//! variant chosen at start-up by CPU feature detection; both are tested
//! against each other and the whole kernel against dequantize + f32 matmul.

use half::f16;
use rayon::prelude::*;

pub const BLOCK: usize = 32;

/// The GGUF block formats the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f16 d, f16 m, 16 bytes of nibbles.
    Q4_1,
    /// f16 d, 32 signed bytes.
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Which implementation of the block dot product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Scalar,
    Avx2,
}

impl Level {
    /// The best level this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Every level this CPU can run (for tests).
    pub fn available() -> Vec<Self> {
        let mut levels = vec![Self::Scalar];
        if Self::detect() == Self::Avx2 {
            levels.push(Self::Avx2);
        }
        levels
    }
}

/// A `[n, k]` quantized weight matrix, repacked.
pub struct PackedWeights {
    n: usize,
    k: usize,
    format: Format,
    /// Per block (row-major over `[n, k / 32]`): scale, and minimum (Q4_1 only).
    d: Vec<f32>,
    m: Vec<f32>,
    /// Per block: 32 values, one per byte, in element order (Q4_1: unsigned
    /// 0..15; Q8_0: the bits of signed bytes).
    q: Vec<u8>,
    level: Level,
}

/// Activations of `rows` rows quantized per block.
struct Quantized {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl PackedWeights {
    /// From GGUF bytes of an `[n, k]` matrix (`k` a multiple of 32).
    pub fn from_gguf(bytes: &[u8], n: usize, k: usize, format: Format, level: Level) -> Option<Self> {
        let blocks = n * k / BLOCK;
        if !k.is_multiple_of(BLOCK) || bytes.len() != blocks * format.block_bytes() {
            return None;
        }
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::new();
        let mut q = Vec::with_capacity(blocks * BLOCK);
        for block in bytes.chunks_exact(format.block_bytes()) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            match format {
                Format::Q4_1 => {
                    m.push(f16::from_le_bytes([block[2], block[3]]).to_f32());
                    let nibbles = &block[4..];
                    // Element j is the low nibble of byte j, element j + 16 its high nibble.
                    q.extend(nibbles.iter().map(|b| b & 0x0f));
                    q.extend(nibbles.iter().map(|b| b >> 4));
                }
                Format::Q8_0 => q.extend_from_slice(&block[2..]),
            }
        }
        Some(Self { n, k, format, d, m, q, level })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `x` (`[rows, k]`, row-major) times the transposed weights: `[rows, n]`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let nb = k / BLOCK;
        let a = quantize_rows(x, rows, k);
        let mut out = vec![0f32; rows * n];
        // Columns in parallel; each weight block is loaded once for all rows.
        const COLUMNS: usize = 16;
        let mut transposed = vec![0f32; n * rows];
        transposed.par_chunks_mut(COLUMNS * rows).enumerate().for_each(|(chunk, dst)| {
            for (c, col_out) in dst.chunks_mut(rows).enumerate() {
                let w = (chunk * COLUMNS + c) * nb;
                let column =
                    Column { q: &self.q[w * BLOCK..(w + nb) * BLOCK], d: &self.d[w..w + nb], m: self.m.get(w..w + nb) };
                match (self.level, self.format) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Level::Avx2 is only chosen (detect) or offered
                    // (available) when the CPU reports AVX2 and FMA.
                    (Level::Avx2, Format::Q4_1) => unsafe { avx2::column::<false>(&column, &a, nb, col_out) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    (Level::Avx2, Format::Q8_0) => unsafe { avx2::column::<true>(&column, &a, nb, col_out) },
                    _ => column_scalar(&column, self.format, &a, nb, col_out),
                }
            }
        });
        for (col, values) in transposed.chunks(rows).enumerate() {
            for (row, v) in values.iter().enumerate() {
                out[row * n + col] = *v;
            }
        }
        out
    }
}

/// One weight row (an output column): its blocks' values, scales and minimums.
struct Column<'a> {
    q: &'a [u8],
    d: &'a [f32],
    /// Q4_1 only.
    m: Option<&'a [f32]>,
}

/// The reference every SIMD variant is tested against: one output column for
/// every activation row.
fn column_scalar(w: &Column<'_>, format: Format, a: &Quantized, nb: usize, out: &mut [f32]) {
    for (row, o) in out.iter_mut().enumerate() {
        let mut sum = 0f32;
        for b in 0..nb {
            let ab = row * nb + b;
            let (wq, aq) = (&w.q[b * BLOCK..(b + 1) * BLOCK], &a.q[ab * BLOCK..(ab + 1) * BLOCK]);
            let dot = match format {
                Format::Q4_1 => block_dot_scalar(wq, aq),
                Format::Q8_0 => wq.iter().zip(aq).map(|(w, a)| i32::from(*w as i8) * i32::from(*a)).sum(),
            };
            sum += w.d[b] * a.d[ab] * dot as f32 + w.m.map_or(0.0, |m| m[b] * a.s[ab]);
        }
        *o = sum;
    }
}

/// Quantizes each 32-value block of each row to 8 bits.
fn quantize_rows(x: &[f32], rows: usize, k: usize) -> Quantized {
    let blocks = rows * k / BLOCK;
    let mut out = Quantized { q: vec![0; rows * k], d: vec![0.0; blocks], s: vec![0.0; blocks] };
    for (b, (xs, qs)) in x.chunks_exact(BLOCK).zip(out.q.chunks_exact_mut(BLOCK)).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            sum += i32::from(*q);
        }
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
    out
}

/// `Σ w·a` over one block: `w` unsigned 4-bit values (one per byte), `a` signed 8-bit.
pub fn block_dot_scalar(w: &[u8], a: &[i8]) -> i32 {
    w.iter().zip(a).map(|(w, a)| i32::from(*w) * i32::from(*a)).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Column, Quantized, BLOCK};

    /// One output column for every activation row; each weight block is loaded
    /// once and multiplied with the block of every row. `SIGNED`: Q8_0 weights
    /// (signed bytes), else Q4_1 (unsigned nibbles and a minimum).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn column<const SIGNED: bool>(w: &Column<'_>, a: &Quantized, nb: usize, out: &mut [f32]) {
        /// Rows whose accumulators stay in registers while a weight block is reused.
        const TILE: usize = 8;
        let ones = _mm256_set1_epi16(1);
        for (tile, outs) in out.chunks_mut(TILE).enumerate() {
            let first = tile * TILE;
            let mut acc = [_mm256_setzero_ps(); TILE];
            let mut minimums = [0f32; TILE];
            for b in 0..nb {
                let wq = &w.q[b * BLOCK..(b + 1) * BLOCK];
                // SAFETY: `wq` holds exactly 32 bytes; unaligned loads need no alignment.
                let wv = unsafe { _mm256_loadu_si256(wq.as_ptr().cast()) };
                for r in 0..outs.len() {
                    let ab = (first + r) * nb + b;
                    let aq = &a.q[ab * BLOCK..(ab + 1) * BLOCK];
                    // SAFETY: `aq` holds exactly 32 bytes.
                    let av = unsafe { _mm256_loadu_si256(aq.as_ptr().cast()) };
                    // u8 × i8 pairs summed to i16, then pairs of i16 to i32,
                    // then scaled in f32. Signed weights: |w| × (a with w's sign);
                    // at most 2 · 127 · 127 (or 2 · 15 · 127): no saturation.
                    let pairs = if SIGNED {
                        _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv))
                    } else {
                        _mm256_maddubs_epi16(wv, av)
                    };
                    let dots = _mm256_madd_epi16(pairs, ones);
                    let scale = _mm256_set1_ps(w.d[b] * a.d[ab]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
                    if let Some(m) = w.m {
                        minimums[r] += m[b] * a.s[ab];
                    }
                }
            }
            for (r, o) in outs.iter_mut().enumerate() {
                let v = acc[r];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
                *o = _mm_cvtss_f32(s) + minimums[r];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random GGUF bytes for an `[n, k]` matrix, with their dequantized values.
    fn random_weights(format: Format, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        let mut values = Vec::new();
        for _ in 0..n * k / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 50_000.0 + 1e-4);
            bytes.extend(d.to_le_bytes());
            let mut block = [0f32; BLOCK];
            match format {
                Format::Q4_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) / 20_000.0);
                    bytes.extend(m.to_le_bytes());
                    let nibbles: Vec<u8> = (0..16).map(|_| (next() % 256) as u8).collect();
                    for (j, b) in nibbles.iter().enumerate() {
                        block[j] = d.to_f32() * f32::from(b & 0x0f) + m.to_f32();
                        block[j + 16] = d.to_f32() * f32::from(b >> 4) + m.to_f32();
                    }
                    bytes.extend(nibbles);
                }
                Format::Q8_0 => {
                    for v in block.iter_mut() {
                        let q = (next() % 255) as i32 - 127;
                        *v = d.to_f32() * q as f32;
                        bytes.push(q as i8 as u8);
                    }
                }
            }
            values.extend(block);
        }
        (bytes, values)
    }

    #[test]
    fn block_dot_reference() {
        let w: Vec<u8> = (0..32).map(|i| (i * 7 % 16) as u8).collect();
        let a: Vec<i8> = (0..32).map(|i| ((i * 37) % 255) as i8).collect();
        let want: i32 = (0..32).map(|i| i32::from(w[i]) * i32::from(a[i])).sum();
        assert_eq!(block_dot_scalar(&w, &a), want);
        assert_eq!(block_dot_scalar(&[15; 32], &[-127; 32]), 15 * -127 * 32);
    }

    /// Against dequantize + f32 matmul, on odd shapes (576, 1536: not multiples
    /// of 256) and row counts, at every level. The tolerance is the 8-bit
    /// quantization of the activations: 1% of the output's scale.
    #[test]
    fn matmul_matches_dequantized_f32_reference() {
        let shapes = [(576, 576, 1), (1536, 576, 7), (576, 1536, 3), (40, 64, 5), (24, 96, 9)];
        for (format, (n, k, rows)) in [Format::Q4_1, Format::Q8_0].into_iter().flat_map(|f| shapes.map(|s| (f, s))) {
            let (bytes, w) = random_weights(format, n, k, (n * k + rows) as u64);
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 2003) as f32 / 1000.0) - 1.0).collect();
            let mut want = vec![0f32; rows * n];
            for r in 0..rows {
                for c in 0..n {
                    want[r * n + c] = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                }
            }
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let mut outputs = Vec::new();
            for level in Level::available() {
                let packed = PackedWeights::from_gguf(&bytes, n, k, format, level).expect("packs");
                let got = packed.matmul(&x, rows);
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err / scale < 0.01, "{format:?} {level:?} {n}x{k} rows {rows}: {err} of {scale}");
                outputs.push(got);
            }
            // The same integers at every level; only the f32 sums' order differs.
            for other in &outputs[1..] {
                let diff = other.iter().zip(&outputs[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff / scale < 1e-5, "levels differ by {diff}");
            }
        }
    }

    #[test]
    fn refuses_bytes_of_the_wrong_size() {
        assert!(PackedWeights::from_gguf(&[0; 19], 1, 32, Format::Q4_1, Level::Scalar).is_none());
        assert!(PackedWeights::from_gguf(&[0; 20], 1, 30, Format::Q4_1, Level::Scalar).is_none());
        assert!(PackedWeights::from_gguf(&[0; 20], 1, 32, Format::Q8_0, Level::Scalar).is_none());
    }
}
