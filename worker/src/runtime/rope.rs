//! Rotary position embeddings for tokens at arbitrary positions: the tables
//! cover the whole context, and each token picks its own row, so one call
//! rotates the tokens of many sequences at once.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{Llama3Scaling, ModelConfig, RopeStyle};

pub struct Rope {
    /// `[context, head_dim / 2]`
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

/// The inverse frequency of each pair of dimensions, with Llama 3 scaling or
/// GGUF's per-frequency factors (`rope_freqs.weight`) applied.
pub fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    llama3: Option<&Llama3Scaling>,
    factors: Option<&[f32]>,
) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let base = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            if let Some(f) = factors.and_then(|f| f.get(i)) {
                return base / f64::from(*f);
            }
            let Some(s) = llama3 else { return base };
            let wavelength = 2.0 * std::f64::consts::PI / base;
            let low_wavelength = s.original_context / s.low_freq_factor;
            let high_wavelength = s.original_context / s.high_freq_factor;
            if wavelength < high_wavelength {
                base
            } else if wavelength > low_wavelength {
                base / s.factor
            } else {
                let smooth =
                    (s.original_context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * base / s.factor + smooth * base
            }
        })
        .collect()
}

/// A model's rotary frequencies: one set for its full-attention layers, and
/// one for its windowed layers where their base differs (Gemma 3).
#[derive(Debug, Clone, PartialEq)]
pub struct Frequencies {
    pub global: Vec<f64>,
    pub local: Option<Vec<f64>>,
}

impl Frequencies {
    /// `factors`: GGUF's per-frequency factors (`rope_freqs.weight`).
    pub fn of(config: &ModelConfig, factors: Option<&[f32]>) -> Self {
        let mut global =
            inverse_frequencies(config.head_dim, config.rope_theta, config.llama3_scaling.as_ref(), factors);
        global.iter_mut().for_each(|f| *f /= config.rope_linear_factor);
        let local = config.local_rope_theta.map(|theta| inverse_frequencies(config.head_dim, theta, None, None));
        Self { global, local }
    }

    /// The sets in table order: global, then local if any.
    pub fn tables(&self) -> impl Iterator<Item = &[f64]> {
        std::iter::once(self.global.as_slice()).chain(self.local.as_deref())
    }

    /// The table layer `layer` rotates with (an index into [`Self::tables`]).
    pub fn table_of(config: &ModelConfig, layer: usize) -> usize {
        usize::from(config.layer_rope_is_local(layer))
    }
}

impl Rope {
    pub fn new(inv_freq: &[f64], context: usize, style: RopeStyle, dtype: DType, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        let mut angles = Vec::with_capacity(context * half);
        for pos in 0..context {
            angles.extend(inv_freq.iter().map(|f| (pos as f64 * f) as f32));
        }
        let angles = Tensor::from_vec(angles, (context, half), device)?;
        Ok(Self { cos: angles.cos()?.to_dtype(dtype)?, sin: angles.sin()?.to_dtype(dtype)?, style })
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`), token `t` at `positions[t]`.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (tokens, heads, dim) = x.dims3()?;
        let cos = self.cos.index_select(positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(positions, 0)?.unsqueeze(1)?;
        // Each token is its own batch entry of one position: [tokens, heads, 1, dim].
        let x = x.reshape((tokens, heads, 1, dim))?.contiguous()?;
        let rotated = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        };
        rotated.reshape((tokens, heads, dim))
    }

    /// Positions the tables cover.
    pub fn context(&self) -> usize {
        self.cos.dims()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_context: 8192.0 };
        let plain = inverse_frequencies(128, 500_000.0, None, None);
        let scaled = inverse_frequencies(128, 500_000.0, Some(&s), None);
        assert_eq!(plain[0], scaled[0], "the highest frequency is kept");
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-15, "the lowest is divided by the factor");
        let factors = vec![2.0f32; 64];
        assert_eq!(inverse_frequencies(128, 10_000.0, None, Some(&factors))[5], plain_at(5) / 2.0);
    }

    fn plain_at(i: usize) -> f64 {
        1.0 / 10_000f64.powf(2.0 * i as f64 / 128.0)
    }

    /// The per-token layout rotates exactly as candle's kernels do a sequence
    /// laid out `[batch, heads, positions, dim]`.
    #[test]
    fn matches_candles_sequence_layout() -> Result<()> {
        let dev = Device::Cpu;
        for (t, h, d, style) in [
            (9, 3, 8, RopeStyle::Interleaved),
            (9, 3, 8, RopeStyle::Halves),
            (6, 9, 64, RopeStyle::Interleaved),
            (6, 9, 64, RopeStyle::Halves),
            (40, 3, 64, RopeStyle::Interleaved),
        ] {
            let inv = inverse_frequencies(d, 10_000.0, None, None);
            let x = Tensor::randn(0f32, 1.0, (t, h, d), &dev)?;
            let positions = Tensor::arange(0u32, t as u32, &dev)?;
            let rope = Rope::new(&inv, 64, style, DType::F32, &dev)?;
            let ours = rope.apply(&x, &positions)?;
            let seq = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
            let (cos, sin) = (rope.cos.narrow(0, 0, t)?, rope.sin.narrow(0, 0, t)?);
            let theirs = match style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&seq, &cos, &sin)?,
                RopeStyle::Halves => candle_nn::rotary_emb::rope(&seq, &cos, &sin)?,
            };
            let theirs = theirs.squeeze(0)?.transpose(0, 1)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{style:?} {t}x{h}x{d}: {diff}");
        }
        Ok(())
    }

    /// Rotating a batch of tokens at scattered positions equals rotating each alone.
    #[test]
    fn tokens_at_different_positions_rotate_independently() -> Result<()> {
        let dev = Device::Cpu;
        let inv = inverse_frequencies(8, 10_000.0, None, None);
        for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
            let rope = Rope::new(&inv, 32, style, DType::F32, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev)?;
            let positions = Tensor::new(&[5u32, 0, 17], &dev)?;
            let together = rope.apply(&x, &positions)?;
            for (t, p) in [5u32, 0, 17].iter().enumerate() {
                let alone = rope.apply(&x.narrow(0, t, 1)?, &Tensor::new(&[*p], &dev)?)?;
                let diff = (together.narrow(0, t, 1)? - alone)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-6, "{style:?} token {t}: {diff}");
            }
            let at_zero = rope.apply(&x.narrow(0, 1, 1)?, &Tensor::new(&[0u32], &dev)?)?;
            let diff = (at_zero - x.narrow(0, 1, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "position 0 is the identity");
        }
        Ok(())
    }
}
