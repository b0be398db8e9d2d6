//! `POST …/responses`: the Responses API on the chat path. The request runs
//! as the chat request it asks for (one engine path: sampler, grammar, stop
//! matcher, tool-call reading); the answer is built as `output` items
//! (reasoning, the message, function calls) by one [`Builder`] that both the
//! whole response and the typed event stream come from.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::access_log::TokenTally;
use super::error::ApiError;
use super::response::LogprobEntry;
use super::responses_request::{self, Echoed, ResponsesRequest};
use super::sse;
use super::state::AppState;
use crate::engine::tool_calls::{CallReading, Piece, ToolCallParser};
use crate::engine::{Event, FinishReason};

pub async fn handle(
    State(state): State<AppState>,
    Extension(tally): Extension<TokenTally>,
    body: Body,
) -> Result<Response, ApiError> {
    let (bytes, service) = super::body_and_model(&state, body).await?;
    let req = responses_request::parse(&bytes, service.vocab_size())?;
    if !state.settings().serves(&req.chat.model) {
        return Err(ApiError::model_not_found(&req.chat.model));
    }
    let prepared = {
        let (service, chat) = (service.clone(), req.chat.clone());
        tokio::task::spawn_blocking(move || service.prepare(&chat))
            .await
            .map_err(|e| ApiError::internal(format!("prompt preparation failed: {e}")))?
            .map_err(responses_request::renamed)?
    };
    let prompt_tokens = prepared.prompt_tokens;
    service.engine.submit(prepared.request)?;
    state.metrics().prompt_tokens.inc_by(prompt_tokens as u64);
    tally.prompt(prompt_tokens);
    let builder = Builder::new(&req, prompt_tokens, prepared.calls);
    let mut response = if req.chat.stream {
        stream(state, builder, prepared.events, tally).into_response()
    } else {
        let response = collect(&state, builder, prepared.events).await?;
        tally.completion(response["usage"]["output_tokens"].as_u64().unwrap_or(0) as usize);
        Json(response).into_response()
    };
    response.headers_mut().insert(kandle_contract::http::PROMPT_TOKENS_HEADER, prompt_tokens.into());
    Ok(response)
}

async fn collect(
    state: &AppState,
    mut builder: Builder,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    loop {
        match events.recv().await {
            Some(Event::Delta(d)) => builder.delta(&d.reasoning, &d.content, &d.logprobs),
            Some(Event::Finished { reason, usage, .. }) => {
                builder.finish(reason, usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens);
                state.metrics().completion_tokens.inc_by(usage.completion_tokens as u64);
                return Ok(builder.response());
            }
            Some(Event::Failed { message }) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("the inference engine stopped")),
        }
    }
}

struct StreamState {
    state: AppState,
    builder: Builder,
    events: mpsc::UnboundedReceiver<Event>,
    out: sse::Outbox,
    tally: TokenTally,
}

fn stream(
    state: AppState,
    mut builder: Builder,
    events: mpsc::UnboundedReceiver<Event>,
    tally: TokenTally,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut out = sse::Outbox::default();
    builder.start();
    for event in builder.take_events() {
        out.push(typed(event));
    }
    sse::stream(StreamState { state, builder, events, out, tally })
}

/// An event of the Responses stream: its type on the `event:` line too.
fn typed(event: Value) -> SseEvent {
    let kind = event["type"].as_str().unwrap_or("error").to_string();
    sse::json_event(&event).event(kind)
}

impl sse::Answer for StreamState {
    fn outbox(&mut self) -> &mut sse::Outbox {
        &mut self.out
    }

    /// Waits for the engine's next event and queues the typed events it becomes.
    async fn advance(&mut self) {
        match self.events.recv().await {
            Some(Event::Delta(d)) => self.builder.delta(&d.reasoning, &d.content, &d.logprobs),
            Some(Event::Finished { reason, usage, .. }) => {
                self.builder.finish(reason, usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens);
                self.state.metrics().completion_tokens.inc_by(usage.completion_tokens as u64);
                self.tally.completion(usage.completion_tokens);
            }
            Some(Event::Failed { message }) => self.builder.fail(&message),
            None => self.builder.fail("the inference engine stopped"),
        }
        let done = self.builder.ended;
        for event in self.builder.take_events() {
            self.out.push(typed(event));
        }
        if done {
            self.out.close();
        }
    }
}

/// An `output` item as it is built.
enum Item {
    Reasoning { id: String, text: String },
    Message { id: String, text: String, logprobs: Vec<Value> },
    Call { id: String, call_id: String, name: String, arguments: String },
}

impl Item {
    fn json(&self, status: &str, summary: bool) -> Value {
        match self {
            Self::Reasoning { id, text } if summary => json!({"id": id, "type": "reasoning", "status": status,
                "summary": [{"type": "summary_text", "text": text}]}),
            Self::Reasoning { id, text } => json!({"id": id, "type": "reasoning", "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}),
            Self::Message { id, text, logprobs } => json!({"id": id, "type": "message", "status": status,
                "role": "assistant", "content": [output_text(text, logprobs)]}),
            Self::Call { id, call_id, name, arguments } => json!({"id": id, "type": "function_call",
                "status": status, "call_id": call_id, "name": name, "arguments": arguments}),
        }
    }
}

fn output_text(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Builds the answer's `output` items from the engine's deltas and records
/// the typed stream events that build them (the whole response ignores those).
struct Builder {
    id: String,
    created_at: u64,
    model: String,
    echo: Echoed,
    temperature: Value,
    top_p: Value,
    parallel_tool_calls: bool,
    prompt_tokens: usize,
    parser: Option<ToolCallParser>,
    items: Vec<Item>,
    /// Each item's status: `in_progress` until it closes.
    statuses: Vec<&'static str>,
    /// The last item is open (deltas go to it until another kind comes).
    open: bool,
    /// Logprobs are reported (`include` asked for them).
    logprobs: bool,
    /// Log-probabilities of text the tool-call parser still holds back: they
    /// go with that text when it comes out as content (calls carry none).
    held_logprobs: Vec<Value>,
    events: Vec<Value>,
    sequence: u64,
    status: &'static str,
    incomplete: Option<&'static str>,
    usage: Value,
    error: Value,
    ended: bool,
}

impl Builder {
    fn new(req: &ResponsesRequest, prompt_tokens: usize, calls: Option<CallReading>) -> Self {
        let chat = &req.chat;
        Self {
            id: new_id("resp"),
            created_at: super::unix_now(),
            model: chat.model.clone(),
            echo: req.echo.clone(),
            temperature: chat.sampling.temperature.map_or(json!(1.0), |t| json!(t)),
            top_p: chat.sampling.top_p.map_or(json!(1.0), |p| json!(p)),
            parallel_tool_calls: chat.parallel_tool_calls,
            prompt_tokens,
            parser: calls.map(CallReading::parser),
            items: Vec::new(),
            statuses: Vec::new(),
            open: false,
            logprobs: chat.logprobs.is_some(),
            held_logprobs: Vec::new(),
            events: Vec::new(),
            sequence: 0,
            status: "in_progress",
            incomplete: None,
            usage: Value::Null,
            error: Value::Null,
            ended: false,
        }
    }

    fn emit(&mut self, mut event: Value) {
        event["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.events.push(event);
    }

    fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// The stream's opening events.
    fn start(&mut self) {
        let response = self.response();
        self.emit(json!({"type": "response.created", "response": response}));
        self.emit(json!({"type": "response.in_progress", "response": response}));
    }

    fn summary(&self) -> bool {
        self.echo.reasoning_summary.is_some()
    }

    fn delta(&mut self, reasoning: &str, content: &str, logprobs: &[crate::engine::TokenLogprob]) {
        if !reasoning.is_empty() {
            self.reasoning(reasoning);
        }
        let logprobs: Vec<Value> = if self.logprobs {
            logprobs.iter().map(|t| serde_json::to_value(LogprobEntry::from(t)).unwrap_or(Value::Null)).collect()
        } else {
            Vec::new()
        };
        let pieces = match self.parser.as_mut() {
            Some(parser) => parser.push(content),
            None if !content.is_empty() || !logprobs.is_empty() => vec![Piece::Content(content.to_string())],
            None => Vec::new(),
        };
        self.held_logprobs.extend(logprobs);
        for piece in pieces {
            let logprobs = match piece {
                Piece::Content(_) => std::mem::take(&mut self.held_logprobs),
                _ => {
                    self.held_logprobs.clear();
                    Vec::new()
                }
            };
            self.piece(piece, logprobs);
        }
    }

    fn reasoning(&mut self, text: &str) {
        if !matches!(self.items.last(), Some(Item::Reasoning { .. })) || !self.open {
            let at = self.open_item(Item::Reasoning { id: new_id("rs"), text: String::new() });
            let id = self.item_id(at);
            let (kind, part) = if self.summary() {
                ("response.reasoning_summary_part.added", json!({"type": "summary_text", "text": ""}))
            } else {
                ("response.content_part.added", json!({"type": "reasoning_text", "text": ""}))
            };
            let index = if self.summary() { "summary_index" } else { "content_index" };
            self.emit(json!({"type": kind, "item_id": id, "output_index": at, index: 0, "part": part}));
        }
        let at = self.items.len() - 1;
        if let Some(Item::Reasoning { text: all, .. }) = self.items.last_mut() {
            all.push_str(text);
        }
        let id = self.item_id(at);
        let (kind, index) = if self.summary() {
            ("response.reasoning_summary_text.delta", "summary_index")
        } else {
            ("response.reasoning_text.delta", "content_index")
        };
        self.emit(json!({"type": kind, "item_id": id, "output_index": at, index: 0, "delta": text}));
    }

    fn piece(&mut self, piece: Piece, logprobs: Vec<Value>) {
        match piece {
            Piece::Content(text) => {
                if !matches!(self.items.last(), Some(Item::Message { .. })) || !self.open {
                    if text.trim().is_empty() && self.parser.is_some() && logprobs.is_empty() {
                        return; // whitespace between calls
                    }
                    let item = Item::Message { id: new_id("msg"), text: String::new(), logprobs: Vec::new() };
                    let at = self.open_item(item);
                    let id = self.item_id(at);
                    self.emit(json!({"type": "response.content_part.added", "item_id": id, "output_index": at,
                        "content_index": 0, "part": output_text("", &[])}));
                }
                let at = self.items.len() - 1;
                if let Some(Item::Message { text: all, logprobs: all_logprobs, .. }) = self.items.last_mut() {
                    all.push_str(&text);
                    all_logprobs.extend(logprobs.iter().cloned());
                }
                let id = self.item_id(at);
                self.emit(json!({"type": "response.output_text.delta", "item_id": id, "output_index": at,
                    "content_index": 0, "delta": text, "logprobs": logprobs}));
            }
            Piece::CallStart { name } => self.open_call(name, String::new()),
            Piece::Call(call) => {
                self.open_call(call.name, String::new());
                self.arguments(&call.arguments);
            }
            Piece::Arguments(text) => self.arguments(&text),
        }
    }

    fn open_call(&mut self, name: String, arguments: String) {
        self.open_item(Item::Call { id: new_id("fc"), call_id: new_id("call"), name, arguments });
    }

    /// Closes the open item and opens `item` after it (`output_item.added`);
    /// its output index.
    fn open_item(&mut self, item: Item) -> usize {
        self.close();
        self.items.push(item);
        self.statuses.push("in_progress");
        self.open = true;
        let at = self.items.len() - 1;
        let item = self.added(at);
        self.emit(json!({"type": "response.output_item.added", "output_index": at, "item": item}));
        at
    }

    fn arguments(&mut self, text: &str) {
        let at = self.items.len().saturating_sub(1);
        if let Some(Item::Call { arguments, .. }) = self.items.last_mut() {
            arguments.push_str(text);
            let id = self.item_id(at);
            self.emit(json!({"type": "response.function_call_arguments.delta", "item_id": id,
                "output_index": at, "delta": text}));
        }
    }

    /// An item as `output_item.added` shows it: its parts come in events of their own.
    fn added(&self, at: usize) -> Value {
        let mut item = self.items[at].json("in_progress", self.summary());
        for parts in ["content", "summary"] {
            if item.get(parts).is_some() {
                item[parts] = json!([]);
            }
        }
        item
    }

    fn item_id(&self, at: usize) -> String {
        match &self.items[at] {
            Item::Reasoning { id, .. } | Item::Message { id, .. } | Item::Call { id, .. } => id.clone(),
        }
    }

    /// Closes the open item: its `.done` events.
    fn close(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        let at = self.items.len() - 1;
        let id = self.item_id(at);
        let status = if self.incomplete.is_some() { "incomplete" } else { "completed" };
        let summary = self.summary();
        match &self.items[at] {
            Item::Reasoning { text, .. } => {
                let text = text.clone();
                if summary {
                    self.emit(json!({"type": "response.reasoning_summary_text.done", "item_id": id,
                        "output_index": at, "summary_index": 0, "text": text}));
                    self.emit(json!({"type": "response.reasoning_summary_part.done", "item_id": id,
                        "output_index": at, "summary_index": 0, "part": {"type": "summary_text", "text": text}}));
                } else {
                    self.emit(json!({"type": "response.reasoning_text.done", "item_id": id, "output_index": at,
                        "content_index": 0, "text": text}));
                    self.emit(json!({"type": "response.content_part.done", "item_id": id, "output_index": at,
                        "content_index": 0, "part": {"type": "reasoning_text", "text": text}}));
                }
            }
            Item::Message { text, logprobs, .. } => {
                let (text, logprobs) = (text.clone(), logprobs.clone());
                self.emit(json!({"type": "response.output_text.done", "item_id": id, "output_index": at,
                    "content_index": 0, "text": text, "logprobs": logprobs}));
                self.emit(json!({"type": "response.content_part.done", "item_id": id, "output_index": at,
                    "content_index": 0, "part": output_text(&text, &logprobs)}));
            }
            Item::Call { name, arguments, .. } => {
                let (name, arguments) = (name.clone(), arguments.clone());
                self.emit(json!({"type": "response.function_call_arguments.done", "item_id": id,
                    "output_index": at, "name": name, "arguments": arguments}));
            }
        }
        self.statuses[at] = status;
        let item = self.items[at].json(status, summary);
        self.emit(json!({"type": "response.output_item.done", "output_index": at, "item": item}));
    }

    fn finish(&mut self, reason: FinishReason, output_tokens: usize, reasoning_tokens: usize, cached: usize) {
        if let Some(parser) = self.parser.take() {
            for piece in parser.finish() {
                let logprobs = match piece {
                    Piece::Content(_) => std::mem::take(&mut self.held_logprobs),
                    _ => Vec::new(),
                };
                self.piece(piece, logprobs);
            }
        }
        let called = self.items.iter().any(|i| matches!(i, Item::Call { .. }));
        if reason == FinishReason::Length {
            self.incomplete = Some("max_output_tokens");
        }
        if self.items.is_empty() || !called && !self.items.iter().any(|i| matches!(i, Item::Message { .. })) {
            // An answer without text still has its (empty) message.
            self.piece(Piece::Content(String::new()), Vec::new());
        }
        self.close();
        self.status = if self.incomplete.is_some() { "incomplete" } else { "completed" };
        self.usage = json!({
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": self.prompt_tokens + output_tokens,
        });
        let kind = if self.incomplete.is_some() { "response.incomplete" } else { "response.completed" };
        let response = self.response();
        self.emit(json!({"type": kind, "response": response}));
        self.ended = true;
    }

    /// The engine failed the request after the stream began.
    fn fail(&mut self, message: &str) {
        self.status = "failed";
        self.error = json!({"code": "server_error", "message": message});
        let response = self.response();
        self.emit(json!({"type": "response.failed", "response": response}));
        self.ended = true;
    }

    fn response(&self) -> Value {
        let summary = self.summary();
        let output: Vec<Value> =
            self.items.iter().zip(&self.statuses).map(|(item, status)| item.json(status, summary)).collect();
        let echo = &self.echo;
        let mut response = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete.map(|reason| json!({"reason": reason})),
            "instructions": echo.instructions,
            "max_output_tokens": echo.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": {"effort": echo.reasoning_effort, "summary": echo.reasoning_summary},
            "store": false,
            "temperature": self.temperature,
            "text": {"format": echo.text_format},
            "tool_choice": echo.tool_choice,
            "tools": echo.tools,
            "top_logprobs": echo.top_logprobs,
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": echo.user,
            "metadata": echo.metadata,
        });
        if self.status == "completed" {
            response["completed_at"] = json!(super::unix_now());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tool_calls::ToolFormat;
    use crate::engine::TokenLogprob;

    fn builder() -> Builder {
        let body = json!({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"]});
        let req = responses_request::parse(body.to_string().as_bytes(), 100).expect("valid");
        Builder::new(&req, 3, Some(CallReading { format: ToolFormat::Hermes, constrained: false }))
    }

    fn token(text: &str) -> TokenLogprob {
        TokenLogprob { token: text.into(), logprob: -0.5, top: Vec::new() }
    }

    /// Text the tool-call parser holds back (it might open a call) comes out
    /// later with its tokens' log-probabilities; the stream's events are
    /// numbered, and the added item shows no parts yet.
    #[test]
    fn held_back_text_keeps_its_logprobs() {
        let mut b = builder();
        b.start();
        b.delta("", "<to", &[token("<to")]);
        b.delta("", "ast", &[token("ast")]);
        b.finish(FinishReason::Stop, 2, 0, 0);
        let response = b.response();
        let part = &response["output"][0]["content"][0];
        assert_eq!(part["text"], "<toast");
        assert_eq!(part["logprobs"].as_array().map(Vec::len), Some(2), "{part}");
        let events = b.take_events();
        let numbers: Vec<u64> = events.iter().filter_map(|e| e["sequence_number"].as_u64()).collect();
        assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
        let added = events.iter().find(|e| e["type"] == "response.output_item.added").expect("an added item");
        assert_eq!(added["item"]["content"], json!([]));
        assert_eq!(events.last().map(|e| e["type"].clone()), Some(json!("response.completed")));
    }
}
