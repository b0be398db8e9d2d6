//! The element-wise and attention kernels of the CPU forward pass. The ones
//! that read or write the f16 KV cache have an AVX2 + F16C variant (chosen by
//! the same [`Level`] as the matmul kernels) and a scalar reference.

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

/// `Σ q·k` with `k` in f16.
pub fn dot_f16(level: Level, q: &[f32], k: &[f16]) -> f32 {
    assert_eq!(q.len(), k.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and F16C.
        return unsafe { x86::dot_f16(q, k) };
    }
    let _ = level;
    dot_f16_scalar(q, k)
}

/// `out += w · v` with `v` in f16.
pub fn axpy_f16(level: Level, w: f32, v: &[f16], out: &mut [f32]) {
    assert_eq!(v.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: as in `dot_f16`.
        return unsafe { x86::axpy_f16(w, v, out) };
    }
    let _ = level;
    axpy_f16_scalar(w, v, out)
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

fn dot_f16_scalar(q: &[f32], k: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let body = q.len() - q.len() % 8;
    for (qc, kc) in q[..body].chunks_exact(8).zip(k[..body].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += qc[l] * kc[l].to_f32();
        }
    }
    let tail: f32 = q[body..].iter().zip(&k[body..]).map(|(a, b)| a * b.to_f32()).sum();
    acc.iter().sum::<f32>() + tail
}

fn axpy_f16_scalar(w: f32, v: &[f16], out: &mut [f32]) {
    out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v.to_f32());
}

/// Causal attention of one query head over `len` cached positions, whose
/// key and value rows `row(j)` returns. `scores` holds at least `len` values.
#[allow(clippy::too_many_arguments)]
pub fn attend<'a>(
    level: Level,
    q: &[f32],
    len: usize,
    scale: f32,
    row: impl Fn(usize) -> (&'a [f16], &'a [f16]),
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and
        // F16C; the head size is the kernel's.
        match q.len() {
            64 => return unsafe { x86::attend::<8>(q, len, scale, row, scores, out) },
            128 => return unsafe { x86::attend::<16>(q, len, scale, row, scores, out) },
            _ => {}
        }
    }
    attend_reference(level, q, len, scale, row, scores, out)
}

/// [`attend`] one row at a time through the dot and axpy kernels (any head size).
#[allow(clippy::too_many_arguments)]
fn attend_reference<'a>(
    level: Level,
    q: &[f32],
    len: usize,
    scale: f32,
    row: impl Fn(usize) -> (&'a [f16], &'a [f16]),
    scores: &mut [f32],
    out: &mut [f32],
) {
    let scores = &mut scores[..len];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot_f16(level, q, row(j).0) * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        axpy_f16(level, *p, row(j).1, out);
    }
}

/// Scores to probabilities, in place.
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    scores.iter_mut().for_each(|s| *s *= inv);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `k.len() == q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
        let body = q.len() - q.len() % 16;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..body).step_by(16) {
            // SAFETY: `i + 16 <= body <= len` for both slices.
            unsafe {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i).cast()));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i + 8).cast()));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k0, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8)), k1, a1);
            }
        }
        let v = _mm256_add_ps(a0, a1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        let tail: f32 = q[body..].iter().zip(&k[body..]).map(|(a, b)| a * b.to_f32()).sum();
        _mm_cvtss_f32(s) + tail
    }

    /// Attention of one query head of `8 * D8` values over `len` positions,
    /// the query and the output held in registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `q`, `out` and every row hold `8 * D8`
    /// values; `scores` holds `len`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend<'a, const D8: usize>(
        q: &[f32],
        len: usize,
        scale: f32,
        row: impl Fn(usize) -> (&'a [f16], &'a [f16]),
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let dim = 8 * D8;
        assert!(q.len() == dim && out.len() == dim && scores.len() >= len);
        let mut qv = [_mm256_setzero_ps(); D8];
        for (i, v) in qv.iter_mut().enumerate() {
            // SAFETY: `8 * i + 8 <= dim == q.len()`.
            *v = unsafe { _mm256_loadu_ps(q.as_ptr().add(8 * i)) };
        }
        for (j, score) in scores[..len].iter_mut().enumerate() {
            let k = row(j).0;
            assert_eq!(k.len(), dim);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in (0..D8).step_by(2) {
                // SAFETY: `8 * i + 16 <= dim == k.len()` (D8 is even).
                unsafe {
                    a0 = _mm256_fmadd_ps(qv[i], _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(8 * i).cast())), a0);
                    a1 = _mm256_fmadd_ps(
                        qv[i + 1],
                        _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(8 * i + 8).cast())),
                        a1,
                    );
                }
            }
            let v = _mm256_add_ps(a0, a1);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
            *score = _mm_cvtss_f32(s) * scale;
        }
        super::softmax(&mut scores[..len]);
        let mut ov = [_mm256_setzero_ps(); D8];
        for (j, p) in scores[..len].iter().enumerate() {
            let v = row(j).1;
            assert_eq!(v.len(), dim);
            let p = _mm256_set1_ps(*p);
            for (i, o) in ov.iter_mut().enumerate() {
                // SAFETY: `8 * i + 8 <= dim == v.len()`.
                *o = unsafe { _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(8 * i).cast())), *o) };
            }
        }
        for (i, o) in ov.iter().enumerate() {
            // SAFETY: `8 * i + 8 <= dim == out.len()`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *o) };
        }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `v.len() == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(w: f32, v: &[f16], out: &mut [f32]) {
        let body = out.len() - out.len() % 8;
        let wv = _mm256_set1_ps(w);
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= len` for both slices.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
                let o = out.as_mut_ptr().add(i);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(o)));
            }
        }
        for (o, x) in out[body..].iter_mut().zip(&v[body..]) {
            *o += w * x.to_f32();
        }
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
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1000.0) - 1.0).collect()
    }

    /// Each f16 kernel at every level against the scalar reference, on head
    /// sizes with and without a tail.
    #[test]
    fn f16_kernels_match_the_reference_at_every_level() {
        for n in [64, 128, 80, 7, 1] {
            let q = values(n, 1);
            let k: Vec<f16> = values(n, 2).iter().map(|v| f16::from_f32(*v)).collect();
            let want_dot = dot_f16_scalar(&q, &k);
            let mut want_axpy = values(n, 3);
            axpy_f16_scalar(0.37, &k, &mut want_axpy);
            let want_store: Vec<f16> = q.iter().map(|v| f16::from_f32(*v)).collect();
            for level in Level::available() {
                let dot = dot_f16(level, &q, &k);
                assert!((dot - want_dot).abs() < 1e-4 * want_dot.abs().max(1.0), "{level:?} dot {n}");
                let mut axpy = values(n, 3);
                axpy_f16(level, 0.37, &k, &mut axpy);
                assert!(axpy.iter().zip(&want_axpy).all(|(a, b)| (a - b).abs() < 1e-5), "{level:?} axpy {n}");
                let mut stored = vec![f16::ZERO; n];
                store_f16(level, &q, &mut stored);
                assert_eq!(stored, want_store, "{level:?} store {n}");
            }
        }
    }

    /// The register kernel of each head size against the row-at-a-time
    /// reference with the scalar kernels, over rows scattered in a cache.
    #[test]
    fn attention_kernels_match_the_reference_at_every_level() {
        for dim in [64, 128, 40] {
            let len = 37;
            let cache: Vec<f16> = values(2 * 50 * dim, 5).iter().map(|v| f16::from_f32(*v)).collect();
            // Position j lives in slot (j * 7) % 50: keys first, values after.
            let row = |j: usize| {
                let at = (j * 7 % 50) * dim;
                (&cache[at..at + dim], &cache[50 * dim + at..50 * dim + at + dim])
            };
            let q = values(dim, 9);
            let mut scores = vec![0f32; len];
            let mut want = vec![0f32; dim];
            attend_reference(Level::SCALAR, &q, len, 0.125, row, &mut scores, &mut want);
            for level in Level::available() {
                let mut got = vec![0f32; dim];
                attend(level, &q, len, 0.125, row, &mut scores, &mut got);
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "{level:?} head {dim}: {diff}");
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
