//! The layout and kernels of every x86 level (AVX2 and up): eight columns
//! side by side in every vector, so one load of weights feeds eight columns
//! and a tile's sums never need a horizontal reduction.
//!
//! Layout. Columns go in groups of [`LANES`]; for each group and 32-value
//! block the values sit in 32-byte chunks, column `c` at bytes `4c..4c + 4`:
//! with one value per byte ([`Storage::Bytes`]) chunk `i` of 8 holds values
//! `4i..4i + 4`; with nibbles, chunk `i` of 4 holds values `4i..4i + 4` in the
//! low nibbles and `16 + 4i..16 + 4i + 4` in the high ones. Four activation
//! values broadcast to every lane then meet a chunk in one `vpmaddubsw`: i16
//! lanes `2c` and `2c + 1` hold column `c`'s two pair sums, and `vpmaddwd`
//! against ones leaves column `c`'s four-value dot product in i32 lane `c`.
//! Q8_0 is stored as its signed bytes (no offset) and multiplied as
//! `|w| × (a with w's sign)`.
//!
//! Pair sums are added in 16 bits for as many chunks as cannot overflow (each
//! is at most `2 · max(u) · 127`: eight for nibbles, four for 5-bit values,
//! two for 6-bit, one for Q8_0), then widened. Scales per group and block: for
//! f16 pairs, entry `e` holds column [`ENTRY_COLUMN`]`[e]`, the order in which
//! two `vcvtph2ps` and two `vshufps` give the eight scales and the eight
//! offsets in column order; f32 scales and offsets are in column order (Q6_K:
//! the eight of the first half block, then the eight of the second).

use std::ops::Range;

use super::formats::Storage;
#[cfg(target_arch = "x86_64")]
use super::Isa;
use super::{ActivationView, Format, Output, PackedWeights, BLOCK};

/// Columns side by side in a vector.
pub const LANES: usize = 8;

/// The column whose f16 scale pair is entry `e` of a group's eight (an involution).
pub const ENTRY_COLUMN: [usize; LANES] = [0, 1, 4, 5, 2, 3, 6, 7];

/// Bytes of one group's block of values.
pub fn group_block_bytes(storage: Storage) -> usize {
    match storage {
        Storage::Nibbles => LANES * BLOCK / 2,
        Storage::Bytes => LANES * BLOCK,
    }
}

/// Where value `j` of block `b` of column `col` is stored: the byte, and
/// whether it is that byte's high nibble.
pub fn value_at(storage: Storage, nb: usize, col: usize, b: usize, j: usize) -> (usize, bool) {
    let base = ((col / LANES) * nb + b) * group_block_bytes(storage);
    let c = col % LANES;
    match storage {
        Storage::Nibbles => (base + 32 * ((j % 16) / 4) + 4 * c + j % 4, j >= 16),
        Storage::Bytes => (base + 32 * (j / 4) + 4 * c + j % 4, false),
    }
}

/// The index of scale `h` (of `spb` per block) of block `b` of column `col`,
/// with f16 pairs (`half`) or f32 scales.
pub fn scale_at(half: bool, spb: usize, nb: usize, col: usize, b: usize, h: usize) -> usize {
    let at = (col / LANES) * nb + b;
    if half {
        at * LANES + ENTRY_COLUMN[col % LANES]
    } else {
        (at * spb + h) * LANES + col % LANES
    }
}

/// Stores `u` of a decoded block as the layout wants it: Q8_0 back to its
/// signed byte (its offset is not used), everything else as is.
pub fn stored(format: Format, u: u8) -> u8 {
    if format.wide() {
        u ^ 0x80
    } else {
        u
    }
}

/// Columns `cols` of `a × Wᵀ` (`rows` rows) into `out`, with the kernel of
/// the weights' level.
///
/// # Safety
/// The CPU has the weights' level's features (AVX2, FMA and F16C at least);
/// no other thread reads or writes the output elements of these columns, nor
/// writes the activations, during the call; the output holds every row (the
/// caller checks it).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn matmul(
    w: &PackedWeights,
    a: &ActivationView<'_>,
    rows: usize,
    cols: Range<usize>,
    out: &Output<'_>,
) {
    if cols.is_empty() {
        return;
    }
    // SAFETY: the caller's CPU has the level's features; the rest is the caller's.
    unsafe {
        match w.level.isa() {
            Isa::AvxVnni => avx_vnni::matmul(w, a, rows, cols, out),
            Isa::Avx512Vnni => avx512_vnni::matmul(w, a, rows, cols, out),
            Isa::Avx512 => avx512::matmul(w, a, rows, cols, out),
            Isa::Avx2 | Isa::Scalar => avx2::matmul(w, a, rows, cols, out),
        }
    }
}

/// Writes (or adds) lanes `lanes` of a finished tile of rows `row..row + R`, group `group`.
///
/// # Safety
/// No other thread touches these output elements.
#[cfg(target_arch = "x86_64")]
unsafe fn store<const R: usize>(
    tile: &[[f32; LANES]; R],
    row: usize,
    group: usize,
    lanes: Range<usize>,
    out: &Output<'_>,
) {
    for (r, values) in tile.iter().enumerate() {
        let at = (row + r) * out.stride + out.offset + group * LANES;
        // SAFETY: the caller gives this thread these columns of these rows.
        let dst = unsafe { out.data.get_mut(at + lanes.start..at + lanes.end) };
        let values = &values[lanes.clone()];
        if out.add {
            dst.iter_mut().zip(values).for_each(|(d, v)| *d += v);
        } else {
            dst.copy_from_slice(values);
        }
    }
}

/// The kernel, instantiated per level with the level's CPU features enabled
/// (so its intrinsics inline). Levels differ in how a chunk of weights meets
/// four activation bytes per column: `maddubs` (`vpmaddubsw` pair sums in 16
/// bits, widened every `SPAN` chunks by `vpmaddwd`) or `dpbusd` (VNNI's
/// `vpdpbusd`: four products straight into 32-bit sums, nothing to widen).
#[cfg(target_arch = "x86_64")]
macro_rules! lanes_kernel {
    (direct: $direct:literal, |$sum:ident, $w:ident, $a:ident| $add:expr, $features:literal) => {
        /// Whether `chunk` adds to 32-bit sums (else to 16-bit pair sums,
        /// which the caller widens every `SPAN` chunks).
        const DIRECT: bool = $direct;

        /// Adds one chunk for `R` rows: weights `wv` times the four
        /// activation bytes at `acts` (row `r`'s at `acts + r * stride`)
        /// broadcast to every lane.
        ///
        /// # Safety
        /// The CPU has the module's features; four bytes are readable at each row's `acts`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn chunk<const R: usize, const WIDE: bool>(
            wv: __m256i,
            acts: *const i8,
            stride: usize,
            sums: &mut [__m256i; R],
        ) {
            let wu = if WIDE { _mm256_sign_epi8(wv, wv) } else { wv };
            for (r, sum) in sums.iter_mut().enumerate() {
                // SAFETY: the caller's.
                let av = _mm256_set1_epi32(unsafe { acts.add(r * stride).cast::<i32>().read_unaligned() });
                let av = if WIDE { _mm256_sign_epi8(av, wv) } else { av };
                let ($sum, $w, $a) = (*sum, wu, av);
                *sum = $add;
            }
        }

        lanes_kernel!(@body $features);
    };
    (@body $features:literal) => {
        /// Columns `cols` of `rows` rows, in the instance the format needs.
        ///
        /// # Safety
        /// As for [`super::matmul`], with the module's features.
        pub(super) unsafe fn matmul(
            w: &PackedWeights,
            a: &ActivationView<'_>,
            rows: usize,
            cols: Range<usize>,
            out: &Output<'_>,
        ) {
            let half = matches!(w.scales, Scales::Half(_));
            // SAFETY: the caller's; the flags are the format's (nibble values
            // below 16, 5-bit below 32, Q6_K's below 64 with two f32 scales,
            // Q8_0 signed), which is what each instance assumes.
            unsafe {
                match (w.format, half) {
                    (Format::Q4_0 | Format::Q4_1 | Format::Q4_K, true) => {
                        columns::<true, 8, false, false, true>(w, a, rows, cols, out)
                    }
                    (Format::Q4_0 | Format::Q4_1 | Format::Q4_K, false) => {
                        columns::<true, 8, false, false, false>(w, a, rows, cols, out)
                    }
                    (Format::Q5_0 | Format::Q5_1 | Format::Q5_K, true) => {
                        columns::<false, 4, false, false, true>(w, a, rows, cols, out)
                    }
                    (Format::Q5_0 | Format::Q5_1 | Format::Q5_K, false) => {
                        columns::<false, 4, false, false, false>(w, a, rows, cols, out)
                    }
                    (Format::Q8_0, true) => columns::<false, 1, false, true, true>(w, a, rows, cols, out),
                    (Format::Q8_0, false) => columns::<false, 1, false, true, false>(w, a, rows, cols, out),
                    (Format::Q6_K, _) => columns::<false, 2, true, false, false>(w, a, rows, cols, out),
                }
            }
        }
        /// Columns `cols` of `rows` rows, with the format's flags (see [`tile`]).
        ///
        /// # Safety
        /// As for [`super::matmul`]; the flags are the weights' format's.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn columns<
            const NIBBLES: bool,
            const SPAN: usize,
            const PAIR: bool,
            const WIDE: bool,
            const HALF: bool,
        >(
            w: &PackedWeights,
            a: &ActivationView<'_>,
            rows: usize,
            cols: Range<usize>,
            out: &Output<'_>,
        ) {
            // Rows in chunks whose activations stay in L2 while each group's
            // weights (a few KiB) stay in L1 for every row tile of the chunk.
            const ROW_CHUNK: usize = 64;
            let (nb, spb) = (w.nb, if PAIR { 2 } else { 1 });
            let groups = cols.start / LANES..cols.end.div_ceil(LANES);
            // Every block the tiles below read, checked once.
            let bytes = group_block_bytes(if NIBBLES { Storage::Nibbles } else { Storage::Bytes });
            assert!(groups.end * nb * bytes <= w.q.len(), "columns {cols:?} outside the weights");
            let scales = match &w.scales {
                Scales::Half(dm) => HALF.then_some(dm.len()),
                Scales::Full { d, m } => (!HALF).then_some(d.len().min(m.len()) / spb),
            };
            assert!(scales.is_some_and(|len| groups.end * nb * LANES <= len), "the scales are not the kernel's");
            assert!(
                rows * nb <= a.d.len() && a.q.len() == a.d.len() * BLOCK && a.s.len() == 8 * a.d.len(),
                "rows outside the activations"
            );
            for chunk in (0..rows).step_by(ROW_CHUNK) {
                let chunk_end = (chunk + ROW_CHUNK).min(rows);
                for group in groups.clone() {
                    let lanes =
                        cols.start.max(group * LANES) - group * LANES..cols.end.min((group + 1) * LANES) - group * LANES;
                    let mut row = chunk;
                    while row < chunk_end {
                        // Nibbles leave registers for four rows; the byte formats'
                        // wider sums for two.
                        macro_rules! rows {
                            ($r:literal) => {{
                                let mut t = [[0f32; LANES]; $r];
                                // SAFETY: the group and rows `row..row + R` are inside
                                // what was checked above; the output is the caller's.
                                unsafe {
                                    tile::<$r, NIBBLES, SPAN, PAIR, WIDE, HALF>(w, a, row, group, &mut t);
                                    store(&t, row, group, lanes.clone(), out);
                                }
                                $r
                            }};
                        }
                        row += match (chunk_end - row, NIBBLES) {
                            (1, _) => rows!(1),
                            (2, _) | (_, false) => rows!(2),
                            (3, true) => rows!(3),
                            _ => rows!(4),
                        };
                    }
                }
            }
        }

        /// `R` rows of one group: `out[r][c]` is row `row + r` times column
        /// `group * 8 + c`. `NIBBLES`: 4-bit storage; `SPAN`: chunks summed in
        /// 16 bits before widening where the chunks are not `DIRECT` (a divisor
        /// of 4, or 8 without `PAIR`);
        /// `PAIR`: two f32 scales per block (Q6_K); `WIDE`: Q8_0's signed bytes,
        /// no offsets; `HALF`: f16 scale pairs.
        ///
        /// # Safety
        /// The CPU has AVX2, FMA and F16C; the flags are the weights' format's;
        /// the group's blocks and scales and rows `row..row + R` are inside the
        /// weights and activations (which [`columns`] checks once for all its tiles).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile<
            const R: usize,
            const NIBBLES: bool,
            const SPAN: usize,
            const PAIR: bool,
            const WIDE: bool,
            const HALF: bool,
        >(
            w: &PackedWeights,
            a: &ActivationView<'_>,
            row: usize,
            group: usize,
            out: &mut [[f32; LANES]; R],
        ) {
            let nb = w.nb;
            let bytes = group_block_bytes(if NIBBLES { Storage::Nibbles } else { Storage::Bytes });
            let (pairs, d, m) = match &w.scales {
                Scales::Half(dm) => (dm.as_ptr().cast::<u8>(), std::ptr::null(), std::ptr::null()),
                Scales::Full { d, m } => (std::ptr::null(), d.as_ptr(), m.as_ptr()),
            };
            let (wq, aq, ad, asums) = (w.q.as_ptr(), a.q.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
            let ones = _mm256_set1_epi16(1);
            let low = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let at = group * nb + b;
                // SAFETY (every access below): block `at` of the group is inside
                // the weights and the scales, and block `b` of rows
                // `row..row + R` inside the activations (the caller's).
                let chunks = unsafe { wq.add(at * bytes) };
                let acts = unsafe { aq.add((row * nb + b) * BLOCK) };
                let mut sums16 = [_mm256_setzero_si256(); R];
                // Widened sums: of the block, or (PAIR) of its first and second half.
                let mut first = [_mm256_setzero_si256(); R];
                let mut second = [_mm256_setzero_si256(); R];
                if NIBBLES {
                    let target = if DIRECT { &mut first } else { &mut sums16 };
                    for i in 0..4 {
                        let v = unsafe { _mm256_loadu_si256(chunks.add(32 * i).cast()) };
                        let lo = _mm256_and_si256(v, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        // SAFETY: chunks `i` and `i + 4` of the rows' blocks.
                        unsafe {
                            chunk::<R, false>(lo, acts.add(4 * i), nb * BLOCK, target);
                            chunk::<R, false>(hi, acts.add(4 * (i + 4)), nb * BLOCK, target);
                        }
                    }
                    if !DIRECT {
                        for r in 0..R {
                            first[r] = _mm256_madd_epi16(sums16[r], ones);
                        }
                    }
                } else {
                    for g in 0..8 {
                        let target = match (DIRECT, PAIR && g >= 4) {
                            (true, true) => &mut second,
                            (true, false) => &mut first,
                            (false, _) => &mut sums16,
                        };
                        // SAFETY: chunk `g` of the group's block and of the rows' blocks.
                        unsafe {
                            let v = _mm256_loadu_si256(chunks.add(32 * g).cast());
                            chunk::<R, WIDE>(v, acts.add(4 * g), nb * BLOCK, target);
                        }
                        if !DIRECT && (g + 1) % SPAN == 0 {
                            for r in 0..R {
                                let widened = _mm256_madd_epi16(sums16[r], ones);
                                if PAIR && g >= 4 {
                                    second[r] = _mm256_add_epi32(second[r], widened);
                                } else {
                                    first[r] = _mm256_add_epi32(first[r], widened);
                                }
                                sums16[r] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
                // The group's eight scales and offsets (two sets for PAIR).
                let (d0, m0, d1, m1) = unsafe {
                    if HALF {
                        let x = _mm256_cvtph_ps(_mm_loadu_si128(pairs.add(at * LANES * 4).cast()));
                        let y = _mm256_cvtph_ps(_mm_loadu_si128(pairs.add(at * LANES * 4 + 16).cast()));
                        let (d, m) = (_mm256_shuffle_ps::<0b10_00_10_00>(x, y), _mm256_shuffle_ps::<0b11_01_11_01>(x, y));
                        (d, m, d, m)
                    } else if PAIR {
                        let at = 2 * at * LANES;
                        (
                            _mm256_loadu_ps(d.add(at)),
                            _mm256_loadu_ps(m.add(at)),
                            _mm256_loadu_ps(d.add(at + LANES)),
                            _mm256_loadu_ps(m.add(at + LANES)),
                        )
                    } else {
                        let (d, m) = (_mm256_loadu_ps(d.add(at * LANES)), _mm256_loadu_ps(m.add(at * LANES)));
                        (d, m, d, m)
                    }
                };
                for r in 0..R {
                    let ab = (row + r) * nb + b;
                    // Activation scale, and `da * Σ qa` over each half of the block.
                    let (da, lo, hi) = unsafe {
                        (
                            _mm256_broadcast_ss(&*ad.add(ab)),
                            _mm256_broadcast_ss(&*asums.add(8 * ab)),
                            _mm256_broadcast_ss(&*asums.add(8 * ab + 4)),
                        )
                    };
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first[r]), _mm256_mul_ps(d0, da), acc[r]);
                    if PAIR {
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second[r]), _mm256_mul_ps(d1, da), acc[r]);
                    }
                    if !WIDE {
                        acc[r] = _mm256_fmadd_ps(m0, lo, acc[r]);
                        acc[r] = _mm256_fmadd_ps(m1, hi, acc[r]);
                    }
                }
            }
            for (values, sums) in out.iter_mut().zip(&acc) {
                // SAFETY: eight floats into an array of eight.
                unsafe { _mm256_storeu_ps(values.as_mut_ptr(), *sums) };
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{group_block_bytes, store, LANES};
    use crate::runtime::qmatmul::formats::Storage;
    use crate::runtime::qmatmul::{ActivationView, Format, Output, PackedWeights, Scales, BLOCK};

    lanes_kernel!(direct: false, |sum, w, a| _mm256_add_epi16(sum, _mm256_maddubs_epi16(w, a)), "avx2,fma,f16c");
}

/// AVX2's kernel with EVEX encodings and 32 vector registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{group_block_bytes, store, LANES};
    use crate::runtime::qmatmul::formats::Storage;
    use crate::runtime::qmatmul::{ActivationView, Format, Output, PackedWeights, Scales, BLOCK};

    lanes_kernel!(
        direct: false,
        |sum, w, a| _mm256_add_epi16(sum, _mm256_maddubs_epi16(w, a)),
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl"
    );
}

/// VEX-encoded `vpdpbusd` (Alder Lake and later).
#[cfg(target_arch = "x86_64")]
mod avx_vnni {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{group_block_bytes, store, LANES};
    use crate::runtime::qmatmul::formats::Storage;
    use crate::runtime::qmatmul::{ActivationView, Format, Output, PackedWeights, Scales, BLOCK};

    lanes_kernel!(direct: true, |sum, w, a| _mm256_dpbusd_avx_epi32(sum, w, a), "avx2,fma,f16c,avxvnni");
}

/// EVEX-encoded 256-bit `vpdpbusd` and 32 vector registers (Ice Lake,
/// Sapphire Rapids, Zen 4 and later).
#[cfg(target_arch = "x86_64")]
mod avx512_vnni {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{group_block_bytes, store, LANES};
    use crate::runtime::qmatmul::formats::Storage;
    use crate::runtime::qmatmul::{ActivationView, Format, Output, PackedWeights, Scales, BLOCK};

    lanes_kernel!(
        direct: true,
        |sum, w, a| _mm256_dpbusd_epi32(sum, w, a),
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
}
