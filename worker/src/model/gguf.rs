//! GGUF files (llama.cpp's format): quantized Llama-architecture models.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;

use super::gguf_meta::Metadata;
use super::{
    end_of_turn_ids, tokenizer, ChatTemplate, LoadError, LoadedModel, ModelInfo, Session, SpecialTokens, Weights,
    CHATML,
};

/// Architectures whose tensors candle's quantized Llama implementation reads.
const LLAMA_LIKE: &[&str] = &["llama", "mistral"];

pub fn load(path: &Path, template_override: Option<&str>) -> Result<LoadedModel, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| LoadError::Format(format!("{} is not a GGUF file: {e}", path.display())))?;
    let meta = Metadata::new(&content);

    let architecture = meta.require_string("general.architecture")?.to_string();
    if !LLAMA_LIKE.contains(&architecture.as_str()) {
        return Err(LoadError::Unsupported(format!(
            "GGUF architecture `{architecture}` (supported: {})",
            LLAMA_LIKE.join(", ")
        )));
    }
    let file_context = meta.require_uint(&format!("{architecture}.context_length"))? as usize;
    let info = ModelInfo {
        quantization: quantization(&meta, &content),
        // candle's implementation precomputes rotary tables for a fixed window.
        context_length: file_context.min(quantized_llama::MAX_SEQ_LEN) as u64,
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
        add_bos: meta.bool("tokenizer.ggml.add_bos_token").unwrap_or(false) && bos.is_some(),
        bos: bos.clone(),
        stop_ids,
        eos_text: eos.map(|(_, t)| t).unwrap_or_default(),
    };

    let source = template_override
        .map(str::to_string)
        .or_else(|| meta.string("tokenizer.chat_template").map(str::to_string))
        .unwrap_or_else(|| CHATML.to_string());
    let bos_text = special.bos.as_ref().map(|(_, t)| t.as_str()).unwrap_or("");
    let template = ChatTemplate::new(&source, bos_text, &special.eos_text)?;

    let weights = quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
    Ok(LoadedModel { info, weights: Box::new(QuantizedLlama(weights)), tokenizer, template, special })
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

cloned_cache_model!(QuantizedLlama, QuantizedLlamaSession, quantized_llama::ModelWeights);
