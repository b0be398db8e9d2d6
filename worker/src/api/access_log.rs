//! One access-log line per request, written when its response body ends (the
//! last byte of a stream sent, or the client gone): request id, method, path,
//! status, duration, and the tokens a chat completion used. Headers, and so
//! API keys, are never logged.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

use super::REQUEST_ID;

/// The tokens of one request, filled in by the chat handler as it learns them.
#[derive(Debug, Clone, Default)]
pub struct TokenTally(Arc<[AtomicUsize; 2]>);

impl TokenTally {
    pub fn prompt(&self, tokens: usize) {
        self.0[0].store(tokens, Ordering::Relaxed);
    }

    pub fn completion(&self, tokens: usize) {
        self.0[1].store(tokens, Ordering::Relaxed);
    }
}

struct Line {
    id: String,
    method: String,
    path: String,
    status: u16,
    started: Instant,
    tally: TokenTally,
}

impl Line {
    fn write(&self, finished: bool) {
        tracing::info!(
            target: "kandle_worker::access",
            request_id = %self.id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens = self.tally.0[0].load(Ordering::Relaxed),
            completion_tokens = self.tally.0[1].load(Ordering::Relaxed),
            finished,
            "request"
        );
    }
}

pub async fn access_log(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let tally = TokenTally::default();
    req.extensions_mut().insert(tally.clone());
    let response = next.run(req).await;
    let line = Line { id, method, path, status: response.status().as_u16(), started, tally };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(Logged { inner: body, line: Some(line), ended: false }))
}

/// A response body that writes the access line when it is dropped.
struct Logged {
    inner: Body,
    line: Option<Line>,
    ended: bool,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let ended = self.ended || self.inner.is_end_stream();
        if let Some(line) = self.line.take() {
            line.write(ended);
        }
    }
}
