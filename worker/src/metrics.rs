//! Prometheus metrics: kandle's own series plus the vLLM-named gauges that
//! inference-aware routers read.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub path: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Time to compute one token's grammar mask (structured output).
    pub grammar_mask: Histogram,
    pub queue_depth: Gauge,
    pub batch_size: Gauge,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub preemptions: Counter,
    /// 1 while an engine step has run past `--step-timeout`.
    pub engine_stalled: Gauge,
    /// Tokens run through the model as prompt (prefill or recompute), not decode.
    pub prefill_tokens: Counter,
    step_sequences: Histogram,
    step_tokens: Histogram,
    cache_config: Family<CacheConfigLabels, Gauge>,
    vllm_waiting: Gauge,
    vllm_running: Gauge,
    vllm_kv_cache_usage: Gauge<f64, AtomicU64>,
}

/// `vllm:cache_config_info`'s labels: what prefix-aware routers read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheConfigLabels {
    pub block_size: String,
    pub num_gpu_blocks: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("kandle_requests", "HTTP requests by route and status", requests.clone());
        let prompt_tokens = Counter::default();
        registry.register("kandle_prompt_tokens", "Prompt tokens processed", prompt_tokens.clone());
        let completion_tokens = Counter::default();
        registry.register("kandle_completion_tokens", "Completion tokens generated", completion_tokens.clone());
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "kandle_time_to_first_token_seconds",
            "Time from admission to a request's first generated token",
            time_to_first_token.clone(),
        );
        let inter_token_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "kandle_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            inter_token_latency.clone(),
        );
        let grammar_mask = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        registry.register(
            "kandle_grammar_mask_seconds",
            "Time to compute one token's grammar mask for structured output",
            grammar_mask.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register("kandle_queue_depth", "Requests waiting for a batch slot", queue_depth.clone());
        let batch_size = Gauge::default();
        registry.register("kandle_batch_size", "Sequences being decoded", batch_size.clone());
        let prefix_cache_queries = Counter::default();
        registry.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (vLLM name)",
            prefix_cache_queries.clone(),
        );
        let prefix_cache_hits = Counter::default();
        registry.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (vLLM name)",
            prefix_cache_hits.clone(),
        );
        let preemptions = Counter::default();
        registry.register("kandle_preemptions", "Sequences preempted to free KV blocks", preemptions.clone());
        let engine_stalled = Gauge::default();
        registry.register(
            "kandle_engine_stalled",
            "1 while an engine step has run past --step-timeout (/health fails meanwhile)",
            engine_stalled.clone(),
        );
        let prefill_tokens = Counter::default();
        registry.register(
            "kandle_prefill_tokens",
            "Tokens run through the model as prompt (not served from the prefix cache)",
            prefill_tokens.clone(),
        );
        let step_sequences = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register("kandle_step_sequences", "Sequences in one forward pass", step_sequences.clone());
        let step_tokens = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register("kandle_step_tokens", "Tokens in one forward pass", step_tokens.clone());
        let cache_config = Family::<CacheConfigLabels, Gauge>::default();
        registry.register(
            "vllm:cache_config_info",
            "KV cache configuration: block size (tokens) and number of blocks (vLLM name)",
            cache_config.clone(),
        );
        let vllm_waiting = Gauge::default();
        registry.register("vllm:num_requests_waiting", "Requests waiting (vLLM name)", vllm_waiting.clone());
        let vllm_running = Gauge::default();
        registry.register("vllm:num_requests_running", "Requests running (vLLM name)", vllm_running.clone());
        let vllm_kv_cache_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "vllm:kv_cache_usage_perc",
            "Fraction of the KV cache blocks in use, 0 to 1 (vLLM name)",
            vllm_kv_cache_usage.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            time_to_first_token,
            inter_token_latency,
            grammar_mask,
            queue_depth,
            batch_size,
            prefix_cache_queries,
            prefix_cache_hits,
            preemptions,
            engine_stalled,
            prefill_tokens,
            step_sequences,
            step_tokens,
            cache_config,
            vllm_waiting,
            vllm_running,
            vllm_kv_cache_usage,
        }
    }
}

impl Metrics {
    /// Publishes the engine's load in both naming schemes.
    pub fn set_load(&self, waiting: usize, running_requests: usize, sequences: usize, kv_usage: f64) {
        self.queue_depth.set(waiting as i64);
        self.vllm_waiting.set(waiting as i64);
        self.vllm_running.set(running_requests as i64);
        self.batch_size.set(sequences as i64);
        self.vllm_kv_cache_usage.set(kv_usage);
    }

    /// States the KV cache's shape once, at start-up.
    pub fn set_cache_config(&self, block_size: usize, num_blocks: usize) {
        let labels = CacheConfigLabels { block_size: block_size.to_string(), num_gpu_blocks: num_blocks.to_string() };
        self.cache_config.get_or_create(&labels).set(1);
    }

    /// One forward pass of `sequences` sequences and `tokens` tokens, `prefill` of
    /// them prompt tokens.
    pub fn observe_step(&self, sequences: usize, tokens: usize, prefill: usize) {
        self.step_sequences.observe(sequences as f64);
        self.step_tokens.observe(tokens as f64);
        self.prefill_tokens.inc_by(prefill as u64);
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
