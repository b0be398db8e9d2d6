//! Per-tenant limits: requests per minute (taken at admission), tokens per
//! minute (charged from each answer's real usage; a tenant in debt waits until
//! its budget has refilled), and requests in flight. Kept in this process for
//! one router replica, or in Redis/Valkey for several.

pub mod bucket;
mod local;
pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bucket::{openai_duration, Standing};
use local::LocalStore;
use redis::RedisStore;

use crate::tenants::Tenant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Requests,
    Tokens,
    Concurrency,
}

impl Which {
    /// The metric label and error wording of the limit.
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrent_requests",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub which: Which,
    /// When the refusing limit admits a request again.
    pub retry_after: Duration,
}

/// What one admission found: each per-minute limit's standing, and the refusal if any.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Admission {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
    pub refusal: Option<Refusal>,
}

impl Admission {
    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits the tenant has.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (what, standing) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(s) = standing else { continue };
            for (field, value) in [
                ("limit", s.limit.to_string()),
                ("remaining", s.remaining.to_string()),
                ("reset", openai_duration(s.reset)),
            ] {
                if let (Ok(name), Ok(value)) =
                    (HeaderName::try_from(format!("x-ratelimit-{field}-{what}")), HeaderValue::try_from(value))
                {
                    headers.insert(name, value);
                }
            }
        }
    }
}

/// What the router does while the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Serve authenticated requests without limits.
    Open,
    /// Refuse requests of tenants that have limits (503).
    Closed,
}

enum Store {
    Local(LocalStore),
    Redis(RedisStore),
}

/// The limits of every tenant, and the store that keeps them.
pub struct Quotas {
    store: Store,
    failure: FailureMode,
    /// Whether the last call to the store failed (logged once per outage).
    down: AtomicBool,
    epoch: Instant,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("failure", &self.failure).field("down", &self.down).finish_non_exhaustive()
    }
}

/// An admitted request, counted toward its tenant's concurrent requests until dropped.
#[derive(Debug)]
pub struct Running {
    quotas: Arc<Quotas>,
    tenant: String,
    request_id: String,
    counted: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        match &self.quotas.store {
            Store::Local(local) => local.release(&self.tenant),
            Store::Redis(_) => {
                self.quotas.release_later(std::mem::take(&mut self.tenant), std::mem::take(&mut self.request_id));
            }
        }
    }
}

/// The outcome of asking to admit a request.
#[derive(Debug)]
pub enum Decision {
    Admitted(Admission, Running),
    Refused(Admission, Refusal),
    /// The store cannot be reached and the router fails closed.
    StoreDown,
}

impl Quotas {
    pub fn local() -> Arc<Self> {
        Self::with(Store::Local(LocalStore::default()), FailureMode::Closed)
    }

    /// Limits in Redis or Valkey at `url` (`redis://host:6379/0`, `rediss://` for TLS).
    pub fn redis(url: &str, failure: FailureMode, timeout: Duration) -> Result<Arc<Self>, String> {
        let store = RedisStore::new(url, timeout).map_err(|e| format!("quota store {url}: {e}"))?;
        Ok(Self::with(Store::Redis(store), failure))
    }

    fn with(store: Store, failure: FailureMode) -> Arc<Self> {
        Arc::new(Self { store, failure, down: AtomicBool::new(false), epoch: Instant::now() })
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Whether the shared store answered the last time it was asked.
    pub fn store_reachable(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }

    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }

    /// Notes a store call's outcome; logs the start and end of an outage once each.
    fn observe<T>(&self, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    tracing::info!("quota store reachable again; limits are shared again");
                }
                Some(value)
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::SeqCst) {
                    let mode = match self.failure {
                        FailureMode::Open => "serving without limits (fail open)",
                        FailureMode::Closed => "refusing requests of tenants with limits (fail closed)",
                    };
                    tracing::error!(error = %e, "quota store unreachable; {mode} until it is back");
                }
                None
            }
        }
    }

    /// Gives a request's lease back to the shared store, from a task (a drop
    /// cannot wait for it).
    fn release_later(self: &Arc<Self>, tenant: String, id: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let quotas = self.clone();
        runtime.spawn(async move {
            if let Store::Redis(redis) = &quotas.store {
                let result = redis.release(&tenant, &id).await;
                quotas.observe(result.map_err(|e| e.to_string()));
            }
        });
    }

    pub async fn admit(self: &Arc<Self>, tenant: &Tenant, request_id: &str) -> Decision {
        let limits = &tenant.limits;
        let running = |counted| Running {
            quotas: self.clone(),
            tenant: tenant.name.clone(),
            request_id: request_id.to_string(),
            counted,
        };
        if *limits == Default::default() {
            return Decision::Admitted(Admission::default(), running(false));
        }
        let admission = match &self.store {
            Store::Local(local) => local.admit(&tenant.name, limits, self.now()),
            Store::Redis(redis) => {
                let result = redis.admit(&tenant.name, limits, request_id).await.map_err(|e| e.to_string());
                if result.is_err() && limits.concurrent_requests.is_some() {
                    // The script may have run before the answer was lost: give
                    // back the lease it may have taken, best effort.
                    self.release_later(tenant.name.clone(), request_id.to_string());
                }
                match self.observe(result) {
                    Some(admission) => admission,
                    None if self.failure == FailureMode::Open => {
                        return Decision::Admitted(Admission::default(), running(false))
                    }
                    None => return Decision::StoreDown,
                }
            }
        };
        match admission.refusal {
            Some(refusal) => Decision::Refused(admission, refusal),
            None => Decision::Admitted(admission, running(limits.concurrent_requests.is_some())),
        }
    }

    /// Charges the tokens an answer used to its tenant.
    pub async fn charge(&self, tenant: &Tenant, used: u64) {
        if tenant.limits.tokens_per_minute.is_none() || used == 0 {
            return;
        }
        match &self.store {
            Store::Local(local) => local.charge(&tenant.name, &tenant.limits, used, self.now()),
            Store::Redis(redis) => {
                let result = redis.charge(&tenant.name, &tenant.limits, used).await.map_err(|e| e.to_string());
                self.observe(result);
            }
        }
    }

    /// Asks the shared store whether it answers (for `/ready`); the local store always does.
    pub async fn check(&self) -> bool {
        match &self.store {
            Store::Local(_) => true,
            Store::Redis(redis) => self.observe(redis.ping().await.map_err(|e| e.to_string())).is_some(),
        }
    }
}
