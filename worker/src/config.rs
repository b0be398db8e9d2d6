//! The command line (every flag also reads a `KANDLE_*` environment variable).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kandle_contract::engine;

#[derive(Debug, Parser)]
#[command(name = "kandle-worker", version, about = "Serve a language model behind an OpenAI-compatible API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format: JSON lines (for clusters) or human-readable text.
    #[arg(long, global = true, env = "KANDLE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a model and serve the Chat Completions API.
    Serve(ServeConfig),
    /// Download a model (hf://, https://, http:// with --sha256) into a directory,
    /// or check that a file:// or pvc:// one exists; prints the path to pass to
    /// `serve --model`.
    Fetch(FetchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// hf://org/repo[/file][@revision], https://host/path/model.gguf,
    /// http://host/path/model.gguf (with --sha256), file:///path or pvc://claim/path.
    pub url: String,

    /// Directory to download into (partial files end in .part and resume).
    #[arg(long, env = "KANDLE_DEST")]
    pub dest: PathBuf,

    /// Revision of an hf:// source (branch, tag or commit); default main.
    #[arg(long, env = "KANDLE_REVISION")]
    pub revision: Option<String>,

    /// Expected SHA-256 of a single-file source (64 hex digits); required for http:// URLs.
    #[arg(long, env = "KANDLE_SHA256")]
    pub sha256: Option<String>,

    /// Token for private or gated Hugging Face repositories.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,

    /// Base URL of the Hugging Face Hub (or a mirror).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// A .gguf file, or a directory with a Hugging Face checkpoint (config.json,
    /// *.safetensors, tokenizer.json) or a single .gguf file.
    #[arg(long, env = "KANDLE_MODEL")]
    pub model: PathBuf,

    /// The name clients send as `model`. Defaults to the model file or directory name.
    #[arg(long, env = "KANDLE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Another name clients may send as `model` (repeatable; comma-separated in the env var).
    #[arg(long = "alias", env = "KANDLE_ALIASES", value_delimiter = ',')]
    pub aliases: Vec<String>,

    /// Address to listen on.
    #[arg(long, env = "KANDLE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "KANDLE_PORT", default_value_t = kandle_contract::http::PORT)]
    pub port: u16,

    /// Directory whose files each hold one API key (a mounted Secret); re-read
    /// every second, so rotated keys apply without a restart.
    #[arg(long, env = "KANDLE_API_KEYS_DIR", required_unless_present = "no_auth", conflicts_with = "no_auth")]
    pub api_keys_dir: Option<PathBuf>,

    /// Serve without API keys. Refused unless given explicitly.
    #[arg(long, env = "KANDLE_NO_AUTH")]
    pub no_auth: bool,

    /// Tokens per sequence (prompt + completion); clipped to the model's own context.
    #[arg(long, env = "KANDLE_MAX_CONTEXT", value_parser = in_range(engine::MAX_CONTEXT_LENGTH))]
    pub max_context: Option<usize>,

    /// Sequences in one forward pass (running concurrently).
    #[arg(long, env = "KANDLE_MAX_BATCH_SIZE", default_value_t = 8, value_parser = in_range(engine::MAX_BATCH_SIZE))]
    pub max_batch_size: usize,

    /// Tokens in one forward pass: a decode token per running sequence, then
    /// prefill chunks of new prompts. Bounds how long a new prompt can delay
    /// running streams.
    #[arg(long, env = "KANDLE_MAX_BATCH_TOKENS", default_value_t = 256, value_parser = in_range(engine::MAX_BATCH_TOKENS))]
    pub max_batch_tokens: usize,

    /// Memory of the KV block pool: bytes (2Gi, 512M) or a fraction (0.25) of
    /// the container's memory limit, on a GPU of the device memory free after
    /// loading the weights. Default: enough for --max-batch-size sequences of
    /// the whole context, at most a quarter of the memory limit (on a GPU, 90%
    /// of the free device memory).
    #[arg(long, env = "KANDLE_KV_CACHE_MEMORY", value_parser = engine::KvCacheMemory::parse)]
    pub kv_cache_memory: Option<engine::KvCacheMemory>,

    /// Do not share KV blocks of common prompt prefixes, nor keep them after a request.
    #[arg(long, env = "KANDLE_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,

    /// A forward step running longer than this marks the engine stuck: `/health`
    /// answers 503 (so Kubernetes restarts the pod) until it ends (`120s`, `5m`;
    /// a bare number is seconds).
    #[arg(long, env = "KANDLE_STEP_TIMEOUT", default_value = "120s", value_parser = step_timeout)]
    pub step_timeout: std::time::Duration,

    /// Requests that may wait for a batch slot before new ones get 429.
    #[arg(long, env = "KANDLE_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: usize,

    /// Compute threads of the forward pass; 0: the container's CPU quota (cgroup
    /// cpu.max), else every core the process may run on.
    #[arg(long, env = "KANDLE_THREADS", default_value_t = 0, value_parser = in_range(engine::THREADS))]
    pub threads: usize,

    /// The CPU kernels' instruction set (scalar, avx2, avx512, avx-vnni,
    /// avx512-vnni), e.g. to measure AVX2 on an AVX-512 machine; refused at
    /// start when this CPU does not run it. Default: the best it runs.
    #[arg(long, env = "KANDLE_KERNELS", value_enum)]
    pub kernels: Option<crate::runtime::Isa>,

    /// Where the model runs: auto (the first GPU this process can see in a CUDA
    /// build, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "KANDLE_DEVICE", default_value = "auto")]
    pub device: crate::runtime::device::DeviceChoice,

    /// A Jinja file replacing the model's chat template.
    #[arg(long, env = "KANDLE_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,

    /// Quantize a safetensors checkpoint's linear layers at load (q8_0, q4_k);
    /// without it weights run in the dtype they are stored in.
    #[arg(long, env = "KANDLE_QUANTIZE", value_enum)]
    pub quantize: Option<crate::model::Quantize>,

    /// Sampling defaults for requests that leave them out, as JSON, e.g.
    /// '{"temperature":0.7,"topP":0.8}'. Keys: temperature, topP, topK, minP,
    /// presencePenalty, frequencyPenalty, repetitionPenalty (or the request
    /// parameters' spelling: top_p, ...).
    #[arg(long, env = "KANDLE_SAMPLING_DEFAULTS")]
    pub sampling_defaults: Option<String>,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "KANDLE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// `--step-timeout`: a duration of at least a millisecond (zero would mark
/// every step stalled).
fn step_timeout(text: &str) -> Result<std::time::Duration, String> {
    let timeout = kandle_contract::duration::parse(text)?;
    if timeout.is_zero() {
        return Err("the step timeout must be more than zero".into());
    }
    Ok(timeout)
}

/// A clap parser for an integer flag whose range the shared contract fixes
/// (the CRD field that sets the flag has the same range).
fn in_range(range: std::ops::RangeInclusive<i64>) -> impl clap::builder::TypedValueParser<Value = usize> {
    use clap::builder::TypedValueParser as _;
    clap::value_parser!(i64).range(range).try_map(usize::try_from)
}

#[cfg(test)]
mod tests {
    use kandle_contract::command_line::{FetchArgs as FetchLine, ServeArgs};

    use super::*;

    fn parse(args: Vec<String>) -> Command {
        let argv = std::iter::once("kandle-worker".to_string()).chain(args);
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("the worker refuses the operator's command line: {e}"),
        }
    }

    /// The command line the operator writes, every field set, reads back as
    /// the same values here: a flag renamed or retyped on either side fails.
    #[test]
    fn the_operators_serve_line_parses_to_what_it_says() {
        let line = ServeArgs {
            model: "/models/m.gguf".into(),
            served_model_name: "chat".into(),
            aliases: vec!["fast".into(), "small".into()],
            host: "0.0.0.0".into(),
            port: 8081,
            api_keys_dir: Some("/etc/kandle/keys".into()),
            max_context: Some(2048),
            max_batch_size: Some(4),
            max_batch_tokens: Some(128),
            kv_cache_memory: Some("2Gi".into()),
            no_prefix_cache: true,
            threads: Some(6),
            sampling_defaults: Some(r#"{"temperature":0.7}"#.into()),
            chat_template: Some("/etc/kandle/template/chat_template.jinja".into()),
        };
        let Command::Serve(c) = parse(line.to_args()) else { panic!("not serve") };
        assert_eq!(c.model, PathBuf::from("/models/m.gguf"));
        assert_eq!(c.served_model_name.as_deref(), Some("chat"));
        assert_eq!(c.aliases, ["fast", "small"]);
        assert_eq!((c.host.to_string(), c.port), ("0.0.0.0".to_string(), 8081));
        assert_eq!(c.api_keys_dir, Some(PathBuf::from("/etc/kandle/keys")));
        assert!(!c.no_auth);
        assert_eq!((c.max_context, c.max_batch_size, c.max_batch_tokens, c.threads), (Some(2048), 4, 128, 6));
        assert_eq!(c.kv_cache_memory, Some(engine::KvCacheMemory::Bytes(2 << 30)));
        assert!(c.no_prefix_cache);
        assert_eq!(c.sampling_defaults.as_deref(), Some(r#"{"temperature":0.7}"#));
        assert_eq!(c.chat_template, Some(PathBuf::from("/etc/kandle/template/chat_template.jinja")));

        let keyless = ServeArgs { api_keys_dir: None, ..line };
        let Command::Serve(c) = parse(keyless.to_args()) else { panic!("not serve") };
        assert!(c.no_auth && c.api_keys_dir.is_none());
    }

    #[test]
    fn the_operators_fetch_line_parses_to_what_it_says() {
        let line = FetchLine {
            url: "hf://org/repo/m.gguf".into(),
            dest: "/var/lib/kandle/cache/hf/org/repo".into(),
            revision: Some("v1".into()),
            sha256: Some("a".repeat(64)),
        };
        let Command::Fetch(f) = parse(line.to_args()) else { panic!("not fetch") };
        assert_eq!(f.url, line.url);
        assert_eq!(f.dest, PathBuf::from(&line.dest));
        assert_eq!((f.revision, f.sha256), (line.revision, line.sha256));
    }
}
