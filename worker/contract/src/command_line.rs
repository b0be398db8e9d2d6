//! The worker's command lines as the operator writes them. The worker's own
//! parser is tested against [`ServeArgs::to_args`] and [`FetchArgs::to_args`]
//! with every field set (`worker/src/config.rs`), so a flag renamed or retyped
//! on one side fails a test, not a rollout.

/// `kandle-worker serve`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServeArgs {
    /// The model file or directory, as the container sees it.
    pub model: String,
    pub served_model_name: String,
    pub aliases: Vec<String>,
    pub host: String,
    pub port: u16,
    /// The directory of key files; `None` serves without keys (`--no-auth`).
    pub api_keys_dir: Option<String>,
    pub max_context: Option<i32>,
    pub max_batch_size: Option<i32>,
    pub max_batch_tokens: Option<i32>,
    /// Bytes (`2Gi`) or a fraction (`0.25`), as [`crate::engine::KvCacheMemory`] reads it.
    pub kv_cache_memory: Option<String>,
    pub no_prefix_cache: bool,
    pub threads: Option<i32>,
    /// The sampling defaults as JSON.
    pub sampling_defaults: Option<String>,
    /// A Jinja file replacing the model's chat template.
    pub chat_template: Option<String>,
}

impl ServeArgs {
    /// The arguments after the program name.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["serve".to_string()];
        let mut flag = |name: &str, value: String| args.extend([format!("--{name}"), value]);
        flag("model", self.model.clone());
        flag("served-model-name", self.served_model_name.clone());
        for alias in &self.aliases {
            flag("alias", alias.clone());
        }
        flag("host", self.host.clone());
        flag("port", self.port.to_string());
        if let Some(dir) = &self.api_keys_dir {
            flag("api-keys-dir", dir.clone());
        }
        let numbers = [
            ("max-context", self.max_context),
            ("max-batch-size", self.max_batch_size),
            ("max-batch-tokens", self.max_batch_tokens),
            ("threads", self.threads),
        ];
        for (name, value) in numbers {
            if let Some(value) = value {
                flag(name, value.to_string());
            }
        }
        let texts = [
            ("kv-cache-memory", &self.kv_cache_memory),
            ("sampling-defaults", &self.sampling_defaults),
            ("chat-template", &self.chat_template),
        ];
        for (name, value) in texts {
            if let Some(value) = value {
                flag(name, value.clone());
            }
        }
        if self.api_keys_dir.is_none() {
            args.push("--no-auth".into());
        }
        if self.no_prefix_cache {
            args.push("--no-prefix-cache".into());
        }
        args
    }
}

/// `kandle-worker fetch`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FetchArgs {
    pub url: String,
    pub dest: String,
    pub revision: Option<String>,
    pub sha256: Option<String>,
}

impl FetchArgs {
    /// The arguments after the program name.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["fetch".to_string(), self.url.clone(), "--dest".into(), self.dest.clone()];
        for (name, value) in [("--revision", &self.revision), ("--sha256", &self.sha256)] {
            if let Some(value) = value {
                args.extend([name.to_string(), value.clone()]);
            }
        }
        args
    }
}
