//! The autoscaler against the fake API server and a router's real `/metrics`
//! served on a local port: demand held at a router scales a pool up from zero
//! through the scale subresource, with status and an event; a later round
//! inside the scale-down delay changes nothing.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use super::*;
use crate::fake_api::{self, Recorded};
use crate::rbac;

const NS: &str = "ml";
const OPERATOR_NS: &str = "kandle-system";

fn md(replicas: i32) -> Value {
    json!({
        "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": NS, "uid": "u-1", "generation": 1},
        "spec": {
            "model": "smollm2", "replicas": replicas,
            "source": {"url": "file:///m.gguf"}, "auth": {"disabled": true},
            "scaling": {"minReplicas": 0, "maxReplicas": 3, "targetRequests": 2},
        },
    })
}

fn pod(name: &str, namespace: &str, labels: Value, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    })
}

/// A router's `/metrics` on a local port, answering what `text` holds at the time.
async fn router_metrics(text: Arc<Mutex<String>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = text.lock().expect("lock").clone();
            async move { text }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn config() -> AutoscalerConfig {
    AutoscalerConfig {
        namespace: None,
        router_namespace: OPERATOR_NS.into(),
        router_selector: "app.kubernetes.io/name=kandle-router".into(),
        interval: Duration::from_secs(10),
    }
}

/// The API group, resource and verb of a recorded call, for the RBAC check.
fn access(r: &Recorded) -> (String, String, String) {
    let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts[0] {
        "api" => (String::new(), &parts[2..]),
        _ => (parts[1].to_string(), &parts[3..]),
    };
    let rest = if rest.first() == Some(&"namespaces") { &rest[2..] } else { rest };
    let resource = match rest {
        [kind, _, sub] => format!("{kind}/{sub}"),
        [kind, ..] => kind.to_string(),
        [] => String::new(),
    };
    let verb = match (r.method.as_str(), rest.len()) {
        ("GET", 1) => "list",
        ("GET", _) => "get",
        ("PATCH", _) => "patch",
        ("POST", _) => "create",
        (other, _) => other,
    };
    (group, resource, verb.to_string())
}

#[tokio::test]
async fn held_requests_scale_a_pool_up_from_zero() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Mutex::new(
        "# TYPE kandle_router_held gauge\nkandle_router_held{model=\"smollm2\"} 3\nkandle_router_in_flight{model=\"smollm2\"} 0\n"
            .to_string(),
    ));
    let router_port = router_metrics(metrics.clone()).await;
    let router_pod = pod("router-1", OPERATOR_NS, json!({"app.kubernetes.io/name": "kandle-router"}), router_port);
    // spec.replicas as the API server holds it: what the last scale patch set.
    let replicas = Arc::new(AtomicI32::new(0));
    let stored = replicas.clone();
    let (client, log) = fake_api::client(move |method, path, body| match (method.as_str(), path) {
        ("GET", "/apis/kandle.dev/v1alpha1/modeldeployments") => {
            (200, fake_api::list(&[md(stored.load(Ordering::SeqCst))]))
        }
        ("GET", "/api/v1/namespaces/kandle-system/pods") => (200, fake_api::list(std::slice::from_ref(&router_pod))),
        ("GET", "/api/v1/pods") => (200, fake_api::list(&[])),
        ("PATCH", "/apis/kandle.dev/v1alpha1/namespaces/ml/modeldeployments/chat/scale") => {
            stored.store(body["spec"]["replicas"].as_i64().unwrap_or(-1) as i32, Ordering::SeqCst);
            (
                200,
                json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "chat", "namespace": NS},
                       "spec": body["spec"], "status": {"replicas": 0}}),
            )
        }
        ("PATCH", "/apis/kandle.dev/v1alpha1/namespaces/ml/modeldeployments/chat/status") => (200, md(2)),
        ("POST", "/apis/events.k8s.io/v1/namespaces/ml/events") => (201, body.clone()),
        _ => (404, json!({"kind": "Status", "code": 404})),
    });
    let config = config();
    let events = EventPublisher::new(client.clone(), crate::FIELD_MANAGER.into(), "test".into());
    let mut scaler = Autoscaler::new(client, config, events);
    let t0 = Instant::now();
    scaler.tick(t0).await.expect("round");

    let calls = log.lock().expect("log").clone();
    let scale = calls.iter().find(|r| r.path.ends_with("/scale")).expect("the scale subresource is patched");
    assert_eq!(scale.method, Method::PATCH);
    assert_eq!(scale.body, json!({"spec": {"replicas": 2}}), "3 held, 2 per worker");
    let status = calls.iter().find(|r| r.path.ends_with("/status")).expect("status is written");
    assert!(status.query.contains("fieldManager=kandle-operator-autoscaler"), "{}", status.query);
    let scaling = &status.body["status"]["scaling"];
    assert_eq!(scaling["reason"], "ScaledUp");
    assert_eq!(scaling["desiredReplicas"], 2);
    assert_eq!(scaling["message"], "0→2: 0 requests in flight and 3 held, target 2 per worker");
    let event = calls.iter().find(|r| r.path.ends_with("/events")).expect("an event");
    assert_eq!(event.body["reason"], "ScaledUp");
    assert_eq!(event.body["regarding"]["name"], "chat");
    let selector = calls.iter().find(|r| r.path == "/api/v1/pods").map(|r| r.query.clone()).unwrap_or_default();
    assert!(selector.contains("kandle-worker"), "only worker pods are listed: {selector}");

    // Every call is one the chart's RBAC allows.
    let mut rules = rbac::controller_rules();
    rules.extend(rbac::leader_election_rules());
    for call in &calls {
        let (group, resource, verb) = access(call);
        assert!(rbac::allows(&rules, &group, &resource, &verb), "RBAC does not allow {verb} {group}/{resource}");
    }

    // The pool now runs 2 and the demand is gone: nothing shrinks before the
    // scale-down delay.
    assert_eq!(replicas.load(Ordering::SeqCst), 2);
    *metrics.lock().expect("lock") = "kandle_router_held{model=\"smollm2\"} 0\n".into();
    let before = log.lock().expect("log").len();
    scaler.tick(t0 + Duration::from_secs(60)).await.expect("round");
    let after = log.lock().expect("log").clone();
    assert!(after[before..].iter().all(|r| r.method == Method::GET), "no change within the delay");
}

#[tokio::test]
async fn a_request_held_for_a_pool_at_zero_is_seen_between_rounds() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Mutex::new("kandle_router_held{model=\"smollm2\"} 0\n".to_string()));
    let router_port = router_metrics(metrics.clone()).await;
    let router_pod = pod("router-1", OPERATOR_NS, json!({"app.kubernetes.io/name": "kandle-router"}), router_port);
    let (client, log) = fake_api::client(move |method, path, _| match (method.as_str(), path) {
        ("GET", "/apis/kandle.dev/v1alpha1/modeldeployments") => (200, fake_api::list(&[md(0)])),
        ("GET", "/api/v1/namespaces/kandle-system/pods") => (200, fake_api::list(std::slice::from_ref(&router_pod))),
        ("GET", "/api/v1/pods") => (200, fake_api::list(&[])),
        _ => (404, json!({"kind": "Status", "code": 404})),
    });
    let config = config();
    let events = EventPublisher::new(client.clone(), crate::FIELD_MANAGER.into(), "test".into());
    let mut scaler = Autoscaler::new(client, config, events);
    assert!(!scaler.held_at_zero().await, "nothing known before a first round");
    scaler.tick(Instant::now()).await.expect("round");
    assert!(!scaler.held_at_zero().await, "at zero, nothing held");
    let calls = log.lock().expect("log").len();
    *metrics.lock().expect("lock") = "kandle_router_held{model=\"smollm2\"} 1\n".into();
    assert!(scaler.held_at_zero().await, "a held request wakes the scaler");
    assert_eq!(log.lock().expect("log").len(), calls, "the check asks only the routers, not the API server");
}
