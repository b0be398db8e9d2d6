//! Every format at every level against the same reference: candle's own
//! dequantization of the GGUF bytes, then an f32 matmul.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;

use super::*;

fn ggml(format: Format) -> GgmlDType {
    match format {
        Format::Q4_0 => GgmlDType::Q4_0,
        Format::Q4_1 => GgmlDType::Q4_1,
        Format::Q5_0 => GgmlDType::Q5_0,
        Format::Q5_1 => GgmlDType::Q5_1,
        Format::Q8_0 => GgmlDType::Q8_0,
        Format::Q4_K => GgmlDType::Q4K,
        Format::Q5_K => GgmlDType::Q5K,
        Format::Q6_K => GgmlDType::Q6K,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// Random GGUF bytes for an `[n, k]` matrix: random quantized values, and
/// scales small and finite (as a quantizer writes them).
fn random_gguf(format: Format, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut bytes = Vec::new();
    for _ in 0..n * k / format.block_values() {
        let mut block: Vec<u8> = (0..format.block_bytes()).map(|_| rng.next() as u8).collect();
        let mut put = |at: usize, v: f32| block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        let scale = (rng.next() % 1000) as f32 / 50_000.0 + 1e-4;
        let minimum = (rng.next() % 1000) as f32 / 20_000.0;
        match format {
            Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => put(0, scale),
            Format::Q4_1 | Format::Q5_1 => {
                put(0, scale);
                put(2, -minimum);
            }
            Format::Q4_K | Format::Q5_K => {
                put(0, scale / 16.0);
                put(2, minimum / 16.0);
            }
            Format::Q6_K => put(208, scale / 64.0),
        }
        bytes.extend(block);
    }
    bytes
}

fn dequantized(format: Format, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
    let t = qtensor_from_ggml(ggml(format), bytes, vec![n, k], &Device::Cpu).expect("qtensor");
    t.dequantize(&Device::Cpu).expect("dequantize").flatten_all().expect("flat").to_vec1().expect("vec")
}

#[test]
fn repacking_keeps_every_value_of_every_format() {
    for format in Format::ALL {
        let k = format.block_values() * 2;
        let bytes = random_gguf(format, 3, k, 7 + format as u64);
        let want = dequantized(format, &bytes, 3, k);
        let mut blocks = Vec::new();
        for b in bytes.chunks_exact(format.block_bytes()) {
            formats::decode(format, b, &mut blocks);
        }
        let got: Vec<f32> =
            blocks.iter().flat_map(|b| (0..BLOCK).map(|j| b.d[j / 16] * f32::from(b.u[j]) + b.m[j / 16])).collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{format:?} value {i}: {g} vs {w}");
        }
        let limit = if format.storage() == formats::Storage::Nibbles { 16 } else { 256 };
        assert!(blocks.iter().all(|b| b.u.iter().all(|u| usize::from(*u) < limit)));
    }
}

/// Against dequantize + f32 matmul on odd shapes (576, 1536 are not multiples
/// of 256; K-quants need inner sizes that are; column counts that leave a
/// group part empty) and row counts that exercise every tile shape and cross
/// a row chunk, at every level the CPU runs, each packing the bytes its way. Tolerance: the 8-bit
/// quantization of the activations, 1% of the output's scale. Levels agree
/// with the scalar reference to float rounding (the integers are the same).
#[test]
fn every_format_at_every_level_matches_the_dequantized_reference() {
    for format in Format::ALL {
        let shapes: &[(usize, usize, usize)] = if format.block_values() == 256 {
            &[(576, 1536, 1), (1536, 768, 6), (40, 256, 9), (7, 512, 2), (9, 256, 67)]
        } else {
            &[(576, 576, 1), (1536, 576, 7), (576, 1536, 3), (40, 64, 5), (23, 96, 9), (5, 32, 33), (9, 64, 70)]
        };
        for &(n, k, rows) in shapes {
            matches_the_reference(format, &random_gguf(format, n, k, (n * k + rows) as u64), n, k, rows);
        }
    }
}

/// Q8_0 scales above 511.75 make offsets (-128 d) no f16 holds: those
/// matrices keep f32 scales, a kernel instance of their own at each level.
#[test]
fn q8_0_with_scales_past_f16_offsets_matches_the_reference() {
    let (n, k, rows) = (13, 96, 5);
    let mut bytes = random_gguf(Format::Q8_0, n, k, 5);
    for block in bytes.chunks_exact_mut(Format::Q8_0.block_bytes()) {
        block[..2].copy_from_slice(&f16::from_f32(1000.0).to_le_bytes());
    }
    let packed = PackedWeights::from_gguf(&bytes, n, k, Format::Q8_0, Level::SCALAR).expect("packs");
    assert!(matches!(packed.scales, Scales::Full { .. }));
    matches_the_reference(Format::Q8_0, &bytes, n, k, rows);
}

/// `rows` rows times the `[n, k]` matrix of `bytes` at every level against
/// dequantize + f32 matmul, and every level against the first (scalar).
fn matches_the_reference(format: Format, bytes: &[u8], n: usize, k: usize, rows: usize) {
    let w = dequantized(format, bytes, n, k);
    let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 2003) as f32 / 1000.0) - 1.0).collect();
    let mut want = vec![0f32; rows * n];
    for r in 0..rows {
        for c in 0..n {
            want[r * n + c] = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
        }
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut a = Activations::new();
    a.quantize(Level::SCALAR, &x, rows, k);
    let mut reference = None;
    for level in Level::available() {
        let packed = PackedWeights::from_gguf(bytes, n, k, format, level).expect("packs");
        let got = multiply(&packed, &a, rows, n);
        let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert!(err / scale < 0.01, "{format:?} {level:?} {n}x{k} rows {rows}: {err} of {scale}");
        let reference = reference.get_or_insert(got.clone());
        let diff = got.iter().zip(reference.iter()).map(|(g, r)| (g - r).abs()).fold(0f32, f32::max);
        assert!(diff / scale < 1e-5, "{format:?} {level:?} {n}x{k} rows {rows}: {diff} from scalar");
    }
}

/// Column ranges split anywhere, stored or added, land in the right places,
/// at every level (each layout pads its own way).
#[test]
fn column_ranges_and_accumulation_write_their_own_elements() {
    for level in Level::available() {
        column_ranges_at(level);
    }
}

fn column_ranges_at(level: Level) {
    let (n, k, rows) = (13, 64, 5);
    let bytes = random_gguf(Format::Q4_1, n, k, 3);
    let packed = PackedWeights::from_gguf(&bytes, n, k, Format::Q4_1, level).expect("packs");
    let x: Vec<f32> = (0..rows * k).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    let mut a = Activations::new();
    a.quantize(Level::SCALAR, &x, rows, k);
    let whole = multiply(&packed, &a, rows, n);
    // Into columns 2.. of a wider output that already holds ones, adding.
    let stride = n + 3;
    let mut out = Shared::new();
    out.resize(rows * stride);
    out.as_mut_slice().fill(1.0);
    let output = Output { data: &out, stride, offset: 2, add: true };
    for cols in [0..5, 5..6, 6..13] {
        // SAFETY: one thread.
        unsafe { packed.matmul(&a, cols, &output) };
    }
    let got = out.as_slice();
    for r in 0..rows {
        for c in 0..stride {
            let want = if (2..2 + n).contains(&c) { whole[r * n + c - 2] + 1.0 } else { 1.0 };
            assert!((got[r * stride + c] - want).abs() < 1e-5, "{level:?} ({r}, {c})");
        }
    }
}

/// An embedding lookup reads every format's row back as the dequantized
/// matrix has it, in every layout.
#[test]
fn rows_dequantize_as_the_reference_at_every_level() {
    for format in Format::ALL {
        let (n, k) = (11, format.block_values() * 2);
        let bytes = random_gguf(format, n, k, 11 + format as u64);
        let want = dequantized(format, &bytes, n, k);
        for level in Level::available() {
            let packed = PackedWeights::from_gguf(&bytes, n, k, format, level).expect("packs");
            let mut row = vec![0f32; k];
            for r in 0..n {
                packed.dequantize_row(r, &mut row);
                for (i, (g, w)) in row.iter().zip(&want[r * k..(r + 1) * k]).enumerate() {
                    assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{format:?} {level:?} ({r}, {i}): {g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn refuses_bytes_that_are_not_the_matrix() {
    assert!(PackedWeights::from_gguf(&[0; 19], 1, 32, Format::Q4_1, Level::SCALAR).is_none());
    assert!(PackedWeights::from_gguf(&[0; 20], 1, 30, Format::Q4_1, Level::SCALAR).is_none());
    assert!(PackedWeights::from_gguf(&[0; 20], 1, 32, Format::Q8_0, Level::SCALAR).is_none());
    assert!(PackedWeights::from_gguf(&[0; 144], 1, 128, Format::Q4_K, Level::SCALAR).is_none());
}

/// The whole product on one thread.
fn multiply(w: &PackedWeights, a: &Activations, rows: usize, n: usize) -> Vec<f32> {
    let mut out = Shared::new();
    out.resize(rows * n);
    let output = Output { data: &out, stride: n, offset: 0, add: false };
    // SAFETY: one thread.
    unsafe { w.matmul(a, 0..n, &output) };
    out.as_slice().to_vec()
}
