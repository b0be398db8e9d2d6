//! `POST …/chat/completions`: validate, prepare, submit, then answer in one body or
//! as a server-sent event stream.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::Stream;
use tokio::sync::mpsc;

use super::access_log::TokenTally;
use super::error::ApiError;
use super::request::{self, ChatRequest};
use super::response::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs, ChunkChoice, ChunkDelta, Envelope,
    LogprobEntry, ToolCallOut, Usage,
};
use super::sse;
use super::state::AppState;
use crate::engine::tool_calls::{CallReading, Piece, ToolCall, ToolCallParser};
use crate::engine::{Event, FinishReason};

/// How a chat path wraps its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI's shape (`/v1`, `/compatible-mode/v1`).
    OpenAi,
    /// `{success, code, message, data}` around non-streaming answers (`/api/v1`).
    Envelope,
}

pub async fn openai(State(state): State<AppState>, Extension(tally): Extension<TokenTally>, body: Body) -> Response {
    respond(state, tally, body, Flavor::OpenAi).await
}

pub async fn envelope(State(state): State<AppState>, Extension(tally): Extension<TokenTally>, body: Body) -> Response {
    respond(state, tally, body, Flavor::Envelope).await
}

async fn respond(state: AppState, tally: TokenTally, body: Body, flavor: Flavor) -> Response {
    match run(state, tally, body, flavor).await {
        Ok(response) => response,
        Err(e) if flavor == Flavor::Envelope => e.decorate(
            Json(Envelope::<()> {
                success: false,
                code: e.code.unwrap_or("error").to_string(),
                message: e.message.clone(),
                data: None,
            })
            .into_response(),
        ),
        Err(e) => e.into_response(),
    }
}

async fn run(state: AppState, tally: TokenTally, body: Body, flavor: Flavor) -> Result<Response, ApiError> {
    let (bytes, service) = super::body_and_model(&state, body).await?;
    let req = request::parse(&bytes, service.vocab_size())?;
    if !state.settings().serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    let prepared = {
        let (service, req) = (service.clone(), req.clone());
        tokio::task::spawn_blocking(move || service.prepare(&req))
            .await
            .map_err(|e| ApiError::internal(format!("prompt preparation failed: {e}")))??
    };
    let meta = ResponseMeta::new(&req, prepared.prompt_tokens, prepared.calls);
    service.engine.submit(prepared.request)?;
    state.metrics().prompt_tokens.inc_by(prepared.prompt_tokens as u64);
    tally.prompt(prepared.prompt_tokens);
    let mut response = if req.stream {
        stream(state, meta, prepared.events, tally).into_response()
    } else {
        let completion = collect(&state, meta, prepared.events).await?;
        tally.completion(completion.usage.completion_tokens);
        match flavor {
            Flavor::OpenAi => Json(completion).into_response(),
            Flavor::Envelope => Json(Envelope {
                success: true,
                code: "200".into(),
                message: "successful".into(),
                data: Some(completion),
            })
            .into_response(),
        }
    };
    response.headers_mut().insert(kandle_contract::http::PROMPT_TOKENS_HEADER, prepared.prompt_tokens.into());
    Ok(response)
}

/// What every chunk or body of one response repeats.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    logprobs: bool,
    /// How tool calls are read from the answer, when tools were offered.
    calls: Option<CallReading>,
}

impl ResponseMeta {
    fn new(req: &ChatRequest, prompt_tokens: usize, calls: Option<CallReading>) -> Self {
        Self {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: super::unix_now(),
            model: req.model.clone(),
            fingerprint: super::system_fingerprint(),
            n: req.n,
            prompt_tokens,
            include_usage: req.include_usage,
            logprobs: req.logprobs.is_some(),
            calls,
        }
    }
}

/// `tool_calls` when a finished answer made calls.
fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called => "tool_calls",
        other => other.as_str(),
    }
}

#[derive(Default)]
struct ChoiceState {
    content: String,
    reasoning: String,
    logprobs: Vec<LogprobEntry>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    reasoning_tokens: usize,
}

async fn collect(
    state: &AppState,
    meta: ResponseMeta,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Result<ChatCompletion, ApiError> {
    let mut choices: Vec<ChoiceState> = (0..meta.n).map(|_| ChoiceState::default()).collect();
    let mut open = meta.n;
    let mut cached_tokens = 0;
    while open > 0 {
        match events.recv().await {
            Some(Event::Delta(d)) => {
                let c = &mut choices[d.index];
                c.content.push_str(&d.content);
                c.reasoning.push_str(&d.reasoning);
                c.logprobs.extend(d.logprobs.iter().map(LogprobEntry::from));
            }
            Some(Event::Finished { index, reason, usage }) => {
                let c = &mut choices[index];
                c.finish = Some(reason);
                c.completion_tokens = usage.completion_tokens;
                c.reasoning_tokens = usage.reasoning_tokens;
                // The first choice's prompt is the one the prefix cache served.
                if index == 0 {
                    cached_tokens = usage.cached_tokens;
                }
                open -= 1;
            }
            Some(Event::Failed { message }) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("the inference engine stopped")),
        }
    }
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let reasoning_tokens = choices.iter().map(|c| c.reasoning_tokens).sum();
    state.metrics().completion_tokens.inc_by(completion_tokens as u64);
    Ok(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint,
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let (content, calls) = match meta.calls {
                    Some(reading) => reading.split(&c.content),
                    None => (c.content, Vec::new()),
                };
                let called = !calls.is_empty();
                Choice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: (!called || !content.trim().is_empty()).then_some(content),
                        reasoning_content: (!c.reasoning.is_empty()).then_some(c.reasoning),
                        tool_calls: called
                            .then(|| calls.into_iter().map(|call| ToolCallOut::new(call, None)).collect()),
                    },
                    finish_reason: finish_reason(c.finish.unwrap_or(FinishReason::Stop), called),
                    logprobs: meta.logprobs.then_some(ChoiceLogprobs { content: c.logprobs }),
                }
            })
            .collect(),
        usage: Usage::new(meta.prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens),
    })
}

/// State of a response stream between SSE events.
struct StreamState {
    state: AppState,
    meta: ResponseMeta,
    events: mpsc::UnboundedReceiver<Event>,
    out: sse::Outbox,
    open: usize,
    completion_tokens: usize,
    reasoning_tokens: usize,
    cached_tokens: usize,
    /// Per choice: its tool-call parser (when tools were offered), and how
    /// many calls it has streamed.
    parsers: Vec<Option<ToolCallParser>>,
    calls: Vec<usize>,
    /// The access log's token counts.
    tally: TokenTally,
}

fn stream(
    state: AppState,
    meta: ResponseMeta,
    events: mpsc::UnboundedReceiver<Event>,
    tally: TokenTally,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let open = meta.n;
    let reading = meta.calls;
    let mut s = StreamState {
        state,
        meta,
        events,
        out: sse::Outbox::default(),
        open,
        completion_tokens: 0,
        reasoning_tokens: 0,
        cached_tokens: 0,
        parsers: (0..open).map(|_| reading.map(CallReading::parser)).collect(),
        calls: vec![0; open],
        tally,
    };
    for index in 0..s.meta.n {
        let delta = ChunkDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
        let chunk = s.chunk(vec![ChunkChoice { index, delta, logprobs: None, finish_reason: None }], None);
        s.out.push(chunk);
    }
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
                let mut deltas = Vec::new();
                if !d.reasoning.is_empty() {
                    deltas.push(ChunkDelta { reasoning_content: Some(d.reasoning), ..Default::default() });
                }
                match self.parsers.get_mut(d.index).and_then(Option::as_mut) {
                    Some(parser) => {
                        let pieces = parser.push(&d.content);
                        deltas.extend(self.pieces(d.index, pieces));
                    }
                    None if !d.content.is_empty() => {
                        deltas.push(ChunkDelta { content: Some(d.content), ..Default::default() })
                    }
                    None => {}
                }
                let mut logprobs = self
                    .meta
                    .logprobs
                    .then(|| ChoiceLogprobs { content: d.logprobs.iter().map(LogprobEntry::from).collect() });
                if deltas.is_empty() && logprobs.is_some() {
                    deltas.push(ChunkDelta::default());
                }
                for delta in deltas {
                    let logprobs = logprobs.take();
                    let event =
                        self.chunk(vec![ChunkChoice { index: d.index, delta, logprobs, finish_reason: None }], None);
                    self.out.push(event);
                }
            }
            Some(Event::Finished { index, reason, usage }) => {
                if let Some(parser) = self.parsers.get_mut(index).and_then(Option::take) {
                    let pieces = parser.finish();
                    for delta in self.pieces(index, pieces) {
                        let event =
                            self.chunk(vec![ChunkChoice { index, delta, logprobs: None, finish_reason: None }], None);
                        self.out.push(event);
                    }
                }
                let called = self.calls.get(index).is_some_and(|n| *n > 0);
                self.completion_tokens += usage.completion_tokens;
                self.tally.completion(self.completion_tokens);
                self.reasoning_tokens += usage.reasoning_tokens;
                if index == 0 {
                    self.cached_tokens = usage.cached_tokens;
                }
                let last = ChunkChoice {
                    index,
                    delta: ChunkDelta::default(),
                    logprobs: None,
                    finish_reason: Some(finish_reason(reason, called)),
                };
                let event = self.chunk(vec![last], None);
                self.out.push(event);
                self.open -= 1;
                if self.open == 0 {
                    self.state.metrics().completion_tokens.inc_by(self.completion_tokens as u64);
                    if self.meta.include_usage {
                        let usage = Usage::new(
                            self.meta.prompt_tokens,
                            self.completion_tokens,
                            self.reasoning_tokens,
                            self.cached_tokens,
                        );
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
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> SseEvent {
        let chunk = ChatCompletionChunk {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            system_fingerprint: &self.meta.fingerprint,
            choices,
            usage: self.meta.include_usage.then_some(usage),
        };
        sse::json_event(&chunk)
    }

    /// Parsed pieces of a choice's content as deltas: text; a call's index,
    /// id and name (with its whole arguments, or none yet); argument fragments.
    fn pieces(&mut self, index: usize, pieces: Vec<Piece>) -> Vec<ChunkDelta> {
        let calls = |call| ChunkDelta { tool_calls: Some(vec![call]), ..Default::default() };
        pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Content(text) => ChunkDelta { content: Some(text), ..Default::default() },
                Piece::Call(call) => {
                    self.calls[index] += 1;
                    calls(ToolCallOut::new(call, Some(self.calls[index] - 1)))
                }
                Piece::CallStart { name } => {
                    self.calls[index] += 1;
                    let call = ToolCall { name, arguments: String::new() };
                    calls(ToolCallOut::new(call, Some(self.calls[index] - 1)))
                }
                Piece::Arguments(text) => calls(ToolCallOut::fragment(self.calls[index].saturating_sub(1), text)),
            })
            .collect()
    }
}
