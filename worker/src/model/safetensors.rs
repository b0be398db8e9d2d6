//! Hugging Face checkpoints: config.json, *.safetensors, tokenizer.json and
//! tokenizer_config.json, for the Llama, Qwen2 and Qwen3 architectures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2, qwen3};
use serde_json::Value as Json;

use super::{
    end_of_turn_ids, token_id, tokenizer, ChatTemplate, LoadError, LoadedModel, ModelInfo, Session, SpecialTokens,
    Weights, CHATML,
};

pub fn load(dir: &Path, template_override: Option<&str>) -> Result<LoadedModel, LoadError> {
    let config_text = read(&dir.join("config.json"))?;
    let config: Json = parse_json(&config_text, "config.json")?;
    let architecture = config
        .get("model_type")
        .and_then(Json::as_str)
        .ok_or_else(|| LoadError::Format("config.json has no `model_type`".into()))?
        .to_string();

    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; the worker does not modify them
    // and documents that a model directory must not change while it is served.
    let tensors = unsafe { MmapedSafetensors::multi(&files)? };
    let parameters = tensors.tensors().iter().map(|(_, view)| view.shape().iter().product::<usize>() as u64).sum();
    let device = Device::Cpu;
    // candle's CPU kernels are fastest, and exact, in F32.
    let vb = VarBuilder::from_backend(Box::new(tensors), DType::F32, device.clone());

    let context_length = config
        .get("max_position_embeddings")
        .and_then(Json::as_u64)
        .ok_or_else(|| LoadError::Format("config.json has no `max_position_embeddings`".into()))?;
    let weights: Box<dyn Weights> = match architecture.as_str() {
        "llama" | "mistral" => {
            let cfg: llama::LlamaConfig = parse_json(&config_text, "config.json")?;
            let cfg = cfg.into_config(false);
            let model = build("llama", || llama::Llama::load(vb, &cfg))?;
            let cache = llama::Cache::new(true, DType::F32, &cfg, &device)?;
            Box::new(HfLlama { model: Arc::new(model), cache })
        }
        "qwen2" => {
            let cfg: qwen2::Config = parse_json(&config_text, "config.json")?;
            Box::new(Qwen2(build("qwen2", || qwen2::ModelForCausalLM::new(&cfg, vb))?))
        }
        "qwen3" => {
            let cfg: qwen3::Config = parse_json(&config_text, "config.json")?;
            Box::new(Qwen3(build("qwen3", || qwen3::ModelForCausalLM::new(&cfg, vb))?))
        }
        other => {
            return Err(LoadError::Unsupported(format!(
                "safetensors architecture `{other}` (supported: llama, mistral, qwen2, qwen3)"
            )))
        }
    };
    let quantization = config
        .get("torch_dtype")
        .or_else(|| config.get("dtype"))
        .and_then(Json::as_str)
        .map(dtype_name)
        .unwrap_or("F32")
        .to_string();

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
    let source = match template_override {
        Some(t) => t.to_string(),
        None => template_source(dir, &tok_config)?,
    };
    let bos_text = special.bos.as_ref().map(|(_, t)| t.as_str()).unwrap_or("");
    let template = ChatTemplate::new(&source, bos_text, &special.eos_text)?;

    Ok(LoadedModel {
        info: ModelInfo { architecture, quantization, context_length, parameters },
        weights,
        tokenizer,
        template,
        special,
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
/// of which `default` is used), else chat_template.jinja, else ChatML.
fn template_source(dir: &Path, tok_config: &Json) -> Result<String, LoadError> {
    match tok_config.get("chat_template") {
        Some(Json::String(s)) => return Ok(s.clone()),
        Some(Json::Array(list)) => {
            let default = list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
            if let Some(s) = default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                return Ok(s.to_string());
            }
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read(&jinja);
    }
    Ok(CHATML.to_string())
}

fn config_eos_ids(config: &Json) -> Vec<u32> {
    match config.get("eos_token_id") {
        Some(Json::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Json::Array(list)) => list.iter().filter_map(Json::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

fn dtype_name(torch: &str) -> &'static str {
    match torch {
        "bfloat16" => "BF16",
        "float16" => "F16",
        _ => "F32",
    }
}

/// candle's Llama loader panics on a missing tensor; turn that into an error.
fn build<T>(arch: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T, LoadError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => Ok(result?),
        Err(_) => Err(LoadError::Format(format!("the {arch} checkpoint is missing tensors its config.json calls for"))),
    }
}

struct HfLlama {
    model: Arc<llama::Llama>,
    cache: llama::Cache,
}

impl Weights for HfLlama {
    fn session(&self) -> Box<dyn Session> {
        Box::new(HfLlamaSession { model: self.model.clone(), cache: self.cache.clone() })
    }
}

struct HfLlamaSession {
    model: Arc<llama::Llama>,
    cache: llama::Cache,
}

impl Session for HfLlamaSession {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        self.model.forward(&input, pos, &mut self.cache)?.flatten_all()
    }
}

cloned_cache_model!(Qwen2, Qwen2Session, qwen2::ModelForCausalLM);
cloned_cache_model!(Qwen3, Qwen3Session, qwen3::ModelForCausalLM);
