//! Request bodies a response leaves unread are drained before it is sent.
//!
//! A server that answers without reading the whole body (413 past the limit,
//! 401 before the body, ...) and then closes the connection makes the kernel
//! reset it while the client is still writing: the client gets a broken pipe
//! and never reads the answer. So the rest of an unread body is read and
//! thrown away first, up to a cap in bytes and in time, and the answer closes
//! the connection (`Connection: close`). Nothing drained is kept in memory.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;

/// At most this many times `--max-body-bytes` are drained (64 MiB at the
/// default 4 MiB limit) ...
const DRAIN_FACTOR: usize = 16;
/// ... and for at most this long; past either the connection is closed unread.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Middleware (`axum::middleware::from_fn_with_state(max_body_bytes, drain_unread)`)
/// for a server whose request bodies are limited to `max_body_bytes`.
pub async fn drain_unread(State(max_body_bytes): State<usize>, req: Request, next: Next) -> Response {
    // A client that waits for `100 Continue` sends no body unless it is asked
    // for; hyper answers without asking when the body was never polled.
    let waits_for_continue =
        req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (back, mut unread) = oneshot::channel();
    let req = req.map(|body| Body::new(HandsBack { inner: Some(body), polled: false, done: false, back: Some(back) }));
    let mut response = next.run(req).await;
    // Nothing comes back when the body was read to its end (or is still held).
    let Ok(Unread { body, polled }) = unread.try_recv() else { return response };
    if !polled && waits_for_continue {
        return response;
    }
    let cap = max_body_bytes.saturating_mul(DRAIN_FACTOR);
    let drained = tokio::time::timeout(DRAIN_TIME, discard(body, cap)).await.unwrap_or(false);
    if !drained {
        tracing::debug!(cap, "request body left unread past the drain cap; closing the connection");
    }
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads `body` to its end, keeping nothing; false past `cap` bytes or on an error.
async fn discard(body: Body, cap: usize) -> bool {
    let mut data = body.into_data_stream();
    let mut read = 0usize;
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(bytes) => {
                read = read.saturating_add(bytes.len());
                if read > cap {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// The rest of a body its reader dropped before the end.
struct Unread {
    body: Body,
    /// Whether any of it was asked for.
    polled: bool,
}

/// A request body that, dropped before its end, hands the rest back to
/// [`drain_unread`].
struct HandsBack {
    inner: Option<Body>,
    polled: bool,
    /// The end (or an error) was reached: there is nothing to drain.
    done: bool,
    back: Option<oneshot::Sender<Unread>>,
}

impl HttpBody for HandsBack {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.polled = true;
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for HandsBack {
    fn drop(&mut self) {
        if let (Some(body), Some(back)) = (self.inner.take(), self.back.take()) {
            if !self.done && !body.is_end_stream() {
                let _ = back.send(Unread { body, polled: self.polled });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::http::{Request, StatusCode};
    use axum::middleware;
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    const LIMIT: usize = 8;
    const CHUNK: usize = 4;

    /// Routes that read all of the body, its first chunk, or none of it,
    /// behind the middleware with a body limit of `LIMIT` bytes.
    fn app() -> Router {
        Router::new()
            .route(
                "/all",
                post(|body: Body| async move { axum::body::to_bytes(body, usize::MAX).await.is_ok().to_string() }),
            )
            .route(
                "/first",
                post(|body: Body| async move {
                    let first = body.into_data_stream().next().await;
                    first.is_some().to_string()
                }),
            )
            .route("/none", post(|| async { "none" }))
            .layer(middleware::from_fn_with_state(LIMIT, drain_unread))
    }

    /// A body of `chunks` chunks that counts how many were read.
    fn counted(chunks: usize) -> (Body, Arc<AtomicUsize>) {
        let read = Arc::new(AtomicUsize::new(0));
        let counter = read.clone();
        let stream = futures::stream::iter(0..chunks).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; CHUNK]))
        });
        (Body::from_stream(stream), read)
    }

    async fn send(path: &str, chunks: usize, expect_continue: bool) -> (StatusCode, Option<HeaderValue>, usize) {
        let (body, read) = counted(chunks);
        let mut request = Request::post(path);
        if expect_continue {
            request = request.header(header::EXPECT, "100-continue");
        }
        let response = app().oneshot(request.body(body).expect("request")).await.expect("response");
        (response.status(), response.headers().get(header::CONNECTION).cloned(), read.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_keeps_the_connection() {
        assert_eq!(send("/all", 3, false).await, (StatusCode::OK, None, 3));
    }

    #[tokio::test]
    async fn the_rest_of_an_unread_body_is_drained_and_the_connection_closed() {
        let close = Some(HeaderValue::from_static("close"));
        assert_eq!(send("/first", 10, false).await, (StatusCode::OK, close.clone(), 10));
        assert_eq!(send("/none", 10, false).await, (StatusCode::OK, close, 10));
    }

    #[tokio::test]
    async fn draining_stops_at_the_cap() {
        let cap_chunks = LIMIT * DRAIN_FACTOR / CHUNK;
        let (status, connection, read) = send("/none", cap_chunks * 4, false).await;
        assert_eq!((status, connection), (StatusCode::OK, Some(HeaderValue::from_static("close"))));
        assert_eq!(read, cap_chunks + 1);
    }

    #[tokio::test]
    async fn a_client_waiting_for_100_continue_is_not_asked_for_a_body_no_one_read() {
        assert_eq!(send("/none", 10, true).await, (StatusCode::OK, None, 0));
        // Once a handler started reading, the client is sending: the rest is drained.
        assert_eq!(send("/first", 10, true).await.2, 10);
    }
}
