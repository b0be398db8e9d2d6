//! A fake API server for tests of whole watch loops (the controller, the
//! router's discovery): lists and writes are answered by the test's function,
//! watches are held open and never answered, and every request is recorded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

/// A request the fake API server answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    /// The query string as sent (percent-encoded), empty when there is none.
    pub query: String,
    pub body: Value,
}

pub type Log = Arc<Mutex<Vec<Recorded>>>;

/// A client whose every request goes to `respond(method, path, body)`.
pub fn client(respond: impl Fn(&Method, &str, &Value) -> (u16, Value) + Send + 'static) -> (kube::Client, Log) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log: Log = Arc::default();
    let recorder = log.clone();
    tokio::spawn(async move {
        let mut watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or("").to_string();
            if query.contains("watch=true") {
                // Kept, never answered: the watch stays open with nothing new.
                watches.push(send);
                continue;
            }
            let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, reply) = respond(&method, &path, &body);
            recorder.lock().unwrap_or_else(|p| p.into_inner()).push(Recorded { method, path, query, body });
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                .unwrap_or_else(|_| Response::new(Body::empty()));
            send.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), log)
}

/// A list response as the API server sends it (items without apiVersion and kind).
pub fn list(items: &[Value]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|i| {
            let mut i = i.clone();
            if let Some(o) = i.as_object_mut() {
                o.remove("apiVersion");
                o.remove("kind");
            }
            i
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
}

/// Waits until the log holds a request for which `wanted` is true; panics after 5 s.
pub async fn wait_for(log: &Log, what: &str, wanted: impl Fn(&Recorded) -> bool) -> Recorded {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(found) = log.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|r| wanted(r)) {
            return found.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "never saw {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
