//! x86 variants of the tile kernel over the four-column block layout (the
//! AVX2 level has its own layout and kernel, `lanes.rs`). One body, instantiated per level with the
//! level's CPU features enabled (so its intrinsics inline), differing only in
//! the integer dot product of a weight block with an activation block:
//!
//! - AVX-512 (F/BW/VL): `vpmaddubsw` (u8 × i8 pairs to i16) then `vpmaddwd`
//!   (pairs to i32), with EVEX encodings and 32 vector registers, which take
//!   larger tiles. Q8_0's repacked values reach 255, which could saturate the
//!   i16 pairs, so that level multiplies the signed values instead
//!   (`|w| × sign(w)·a`) and leaves out the offset the repacking added.
//! - AVX-VNNI and AVX-512 VNNI: `vpdpbusd` (u8 × i8 quadruples straight to
//!   i32, no intermediate saturation), VEX or EVEX encoded; the EVEX level also
//!   has 32 vector registers for larger tiles.
//!
//! Lane `i` of a block's 8 i32 sums holds values `4i..4i + 4`, so lanes 0–3
//! cover the first 16 values and 4–7 the last 16: Q6_K's two scales per block
//! are one vector `[lo ×4, hi ×4]`.

use super::formats::Storage;
use super::{ActivationView, Isa, Level, PackedWeights, Scales};

/// One `R × C` output tile at `level`.
///
/// # Safety
/// The tile is inside the weights and activations. (The CPU has `level`'s
/// features: a [`Level`] is made only by detection.)
pub(super) unsafe fn tile<const R: usize, const C: usize>(
    level: Level,
    w: &PackedWeights,
    a: &ActivationView<'_>,
    row: usize,
    col: usize,
    out: &mut [[f32; C]; R],
) {
    let nibbles = w.format.storage() == Storage::Nibbles;
    let pair = w.format.scales_per_block() == 2;
    let wide = w.format.wide();
    let half = matches!(w.scales, Scales::Half(_));
    macro_rules! at {
        ($level:ident) => {
            // SAFETY: `level` was made by detection, so the CPU has the
            // module's features; the bounds are the caller's. Nibble formats have one scale
            // per block and values below 16; Q6_K (pair) has f32 scales; Q8_0
            // (wide) is stored in bytes: the flags cover every format.
            unsafe {
                match (nibbles, pair, wide, half) {
                    (true, _, _, true) => $level::tile::<R, C, true, false, false, true>(w, a, row, col, out),
                    (true, _, _, false) => $level::tile::<R, C, true, false, false, false>(w, a, row, col, out),
                    (false, true, _, _) => $level::tile::<R, C, false, true, false, false>(w, a, row, col, out),
                    (false, false, true, true) => $level::tile::<R, C, false, false, true, true>(w, a, row, col, out),
                    (false, false, true, false) => $level::tile::<R, C, false, false, true, false>(w, a, row, col, out),
                    (false, false, false, true) => $level::tile::<R, C, false, false, false, true>(w, a, row, col, out),
                    (false, false, false, false) => {
                        $level::tile::<R, C, false, false, false, false>(w, a, row, col, out)
                    }
                }
            }
        };
    }
    match level.isa() {
        Isa::Avx512 => at!(avx512),
        Isa::AvxVnni => at!(avx_vnni),
        Isa::Avx512Vnni => at!(avx512_vnni),
        // The AVX2 level stores its weights in lanes (`lanes.rs`), never here.
        Isa::Avx2 | Isa::Scalar => super::scalar::tile(w, a, row, col, out),
    }
}

/// The tile body; the enclosing module supplies `dot::<WIDE>(weights, activations)`.
macro_rules! tile_kernel {
    ($features:literal, $signed_wide:literal) => {
        /// # Safety
        /// The CPU has this module's features; the tile is inside the matrices.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn tile<
            const R: usize,
            const C: usize,
            const NIBBLES: bool,
            const PAIR: bool,
            const WIDE: bool,
            const HALF: bool,
        >(
            w: &PackedWeights,
            a: &ActivationView<'_>,
            row: usize,
            col: usize,
            out: &mut [[f32; C]; R],
        ) {
            let nb = w.nb;
            let (wq, wd, wm, wdm) = match &w.scales {
                Scales::Half(dm) => (w.q.as_ptr(), std::ptr::null(), std::ptr::null(), dm.as_ptr().cast::<i32>()),
                Scales::Full { d, m } => (w.q.as_ptr(), d.as_ptr(), m.as_ptr(), std::ptr::null()),
            };
            assert_eq!(HALF, !wdm.is_null(), "the scales are the kernel's");
            let (aq, ad, sums) = (a.q.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
            // Offsets go into the sums, except where the AVX2 level multiplied
            // Q8_0's signed values (the offset is then already accounted for).
            let offsets = !(WIDE && $signed_wide);
            let low = _mm_set1_epi8(0x0f);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..nb {
                let mut wv = [_mm256_setzero_si256(); C];
                let mut ws = [_mm256_setzero_ps(); C];
                let mut ms = [_mm256_setzero_ps(); C];
                for c in 0..C {
                    let blk = slot(nb, col + c, b);
                    // SAFETY: the slot of a block of a column below `n` is inside `q`
                    // (16 or 32 bytes per block) and the scales (one pair, or
                    // two of `d` and `m` per block).
                    unsafe {
                        wv[c] = if NIBBLES {
                            let packed = _mm_loadu_si128(wq.add(blk * 16).cast());
                            let lo = _mm_and_si128(packed, low);
                            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                            _mm256_set_m128i(hi, lo)
                        } else {
                            _mm256_loadu_si256(wq.add(blk * BLOCK).cast())
                        };
                        (ws[c], ms[c]) = if HALF {
                            // [d, m, 0, 0] from the block's two f16.
                            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(wdm.add(blk).read_unaligned()));
                            (_mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)))
                        } else if PAIR {
                            (
                                _mm256_set_m128(_mm_set1_ps(*wd.add(2 * blk + 1)), _mm_set1_ps(*wd.add(2 * blk))),
                                _mm256_set_m128(_mm_set1_ps(*wm.add(2 * blk + 1)), _mm_set1_ps(*wm.add(2 * blk))),
                            )
                        } else {
                            (_mm256_set1_ps(*wd.add(blk)), _mm256_set1_ps(*wm.add(blk)))
                        };
                    }
                }
                for r in 0..R {
                    let ab = (row + r) * nb + b;
                    // SAFETY: block `ab` of a row below `rows` is inside the activations.
                    let (av, da, sv) = unsafe {
                        (
                            _mm256_loadu_si256(aq.add(ab * BLOCK).cast()),
                            _mm256_set1_ps(*ad.add(ab)),
                            _mm256_loadu_ps(sums.add(8 * ab)),
                        )
                    };
                    for c in 0..C {
                        let dots = _mm256_cvtepi32_ps(dot::<WIDE>(wv[c], av));
                        acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(dots, da), ws[c], acc[r][c]);
                        if offsets {
                            acc[r][c] = _mm256_fmadd_ps(ms[c], sv, acc[r][c]);
                        }
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    let v = acc[r][c];
                    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
                    out[r][c] = _mm_cvtss_f32(s);
                }
            }
        }
    };
}

mod avx512 {
    use std::arch::x86_64::*;

    use super::super::{slot, ActivationView, PackedWeights, Scales, BLOCK};

    /// `vpmaddubsw` then `vpmaddwd`, EVEX encoded.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    #[inline]
    fn dot<const WIDE: bool>(w: __m256i, a: __m256i) -> __m256i {
        let pairs = if WIDE {
            // Back to signed values, then |w| × (a with w's sign): at most
            // 2 · 128 · 127 per pair, inside i16.
            let q = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q))
        } else {
            // Values below 64: at most 2 · 63 · 127 per pair.
            _mm256_maddubs_epi16(w, a)
        };
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    tile_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl", true);
}

mod avx_vnni {
    use std::arch::x86_64::*;

    use super::super::{slot, ActivationView, PackedWeights, Scales, BLOCK};

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[inline]
    fn dot<const WIDE: bool>(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
    }

    tile_kernel!("avx2,fma,f16c,avxvnni", false);
}

mod avx512_vnni {
    use std::arch::x86_64::*;

    use super::super::{slot, ActivationView, PackedWeights, Scales, BLOCK};

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn dot<const WIDE: bool>(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
    }

    tile_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", false);
}
