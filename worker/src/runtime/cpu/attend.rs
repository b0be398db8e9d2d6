//! Causal attention over the paged KV cache, a tile of queries at a time.
//!
//! A tile is consecutive query tokens of one sequence and the query heads
//! among them that read one KV head. The keys and values it sees are widened
//! from f16 once per pass of [`KEYS`] positions into f32 rows, and every query
//! of the tile (tokens × heads) then runs over those rows: a prompt's queries
//! and a KV group's heads share each conversion, and the softmax runs online
//! (a running maximum and sum per query, the output rescaled when the maximum
//! moves), so no query holds more than one pass of scores.
//!
//! The arithmetic is four small kernels (widen, scores, exponentials, weighted
//! sum of values), each with a scalar reference and an AVX2 variant chosen by
//! the same [`Level`] as the matmul kernels; tests hold each variant to its
//! reference, and the whole tile to a plain softmax attention.

use half::f16;

use crate::runtime::qmatmul::Level;

/// Key and value positions widened per pass.
pub const KEYS: usize = 32;

/// Query tokens a prompt's tile holds at most.
pub const TOKENS: usize = 16;

/// Consecutive query tokens of one sequence, at positions
/// `first..first + tokens`, and `heads` of their query heads that read one KV
/// head, each `dim` values.
#[derive(Debug, Clone, Copy)]
pub struct Tile {
    pub first: usize,
    pub tokens: usize,
    pub heads: usize,
    pub dim: usize,
    pub scale: f32,
    /// Positions a query reads, its own included (sliding-window attention);
    /// `usize::MAX`: every earlier one.
    pub window: usize,
}

/// A thread's buffers, reused from tile to tile (they grow, never shrink).
#[derive(Default)]
pub struct Buffers {
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    /// Per query: the unnormalised output, the running maximum and sum.
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Attends every query of `tile`: `query(i, h)` is head `h` of token `i`,
/// `row(j)` the key and value of position `j`; `store(i, h, out)` receives
/// each query's output once.
pub fn attend<'a>(
    level: Level,
    tile: &Tile,
    query: impl Fn(usize, usize) -> &'a [f32],
    row: impl Fn(usize) -> (&'a [f16], &'a [f16]),
    buffers: &mut Buffers,
    mut store: impl FnMut(usize, usize, &[f32]),
) {
    let (dim, queries) = (tile.dim, tile.tokens * tile.heads);
    let b = buffers;
    b.keys.resize(KEYS * dim, 0.0);
    b.values.resize(KEYS * dim, 0.0);
    b.scores.resize(KEYS, 0.0);
    b.out.clear();
    b.out.resize(queries * dim, 0.0);
    b.max.clear();
    b.max.resize(queries, f32::NEG_INFINITY);
    b.sum.clear();
    b.sum.resize(queries, 0.0);
    let len = tile.first + tile.tokens;
    // The first position the tile's first query reads, in whole passes.
    let earliest = (tile.first + 1).saturating_sub(tile.window);
    for start in (earliest - earliest % KEYS..len).step_by(KEYS) {
        let count = KEYS.min(len - start);
        for j in 0..count {
            let (k, v) = row(start + j);
            widen(level, k, &mut b.keys[j * dim..(j + 1) * dim]);
            widen(level, v, &mut b.values[j * dim..(j + 1) * dim]);
        }
        // Tokens before `start` see none of this pass.
        for i in start.saturating_sub(tile.first)..tile.tokens {
            // This pass's positions the token reads: up to its own, and
            // within its window.
            let position = tile.first + i;
            let from = (position + 1).saturating_sub(tile.window).max(start) - start;
            let to = count.min(position + 1 - start);
            if from >= to {
                continue;
            }
            let (keys, values) = (&b.keys[from * dim..to * dim], &b.values[from * dim..to * dim]);
            for h in 0..tile.heads {
                let at = i * tile.heads + h;
                let scores = &mut b.scores[..to - from];
                self::scores(level, query(i, h), keys, tile.scale, scores);
                let high = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let max = b.max[at].max(high);
                // exp(-inf) = 0 on the first pass: nothing to rescale.
                let keep = (b.max[at] - max).exp();
                let total = exponentials(level, scores, max);
                b.sum[at] = b.sum[at] * keep + total;
                b.max[at] = max;
                accumulate(level, &mut b.out[at * dim..(at + 1) * dim], keep, scores, values);
            }
        }
    }
    for at in 0..queries {
        let out = &mut b.out[at * dim..(at + 1) * dim];
        let inv = 1.0 / b.sum[at];
        out.iter_mut().for_each(|v| *v *= inv);
        store(at / tile.heads, at % tile.heads, out);
    }
}

/// `out = src` in f32.
fn widen(level: Level, src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: a level with AVX2 is made only by detecting AVX2, FMA and F16C.
        return unsafe { x86::widen(src, out) };
    }
    let _ = level;
    out.iter_mut().zip(src).for_each(|(o, s)| *o = s.to_f32());
}

/// `out[j] = scale · (q · keys row j)` for the `out.len()` rows of `keys`.
fn scores(level: Level, q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    assert_eq!(keys.len(), out.len() * q.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() && q.len().is_multiple_of(8) {
        // SAFETY: as in `widen`; the rows are whole vectors.
        return unsafe { x86::scores(q, keys, scale, out) };
    }
    let _ = level;
    for (o, k) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
        *o = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// `s = exp(s - max)` in place; returns the sum.
fn exponentials(level: Level, s: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        // SAFETY: as in `widen`.
        return unsafe { x86::exponentials(s, max) };
    }
    let _ = level;
    s.iter_mut().fold(0.0, |sum, v| {
        *v = (*v - max).exp();
        sum + *v
    })
}

/// `out = keep · out + Σ p[j] · values row j`.
fn accumulate(level: Level, out: &mut [f32], keep: f32, p: &[f32], values: &[f32]) {
    assert_eq!(values.len(), p.len() * out.len());
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() && out.len().is_multiple_of(8) {
        // SAFETY: as in `widen`; the rows are whole vectors.
        return unsafe { x86::accumulate(out, keep, p, values) };
    }
    let _ = level;
    out.iter_mut().for_each(|o| *o *= keep);
    for (w, v) in p.iter().zip(values.chunks_exact(out.len())) {
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::ops::x86::exp;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `src.len() == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen(src: &[f16], out: &mut [f32]) {
        let body = src.len() - src.len() % 8;
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= len` for both slices.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast()));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            }
        }
        for (o, s) in out[body..].iter_mut().zip(&src[body..]) {
            *o = s.to_f32();
        }
    }

    /// Sum of the eight lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01)))
    }

    /// Sum of the eight lanes of each of eight vectors, as one vector.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sums8(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `q.len()` is a multiple of 8 and
    /// `keys.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let dim = q.len();
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        let rows = out.len();
        let body = rows - rows % 8;
        let scale_v = _mm256_set1_ps(scale);
        for j in (0..body).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for d in (0..dim).step_by(8) {
                // SAFETY: rows `j..j + 8` and lanes `d..d + 8` are inside both.
                unsafe {
                    let qv = _mm256_loadu_ps(qp.add(d));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + r) * dim + d)), *a);
                    }
                }
            }
            // SAFETY: `j + 8 <= out.len()`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_mul_ps(sums8(acc), scale_v)) };
        }
        for (j, o) in out.iter_mut().enumerate().skip(body) {
            let mut acc = _mm256_setzero_ps();
            for d in (0..dim).step_by(8) {
                // SAFETY: row `j` and lanes `d..d + 8` are inside both.
                unsafe { acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d)), _mm256_loadu_ps(kp.add(j * dim + d)), acc) };
            }
            *o = scale * sum(acc);
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exponentials(s: &mut [f32], max: f32) -> f32 {
        let body = s.len() - s.len() % 8;
        let m = _mm256_set1_ps(max);
        let mut total = _mm256_setzero_ps();
        for j in (0..body).step_by(8) {
            // SAFETY: `j + 8 <= body <= s.len()`.
            unsafe {
                let p = s.as_mut_ptr().add(j);
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p), m));
                _mm256_storeu_ps(p, e);
                total = _mm256_add_ps(total, e);
            }
        }
        let rest = s.len() - body;
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..rest].copy_from_slice(&s[body..]);
        // SAFETY: eight floats each way.
        let e = exp(_mm256_sub_ps(unsafe { _mm256_loadu_ps(tail.as_ptr()) }, m));
        unsafe { _mm256_storeu_ps(tail.as_mut_ptr(), e) };
        s[body..].copy_from_slice(&tail[..rest]);
        sum(_mm256_add_ps(total, e))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `out.len()` is a multiple of 8 and
    /// `values.len() == p.len() * out.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate(out: &mut [f32], keep: f32, p: &[f32], values: &[f32]) {
        let dim = out.len();
        let (op, vp) = (out.as_mut_ptr(), values.as_ptr());
        let keep = _mm256_set1_ps(keep);
        // Eight vectors of the output at a time stay in registers over every row.
        for d in (0..dim).step_by(64) {
            let width = (dim - d).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for (i, a) in acc.iter_mut().enumerate().take(width) {
                // SAFETY: lanes `d + 8i..d + 8i + 8` are inside `out`.
                *a = _mm256_mul_ps(unsafe { _mm256_loadu_ps(op.add(d + 8 * i)) }, keep);
            }
            for (j, w) in p.iter().enumerate() {
                let w = _mm256_set1_ps(*w);
                for (i, a) in acc.iter_mut().enumerate().take(width) {
                    // SAFETY: row `j` and its lanes `d + 8i..` are inside `values`.
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(vp.add(j * dim + d + 8 * i)) }, *a);
                }
            }
            for (i, a) in acc.iter().enumerate().take(width) {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(op.add(d + 8 * i), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops::tests::values;
    use super::*;

    /// Each kernel at every level against its scalar reference, on lengths
    /// with and without a tail.
    #[test]
    fn kernels_match_the_reference_at_every_level() {
        for (dim, rows) in [(64, 37), (128, 8), (40, 3), (8, 1), (256, 17)] {
            let q = values(dim, 1);
            let keys = values(rows * dim, 2);
            let halves: Vec<f16> = keys.iter().map(|v| f16::from_f32(*v)).collect();
            let mut want = (vec![0f32; rows * dim], vec![0f32; rows], values(rows, 3), values(dim, 4));
            widen(Level::SCALAR, &halves, &mut want.0);
            scores(Level::SCALAR, &q, &keys, 0.3, &mut want.1);
            let want_sum = exponentials(Level::SCALAR, &mut want.2, 0.5);
            accumulate(Level::SCALAR, &mut want.3, 0.7, &want.2, &keys);
            for level in Level::available() {
                let mut got = (vec![0f32; rows * dim], vec![0f32; rows], values(rows, 3), values(dim, 4));
                widen(level, &halves, &mut got.0);
                assert_eq!(got.0, want.0, "{level:?} widen {dim}");
                scores(level, &q, &keys, 0.3, &mut got.1);
                let close = |a: &[f32], b: &[f32], tol: f32| {
                    a.iter().zip(b).all(|(a, b)| (a - b).abs() <= tol * b.abs().max(1.0))
                };
                assert!(close(&got.1, &want.1, 1e-5), "{level:?} scores {dim}x{rows}");
                let sum = exponentials(level, &mut got.2, 0.5);
                assert!(
                    close(&got.2, &want.2, 1e-6) && (sum - want_sum).abs() < 1e-5 * want_sum,
                    "{level:?} exp {rows}"
                );
                accumulate(level, &mut got.3, 0.7, &want.2, &keys);
                assert!(close(&got.3, &want.3, 1e-5), "{level:?} accumulate {dim}x{rows}");
            }
        }
    }

    /// The vector exponential over the range softmax feeds it (scores minus
    /// their maximum: zero and below), against the standard library's.
    #[test]
    fn the_vector_exponential_is_within_a_few_ulp() {
        for level in Level::available() {
            let mut s: Vec<f32> = (0..=2000).map(|i| -(i as f32) * 0.05).chain([-86.9, -87.5, -200.0]).collect();
            let want: Vec<f32> = s.iter().map(|v| v.exp()).collect();
            exponentials(level, &mut s, 0.0);
            for (g, w) in s.iter().zip(&want) {
                // Below e^-87 a level may give 0: the weight of nothing next to the maximum's 1.
                let tolerance = if *w <= (-87f32).exp() { *w } else { 4.0 * f32::EPSILON * w };
                assert!((g - w).abs() <= tolerance, "{level:?}: {g} vs {w}");
            }
        }
    }

    /// Whole tiles (several passes, tokens that see none of a pass, heads of
    /// one KV group, positions scattered in a cache) against plain softmax
    /// attention in f64.
    #[test]
    fn tiles_match_plain_softmax_attention_at_every_level() {
        let cases = [
            (64, 0, 16, 3, usize::MAX),
            (64, 70, 5, 1, usize::MAX),
            (128, 31, 2, 2, usize::MAX),
            (40, 3, 9, 4, usize::MAX),
        ];
        // Sliding windows: narrower than a pass, across pass boundaries, one position.
        let windowed = [(64, 70, 16, 2, 20), (64, 40, 9, 1, 33), (40, 5, 12, 3, 1), (64, 0, 16, 1, 8)];
        for (dim, first, tokens, heads, window) in cases.into_iter().chain(windowed) {
            let len = first + tokens;
            let slots = len + 11;
            let cache: Vec<f16> = values(2 * slots * dim, 5).iter().map(|v| f16::from_f32(*v)).collect();
            // Position j lives in slot (j * 7) % slots: keys first, values after.
            let row = |j: usize| {
                let at = (j * 7 % slots) * dim;
                (&cache[at..at + dim], &cache[slots * dim + at..slots * dim + at + dim])
            };
            let queries = values(tokens * heads * dim, 9);
            let query = |i: usize, h: usize| &queries[(i * heads + h) * dim..(i * heads + h + 1) * dim];
            let tile = Tile { first, tokens, heads, dim, scale: 0.125, window };
            for level in Level::available() {
                let mut seen = vec![0usize; tokens * heads];
                let mut buffers = Buffers::default();
                attend(level, &tile, query, row, &mut buffers, |i, h, out| {
                    seen[i * heads + h] += 1;
                    let q = query(i, h);
                    let visible = (first + i + 1).saturating_sub(window)..=first + i;
                    let scores: Vec<f64> = visible
                        .clone()
                        .map(|j| 0.125 * q.iter().zip(row(j).0).map(|(a, b)| f64::from(*a) * b.to_f64()).sum::<f64>())
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = p.iter().sum();
                    for (d, got) in out.iter().enumerate() {
                        let want: f64 =
                            p.iter().zip(visible.clone()).map(|(p, j)| p * row(j).1[d].to_f64()).sum::<f64>() / total;
                        assert!((f64::from(*got) - want).abs() < 1e-5, "{level:?} {dim} token {i} head {h} lane {d}");
                    }
                });
                assert!(seen.iter().all(|n| *n == 1), "{level:?}: every query stored once");
            }
        }
    }
}
