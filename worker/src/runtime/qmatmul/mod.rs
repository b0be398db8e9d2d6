//! Quantized matrix multiplication: `[rows, k]` f32 activations times the
//! transpose of a `[n, k]` GGUF-quantized weight matrix.
//!
//! Weights are repacked once at load (see [`formats`]) into 32-value blocks of
//! small unsigned integers with a scale and an offset, laid out for the
//! level's kernels ([`Layout`]): the scalar level interleaves blocks by
//! groups of four columns (block `b` of the four, then block `b + 1`), so a
//! tile of four columns streams one array of values and one of scales; every
//! x86 level (AVX2 and up) puts eight columns side by side in each vector
//! ([`lanes`]). Activations are quantized once
//! per layer input to signed bytes per 32-value block (`x ≈ da * qa`) and
//! reused by every projection that reads that input. A block's contribution is
//! then `dw * da * Σ u·qa + m * da * Σ qa`: one integer dot product of unsigned
//! by signed bytes (what x86's `vpmaddubsw` and VNNI's `vpdpbusd` compute), a
//! scaling, and an offset term (`da * Σ qa` is computed once per activation
//! block).
//!
//! Output tiles of a few rows by a few columns keep their accumulators in
//! registers, so each weight block is loaded once for every row of the tile;
//! large steps go through the rows in chunks that stay in L1. The integer dot
//! product has a scalar reference and x86 variants chosen at start-up by CPU
//! feature detection ([`Level`]); tests hold every variant to the reference.

pub mod formats;
mod lanes;
mod level;
mod quantize;
mod scalar;

use std::ops::Range;

use half::f16;

pub use formats::Format;
use formats::Storage;
pub use level::{Isa, Level};

use super::pool::Shared;

pub const BLOCK: usize = 32;

/// Activations of `rows` rows of `k` values, quantized per 32-value block.
#[derive(Default)]
pub struct Activations {
    rows: usize,
    k: usize,
    /// Signed bytes, row-major.
    q: Shared<i8>,
    /// Per block: the scale.
    d: Shared<f32>,
    /// Per block, 8 lanes: `d * Σ q` over the first 16 values in lane 0, over
    /// the last 16 in lane 4, zeros elsewhere: multiplied lane by lane with a
    /// block's offsets (`[m ×8]`, or Q6_K's `[m_lo ×4, m_hi ×4]`) and summed,
    /// the block's offset term.
    s: Shared<f32>,
}

impl Activations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sizes the buffers for `rows` rows of `k` values (a multiple of 32);
    /// allocates only when they grow.
    pub fn prepare(&mut self, rows: usize, k: usize) {
        assert!(k.is_multiple_of(BLOCK), "activations of {k} values are not whole blocks");
        let blocks = rows * k / BLOCK;
        self.rows = rows;
        self.k = k;
        self.q.resize(rows * k);
        self.d.resize(blocks);
        self.s.resize(8 * blocks);
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Quantizes `x` as values `part` (whole blocks) of row `row`.
    ///
    /// # Safety
    /// No other thread reads or writes these blocks' data during the call.
    pub unsafe fn quantize_part(&self, level: Level, row: usize, part: Range<usize>, x: &[f32]) {
        assert!(
            row < self.rows && part.end <= self.k && part.start.is_multiple_of(BLOCK) && part.end.is_multiple_of(BLOCK),
            "values {part:?} of row {row} are not whole blocks of {} rows of {}",
            self.rows,
            self.k
        );
        assert_eq!(x.len(), part.len(), "quantize_part: {} values for {part:?}", x.len());
        let (first, last) = ((row * self.k + part.start) / BLOCK, (row * self.k + part.end) / BLOCK);
        // SAFETY: the caller gives this thread these blocks alone.
        let (q, d, s) = unsafe {
            (
                self.q.get_mut(first * BLOCK..last * BLOCK),
                self.d.get_mut(first..last),
                self.s.get_mut(8 * first..8 * last),
            )
        };
        for (((xs, qs), d), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d).zip(s.chunks_exact_mut(8))
        {
            *d = quantize::block(level, xs, qs, s);
        }
    }

    /// Sizes and quantizes every row (`x`: `rows` rows of `k`) on this thread.
    pub fn quantize(&mut self, level: Level, x: &[f32], rows: usize, k: usize) {
        self.prepare(rows, k);
        assert_eq!(x.len(), rows * k, "quantize: {} values for {rows} rows of {k}", x.len());
        for (row, x) in x.chunks_exact(k).enumerate() {
            // SAFETY: `&mut self`: no other thread can reach the buffers.
            unsafe { self.quantize_part(level, row, 0..k, x) };
        }
    }

    /// The buffers, for the kernels.
    ///
    /// # Safety
    /// No thread writes the activations while the view lives.
    unsafe fn view(&self) -> ActivationView<'_> {
        let blocks = self.rows * self.k / BLOCK;
        // SAFETY: whole buffers, read-only; the caller rules out writers.
        unsafe {
            ActivationView {
                nb: self.k / BLOCK,
                q: self.q.get(0..self.rows * self.k),
                d: self.d.get(0..blocks),
                s: self.s.get(0..8 * blocks),
            }
        }
    }
}

/// Read-only activations, as the kernels see them.
struct ActivationView<'a> {
    nb: usize,
    q: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

/// A `[n, k]` quantized weight matrix, repacked for the kernels.
pub struct PackedWeights {
    n: usize,
    k: usize,
    nb: usize,
    format: Format,
    /// Values: 16 (nibbles) or 32 (bytes) per block, where `layout` puts them.
    q: Vec<u8>,
    scales: Scales,
    level: Level,
    layout: Layout,
}

/// Where a matrix's values and scales are stored, chosen by the level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Block `b` of a group of [`GROUP`] columns side by side ([`slot`]).
    Blocks,
    /// Eight columns side by side in every 32-byte chunk ([`lanes`]).
    Lanes,
}

impl Layout {
    fn of(level: Level) -> Self {
        if cfg!(target_arch = "x86_64") && level.has_avx2() {
            Self::Lanes
        } else {
            Self::Blocks
        }
    }

    /// Columns stored together (the matrix is padded to a multiple).
    fn columns(self) -> usize {
        match self {
            Self::Blocks => GROUP,
            Self::Lanes => lanes::LANES,
        }
    }

    /// The byte holding value `j` of block `b` of column `col`, and whether
    /// the value is its high nibble.
    fn value_at(self, format: Format, nb: usize, col: usize, b: usize, j: usize) -> (usize, bool) {
        match (self, format.storage()) {
            (Self::Blocks, Storage::Nibbles) => (slot(nb, col, b) * BLOCK / 2 + j % 16, j >= 16),
            (Self::Blocks, Storage::Bytes) => (slot(nb, col, b) * BLOCK + j, false),
            (Self::Lanes, storage) => lanes::value_at(storage, nb, col, b, j),
        }
    }

    /// The index of scale `h` of block `b` of column `col` among f16 pairs
    /// (`half`) or f32 scales.
    fn scale_at(self, half: bool, spb: usize, nb: usize, col: usize, b: usize, h: usize) -> usize {
        match self {
            Self::Blocks => slot(nb, col, b) * spb + h,
            Self::Lanes => lanes::scale_at(half, spb, nb, col, b, h),
        }
    }

    /// A decoded value as stored (and back: each mapping is its own inverse).
    fn stored(self, format: Format, u: u8) -> u8 {
        match self {
            Self::Blocks => u,
            Self::Lanes => lanes::stored(format, u),
        }
    }
}

/// Per block (two per block for Q6_K): scale and offset.
enum Scales {
    /// The f16 pairs of the formats that store them so (and whose offsets are
    /// the stored minimum or a power of two times the scale, so exact in f16):
    /// 4 bytes a block, what matrix-vector products mostly stream.
    Half(Vec<[f16; 2]>),
    /// K-quants: the super block's scale times the sub-block's, in f32.
    Full { d: Vec<f32>, m: Vec<f32> },
}

impl Scales {
    /// Scale and offset `i` (block `i`, or half block `i` for Q6_K).
    fn get(&self, i: usize) -> (f32, f32) {
        match self {
            Self::Half(dm) => (dm[i][0].to_f32(), dm[i][1].to_f32()),
            Self::Full { d, m } => (d[i], m[i]),
        }
    }
}

/// Columns whose blocks are stored interleaved: block `b` of the group's
/// columns lie side by side (a 4-column tile streams one array), then block `b + 1`.
pub const GROUP: usize = 4;

/// The storage slot of block `b` of column `col`, of a matrix of `nb` blocks
/// per column (the last group padded to whole).
fn slot(nb: usize, col: usize, b: usize) -> usize {
    ((col / GROUP) * nb + b) * GROUP + col % GROUP
}

/// Where a matmul's output goes: element `(row, col)` of the product is
/// `data[row * stride + offset + col]`, stored or (`add`) added.
pub struct Output<'a> {
    pub data: &'a Shared<f32>,
    pub stride: usize,
    pub offset: usize,
    pub add: bool,
}

impl PackedWeights {
    /// From the GGUF bytes of an `[n, k]` matrix; `None` when they do not make one.
    pub fn from_gguf(bytes: &[u8], n: usize, k: usize, format: Format, level: Level) -> Option<Self> {
        let per_block = format.block_values();
        if n == 0 || !k.is_multiple_of(per_block) || bytes.len() != n * k / per_block * format.block_bytes() {
            return None;
        }
        let (nb, spb, storage) = (k / BLOCK, format.scales_per_block(), format.storage());
        let layout = Layout::of(level);
        let columns = n.div_ceil(layout.columns()) * layout.columns();
        let mut q = vec![0u8; columns * nb * BLOCK / storage.values_per_byte()];
        let (mut d, mut m) = (vec![0f32; columns * nb * spb], vec![0f32; columns * nb * spb]);
        let mut blocks = Vec::with_capacity(per_block / BLOCK);
        let mut next = 0;
        for gguf_block in bytes.chunks_exact(format.block_bytes()) {
            blocks.clear();
            formats::decode(format, gguf_block, &mut blocks);
            for block in &blocks {
                let (col, b) = (next / nb, next % nb);
                next += 1;
                for (j, u) in block.u.iter().enumerate() {
                    let (at, high) = layout.value_at(format, nb, col, b, j);
                    q[at] |= if high { layout.stored(format, *u) << 4 } else { layout.stored(format, *u) };
                }
                for h in 0..spb {
                    // f32 positions here; f16 pairs are put in their order below.
                    let at = layout.scale_at(false, spb, nb, col, b, h);
                    (d[at], m[at]) = (block.d[h], block.m[h]);
                }
            }
        }
        // K-quants' folded scales are rarely exact in f16: they stay f32 without trying.
        let exact = format.block_values() == BLOCK
            && d.iter().zip(&m).all(|(d, m)| f16::from_f32(*d).to_f32() == *d && f16::from_f32(*m).to_f32() == *m);
        let scales = if exact {
            let mut half = vec![[f16::ZERO; 2]; d.len()];
            for col in 0..columns {
                for b in 0..nb {
                    let from = layout.scale_at(false, spb, nb, col, b, 0);
                    half[layout.scale_at(true, spb, nb, col, b, 0)] = [f16::from_f32(d[from]), f16::from_f32(m[from])];
                }
            }
            Scales::Half(half)
        } else {
            Scales::Full { d, m }
        };
        Some(Self { n, k, nb, format, q, scales, level, layout })
    }

    /// `[n, k]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The level its kernels run at (and its activations are quantized at).
    pub fn level(&self) -> Level {
        self.level
    }

    /// Value `j` of block `b` of column `col`, as the format's decoding gave it.
    fn value(&self, col: usize, b: usize, j: usize) -> u8 {
        let (at, high) = self.layout.value_at(self.format, self.nb, col, b, j);
        let byte = self.q[at];
        let stored = match (self.format.storage(), high) {
            (Storage::Nibbles, false) => byte & 0x0f,
            (Storage::Nibbles, true) => byte >> 4,
            (Storage::Bytes, _) => byte,
        };
        self.layout.stored(self.format, stored)
    }

    /// Scale and offset of value `j` of block `b` of column `col`.
    fn scale(&self, col: usize, b: usize, j: usize) -> (f32, f32) {
        let spb = self.format.scales_per_block();
        let h = if spb == 2 { j / 16 } else { 0 };
        let half = matches!(self.scales, Scales::Half(_));
        self.scales.get(self.layout.scale_at(half, spb, self.nb, col, b, h))
    }

    /// Row `index` of the `[n, k]` matrix in f32 (an embedding lookup).
    pub fn dequantize_row(&self, index: usize, out: &mut [f32]) {
        assert!(index < self.n && out.len() == self.k, "row {index} of {}x{}", self.n, self.k);
        for (b, values) in out.chunks_exact_mut(BLOCK).enumerate() {
            for (j, v) in values.iter_mut().enumerate() {
                let (d, m) = self.scale(index, b, j);
                *v = d * f32::from(self.value(index, b, j)) + m;
            }
        }
    }

    /// Column ranges given to different threads should start on multiples of
    /// this (a range may start anywhere; aligned ones share no stored group).
    pub fn column_align(&self) -> usize {
        self.layout.columns()
    }

    /// Columns `cols` of `a × Wᵀ` into `out`.
    ///
    /// # Safety
    /// No other thread reads or writes the output elements of these columns,
    /// nor writes the activations, during the call.
    pub unsafe fn matmul(&self, a: &Activations, cols: Range<usize>, out: &Output<'_>) {
        assert_eq!(a.k, self.k, "activations of {} values for weights of {}", a.k, self.k);
        assert!(cols.end <= self.n, "columns {cols:?} of {}", self.n);
        assert!(
            a.rows == 0 || (a.rows - 1) * out.stride + out.offset + cols.end <= out.data.len(),
            "the output does not hold {} rows",
            a.rows
        );
        // SAFETY: the caller rules out writers of the activations.
        let view = unsafe { a.view() };
        #[cfg(target_arch = "x86_64")]
        if self.layout == Layout::Lanes {
            // SAFETY: the lanes layout is chosen only at levels of AVX2 and
            // up, made only by detecting their features (AVX2, FMA and F16C
            // included); the rest is the caller's, and the output holds every
            // row (asserted above).
            return unsafe { lanes::matmul(self, &view, a.rows, cols, out) };
        }
        // Rows in chunks whose activations stay in L1 while the columns pass.
        const ROW_CHUNK: usize = 32;
        for chunk in (0..a.rows).step_by(ROW_CHUNK) {
            let chunk_end = (chunk + ROW_CHUNK).min(a.rows);
            let mut row = chunk;
            while row < chunk_end {
                let left = chunk_end - row;
                // SAFETY: forwarded from the caller.
                row += unsafe {
                    match left {
                        1 => self.columns::<1, 4>(&view, row, cols.clone(), out),
                        2 => self.columns::<2, 4>(&view, row, cols.clone(), out),
                        3 => self.columns::<3, 2>(&view, row, cols.clone(), out),
                        _ => self.columns::<4, 2>(&view, row, cols.clone(), out),
                    }
                };
            }
        }
    }

    /// Rows `row..row + R` of columns `cols`, `C` columns per tile (then one at
    /// a time). Returns `R`.
    ///
    /// # Safety
    /// As for [`PackedWeights::matmul`]; `row + R <= a.rows`, `cols.end <= n`.
    unsafe fn columns<const R: usize, const C: usize>(
        &self,
        a: &ActivationView<'_>,
        row: usize,
        cols: Range<usize>,
        out: &Output<'_>,
    ) -> usize {
        let mut col = cols.start;
        while col < cols.end {
            if cols.end - col >= C {
                let mut tile = [[0f32; C]; R];
                self.tile::<R, C>(a, row, col, &mut tile);
                // SAFETY: forwarded from the caller.
                unsafe { store(out, row, col, &tile) };
                col += C;
            } else {
                let mut tile = [[0f32; 1]; R];
                self.tile::<R, 1>(a, row, col, &mut tile);
                // SAFETY: forwarded from the caller.
                unsafe { store(out, row, col, &tile) };
                col += 1;
            }
        }
        R
    }

    /// One `R × C` tile by the scalar reference (the block layout's kernel).
    fn tile<const R: usize, const C: usize>(
        &self,
        a: &ActivationView<'_>,
        row: usize,
        col: usize,
        out: &mut [[f32; C]; R],
    ) {
        assert!(col + C <= self.n && (row + R) * a.nb <= a.d.len(), "tile outside the matrices");
        scalar::tile(self, a, row, col, out)
    }
}

/// Writes (or adds) a finished tile.
///
/// # Safety
/// No other thread touches these output elements.
unsafe fn store<const R: usize, const C: usize>(out: &Output<'_>, row: usize, col: usize, tile: &[[f32; C]; R]) {
    for (r, values) in tile.iter().enumerate() {
        let at = (row + r) * out.stride + out.offset + col;
        // SAFETY: the caller gives this thread these elements.
        let dst = unsafe { out.data.get_mut(at..at + C) };
        if out.add {
            dst.iter_mut().zip(values).for_each(|(d, v)| *d += v);
        } else {
            dst.copy_from_slice(values);
        }
    }
}

#[cfg(test)]
mod tests;
