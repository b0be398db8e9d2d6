//! Model loading: GGUF files and Hugging Face safetensors directories, each with its
//! tokenizer and chat template.

mod chat_template;
mod gguf;
mod gguf_meta;
mod safetensors;
pub mod tokenizer;

use std::path::Path;

pub use chat_template::{ChatTemplate, RenderOptions, TemplateFeatures, CHATML_END};
pub use kandle_contract::http::TemplateOrigin;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read model at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed model: {0}")]
    Format(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// `--kernels` names a level this CPU does not run.
    #[error("--kernels: {0}")]
    Kernels(String),
}

/// The runtime's verdict on a model's shape, in the loader's words.
impl From<crate::runtime::config::ConfigError> for LoadError {
    fn from(e: crate::runtime::config::ConfigError) -> Self {
        use crate::runtime::config::ConfigError;
        match e {
            ConfigError::Format(m) => Self::Format(m),
            ConfigError::Unsupported(m) => Self::Unsupported(m),
        }
    }
}

impl LoadError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}

/// What the worker reports about the model it serves (also surfaced in CRD status).
pub use kandle_contract::ModelInfo;

/// Special tokens the engine and the template need.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<(u32, String)>,
    /// Tokens that end generation (EOS and end-of-turn markers).
    pub stop_ids: Vec<u32>,
    pub eos_text: String,
    /// Prepend BOS to prompts that do not already start with it.
    pub add_bos: bool,
}

pub struct LoadedModel {
    pub info: ModelInfo,
    /// The forward pass over the loaded weights.
    pub model: crate::runtime::Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    pub template_origin: TemplateOrigin,
    pub special: SpecialTokens,
    /// How long each part of loading took.
    pub phases: crate::startup::Phases,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("info", &self.info).field("special", &self.special).finish_non_exhaustive()
    }
}

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions<'a> {
    /// Replaces the model's chat template.
    pub chat_template: Option<&'a str>,
    /// Caps the tokens per sequence the model is prepared for.
    pub context_limit: Option<usize>,
    /// Quantizes a safetensors checkpoint's linear layers at load.
    pub quantize: Option<Quantize>,
    /// Compute threads of the forward pass; 0: the CPUs this process may use.
    pub threads: usize,
    /// Where the model runs.
    pub device: crate::runtime::device::DeviceChoice,
    /// The CPU kernels' instruction set; `None`: the best this CPU runs.
    pub kernels: Option<crate::runtime::Isa>,
}

impl LoadOptions<'_> {
    /// The compute threads to start: as asked, else the container's CPU quota.
    pub fn resolved_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            crate::resources::cpu_limit()
        }
    }

    /// The CPU kernels' level: the best this CPU runs, or the one `--kernels`
    /// asks for, refused when the CPU lacks it (the check detection makes).
    pub fn kernel_level(&self) -> Result<crate::runtime::Level, LoadError> {
        match self.kernels {
            None => Ok(crate::runtime::Level::detect()),
            Some(isa) => crate::runtime::Level::supported(isa).map_err(LoadError::Kernels),
        }
    }

    /// Opens the device the model is loaded on.
    pub fn open_device(&self) -> Result<candle_core::Device, LoadError> {
        let device = self.device.open().map_err(LoadError::Unsupported)?;
        tracing::info!(device = %crate::runtime::device::name(&device), choice = %self.device, "device");
        Ok(device)
    }
}

/// Weight formats a safetensors checkpoint can be quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

/// Loads a `.gguf` file, or a directory holding either one GGUF file or a Hugging
/// Face safetensors checkpoint.
pub fn load(path: &Path, options: &LoadOptions<'_>) -> Result<LoadedModel, LoadError> {
    let meta = std::fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
    let gguf = |file: &Path| {
        if options.quantize.is_some() {
            return Err(LoadError::Unsupported(
                "--quantize applies to safetensors checkpoints; a GGUF file is quantized already".into(),
            ));
        }
        gguf::load(file, options)
    };
    if meta.is_file() {
        return gguf(path);
    }
    if path.join("config.json").is_file() {
        return safetensors::load(path, options);
    }
    let ggufs = gguf_files_in(path)?;
    match ggufs.as_slice() {
        [one] => gguf(one),
        [] => Err(LoadError::Format(format!("{} holds neither config.json nor a .gguf file", path.display()))),
        _ => Err(LoadError::Format(format!("{} holds several .gguf files; pass the one to serve", path.display()))),
    }
}

fn gguf_files_in(dir: &Path) -> Result<Vec<std::path::PathBuf>, LoadError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))? {
        let p = entry.map_err(|e| LoadError::io(dir, e))?.path();
        if p.extension().is_some_and(|x| x == "gguf") {
            found.push(p);
        }
    }
    found.sort();
    Ok(found)
}

/// Finds a token's id, for special tokens named in configuration.
fn token_id(tokenizer: &tokenizers::Tokenizer, token: &str) -> Option<u32> {
    tokenizer.token_to_id(token)
}

/// End-of-turn markers of common chat formats that also end generation.
fn end_of_turn_ids(tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| token_id(tokenizer, t))
        .collect()
}
