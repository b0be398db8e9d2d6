//! A stop Kubernetes waits for, the same in both servers: from SIGTERM on,
//! `/ready` answers 503 and new API requests get a 503 with `Retry-After`
//! (a router retries another worker; a client SDK another router), while the
//! requests already taken, streams included, run to their last byte. The
//! server closes its listener only once none is left open, so a request that
//! arrives late meets an answer rather than a refused connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tokio::sync::watch;

/// Whether the server is stopping, and how many API requests are still open.
#[derive(Debug)]
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    open: watch::Sender<usize>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { draining: watch::Sender::new(false), open: watch::Sender::new(0) }
    }
}

impl Lifecycle {
    /// Stops taking requests; those already taken go on.
    pub fn begin_draining(&self) {
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves when draining begins.
    pub async fn draining(&self) {
        let _ = self.draining.subscribe().wait_for(|d| *d).await;
    }

    /// Resolves once draining has begun and no request is open.
    pub async fn drained(&self) {
        self.draining().await;
        let _ = self.open.subscribe().wait_for(|n| *n == 0).await;
    }

    /// API requests taken and not yet answered to their end.
    pub fn open_requests(&self) -> usize {
        *self.open.borrow()
    }
}

/// State of [`track`]: the lifecycle, and the answer to a request that comes
/// while draining (each server's own 503 error object).
#[derive(Clone)]
pub struct Tracker {
    pub lifecycle: Arc<Lifecycle>,
    pub refuse: fn() -> Response,
}

/// Middleware of the API routes: refuses new requests while draining, and keeps
/// each taken one open until its response body is done (or dropped, the client
/// gone).
pub async fn track(State(tracker): State<Tracker>, req: Request, next: Next) -> Response {
    if tracker.lifecycle.is_draining() {
        return (tracker.refuse)();
    }
    let open = Open::new(tracker.lifecycle);
    let (parts, body) = next.run(req).await.into_parts();
    Response::from_parts(parts, Body::new(Tracked { inner: body, _open: open }))
}

/// One open request; closed when dropped, however its response ends.
struct Open(Arc<Lifecycle>);

impl Open {
    fn new(lifecycle: Arc<Lifecycle>) -> Self {
        lifecycle.open.send_modify(|n| *n += 1);
        Self(lifecycle)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

struct Tracked {
    inner: Body,
    _open: Open,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use axum::http::StatusCode;
    use axum::routing::get;
    use futures::StreamExt;
    use tower::ServiceExt;

    use super::*;

    /// A server whose one route answers with the next body of `bodies` (an empty one when none is left).
    fn app(lifecycle: Arc<Lifecycle>, bodies: Arc<Mutex<Vec<Body>>>) -> axum::Router {
        let refuse = || {
            let mut r = Response::new(Body::from("stopping"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        };
        let answer = move || {
            let body = bodies.lock().expect("lock").pop().unwrap_or_default();
            async move { body }
        };
        axum::Router::new()
            .route("/", get(answer))
            .route_layer(axum::middleware::from_fn_with_state(Tracker { lifecycle, refuse }, track))
    }

    fn request() -> Request {
        Request::builder().uri("/").body(Body::empty()).expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_holds_the_stop_and_new_requests_are_refused() {
        let lifecycle = Arc::new(Lifecycle::default());
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
        let app = app(lifecycle.clone(), Arc::new(Mutex::new(vec![Body::from_stream(rx)])));

        let response = app.clone().oneshot(request()).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(lifecycle.open_requests(), 1);

        lifecycle.begin_draining();
        let refused = app.oneshot(request()).await.expect("response");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);

        let drained = tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move { lifecycle.drained().await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!drained.is_finished(), "a stream still open holds the stop");

        tx.unbounded_send(Ok(Bytes::from("last"))).expect("send");
        drop(tx);
        let mut data = response.into_body().into_data_stream();
        assert_eq!(data.next().await.and_then(Result::ok), Some(Bytes::from("last")));
        assert!(data.next().await.is_none());
        drop(data);
        tokio::time::timeout(Duration::from_secs(1), drained).await.expect("drained").expect("task");
        assert_eq!(lifecycle.open_requests(), 0);
    }

    #[tokio::test]
    async fn a_dropped_response_closes_its_request() {
        let lifecycle = Arc::new(Lifecycle::default());
        let response = app(lifecycle.clone(), Arc::default()).oneshot(request()).await.expect("response");
        assert_eq!(lifecycle.open_requests(), 1);
        drop(response);
        assert_eq!(lifecycle.open_requests(), 0);
    }
}
