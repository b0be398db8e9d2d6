//! The shape of a Llama-family model, read from GGUF metadata or a Hugging Face
//! config.json: everything the forward pass needs besides the tensors.

use serde_json::Value as Json;

/// A config that does not describe a model, or a model kandle cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("malformed model: {0}")]
    Format(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

/// The architectures the runtime runs; they differ in a few switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and Mistral.
    Llama,
    /// Qwen2: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: RMS norms on each head's q and k.
    Qwen3,
}

impl Architecture {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }
}

pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3";

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension 2i with 2i+1 (GGUF Llama, whose q/k weights are permuted for it).
    Interleaved,
    /// Dimension i with i + d/2 (Hugging Face checkpoints, GGUF Qwen).
    Halves,
}

/// Llama 3.x frequency scaling (`rope_scaling.rope_type: llama3`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_context: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    pub llama3_scaling: Option<Llama3Scaling>,
    /// Tokens per sequence the model was trained for.
    pub context: usize,
    /// Sliding-window attention: positions a token reads, its own included.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// From a Hugging Face `config.json`.
    pub fn from_hf(config: &Json) -> Result<Self, ConfigError> {
        let uint = |key: &str| -> Result<usize, ConfigError> {
            config
                .get(key)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ConfigError::Format(format!("config.json has no `{key}`")))
        };
        let name = config.get("model_type").and_then(Json::as_str).unwrap_or("");
        let architecture = Architecture::parse(name)
            .ok_or_else(|| ConfigError::Unsupported(format!("architecture `{name}` (supported: {SUPPORTED})")))?;
        let hidden = uint("hidden_size")?;
        let heads = uint("num_attention_heads")?;
        let scaling = config.get("rope_scaling").filter(|s| !s.is_null());
        let llama3_scaling = match scaling {
            Some(s) if s.get("rope_type").or_else(|| s.get("type")).and_then(Json::as_str) == Some("llama3") => {
                let f = |k: &str| s.get(k).and_then(Json::as_f64);
                Some(Llama3Scaling {
                    factor: f("factor").unwrap_or(8.0),
                    low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                    high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                    original_context: f("original_max_position_embeddings").unwrap_or(8192.0),
                })
            }
            Some(s) => {
                return Err(ConfigError::Unsupported(format!("rope_scaling {s} (supported: llama3)")));
            }
            None => None,
        };
        Ok(Self {
            architecture,
            hidden,
            intermediate: uint("intermediate_size")?,
            layers: uint("num_hidden_layers")?,
            heads,
            kv_heads: uint("num_key_value_heads").unwrap_or(heads),
            head_dim: uint("head_dim").unwrap_or(hidden / heads.max(1)),
            vocab: uint("vocab_size")?,
            rms_eps: config.get("rms_norm_eps").and_then(Json::as_f64).unwrap_or(1e-6),
            rope_theta: config.get("rope_theta").and_then(Json::as_f64).unwrap_or(10_000.0),
            rope_style: RopeStyle::Halves,
            llama3_scaling,
            context: uint("max_position_embeddings")?,
            sliding_window: hf_window(config, architecture)?,
        })
    }

    /// Grouped-query attention: query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        let ok = self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            && self.layers > 0
            && self.vocab > 0;
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Format(format!("inconsistent model shape: {self:?}")))
        }
    }
}

/// The sliding window a `config.json` declares and uses: Mistral v0.1 uses
/// its 4096 on every layer. Qwen2 and Qwen3 declare one that is off by default
/// (`use_sliding_window`) and, on, windows only the layers from
/// `max_window_layers` on: not run here, so refused.
fn hf_window(config: &Json, architecture: Architecture) -> Result<Option<usize>, ConfigError> {
    let declared = config.get("sliding_window").and_then(Json::as_u64).filter(|&w| w > 0).map(|w| w as usize);
    let used = config.get("use_sliding_window").and_then(Json::as_bool);
    match architecture {
        Architecture::Llama => Ok(declared.filter(|_| used != Some(false))),
        Architecture::Qwen2 | Architecture::Qwen3 => match (declared, used) {
            (Some(_), Some(true)) => {
                Err(ConfigError::Unsupported("per-layer sliding windows (Qwen's use_sliding_window: true)".into()))
            }
            _ => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(extra: Json) -> Json {
        let mut c = json!({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
                           "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100,
                           "max_position_embeddings": 32768});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    }

    #[test]
    fn a_sliding_window_counts_where_the_model_uses_it() {
        let window = |extra: Json| ModelConfig::from_hf(&config(extra)).expect("a config").sliding_window;
        assert_eq!(window(json!({"sliding_window": 4096})), Some(4096));
        assert_eq!(window(json!({"sliding_window": 4096, "use_sliding_window": false})), None);
        assert_eq!(window(json!({"sliding_window": null})), None);
        assert_eq!(window(json!({"sliding_window": 0})), None);
        assert_eq!(window(json!({})), None);
        // Qwen's window is off unless asked for, and per layer when it is.
        let qwen = |extra: Json| {
            let mut c = config(extra);
            c["model_type"] = json!("qwen2");
            ModelConfig::from_hf(&c)
        };
        assert_eq!(qwen(json!({"sliding_window": 4096})).expect("a config").sliding_window, None);
        assert!(qwen(json!({"sliding_window": 4096, "use_sliding_window": true})).is_err());
        // The whole context is served either way.
        assert_eq!(ModelConfig::from_hf(&config(json!({"sliding_window": 4096}))).expect("a config").context, 32768);
    }
}
