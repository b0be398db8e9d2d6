//! `POST …/completions`: the legacy text-completion API. Each prompt goes to
//! the engine as it is (no chat template), through the same sampler, stop
//! matcher and scheduler as chat; the answers of several prompts come back as
//! one list of choices, prompt `p`'s choice `j` at index `p * n + j`.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::Stream;
use serde::Serialize;
use serde_json::{Map, Value as JsonValue};
use tokio::sync::mpsc;

use super::access_log::TokenTally;
use super::completion_request::{self, CompletionRequest, Prompt};
use super::error::ApiError;
use super::response::Usage;
use super::sse;
use super::state::AppState;
use crate::engine::{Event, FinishReason, GenerateRequest, ReasoningMode, TokenLogprob};
use crate::service::ModelService;

/// Fill-in-the-middle markers: Qwen's, then StarCoder's (prefix, suffix, middle).
const FIM_MARKERS: [[&str; 3]; 2] =
    [["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]];

pub async fn handle(
    State(state): State<AppState>,
    Extension(tally): Extension<TokenTally>,
    body: Body,
) -> Result<Response, ApiError> {
    let (bytes, service) = super::body_and_model(&state, body).await?;
    let req = completion_request::parse(&bytes, service.vocab_size())?;
    if !state.settings().serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    let prompts = {
        let (service, req) = (service.clone(), req.clone());
        tokio::task::spawn_blocking(move || prepare(&service, &req))
            .await
            .map_err(|e| ApiError::internal(format!("prompt preparation failed: {e}")))??
    };
    let prompt_tokens: usize = prompts.iter().map(|p| p.tokens).sum();
    let (merged, events) = mpsc::unbounded_channel();
    let mut echoes = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.into_iter().enumerate() {
        let echo = if req.echo { prompt.echo } else { String::new() };
        echoes.push(Echo { text: echo, first: prompt.first });
        let Some((request, mut own)) = prompt.request else {
            // `max_tokens: 0`: nothing to generate.
            for j in 0..req.n {
                let usage = Default::default();
                let _ = merged.send(Event::Finished { index: p * req.n + j, reason: FinishReason::Length, usage });
            }
            continue;
        };
        service.engine.submit(request)?;
        // Each prompt's events, renumbered into the response's choices; the
        // forwarder ends with them, or when the client has gone.
        let (merged, offset) = (merged.clone(), p * req.n);
        tokio::spawn(async move {
            while let Some(event) = own.recv().await {
                if merged.send(renumber(event, offset)).is_err() {
                    break;
                }
            }
        });
    }
    drop(merged);
    state.metrics().prompt_tokens.inc_by(prompt_tokens as u64);
    tally.prompt(prompt_tokens);
    let meta = Meta {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        model: req.model.clone(),
        fingerprint: super::system_fingerprint(),
        prompt_tokens,
        include_usage: req.include_usage,
        logprobs: req.logprobs.is_some(),
        n: req.n,
        prompt_logprobs: req.echo && req.logprobs.is_some(),
    };
    let mut response = if req.stream {
        stream(state, meta, echoes, events, tally).into_response()
    } else {
        let completion = collect(&state, meta, echoes, events).await?;
        tally.completion(completion.usage.flatten().map_or(0, |u| u.completion_tokens));
        Json(completion).into_response()
    };
    response.headers_mut().insert(kandle_contract::http::PROMPT_TOKENS_HEADER, prompt_tokens.into());
    Ok(response)
}

/// One prompt ready for the engine: its token count, the text `echo` shows,
/// and the request (none when `max_tokens` is 0 and nothing is scored) with
/// its events.
struct PreparedPrompt {
    tokens: usize,
    echo: String,
    /// The text of its first token when `echo` lists it without a
    /// log-probability (none when the server put BOS first: the engine scores
    /// every echoed token then).
    first: Option<String>,
    request: Option<(GenerateRequest, mpsc::UnboundedReceiver<Event>)>,
}

/// Tokenizes each prompt (token ids are taken as they are), wraps it in the
/// model's fill-in-the-middle markers when there is a suffix, and checks it
/// against the context. CPU-bound: called off the async workers.
fn prepare(service: &ModelService, req: &CompletionRequest) -> Result<Vec<PreparedPrompt>, ApiError> {
    let fim = match &req.suffix {
        None => None,
        Some(suffix) => Some((fim_markers(service)?, suffix)),
    };
    let mut prepared = Vec::with_capacity(req.prompts.len());
    for prompt in &req.prompts {
        let (ids, echo, listed_from) = match (prompt, &fim) {
            (Prompt::Text(text), None) => {
                let ids = service.encode_prompt(text, "prompt")?;
                let bos_added = service.special.bos.as_ref().is_some_and(|(bos, _)| ids.first() == Some(bos))
                    && service.special.add_bos
                    && !text.starts_with(service.special.bos.as_ref().map_or("", |(_, t)| t.as_str()));
                (ids, text.clone(), usize::from(bos_added))
            }
            (Prompt::Text(text), Some(([pre, suf, mid], suffix))) => {
                (service.encode_prompt(&format!("{pre}{text}{suf}{suffix}{mid}"), "prompt")?, text.clone(), 0)
            }
            (Prompt::Tokens(_), Some(_)) => {
                return Err(ApiError::invalid("suffix", "A 'suffix' needs text prompts, not token ids."));
            }
            (Prompt::Tokens(ids), None) => {
                service.check_readable(ids, "prompt")?;
                let echo = service
                    .tokenizer
                    .decode(ids, false)
                    .map_err(|e| ApiError::internal(format!("cannot decode the prompt: {e}")))?;
                (ids.clone(), echo, 0)
            }
        };
        let first = (listed_from == 0)
            .then(|| ids.first().map(|&id| crate::model::tokenizer::token_text(&service.tokenizer, id)))
            .flatten();
        let scored = req.echo && req.logprobs.is_some();
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "The prompt is empty: it holds no tokens."));
        }
        let max_tokens = service.completion_budget(ids.len(), Some(req.max_tokens), "prompt")?;
        let tokens = ids.len();
        let request = (max_tokens > 0 || scored).then(|| {
            let (events, rx) = mpsc::unbounded_channel();
            let request = GenerateRequest {
                prompt: ids,
                sampling: req.sampling.resolve(&service.defaults, req.logprobs),
                max_tokens,
                stop: req.stop.clone(),
                n: req.n,
                reasoning: ReasoningMode::Off,
                constraint: None,
                shown: Vec::new(),
                cache_salt: req.cache_salt.clone(),
                stopping: req.stopping.clone(),
                prompt_logprobs: req.logprobs.filter(|_| scored),
                events,
            };
            (request, rx)
        });
        prepared.push(PreparedPrompt { tokens, echo, first, request });
    }
    Ok(prepared)
}

/// The model's fill-in-the-middle markers, when its tokenizer holds them as
/// special tokens; else `suffix` cannot be honoured.
fn fim_markers(service: &ModelService) -> Result<[&'static str; 3], ApiError> {
    let special = service.tokenizer.get_added_tokens_decoder();
    let holds = |marker: &str| {
        service.tokenizer.token_to_id(marker).is_some_and(|id| special.get(&id).is_some_and(|t| t.special))
    };
    FIM_MARKERS.into_iter().find(|markers| markers.iter().all(|m| holds(m))).ok_or_else(|| {
        ApiError::unsupported(
            "suffix",
            "This model has no fill-in-the-middle tokens (<|fim_prefix|>/<|fim_suffix|>/<|fim_middle|> or \
             <fim_prefix>/<fim_suffix>/<fim_middle>): 'suffix' cannot be used.",
        )
    })
}

fn renumber(event: Event, offset: usize) -> Event {
    match event {
        Event::Delta(mut d) => {
            d.index += offset;
            Event::Delta(d)
        }
        Event::Finished { index, reason, usage } => Event::Finished { index: index + offset, reason, usage },
        failed @ Event::Failed { .. } => failed,
    }
}

/// What every body or chunk of one response repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    prompt_tokens: usize,
    include_usage: bool,
    logprobs: bool,
    /// Choices per prompt: choice `c` answers prompt `c / n`.
    n: usize,
    /// `echo` with `logprobs`: each choice's log-probabilities start with its prompt's.
    prompt_logprobs: bool,
}

impl Meta {
    /// Whether choice `c` is its prompt's first (whose usage says what the prefix cache served).
    fn first_of_prompt(&self, c: usize) -> bool {
        c.is_multiple_of(self.n)
    }
}

/// What `echo` puts before a prompt's choices: its text, and the text of its
/// first token when that is listed without a log-probability.
struct Echo {
    text: String,
    first: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<TextChoice>,
    /// Absent from a stream's chunks unless `stream_options.include_usage`, then
    /// null until the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// Legacy log-probabilities: per token its text, log-probability, the most
/// likely alternatives (the sampled token among them) and where its text
/// starts in the choice's text (in characters).
#[derive(Debug, Default, Serialize)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Map<String, JsonValue>>>,
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// A prompt's log-probabilities: its first token without one (when
    /// listed), then `scores`; offsets from the start of the echoed text.
    fn of_prompt(first: Option<&str>, scores: &[TokenLogprob]) -> Self {
        let mut out = Self::default();
        let mut offset = 0;
        if let Some(first) = first {
            out.tokens.push(first.to_string());
            out.token_logprobs.push(None);
            out.top_logprobs.push(None);
            out.text_offset.push(0);
            offset = first.chars().count();
        }
        out.extend(scores, offset);
        out
    }

    /// Appends another list's entries as they are.
    fn extend_from(&mut self, other: Self) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }

    /// Appends `entries`, the first starting at character `offset`; returns
    /// the offset after them.
    fn extend(&mut self, entries: &[TokenLogprob], mut offset: usize) -> usize {
        for t in entries {
            self.tokens.push(t.token.clone());
            self.token_logprobs.push(Some(t.logprob));
            let mut top: Map<String, JsonValue> =
                t.top.iter().map(|(token, logprob)| (token.clone(), JsonValue::from(*logprob))).collect();
            top.entry(t.token.clone()).or_insert_with(|| JsonValue::from(t.logprob));
            self.top_logprobs.push(Some(top));
            self.text_offset.push(offset);
            offset += t.token.chars().count();
        }
        offset
    }
}

#[derive(Default)]
struct ChoiceState {
    text: String,
    logprobs: TextLogprobs,
    /// Characters of the text so far (where the next token's text starts).
    offset: usize,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    cached_tokens: usize,
}

async fn collect(
    state: &AppState,
    meta: Meta,
    echoes: Vec<Echo>,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Result<TextCompletion, ApiError> {
    let mut choices: Vec<ChoiceState> = echoes
        .iter()
        .flat_map(|echo| std::iter::repeat_n(echo, meta.n))
        .map(|echo| ChoiceState { offset: echo.text.chars().count(), text: echo.text.clone(), ..Default::default() })
        .collect();
    let mut open = choices.len();
    while open > 0 {
        match events.recv().await {
            Some(Event::Delta(d)) => {
                if let Some(scores) = d.prompt_logprobs.as_ref().filter(|_| meta.first_of_prompt(d.index)) {
                    // The prompt's scores open every choice of that prompt.
                    let first = echoes.get(d.index / meta.n).and_then(|e| e.first.as_deref());
                    for c in choices.iter_mut().skip(d.index).take(meta.n) {
                        let mut logprobs = TextLogprobs::of_prompt(first, scores);
                        logprobs.extend_from(std::mem::take(&mut c.logprobs));
                        c.logprobs = logprobs;
                    }
                }
                let Some(c) = choices.get_mut(d.index) else { continue };
                c.text.push_str(&d.content);
                c.offset = c.logprobs.extend(&d.logprobs, c.offset);
            }
            Some(Event::Finished { index, reason, usage }) => {
                let Some(c) = choices.get_mut(index) else { continue };
                c.finish = Some(reason);
                c.completion_tokens = usage.completion_tokens;
                c.cached_tokens = usage.cached_tokens;
                open -= 1;
            }
            Some(Event::Failed { message }) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("the inference engine stopped")),
        }
    }
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let cached_tokens =
        choices.iter().enumerate().filter(|(i, _)| meta.first_of_prompt(*i)).map(|(_, c)| c.cached_tokens).sum();
    state.metrics().completion_tokens.inc_by(completion_tokens as u64);
    Ok(TextCompletion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint,
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| TextChoice {
                text: c.text,
                index,
                logprobs: meta.logprobs.then_some(c.logprobs),
                finish_reason: Some(c.finish.unwrap_or(FinishReason::Stop).as_str()),
            })
            .collect(),
        usage: Some(Some(Usage::new(meta.prompt_tokens, completion_tokens, 0, cached_tokens))),
    })
}

/// State of a response stream between SSE events.
struct StreamState {
    state: AppState,
    meta: Meta,
    events: mpsc::UnboundedReceiver<Event>,
    out: sse::Outbox,
    /// Per prompt: what `echo` shows.
    echoes: Vec<Echo>,
    /// Per choice: characters streamed so far (where the next token starts).
    offsets: Vec<usize>,
    open: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    tally: TokenTally,
}

fn stream(
    state: AppState,
    meta: Meta,
    echoes: Vec<Echo>,
    events: mpsc::UnboundedReceiver<Event>,
    tally: TokenTally,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let n = meta.n;
    let mut s = StreamState {
        state,
        meta,
        events,
        out: sse::Outbox::default(),
        echoes: Vec::new(),
        offsets: echoes.iter().flat_map(|e| std::iter::repeat_n(e.text.chars().count(), n)).collect(),
        open: echoes.len() * n,
        completion_tokens: 0,
        cached_tokens: 0,
        tally,
    };
    // `echo`: each choice's text starts with its prompt (with its scores,
    // when asked for, once the engine has them).
    if !s.meta.prompt_logprobs {
        for (p, echo) in echoes.iter().enumerate().filter(|(_, e)| !e.text.is_empty()) {
            for index in p * s.meta.n..(p + 1) * s.meta.n {
                let logprobs = s.meta.logprobs.then(TextLogprobs::default);
                let text = echo.text.clone();
                let chunk = s.chunk(vec![TextChoice { text, index, logprobs, finish_reason: None }], None);
                s.out.push(chunk);
            }
        }
    }
    s.echoes = echoes;
    sse::stream(s)
}

impl sse::Answer for StreamState {
    fn outbox(&mut self) -> &mut sse::Outbox {
        &mut self.out
    }

    /// Waits for the engine's next event and queues the SSE events it becomes.
    async fn advance(&mut self) {
        match self.events.recv().await {
            Some(Event::Delta(d)) => {
                if let Some(scores) = d.prompt_logprobs.as_ref().filter(|_| self.meta.first_of_prompt(d.index)) {
                    let echo = self.echoes.get(d.index / self.meta.n);
                    let (text, first) = echo.map_or((String::new(), None), |e| (e.text.clone(), e.first.as_deref()));
                    for index in d.index..d.index + self.meta.n {
                        let logprobs = Some(TextLogprobs::of_prompt(first, scores));
                        let choice = TextChoice { text: text.clone(), index, logprobs, finish_reason: None };
                        let event = self.chunk(vec![choice], None);
                        self.out.push(event);
                    }
                }
                let logprobs = self.meta.logprobs.then(|| {
                    let mut logprobs = TextLogprobs::default();
                    if let Some(offset) = self.offsets.get_mut(d.index) {
                        *offset = logprobs.extend(&d.logprobs, *offset);
                    }
                    logprobs
                });
                if d.content.is_empty() && logprobs.as_ref().is_none_or(|l| l.tokens.is_empty()) {
                    return;
                }
                let choice = TextChoice { text: d.content, index: d.index, logprobs, finish_reason: None };
                let event = self.chunk(vec![choice], None);
                self.out.push(event);
            }
            Some(Event::Finished { index, reason, usage }) => {
                self.completion_tokens += usage.completion_tokens;
                self.tally.completion(self.completion_tokens);
                if self.meta.first_of_prompt(index) {
                    self.cached_tokens += usage.cached_tokens;
                }
                let last =
                    TextChoice { text: String::new(), index, logprobs: None, finish_reason: Some(reason.as_str()) };
                let event = self.chunk(vec![last], None);
                self.out.push(event);
                self.open -= 1;
                if self.open == 0 {
                    self.state.metrics().completion_tokens.inc_by(self.completion_tokens as u64);
                    if self.meta.include_usage {
                        let usage = Usage::new(self.meta.prompt_tokens, self.completion_tokens, 0, self.cached_tokens);
                        let event = self.chunk(Vec::new(), Some(usage));
                        self.out.push(event);
                    }
                    self.out.finish();
                }
            }
            Some(Event::Failed { message }) => self.out.fail(&ApiError::internal(message)),
            None => self.out.fail(&ApiError::internal("the inference engine stopped")),
        }
    }
}

impl StreamState {
    fn chunk(&self, choices: Vec<TextChoice>, usage: Option<Usage>) -> SseEvent {
        let chunk = TextCompletion {
            id: self.meta.id.clone(),
            object: "text_completion",
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.fingerprint.clone(),
            choices,
            usage: self.meta.include_usage.then_some(usage),
        };
        sse::json_event(&chunk)
    }
}
