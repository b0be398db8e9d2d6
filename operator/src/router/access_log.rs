//! One access-log line per request (target `kandle_operator::access`): request
//! id, method, path, the caller's tenant (when tenants are on), the model asked
//! for, the worker that answered, how many workers were tried, status,
//! duration, and whether the answer went out whole.
//! The line is written when its last holder lets go: the middleware once the
//! response is made, or, for a worker's answer being relayed, the relayed body
//! once it ends or is dropped, so a stream's line carries its full duration.
//! Headers, and so API keys, are never logged. Token counts are in the
//! worker's own access line, under the same request id.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use super::proxy::REQUEST_ID;

/// The access line of one request, shared by whoever still has a part in it.
pub type Access = Arc<AccessLine>;

#[derive(Debug)]
pub struct AccessLine {
    request_id: String,
    method: String,
    path: String,
    started: Instant,
    route: Mutex<Route>,
}

/// What the request met on its way, as the proxy learns it.
#[derive(Debug, Default)]
struct Route {
    /// The caller's tenant (its name; never its key).
    tenant: Option<String>,
    model: Option<String>,
    worker: Option<String>,
    attempts: usize,
    status: u16,
    /// The answer is a worker's body, relayed as it comes.
    relaying: bool,
    /// That body was relayed to its end.
    relayed: bool,
}

impl AccessLine {
    fn route(&self) -> MutexGuard<'_, Route> {
        self.route.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The tenant whose key the caller showed.
    pub fn tenant(&self, tenant: &str) {
        self.route().tenant = Some(tenant.to_string());
    }

    /// The model the request named.
    pub fn model(&self, model: &str) {
        self.route().model = Some(model.to_string());
    }

    /// The request was sent to `worker`.
    pub fn attempt(&self, worker: &str) {
        let mut route = self.route();
        route.attempts += 1;
        route.worker = Some(worker.to_string());
    }

    /// The answer is the worker's body, relayed from now on.
    pub fn relaying(&self) {
        self.route().relaying = true;
    }

    /// The worker's body has been relayed to its end.
    pub fn relayed(&self) {
        self.route().relayed = true;
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let route = self.route.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        tracing::info!(
            target: "kandle_operator::access",
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            tenant = route.tenant.as_deref().unwrap_or("-"),
            model = route.model.as_deref().unwrap_or("-"),
            worker = route.worker.as_deref().unwrap_or("-"),
            attempts = route.attempts,
            status = route.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            finished = !route.relaying || route.relayed,
            "request"
        );
    }
}

/// Gives every request an id (the caller's `x-request-id`, or a new one) that
/// goes to the worker and back to the caller, and an access line.
pub async fn access_log(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req.headers().get(&REQUEST_ID).cloned().unwrap_or_else(new_request_id);
    req.headers_mut().insert(REQUEST_ID, id.clone());
    let line = Arc::new(AccessLine {
        request_id: id.to_str().unwrap_or("-").to_string(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        started,
        route: Mutex::default(),
    });
    req.extensions_mut().insert(line.clone());
    let mut response = next.run(req).await;
    line.route().status = response.status().as_u16();
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

fn new_request_id() -> HeaderValue {
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}
