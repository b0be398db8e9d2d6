//! The tensors of a Llama-family model, read by name from a GGUF file (kept
//! quantized) or a safetensors checkpoint (kept in its own dtype).

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Result, Tensor};

use super::config::{Architecture, ModelConfig};
use super::cpu::{CpuLayer, CpuWeights};
use super::pool::{Pool, Shared};
use super::qmatmul::{Activations, Format, Level, Output, PackedWeights};

/// A projection `x Wᵀ (+ b)`.
pub enum Linear {
    /// GGUF types kandle has kernels for, on the CPU: repacked weights.
    Packed {
        weight: Arc<PackedWeights>,
        bias: Option<Tensor>,
    },
    /// Other quantized types: candle's kernels.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
    Dense(candle_nn::Linear),
}

impl Linear {
    /// A quantized projection, with kandle's own kernel where it has one.
    fn quantized(weight: QTensor, bias: Option<Tensor>, device: &Device, level: Level) -> Result<Self> {
        match packed(&weight, device, level)? {
            Some(packed) => Ok(Self::Packed { weight: Arc::new(packed), bias }),
            None => Ok(Self::Quantized { weight: QMatMul::from_qtensor(weight)?, bias }),
        }
    }

    /// `x Wᵀ (+ b)`; kandle's kernels run on `pool`.
    pub fn forward(&self, x: &Tensor, pool: &Pool) -> Result<Tensor> {
        let (y, bias) = match self {
            Self::Packed { weight, bias } => {
                let (rows, k) = x.dims2()?;
                let input = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (n, _) = weight.shape();
                let mut a = Activations::new();
                a.quantize(weight.level(), &input, rows, k);
                let mut out = Shared::new();
                out.resize(rows * n);
                let output = Output { data: &out, stride: n, offset: 0, add: false };
                pool.run(&|w| {
                    // SAFETY: each thread writes its own columns; nothing writes the activations.
                    unsafe { weight.matmul(&a, w.share(n, weight.column_align()), &output) }
                });
                (Tensor::from_slice(out.as_slice(), (rows, n), x.device())?, bias)
            }
            Self::Quantized { weight, bias } => (weight.forward(x)?, bias),
            Self::Dense(linear) => return linear.forward(x),
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The repacked weights, when kandle's kernels run this projection.
    fn packed(&self) -> Option<&Arc<PackedWeights>> {
        match self {
            Self::Packed { weight, .. } => Some(weight),
            _ => None,
        }
    }

    fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Packed { bias, .. } | Self::Quantized { bias, .. } => bias.as_ref(),
            Self::Dense(linear) => linear.bias(),
        }
    }
}

/// `weight` repacked for kandle's kernels at `level`, where it has one for the type and device.
fn packed(weight: &QTensor, device: &Device, level: Level) -> Result<Option<PackedWeights>> {
    let Some(format) = Format::from_ggml(weight.dtype()) else { return Ok(None) };
    if !device.is_cpu() {
        return Ok(None);
    }
    let (n, k) = weight.shape().dims2()?;
    Ok(PackedWeights::from_gguf(&weight.data()?, n, k, format, level))
}

/// A quantized matrix cut into consecutive row ranges of `rows` rows (a
/// fused projection into its parts; rows are whole blocks, so the bytes cut cleanly).
fn split_rows<const N: usize>(whole: &QTensor, rows: [usize; N], device: &Device) -> Result<[QTensor; N]> {
    let (n, k) = whole.shape().dims2()?;
    if rows.iter().sum::<usize>() != n {
        candle_core::bail!("a fused projection of {n} rows cannot split into {rows:?}");
    }
    let dtype = whole.dtype();
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = whole.data()?;
    let mut start = 0;
    let mut parts = Vec::with_capacity(N);
    for r in rows {
        let bytes = &data[start * row_bytes..(start + r) * row_bytes];
        parts.push(candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![r, k], device)?);
        start += r;
    }
    parts.try_into().map_err(|_| candle_core::Error::Msg("split count".into()))
}

/// The token-embedding table; quantized tables give up only the rows a step needs.
pub enum Embedding {
    Packed(Arc<PackedWeights>),
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    /// Rows of the table: the token ids the model can read.
    pub fn vocab(&self) -> usize {
        match self {
            Self::Packed(table) => table.shape().0,
            Self::Quantized(table) => table.shape().dims().first().copied().unwrap_or(0),
            Self::Dense(table) => table.dims().first().copied().unwrap_or(0),
        }
    }

    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Packed(table) => {
                let device = ids.device();
                let ids = ids.to_vec1::<u32>()?;
                let (vocab, hidden) = table.shape();
                let mut values = vec![0f32; ids.len() * hidden];
                for (id, row) in ids.iter().zip(values.chunks_exact_mut(hidden)) {
                    if *id as usize >= vocab {
                        candle_core::bail!("token {id} is outside the vocabulary of {vocab}");
                    }
                    table.dequantize_row(*id as usize, row);
                }
                Tensor::from_vec(values, (ids.len(), hidden), device)?.to_dtype(dtype)
            }
            Self::Quantized(table) => table.embedding(ids)?.to_dtype(dtype),
            Self::Dense(table) => table.index_select(ids, 0),
        }
    }
}

pub struct Layer {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Qwen3's and Gemma 3's per-head norms of q and k.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Gemma 3's norm of the attention output before the residual add.
    pub post_attn_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    /// Gemma 3's norm of the MLP output before the residual add.
    pub post_ffn_norm: Option<Tensor>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct Weights {
    pub embedding: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    /// The dtype activations run in: f32 for quantized weights, the checkpoint's own otherwise.
    pub dtype: DType,
}

impl Weights {
    /// From a GGUF file (llama.cpp's tensor names).
    pub fn from_gguf<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        config: &ModelConfig,
        device: &Device,
        level: Level,
    ) -> Result<Self> {
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let table = tensor("token_embd.weight")?;
        // Tied embeddings: the output projection is the embedding table, shared.
        let (embedding, tied) = match packed(&table, device, level)? {
            Some(p) => {
                let p = Arc::new(p);
                (Embedding::Packed(p.clone()), Linear::Packed { weight: p, bias: None })
            }
            None => {
                let q = Arc::new(table);
                (Embedding::Quantized(q.clone()), Linear::Quantized { weight: QMatMul::from_arc(q)?, bias: None })
            }
        };
        let lm_head = match tensor("output.weight") {
            Ok(t) => Linear::quantized(t, None, device, level)?,
            Err(_) => tied,
        };
        let norm = tensor("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut t = |suffix: &str| tensor(&format!("blk.{i}.{suffix}"));
            let mut linear = |name: &str, with_bias: bool| -> Result<Linear> {
                let weight = t(&format!("{name}.weight"))?;
                let bias = if with_bias { Some(t(&format!("{name}.bias"))?.dequantize(device)?) } else { None };
                Linear::quantized(weight, bias, device, level)
            };
            let qkv_bias = config.architecture == Architecture::Qwen2;
            let (o, down) = (linear("attn_output", false)?, linear("ffn_down", false)?);
            let (q, k, v, gate, up) = if config.architecture == Architecture::Phi3 {
                // Fused q/k/v and gate/up (gate first), split by rows.
                let (q_rows, kv_rows, inter) =
                    (config.heads * config.head_dim, config.kv_heads * config.head_dim, config.intermediate);
                let [q, k, v] = split_rows(&t("attn_qkv.weight")?, [q_rows, kv_rows, kv_rows], device)?;
                let [gate, up] = split_rows(&t("ffn_up.weight")?, [inter, inter], device)?;
                let linear = |w| Linear::quantized(w, None, device, level);
                (linear(q)?, linear(k)?, linear(v)?, linear(gate)?, linear(up)?)
            } else {
                (
                    linear("attn_q", qkv_bias)?,
                    linear("attn_k", qkv_bias)?,
                    linear("attn_v", qkv_bias)?,
                    linear("ffn_gate", false)?,
                    linear("ffn_up", false)?,
                )
            };
            let mut norm = |name: &str| t(name)?.dequantize(device);
            let arch = config.architecture;
            let mut optional = |name: &str, present: bool| present.then(|| norm(name)).transpose();
            let (q_norm, k_norm) = (
                optional("attn_q_norm.weight", arch.has_qk_norm())?,
                optional("attn_k_norm.weight", arch.has_qk_norm())?,
            );
            let post_attn_norm = optional("post_attention_norm.weight", arch.has_post_norms())?;
            let post_ffn_norm = optional("post_ffw_norm.weight", arch.has_post_norms())?;
            layers.push(Layer {
                attn_norm: norm("attn_norm.weight")?,
                ffn_norm: norm("ffn_norm.weight")?,
                q,
                k,
                v,
                o,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                gate,
                up,
                down,
            });
        }
        Ok(Self { embedding, layers, norm, lm_head, dtype: DType::F32 })
    }

    /// From a Hugging Face safetensors checkpoint, in `dtype` (the checkpoint's
    /// own), or with the linear layers quantized to `quantize` (activations then
    /// run in f32; a layer whose inner size is not a multiple of the type's
    /// block stays dense).
    pub fn from_safetensors(
        tensors: &MmapedSafetensors,
        config: &ModelConfig,
        dtype: DType,
        quantize: Option<GgmlDType>,
        device: &Device,
        level: Level,
    ) -> Result<Self> {
        let dtype = if quantize.is_some() { DType::F32 } else { dtype };
        let arch = config.architecture;
        // Gemma 3's multimodal checkpoints keep the language model under `language_model.`.
        let (root, head) = if tensors.get("language_model.model.embed_tokens.weight").is_ok() {
            ("language_model.model", "language_model.lm_head")
        } else {
            ("model", "lm_head")
        };
        let get = |name: &str| tensors.load(name, device)?.to_dtype(dtype);
        // Gemma stores its norms' weights as offsets from 1.
        let norm = |name: &str| {
            let w = tensors.load(name, device)?.to_dtype(DType::F32)?;
            let w = if arch == Architecture::Gemma3 { (w + 1.0)? } else { w };
            w.to_dtype(dtype)
        };
        let projection = |weight: Tensor, bias: Option<Tensor>| -> Result<Linear> {
            match quantize {
                Some(q) if weight.dim(1)?.is_multiple_of(q.block_size()) => {
                    Linear::quantized(QTensor::quantize(&weight, q)?, bias, device, level)
                }
                _ => Ok(Linear::Dense(candle_nn::Linear::new(weight, bias))),
            }
        };
        let linear = |name: &str, with_bias: bool| -> Result<Linear> {
            let bias = if with_bias { Some(get(&format!("{name}.bias"))?) } else { None };
            projection(get(&format!("{name}.weight"))?, bias)
        };
        // Phi-3's fused projections, cut into consecutive row ranges.
        let fused = |name: &str, rows: &[usize]| -> Result<Vec<Linear>> {
            let whole = get(&format!("{name}.weight"))?;
            if rows.iter().sum::<usize>() != whole.dim(0)? {
                candle_core::bail!("{name} has {} rows, not {rows:?}", whole.dim(0)?);
            }
            let mut start = 0;
            let mut parts = Vec::with_capacity(rows.len());
            for &r in rows {
                // A storage of its own: quantizing reads the storage from its start.
                parts.push(projection(whole.narrow(0, start, r)?.force_contiguous()?, None)?);
                start += r;
            }
            Ok(parts)
        };
        let table = get(&format!("{root}.embed_tokens.weight"))?;
        // Quantized checkpoints run the embedding table and the output layer
        // through the same kernels as the other layers, where the sizes allow.
        let packed_table = match quantize {
            Some(q) if table.dim(1)?.is_multiple_of(q.block_size()) => {
                packed(&QTensor::quantize(&table, q)?, device, level)?
            }
            _ => None,
        };
        let (embedding, tied) = match packed_table {
            Some(p) => {
                let p = Arc::new(p);
                (Embedding::Packed(p.clone()), Linear::Packed { weight: p, bias: None })
            }
            None => (Embedding::Dense(table.clone()), Linear::Dense(candle_nn::Linear::new(table, None))),
        };
        let lm_head = match tensors.get(&format!("{head}.weight")) {
            Ok(_) => linear(head, false)?,
            Err(_) => tied,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("{root}.layers.{i}");
            let qkv_bias = arch == Architecture::Qwen2;
            let optional = |name: &str, present: bool| present.then(|| norm(&format!("{p}.{name}.weight"))).transpose();
            let (q_norm, k_norm) =
                (optional("self_attn.q_norm", arch.has_qk_norm())?, optional("self_attn.k_norm", arch.has_qk_norm())?);
            // Gemma's post_attention_layernorm is the attention output's norm;
            // its MLP input norm is pre_feedforward_layernorm.
            let (post_attn_norm, ffn_norm, post_ffn_norm) = if arch.has_post_norms() {
                (
                    optional("post_attention_layernorm", true)?,
                    norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                    optional("post_feedforward_layernorm", true)?,
                )
            } else {
                (None, norm(&format!("{p}.post_attention_layernorm.weight"))?, None)
            };
            let (q, k, v, gate, up) = if arch == Architecture::Phi3 {
                let (q_rows, kv_rows, inter) =
                    (config.heads * config.head_dim, config.kv_heads * config.head_dim, config.intermediate);
                let mut qkv = fused(&format!("{p}.self_attn.qkv_proj"), &[q_rows, kv_rows, kv_rows])?.into_iter();
                let mut gate_up = fused(&format!("{p}.mlp.gate_up_proj"), &[inter, inter])?.into_iter();
                match (qkv.next(), qkv.next(), qkv.next(), gate_up.next(), gate_up.next()) {
                    (Some(q), Some(k), Some(v), Some(gate), Some(up)) => (q, k, v, gate, up),
                    _ => candle_core::bail!("layer {i}: fused projections did not split"),
                }
            } else {
                (
                    linear(&format!("{p}.self_attn.q_proj"), qkv_bias)?,
                    linear(&format!("{p}.self_attn.k_proj"), qkv_bias)?,
                    linear(&format!("{p}.self_attn.v_proj"), qkv_bias)?,
                    linear(&format!("{p}.mlp.gate_proj"), false)?,
                    linear(&format!("{p}.mlp.up_proj"), false)?,
                )
            };
            layers.push(Layer {
                attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                q,
                k,
                v,
                o: linear(&format!("{p}.self_attn.o_proj"), false)?,
                q_norm,
                k_norm,
                post_attn_norm,
                ffn_norm,
                post_ffn_norm,
                gate,
                up,
                down: linear(&format!("{p}.mlp.down_proj"), false)?,
            });
        }
        Ok(Self { embedding, layers, norm: norm(&format!("{root}.norm.weight"))?, lm_head, dtype })
    }
}

impl Weights {
    /// The weights in the CPU forward pass's form, when it can run them: every
    /// projection and the embedding table repacked for kandle's kernels, on the
    /// CPU. Otherwise the weights come back unchanged.
    pub fn into_cpu(self, device: &Device) -> Result<std::result::Result<CpuWeights, Self>> {
        let Embedding::Packed(embedding) = &self.embedding else { return Ok(Err(self)) };
        let all_packed = self.lm_head.packed().is_some()
            && self
                .layers
                .iter()
                .all(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().all(|p| p.packed().is_some()));
        if !device.is_cpu() || !all_packed {
            return Ok(Err(self));
        }
        let values = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let take = |l: &Linear| l.packed().cloned().ok_or_else(|| candle_core::Error::Msg("not repacked".into()));
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let qkv_bias = match (l.q.bias(), l.k.bias(), l.v.bias()) {
                (Some(q), Some(k), Some(v)) => Some([values(q)?, values(k)?, values(v)?].concat()),
                _ => None,
            };
            let qk_norm = match (&l.q_norm, &l.k_norm) {
                (Some(q), Some(k)) => Some((values(q)?, values(k)?)),
                _ => None,
            };
            let post_norms = match (&l.post_attn_norm, &l.post_ffn_norm) {
                (Some(a), Some(f)) => Some((values(a)?, values(f)?)),
                _ => None,
            };
            layers.push(CpuLayer {
                attn_norm: values(&l.attn_norm)?,
                qkv: [take(&l.q)?, take(&l.k)?, take(&l.v)?],
                qkv_bias,
                qk_norm,
                o: take(&l.o)?,
                post_norms,
                ffn_norm: values(&l.ffn_norm)?,
                gate_up: [take(&l.gate)?, take(&l.up)?],
                down: take(&l.down)?,
            });
        }
        Ok(Ok(CpuWeights {
            embedding: embedding.clone(),
            layers,
            norm: values(&self.norm)?,
            lm_head: take(&self.lm_head)?,
        }))
    }
}
