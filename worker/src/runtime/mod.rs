//! The forward pass kandle owns: a Llama-family model run over a batch of
//! sequences at different positions in one call. Linear layers run once over
//! every token of the step; attention runs per sequence over its own blocks of
//! the paged KV cache.
//!
//! Two backends run it. Quantized weights of the types kandle has kernels for
//! run on the CPU forward pass ([`cpu`]: one thread-pool dispatch per step,
//! [`qmatmul`] kernels chosen by CPU feature detection). Everything else
//! (other devices, dense checkpoints, other GGUF types) runs as candle tensor
//! operations on the model's device; the two operations candle lacks (writing
//! KV slots, paged attention) are candle custom ops there, so another device
//! adds kernels, not a new design.

pub mod attention;
pub mod config;
mod cpu;
pub mod device;
pub mod kv_cache;
use kandle_pool as pool;
pub mod qmatmul;
pub mod rope;
pub mod weights;

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

pub use attention::{AttentionPlan, SequenceSlice};
pub use config::{Activation, Architecture, ModelConfig, RopeStyle};
use cpu::CpuModel;
pub use kv_cache::KvCache;
use pool::{Pool, Shared};
pub use qmatmul::{Isa, Level};
use rope::{Frequencies, Rope};
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
    /// Logits for every one of its tokens (a prompt's log-probabilities), not
    /// only the last.
    pub all_logits: bool,
}

impl StepSequence {
    pub fn new(tokens: Vec<u32>, start: usize, blocks: Vec<u32>) -> Self {
        Self { tokens, start, blocks, all_logits: false }
    }

    /// Rows of logits it yields.
    pub fn logit_rows(&self) -> usize {
        if self.all_logits {
            self.tokens.len()
        } else {
            1
        }
    }
}

/// The logits of a step: rows of `vocab` values, one per sequence (its last
/// token's), or one per token of a sequence that asks for all
/// ([`StepSequence::logit_rows`]), in step order; in a buffer reused from
/// step to step.
#[derive(Default)]
pub struct Logits {
    values: Shared<f32>,
    rows: usize,
    vocab: usize,
}

impl Logits {
    /// Makes room for `rows` rows of `vocab` logits (contents unspecified).
    pub fn resize(&mut self, rows: usize, vocab: usize) {
        self.values.resize(rows * vocab);
        self.rows = rows;
        self.vocab = vocab;
    }

    fn shared(&self) -> &Shared<f32> {
        &self.values
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn row(&mut self, i: usize) -> &[f32] {
        let vocab = self.vocab;
        &self.values.as_slice()[i * vocab..(i + 1) * vocab]
    }

    /// Row `i`, for the sampler to adjust in place.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        let vocab = self.vocab;
        &mut self.values.as_mut_slice()[i * vocab..(i + 1) * vocab]
    }
}

/// How the forward pass runs.
enum Backend {
    /// kandle's CPU kernels on its own thread pool: quantized weights on the CPU.
    Cpu(Box<CpuModel>),
    /// candle tensor operations (plus two custom ops): other devices, dense
    /// weights, and GGUF types kandle has no kernel for.
    Tensors { weights: Weights, ropes: Vec<Rope> },
}

pub struct Model {
    config: ModelConfig,
    backend: Backend,
    pool: Pool,
    device: Device,
    /// Rows of the embedding table (the tokenizer may know more ids).
    vocab_rows: usize,
}

impl Model {
    /// `context`: the longest sequence the model will run (rotary tables cover
    /// it); `threads`: the compute threads of the forward pass; `level`: the
    /// CPU kernels' instruction set (the one the weights were packed at).
    pub fn new(
        config: ModelConfig,
        weights: Weights,
        frequencies: &Frequencies,
        context: usize,
        device: Device,
        threads: usize,
        level: Level,
    ) -> Result<Self> {
        let pool = Pool::new(threads)?;
        let vocab_rows = weights.embedding.vocab();
        let backend = match weights.into_cpu(&device)? {
            Ok(cpu) => Backend::Cpu(Box::new(CpuModel::new(config.clone(), cpu, frequencies, context, level))),
            Err(weights) => {
                let ropes = frequencies
                    .tables()
                    .map(|f| Rope::new(f, frequencies.scale, context, config.rope_style, weights.dtype, &device))
                    .collect::<Result<_>>()?;
                Backend::Tensors { weights, ropes }
            }
        };
        Ok(Self { config, backend, pool, device, vocab_rows })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute threads of the forward pass.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The kernels the forward pass runs (`/ready` and the start-up log): the
    /// CPU dispatch level, or candle's tensor operations.
    pub fn kernels(&self) -> &'static str {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.level().name(),
            Backend::Tensors { .. } => "candle",
        }
    }

    /// A KV cache of `num_blocks` blocks of `block_size` tokens, of the kind this
    /// model's forward pass reads.
    pub fn kv_cache(&self, block_size: usize, num_blocks: usize) -> Result<KvCache> {
        match &self.backend {
            Backend::Cpu(_) => Ok(KvCache::new_host(&self.config, block_size, num_blocks)),
            Backend::Tensors { .. } => KvCache::new(&self.config, block_size, num_blocks, DType::F16, &self.device),
        }
    }

    /// Token ids this model reads (rows of its embedding table).
    pub fn vocab_rows(&self) -> usize {
        self.vocab_rows
    }

    /// The longest sequence the forward pass runs.
    fn context(&self) -> usize {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.context(),
            Backend::Tensors { ropes, .. } => ropes.first().map_or(0, Rope::context),
        }
    }

    /// Whether one sequence can run in a step on `cache`: tokens, inside the
    /// vocabulary, at positions inside the context, in blocks that cover them
    /// and lie in the cache. The scheduler asks before each step, so a
    /// sequence that cannot run fails alone, not with its whole batch.
    pub fn check(&self, seq: &StepSequence, cache: &KvCache) -> std::result::Result<(), String> {
        let end = seq.start + seq.tokens.len();
        let (context, block) = (self.context(), cache.block_size());
        if seq.tokens.is_empty() {
            return Err("a step sequence without tokens".into());
        }
        if end > context {
            return Err(format!("position {end} is past the context of {context}"));
        }
        if seq.blocks.len() * block < end {
            return Err(format!("{} blocks do not hold {end} tokens", seq.blocks.len()));
        }
        if let Some(bad) = seq.blocks.iter().find(|b| **b as usize >= cache.num_blocks()) {
            return Err(format!("block {bad} is outside the KV cache"));
        }
        if let Some(bad) = seq.tokens.iter().find(|t| **t as usize >= self.vocab_rows) {
            return Err(format!("token {bad} is outside the model's vocabulary of {}", self.vocab_rows));
        }
        Ok(())
    }

    /// Runs one step: every sequence's tokens at their positions, their keys and
    /// values written to their blocks. Leaves the logits of each sequence's last
    /// token (of every token, for one that asks) in `logits`.
    pub fn forward(&self, sequences: &[StepSequence], cache: &KvCache, logits: &mut Logits) -> Result<()> {
        let (plan, tokens) = self.plan(sequences, cache)?;
        // The step's tokens whose logits each sequence wants: its last, or all.
        let logit_tokens: Vec<Range<usize>> = plan
            .sequences
            .iter()
            .zip(sequences)
            .map(|(slice, seq)| {
                let end = slice.query_start + slice.query_len;
                end - seq.logit_rows()..end
            })
            .collect();
        match &self.backend {
            Backend::Cpu(cpu) => cpu.forward(&self.pool, &plan, &tokens, &logit_tokens, cache, logits),
            Backend::Tensors { weights, ropes } => {
                let values = self
                    .device
                    .with_context(|| self.forward_tensors(weights, ropes, &plan, &tokens, &logit_tokens, cache))?;
                let (rows, vocab) = values.dims2()?;
                logits.resize(rows, vocab);
                logits.values.as_mut_slice().copy_from_slice(&values.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }

    /// Where each sequence's tokens go in the step, checked against the context
    /// and its blocks.
    fn plan(&self, sequences: &[StepSequence], cache: &KvCache) -> Result<(AttentionPlan, Vec<u32>)> {
        let cfg = &self.config;
        let mut tokens = Vec::new();
        let mut plan = Vec::with_capacity(sequences.len());
        for seq in sequences {
            // The scheduler asked already; a step that reaches here unchecked fails whole.
            self.check(seq, cache).map_err(candle_core::Error::msg)?;
            plan.push(SequenceSlice {
                query_start: tokens.len(),
                query_len: seq.tokens.len(),
                context_len: seq.start + seq.tokens.len(),
                blocks: seq.blocks.clone(),
            });
            tokens.extend_from_slice(&seq.tokens);
        }
        let plan = AttentionPlan {
            sequences: plan,
            block_size: cache.block_size(),
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg.attention_scale as f32,
            // Set per layer.
            window: None,
        };
        Ok((plan, tokens))
    }

    /// The forward pass in candle tensor operations: `[sequences, vocab]` f32.
    fn forward_tensors(
        &self,
        weights: &Weights,
        ropes: &[Rope],
        plan: &AttentionPlan,
        tokens: &[u32],
        logit_tokens: &[Range<usize>],
        cache: &KvCache,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let block = plan.block_size;
        let (mut positions, mut slots) = (Vec::new(), Vec::new());
        for seq in &plan.sequences {
            for p in seq.context_len - seq.query_len..seq.context_len {
                positions.push(p as u32);
                slots.push(seq.blocks[p / block] * block as u32 + (p % block) as u32);
            }
        }
        let last: Vec<u32> = logit_tokens.iter().flat_map(|r| r.clone().map(|t| t as u32)).collect();
        let n = tokens.len();
        let full = Arc::new(plan.clone());
        let windowed = Arc::new(AttentionPlan { window: cfg.sliding_window, ..plan.clone() });
        let slots: Arc<[u32]> = slots.into();
        let tokens = Tensor::new(tokens, &self.device)?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let dtype = weights.dtype;
        let eps = cfg.rms_eps as f32;
        let pool = &self.pool;

        let mut x = weights.embedding.rows(&tokens, dtype)?;
        if let Some(scale) = cfg.architecture.embedding_scale(cfg.hidden) {
            x = (x * f64::from(scale))?;
        }
        let norm = |x: &Tensor, weight: &Tensor| candle_nn::ops::rms_norm(x, weight, eps);
        for (i, layer) in weights.layers.iter().enumerate() {
            let rope = &ropes[Frequencies::table_of(cfg, i)];
            let plan = if cfg.layer_window(i).is_some() { &windowed } else { &full };
            let h = norm(&x, &layer.attn_norm)?;
            let mut q = layer.q.forward(&h, pool)?.reshape((n, cfg.heads, cfg.head_dim))?;
            let mut k = layer.k.forward(&h, pool)?.reshape((n, cfg.kv_heads, cfg.head_dim))?;
            let v = layer.v.forward(&h, pool)?.reshape((n, cfg.kv_heads, cfg.head_dim))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = norm(&q.contiguous()?, qn)?;
                k = norm(&k.contiguous()?, kn)?;
            }
            let q = rope.apply(&q, &positions)?;
            let k = rope.apply(&k, &positions)?;
            let (k_cache, v_cache) = cache.layer(i)?;
            cache.write(i, &k, &v, &slots)?;
            let attn = attention::paged_attention(&q, k_cache, v_cache, plan)?;
            let attn = attn.to_dtype(dtype)?.reshape((n, cfg.heads * cfg.head_dim))?;
            let mut out = layer.o.forward(&attn, pool)?;
            if let Some(post) = &layer.post_attn_norm {
                out = norm(&out, post)?;
            }
            x = (x + out)?;
            let h = norm(&x, &layer.ffn_norm)?;
            let gate = layer.gate.forward(&h, pool)?;
            let gate = match cfg.architecture.activation() {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let mut out = layer.down.forward(&(gate * layer.up.forward(&h, pool)?)?, pool)?;
            if let Some(post) = &layer.post_ffn_norm {
                out = norm(&out, post)?;
            }
            x = (x + out)?;
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = norm(&x.index_select(&last, 0)?, &weights.norm)?;
        weights.lm_head.forward(&x, pool)?.to_dtype(DType::F32)
    }
}
