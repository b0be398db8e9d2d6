//! The served model as the HTTP layer sees it: names, limits, template, tokenizer
//! and the engine that generates.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::api::error::ApiError;
use crate::api::request::{ChatRequest, SamplingOverrides, ToolChoice};
use kandle_contract::engine::KvCacheMemory;
use kandle_contract::http::Compute;

use crate::engine::grammar::Grammars;
use crate::engine::tool_calls::{CallReading, ToolFormat};
use crate::engine::tool_grammar::{self, CallChoice};
use crate::engine::tool_prompt;
use crate::engine::{Engine, EngineConfig, EngineModel, Event, GenerateRequest, ReasoningMode, StartError};
use crate::metrics::Metrics;
use crate::model::{ChatTemplate, LoadedModel, ModelInfo, RenderOptions, SpecialTokens, TemplateOrigin};
use crate::runtime::{KvCache, ModelConfig};

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;

/// Thinking budgets that `reasoning_effort` maps to on models that think.
const LOW_EFFORT_BUDGET: usize = 512;
const MEDIUM_EFFORT_BUDGET: usize = 2048;

pub struct ModelService {
    pub info: ModelInfo,
    /// How the forward pass runs, as `/ready` reports it.
    pub compute: Compute,
    /// Matchers for `response_format` (none when llguidance cannot read the tokenizer).
    pub grammars: Option<Grammars>,
    pub engine: Engine,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub template: ChatTemplate,
    /// Where the template comes from, as `/ready` reports it.
    pub template_origin: TemplateOrigin,
    /// Text that ends a chat answer besides the request's stops: the default
    /// template's turn end, when the tokenizer has no such token (a base
    /// model writes it as text).
    pub template_stops: Vec<String>,
    pub special: SpecialTokens,
    /// Tokens per sequence: the model's context clipped by `--max-context`.
    pub max_context: usize,
    /// Tokens the whole KV cache holds: no sequence can be longer.
    pub kv_capacity: usize,
    /// Token ids the model reads (its embedding rows; the tokenizer may know more).
    pub vocab_rows: usize,
    pub defaults: SamplingOverrides,
    /// How long loading and starting took, phase by phase.
    pub startup: crate::startup::Phases,
}

/// A request ready for the engine, and the channel its events arrive on.
pub struct Prepared {
    pub prompt_tokens: usize,
    /// How the answer's tool calls are read, when tools were offered.
    pub calls: Option<CallReading>,
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Engine limits from the command line; `max_context` is clipped to the model's.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_waiting: usize,
    pub max_context: Option<usize>,
    pub kv_cache_memory: Option<KvCacheMemory>,
    pub prefix_cache: bool,
    /// A step running longer marks the engine stalled.
    pub step_timeout: std::time::Duration,
}

/// The memory a KV cache is sized from: the container's memory limit (CPU), or
/// the device memory free after loading the weights (GPU).
#[derive(Debug, Clone, Copy)]
pub struct KvMemory {
    pub limit: u64,
    /// The most of `limit` the cache takes when `--kv-cache-memory` is not set.
    pub default_share: f64,
}

/// Of the container's memory: activations, weights and the server need the rest.
const CPU_DEFAULT_SHARE: f64 = 0.25;
/// Of the free device memory after the weights: activations need the rest.
const GPU_DEFAULT_SHARE: f64 = 0.9;

/// How many KV blocks the memory budget buys: what `--kv-cache-memory` says
/// (bytes, or a fraction of the memory limit), else enough for
/// `max_batch_size` sequences of the whole context, at most the default share.
pub fn kv_blocks(
    config: &ModelConfig,
    limits: &EngineLimits,
    max_context: usize,
    memory: KvMemory,
) -> Result<usize, StartError> {
    let memory_limit = memory.limit;
    let per_block = KvCache::bytes_per_block(config, BLOCK_SIZE, candle_core::DType::F16) as u64;
    let budget = match limits.kv_cache_memory {
        Some(KvCacheMemory::Bytes(b)) => b,
        Some(KvCacheMemory::Fraction(f)) => (memory_limit as f64 * f) as u64,
        None => {
            let wanted = (limits.max_batch_size * max_context.div_ceil(BLOCK_SIZE)) as u64 * per_block;
            wanted.min((memory_limit as f64 * memory.default_share) as u64)
        }
    };
    let blocks = (budget / per_block.max(1)) as usize;
    if blocks == 0 {
        return Err(StartError::Memory(format!(
            "a KV cache of {budget} bytes holds no block ({per_block} bytes for {BLOCK_SIZE} tokens); raise --kv-cache-memory"
        )));
    }
    Ok(blocks)
}

impl ModelService {
    /// Starts the engine thread over a loaded model.
    pub fn start(
        loaded: LoadedModel,
        limits: EngineLimits,
        defaults: SamplingOverrides,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let model_context = usize::try_from(loaded.info.context_length).unwrap_or(usize::MAX);
        let max_context = limits.max_context.map_or(model_context, |m| m.min(model_context));
        // On a GPU the cache takes the device memory the weights left free.
        let memory = match crate::runtime::device::free_memory(loaded.model.device()) {
            Some(free) => KvMemory { limit: free, default_share: GPU_DEFAULT_SHARE },
            None => KvMemory { limit: crate::resources::memory_limit(), default_share: CPU_DEFAULT_SHARE },
        };
        let num_blocks = kv_blocks(loaded.model.config(), &limits, max_context, memory)?;
        let per_block = KvCache::bytes_per_block(loaded.model.config(), BLOCK_SIZE, candle_core::DType::F16);
        tracing::info!(
            blocks = num_blocks,
            block_size = BLOCK_SIZE,
            tokens = num_blocks * BLOCK_SIZE,
            mib = (num_blocks * per_block) >> 20,
            prefix_cache = limits.prefix_cache,
            "KV cache: {num_blocks} blocks x {BLOCK_SIZE} tokens (f16)"
        );
        let mut startup = loaded.phases;
        let tokenizer = Arc::new(loaded.tokenizer);
        let compute = Compute {
            kernels: loaded.model.kernels().to_string(),
            threads: loaded.model.threads(),
            device: crate::runtime::device::name(loaded.model.device()),
        };
        let end = loaded.special.stop_ids.first().copied();
        let grammars = match end.map(|end| Grammars::new(tokenizer.clone(), end)) {
            Some(Ok(grammars)) => Some(grammars),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "structured output unavailable: the tokenizer cannot be read as a grammar vocabulary");
                None
            }
            None => None,
        };
        startup.end("grammar");
        let vocab_rows = loaded.model.vocab_rows();
        let template_stops = match loaded.template_origin {
            TemplateOrigin::Default if tokenizer.token_to_id(crate::model::CHATML_END).is_none() => {
                vec![crate::model::CHATML_END.to_string()]
            }
            _ => Vec::new(),
        };
        let kv_window = loaded.model.config().kv_window();
        let engine = Engine::start(
            EngineModel { model: loaded.model, tokenizer: tokenizer.clone(), special: loaded.special.clone() },
            EngineConfig {
                max_batch_size: limits.max_batch_size,
                max_batch_tokens: limits.max_batch_tokens,
                max_waiting: limits.max_waiting,
                max_context,
                block_size: BLOCK_SIZE,
                num_blocks,
                prefix_cache: limits.prefix_cache,
                kv_window,
                step_timeout: limits.step_timeout,
            },
            metrics,
        )?;
        startup.end("kv_cache");
        Ok(Self {
            info: loaded.info,
            compute,
            grammars,
            engine,
            tokenizer,
            template: loaded.template,
            template_origin: loaded.template_origin,
            template_stops,
            special: loaded.special,
            max_context,
            kv_capacity: num_blocks * BLOCK_SIZE,
            vocab_rows,
            defaults,
            startup,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders the prompt, tokenizes it and checks it against the context window.
    /// CPU-bound: call it off the async workers.
    pub fn prepare(&self, req: &ChatRequest) -> Result<Prepared, ApiError> {
        let reasoning = self.reasoning_mode(req)?;
        let offered = match req.tool_choice {
            ToolChoice::None => None,
            _ => req.tools.as_deref(),
        };
        // Templates that render tools get them; for the others kandle describes
        // them in the system message and asks for bare JSON calls.
        let native = self.template.features().tools;
        let fallback;
        let (messages, tools, tool_format) = match offered {
            None => (req.messages.as_slice(), None, None),
            Some(tools) if native => (req.messages.as_slice(), Some(tools), Some(self.template.features().tool_format)),
            Some(tools) => {
                fallback = tool_prompt::with_tools(&req.messages, tools);
                (fallback.as_slice(), None, Some(ToolFormat::Generic))
            }
        };
        // Calls are constrained in the format the model was taught (kandle's
        // generic one without a template format): `required` and named choices
        // from the first token, `auto` from the call's opener on.
        let style = tool_format.unwrap_or(ToolFormat::Generic);
        let choice = match &req.tool_choice {
            ToolChoice::Required => Some(CallChoice::Required),
            ToolChoice::Named(name) => Some(CallChoice::Named(name)),
            ToolChoice::Auto if req.response_format.is_none() => Some(CallChoice::Auto),
            ToolChoice::Auto | ToolChoice::None => None,
        };
        if choice.is_some_and(|c| c != CallChoice::Auto) && req.response_format.is_some() {
            return Err(ApiError::invalid(
                "response_format",
                "response_format cannot be combined with tool_choice 'required' or a named function.",
            ));
        }
        let shown: Vec<(u32, String)> = match offered {
            Some(_) => style.markers().iter().filter_map(|m| Some((self.special_id(m)?, m.to_string()))).collect(),
            None => Vec::new(),
        };
        let call_grammar = match (offered, choice) {
            (Some(tools), Some(choice)) => {
                Some(tool_grammar::call_grammar(style, tools, choice, req.parallel_tool_calls, |marker| {
                    shown.iter().find(|(_, m)| m == marker).map(|(id, _)| *id)
                }))
            }
            _ => None,
        };
        let options = RenderOptions {
            tools,
            enable_thinking: self.template.features().thinking.then_some(matches!(reasoning, ReasoningMode::On { .. })),
            reasoning_effort: req.reasoning_effort.as_deref(),
            extra: Some(&req.template_kwargs),
        };
        let text = self
            .template
            .render(messages, &options)
            .map_err(|e| ApiError::invalid("messages", format!("The chat template rejected the messages: {e}")))?;
        let prompt = self.encode_prompt(&text, "messages")?;
        let max_tokens = self.completion_budget(prompt.len(), req.max_tokens, "messages")?;
        let constraint = match (call_grammar, &req.response_format, &self.grammars) {
            (None, None, _) => None,
            (Some(calls), _, Some(grammars)) => {
                let constraint = grammars
                    .constraint(&calls.format)
                    .map_err(|e| ApiError::invalid("tools", format!("The tools cannot be enforced: {e}")))?;
                Some(match calls.opener {
                    Some(opener) => constraint.after(opener),
                    None => constraint,
                })
            }
            // Without a grammar engine, `auto` calls are only parsed.
            (Some(_), _, None) if choice == Some(CallChoice::Auto) => None,
            (None, Some(format), Some(grammars)) => Some(grammars.constraint(format).map_err(|e| {
                ApiError::invalid("response_format", format!("The response_format cannot be enforced: {e}"))
            })?),
            (Some(_), _, None) | (None, Some(_), None) => {
                let param = if choice.is_some() { "tools" } else { "response_format" };
                return Err(ApiError::unsupported(
                    param,
                    "Constrained output is not available for this model's tokenizer.",
                ));
            }
        };
        let (tx, events) = mpsc::unbounded_channel();
        Ok(Prepared {
            prompt_tokens: prompt.len(),
            calls: tool_format.map(|format| CallReading { format, constrained: constraint.is_some() }),
            request: GenerateRequest {
                prompt,
                sampling: req.sampling.resolve(&self.defaults, req.logprobs),
                max_tokens,
                stop: req.stop.iter().chain(&self.template_stops).cloned().collect(),
                n: req.n,
                reasoning,
                constraint,
                shown,
                cache_salt: req.cache_salt.clone(),
                stopping: req.stopping.clone(),
                prompt_logprobs: None,
                events: tx,
            },
            events,
        })
    }

    /// The id of `text` when the tokenizer holds it as one special token.
    fn special_id(&self, text: &str) -> Option<u32> {
        let id = self.tokenizer.token_to_id(text)?;
        self.tokenizer.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special).then_some(id)
    }

    /// `text` as the model reads it: tokenized, BOS first where the model
    /// wants it, every id inside its embedding (`param` names the input in errors).
    pub fn encode_prompt(&self, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| ApiError::internal(format!("tokenization failed: {e}")))?;
        let mut prompt = encoding.get_ids().to_vec();
        if let (true, Some((bos, _))) = (self.special.add_bos, &self.special.bos) {
            if prompt.first() != Some(bos) {
                prompt.insert(0, *bos);
            }
        }
        self.check_readable(&prompt, param)?;
        Ok(prompt)
    }

    /// Every id is one the model can read (the tokenizer may know more).
    pub fn check_readable(&self, ids: &[u32], param: &str) -> Result<(), ApiError> {
        match ids.iter().find(|t| **t as usize >= self.vocab_rows) {
            Some(bad) => Err(ApiError::invalid(
                param,
                format!(
                    "The {param} hold token {bad}, which the tokenizer knows but the model cannot read (its embedding has {} rows).",
                    self.vocab_rows
                ),
            )),
            None => Ok(()),
        }
    }

    /// The completion tokens a prompt of `prompt` tokens may have: `requested`
    /// if it fits the context, else a 400 naming the limit the prompt (`param`)
    /// or the request passes first.
    pub fn completion_budget(&self, prompt: usize, requested: Option<usize>, param: &str) -> Result<usize, ApiError> {
        let ctx = self.max_context;
        // The context first: the smaller limit a prompt passes is the one to name.
        if prompt >= ctx {
            return Err(ApiError::context_length(
                param,
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your {param} resulted in {prompt} tokens. Please reduce the length of the {param}."
                ),
            ));
        }
        if prompt >= self.kv_capacity {
            return Err(ApiError::context_length(
                param,
                format!(
                    "This server's KV cache holds {} tokens. However, your {param} resulted in {prompt} tokens. Please reduce the length of the {param}.",
                    self.kv_capacity
                ),
            ));
        }
        match requested {
            None => Ok(ctx - prompt),
            Some(m) if prompt + m <= ctx => Ok(m),
            Some(m) => Err(ApiError::context_length(
                "max_tokens",
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the {param}, {m} in the completion). Please reduce the length of the {param} or completion.",
                    prompt + m
                ),
            )),
        }
    }

    fn reasoning_mode(&self, req: &ChatRequest) -> Result<ReasoningMode, ApiError> {
        let effort = req.reasoning_effort.as_deref();
        let effort_off = matches!(effort, Some("none" | "minimal"));
        if !self.template.features().thinking {
            let not_a_thinker = |param: &str| {
                ApiError::unsupported(
                    param,
                    format!("'{param}' is not supported with this model: it has no thinking mode."),
                )
            };
            if req.enable_thinking == Some(true) {
                return Err(not_a_thinker("enable_thinking"));
            }
            if req.thinking_budget.is_some() {
                return Err(not_a_thinker("thinking_budget"));
            }
            if effort.is_some() && !effort_off {
                return Err(not_a_thinker("reasoning_effort"));
            }
            return Ok(ReasoningMode::Off);
        }
        let enabled = req.enable_thinking.unwrap_or(!effort_off);
        if !enabled {
            if req.thinking_budget.is_some() {
                return Err(ApiError::invalid("thinking_budget", "'thinking_budget' needs thinking enabled."));
            }
            return Ok(ReasoningMode::Off);
        }
        let budget = req.thinking_budget.or(match effort {
            Some("low") => Some(LOW_EFFORT_BUDGET),
            Some("medium") => Some(MEDIUM_EFFORT_BUDGET),
            _ => None,
        });
        Ok(ReasoningMode::On { budget })
    }
}
