//! The paged KV cache: per layer, one key and one value pool of fixed-size
//! token blocks, allocated once at start-up. A sequence's tokens live in the
//! blocks its block table lists; token `p` of a sequence is slot
//! `table[p / block_size] * block_size + p % block_size`. Nothing is copied
//! when a sequence grows, and grouped-query heads read the shared key/value
//! heads in place.
//!
//! The CPU forward pass keeps the pools in plain f16 buffers it writes from its
//! own threads; other devices (and the tensor forward pass) keep candle tensors.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor};
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};

use super::config::ModelConfig;
use super::pool::Shared;

pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    store: Store,
}

/// Per layer: keys and values, each `[num_blocks * block_size, kv_heads, head_dim]`.
enum Store {
    Tensors(Vec<(Tensor, Tensor)>),
    Host(Vec<(Shared<f16>, Shared<f16>)>),
}

impl KvCache {
    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(config: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        2 * config.layers * block_size * config.kv_heads * config.head_dim * dtype.size_in_bytes()
    }

    pub fn new(
        config: &ModelConfig,
        block_size: usize,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks * block_size, config.kv_heads, config.head_dim);
        let layers = (0..config.layers)
            .map(|_| Ok((Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { block_size, num_blocks, store: Store::Tensors(layers) })
    }

    /// f16 pools in host memory, for the CPU forward pass.
    pub fn new_host(config: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let len = num_blocks * block_size * config.kv_heads * config.head_dim;
        // Zeroed u16s come from the allocator as untouched zero pages, so a large
        // cache costs no start-up time (filling it with f16 zeros took seconds);
        // an f16 is its u16 bits.
        let pool = || Shared::from_vec(vec![0u16; len].reinterpret_into::<f16>());
        let layers = (0..config.layers).map(|_| (pool(), pool())).collect();
        Self { block_size, num_blocks, store: Store::Host(layers) }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Keys and values of one layer, as tensors.
    pub fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match &self.store {
            Store::Tensors(layers) => Ok((&layers[layer].0, &layers[layer].1)),
            Store::Host(_) => candle_core::bail!("this KV cache is the CPU forward pass's"),
        }
    }

    /// Keys and values of one layer, in host memory.
    pub fn host_layer(&self, layer: usize) -> Option<(&Shared<f16>, &Shared<f16>)> {
        match &self.store {
            Store::Host(layers) => Some((&layers[layer].0, &layers[layer].1)),
            Store::Tensors(_) => None,
        }
    }

    /// Stores the keys and values of a step's tokens (`[tokens, kv_heads, head_dim]`)
    /// in their slots.
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor, slots: &Arc<[u32]>) -> Result<()> {
        let (k_cache, v_cache) = self.layer(layer)?;
        if !k_cache.device().is_cpu() {
            scatter_rows(k_cache, k, slots)?;
            return scatter_rows(v_cache, v, slots);
        }
        let op = WriteSlots { slots: slots.clone() };
        k_cache.inplace_op2(&k.contiguous()?, &op)?;
        v_cache.inplace_op2(&v.contiguous()?, &op)
    }
}

/// Copies row `t` of the source into row `slots[t]` of the cache, converting to
/// the cache's dtype.
/// Other devices than the CPU: candle's in-place scatter writes row `i` of
/// `src` (`[n, heads, dim]`) to row `slots[i]` of `cache`.
fn scatter_rows(cache: &Tensor, src: &Tensor, slots: &[u32]) -> Result<()> {
    let rows = cache.dims()[0];
    if let Some(bad) = slots.iter().find(|s| **s as usize >= rows) {
        candle_core::bail!("kv write: slot {bad} outside the cache of {rows}");
    }
    let (n, heads, dim) = src.dims3()?;
    if n != slots.len() {
        candle_core::bail!("kv write: {} slots for {n} rows", slots.len());
    }
    let index = Tensor::from_slice(slots, (n, 1, 1), src.device())?.broadcast_as((n, heads, dim))?.contiguous()?;
    cache.scatter_set(&index, &src.to_dtype(cache.dtype())?.contiguous()?, 0)
}

struct WriteSlots {
    slots: Arc<[u32]>,
}

impl InplaceOp2 for WriteSlots {
    fn name(&self) -> &'static str {
        "kv-write-slots"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
    ) -> Result<()> {
        let (Some((c0, _)), Some((s0, s1))) = (cache_layout.contiguous_offsets(), src_layout.contiguous_offsets())
        else {
            candle_core::bail!("kv-write-slots needs contiguous tensors");
        };
        let row = cache_layout.dims()[1..].iter().product::<usize>();
        let rows = cache_layout.dims()[0];
        if (s1 - s0) != self.slots.len() * row {
            candle_core::bail!("kv-write-slots: {} slots for {} values of rows of {row}", self.slots.len(), s1 - s0);
        }
        if let Some(bad) = self.slots.iter().find(|s| **s as usize >= rows) {
            candle_core::bail!("kv-write-slots: slot {bad} outside the cache of {rows}");
        }
        match cache {
            CpuStorage::F16(dst) => scatter(&mut dst[c0..], src, s0, row, &self.slots, f16::from_f32),
            CpuStorage::BF16(dst) => scatter(&mut dst[c0..], src, s0, row, &self.slots, bf16::from_f32),
            CpuStorage::F32(dst) => scatter(&mut dst[c0..], src, s0, row, &self.slots, |x| x),
            other => candle_core::bail!("kv-write-slots: unsupported cache dtype {:?}", other.dtype()),
        }
    }
}

fn scatter<T: Copy>(
    dst: &mut [T],
    src: &CpuStorage,
    offset: usize,
    row: usize,
    slots: &[u32],
    convert: impl Fn(f32) -> T,
) -> Result<()> {
    let copy = |values: &mut dyn Iterator<Item = f32>, dst: &mut [T]| {
        for (i, x) in values.enumerate() {
            dst[i] = convert(x);
        }
    };
    for (t, slot) in slots.iter().enumerate() {
        let out = &mut dst[*slot as usize * row..(*slot as usize + 1) * row];
        let at = offset + t * row;
        match src {
            CpuStorage::F32(s) => copy(&mut s[at..at + row].iter().copied(), out),
            CpuStorage::BF16(s) => copy(&mut s[at..at + row].iter().map(|x| x.to_f32()), out),
            CpuStorage::F16(s) => copy(&mut s[at..at + row].iter().map(|x| x.to_f32()), out),
            other => candle_core::bail!("kv-write-slots: unsupported source dtype {:?}", other.dtype()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's slot-writing op and the scatter other devices use leave the
    /// same cache.
    #[test]
    fn slot_writes_agree_on_every_path() -> Result<()> {
        let dev = Device::Cpu;
        let src = Tensor::randn(0f32, 1.0, (3, 2, 4), &dev)?;
        let slots: Arc<[u32]> = vec![5u32, 0, 9].into();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let (a, b) = (Tensor::zeros((12, 2, 4), dtype, &dev)?, Tensor::zeros((12, 2, 4), dtype, &dev)?);
            a.inplace_op2(&src, &WriteSlots { slots: slots.clone() })?;
            scatter_rows(&b, &src, &slots)?;
            let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}");
            let row = b.get(9)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let want = src.get(2)?.to_dtype(dtype)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(row, want, "{dtype:?}");
        }
        assert!(scatter_rows(&Tensor::zeros((4, 2, 4), DType::F16, &dev)?, &src, &slots).is_err());
        Ok(())
    }
}
