//! The server-sent-event plumbing every streaming answer shares: a state that
//! queues SSE events and waits for the engine's next event, driven until it
//! says it is done; JSON events; errors after the stream began.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;

use super::error::ApiError;

/// The events of a response stream ready to send.
#[derive(Default)]
pub struct Outbox {
    queued: VecDeque<SseEvent>,
    /// Nothing more will be queued.
    done: bool,
}

impl Outbox {
    pub fn push(&mut self, event: SseEvent) {
        self.queued.push_back(event);
    }

    /// The OpenAI streams' last event, `data: [DONE]`.
    pub fn finish(&mut self) {
        self.queued.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    /// Nothing follows what is queued (streams without a `[DONE]`).
    pub fn close(&mut self) {
        self.done = true;
    }

    /// Ends the stream with `error` as an SSE event with an `error` object
    /// (the answer's status was sent with its first event).
    pub fn fail(&mut self, error: &ApiError) {
        self.queued.push_back(error_event(error));
        self.done = true;
    }
}

/// A response stream between SSE events.
pub trait Answer: Send + 'static {
    fn outbox(&mut self) -> &mut Outbox;
    /// Waits for the engine's next event and queues what it becomes.
    fn advance(&mut self) -> impl Future<Output = ()> + Send;
}

/// Sends what `answer` queues, as it queues it, until it is done.
pub fn stream<A: Answer>(answer: A) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let events = futures::stream::unfold(answer, |mut a| async move {
        loop {
            let outbox = a.outbox();
            if let Some(event) = outbox.queued.pop_front() {
                return Some((Ok(event), a));
            }
            if outbox.done {
                return None;
            }
            a.advance().await;
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

pub fn json_event<T: serde::Serialize>(value: &T) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        Err(e) => SseEvent::default().data(format!(
            r#"{{"error":{{"message":"cannot encode chunk: {e}","type":"server_error","param":null,"code":null}}}}"#
        )),
    }
}

/// An error after the stream started: an SSE event with an `error` object.
pub fn error_event(error: &ApiError) -> SseEvent {
    json_event(&error.body())
}
