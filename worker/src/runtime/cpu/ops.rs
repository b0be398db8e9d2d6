//! The element-wise kernels of the CPU forward pass. silu and the KV cache's
//! f16 store have an AVX2 variant (chosen by the same [`Level`] as the matmul
//! kernels) and a scalar reference; the vector exponential is shared with
//! attention.

use std::ops::Range;

use half::f16;

use crate::runtime::qmatmul::Level;

/// Values `part` of `x / rms(x) * weight` into `out` (the rms is the whole row's).
pub fn rms_scale(x: &[f32], part: Range<usize>, weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(&x[part.clone()]).zip(&weight[part]) {
        *o = v * inv * w;
    }
}

/// `x = x / rms(x) * weight`.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    x.iter_mut().zip(weight).for_each(|(v, w)| *v = *v * inv * w);
}

/// `out = silu(gate) * up`.
pub fn silu_mul(level: Level, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and F16C.
        return unsafe { x86::silu_mul(gate, up, out) };
    }
    let _ = level;
    silu_mul_scalar(gate, up, out);
}

fn silu_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `sqrt(2 / pi)`, GELU's tanh approximation's factor.
const GELU_C: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `out = gelu_tanh(gate) * up`, GELU's tanh approximation
/// `0.5 g (1 + tanh(c (g + 0.044715 g³)))`, computed as the equal
/// `g / (1 + e^(-2c (g + 0.044715 g³)))`, which keeps its precision where
/// `1 + tanh` would cancel.
pub fn gelu_tanh_mul(level: Level, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and F16C.
        return unsafe { x86::gelu_tanh_mul(gate, up, out) };
    }
    let _ = level;
    gelu_tanh_mul_scalar(gate, up, out);
}

fn gelu_tanh_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let inner = -2.0 * GELU_C * (g + GELU_CUBIC * g * g * g);
        *o = g / (1.0 + inner.exp()) * u;
    }
}

/// `out += x[part] / rms(x) * weight[part]` (the rms is the whole row's):
/// a normed branch joining the residual stream.
pub fn rms_scale_add(x: &[f32], part: Range<usize>, weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(&x[part.clone()]).zip(&weight[part]) {
        *o += v * inv * w;
    }
}

/// Rotates one head's leading `2 * cos.len()` dimensions in place (all of
/// them but where the rotation is partial): pairs `(2i, 2i + 1)`
/// (interleaved) or `(i, i + cos.len())`.
pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x0 * sin[i] + x1 * cos[i];
    }
}

/// `out = src` rounded to f16.
pub fn store_f16(level: Level, src: &[f32], out: &mut [f16]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and F16C.
        return unsafe { x86::store_f16(src, out) };
    }
    let _ = level;
    out.iter_mut().zip(src).for_each(|(o, s)| *o = f16::from_f32(*s));
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// `e^x` lane by lane, within a few ulp for `x` in [-87, 88]; below, 0
    /// (softmax reads it as no weight), above, e^88, and for NaN, 0.
    /// Range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, then a degree-6
    /// polynomial for `e^r` (Taylor's coefficients, tuned as in Cephes' expf).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::runtime::cpu) fn exp(x: __m256) -> __m256 {
        let live = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(two_n)), live)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; the slices have one length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let body = out.len() - out.len() % 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= len` for the three slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(one, e)));
            }
        }
        super::silu_mul_scalar(&gate[body..], &up[body..], &mut out[body..]);
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; the slices have one length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let body = out.len() - out.len() % 8;
        let one = _mm256_set1_ps(1.0);
        let minus_2c = _mm256_set1_ps(-2.0 * super::GELU_C);
        let cubic = _mm256_set1_ps(super::GELU_CUBIC);
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= len` for the three slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                // -2c (g + 0.044715 g³) = -2c g (1 + 0.044715 g²)
                let inner = _mm256_mul_ps(_mm256_mul_ps(minus_2c, g), _mm256_fmadd_ps(cubic, _mm256_mul_ps(g, g), one));
                let e = exp(inner);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(one, e)));
            }
        }
        super::gelu_tanh_mul_scalar(&gate[body..], &up[body..], &mut out[body..]);
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `src.len() == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn store_f16(src: &[f32], out: &mut [f16]) {
        let body = src.len() - src.len() % 8;
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= len` for both slices.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), h);
            }
        }
        for (o, s) in out[body..].iter_mut().zip(&src[body..]) {
            *o = f16::from_f32(*s);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `n` values in [-1, 1), spread over the range by `seed` (the CPU kernels' tests share them).
    pub(in crate::runtime::cpu) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1000.0) - 1.0).collect()
    }

    /// silu at every level within float rounding of the reference, over the
    /// range a gate takes and past where the exponential saturates.
    #[test]
    fn silu_matches_the_reference_at_every_level() {
        let gate: Vec<f32> = (0..403).map(|i| (i as f32 - 200.0) * 0.5).collect();
        let up = values(403, 3);
        let mut want = vec![0f32; 403];
        silu_mul(Level::SCALAR, &gate, &up, &mut want);
        for level in Level::available() {
            let mut got = vec![0f32; 403];
            silu_mul(level, &gate, &up, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-30), "{level:?} gate {}: {g} vs {w}", gate[i]);
            }
        }
    }

    /// GELU-tanh at every level within float rounding of the reference, and
    /// the reference within float rounding of the tanh definition in f64.
    #[test]
    fn gelu_tanh_matches_the_reference_at_every_level() {
        let gate: Vec<f32> = (0..403).map(|i| (i as f32 - 200.0) * 0.05).chain([-60.0, -1e4, 50.0, 1e4]).collect();
        let n = gate.len();
        let up = values(n, 5);
        let mut want = vec![0f32; n];
        gelu_tanh_mul(Level::SCALAR, &gate, &up, &mut want);
        for ((g, u), w) in gate.iter().zip(&up).zip(&want) {
            let (g, u) = (f64::from(*g), f64::from(*u));
            let exact = 0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()) * u;
            assert!((f64::from(*w) - exact).abs() <= 1e-5 * exact.abs().max(1e-6), "gate {g}: {w} vs {exact}");
        }
        // The exponent (up to ~88 before it saturates) is rounded in another
        // order than the reference's; e^x carries its relative error x·ε.
        for level in Level::available() {
            let mut got = vec![0f32; n];
            gelu_tanh_mul(level, &gate, &up, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 2e-5 * w.abs().max(1e-30), "{level:?} gate {}: {g} vs {w}", gate[i]);
            }
        }
    }

    /// The f16 store at every level rounds as the scalar conversion does, on
    /// lengths with and without a tail.
    #[test]
    fn f16_stores_match_the_reference_at_every_level() {
        for n in [64, 128, 80, 7, 1] {
            let q = values(n, 1);
            let want: Vec<f16> = q.iter().map(|v| f16::from_f32(*v)).collect();
            for level in Level::available() {
                let mut stored = vec![f16::ZERO; n];
                store_f16(level, &q, &mut stored);
                assert_eq!(stored, want, "{level:?} store {n}");
            }
        }
    }

    #[test]
    fn rotation_pairs_dimensions_by_style() {
        let (cos, sin) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rotate(&mut x, &cos, &sin, true);
        assert_eq!(x, [-2.0, 1.0, 3.0, 4.0], "(0, 1) turned a quarter, (2, 3) kept");
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rotate(&mut x, &cos, &sin, false);
        assert_eq!(x, [-3.0, 2.0, 1.0, 4.0], "(0, 2) turned a quarter, (1, 3) kept");
    }
}
