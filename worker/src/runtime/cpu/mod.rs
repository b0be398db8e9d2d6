//! The CPU forward pass: the whole step runs as one dispatch of the thread
//! pool, its phases (norm and quantize, projections, rotary + KV write,
//! attention, ...) separated by barriers. Every buffer lives in a scratch set
//! reused from step to step, so a steady stream of steps allocates nothing.
//!
//! Work is split so that no two threads write the same element: projections
//! by output columns (q, k and v in one phase reading one quantized input, as
//! gate and up do), row-wise work by pieces of rows (so one token's row is
//! split too), attention by tiles of queries ([`attend`]: a sequence's tokens
//! by the heads of one KV group), which threads claim, largest first, from a
//! counter.

mod attend;
mod ops;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Result;

use super::attention::AttentionPlan;
use super::config::{Activation, ModelConfig, RopeStyle};
use super::kv_cache::KvCache;
use super::pool::{Pool, Shared, Worker};
use super::qmatmul::{Activations, Level, Output, PackedWeights, BLOCK};
use super::rope::{self, Frequencies};
use super::Logits;

pub struct CpuLayer {
    pub attn_norm: Vec<f32>,
    /// q, k and v.
    pub qkv: [Arc<PackedWeights>; 3],
    /// Qwen2: the biases of q, k and v, concatenated.
    pub qkv_bias: Option<Vec<f32>>,
    /// Qwen3 and Gemma 3: per-head norms of q and k.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub o: Arc<PackedWeights>,
    /// Gemma 3: norms of the attention and MLP outputs before the residual add.
    pub post_norms: Option<(Vec<f32>, Vec<f32>)>,
    pub ffn_norm: Vec<f32>,
    /// gate and up.
    pub gate_up: [Arc<PackedWeights>; 2],
    pub down: Arc<PackedWeights>,
}

pub struct CpuWeights {
    pub embedding: Arc<PackedWeights>,
    pub layers: Vec<CpuLayer>,
    pub norm: Vec<f32>,
    pub lm_head: Arc<PackedWeights>,
}

pub struct CpuModel {
    config: ModelConfig,
    weights: CpuWeights,
    /// Per set of rotary frequencies ([`Frequencies::tables`]): cos and sin,
    /// `[context, rotary_dim / 2]` each.
    rope: Vec<(Vec<f32>, Vec<f32>)>,
    context: usize,
    level: Level,
    scratch: Mutex<Scratch>,
}

/// The step's buffers (see the module comment).
#[derive(Default)]
struct Scratch {
    x: Shared<f32>,
    /// An attention or MLP output before its norm (models with post norms).
    branch: Shared<f32>,
    normed: Shared<f32>,
    input: Activations,
    qkv: Shared<f32>,
    attn: Shared<f32>,
    attn_input: Activations,
    gate_up: Shared<f32>,
    mid: Shared<f32>,
    mid_input: Activations,
    last_input: Activations,
    /// The step's attention tiles, largest first; per layer, the counter
    /// threads claim them from; per thread, its buffers.
    tiles: Vec<AttendItem>,
    claimed: Vec<AtomicUsize>,
    attend: Vec<Mutex<attend::Buffers>>,
    positions: Vec<usize>,
    slots: Vec<usize>,
    /// `slots` sorted, to check that no two tokens share one.
    sorted_slots: Vec<usize>,
    /// Per token: its sequence in the plan.
    owners: Vec<usize>,
    last: Vec<usize>,
}

/// One tile of a step's attention.
struct AttendItem {
    tile: attend::Tile,
    /// The step's index of the tile's first token.
    token: usize,
    /// Its first query head.
    head: usize,
    /// Its sequence in the plan.
    sequence: usize,
}

impl AttendItem {
    fn cost(&self) -> usize {
        self.tile.tokens * self.tile.heads * (self.tile.first + self.tile.tokens)
    }
}

impl CpuModel {
    pub fn new(
        config: ModelConfig,
        weights: CpuWeights,
        frequencies: &Frequencies,
        context: usize,
        level: Level,
    ) -> Self {
        let rope = frequencies.tables().map(|inv_freq| rope::tables(inv_freq, frequencies.scale, context)).collect();
        Self { config, weights, rope, context, level, scratch: Mutex::default() }
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// Runs one step (see [`super::Model::forward`]) on `pool`; the logits
    /// of the step's tokens `logit_tokens[i]` of each sequence `i`.
    pub fn forward(
        &self,
        pool: &Pool,
        plan: &AttentionPlan,
        tokens: &[u32],
        logit_tokens: &[Range<usize>],
        cache: &KvCache,
        logits: &mut Logits,
    ) -> Result<()> {
        let cfg = &self.config;
        let (hidden, hd) = (cfg.hidden, cfg.head_dim);
        let (q_width, kv_width) = (cfg.heads * hd, cfg.kv_heads * hd);
        let qkv_width = q_width + 2 * kv_width;
        let inter = cfg.intermediate;
        let n = tokens.len();

        let vocab = self.weights.lm_head.shape().0;
        if cache.host_layer(0).is_none() {
            candle_core::bail!("the CPU forward pass needs a host KV cache");
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        s.positions.clear();
        s.slots.clear();
        s.owners.clear();
        s.last.clear();
        for (i, seq) in plan.sequences.iter().enumerate() {
            for p in seq.context_len - seq.query_len..seq.context_len {
                s.positions.push(p);
                s.slots.push(seq.blocks[p / plan.block_size] as usize * plan.block_size + p % plan.block_size);
                s.owners.push(i);
            }
            s.last.extend(logit_tokens[i].clone());
        }
        // Rows of logits: each sequence's last token, or every one it asks for.
        let rows = s.last.len();
        // The threads write each token's keys and values through its slot
        // without locks: two tokens sharing one would be a data race, so a
        // block table that would make them (a refcount bug) fails the step here.
        // (`Model::check` has put every block, so every slot, inside the cache.)
        s.sorted_slots.clear();
        s.sorted_slots.extend_from_slice(&s.slots);
        s.sorted_slots.sort_unstable();
        if let Some(pair) = s.sorted_slots.windows(2).find(|pair| pair[0] == pair[1]) {
            candle_core::bail!("two tokens of one step write KV slot {}", pair[0]);
        }
        let group = cfg.heads / cfg.kv_heads;
        let scale = plan.scale;
        s.tiles.clear();
        // Tiles of a KV group's heads, which share each conversion of the keys
        // and values, and of a prompt's tokens; heads one by one when a step of
        // decoded tokens would leave threads without a tile.
        let decoding = plan.sequences.iter().all(|seq| seq.query_len == 1);
        let heads = if decoding && plan.sequences.len() * cfg.kv_heads < pool.threads() { 1 } else { group };
        for (sequence, seq) in plan.sequences.iter().enumerate() {
            let first = seq.context_len - seq.query_len;
            for head in (0..cfg.heads).step_by(heads) {
                for start in (0..seq.query_len).step_by(attend::TOKENS) {
                    let tile = attend::Tile {
                        first: first + start,
                        tokens: attend::TOKENS.min(seq.query_len - start),
                        heads,
                        dim: hd,
                        scale,
                        // Set per layer.
                        window: usize::MAX,
                    };
                    s.tiles.push(AttendItem { tile, token: seq.query_start + start, head, sequence });
                }
            }
        }
        s.tiles.sort_by_key(|item| std::cmp::Reverse(item.cost()));
        s.claimed.resize_with(self.weights.layers.len(), AtomicUsize::default);
        s.claimed.iter_mut().for_each(|c| *c.get_mut() = 0);
        s.attend.resize_with(pool.threads(), Mutex::default);
        s.x.resize(n * hidden);
        let post_norms = self.weights.layers.iter().any(|l| l.post_norms.is_some());
        s.branch.resize(if post_norms { n * hidden } else { 0 });
        s.normed.resize(n * hidden);
        s.input.prepare(n, hidden);
        s.qkv.resize(n * qkv_width);
        s.attn.resize(n * q_width);
        s.attn_input.prepare(n, q_width);
        s.gate_up.resize(n * 2 * inter);
        s.mid.resize(n * inter);
        s.mid_input.prepare(n, inter);
        s.last_input.prepare(rows, hidden);
        logits.resize(rows, vocab);
        let s = &*s;
        let eps = cfg.rms_eps as f32;
        let level = self.level;
        // The rotated leading dimensions of a head, in pairs.
        let half = cfg.rotary_dim / 2;
        // Heads of whole quantization blocks are quantized as attention
        // stores them, with no phase (and barrier) of their own.
        let heads_quantize_alone = hd.is_multiple_of(BLOCK);
        let interleaved = cfg.rope_style == RopeStyle::Interleaved;
        let logits_out = logits.shared();
        let embedding_scale = cfg.architecture.embedding_scale(hidden);
        let activation = cfg.architecture.activation();

        pool.run(&|w: &Worker<'_>| {
            let my_rows = w.share(n, 1);
            for t in my_rows.clone() {
                // SAFETY: rows are split between threads.
                let x = unsafe { s.x.get_mut(t * hidden..(t + 1) * hidden) };
                self.weights.embedding.dequantize_row(tokens[t] as usize, x);
                if let Some(scale) = embedding_scale {
                    x.iter_mut().for_each(|v| *v *= scale);
                }
            }
            w.barrier();
            for (i, layer) in self.weights.layers.iter().enumerate() {
                let (cos_table, sin_table) = &self.rope[Frequencies::table_of(cfg, i)];
                let window = cfg.layer_window(i).unwrap_or(usize::MAX);
                self.norm_rows(w, s, &layer.attn_norm, eps, n);
                w.barrier();
                let mut offset = 0;
                for part in &layer.qkv {
                    let cols = w.share(part.shape().0, part.column_align());
                    // SAFETY: each thread writes its own columns of `qkv`; the
                    // input was written before the barrier.
                    unsafe {
                        part.matmul(&s.input, cols, &Output { data: &s.qkv, stride: qkv_width, offset, add: false })
                    };
                    offset += part.shape().0;
                }
                w.barrier();
                let (k_cache, v_cache) = cache.host_layer(i).expect("checked above");
                for t in my_rows.clone() {
                    // SAFETY: rows are split between threads; a token's KV slot is its own.
                    let row = unsafe { s.qkv.get_mut(t * qkv_width..(t + 1) * qkv_width) };
                    if let Some(bias) = &layer.qkv_bias {
                        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                    }
                    let (q, kv) = row.split_at_mut(q_width);
                    let (k, v) = kv.split_at_mut(kv_width);
                    let p = s.positions[t];
                    let (cos, sin) = (&cos_table[p * half..(p + 1) * half], &sin_table[p * half..(p + 1) * half]);
                    for (heads, norm) in
                        [(q, layer.qk_norm.as_ref().map(|n| &n.0)), (&mut *k, layer.qk_norm.as_ref().map(|n| &n.1))]
                    {
                        for head in heads.chunks_exact_mut(hd) {
                            if let Some(norm) = norm {
                                ops::rms_norm_in_place(head, norm, eps);
                            }
                            ops::rotate(head, cos, sin, interleaved);
                        }
                    }
                    let slot = s.slots[t] * kv_width;
                    // SAFETY: no two tokens of a step share a slot (checked
                    // before the dispatch), and nothing reads the cache until
                    // the barrier below.
                    unsafe {
                        ops::store_f16(level, k, k_cache.get_mut(slot..slot + kv_width));
                        ops::store_f16(level, v, v_cache.get_mut(slot..slot + kv_width));
                    }
                }
                w.barrier();
                // SAFETY: the cache was written before the barrier; nothing writes it now.
                let (keys, values) = unsafe { (k_cache.get(0..k_cache.len()), v_cache.get(0..v_cache.len())) };
                let mut buffers = s.attend[w.index].lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let claim = s.claimed[i].fetch_add(1, Ordering::Relaxed);
                    let Some(item) = s.tiles.get(claim) else { break };
                    let seq = &plan.sequences[item.sequence];
                    // The KV head the tile's query heads read.
                    let kv_head = item.head / group * hd;
                    let row = |j: usize| {
                        let slot = seq.blocks[j / plan.block_size] as usize * plan.block_size + j % plan.block_size;
                        let at = slot * kv_width + kv_head;
                        (&keys[at..at + hd], &values[at..at + hd])
                    };
                    let query = |t: usize, h: usize| {
                        let at = (item.token + t) * qkv_width + (item.head + h) * hd;
                        // SAFETY: q was written before the barrier; nothing writes it now.
                        unsafe { s.qkv.get(at..at + hd) }
                    };
                    let tile = attend::Tile { window, ..item.tile };
                    attend::attend(level, &tile, query, row, &mut buffers, |t, h, out| {
                        let (t, h) = (item.token + t, item.head + h);
                        let at = t * q_width + h * hd;
                        // SAFETY: each (token, head) belongs to one tile, claimed
                        // by one thread, and so do its whole blocks of the input.
                        unsafe {
                            if heads_quantize_alone {
                                s.attn_input.quantize_part(level, t, h * hd..(h + 1) * hd, out);
                            } else {
                                s.attn.get_mut(at..at + hd).copy_from_slice(out);
                            }
                        }
                    });
                }
                drop(buffers);
                w.barrier();
                if !heads_quantize_alone {
                    for (t, part) in pieces(w, n, q_width) {
                        let at = t * q_width;
                        // SAFETY: pieces are split between threads; attention finished at the barrier.
                        unsafe {
                            s.attn_input.quantize_part(
                                level,
                                t,
                                part.clone(),
                                s.attn.get(at + part.start..at + part.end),
                            )
                        };
                    }
                    w.barrier();
                }
                let cols = w.share(hidden, layer.o.column_align());
                let post_attn = layer.post_norms.as_ref().map(|(attn, _)| attn);
                // SAFETY: own columns of `x` (or of the branch, normed into `x` next); the input is complete.
                unsafe { layer.o.matmul(&s.attn_input, cols, &residual(s, post_attn.is_some(), hidden)) };
                w.barrier();
                if let Some(weight) = post_attn {
                    add_normed_branch(w, s, weight, eps, n, hidden);
                    w.barrier();
                }
                self.norm_rows(w, s, &layer.ffn_norm, eps, n);
                w.barrier();
                let mut offset = 0;
                for part in &layer.gate_up {
                    let cols = w.share(inter, part.column_align());
                    // SAFETY: own columns of `gate_up`.
                    unsafe {
                        part.matmul(&s.input, cols, &Output { data: &s.gate_up, stride: 2 * inter, offset, add: false })
                    };
                    offset += inter;
                }
                w.barrier();
                for (t, part) in pieces(w, n, inter) {
                    let (gate, up, mid) = (t * 2 * inter, t * 2 * inter + inter, t * inter);
                    // SAFETY: pieces are split between threads; gate and up are complete.
                    unsafe {
                        let mid = s.mid.get_mut(mid + part.start..mid + part.end);
                        let (gate, up) = (
                            s.gate_up.get(gate + part.start..gate + part.end),
                            s.gate_up.get(up + part.start..up + part.end),
                        );
                        match activation {
                            Activation::Silu => ops::silu_mul(level, gate, up, mid),
                            Activation::GeluTanh => ops::gelu_tanh_mul(level, gate, up, mid),
                        }
                        s.mid_input.quantize_part(level, t, part, mid);
                    }
                }
                w.barrier();
                let cols = w.share(hidden, layer.down.column_align());
                let post_ffn = layer.post_norms.as_ref().map(|(_, ffn)| ffn);
                // SAFETY: own columns of `x` (or of the branch).
                unsafe { layer.down.matmul(&s.mid_input, cols, &residual(s, post_ffn.is_some(), hidden)) };
                w.barrier();
                if let Some(weight) = post_ffn {
                    add_normed_branch(w, s, weight, eps, n, hidden);
                    w.barrier();
                }
            }
            // The last token of each sequence: final norm, then the output layer.
            for (r, part) in pieces(w, rows, hidden) {
                let t = s.last[r];
                // SAFETY: pieces are split between threads; the layers are done.
                unsafe {
                    let x = s.x.get(t * hidden..(t + 1) * hidden);
                    let normed = s.normed.get_mut(r * hidden + part.start..r * hidden + part.end);
                    ops::rms_scale(x, part.clone(), &self.weights.norm, eps, normed);
                    s.last_input.quantize_part(level, r, part, normed);
                }
            }
            w.barrier();
            let cols = w.share(vocab, self.weights.lm_head.column_align());
            // SAFETY: own columns of the logits.
            unsafe {
                self.weights.lm_head.matmul(
                    &s.last_input,
                    cols,
                    &Output { data: logits_out, stride: vocab, offset: 0, add: false },
                )
            };
        });
        Ok(())
    }

    /// RMS-norms this thread's pieces of the `rows` rows of `x` into `normed`
    /// and quantizes them as the next projections' input.
    fn norm_rows(&self, w: &Worker<'_>, s: &Scratch, weight: &[f32], eps: f32, rows: usize) {
        let hidden = self.config.hidden;
        for (t, part) in pieces(w, rows, hidden) {
            // SAFETY: pieces are split between threads; `x` is complete at the barrier before.
            unsafe {
                let x = s.x.get(t * hidden..(t + 1) * hidden);
                let normed = s.normed.get_mut(t * hidden + part.start..t * hidden + part.end);
                ops::rms_scale(x, part.clone(), weight, eps, normed);
                s.input.quantize_part(self.level, t, part, normed);
            }
        }
    }
}

/// Where a projection into the residual stream writes: added to `x`, or, when
/// a norm comes first, into the branch buffer.
fn residual(s: &Scratch, normed: bool, hidden: usize) -> Output<'_> {
    if normed {
        Output { data: &s.branch, stride: hidden, offset: 0, add: false }
    } else {
        Output { data: &s.x, stride: hidden, offset: 0, add: true }
    }
}

/// `x += rms_norm(branch) * weight`, this thread's pieces of the `rows` rows.
fn add_normed_branch(w: &Worker<'_>, s: &Scratch, weight: &[f32], eps: f32, rows: usize, hidden: usize) {
    for (t, part) in pieces(w, rows, hidden) {
        // SAFETY: pieces are split between threads; the branch is complete at the barrier before.
        unsafe {
            let branch = s.branch.get(t * hidden..(t + 1) * hidden);
            let x = s.x.get_mut(t * hidden + part.start..t * hidden + part.end);
            ops::rms_scale_add(branch, part, weight, eps, x);
        }
    }
}

/// This thread's share of a row-wise phase over `rows` rows of `k` values, in
/// whole quantization blocks, so that a single token's row is split between
/// threads too: `(row, values)` for each row it touches.
fn pieces(w: &Worker<'_>, rows: usize, k: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
    let nb = k / BLOCK;
    let mine = w.share(rows * nb, 1);
    (mine.start / nb.max(1)..mine.end.div_ceil(nb.max(1))).map(move |t| {
        let (start, end) = (mine.start.max(t * nb) - t * nb, mine.end.min((t + 1) * nb) - t * nb);
        (t, start * BLOCK..end * BLOCK)
    })
}
