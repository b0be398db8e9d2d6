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
        // The order pods had before this type: an operator upgrade that
        // reorders them would restart every worker for nothing.
        match &self.api_keys_dir {
            Some(dir) => flag("api-keys-dir", dir.clone()),
            None => args.push("--no-auth".into()),
        }
        let number = |args: &mut Vec<String>, name: &str, value: Option<i32>| {
            if let Some(value) = value {
                args.extend([format!("--{name}"), value.to_string()]);
            }
        };
        let text = |args: &mut Vec<String>, name: &str, value: &Option<String>| {
            if let Some(value) = value {
                args.extend([format!("--{name}"), value.clone()]);
            }
        };
        number(&mut args, "max-context", self.max_context);
        number(&mut args, "max-batch-size", self.max_batch_size);
        number(&mut args, "max-batch-tokens", self.max_batch_tokens);
        text(&mut args, "kv-cache-memory", &self.kv_cache_memory);
        if self.no_prefix_cache {
            args.push("--no-prefix-cache".into());
        }
        number(&mut args, "threads", self.threads);
        text(&mut args, "sampling-defaults", &self.sampling_defaults);
        text(&mut args, "chat-template", &self.chat_template);
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
