//! The reference kernel every SIMD variant is tested against.

use super::{ActivationView, PackedWeights, BLOCK};

pub(super) fn tile<const R: usize, const C: usize>(
    w: &PackedWeights,
    a: &ActivationView<'_>,
    row: usize,
    col: usize,
    out: &mut [[f32; C]; R],
) {
    let nb = w.nb;
    for (r, outs) in out.iter_mut().enumerate() {
        for (c, o) in outs.iter_mut().enumerate() {
            let (row, col) = (row + r, col + c);
            let mut sum = 0f32;
            for b in 0..nb {
                let ab = row * nb + b;
                let qa = &a.q[ab * BLOCK..(ab + 1) * BLOCK];
                let mut dots = [0i32; 2];
                for (j, q) in qa.iter().enumerate() {
                    dots[j / 16] += i32::from(w.value(col, b, j)) * i32::from(*q);
                }
                let ((d_lo, m_lo), (d_hi, m_hi)) = (w.scale(col, b, 0), w.scale(col, b, 16));
                sum += a.d[ab] * (d_lo * dots[0] as f32 + d_hi * dots[1] as f32);
                sum += m_lo * a.s[8 * ab] + m_hi * a.s[8 * ab + 4];
            }
            *o = sum;
        }
    }
}
