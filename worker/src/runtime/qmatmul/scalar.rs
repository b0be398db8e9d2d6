//! The reference kernel every SIMD variant is tested against.

use super::{offsets, ActivationView, PackedWeights, BLOCK};

/// The offset term of output `(row, col)`.
pub(super) fn offset_term(w: &PackedWeights, a: &ActivationView<'_>, row: usize, col: usize) -> f32 {
    let spb = w.format.scales_per_block();
    let per_column = w.nb * spb;
    let m = &w.m[col * per_column..(col + 1) * per_column];
    let s =
        if spb == 2 { &a.s16[row * per_column..(row + 1) * per_column] } else { &a.s32[row * w.nb..(row + 1) * w.nb] };
    offsets(m, s)
}

pub(super) fn tile<const R: usize, const C: usize>(
    w: &PackedWeights,
    a: &ActivationView<'_>,
    row: usize,
    col: usize,
    out: &mut [[f32; C]; R],
) {
    let (nb, spb) = (w.nb, w.format.scales_per_block());
    for (r, outs) in out.iter_mut().enumerate() {
        for (c, o) in outs.iter_mut().enumerate() {
            let (row, col) = (row + r, col + c);
            let mut sum = 0f32;
            for b in 0..nb {
                let (blk, ab) = (col * nb + b, row * nb + b);
                let qa = &a.q[ab * BLOCK..(ab + 1) * BLOCK];
                let mut dots = [0i32; 2];
                for (j, q) in qa.iter().enumerate() {
                    dots[j / 16] += i32::from(w.value(blk, j)) * i32::from(*q);
                }
                sum += if spb == 2 {
                    a.d[ab] * (w.d[2 * blk] * dots[0] as f32 + w.d[2 * blk + 1] * dots[1] as f32)
                } else {
                    a.d[ab] * w.d[blk] * (dots[0] + dots[1]) as f32
                };
            }
            *o = sum + offset_term(w, a, row, col);
        }
    }
}
