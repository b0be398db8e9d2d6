//! GGUF files (llama.cpp's format): quantized Llama-architecture models.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;

use super::gguf_meta::Metadata;
use super::{
    chat_template, end_of_turn_ids, tokenizer, ChatTemplate, LoadError, LoadOptions, LoadedModel, ModelInfo,
    SpecialTokens,
};
use candle_core::Device;

use crate::runtime::config::{Architecture, LongRope, ModelConfig, RopeStyle, SUPPORTED};
use crate::runtime::rope::Frequencies;
use crate::runtime::weights::Weights;
use crate::runtime::Model;
use crate::startup::Phases;

pub fn load(path: &Path, options: &LoadOptions<'_>) -> Result<LoadedModel, LoadError> {
    let (template_override, context_limit) = (options.chat_template, options.context_limit);
    let mut phases = Phases::default();
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| LoadError::Format(format!("{} is not a GGUF file: {e}", path.display())))?;
    phases.end("gguf_header");
    let meta = Metadata::new(&content);

    let architecture = meta.require_string("general.architecture")?.to_string();
    let mut config = model_config(&meta, &content, &architecture)?;
    if config.architecture == Architecture::Phi3 {
        config.longrope = longrope(&meta, &content, &mut reader, &architecture, config.context)?;
        config.check()?;
    }
    let info = ModelInfo {
        quantization: quantization(&meta, &content),
        context_length: config.context as u64,
        parameters: content.tensor_infos.values().map(|t| t.shape.elem_count() as u64).sum(),
        architecture,
    };

    let tokenizer = match sibling_tokenizer(path) {
        Some(json) => tokenizer::from_file(&json)?,
        None => tokenizer::from_gguf(&meta)?,
    };
    let token_text = |key: &str| meta.uint(key).and_then(|id| tokenizer.id_to_token(id as u32).map(|t| (id as u32, t)));
    let bos = token_text("tokenizer.ggml.bos_token_id");
    let eos = token_text("tokenizer.ggml.eos_token_id");
    let mut stop_ids = end_of_turn_ids(&tokenizer);
    stop_ids.extend(eos.as_ref().map(|(id, _)| *id));
    if let Some(eot) = meta.uint("tokenizer.ggml.eot_token_id") {
        stop_ids.push(eot as u32);
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let special = SpecialTokens {
        // llama.cpp's default: SentencePiece files start with BOS, others not.
        add_bos: meta
            .bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(meta.string("tokenizer.ggml.model") == Some("llama"))
            && bos.is_some(),
        bos: bos.clone(),
        stop_ids,
        eos_text: eos.map(|(_, t)| t).unwrap_or_default(),
    };

    let (source, template_origin) =
        chat_template::choose(template_override, meta.string("tokenizer.chat_template").map(str::to_string));
    let bos_text = special.bos.as_ref().map(|(_, t)| t.as_str()).unwrap_or("");
    let template = ChatTemplate::new(&source, bos_text, &special.eos_text)?;
    phases.end("tokenizer");

    let device = options.open_device()?;
    let context = context_limit.map_or(config.context, |l| l.min(config.context));
    // Llama 3's per-frequency divisors.
    let factors = match content.tensor(&mut reader, "rope_freqs.weight", &Device::Cpu) {
        Ok(t) => Some(t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?),
        Err(_) => None,
    };
    let frequencies = Frequencies::of(&config, factors.as_deref(), context);
    let level = options.kernel_level()?;
    let weights = Weights::from_gguf(&content, &mut reader, &config, &device, level)?;
    let model = Model::new(config, weights, &frequencies, context, device, options.resolved_threads(), level)?;
    phases.end("weights");
    Ok(LoadedModel { info, model, tokenizer, template, template_origin, special, phases })
}

/// The model's shape from llama.cpp's metadata keys (`{arch}.embedding_length`, ...).
fn model_config(meta: &Metadata<'_>, content: &Content, arch: &str) -> Result<ModelConfig, LoadError> {
    let architecture = Architecture::parse(arch)
        .ok_or_else(|| LoadError::Unsupported(format!("GGUF architecture `{arch}` (supported: {SUPPORTED})")))?;
    let uint = |key: &str| meta.require_uint(&format!("{arch}.{key}")).map(|v| v as usize);
    let hidden = uint("embedding_length")?;
    let heads = uint("attention.head_count")?;
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| LoadError::Format("no token_embd.weight tensor".into()))?;
    let layers = uint("block_count")?;
    let head_dim = uint("attention.key_length").unwrap_or(hidden / heads.max(1));
    let mut config = ModelConfig {
        architecture,
        hidden,
        intermediate: uint("feed_forward_length")?,
        layers,
        heads,
        kv_heads: uint("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        rotary_dim: uint("rope.dimension_count").unwrap_or(head_dim),
        vocab,
        rms_eps: meta.float(&format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta.float(&format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
        // llama.cpp permutes Llama's q/k weights for interleaved pairs; the others keep halves.
        rope_style: if architecture == Architecture::Llama { RopeStyle::Interleaved } else { RopeStyle::Halves },
        llama3_scaling: None,
        longrope: None,
        context: uint("context_length")?,
        sliding_window: meta.uint(&format!("{arch}.attention.sliding_window")).filter(|&w| w > 0).map(|w| w as usize),
        full_attention_layers: Vec::new(),
        local_rope_theta: None,
        rope_linear_factor: 1.0,
        attention_scale: 1.0 / (head_dim as f64).sqrt(),
    };
    if architecture == Architecture::Gemma3 {
        gemma3(meta, arch, &mut config)?;
    }
    config.check()?;
    Ok(config)
}

/// Phi-3's LongRoPE from a GGUF file: the factor lists are the tensors
/// `rope_factors_short` and `rope_factors_long`, the original context and the
/// cos/sin factor metadata (`rope.scaling.original_context_length`,
/// `rope.scaling.attn_factor`; without the latter, Hugging Face's formula).
fn longrope<R: std::io::Read + std::io::Seek>(
    meta: &Metadata<'_>,
    content: &Content,
    reader: &mut R,
    arch: &str,
    context: usize,
) -> Result<Option<LongRope>, LoadError> {
    let mut list = |name: &str| -> Result<Option<Vec<f64>>, LoadError> {
        match content.tensor(reader, name, &Device::Cpu) {
            Ok(t) => Ok(Some(t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())),
            Err(_) => Ok(None),
        }
    };
    let (Some(short), Some(long)) = (list("rope_factors_short.weight")?, list("rope_factors_long.weight")?) else {
        return Ok(None);
    };
    let original = meta.require_uint(&format!("{arch}.rope.scaling.original_context_length"))? as usize;
    let scale = context as f64 / original.max(2) as f64;
    let attention_factor = meta.float(&format!("{arch}.rope.scaling.attn_factor")).unwrap_or(if scale > 1.0 {
        (1.0 + scale.ln() / (original.max(2) as f64).ln()).sqrt()
    } else {
        1.0
    });
    Ok(Some(LongRope { short, long, original_context: original, attention_factor }))
}

/// What llama.cpp's `gemma3` loader fixes rather than reads: every sixth layer
/// attends globally, the windowed ones rotate with base 10,000 (unless
/// `rope.freq_base_swa` says otherwise), linear rope scaling applies to the
/// global layers only, and the 27B model (62 layers) scales scores by
/// 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim).
fn gemma3(meta: &Metadata<'_>, arch: &str, config: &mut ModelConfig) -> Result<(), LoadError> {
    config.full_attention_layers = ModelConfig::every_nth_layer_full(config.layers, 6);
    config.local_rope_theta = Some(meta.float(&format!("{arch}.rope.freq_base_swa")).unwrap_or(10_000.0));
    match meta.string(&format!("{arch}.rope.scaling.type")) {
        None | Some("none") => {}
        Some("linear") => {
            config.rope_linear_factor = meta.float(&format!("{arch}.rope.scaling.factor")).unwrap_or(1.0);
        }
        Some(other) => return Err(LoadError::Unsupported(format!("Gemma 3 with rope scaling `{other}`"))),
    }
    if config.layers == 62 {
        config.attention_scale = 1.0 / ((config.hidden / config.heads.max(1)) as f64).sqrt();
    }
    Ok(())
}

/// `tokenizer.json` next to the GGUF file wins over the one rebuilt from metadata.
fn sibling_tokenizer(path: &Path) -> Option<std::path::PathBuf> {
    let candidate = path.parent()?.join("tokenizer.json");
    candidate.is_file().then_some(candidate)
}

/// The quantization named by `general.file_type`, else the most common tensor type.
fn quantization(meta: &Metadata<'_>, content: &Content) -> String {
    if let Some(name) = meta.uint("general.file_type").and_then(file_type_name) {
        return name.to_string();
    }
    let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
    for info in content.tensor_infos.values() {
        match counts.iter_mut().find(|(d, _)| *d == info.ggml_dtype) {
            Some((_, n)) => *n += 1,
            None => counts.push((info.ggml_dtype, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| format!("{d:?}").to_uppercase())
        .unwrap_or_else(|| "unknown".to_string())
}

/// llama.cpp's `llama_ftype` numbering.
fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}
