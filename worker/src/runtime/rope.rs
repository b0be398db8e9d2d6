//! Rotary position embeddings for tokens at arbitrary positions: the tables
//! cover the whole context, and each token picks its own row, so one call
//! rotates the tokens of many sequences at once.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{Llama3Scaling, ModelConfig, RopeStyle};

pub struct Rope {
    /// `[context, rotary_dim / 2]`
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
/// one for its windowed layers where their base differs (Gemma 3); and the
/// factor on every cos and sin (LongRoPE's attention factor, else 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Frequencies {
    pub global: Vec<f64>,
    pub local: Option<Vec<f64>>,
    pub scale: f64,
}

impl Frequencies {
    /// For a model served up to `context` tokens; `factors`: GGUF's
    /// per-frequency divisors (`rope_freqs.weight`, or Phi-3's
    /// `rope_factors_short`/`_long` for that context).
    pub fn of(config: &ModelConfig, factors: Option<&[f32]>, context: usize) -> Self {
        let dim = config.rotary_dim;
        let longrope: Option<Vec<f32>> =
            config.longrope.as_ref().map(|l| l.factors(context).iter().map(|&f| f as f32).collect());
        let factors = factors.or(longrope.as_deref());
        let mut global = inverse_frequencies(dim, config.rope_theta, config.llama3_scaling.as_ref(), factors);
        global.iter_mut().for_each(|f| *f /= config.rope_linear_factor);
        let local = config.local_rope_theta.map(|theta| inverse_frequencies(dim, theta, None, None));
        let scale = config.longrope.as_ref().map_or(1.0, |l| l.attention_factor);
        Self { global, local, scale }
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

/// `cos` and `sin` of every position's angles, times `scale`, `[context, inv_freq.len()]`.
pub fn tables(inv_freq: &[f64], scale: f64, context: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(context * half), Vec::with_capacity(context * half));
    for pos in 0..context {
        for f in inv_freq {
            // The angle rounded to f32 as the references compute it.
            let angle = (pos as f64 * f) as f32;
            cos.push(angle.cos() * scale as f32);
            sin.push(angle.sin() * scale as f32);
        }
    }
    (cos, sin)
}

impl Rope {
    /// Tables of `cos` and `sin` (times `scale`) of every position's angles.
    pub fn new(
        inv_freq: &[f64],
        scale: f64,
        context: usize,
        style: RopeStyle,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = tables(inv_freq, scale, context);
        let half = inv_freq.len();
        let table = |values: Vec<f32>| Tensor::from_vec(values, (context, half), device)?.to_dtype(dtype);
        Ok(Self { cos: table(cos)?, sin: table(sin)?, style })
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`), token `t` at `positions[t]`:
    /// the leading dimensions the tables cover, the rest kept.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (tokens, heads, dim) = x.dims3()?;
        let rotary = 2 * self.cos.dims()[1];
        let cos = self.cos.index_select(positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(positions, 0)?.unsqueeze(1)?;
        // Each token is its own batch entry of one position: [tokens, heads, 1, dim].
        let x = x.reshape((tokens, heads, 1, dim))?;
        let turned = x.narrow(3, 0, rotary)?.contiguous()?;
        let rotated = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&turned, &cos, &sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&turned, &cos, &sin)?,
        };
        let rotated =
            if rotary < dim { Tensor::cat(&[&rotated, &x.narrow(3, rotary, dim - rotary)?], 3)? } else { rotated };
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

    /// Phi-3's LongRoPE from its config.json: the short divisors up to the
    /// original context, the long ones past it, each dividing the plain
    /// frequency of the rotated (partial) dimensions, and Hugging Face's
    /// attention factor on cos and sin.
    #[test]
    fn longrope_divides_by_the_list_the_served_context_picks() {
        let config = serde_json::json!({"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100, "rope_theta": 10000.0,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0, 3.0, 4.0],
                             "long_factor": [5.0, 6.0, 7.0, 8.0]}});
        let config = ModelConfig::from_hf(&config).expect("a config");
        config.check().expect("consistent");
        assert_eq!((config.head_dim, config.rotary_dim), (16, 8));
        let plain = inverse_frequencies(8, 10_000.0, None, None);
        let short = Frequencies::of(&config, None, 4096);
        let long = Frequencies::of(&config, None, 8192);
        for (i, p) in plain.iter().enumerate() {
            assert!((short.global[i] - p / (i + 1) as f64).abs() < 1e-15);
            assert!((long.global[i] - p / (i + 5) as f64).abs() < 1e-15);
        }
        let factor = (1.0 + (131072f64 / 4096.0).ln() / 4096f64.ln()).sqrt();
        assert!((short.scale - factor).abs() < 1e-12 && long.scale == short.scale);
        let (cos, _) = tables(&short.global, short.scale, 2);
        assert!((f64::from(cos[0]) - factor).abs() < 1e-6, "cos 0 carries the factor");
        // A list of the wrong length is refused.
        let mut wrong = config.clone();
        wrong.longrope.as_mut().expect("longrope").short.pop();
        assert!(wrong.check().is_err());
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
            let rope = Rope::new(&inv, 1.0, 64, style, DType::F32, &dev)?;
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
            let rope = Rope::new(&inv, 1.0, 32, style, DType::F32, &dev)?;
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
