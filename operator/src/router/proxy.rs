//! The routing API: reads `model`, picks a worker, and relays the request and its
//! (streamed) answer without buffering.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;
use futures::Stream;
use kandle_contract::stopping::Lifecycle;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;
use tokio::sync::watch;

use super::access_log::Access;
use super::balancer;
use super::cache_salt;
use super::errors::RouterError;
use super::hold::{Holding, Place};
use super::metrics::{
    ModelLabel, ModelOutcome, ModelStatus, RouterMetrics, TenantModelKind, TenantModelLimit, TenantModelStatus,
};
use super::model_list::ModelListCache;
use super::model_name::{self, Renamer};
use super::prefix;
use super::prefix_index::PrefixIndex;
use super::quota::{Admission, Decision, Quotas, Running, Which};
use super::table::{InFlight, Pool, Routes};
use super::tenants_file::Tenants;
use super::upstream_key::UpstreamKey;
use super::usage::{self, Meter, PROMPT_TOKENS_HEADER};
use crate::tenants::{Models, Tenant};

pub const REQUEST_ID: HeaderName = HeaderName::from_static(kandle_contract::http::REQUEST_ID_HEADER);
/// Workers one chat request is offered to, at most (each a different one).
const MAX_ATTEMPTS: usize = 3;

#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub max_body_bytes: usize,
    /// Prefix-aware endpoint choice; off, the least loaded endpoint only.
    pub prefix_routing: bool,
    /// Prefix-aware choice's load bound: an endpoint takes requests by
    /// preference while it carries less than this factor (at least 1) times
    /// the mean load, rounded up.
    pub prefix_load_factor: f64,
    /// How long an endpoint that refused a connection is skipped.
    pub cooldown: Duration,
    /// How long one pool may take to list its models before the list goes
    /// out without it.
    pub model_list_timeout: Duration,
    /// How long a request waits for a pool that has no ready endpoint but can
    /// come up (scaling from zero, pods starting).
    pub hold_timeout: Duration,
    /// Requests held per model at most; past it, 429.
    pub max_held: usize,
}

/// Who may call, under which limits, and how the router authenticates to
/// workers. The default: everyone, no limits, callers' keys passed on.
#[derive(Clone)]
pub struct Tenancy {
    /// `None`: no tenants; the workers check callers' keys themselves.
    pub tenants: Option<Arc<Tenants>>,
    pub quotas: Arc<Quotas>,
    /// The key shown to workers instead of the caller's.
    pub upstream_key: Option<Arc<UpstreamKey>>,
    /// How long a request past its tenant's limit waits for its budget before a 429.
    pub quota_wait: Duration,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self { tenants: None, quotas: Quotas::local(), upstream_key: None, quota_wait: Duration::ZERO }
    }
}

#[derive(Clone)]
pub struct RouterState {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Arc<Routes>,
    client: reqwest::Client,
    metrics: RouterMetrics,
    settings: RouterSettings,
    synced: AtomicBool,
    model_lists: ModelListCache,
    holding: Arc<Holding>,
    lifecycle: Arc<Lifecycle>,
    tenancy: Tenancy,
    /// Per pool (by its model): which workers served which prompt blocks.
    prefixes: Mutex<HashMap<String, Arc<PrefixIndex>>>,
}

impl RouterState {
    /// The state, and a task that releases held requests whenever the routes
    /// change (it ends with the routes). Call from within a Tokio runtime.
    pub fn new(routes: Arc<Routes>, client: reqwest::Client, settings: RouterSettings, tenancy: Tenancy) -> Self {
        let metrics = RouterMetrics::default();
        let holding = Arc::new(Holding::new(settings.max_held, metrics.held.clone()));
        tokio::spawn(release_on_changes(Arc::downgrade(&routes), routes.changes(), holding.clone()));
        Self {
            inner: Arc::new(Inner {
                routes,
                client,
                metrics,
                settings,
                synced: AtomicBool::new(false),
                model_lists: ModelListCache::default(),
                holding,
                lifecycle: Arc::default(),
                tenancy,
                prefixes: Mutex::default(),
            }),
        }
    }

    /// Draining and open requests, for a stop that finishes what it took.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.inner.lifecycle
    }

    pub fn set_synced(&self) {
        self.inner.synced.store(true, Ordering::SeqCst);
    }

    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::SeqCst)
    }

    pub fn metrics(&self) -> &RouterMetrics {
        &self.inner.metrics
    }

    pub(super) fn routes(&self) -> &Routes {
        &self.inner.routes
    }

    pub(super) fn client(&self) -> &reqwest::Client {
        &self.inner.client
    }

    pub(super) fn settings(&self) -> &RouterSettings {
        &self.inner.settings
    }

    pub(super) fn model_lists(&self) -> &ModelListCache {
        &self.inner.model_lists
    }

    pub(super) fn tenancy(&self) -> &Tenancy {
        &self.inner.tenancy
    }

    /// The prefix index of the pool serving `model` (made on first use; one
    /// per pool, so pools neither wait on nor evict each other's blocks).
    fn prefix_index(&self, model: &str) -> Arc<PrefixIndex> {
        let mut indexes = self.inner.prefixes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        indexes.entry(model.to_string()).or_default().clone()
    }

    /// The caller's tenant when tenants are on (`Ok(None)` when they are off).
    pub(super) fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<Tenant>>, RouterError> {
        let Some(tenants) = &self.inner.tenancy.tenants else { return Ok(None) };
        let set = tenants.current().ok_or_else(RouterError::tenants_not_loaded)?;
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(RouterError::missing_key)?;
        set.authenticate(key).map(Some).ok_or_else(RouterError::invalid_key)
    }

    /// The `Authorization` workers get: the router's own key when it has one,
    /// else the caller's.
    pub(super) fn upstream_authorization(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        match &self.inner.tenancy.upstream_key {
            Some(key) => key.authorization(),
            None => headers.get(header::AUTHORIZATION).cloned(),
        }
    }
}

/// Whether `tenant` may call the pool `model` names; `Ok` with the pool's
/// served name when there is such a pool. A tenant limited to some models is
/// told the same for a model outside its list as for one that does not exist.
fn check_access(routes: &Routes, tenant: &Tenant, model: &str) -> Result<Option<String>, RouterError> {
    let table = routes.current();
    match table.lookup(model) {
        Some(pool) if tenant.may_call(pool.names()) => Ok(Some(pool.model.clone())),
        None if tenant.models == Models::All => Ok(None),
        _ => Err(RouterError::model_forbidden(model)),
    }
}

/// `POST …/chat/completions` on every API path, `POST …/completions` and
/// `POST …/responses` (the access-log middleware has already given the
/// request its id and its access line): each names its pool in `model`,
/// reports its `usage`, and goes through the same tenancy, holding, routing
/// and retries.
pub async fn generate(
    State(state): State<RouterState>,
    Extension(access): Extension<Access>,
    request: Request,
) -> Response {
    let path = request.uri().path().to_string();
    let envelope = path.starts_with("/api/");
    let (parts, body) = request.into_parts();
    let mut caller = Caller::default();
    let mut response = match route(&state, &path, &parts.headers, body, access, &mut caller).await {
        Ok(response) => response,
        Err((model, e)) => {
            count(&state, &model, e.status);
            e.respond(envelope)
        }
    };
    if let Some(tenant) = &caller.tenant {
        let labels = TenantModelStatus {
            tenant: tenant.name.clone(),
            model: caller.model.clone(),
            status: response.status().as_u16(),
        };
        state.metrics().tenant_requests.get_or_create(&labels).inc();
    }
    caller.admission.write_headers(response.headers_mut());
    response
}

/// What the router learnt of the caller, for the answer's headers and metrics.
#[derive(Default)]
struct Caller {
    tenant: Option<Arc<Tenant>>,
    /// The pool's model, once known.
    model: String,
    admission: Admission,
}

fn count(state: &RouterState, model: &str, status: StatusCode) {
    let labels = ModelStatus { model: model.to_string(), status: status.as_u16() };
    state.metrics().requests.get_or_create(&labels).inc();
}

/// Admits the tenant's request under its limits, waiting up to `quota_wait`
/// for a budget that refills by then, or refuses it (429, or 503 when the
/// shared store is down and the router fails closed).
async fn admit(
    state: &RouterState,
    tenant: &Arc<Tenant>,
    lease: &str,
    caller: &mut Caller,
) -> Result<Running, RouterError> {
    let quotas = &state.inner.tenancy.quotas;
    let deadline = tokio::time::Instant::now() + state.inner.tenancy.quota_wait;
    loop {
        match quotas.admit(tenant, lease).await {
            Decision::Admitted(admission, running) => {
                caller.admission = admission;
                return Ok(running);
            }
            Decision::Refused(admission, refusal) => {
                caller.admission = admission;
                // A bucket refills on a known clock: wait when it refills by
                // the deadline. A place among the concurrent requests frees
                // when another ends: look again often until the deadline.
                let pause = pause_for(&refusal);
                if tokio::time::Instant::now() + pause <= deadline {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = state.inner.lifecycle.draining() => return Err(RouterError::shutting_down()),
                    }
                }
                let labels = TenantModelLimit {
                    tenant: tenant.name.clone(),
                    model: caller.model.clone(),
                    limit: refusal.which.label(),
                };
                state.metrics().tenant_rate_limited.get_or_create(&labels).inc();
                let limit = match refusal.which {
                    Which::Requests => tenant.limits.requests_per_minute.map(u64::from),
                    Which::Tokens => tenant.limits.tokens_per_minute,
                    Which::Concurrency => tenant.limits.concurrent_requests.map(u64::from),
                };
                return Err(RouterError::rate_limited(&tenant.name, &refusal, limit.unwrap_or(0)));
            }
            Decision::StoreDown => return Err(RouterError::quota_store_unavailable()),
        }
    }
}

/// How often a request waiting for one of its tenant's concurrent places looks again.
const CONCURRENCY_POLL: Duration = Duration::from_millis(100);

/// How long a refused request waits before it asks again.
fn pause_for(refusal: &super::quota::Refusal) -> Duration {
    match refusal.which {
        Which::Concurrency => CONCURRENCY_POLL,
        Which::Requests | Which::Tokens => refusal.retry_after.max(Duration::from_millis(1)),
    }
}

async fn route(
    state: &RouterState,
    path: &str,
    headers: &HeaderMap,
    body: Body,
    access: Access,
    caller: &mut Caller,
) -> Result<Response, (String, RouterError)> {
    let unknown = || "unknown".to_string();
    if !state.is_synced() {
        return Err((unknown(), RouterError::not_ready()));
    }
    let tenant = state.authenticate(headers).map_err(|e| (unknown(), e))?;
    if let Some(tenant) = &tenant {
        access.tenant(&tenant.name);
    }
    caller.tenant = tenant.clone();
    caller.model = unknown();
    let limit = state.inner.settings.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| (unknown(), RouterError::body_too_large(limit)))?;
    let model = requested_model(&bytes).map_err(|e| (unknown(), e))?;
    access.model(&model);
    // With tenants, a stream is asked for its usage (taken out again below
    // when the client did not ask for it), and the request is admitted under
    // the tenant's limits before it is held or sent on.
    let mut metered = None;
    let (bytes, strip_usage) = match &tenant {
        Some(tenant) => {
            if let Some(served) = check_access(state.routes(), tenant, &model).map_err(|e| (unknown(), e))? {
                caller.model = served;
            }
            // The lease is the router's own id: a client's x-request-id is
            // theirs to repeat, which would fold their requests into one.
            let lease = uuid::Uuid::new_v4().to_string();
            let running = admit(state, tenant, &lease, caller).await.map_err(|e| (unknown(), e))?;
            metered = Some((tenant.clone(), running));
            let bytes = cache_salt::salted(&bytes, &tenant.name).map(Bytes::from).unwrap_or(bytes);
            // A Responses stream reports its usage in its last event anyway.
            match usage::with_usage_reported(&bytes).filter(|_| !path.ends_with("/responses")) {
                Some((body, asked)) => (Bytes::from(body), !asked),
                None => (bytes, false),
            }
        }
        None => (bytes, false),
    };
    let pool = pool_with_endpoints(state, &model).await?;
    // An alias reaches the worker as the pool's served name; the answer names the alias again.
    let client_model = (model != pool.model).then_some(model.as_str());
    let bytes = match client_model {
        Some(_) => model_name::with_model(&bytes, &pool.model).map(Bytes::from).unwrap_or(bytes),
        None => bytes,
    };
    // From here a worker may be working on the request: a client that leaves
    // before the answer's headers still owes the prompt's estimate.
    let mut charge = metered.map(|(tenant, running)| Charge {
        quotas: state.inner.tenancy.quotas.clone(),
        tenant,
        model: pool.model.clone(),
        tokens: state.metrics().tenant_tokens.clone(),
        _running: running,
        owed_if_dropped: 0,
    });
    // The prompt's blocks as the chosen worker will see them: renamed, salted.
    let settings = &state.inner.settings;
    let blocks = match settings.prefix_routing {
        false => None,
        true if path.ends_with("/chat/completions") => prefix::chat_blocks(&bytes, &pool.model),
        true if path.ends_with("/responses") => prefix::responses_blocks(&bytes, &pool.model),
        true => prefix::prompt_blocks(&bytes, &pool.model),
    };
    let index = blocks.as_ref().map(|_| state.prefix_index(&pool.model));
    let prefix = blocks.as_deref().zip(index.as_deref()).map(|(blocks, index)| balancer::Prefix {
        index,
        blocks,
        load_factor: settings.prefix_load_factor,
    });
    let unreadable = (settings.prefix_routing && blocks.is_none()).then_some(balancer::Outcome::Unreadable);
    // Each attempt goes to another worker; a large pool is not walked end to end.
    let attempts = pool.endpoints.len().min(MAX_ATTEMPTS);
    let mut tried = Vec::new();
    loop {
        let picked = (tried.len() < attempts).then(|| balancer::pick(&pool, &tried, prefix.as_ref(), Instant::now()));
        let Some((endpoint, outcome)) = picked.flatten() else {
            return Err((pool.model.clone(), RouterError::no_endpoint(&model)));
        };
        // How the request's first choice went (a retry's is not a routing decision).
        if let Some(outcome) = outcome.or(unreadable).filter(|_| tried.is_empty()) {
            let labels = ModelOutcome { model: pool.model.clone(), outcome: outcome.label() };
            state.metrics().prefix_routing.get_or_create(&labels).inc();
        }
        let guard = endpoint.start();
        let gauge = ModelGauge::start(
            state.metrics().in_flight.get_or_create(&ModelLabel { model: pool.model.clone() }).clone(),
        );
        let started = Instant::now();
        access.attempt(&endpoint.url);
        owe(&mut charge, estimated_tokens(bytes.len()));
        let upstream = state
            .inner
            .client
            .post(format!("{}{path}", endpoint.url))
            .headers(forwarded(headers, state.upstream_authorization(headers)))
            .body(bytes.clone())
            .send()
            .await;
        match upstream {
            // A worker still loading or full took nothing on, and nothing has
            // reached the client yet: another worker may take the request. The
            // last attempt's answer passes through as it is (Retry-After included).
            Ok(answer) if is_busy(answer.status()) && tried.len() + 1 < attempts => {
                tracing::info!(endpoint = %endpoint.url, status = answer.status().as_u16(), "worker busy; trying another");
                owe(&mut charge, 0);
                state.metrics().retries.inc();
                tried.push(endpoint.clone());
            }
            Ok(answer) => {
                // The worker took the prompt on: its prefix cache now holds the blocks.
                if let (Some(prefix), true) = (&prefix, answer.status().is_success()) {
                    prefix.index.record(prefix.blocks, endpoint.key);
                }
                state.metrics().upstream_latency.observe(started.elapsed().as_secs_f64());
                count(state, &pool.model, answer.status());
                let first_byte = (started, state.metrics().time_to_first_byte.clone());
                access.relaying();
                return Ok(relay(answer, (guard, gauge), access, first_byte, client_model, charge, strip_usage));
            }
            // Nothing reached the worker: another one may take the request.
            Err(e) if e.is_connect() => {
                tracing::warn!(endpoint = %endpoint.url, error = %e, "worker unreachable; trying another");
                owe(&mut charge, 0);
                endpoint.mark_down(state.inner.settings.cooldown);
                state.metrics().retries.inc();
                tried.push(endpoint.clone());
            }
            // The worker failed the request (the client did not leave): the
            // error costs no tokens, as the worker's own errors do not.
            Err(e) => {
                owe(&mut charge, 0);
                return Err((pool.model.clone(), RouterError::upstream(e)));
            }
        }
    }
}

/// The pool serving `model`, once it has an endpoint: at once, or after holding
/// the request while a pool that has none comes up. A pool that cannot come up
/// is returned as it is (its request is refused for want of an endpoint).
async fn pool_with_endpoints(state: &RouterState, model: &str) -> Result<Arc<Pool>, (String, RouterError)> {
    let timeout = state.inner.settings.hold_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut place: Option<Place> = None;
    let mut held_since: Option<Instant> = None;
    loop {
        let table = state.inner.routes.current();
        let Some(pool) = table.lookup(model).cloned() else {
            return Err(("unknown".to_string(), RouterError::model_not_found(model)));
        };
        if !pool.endpoints.is_empty() || !pool.can_come_up {
            if let Some(since) = held_since {
                state.metrics().hold_seconds.observe(since.elapsed().as_secs_f64());
            }
            return Ok(pool);
        }
        let Some(held) = place.as_mut() else {
            // Take a place first, then look again: an update that came in
            // between releases the place at once.
            let entered = state.inner.holding.enter(&pool.model);
            place = Some(entered.map_err(|_| {
                (pool.model.clone(), RouterError::hold_queue_full(model, state.inner.settings.max_held))
            })?);
            if held_since.is_none() {
                tracing::info!(model = %pool.model, "no ready worker; holding the request while the pool comes up");
                held_since = Some(Instant::now());
            }
            continue;
        };
        tokio::select! {
            () = held.released() => {}
            () = tokio::time::sleep_until(deadline) => {
                return Err((pool.model.clone(), RouterError::hold_timeout(model, timeout)));
            }
            () = state.inner.lifecycle.draining() => {
                return Err((pool.model.clone(), RouterError::shutting_down()));
            }
        }
        // Released: route again (the place is given up; a pool still without
        // an endpoint takes a new one).
        place = None;
    }
}

/// Releases held requests on every route change, until the routes are gone.
async fn release_on_changes(routes: Weak<Routes>, mut changes: watch::Receiver<()>, holding: Arc<Holding>) {
    while changes.changed().await.is_ok() {
        let Some(routes) = routes.upgrade() else { return };
        holding.release(&routes.current());
    }
}

/// A worker's answer that says "not now" (still loading, or its queue full)
/// rather than anything about the request.
fn is_busy(status: StatusCode) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS
}

#[derive(serde::Deserialize)]
struct ModelField {
    model: Option<Value>,
}

fn requested_model(body: &[u8]) -> Result<String, RouterError> {
    let parsed: ModelField = serde_json::from_slice(body).map_err(RouterError::bad_json)?;
    match parsed.model {
        Some(Value::String(model)) => Ok(model),
        _ => Err(RouterError::missing_model()),
    }
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The caller's headers for the worker (`x-request-id` among them), with
/// `authorization` as the worker is to get it.
fn forwarded(headers: &HeaderMap, authorization: Option<HeaderValue>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if HOP_BY_HOP.contains(&name.as_str()) || name == header::CONTENT_LENGTH || name == header::AUTHORIZATION {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(value) = authorization {
        out.insert(header::AUTHORIZATION, value);
    }
    out
}

/// What an admitted tenant request owes once its answer ends: its tokens to
/// the tenant's budget and usage metrics; it stops counting as running.
struct Charge {
    quotas: Arc<Quotas>,
    tenant: Arc<Tenant>,
    model: String,
    tokens: prometheus_client::metrics::family::Family<TenantModelKind, prometheus_client::metrics::counter::Counter>,
    _running: Running,
    /// Prompt tokens charged if it is dropped unsettled (a worker had the
    /// request when the client left): zero while no worker has it.
    owed_if_dropped: u64,
}

impl Charge {
    fn settle(mut self, used: usage::Usage) {
        self.owed_if_dropped = 0;
        self.record(used);
    }

    fn record(&self, used: usage::Usage) {
        for (kind, n) in [("prompt", used.prompt), ("cached", used.cached), ("completion", used.completion)] {
            let labels = TenantModelKind { tenant: self.tenant.name.clone(), model: self.model.clone(), kind };
            self.tokens.get_or_create(&labels).inc_by(n);
        }
        let total = used.total();
        if total > 0 && self.tenant.limits.tokens_per_minute.is_some() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (quotas, tenant) = (self.quotas.clone(), self.tenant.clone());
                runtime.spawn(async move { quotas.charge(&tenant, total).await });
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.owed_if_dropped > 0 {
            self.record(usage::Usage { prompt: self.owed_if_dropped, ..Default::default() });
        }
    }
}

/// Sets what a tenant request owes if its client leaves now: the request's
/// estimate while a worker has it, nothing while none does.
fn owe(charge: &mut Option<Charge>, tokens: u64) {
    if let Some(charge) = charge {
        charge.owed_if_dropped = tokens;
    }
}

/// Tokens in a request body of `bytes`, by the usual four bytes a token: what
/// a request owes when its client leaves before the worker has counted it.
fn estimated_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// Keeps the per-model in-flight gauge up while a request is relayed.
struct ModelGauge(Gauge);

impl ModelGauge {
    fn start(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ModelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Relays a worker's answer; with `client_model`, the model it names is renamed to that.
fn relay(
    answer: reqwest::Response,
    guards: (InFlight, ModelGauge),
    access: Access,
    first_byte: (Instant, Histogram),
    client_model: Option<&str>,
    charge: Option<Charge>,
    strip_usage: bool,
) -> Response {
    let status = answer.status();
    let prompt_tokens = answer
        .headers()
        .get(PROMPT_TOKENS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if HOP_BY_HOP.contains(&name.as_str()) || name == header::CONTENT_LENGTH {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = Relayed {
        inner: Box::pin(answer.bytes_stream()),
        _guards: guards,
        access,
        first_byte: Some(first_byte),
        sse,
        renamer: client_model.map(|name| Renamer::new(name, sse)),
        meter: charge.and_then(|charge| {
            // A refusal or error used no tokens.
            if !status.is_success() {
                charge.settle(usage::Usage::default());
                return None;
            }
            Some((Meter::new(sse, strip_usage, prompt_tokens), charge))
        }),
        done: false,
    };
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A worker's body on its way to the client, chunk by chunk as it arrives. A
/// stream that breaks off ends with an SSE `error` event rather than a torn
/// connection. Dropping it (the client left) drops the upstream request too.
struct Relayed {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    _guards: (InFlight, ModelGauge),
    /// Written when the body ends or is dropped, so a stream's line has its full duration.
    access: Access,
    first_byte: Option<(Instant, Histogram)>,
    sse: bool,
    renamer: Option<Renamer>,
    /// A tenant's answer: its usage is read as it passes and charged at the end.
    meter: Option<(Meter, Charge)>,
    done: bool,
}

impl Relayed {
    /// A chunk from the worker, as it goes on to the client.
    fn pass(&mut self, bytes: Bytes) -> Bytes {
        let bytes = match self.meter.as_mut() {
            Some((meter, _)) => meter.push(bytes),
            None => bytes,
        };
        match self.renamer.as_mut() {
            Some(renamer) if !bytes.is_empty() => renamer.push(&bytes),
            _ => bytes,
        }
    }

    /// The end of the worker's body: whatever is still held back.
    fn finish(&mut self) -> Vec<u8> {
        let held = self.meter.as_mut().map(|(meter, _)| meter.finish()).unwrap_or_default();
        let mut out = Vec::new();
        match self.renamer.as_mut() {
            Some(renamer) => {
                out.extend_from_slice(&renamer.push(&held));
                out.extend_from_slice(&renamer.finish());
            }
            None => out.extend_from_slice(&held),
        }
        out
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if let Some((meter, charge)) = self.meter.take() {
            charge.settle(meter.usage());
        }
    }
}

impl Stream for Relayed {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    if let Some((started, ttfb)) = self.first_byte.take() {
                        ttfb.observe(started.elapsed().as_secs_f64());
                    }
                    let bytes = self.pass(bytes);
                    // A renamer or meter may hold a chunk back until its line completes.
                    if !bytes.is_empty() {
                        return Poll::Ready(Some(Ok(bytes)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    tracing::warn!(error = %e, "worker stream broke off");
                    if !self.sse {
                        return Poll::Ready(Some(Err(std::io::Error::other(e))));
                    }
                    let mut held = self.finish();
                    let error = RouterError::upstream(format!("the stream broke off: {e}"));
                    held.extend_from_slice(format!("\n\ndata: {}\n\n", error.json()).as_bytes());
                    return Poll::Ready(Some(Ok(Bytes::from(held))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    self.access.relayed();
                    let held = self.finish();
                    if !held.is_empty() {
                        return Poll::Ready(Some(Ok(Bytes::from(held))));
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
