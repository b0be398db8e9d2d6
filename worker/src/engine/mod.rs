//! The inference engine: one OS thread owns the model and every running sequence;
//! HTTP handlers submit requests over a channel and receive events back.
//!
//! The engine, not the HTTP layer, owns sequences and their state (KV cache,
//! sampler, detokenizer, stop matcher), so the scheduler can change how it
//! decodes them (continuous batching) without touching the API.

mod detokenizer;
mod output;
mod sampler;
mod scheduler;
mod sequence;
mod stop;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::model::{SpecialTokens, Weights};

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
    pub events: mpsc::UnboundedSender<Event>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChoiceUsage {
    pub completion_tokens: usize,
    pub reasoning_tokens: usize,
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
    /// Sequences decoded concurrently.
    pub max_batch_size: usize,
    /// Requests allowed to wait for a slot before new ones are refused.
    pub max_waiting: usize,
    /// Tokens per sequence (prompt + completion).
    pub max_context: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity; retry shortly")]
    Overloaded,
    #[error("the inference engine has stopped")]
    Stopped,
}

/// Counts shared between the handle and the engine thread.
#[derive(Debug, Default)]
struct Load {
    /// Submitted, not yet admitted to a batch.
    waiting: AtomicUsize,
}

/// Cheap to clone; every clone submits to the same engine thread.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Queued>,
    load: Arc<Load>,
    max_waiting: usize,
}

#[derive(Debug)]
struct Queued {
    request: GenerateRequest,
    enqueued: Instant,
}

/// What the engine thread needs of the loaded model.
pub struct EngineModel {
    pub weights: Box<dyn Weights>,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub special: SpecialTokens,
}

impl Engine {
    /// Starts the engine thread. It runs until every handle is dropped.
    pub fn start(model: EngineModel, config: EngineConfig, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let load = Arc::new(Load::default());
        let scheduler = scheduler::Scheduler::new(model, config, metrics, load.clone(), rx);
        std::thread::Builder::new().name("kandle-engine".into()).spawn(move || scheduler.run())?;
        Ok(Self { tx, load, max_waiting: config.max_waiting })
    }

    pub fn submit(&self, request: GenerateRequest) -> Result<(), SubmitError> {
        let waiting = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded);
        }
        self.tx.send(Queued { request, enqueued: Instant::now() }).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }
}
