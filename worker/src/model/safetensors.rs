//! Hugging Face checkpoints: config.json, *.safetensors, tokenizer.json and
//! tokenizer_config.json, for the Llama, Qwen2, Qwen3 and Gemma 3 architectures.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::DType;
use serde_json::Value as Json;

use super::{
    chat_template, end_of_turn_ids, token_id, tokenizer, ChatTemplate, LoadError, LoadOptions, LoadedModel, ModelInfo,
    Quantize, SpecialTokens,
};
use crate::runtime::config::ModelConfig;
use crate::runtime::rope::Frequencies;
use crate::runtime::weights::Weights;
use crate::runtime::Model;
use crate::startup::Phases;

pub fn load(dir: &Path, options: &LoadOptions<'_>) -> Result<LoadedModel, LoadError> {
    let (template_override, context_limit) = (options.chat_template, options.context_limit);
    let mut phases = Phases::default();
    let config_text = read(&dir.join("config.json"))?;
    let config: Json = parse_json(&config_text, "config.json")?;
    let model_config = ModelConfig::from_hf(&config)?;
    model_config.check()?;
    let architecture = config.get("model_type").and_then(Json::as_str).unwrap_or("llama").to_string();

    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; the worker does not modify them
    // and documents that a model directory must not change while it is served.
    let tensors = unsafe { MmapedSafetensors::multi(&files)? };
    phases.end("mmap");
    let parameters = tensors.tensors().iter().map(|(_, view)| view.shape().iter().product::<usize>() as u64).sum();
    // Weights stay in the dtype they come in (the embedding table's).
    let dtype = ["model.embed_tokens.weight", "language_model.model.embed_tokens.weight"]
        .iter()
        .find_map(|name| tensors.get(name).ok())
        .and_then(|view| DType::try_from(view.dtype()).ok())
        .unwrap_or(DType::F32);
    let device = options.open_device()?;
    let quantize = options.quantize.map(|q| match q {
        Quantize::Q8_0 => GgmlDType::Q8_0,
        Quantize::Q4K => GgmlDType::Q4K,
    });
    let level = options.kernel_level()?;
    let weights = Weights::from_safetensors(&tensors, &model_config, dtype, quantize, &device, level)
        .map_err(|e| LoadError::Format(format!("the {architecture} checkpoint does not match its config.json: {e}")))?;
    let context_length = model_config.context as u64;
    let context = context_limit.map_or(model_config.context, |l| l.min(model_config.context));
    let frequencies = Frequencies::of(&model_config, None, context);
    let model = Model::new(model_config, weights, &frequencies, context, device, options.resolved_threads(), level)?;
    phases.end("weights");
    let quantization = match options.quantize {
        Some(Quantize::Q8_0) => "Q8_0".to_string(),
        Some(Quantize::Q4K) => "Q4_K".to_string(),
        None => dtype_name(dtype).to_string(),
    };

    let tokenizer = tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tok_config: Json = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(text) => parse_json(&text, "tokenizer_config.json")?,
        Err(_) => Json::Null,
    };
    let special_text = |key: &str| -> Option<String> {
        match tok_config.get(key)? {
            Json::String(s) => Some(s.clone()),
            obj => obj.get("content")?.as_str().map(str::to_string),
        }
    };
    let bos = special_text("bos_token").and_then(|t| token_id(&tokenizer, &t).map(|id| (id, t)));
    let eos_text = special_text("eos_token").unwrap_or_default();
    let mut stop_ids = end_of_turn_ids(&tokenizer);
    stop_ids.extend(token_id(&tokenizer, &eos_text));
    stop_ids.extend(config_eos_ids(&config));
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let special = SpecialTokens {
        add_bos: tok_config.get("add_bos_token").and_then(Json::as_bool).unwrap_or(false) && bos.is_some(),
        bos,
        stop_ids,
        eos_text,
    };
    let own = match template_override {
        Some(_) => None,
        None => template_source(dir, &tok_config)?,
    };
    let (source, template_origin) = chat_template::choose(template_override, own);
    let bos_text = special.bos.as_ref().map(|(_, t)| t.as_str()).unwrap_or("");
    let template = ChatTemplate::new(&source, bos_text, &special.eos_text)?;
    phases.end("tokenizer");

    Ok(LoadedModel {
        info: ModelInfo { architecture, quantization, context_length, parameters },
        model,
        tokenizer,
        template,
        template_origin,
        special,
        phases,
    })
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, LoadError> {
    serde_json::from_str(text).map_err(|e| LoadError::Format(format!("{what}: {e}")))
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))? {
        let path = entry.map_err(|e| LoadError::io(dir, e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(LoadError::Format(format!("no .safetensors files in {}", dir.display())));
    }
    files.sort();
    Ok(files)
}

/// The template from tokenizer_config.json (a string, or a list of named templates
/// of which `default` is used), else chat_template.jinja, if any.
fn template_source(dir: &Path, tok_config: &Json) -> Result<Option<String>, LoadError> {
    match tok_config.get("chat_template") {
        Some(Json::String(s)) => return Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let default = list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
            if let Some(s) = default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                return Ok(Some(s.to_string()));
            }
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read(&jinja).map(Some);
    }
    Ok(None)
}

fn config_eos_ids(config: &Json) -> Vec<u32> {
    match config.get("eos_token_id") {
        Some(Json::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Json::Array(list)) => list.iter().filter_map(Json::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        _ => "F32",
    }
}
