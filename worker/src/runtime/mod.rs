//! The forward pass kandle owns: a Llama-family model run over a batch of
//! sequences at different positions in one call. Linear layers run once over
//! every token of the step; attention runs per sequence over its own blocks of
//! the paged KV cache. Tensors live on the device chosen at start-up; the two
//! operations candle lacks (writing KV slots, paged attention) are candle custom
//! ops, so another device adds kernels, not a new design.

pub mod attention;
pub mod config;
pub mod kv_cache;
pub mod qmatmul;
pub mod rope;
pub mod weights;

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

pub use attention::{AttentionPlan, SequenceSlice};
pub use config::{Architecture, ModelConfig, RopeStyle};
pub use kv_cache::KvCache;
use rope::Rope;
use weights::Weights;

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSequence {
    /// Its tokens in this step.
    pub tokens: Vec<u32>,
    /// Position of the first of them (tokens already in the cache).
    pub start: usize,
    /// Its KV blocks, enough for `start + tokens.len()` tokens.
    pub blocks: Vec<u32>,
}

pub struct Model {
    config: ModelConfig,
    weights: Weights,
    rope: Rope,
    device: Device,
}

impl Model {
    /// `context`: the longest sequence the model will run (rotary tables cover it).
    pub fn new(
        config: ModelConfig,
        weights: Weights,
        inv_freq: &[f64],
        context: usize,
        device: Device,
    ) -> Result<Self> {
        let rope = Rope::new(inv_freq, context, config.rope_style, weights.dtype, &device)?;
        Ok(Self { config, weights, rope, device })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype activations (and dense weights) run in.
    pub fn dtype(&self) -> DType {
        self.weights.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step: every sequence's tokens at their positions, their keys and
    /// values written to their blocks. Returns the logits of each sequence's last
    /// token, `[sequences, vocab]` in f32.
    pub fn forward(&self, sequences: &[StepSequence], cache: &KvCache) -> Result<Tensor> {
        let cfg = &self.config;
        let block = cache.block_size();
        let (mut tokens, mut positions, mut slots, mut last) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut plan = Vec::with_capacity(sequences.len());
        for seq in sequences {
            let end = seq.start + seq.tokens.len();
            if seq.tokens.is_empty() || end > self.rope.context() || seq.blocks.len() * block < end {
                candle_core::bail!(
                    "a step sequence of {} tokens at {} does not fit (context {}, {} blocks)",
                    seq.tokens.len(),
                    seq.start,
                    self.rope.context(),
                    seq.blocks.len()
                );
            }
            plan.push(SequenceSlice {
                query_start: tokens.len(),
                query_len: seq.tokens.len(),
                context_len: end,
                blocks: seq.blocks.clone(),
            });
            tokens.extend_from_slice(&seq.tokens);
            for p in seq.start..end {
                positions.push(p as u32);
                slots.push(seq.blocks[p / block] * block as u32 + (p % block) as u32);
            }
            last.push((tokens.len() - 1) as u32);
        }
        let n = tokens.len();
        let plan = Arc::new(AttentionPlan {
            sequences: plan,
            block_size: block,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        });
        let slots: Arc<[u32]> = slots.into();
        let tokens = Tensor::new(tokens.as_slice(), &self.device)?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let dtype = self.weights.dtype;
        let eps = cfg.rms_eps as f32;

        let mut x = self.weights.embedding.rows(&tokens, dtype)?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut q = layer.q.forward(&h)?.reshape((n, cfg.heads, cfg.head_dim))?;
            let mut k = layer.k.forward(&h)?.reshape((n, cfg.kv_heads, cfg.head_dim))?;
            let v = layer.v.forward(&h)?.reshape((n, cfg.kv_heads, cfg.head_dim))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?;
            }
            let q = self.rope.apply(&q, &positions)?;
            let k = self.rope.apply(&k, &positions)?;
            let (k_cache, v_cache) = cache.layer(i);
            cache.write(i, &k, &v, &slots)?;
            let attn = attention::paged_attention(&q, k_cache, v_cache, &plan)?;
            let attn = attn.to_dtype(dtype)?.reshape((n, cfg.heads * cfg.head_dim))?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = candle_nn::ops::rms_norm(&x.index_select(&last, 0)?, &self.weights.norm, eps)?;
        self.weights.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}
