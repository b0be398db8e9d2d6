//! The tensors of a Llama-family model, read by name from a GGUF file (kept
//! quantized) or a safetensors checkpoint (kept in its own dtype).

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Result, Tensor};

use super::config::{Architecture, ModelConfig};
use super::qmatmul::{Format, Level, PackedWeights};

/// A projection `x Wᵀ (+ b)`.
pub enum Linear {
    /// Q4_1 and Q8_0 on the CPU: kandle's matrix-matrix kernel over repacked weights.
    Packed {
        weight: PackedWeights,
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
    fn quantized(weight: QTensor, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        match Self::quantized_from(&weight, device)? {
            Some(Self::Packed { weight, .. }) => Ok(Self::Packed { weight, bias }),
            _ => Ok(Self::Quantized { weight: QMatMul::from_qtensor(weight)?, bias }),
        }
    }

    /// kandle's kernel over a copy of `weight`'s blocks, for the formats it reads on the CPU.
    fn quantized_from(weight: &QTensor, device: &Device) -> Result<Option<Self>> {
        let format = match weight.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(None),
        };
        if !device.is_cpu() {
            return Ok(None);
        }
        let (n, k) = weight.shape().dims2()?;
        let packed = PackedWeights::from_gguf(&weight.data()?, n, k, format, Level::detect());
        Ok(packed.map(|weight| Self::Packed { weight, bias: None }))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Self::Packed { weight, bias } => {
                let (rows, _) = x.dims2()?;
                let input = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (n, _) = weight.shape();
                (Tensor::from_vec(weight.matmul(&input, rows), (rows, n), x.device())?, bias)
            }
            Self::Quantized { weight, bias } => (weight.forward(x)?, bias),
            Self::Dense(linear) => return linear.forward(x),
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The token-embedding table; quantized tables give up only the rows a step needs.
pub enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
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
    /// Qwen3's per-head norms of q and k.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
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
    ) -> Result<Self> {
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let embedding = Arc::new(tensor("token_embd.weight")?);
        let lm_head = match tensor("output.weight") {
            Ok(t) => Linear::quantized(t, None, device)?,
            // Tied embeddings: the output projection is the embedding table
            // (repacked for the kernel where it has one, else shared).
            Err(_) => match Linear::quantized_from(&embedding, device)? {
                Some(packed) => packed,
                None => Linear::Quantized { weight: QMatMul::from_arc(embedding.clone())?, bias: None },
            },
        };
        let norm = tensor("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut t = |suffix: &str| tensor(&format!("blk.{i}.{suffix}"));
            let mut linear = |name: &str, with_bias: bool| -> Result<Linear> {
                let weight = t(&format!("{name}.weight"))?;
                let bias = if with_bias { Some(t(&format!("{name}.bias"))?.dequantize(device)?) } else { None };
                Linear::quantized(weight, bias, device)
            };
            let qkv_bias = config.architecture == Architecture::Qwen2;
            let (q, k, v, o) = (
                linear("attn_q", qkv_bias)?,
                linear("attn_k", qkv_bias)?,
                linear("attn_v", qkv_bias)?,
                linear("attn_output", false)?,
            );
            let (gate, up, down) = (linear("ffn_gate", false)?, linear("ffn_up", false)?, linear("ffn_down", false)?);
            let mut norm = |name: &str| t(name)?.dequantize(device);
            let (q_norm, k_norm) = if config.architecture == Architecture::Qwen3 {
                (Some(norm("attn_q_norm.weight")?), Some(norm("attn_k_norm.weight")?))
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: norm("attn_norm.weight")?,
                ffn_norm: norm("ffn_norm.weight")?,
                q,
                k,
                v,
                o,
                q_norm,
                k_norm,
                gate,
                up,
                down,
            });
        }
        Ok(Self { embedding: Embedding::Quantized(embedding), layers, norm, lm_head, dtype: DType::F32 })
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
    ) -> Result<Self> {
        let dtype = if quantize.is_some() { DType::F32 } else { dtype };
        let get = |name: &str| tensors.load(name, device)?.to_dtype(dtype);
        let linear = |name: &str, with_bias: bool| -> Result<Linear> {
            let bias = if with_bias { Some(get(&format!("{name}.bias"))?) } else { None };
            let weight = get(&format!("{name}.weight"))?;
            match quantize {
                Some(q) if weight.dim(1)?.is_multiple_of(q.block_size()) => {
                    Linear::quantized(QTensor::quantize(&weight, q)?, bias, device)
                }
                _ => Ok(Linear::Dense(candle_nn::Linear::new(weight, bias))),
            }
        };
        let embedding = get("model.embed_tokens.weight")?;
        let lm_head = match get("lm_head.weight") {
            Ok(w) => w,
            Err(_) => embedding.clone(),
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("model.layers.{i}");
            let qkv_bias = config.architecture == Architecture::Qwen2;
            let (q_norm, k_norm) = if config.architecture == Architecture::Qwen3 {
                (
                    Some(get(&format!("{p}.self_attn.q_norm.weight"))?),
                    Some(get(&format!("{p}.self_attn.k_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"), qkv_bias)?,
                k: linear(&format!("{p}.self_attn.k_proj"), qkv_bias)?,
                v: linear(&format!("{p}.self_attn.v_proj"), qkv_bias)?,
                o: linear(&format!("{p}.self_attn.o_proj"), false)?,
                q_norm,
                k_norm,
                ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"), false)?,
                up: linear(&format!("{p}.mlp.up_proj"), false)?,
                down: linear(&format!("{p}.mlp.down_proj"), false)?,
            });
        }
        Ok(Self {
            embedding: Embedding::Dense(embedding),
            layers,
            norm: get("model.norm.weight")?,
            lm_head: Linear::Dense(candle_nn::Linear::new(lm_head, None)),
            dtype,
        })
    }
}
