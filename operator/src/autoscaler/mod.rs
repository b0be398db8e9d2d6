//! The autoscaler of pools with `spec.scaling`: every interval it reads each
//! pool's demand from the `/metrics` of every router (requests in flight and
//! held, per model) and every worker (running and waiting), decides the replica
//! count with a pure function ([`decide`]), and sets it through the
//! ModelDeployment's scale subresource, as any Kubernetes autoscaler does; the
//! reconciler then resizes the Deployment. `status.scaling` and an event say why.
//! It runs only on the leader, beside the reconciler.

pub mod decide;
pub mod lines;
pub mod signals;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::api::{Checked, ModelDeployment, ScalingStatus};
use crate::controller::events::{EventPublisher, EventType};
use crate::{labels, Result, WORKER_PORT};
use decide::{decide, Change, Decision, History, Policy};
use signals::RouterLoad;

/// Field manager of `status.scaling` (the reconciler owns the rest of status).
pub const FIELD_MANAGER: &str = "kandle-operator-autoscaler";
/// Time one pod has to answer `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the routers are asked whether they hold requests for a pool at
/// zero (their `/metrics` only: no API call).
const WAKE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AutoscalerConfig {
    /// Pools in this namespace, or in all of them.
    pub namespace: Option<String>,
    /// Where the router pods run (the operator's namespace), and their labels.
    pub router_namespace: String,
    pub router_selector: String,
    /// Time between two decisions.
    pub interval: Duration,
}

/// Runs until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    config: AutoscalerConfig,
    events: EventPublisher,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut scaler = Autoscaler::new(client, config.clone(), events);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wake = tokio::time::interval(WAKE_INTERVAL);
    wake.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let round = tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => true,
            // A request held for a pool at zero starts a round at once rather
            // than at the next interval: it waits for the pool's cold start only.
            _ = wake.tick() => scaler.held_at_zero().await,
        };
        if round {
            if let Err(e) = scaler.tick(Instant::now()).await {
                tracing::warn!(error = crate::telemetry::short(&e.to_string()), "autoscaler round failed");
            }
        }
    }
}

pub struct Autoscaler {
    client: kube::Client,
    config: AutoscalerConfig,
    events: EventPublisher,
    http: reqwest::Client,
    /// Per pool (`namespace/name`), the demand seen in earlier rounds.
    histories: HashMap<String, History>,
    /// Served models of the pools with scaling that the last round left at zero.
    at_zero: HashSet<String>,
    /// The routers' `/metrics` as the last round listed them.
    router_urls: Vec<String>,
}

impl Autoscaler {
    pub fn new(client: kube::Client, config: AutoscalerConfig, events: EventPublisher) -> Self {
        Self {
            client,
            config,
            events,
            http: reqwest::Client::new(),
            histories: HashMap::new(),
            at_zero: HashSet::new(),
            router_urls: Vec::new(),
        }
    }

    /// Whether a router holds requests for a pool the last round left at zero.
    pub async fn held_at_zero(&self) -> bool {
        if self.at_zero.is_empty() {
            return false;
        }
        let by_model = self.scrape_routers().await;
        self.at_zero.iter().any(|model| by_model.get(model).is_some_and(|load| load.held > 0))
    }

    /// One round: observe every pool with scaling, decide, apply the changes.
    pub async fn tick(&mut self, now: Instant) -> Result<()> {
        let mds: Api<Checked<ModelDeployment>> = match &self.config.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let scaled: Vec<ModelDeployment> = mds
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|o| o.0.ok())
            .filter(|md| md.spec.scaling.is_some())
            .collect();
        self.histories.retain(|key, _| scaled.iter().any(|md| pool_key(md) == *key));
        self.at_zero.clear();
        if scaled.is_empty() {
            return Ok(());
        }
        let routers = self.router_loads().await?;
        let workers = self.worker_loads().await?;
        for md in &scaled {
            let Some(scaling) = &md.spec.scaling else { continue };
            let key = pool_key(md);
            let policy = match Policy::of(scaling) {
                Ok(policy) => policy,
                Err(e) => {
                    tracing::warn!(pool = %key, "cannot scale: {e}");
                    continue;
                }
            };
            let demand = signals::demand(
                routers.get(&md.served_model()).copied().unwrap_or_default(),
                workers.get(&key).copied().unwrap_or(0),
            );
            let current = u32::try_from(md.spec.replicas).unwrap_or(0);
            let decision = decide(&policy, current, demand, self.histories.entry(key.clone()).or_default(), now);
            let after = if decision.change == Change::None {
                current
            } else {
                match self.apply(md, &decision).await {
                    Ok(()) => decision.replicas,
                    Err(e) => {
                        tracing::warn!(pool = %key, error = %e, "cannot scale");
                        current
                    }
                }
            };
            if after == 0 {
                self.at_zero.insert(md.served_model());
            }
        }
        Ok(())
    }

    /// Sets the replica count through the scale subresource; then status and an event.
    async fn apply(&self, md: &ModelDeployment, decision: &Decision) -> Result<()> {
        let (namespace, name) = (md.namespace().unwrap_or_default(), md.name_any());
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &namespace);
        let replicas = i32::try_from(decision.replicas).unwrap_or(i32::MAX);
        api.patch_scale(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": replicas}}))).await?;
        tracing::info!(pool = %format!("{namespace}/{name}"), reason = decision.reason(), "{decision}");
        let status = ScalingStatus {
            desired_replicas: replicas,
            last_scale_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            reason: decision.reason().to_string(),
            message: decision.to_string(),
        };
        let patch = json!({
            "apiVersion": ModelDeployment::api_version(&()),
            "kind": ModelDeployment::kind(&()),
            "status": {"scaling": status},
        });
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        let regarding = crate::controller::events::regarding(&md.metadata);
        if let Err(e) =
            self.events.publish(&regarding, EventType::Normal, decision.reason(), &decision.to_string()).await
        {
            tracing::warn!(error = %e, "cannot publish event");
        }
        Ok(())
    }

    /// Every router's report, added up per served model (the routers' URLs are kept for [`Self::held_at_zero`]).
    async fn router_loads(&mut self) -> Result<HashMap<String, RouterLoad>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.config.router_namespace);
        let listed = pods.list(&ListParams::default().labels(&self.config.router_selector)).await?.items;
        self.router_urls = listed.iter().filter_map(metrics_url).collect();
        Ok(self.scrape_routers().await)
    }

    /// The `/metrics` of the routers last listed, added up per served model.
    async fn scrape_routers(&self) -> HashMap<String, RouterLoad> {
        let mut by_model = HashMap::new();
        for text in join_all(self.router_urls.iter().map(|url| self.scrape(url.clone()))).await.into_iter().flatten() {
            signals::add_router(&signals::parse(&text), &mut by_model);
        }
        by_model
    }

    /// Every worker's running and waiting requests, added up per pool.
    async fn worker_loads(&self) -> Result<HashMap<String, u32>> {
        let pods: Api<Pod> = match &self.config.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let selector = format!("{}={},{}={}", labels::MANAGED_BY, labels::MANAGER, labels::NAME, labels::WORKER);
        let listed = pods.list(&ListParams::default().labels(&selector)).await?.items;
        let scrapes = listed.iter().filter_map(|pod| {
            let pool = format!("{}/{}", pod.namespace()?, pod.labels().get(labels::INSTANCE)?);
            Some((pool, metrics_url(pod)?))
        });
        let (pools, urls): (Vec<String>, Vec<String>) = scrapes.unzip();
        let texts = join_all(urls.into_iter().map(|url| self.scrape(url))).await;
        let mut by_pool = HashMap::new();
        for (pool, text) in pools.into_iter().zip(texts) {
            let load = text.map_or(0, |t| signals::worker_load(&signals::parse(&t)));
            let total: &mut u32 = by_pool.entry(pool).or_default();
            *total = total.saturating_add(load);
        }
        Ok(by_pool)
    }

    async fn scrape(&self, url: String) -> Option<String> {
        let answer = self.http.get(&url).timeout(SCRAPE_TIMEOUT).send().await;
        match answer {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            Ok(r) => {
                tracing::debug!(%url, status = %r.status(), "metrics scrape refused");
                None
            }
            Err(e) => {
                tracing::debug!(%url, error = %e, "metrics scrape failed");
                None
            }
        }
    }
}

fn pool_key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// `http://<pod IP>:<port named http>/metrics` of a running pod.
fn metrics_url(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref()?;
    let port = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .map_or(WORKER_PORT, |p| p.container_port);
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
    Some(format!("http://{host}:{port}/metrics"))
}

#[cfg(test)]
mod tests;
