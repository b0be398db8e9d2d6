//! Causal attention of a step's query tokens over each sequence's own KV
//! blocks. On the CPU a custom op reads the blocks in place from the paged
//! cache (no gather, no copy per step); on other devices (CUDA) each
//! sequence's rows are gathered on the device by slot and attended in candle
//! operations, the same math.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Where one sequence's tokens are in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceSlice {
    /// Index of its first query token in the step's tokens.
    pub query_start: usize,
    /// Its tokens in this step (a prefill chunk, or 1 when decoding).
    pub query_len: usize,
    /// Its tokens in the cache after this step (earlier tokens + this step's).
    pub context_len: usize,
    /// Its KV blocks, in order.
    pub blocks: Vec<u32>,
}

/// What the attention kernel needs to know about a step.
#[derive(Debug, Clone)]
pub struct AttentionPlan {
    pub sequences: Vec<SequenceSlice>,
    pub block_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The factor scores are multiplied by before the softmax.
    pub scale: f32,
    /// Sliding-window attention: positions a query reads, its own included.
    pub window: Option<usize>,
}

/// `q`: `[tokens, heads, head_dim]`; the caches: `[slots, kv_heads, head_dim]`.
/// Returns `[tokens, heads, head_dim]` in f32.
pub fn paged_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, plan: &Arc<AttentionPlan>) -> Result<Tensor> {
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    check(plan, q.dims(), k_cache.dims()[0])?;
    if k_cache.device().is_cpu() {
        return q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { plan: plan.clone() });
    }
    gathered_attention(&q, k_cache, v_cache, plan)
}

/// Each sequence's cache rows gathered by slot, then attended.
fn gathered_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, plan: &AttentionPlan) -> Result<Tensor> {
    let block = plan.block_size;
    let group = plan.heads / plan.kv_heads.max(1);
    let mut outs = Vec::with_capacity(plan.sequences.len());
    for seq in &plan.sequences {
        // From the first position any of its queries reads: blocks before
        // the window may be released already.
        let first = seq.context_len - seq.query_len;
        let earliest = plan.window.map_or(0, |w| (first + 1).saturating_sub(w));
        let rows: Vec<u32> =
            (earliest..seq.context_len).map(|p| seq.blocks[p / block] * block as u32 + (p % block) as u32).collect();
        let rows = Tensor::new(rows.as_slice(), q.device())?;
        let k = k_cache.index_select(&rows, 0)?.to_dtype(DType::F32)?;
        let v = v_cache.index_select(&rows, 0)?.to_dtype(DType::F32)?;
        let q = q.narrow(0, seq.query_start, seq.query_len)?;
        outs.push(causal_attention(&q, &k, &v, first - earliest, group, plan.scale, plan.window)?);
    }
    Tensor::cat(&outs, 0)
}

/// Causal softmax attention of one sequence: `q` `[t, heads, d]` (the first at
/// position `first` of the keys) over `k`, `v` `[n, kv_heads, d]`, query head `h` reading
/// key/value head `h / group`, each over its last `window` positions.
fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    first: usize,
    group: usize,
    scale: f32,
    window: Option<usize>,
) -> Result<Tensor> {
    let window = window.unwrap_or(usize::MAX);
    let (t, h, d) = q.dims3()?;
    let (n, kv_heads, _) = k.dims3()?;
    let repeat = |x: &Tensor| x.unsqueeze(2)?.expand((n, kv_heads, group, d))?.reshape((n, h, d));
    let (k, v) = (repeat(k)?, repeat(v)?);
    let (q, k, v) =
        (q.transpose(0, 1)?.contiguous()?, k.transpose(0, 1)?.contiguous()?, v.transpose(0, 1)?.contiguous()?);
    let scores = (q.matmul(&k.t()?)? * f64::from(scale))?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..n).map(move |j| if j <= first + i && first + i - j < window { 0.0 } else { f32::NEG_INFINITY })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, n), q.device())?;
    let weights = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    weights.matmul(&v)?.transpose(0, 1)?.contiguous()
}

/// The plan fits `q` (its dims) and a cache of `slots` rows.
fn check(p: &AttentionPlan, q: &[usize], slots: usize) -> Result<()> {
    let tokens: usize = p.sequences.iter().map(|s| s.query_len).sum();
    if q != [tokens, p.heads, p.head_dim] {
        candle_core::bail!("paged attention: q is {q:?}, the plan has {tokens} tokens");
    }
    for seq in &p.sequences {
        let needed = seq.context_len.div_ceil(p.block_size);
        if seq.query_len > seq.context_len || seq.blocks.len() < needed {
            candle_core::bail!("paged attention: {seq:?} does not fit its blocks");
        }
        if seq.blocks.iter().any(|b| (*b as usize + 1) * p.block_size > slots) {
            candle_core::bail!("paged attention: a block of {seq:?} is outside the cache");
        }
    }
    Ok(())
}

struct PagedAttention {
    plan: Arc<AttentionPlan>,
}

/// Read access to cache rows of any float dtype, computing in f32.
trait Row: Sync {
    fn dot(&self, at: usize, q: &[f32]) -> f32;
    fn axpy(&self, at: usize, w: f32, out: &mut [f32]);
}

/// Independent accumulators: the compiler keeps them in vector registers
/// (a single running sum would be a serial chain it may not reorder).
const LANES: usize = 8;

impl<T: Copy + Into<f32> + Sync> Row for [T] {
    fn dot(&self, at: usize, q: &[f32]) -> f32 {
        let k = &self[at..at + q.len()];
        let mut acc = [0f32; LANES];
        let (q_body, q_tail) = q.split_at(q.len() - q.len() % LANES);
        for (qc, kc) in q_body.chunks_exact(LANES).zip(k.chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] += qc[l] * kc[l].into();
            }
        }
        let tail: f32 = q_tail.iter().zip(&k[q_body.len()..]).map(|(a, b)| a * (*b).into()).sum();
        acc.iter().sum::<f32>() + tail
    }

    fn axpy(&self, at: usize, w: f32, out: &mut [f32]) {
        let n = out.len();
        out.iter_mut().zip(&self[at..at + n]).for_each(|(o, v)| *o += w * (*v).into());
    }
}

impl PagedAttention {
    fn run<R: Row + ?Sized>(&self, q: &[f32], k: &R, v: &R) -> Vec<f32> {
        let p = &*self.plan;
        let (heads, dim) = (p.heads, p.head_dim);
        let group = heads / p.kv_heads.max(1);
        let scale = p.scale;
        // (sequence, position) of every query token.
        let mut owners = Vec::new();
        for (s, seq) in p.sequences.iter().enumerate() {
            let first = seq.context_len - seq.query_len;
            owners.extend((0..seq.query_len).map(|j| (s, first + j)));
        }
        let mut out = vec![0f32; owners.len() * heads * dim];
        out.par_chunks_mut(dim).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, o)| {
            let (t, h) = (i / heads, i % heads);
            let (s, pos) = owners[t];
            let seq = &p.sequences[s];
            let qrow = &q[i * dim..(i + 1) * dim];
            let kv_head = h / group;
            let at = |position: usize| {
                let slot = seq.blocks[position / p.block_size] as usize * p.block_size + position % p.block_size;
                (slot * p.kv_heads + kv_head) * dim
            };
            // Up to its own position, within the window.
            let earliest = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            scores.clear();
            scores.extend((earliest..=pos).map(|j| k.dot(at(j), qrow) * scale));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (j, w) in (earliest..).zip(scores.iter()) {
                v.axpy(at(j), w / sum, o);
            }
        });
        out
    }
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(&self.plan, lq.dims(), lk.dims()[0])?;
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) =
            (lq.contiguous_offsets(), lk.contiguous_offsets(), lv.contiguous_offsets())
        else {
            candle_core::bail!("paged attention needs contiguous tensors");
        };
        let CpuStorage::F32(q) = q else { candle_core::bail!("paged attention: q must be f32") };
        let q = &q[q0..q1];
        let out = match (k, v) {
            (CpuStorage::F16(k), CpuStorage::F16(v)) => self.run(q, &k[k0..k1], &v[v0..v1]),
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => self.run(q, &k[k0..k1], &v[v0..v1]),
            (CpuStorage::F32(k), CpuStorage::F32(v)) => self.run(q, &k[k0..k1], &v[v0..v1]),
            _ => candle_core::bail!("paged attention: unsupported cache dtype {:?}", k.dtype()),
        };
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn matches_plain_attention_over_scattered_blocks() -> Result<()> {
        for (heads, kv_heads, dim, block) in [(4, 2, 8, 4), (9, 3, 64, 16), (2, 2, 4, 1)] {
            for window in [None, Some(1), Some(4), Some(7)] {
                check_against_reference(heads, kv_heads, dim, block, window)?;
            }
        }
        Ok(())
    }

    fn check_against_reference(
        heads: usize,
        kv_heads: usize,
        dim: usize,
        block: usize,
        window: Option<usize>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let slots = 16 * block;
        let k_cache = Tensor::randn(0f32, 1.0, (slots, kv_heads, dim), &dev)?;
        let v_cache = Tensor::randn(0f32, 1.0, (slots, kv_heads, dim), &dev)?;
        // Two sequences: 3 new tokens after 6 cached, and 1 new token after 9.
        let seqs =
            [(vec![7u32, 2, 11, 1, 5, 9, 13, 3, 6, 8], 6usize, 3usize), (vec![0, 15, 4, 12, 10, 14, 2, 1, 3, 5], 9, 1)];
        let mut sequences = Vec::new();
        let mut start = 0;
        for (blocks, cached, new) in &seqs {
            sequences.push(SequenceSlice {
                query_start: start,
                query_len: *new,
                context_len: cached + new,
                blocks: blocks.clone(),
            });
            start += new;
        }
        let q = Tensor::randn(0f32, 1.0, (start, heads, dim), &dev)?;
        let scale = 1.0 / (dim as f32).sqrt();
        let plan =
            Arc::new(AttentionPlan { sequences, block_size: block, heads, kv_heads, head_dim: dim, scale, window });
        // The CPU's in-place kernel against the other devices' gather-and-attend.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (kc, vc) = (k_cache.to_dtype(dtype)?, v_cache.to_dtype(dtype)?);
            let got = paged_attention(&q, &kc, &vc, &plan)?;
            let want = gathered_attention(&q, &kc, &vc, &plan)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{dtype:?} {heads}/{kv_heads}x{dim} block {block} window {window:?}: {diff}");
        }
        Ok(())
    }
}
