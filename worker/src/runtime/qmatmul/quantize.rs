//! Activations to signed bytes, one 32-value block at a time: the scale
//! `d = max|x| / 127`, the values `round(x / d)` (ties to even, which is what
//! the vector conversion does) within ±127, and `d · Σ q` over each half of
//! the block (lanes 0 and 4 of eight, the layout [`super::Activations`]
//! keeps). A block whose scale is below the smallest normal float (its 1/d
//! would overflow) is all zeros. A scalar reference and an AVX2 variant, which
//! tests hold to identical bytes for finite input (with a NaN or an infinity
//! in a block the model has already failed; the bytes then stay within ±127
//! but may differ between the two).

use super::{Level, BLOCK};

/// Quantizes `x` (one block) into `q`, its half sums into the eight `s`
/// lanes; returns the scale.
pub fn block(level: Level, x: &[f32], q: &mut [i8], s: &mut [f32]) -> f32 {
    assert!(x.len() == BLOCK && q.len() == BLOCK && s.len() == 8, "one block");
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and
        // F16C; the lengths are checked above.
        return unsafe { x86::block(x, q, s) };
    }
    let _ = level;
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = inverse(scale);
    let mut halves = [0i32; 2];
    for (j, (q, v)) in q.iter_mut().zip(x).enumerate() {
        *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        halves[j / 16] += i32::from(*q);
    }
    s.fill(0.0);
    s[0] = scale * halves[0] as f32;
    s[4] = scale * halves[1] as f32;
    scale
}

/// `1 / scale`, or 0 for a scale below the smallest normal float (whose
/// inverse would overflow): the block is then all zeros.
fn inverse(scale: f32) -> f32 {
    if scale >= f32::MIN_POSITIVE {
        1.0 / scale
    } else {
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sum of the eight i32 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
    }

    /// # Safety
    /// The CPU has AVX2; `x` and `q` hold 32 values, `s` 8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn block(x: &[f32], q: &mut [i8], s: &mut [f32]) -> f32 {
        // SAFETY: 32 floats in `x`.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, x| _mm256_max_ps(m, _mm256_and_ps(*x, magnitude)));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(super::inverse(scale));
        // Rounded to nearest even (the default rounding). Every |x| ≤ amax
        // keeps finite values within ±127; the clamp (a NaN becomes 127)
        // keeps -128, which the sign trick of Q8_0 cannot take, out.
        let (high, low) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v[k], inv), high), low))
        });
        let halves = [sum_i32(_mm256_add_epi32(i[0], i[1])), sum_i32(_mm256_add_epi32(i[2], i[3]))];
        // i32 → i16 → i8 packs lanes within 128-bit halves; the permutation
        // puts the 32 bytes back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes in `q`, 8 floats in `s`.
        unsafe {
            _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
            let sums = _mm256_setr_ps(scale * halves[0] as f32, 0.0, 0.0, 0.0, scale * halves[1] as f32, 0.0, 0.0, 0.0);
            _mm256_storeu_ps(s.as_mut_ptr(), sums);
        }
        scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level gives the reference's bytes, scale and sums: random blocks,
    /// ties (values that land on .5, where ties to even and away from zero
    /// part), zeros, one huge value and a block too small to scale.
    #[test]
    fn every_level_quantizes_as_the_reference() {
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|b| (0..BLOCK).map(|j| (((b * 131 + j * 7919) % 2003) as f32 / 400.0) - 2.5).collect())
            .collect();
        blocks.push((0..BLOCK).map(|j| j as f32 - 15.5).collect());
        blocks.push((0..BLOCK).map(|j| (j as f32 - 16.0) * 127.0 / 32.0).collect());
        blocks.push((0..BLOCK).map(|j| if j == 0 { 127.0 } else { (j as f32 - 16.0) + 0.5 }).collect());
        blocks.push(vec![0.0; BLOCK]);
        blocks.push((0..BLOCK).map(|j| (j as f32 - 16.0) * 1e-38).collect());
        blocks.push((0..BLOCK).map(|j| if j == 3 { -1e30 } else { 1.0 }).collect());
        for x in &blocks {
            let (mut want_q, mut want_s) = ([0i8; BLOCK], [0f32; 8]);
            let want = block(Level::SCALAR, x, &mut want_q, &mut want_s);
            assert!(want_q.iter().all(|q| *q != -128));
            for level in Level::available() {
                let (mut q, mut s) = ([0i8; BLOCK], [1f32; 8]);
                assert_eq!(block(level, x, &mut q, &mut s), want, "{level:?} scale");
                assert_eq!((q, s), (want_q, want_s), "{level:?} {x:?}");
            }
        }
        // Non-finite input: any bytes, but never -128.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let x: Vec<f32> = (0..BLOCK).map(|j| if j == 5 { bad } else { j as f32 - 9.0 }).collect();
            for level in Level::available() {
                let (mut q, mut s) = ([0i8; BLOCK], [0f32; 8]);
                block(level, &x, &mut q, &mut s);
                assert!(q.iter().all(|q| *q != -128), "{level:?} {bad}: {q:?}");
            }
        }
    }
}
