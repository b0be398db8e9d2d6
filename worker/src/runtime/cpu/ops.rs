//! The element-wise kernels of the CPU forward pass. The KV cache's f16 store
//! has an AVX2 + F16C variant (chosen by the same [`Level`] as the matmul
//! kernels) and a scalar reference.

use half::f16;

use crate::runtime::qmatmul::Level;

/// `out = x / rms(x) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
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
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Rotates one head in place: pairs `(2i, 2i + 1)` (interleaved) or `(i, i + d/2)`.
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
        // SAFETY: as in `dot_f16`.
        return unsafe { x86::store_f16(src, out) };
    }
    let _ = level;
    out.iter_mut().zip(src).for_each(|(o, s)| *o = f16::from_f32(*s));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

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
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1000.0) - 1.0).collect()
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
