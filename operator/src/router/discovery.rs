//! Discovery in Kubernetes: ModelDeployments name the pools, the EndpointSlices of
//! their Services list the ready workers.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use super::table::{PoolSpec, Routes};
use crate::api::{Checked, ModelDeployment};
use crate::labels;

/// Label Kubernetes puts on an EndpointSlice naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label Kubernetes puts on the EndpointSlices it makes for Services with a selector.
const SLICE_MANAGER: (&str, &str) = ("endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io");

/// Which EndpointSlices discovery reads: only those of kandle's worker Services.
/// The EndpointSlice controller copies a Service's labels onto its slices, and
/// the controller labels every worker Service with these.
pub fn slice_selector() -> String {
    [(labels::MANAGED_BY, labels::MANAGER), (labels::NAME, labels::WORKER), SLICE_MANAGER]
        .map(|(key, value)| format!("{key}={value}"))
        .join(",")
}

/// The pools: one per ModelDeployment that decodes, its endpoints the ready
/// addresses of the slices of its Service (named like it). The oldest
/// ModelDeployment keeps a contested name, as the controller decides.
pub fn pools(mds: &[Arc<Checked<ModelDeployment>>], slices: &[Arc<EndpointSlice>]) -> Vec<PoolSpec> {
    let mut mds: Vec<&ModelDeployment> = mds.iter().filter_map(|md| md.valid()).collect();
    mds.sort_by_key(|md| (md.metadata.creation_timestamp.clone().map(|t| t.0), md.namespace(), md.name_any()));
    mds.into_iter()
        .map(|md| {
            let (namespace, name) = (md.namespace(), md.name_any());
            let endpoints = slices
                .iter()
                .filter(|s| s.namespace() == namespace)
                .filter(|s| s.labels().get(SERVICE_NAME_LABEL) == Some(&name))
                .flat_map(|s| ready_urls(s))
                .collect();
            PoolSpec {
                model: md.served_model(),
                aliases: md.spec.aliases.clone(),
                endpoints,
                can_come_up: md.can_come_up(),
            }
        })
        .collect()
}

fn ready_urls(slice: &EndpointSlice) -> Vec<String> {
    let port = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .or_else(|| slice.ports.iter().flatten().next())
        .and_then(|p| p.port);
    let Some(port) = port else { return Vec::new() };
    let ipv6 = slice.address_type == "IPv6";
    slice
        .endpoints
        .iter()
        // An endpoint without a ready condition counts as ready (the API's rule).
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.addresses.first())
        .map(|a| if ipv6 { format!("http://[{a}]:{port}") } else { format!("http://{a}:{port}") })
        .collect()
}

/// Watches both kinds and rebuilds the table on every change. `synced` is
/// notified once both have listed everything. ModelDeployments are read as
/// [`Checked`]: one that does not decode is left out of the table (the
/// controller reports it on the object) instead of failing the whole list.
pub async fn run(client: kube::Client, namespace: Option<String>, routes: Arc<Routes>, synced: Arc<Notify>) {
    let (mds, slices): (Api<Checked<ModelDeployment>>, Api<EndpointSlice>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (md_store, md_writer) = reflector::store();
    let (slice_store, slice_writer) = reflector::store();
    let slice_config = watcher::Config::default().labels(&slice_selector());
    let md_events =
        reflector::reflector(md_writer, watcher(mds, watcher::Config::default())).default_backoff().touched_objects();
    let slice_events =
        reflector::reflector(slice_writer, watcher(slices, slice_config)).default_backoff().touched_objects();
    let mut changes =
        std::pin::pin!(futures::stream::select(md_events.map(|r| r.map(|_| ())), slice_events.map(|r| r.map(|_| ()))));
    let refresh = |md_store: &Store<Checked<ModelDeployment>>, slice_store: &Store<EndpointSlice>| {
        routes.update(pools(&md_store.state(), &slice_store.state()));
    };
    let waiting = {
        let (m, s) = (md_store.clone(), slice_store.clone());
        async move {
            let _ = m.wait_until_ready().await;
            let _ = s.wait_until_ready().await;
        }
    };
    tokio::pin!(waiting);
    let mut is_synced = false;
    loop {
        tokio::select! {
            () = &mut waiting, if !is_synced => {
                is_synced = true;
                refresh(&md_store, &slice_store);
                synced.notify_waiters();
                tracing::info!("route discovery synced");
            }
            change = changes.next() => match change {
                Some(Ok(())) => if is_synced { refresh(&md_store, &slice_store) },
                Some(Err(e)) => tracing::warn!(error = crate::telemetry::short(&e.to_string()), "discovery watch error"),
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn md_json(name: &str, created: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created},
            "spec": spec,
        })
    }

    fn md(name: &str, created: &str, spec: serde_json::Value) -> Arc<Checked<ModelDeployment>> {
        Arc::new(serde_json::from_value(md_json(name, created, spec)).expect("md"))
    }

    fn slice(service: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{service}-abc"), "namespace": "ml",
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .expect("slice"),
        )
    }

    fn spec(model: serde_json::Value) -> serde_json::Value {
        json!({"model": model, "aliases": ["gpt-4o-mini"], "source": {"url": "file:///m"}, "auth": {"disabled": true}})
    }

    #[test]
    fn model_deployments_and_slices_become_pools_of_ready_endpoints() {
        let mds = vec![md("chat", "2026-01-01T00:00:00Z", spec(json!("smollm2")))];
        let slices = vec![
            slice(
                "chat",
                json!([
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.3"]},
                ]),
            ),
            slice("other", json!([{"addresses": ["10.0.9.9"], "conditions": {"ready": true}}])),
        ];
        let pools = pools(&mds, &slices);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].model, "smollm2");
        assert_eq!(pools[0].aliases, ["gpt-4o-mini"]);
        assert_eq!(pools[0].endpoints, ["http://10.0.0.1:8080", "http://10.0.0.3:8080"]);
    }

    /// Discovery against a list holding an object that does not decode: the
    /// others are still routed.
    #[tokio::test]
    async fn one_undecodable_object_does_not_stop_routing() {
        use crate::fake_api;
        let good = md_json("chat", "2026-01-01T00:00:00Z", spec(json!("smollm2")));
        let mut bad = md_json("broken", "2026-01-01T00:00:00Z", spec(json!("other")));
        bad["spec"]["replicas"] = json!("two");
        let chat_slice = serde_json::to_value(
            slice("chat", json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}])).as_ref(),
        )
        .expect("json");
        let (client, log) = fake_api::client(move |method, path, _| match (method.as_str(), path) {
            ("GET", "/apis/kandle.dev/v1alpha1/modeldeployments") => {
                (200, fake_api::list(&[good.clone(), bad.clone()]))
            }
            ("GET", "/apis/discovery.k8s.io/v1/endpointslices") => {
                (200, fake_api::list(std::slice::from_ref(&chat_slice)))
            }
            _ => (404, json!({"kind": "Status", "code": 404})),
        });
        let routes = Arc::new(Routes::default());
        let synced = Arc::new(Notify::new());
        let notified = synced.clone().notified_owned();
        let task = tokio::spawn(run(client, None, routes.clone(), synced));
        tokio::time::timeout(std::time::Duration::from_secs(5), notified).await.expect("discovery syncs");
        let table = routes.current();
        let pool = table.lookup("smollm2").expect("the valid object is routed");
        assert_eq!(pool.endpoints[0].url, "http://10.0.0.1:8080");
        assert!(table.lookup("other").is_none(), "the undecodable one is left out");
        // Only kandle's worker slices are asked for, not every slice in the cluster.
        let listed = fake_api::wait_for(&log, "the slice list", |r| r.path.ends_with("/endpointslices")).await;
        let url = reqwest::Url::parse(&format!("http://api{}?{}", listed.path, listed.query)).expect("url");
        let selector = url.query_pairs().find(|(k, _)| k == "labelSelector").map(|(_, v)| v.into_owned());
        assert_eq!(selector, Some(slice_selector()));
        task.abort();
    }

    #[test]
    fn the_slice_selector_matches_the_slices_of_worker_services() {
        // What Kubernetes puts on the slices of a worker Service: the Service's
        // labels, its name, and the slice controller's own label.
        let service = crate::controller::build::child_labels("chat");
        let mut slice_labels: Vec<(String, String)> = service.into_iter().collect();
        slice_labels.push((SERVICE_NAME_LABEL.into(), "chat".into()));
        slice_labels.push((SLICE_MANAGER.0.into(), SLICE_MANAGER.1.into()));
        let selector = slice_selector();
        for requirement in selector.split(',') {
            let (key, value) = requirement.split_once('=').expect("key=value");
            assert!(slice_labels.iter().any(|(k, v)| k == key && v == value), "{requirement} is on no worker slice");
        }
        assert!(selector.contains("app.kubernetes.io/managed-by=kandle"), "{selector}");
    }

    #[test]
    fn a_pool_can_come_up_unless_fixed_at_zero_or_degraded() {
        let with = |changes: serde_json::Value, status: serde_json::Value| {
            let mut spec = spec(json!("m"));
            for (k, v) in changes.as_object().into_iter().flatten() {
                spec[k] = v.clone();
            }
            let mut object = md_json("chat", "2026-01-01T00:00:00Z", spec);
            object["status"] = status;
            let md: Arc<Checked<ModelDeployment>> = Arc::new(serde_json::from_value(object).expect("md"));
            pools(&[md], &[])[0].can_come_up
        };
        let degraded = json!({"conditions": [{"type": "Degraded", "status": "True", "reason": "SecretNotFound",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        assert!(with(json!({}), json!({})), "replicas 1, pods starting");
        assert!(!with(json!({"replicas": 0}), json!({})), "fixed at zero");
        assert!(
            with(json!({"replicas": 0, "scaling": {"minReplicas": 0, "maxReplicas": 2}}), json!({})),
            "at zero, scales"
        );
        assert!(!with(json!({}), degraded), "degraded");
    }

    #[test]
    fn pools_default_to_the_object_name_and_the_oldest_is_first() {
        let mds = vec![
            md("newer", "2026-03-01T00:00:00Z", spec(json!(null))),
            md("older", "2026-01-01T00:00:00Z", spec(json!(null))),
        ];
        let names: Vec<String> = pools(&mds, &[]).into_iter().map(|p| p.model).collect();
        assert_eq!(names, ["older", "newer"]);
        let undecodable = Arc::new(Checked(Err(crate::api::Undecodable {
            metadata: Default::default(),
            error: "spec.replicas: invalid type".into(),
            status: None,
        })));
        assert_eq!(pools(&[undecodable], &[]), []);
    }
}
