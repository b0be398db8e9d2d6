//! The inference engine: one OS thread owns the model and every running sequence;
//! HTTP handlers submit requests over a channel and receive events back.
//!
//! The engine, not the HTTP layer, owns sequences and their state (KV cache,
//! sampler, detokenizer, stop matcher), so the scheduler can change how it
//! decodes them (continuous batching) without touching the API.

mod blocks;
mod detokenizer;
pub mod grammar;
mod output;
mod sampler;
mod scheduler;
mod sequence;
mod stop;
pub mod tool_calls;
pub mod tool_grammar;
pub mod tool_prompt;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::model::SpecialTokens;
use crate::runtime::{KvCache, Logits, Model, StepSequence};

pub use output::ReasoningMode;
pub use sampler::SamplingParams;

/// One chat completion request, tokenized and validated.
#[derive(Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Number of choices; each is its own sequence.
    pub n: usize,
    pub reasoning: ReasoningMode,
    /// The output format the sampler enforces (each choice its own copy).
    pub constraint: Option<grammar::Constraint>,
    /// Special tokens written into the output as their text (tool-call
    /// markers), where other special tokens are left out.
    pub shown: Vec<(u32, String)>,
    /// vLLM's `cache_salt`: prefix-cache blocks are shared only between
    /// requests with the same salt (or none).
    pub cache_salt: Option<String>,
    pub stopping: Stopping,
    /// The log-probability of every prompt token after the first, with this
    /// many alternatives (legacy completions' `echo` with `logprobs`): the
    /// prompt is computed whole, not taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// vLLM's controls of where an answer ends and what its text shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopping {
    /// Tokens before the model's end tokens and `stop_token_ids` may be
    /// sampled (they are masked until then).
    pub min_tokens: usize,
    /// The model's end tokens (EOS, end-of-turn markers) do not end the answer.
    pub ignore_eos: bool,
    /// More tokens that end the answer; one that is not a special token
    /// stays in its text.
    pub stop_token_ids: Vec<u32>,
    /// A matched stop string stays in the text.
    pub include_stop_str_in_output: bool,
    /// Special tokens decode to nothing.
    pub skip_special_tokens: bool,
}

impl Default for Stopping {
    fn default() -> Self {
        Self {
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
        }
    }
}

/// What the engine reports back about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(Delta),
    Finished { index: usize, reason: FinishReason, usage: ChoiceUsage },
    Failed { message: String },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    pub index: usize,
    pub content: String,
    pub reasoning: String,
    pub logprobs: Vec<TokenLogprob>,
    /// Once, before anything else of its choice, when the request asked: the
    /// prompt's tokens after the first, each with its log-probability (none
    /// for a prompt of one token).
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChoiceUsage {
    pub completion_tokens: usize,
    pub reasoning_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Limits the engine runs under.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences in one forward pass.
    pub max_batch_size: usize,
    /// Tokens in one forward pass: a decode token per running sequence, then
    /// prefill chunks of new ones.
    pub max_batch_tokens: usize,
    /// Requests allowed to wait for a slot before new ones are refused.
    pub max_waiting: usize,
    /// Tokens per sequence (prompt + completion).
    pub max_context: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Share full blocks of common prompt prefixes, and keep them after their sequences end.
    pub prefix_cache: bool,
    /// Positions behind a token that any layer still reads, when every layer
    /// attends within a window: blocks wholly behind it are released.
    pub kv_window: Option<usize>,
    /// A step running longer than this marks the engine stalled (`/health` 503).
    pub step_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity; retry shortly")]
    Overloaded,
    #[error("the inference engine has stopped")]
    Stopped,
}

/// Counts shared between the handle and the engine thread.
#[derive(Debug)]
struct Load {
    /// Submitted, not yet admitted to a batch.
    waiting: AtomicUsize,
    /// Set while the engine thread runs.
    alive: AtomicBool,
    /// When the step now running started, in milliseconds since `epoch` plus
    /// one; 0 between steps.
    step_started: AtomicU64,
    epoch: Instant,
}

impl Load {
    fn new() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            step_started: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Marks a step started (`true`) or ended.
    fn step(&self, running: bool) {
        let at = if running { self.epoch.elapsed().as_millis() as u64 + 1 } else { 0 };
        self.step_started.store(at, Ordering::SeqCst);
    }

    /// How long the step now running has run (`None` between steps).
    fn step_running_for(&self) -> Option<Duration> {
        let started = self.step_started.load(Ordering::SeqCst).checked_sub(1)?;
        Some(self.epoch.elapsed().saturating_sub(Duration::from_millis(started)))
    }
}

/// Why the engine cannot serve: the pod should be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EngineFault {
    #[error("the inference engine has stopped")]
    Stopped,
    #[error("the inference engine is stuck: one step has run for {}s", .0.as_secs())]
    Stalled(Duration),
}

/// Marks the engine dead when its thread ends, however it ends.
struct AliveGuard(Arc<Load>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        // A thread that died mid-step is stopped, not stalled.
        self.0.step(false);
    }
}

/// Cheap to clone; every clone submits to the same engine thread.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Queued>,
    load: Arc<Load>,
    max_waiting: usize,
    step_timeout: Duration,
}

#[derive(Debug)]
struct Queued {
    request: GenerateRequest,
    enqueued: Instant,
    /// Where the request's prefix-cache hash chain starts (from its salt).
    cache_root: blocks::PrefixHash,
}

/// What the engine thread needs of the loaded model.
pub struct EngineModel {
    pub model: Model,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub special: SpecialTokens,
}

/// What the scheduler needs of a model: a check of each sequence before a
/// step, and one batched forward pass over the model's own KV cache. The
/// loaded model is the one implementation; the scheduler's tests drive it
/// with a fake.
pub trait ForwardPass: Send {
    /// Whether the sequence can run (see [`Model::check`]); the reason if not.
    fn check(&self, sequence: &StepSequence) -> Result<(), String>;
    /// Runs the step; leaves one row of logits per sequence.
    fn forward(&self, sequences: &[StepSequence], logits: &mut Logits) -> candle_core::Result<()>;
}

/// A loaded model with its KV cache.
struct ModelPass {
    model: Model,
    cache: KvCache,
}

impl ForwardPass for ModelPass {
    fn check(&self, sequence: &StepSequence) -> Result<(), String> {
        self.model.check(sequence, &self.cache)
    }

    fn forward(&self, sequences: &[StepSequence], logits: &mut Logits) -> candle_core::Result<()> {
        self.model.forward(sequences, &self.cache, logits)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot allocate the KV cache: {0}")]
    Cache(#[from] candle_core::Error),
    #[error("{0}")]
    Memory(String),
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl Engine {
    /// Allocates the KV cache and starts the engine thread. It runs until every
    /// handle is dropped.
    pub fn start(model: EngineModel, config: EngineConfig, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        let cache = model.model.kv_cache(config.block_size, config.num_blocks)?;
        metrics.set_cache_config(config.block_size, config.num_blocks);
        let (tx, rx) = std::sync::mpsc::channel();
        let load = Arc::new(Load::new());
        let EngineModel { model, tokenizer, special } = model;
        let pass = Box::new(ModelPass { model, cache });
        let scheduler =
            scheduler::Scheduler::new(pass, tokenizer, special.stop_ids, config, metrics.clone(), load.clone(), rx);
        let guard = AliveGuard(load.clone());
        std::thread::Builder::new().name("kandle-engine".into()).spawn(move || {
            let _guard = guard;
            scheduler.run();
        })?;
        let engine = Self { tx, load, max_waiting: config.max_waiting, step_timeout: config.step_timeout };
        engine.watch(metrics)?;
        Ok(engine)
    }

    /// Whether the engine can serve: its thread runs (it stops only on a bug)
    /// and no step has run past `step_timeout` (a hung kernel or lock). Either
    /// way the pod should be restarted: `/health` answers 503.
    pub fn health(&self) -> Result<(), EngineFault> {
        if !self.load.alive.load(Ordering::SeqCst) {
            return Err(EngineFault::Stopped);
        }
        match self.load.step_running_for() {
            Some(running) if running > self.step_timeout => Err(EngineFault::Stalled(running)),
            _ => Ok(()),
        }
    }

    /// The watchdog: a thread that looks at the engine every second, logs a
    /// stall once when it starts (and once when it ends) and keeps the
    /// `kandle_engine_stalled` gauge. It ends with the last handle.
    fn watch(&self, metrics: Arc<Metrics>) -> std::io::Result<()> {
        let (load, timeout) = (Arc::downgrade(&self.load), self.step_timeout);
        let period = timeout.min(Duration::from_secs(1)).max(Duration::from_millis(10));
        std::thread::Builder::new().name("kandle-watchdog".into()).spawn(move || {
            let mut stalled = false;
            while let Some(load) = load.upgrade() {
                let now = load.step_running_for().is_some_and(|running| running > timeout);
                if now != stalled {
                    stalled = now;
                    metrics.engine_stalled.set(i64::from(now));
                    if now {
                        tracing::error!(
                            timeout_s = timeout.as_secs_f64(),
                            "an engine step is past its timeout; /health fails until it ends"
                        );
                    } else {
                        tracing::warn!("the stalled engine step ended");
                    }
                }
                drop(load);
                std::thread::sleep(period);
            }
        })?;
        Ok(())
    }

    pub fn submit(&self, request: GenerateRequest) -> Result<(), SubmitError> {
        let waiting = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded);
        }
        let cache_root = blocks::root_hash(request.cache_salt.as_deref());
        self.tx.send(Queued { request, enqueued: Instant::now(), cache_root }).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }
}
