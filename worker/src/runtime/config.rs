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
    /// Gemma 3: q/k norms, norms after attention and the MLP too, GeGLU, a
    /// scaled embedding, sliding-window layers with their own rotary base
    /// between full-attention ones.
    Gemma3,
    /// Phi-3 and Phi-4-mini: fused q/k/v and gate/up projections (split at
    /// load), partial rotary embeddings, LongRoPE.
    Phi3,
}

impl Architecture {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "gemma3" | "gemma3_text" => Some(Self::Gemma3),
            "phi3" => Some(Self::Phi3),
            _ => None,
        }
    }
}

pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, gemma3, phi3";

impl Architecture {
    /// Per-head RMS norms of q and k before the rotation.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3)
    }

    /// RMS norms of the attention and MLP outputs before they join the residual.
    pub fn has_post_norms(self) -> bool {
        self == Self::Gemma3
    }

    /// The MLP's gate activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// The factor token embeddings are multiplied by: Gemma's sqrt(hidden).
    pub fn embedding_scale(self, hidden: usize) -> Option<f32> {
        (self == Self::Gemma3).then(|| (hidden as f32).sqrt())
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU's tanh approximation (GeGLU; PyTorch's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension 2i with 2i+1 (GGUF Llama, whose q/k weights are permuted for it).
    Interleaved,
    /// Dimension i with i + d/2 (Hugging Face checkpoints, GGUF Qwen).
    Halves,
}

/// Phi-3's LongRoPE: per-frequency divisors for contexts up to the original
/// length (`short`) and past it (`long`), and a factor on cos and sin.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short: Vec<f64>,
    pub long: Vec<f64>,
    pub original_context: usize,
    pub attention_factor: f64,
}

impl LongRope {
    /// The divisors for a model served up to `context` tokens (llama.cpp's
    /// choice: fixed by the served context, not by each sequence's length).
    pub fn factors(&self, context: usize) -> &[f64] {
        if context > self.original_context {
            &self.long
        } else {
            &self.short
        }
    }
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
    /// The leading dimensions of each q and k head that rotate (Phi's partial
    /// rotary embeddings); `head_dim` for most models.
    pub rotary_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    pub llama3_scaling: Option<Llama3Scaling>,
    pub longrope: Option<LongRope>,
    /// Tokens per sequence the model was trained for.
    pub context: usize,
    /// Sliding-window attention: positions a token reads, its own included.
    pub sliding_window: Option<usize>,
    /// Layers that attend over the whole context although the model has a
    /// window (Gemma 3's every sixth); the others use the window.
    pub full_attention_layers: Vec<usize>,
    /// The rotary base of the windowed layers where it differs from
    /// `rope_theta` (Gemma 3's 10,000).
    pub local_rope_theta: Option<f64>,
    /// Linear position scaling of the full-attention layers' rotation (Gemma 3
    /// 4B and up: 8); 1 for none.
    pub rope_linear_factor: f64,
    /// The factor attention scores are multiplied by (1/sqrt(head_dim) unless
    /// the model says otherwise).
    pub attention_scale: f64,
}

impl ModelConfig {
    /// From a Hugging Face `config.json` (a Gemma 3 multimodal one: its
    /// `text_config`).
    pub fn from_hf(config: &Json) -> Result<Self, ConfigError> {
        let config = text_config(config);
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
        let scaling_type = scaling.and_then(|s| s.get("rope_type").or_else(|| s.get("type"))).and_then(Json::as_str);
        let mut rope_linear_factor = 1.0;
        let mut longrope = None;
        let llama3_scaling = match scaling {
            Some(s) if architecture == Architecture::Phi3 && matches!(scaling_type, Some("longrope" | "su")) => {
                longrope = Some(hf_longrope(config, s)?);
                None
            }
            Some(s) if architecture == Architecture::Gemma3 && scaling_type == Some("linear") => {
                rope_linear_factor = s.get("factor").and_then(Json::as_f64).unwrap_or(1.0);
                None
            }
            Some(s) if scaling_type == Some("llama3") => {
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
        let layers = uint("num_hidden_layers")?;
        let head_dim = uint("head_dim").unwrap_or(hidden / heads.max(1));
        let mut model = Self {
            architecture,
            hidden,
            intermediate: uint("intermediate_size")?,
            layers,
            heads,
            kv_heads: uint("num_key_value_heads").unwrap_or(heads),
            head_dim,
            rotary_dim: head_dim,
            vocab: uint("vocab_size")?,
            rms_eps: config.get("rms_norm_eps").and_then(Json::as_f64).unwrap_or(1e-6),
            rope_theta: config.get("rope_theta").and_then(Json::as_f64).unwrap_or(10_000.0),
            rope_style: RopeStyle::Halves,
            llama3_scaling,
            longrope,
            context: uint("max_position_embeddings")?,
            sliding_window: None,
            full_attention_layers: Vec::new(),
            local_rope_theta: None,
            rope_linear_factor,
            attention_scale: 1.0 / (head_dim as f64).sqrt(),
        };
        if architecture == Architecture::Gemma3 {
            gemma3_hf(config, &mut model)?;
        } else {
            model.sliding_window = hf_window(config, architecture)?;
        }
        if let Some(factor) = config.get("partial_rotary_factor").and_then(Json::as_f64) {
            // Whole pairs of dimensions.
            model.rotary_dim = ((factor * head_dim as f64) as usize) & !1;
        }
        Ok(model)
    }

    /// The window layer `layer` attends within, if any.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| !self.full_attention_layers.contains(&layer))
    }

    /// The positions behind a token any layer still reads, when every layer
    /// attends within the window (Mistral v0.1): KV blocks wholly behind it
    /// can go. None when some layer reads the whole context (Gemma 3).
    pub fn kv_window(&self) -> Option<usize> {
        self.sliding_window.filter(|_| self.full_attention_layers.is_empty())
    }

    /// Whether layer `layer` rotates with the local rotary base (else the global one).
    pub fn layer_rope_is_local(&self, layer: usize) -> bool {
        self.local_rope_theta.is_some() && self.layer_window(layer).is_some()
    }

    /// Gemma 3's layer pattern: every `period`-th layer attends over the whole
    /// context, the rest within the window.
    pub fn every_nth_layer_full(layers: usize, period: usize) -> Vec<usize> {
        (0..layers).filter(|i| period > 0 && (i + 1) % period == 0).collect()
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
            && self.rotary_dim > 0
            && self.rotary_dim <= self.head_dim
            && self.rotary_dim.is_multiple_of(2)
            && self
                .longrope
                .as_ref()
                .is_none_or(|l| l.short.len() == self.rotary_dim / 2 && l.long.len() == self.rotary_dim / 2)
            && self.layers > 0
            && self.vocab > 0
            && self.full_attention_layers.iter().all(|&l| l < self.layers)
            && self.attention_scale.is_finite()
            && self.attention_scale > 0.0
            && self.rope_linear_factor.is_finite()
            && self.rope_linear_factor > 0.0;
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Format(format!("inconsistent model shape: {self:?}")))
        }
    }
}

/// Phi-3's `rope_scaling` of type `longrope` (`su` in early configs): the
/// factor lists, `original_max_position_embeddings`, and the cos/sin factor
/// (`attention_factor`, else sqrt(1 + ln(s) / ln(original)) with s the
/// context over the original, as Hugging Face computes it).
fn hf_longrope(config: &Json, scaling: &Json) -> Result<LongRope, ConfigError> {
    let list = |key: &str| -> Result<Vec<f64>, ConfigError> {
        scaling
            .get(key)
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(Json::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| ConfigError::Format(format!("rope_scaling has no numeric `{key}` list")))
    };
    let original = config
        .get("original_max_position_embeddings")
        .and_then(Json::as_u64)
        .filter(|&o| o > 1)
        .ok_or_else(|| ConfigError::Format("longrope needs original_max_position_embeddings".into()))?
        as usize;
    let context = config.get("max_position_embeddings").and_then(Json::as_u64).unwrap_or(original as u64) as f64;
    let scale = context / original as f64;
    let attention_factor = match scaling.get("attention_factor").and_then(Json::as_f64) {
        Some(f) => f,
        None if scale > 1.0 => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
        None => 1.0,
    };
    Ok(LongRope {
        short: list("short_factor")?,
        long: list("long_factor")?,
        original_context: original,
        attention_factor,
    })
}

/// A multimodal config's language model (`text_config`), else the config itself.
fn text_config(config: &Json) -> &Json {
    match config.get("text_config") {
        Some(text) if text.is_object() && config.get("model_type").and_then(Json::as_str) == Some("gemma3") => text,
        _ => config,
    }
}

/// Gemma 3's `config.json` keys: the layer pattern (`layer_types`, else
/// `sliding_window_pattern`, default 6), `rope_local_base_freq`,
/// `query_pre_attn_scalar`, GELU-tanh, and no soft-capping (Gemma 2's).
fn gemma3_hf(config: &Json, model: &mut ModelConfig) -> Result<(), ConfigError> {
    let unsupported = |what: String| Err(ConfigError::Unsupported(what));
    for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if config.get(cap).is_some_and(|v| !v.is_null()) {
            return unsupported(format!("Gemma 3 with `{cap}`"));
        }
    }
    let activation = config.get("hidden_activation").or_else(|| config.get("hidden_act")).and_then(Json::as_str);
    if !matches!(activation, None | Some("gelu_pytorch_tanh")) {
        return unsupported(format!("Gemma 3 with activation {activation:?} (supported: gelu_pytorch_tanh)"));
    }
    model.sliding_window = config.get("sliding_window").and_then(Json::as_u64).filter(|&w| w > 0).map(|w| w as usize);
    model.full_attention_layers = match config.get("layer_types").and_then(Json::as_array) {
        Some(types) => {
            if types.len() != model.layers {
                return Err(ConfigError::Format(format!(
                    "layer_types lists {} layers, num_hidden_layers is {}",
                    types.len(),
                    model.layers
                )));
            }
            let mut full = Vec::new();
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    Some("full_attention") => full.push(i),
                    Some("sliding_attention") => {}
                    _ => return unsupported(format!("layer type {t}")),
                }
            }
            full
        }
        None => {
            let period = config.get("sliding_window_pattern").and_then(Json::as_u64).unwrap_or(6) as usize;
            ModelConfig::every_nth_layer_full(model.layers, period)
        }
    };
    model.local_rope_theta = Some(config.get("rope_local_base_freq").and_then(Json::as_f64).unwrap_or(10_000.0));
    if let Some(scalar) = config.get("query_pre_attn_scalar").and_then(Json::as_f64).filter(|s| *s > 0.0) {
        model.attention_scale = 1.0 / scalar.sqrt();
    }
    Ok(())
}

/// The sliding window a `config.json` declares and uses: Mistral v0.1 uses
/// its 4096 on every layer. Qwen2 and Qwen3 declare one that is off by default
/// (`use_sliding_window`) and, on, windows only the layers from
/// `max_window_layers` on: not run here, so refused.
fn hf_window(config: &Json, architecture: Architecture) -> Result<Option<usize>, ConfigError> {
    let declared = config.get("sliding_window").and_then(Json::as_u64).filter(|&w| w > 0).map(|w| w as usize);
    let used = config.get("use_sliding_window").and_then(Json::as_bool);
    match architecture {
        Architecture::Llama | Architecture::Phi3 => Ok(declared.filter(|_| used != Some(false))),
        Architecture::Gemma3 => Ok(None),
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

    #[test]
    fn gemma3_layers_windows_and_rotary_bases() {
        let gemma = |extra: Json| {
            let mut c = config(json!({"model_type": "gemma3_text", "num_hidden_layers": 12, "head_dim": 16,
                "sliding_window": 512, "query_pre_attn_scalar": 64}));
            if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(extra.clone());
            }
            ModelConfig::from_hf(&c)
        };
        let m = gemma(json!({})).expect("a config");
        assert_eq!(m.architecture, Architecture::Gemma3);
        assert_eq!(m.full_attention_layers, vec![5, 11], "every sixth by default");
        assert_eq!((m.layer_window(0), m.layer_window(5)), (Some(512), None));
        assert!(m.layer_rope_is_local(4) && !m.layer_rope_is_local(11));
        assert_eq!((m.local_rope_theta, m.attention_scale), (Some(10_000.0), 0.125));
        let types: Vec<&str> =
            (0..12).map(|i| if i % 3 == 2 { "full_attention" } else { "sliding_attention" }).collect();
        assert_eq!(gemma(json!({"layer_types": types})).expect("a config").full_attention_layers, vec![2, 5, 8, 11]);
        assert!(gemma(json!({"layer_types": ["full_attention"]})).is_err(), "one type per layer");
        assert_eq!(
            gemma(json!({"sliding_window_pattern": 4})).expect("a config").full_attention_layers,
            vec![3, 7, 11]
        );
        assert!(gemma(json!({"final_logit_softcapping": 30.0})).is_err(), "Gemma 2's soft-capping is refused");
        assert!(gemma(json!({"hidden_activation": "relu"})).is_err());
        let scaled = gemma(json!({"rope_scaling": {"rope_type": "linear", "factor": 8.0}})).expect("a config");
        assert_eq!(scaled.rope_linear_factor, 8.0);
        // A multimodal config's language model.
        let nested = json!({"model_type": "gemma3", "text_config": config(json!({"model_type": "gemma3_text"}))});
        assert_eq!(ModelConfig::from_hf(&nested).expect("a config").architecture, Architecture::Gemma3);
    }
}
