//! The router's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStatus {
    pub model: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

/// Per tenant: tenant names are labels (never keys).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModelStatus {
    pub tenant: String,
    pub model: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModelKind {
    pub tenant: String,
    pub model: String,
    /// `prompt`, `cached` (part of prompt) or `completion`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModelLimit {
    pub tenant: String,
    pub model: String,
    /// `requests`, `tokens` or `concurrent_requests`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    pub model: String,
    /// `hit`, `miss`, `overloaded` or `short` (see `balancer::Outcome`).
    pub outcome: &'static str,
}

pub struct RouterMetrics {
    registry: Registry,
    pub requests: Family<ModelStatus, Counter>,
    pub in_flight: Family<ModelLabel, Gauge>,
    pub held: Family<ModelLabel, Gauge>,
    pub hold_seconds: Histogram,
    pub upstream_latency: Histogram,
    pub time_to_first_byte: Histogram,
    pub retries: Counter,
    pub prefix_routing: Family<ModelOutcome, Counter>,
    pub tenant_requests: Family<TenantModelStatus, Counter>,
    pub tenant_tokens: Family<TenantModelKind, Counter>,
    pub tenant_rate_limited: Family<TenantModelLimit, Counter>,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<ModelStatus, Counter>::default();
        registry.register("kandle_router_requests", "Routed requests by model and status", requests.clone());
        let in_flight = Family::<ModelLabel, Gauge>::default();
        registry.register("kandle_router_in_flight", "Requests being proxied, by model", in_flight.clone());
        let held = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "kandle_router_held",
            "Requests held for a pool with no ready worker (scaling from zero, pods starting), by model",
            held.clone(),
        );
        let hold_seconds = Histogram::new(exponential_buckets(0.1, 2.0, 14));
        registry.register(
            "kandle_router_hold_seconds",
            "Time requests were held before their pool had a ready worker",
            hold_seconds.clone(),
        );
        let upstream_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "kandle_router_upstream_latency_seconds",
            "Time until a worker's response headers",
            upstream_latency.clone(),
        );
        let time_to_first_byte = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "kandle_router_time_to_first_byte_seconds",
            "Time until the first body byte of a worker's response",
            time_to_first_byte.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "kandle_router_retries",
            "Requests retried on another worker after a connect failure, a 429 or a 503",
            retries.clone(),
        );
        let prefix_routing = Family::<ModelOutcome, Counter>::default();
        registry.register(
            "kandle_router_prefix_routing",
            "Prefix-aware choices by model and outcome: hit (sent where its prefix was served), miss (no endpoint \
             served it), overloaded (the preferred endpoint was past the load bound), short (under one block)",
            prefix_routing.clone(),
        );
        let tenant_requests = Family::<TenantModelStatus, Counter>::default();
        registry.register(
            "kandle_router_tenant_requests",
            "Requests by tenant, model and status",
            tenant_requests.clone(),
        );
        let tenant_tokens = Family::<TenantModelKind, Counter>::default();
        registry.register(
            "kandle_router_tenant_tokens",
            "Tokens used by tenant and model: prompt, cached (of the prompt) and completion",
            tenant_tokens.clone(),
        );
        let tenant_rate_limited = Family::<TenantModelLimit, Counter>::default();
        registry.register(
            "kandle_router_tenant_rate_limited",
            "Requests refused with 429 by tenant, model and the limit that refused them",
            tenant_rate_limited.clone(),
        );
        Self {
            registry,
            requests,
            in_flight,
            held,
            hold_seconds,
            upstream_latency,
            time_to_first_byte,
            retries,
            prefix_routing,
            tenant_requests,
            tenant_tokens,
            tenant_rate_limited,
        }
    }
}

impl RouterMetrics {
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
