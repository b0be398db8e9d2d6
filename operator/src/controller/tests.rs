//! Reconciler tests against a mocked API server (tower-test): each scenario
//! asserts the method, path, field manager and body of every call the controller
//! makes, answers it, and fails when an expected call never comes. Every call is
//! also checked against the RBAC rules the chart grants.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::{json, Value};

use super::backoff::Backoff;
use super::build::BuildSettings;
use super::events::EventPublisher;
use super::{reconcile, Context};
use crate::api::{Checked, ModelDeployment, ModelDeploymentStatus, ModelInfo};
use crate::rbac;
use crate::telemetry::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "models";
const TIMEOUT: Duration = Duration::from_secs(5);

fn md(name: &str, uid: &str, created: &str, spec: Value) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "kandle.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "generation": 1, "creationTimestamp": created},
        "spec": spec,
    }))
    .expect("valid ModelDeployment")
}

fn smollm2_spec() -> Value {
    json!({
        "model": "smollm2",
        "source": {"url": "pvc://models/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "auth": {"apiKeySecretRef": {"name": "llm-keys"}},
    })
}

/// One expected request: what it must be, and how to answer it.
struct Call {
    method: Method,
    path: &'static str,
    status: u16,
    reply: Value,
}

impl Call {
    fn new(method: Method, path: &'static str, status: u16, reply: Value) -> Self {
        Self { method, path, status, reply }
    }
}

/// A recorded request.
#[derive(Debug)]
struct Seen {
    path: String,
    body: Value,
}

/// The API group and resource of a path, for the RBAC check.
fn group_resource(path: &str) -> (String, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => panic!("unexpected path {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let resource = match rest {
        [resource, _name, sub] => format!("{resource}/{sub}"),
        [resource, ..] => resource.to_string(),
        [] => panic!("no resource in {path}"),
    };
    (group, resource)
}

fn verb(method: &Method, path: &str) -> &'static str {
    // Core paths are /api/v1/..., others /apis/group/version/...: after that, an
    // optional namespaces/NS, then the resource and, for one object, its name.
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] | ["apis", _, _version, rest @ ..] => rest,
        _ => panic!("unexpected path {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let named = rest.len() >= 2;
    match *method {
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PATCH => "patch",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => panic!("unexpected method {method}"),
    }
}

/// Answers the expected calls in order and returns what was sent.
async fn serve(mut handle: Handle, calls: Vec<Call>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for call in calls {
        let (request, send) = handle.next_request().await.expect("the controller stopped calling the API");
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        assert_eq!((&method, path.as_str()), (&call.method, call.path), "unexpected call (query {query})");
        let (group, resource) = group_resource(&path);
        let v = verb(&method, &path);
        assert!(
            rbac::allows(&[rbac::controller_rules(), rbac::gateway_rules()].concat(), &group, &resource, v),
            "RBAC does not allow {v} on {group}/{resource}"
        );
        if method == Method::PATCH {
            assert!(query.contains("fieldManager=kandle-operator"), "{path}: {query}");
            assert!(query.contains("force=true"), "{path}: {query}");
        }
        let bytes = request.into_body().collect_bytes().await.expect("request body");
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
        let response = Response::builder()
            .status(call.status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&call.reply).expect("reply")))
            .expect("response");
        send.send_response(response);
        seen.push(Seen { path, body });
    }
    seen
}

fn context(handle_client: kube::Client, others: &[ModelDeployment]) -> Arc<Context> {
    let (store, mut writer) = reflector::store::<Checked<ModelDeployment>>();
    for o in others {
        writer.apply_watcher_event(&watcher::Event::Apply(Checked(Ok(o.clone()))));
    }
    Arc::new(Context {
        client: handle_client.clone(),
        settings: BuildSettings::default(),
        events: EventPublisher::new(handle_client, "kandle-operator".into(), "test".into()),
        metrics: Arc::new(Metrics::default()),
        store,
        backoff: Backoff::default(),
        model_probe: Arc::new(|endpoint: String| {
            Box::pin(async move {
                assert_eq!(endpoint, "http://smollm2.models.svc.cluster.local:8080");
                Some(ModelInfo {
                    architecture: "llama".into(),
                    quantization: "Q4_1".into(),
                    context_length: 4096,
                    parameters: 134_515_008,
                })
            })
        }),
    })
}

/// Runs one reconcile against the scripted API server.
async fn run(md: ModelDeployment, others: &[ModelDeployment], calls: Vec<Call>) -> Vec<Seen> {
    let (seen, result) = try_run(Checked(Ok(md)), others, calls).await;
    result.expect("reconcile succeeds");
    seen
}

/// Runs one reconcile of any object, successful or not.
async fn try_run(
    object: Checked<ModelDeployment>,
    others: &[ModelDeployment],
    calls: Vec<Call>,
) -> (Vec<Seen>, crate::Result<kube::runtime::controller::Action>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let ctx = context(client, others);
    let expected = calls.len();
    let server = tokio::spawn(serve(handle, calls));
    let result = tokio::time::timeout(TIMEOUT, reconcile(Arc::new(object), ctx))
        .await
        .expect("reconcile timed out waiting for an unexpected call");
    let seen = tokio::time::timeout(TIMEOUT, server).await.expect("expected calls never came").expect("server task");
    assert_eq!(seen.len(), expected);
    (seen, result)
}

fn secret_meta() -> Value {
    json!({"apiVersion": "v1", "kind": "PartialObjectMetadata", "metadata": {"name": "llm-keys", "namespace": NS}})
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// A minimal object as the API server would return it.
fn bare(api_version: &str, kind: &str, name: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": NS}})
}

/// A successful round for the single-replica `smollm2`: the Secret check, the
/// children (the Deployment answered with `deployment`), then, when the status
/// changes, its patch and `events` events.
fn applied_round(deployment: Value, events_published: usize) -> Vec<Call> {
    let mut calls = vec![
        Call::new(Method::GET, SECRET, 200, secret_meta()),
        Call::new(Method::PATCH, DEPLOYMENT, 200, deployment),
        Call::new(Method::PATCH, SERVICE, 200, bare("v1", "Service", "smollm2")),
        Call::new(Method::DELETE, PDB, 404, not_found()),
    ];
    if events_published > 0 {
        calls.push(Call::new(Method::PATCH, STATUS, 200, stored("smollm2")));
        calls.extend(events(events_published));
    }
    calls
}

/// The applied Deployment echoed back with a status.
fn deployment_with(seen_body: &Value, status: Value) -> Value {
    let mut d = seen_body.clone();
    d["metadata"]["generation"] = json!(1);
    d["status"] = status;
    d
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

const SECRET: &str = "/api/v1/namespaces/models/secrets/llm-keys";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/models/deployments/smollm2";
const SERVICE: &str = "/api/v1/namespaces/models/services/smollm2";
const PDB: &str = "/apis/policy/v1/namespaces/models/poddisruptionbudgets/smollm2";
const STATUS: &str = "/apis/kandle.dev/v1alpha1/namespaces/models/modeldeployments/smollm2/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/models/events";
const INFERENCE_POOL: &str = "/apis/inference.networking.k8s.io/v1/namespaces/models/inferencepools/smollm2";

fn event_reply() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": NS},
           "eventTime": "2026-01-01T00:00:00.000000Z"})
}

fn events(n: usize) -> Vec<Call> {
    (0..n).map(|_| Call::new(Method::POST, EVENTS, 201, event_reply())).collect()
}

/// The API server's answer to a status patch: the object as stored.
fn stored(name: &str) -> Value {
    json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": name, "namespace": NS},
           "spec": {"source": {"url": "file:///m"}, "auth": {"disabled": true}}})
}

#[tokio::test]
async fn create_applies_children_with_owner_references_and_reports_progress() {
    let mut spec = smollm2_spec();
    spec["replicas"] = json!(2);
    let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", spec);
    let mut calls = vec![
        Call::new(Method::GET, SECRET, 200, secret_meta()),
        Call::new(
            Method::PATCH,
            DEPLOYMENT,
            200,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "smollm2"}}),
        ),
        Call::new(
            Method::PATCH,
            SERVICE,
            200,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "smollm2"}}),
        ),
        Call::new(
            Method::PATCH,
            PDB,
            200,
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "smollm2"}}),
        ),
        Call::new(Method::PATCH, STATUS, 200, stored("smollm2")),
    ];
    calls.extend(events(3));
    let seen = run(target, &[], calls).await;

    for child in &seen[1..4] {
        let owners = child.body["metadata"]["ownerReferences"].as_array().expect("owner references");
        assert_eq!(owners.len(), 1, "{}", child.path);
        assert_eq!(owners[0]["kind"], "ModelDeployment");
        assert_eq!(owners[0]["uid"], "uid-1");
        assert_eq!(owners[0]["controller"], true);
        assert_eq!(child.body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "kandle");
    }
    assert_eq!(seen[1].body["spec"]["replicas"], 2);
    let status = &seen[4].body;
    assert_eq!(status["status"]["phase"], "Progressing");
    assert_eq!(status["status"]["ready"], "0/2");
    assert_eq!(status["status"]["servedModel"], "smollm2");
    assert_eq!(status["status"]["endpoint"], "http://smollm2.models.svc.cluster.local:8080");
    assert_eq!(condition(status, "Progressing")["status"], "True");
    assert_eq!(condition(status, "Degraded")["status"], "False");
    let reasons: Vec<&str> = seen[5..].iter().map(|e| e.body["reason"].as_str().unwrap_or("")).collect();
    assert_eq!(reasons, vec!["NoReadyWorkers", "Rollout", "AsExpected"]);
    assert_eq!(seen[5].body["type"], "Warning");
}

#[tokio::test]
async fn status_follows_deployment_readiness_and_is_not_rewritten_when_unchanged() {
    let mut target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", smollm2_spec());
    let ready = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1});
    let applied = deployment_with(&bare("apps/v1", "Deployment", "smollm2"), ready);
    let seen = run(target.clone(), &[], applied_round(applied.clone(), 3)).await;
    let status = &seen[4].body;
    assert_eq!(status["status"]["phase"], "Ready");
    assert_eq!(status["status"]["readyReplicas"], 1);
    assert_eq!(condition(status, "Ready")["reason"], "Available");
    assert_eq!(status["status"]["model"]["architecture"], "llama");
    assert_eq!(status["status"]["model"]["contextLength"], 4096);

    // The same observation again: no status write, no events.
    target.status = Some(serde_json::from_value::<ModelDeploymentStatus>(status["status"].clone()).expect("status"));
    run(target, &[], applied_round(applied, 0)).await;
}

#[tokio::test]
async fn spec_update_rolls_the_deployment() {
    let apply_once = |spec: Value| async move {
        let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", spec);
        run(target, &[], applied_round(bare("apps/v1", "Deployment", "smollm2"), 3)).await.swap_remove(1).body
    };
    let before = apply_once(smollm2_spec()).await;
    let mut changed = smollm2_spec();
    changed["engine"] = json!({"maxBatchSize": 16});
    let after = apply_once(changed).await;
    let template = |d: &Value| d["spec"]["template"].clone();
    assert_ne!(template(&before), template(&after), "a spec change must change the pod template");
    let args = after["spec"]["template"]["spec"]["containers"][0]["args"].as_array().expect("args").clone();
    let at = args.iter().position(|a| a == "--max-batch-size").expect("flag");
    assert_eq!(args[at + 1], "16");
}

#[tokio::test]
async fn missing_secret_degrades_then_recovers_when_it_appears() {
    let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", smollm2_spec());
    let mut calls = vec![
        Call::new(Method::GET, SECRET, 404, not_found()),
        Call::new(Method::PATCH, STATUS, 200, stored("smollm2")),
    ];
    calls.extend(events(1));
    let seen = run(target.clone(), &[], calls).await;
    let status = &seen[1].body;
    assert_eq!(status["status"]["phase"], "Degraded");
    let degraded = condition(status, "Degraded");
    assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("SecretNotFound")));
    assert!(degraded["message"].as_str().unwrap_or("").contains("llm-keys"));

    // The Secret appears.
    let mut recovering = target;
    recovering.status = Some(serde_json::from_value(status["status"].clone()).expect("status"));
    let seen = run(recovering, &[], applied_round(bare("apps/v1", "Deployment", "smollm2"), 3)).await;
    let status = &seen[4].body;
    assert_eq!(condition(status, "Degraded")["status"], "False");
    assert_eq!(status["status"]["phase"], "Progressing");
}

#[tokio::test]
async fn second_claim_on_a_model_name_is_degraded_and_creates_nothing() {
    let older = md(
        "first",
        "uid-a",
        "2026-01-01T00:00:00Z",
        json!({
            "model": "other", "aliases": ["smollm2"],
            "source": {"url": "file:///models/a.gguf"}, "auth": {"disabled": true},
        }),
    );
    let newer = md("smollm2", "uid-b", "2026-02-01T00:00:00Z", smollm2_spec());
    let mut calls = vec![
        Call::new(Method::GET, SECRET, 200, secret_meta()),
        Call::new(Method::PATCH, STATUS, 200, stored("smollm2")),
    ];
    calls.extend(events(1));
    let seen = run(newer, std::slice::from_ref(&older), calls).await;
    let degraded = condition(&seen[1].body, "Degraded");
    assert_eq!(degraded["reason"], "ModelNameConflict");
    assert!(degraded["message"].as_str().unwrap_or("").contains("models/first"));

    // The older one keeps the name.
    let seen = run(older, &[md("smollm2", "uid-b", "2026-02-01T00:00:00Z", smollm2_spec())], {
        let mut calls = vec![
            Call::new(
                Method::PATCH,
                "/apis/apps/v1/namespaces/models/deployments/first",
                200,
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "first"}}),
            ),
            Call::new(
                Method::PATCH,
                "/api/v1/namespaces/models/services/first",
                200,
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "first"}}),
            ),
            Call::new(Method::DELETE, "/apis/policy/v1/namespaces/models/poddisruptionbudgets/first", 404, not_found()),
            Call::new(
                Method::PATCH,
                "/apis/kandle.dev/v1alpha1/namespaces/models/modeldeployments/first/status",
                200,
                stored("first"),
            ),
        ];
        calls.extend(events(3));
        calls
    })
    .await;
    assert_eq!(condition(&seen[3].body, "Degraded")["status"], "False");
}

#[tokio::test]
async fn remote_sources_are_applied_with_a_fetching_init_container() {
    let mut spec = smollm2_spec();
    spec["source"] = json!({"url": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"});
    let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", spec);
    let seen = run(target, &[], applied_round(bare("apps/v1", "Deployment", "smollm2"), 3)).await;
    let init = &seen[1].body["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["args"][0], "fetch");
    assert_eq!(init["args"][1], "hf://HuggingFaceTB/SmolLM2-135M-Instruct");
}

fn api_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
}

/// Children the API server refuses (422 for a name, 500 for a quantity it cannot
/// convert) put its message in status and an event, and back off long.
#[tokio::test]
async fn rejected_children_are_reported_on_the_object() {
    for (code, reason, message) in [
        (422, "Invalid", "Service \"smollm2\" is invalid: metadata.name: must not contain dots"),
        (500, "InternalError", "quantities must match the regular expression"),
    ] {
        let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", smollm2_spec());
        let mut calls = vec![
            Call::new(Method::GET, SECRET, 200, secret_meta()),
            Call::new(Method::PATCH, DEPLOYMENT, 200, bare("apps/v1", "Deployment", "smollm2")),
            Call::new(Method::PATCH, SERVICE, code, api_error(code, reason, message)),
            Call::new(Method::PATCH, STATUS, 200, stored("smollm2")),
        ];
        calls.extend(events(1));
        let (seen, result) = try_run(Checked(Ok(target)), &[], calls).await;
        let error = result.expect_err("the reconcile fails");
        assert_eq!(error.kind(), "rejected", "{code}");
        let degraded = condition(&seen[3].body, "Degraded");
        assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("ChildRejected")));
        let text = degraded["message"].as_str().unwrap_or("");
        assert!(text.contains("Service") && text.contains(message), "{code}: {text}");
        assert_eq!(seen[4].body["reason"], "ChildRejected");
        assert_eq!(seen[4].body["type"], "Warning");
        assert!(seen[4].body["note"].as_str().unwrap_or("").contains(message));

        let backoff = Backoff::default();
        let first = backoff.failed("models/smollm2", &error);
        let second = backoff.failed("models/smollm2", &error);
        assert!(first.news && !second.news, "logged once");
        assert!(first.after >= Duration::from_secs(30) && second.after > first.after, "{first:?} {second:?}");
    }
}

/// An object that does not decode gets Degraded with the field at fault;
/// nothing else is touched.
#[tokio::test]
async fn an_undecodable_object_is_degraded_naming_the_field() {
    let bad: Checked<ModelDeployment> = serde_json::from_value(json!({
        "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "smollm2", "namespace": NS, "uid": "uid-1", "generation": 2},
        "spec": {"source": {"url": "file:///m"}, "auth": {"disabled": true},
                 "engine": {"defaults": {"top_k": 4294967296u64}}},
    }))
    .expect("Checked decodes anything with metadata");
    let mut calls = vec![Call::new(Method::PATCH, STATUS, 200, stored("smollm2"))];
    calls.extend(events(1));
    let (seen, result) = try_run(bad, &[], calls).await;
    result.expect("reported, not failed");
    let status = &seen[0].body;
    assert_eq!(status["status"]["phase"], "Degraded");
    assert_eq!(status["status"]["observedGeneration"], 2);
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"].as_str().unwrap_or("").contains("spec.engine.defaults.top_k"), "{degraded}");
    assert_eq!(seen[1].body["reason"], "InvalidSpec");
}

/// Pod label keys the schema cannot check are checked before anything is applied.
#[tokio::test]
async fn invalid_pod_label_keys_are_degraded_before_apply() {
    let mut spec = smollm2_spec();
    spec["pod"] = json!({"labels": {"bad key": "x"}});
    let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", spec);
    let mut calls = vec![
        Call::new(Method::GET, SECRET, 200, secret_meta()),
        Call::new(Method::PATCH, STATUS, 200, stored("smollm2")),
    ];
    calls.extend(events(1));
    let seen = run(target, &[], calls).await;
    let degraded = condition(&seen[1].body, "Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"].as_str().unwrap_or("").contains("spec.pod.labels key \"bad key\""), "{degraded}");
}

/// Each transition is its own event with its own message, even when a reason
/// comes back (kube's Recorder would patch the first event's series, keeping
/// its stale note).
#[tokio::test]
async fn events_carry_the_message_of_each_transition() {
    let mut target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", smollm2_spec());
    let partial = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 0});
    let mut spec = smollm2_spec();
    spec["replicas"] = json!(2);
    target.spec = serde_json::from_value(spec).expect("spec");
    let round = |deployment: Value, events_published: usize| {
        let mut calls = vec![
            Call::new(Method::GET, SECRET, 200, secret_meta()),
            Call::new(Method::PATCH, DEPLOYMENT, 200, deployment),
            Call::new(Method::PATCH, SERVICE, 200, bare("v1", "Service", "smollm2")),
            Call::new(Method::PATCH, PDB, 200, bare("policy/v1", "PodDisruptionBudget", "smollm2")),
            Call::new(Method::PATCH, STATUS, 200, stored("smollm2")),
        ];
        calls.extend(events(events_published));
        calls
    };
    let first =
        run(target.clone(), &[], round(deployment_with(&bare("apps/v1", "Deployment", "smollm2"), partial), 3)).await;
    assert_eq!(first[5].body["note"], "Ready is False: 0/2 workers ready");
    target.status = Some(serde_json::from_value(first[4].body["status"].clone()).expect("status"));

    let ready = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2});
    let second =
        run(target.clone(), &[], round(deployment_with(&bare("apps/v1", "Deployment", "smollm2"), ready), 2)).await;
    assert_eq!(second[5].body["note"], "Ready is True: 2/2 workers ready");
    assert_eq!(second[5].body["reason"], "Available");
    let degraded = condition(&second[4].body, "Degraded");
    assert!(!degraded["message"].as_str().unwrap_or("").is_empty(), "no empty messages: {degraded}");
    for (a, b) in [(&first[5], &second[5]), (&first[5], &first[6])] {
        assert_ne!(a.body["metadata"]["name"], b.body["metadata"]["name"], "a new event each time");
    }
}

/// The whole controller against a list holding one object that does not decode
/// (a value written before the schema bounded it): the others are still
/// reconciled, and the bad one is reported on itself.
#[tokio::test]
async fn one_undecodable_object_does_not_stop_the_controller() {
    use crate::fake_api;
    // The controller's model probe is a reqwest client (rustls with ring, as main installs it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let good = serde_json::to_value(md("smollm2", "uid-1", "2026-01-01T00:00:00Z", smollm2_spec())).expect("json");
    let mut bad = serde_json::to_value(md("broken", "uid-2", "2026-01-01T00:00:00Z", smollm2_spec())).expect("json");
    bad["spec"]["engine"] = json!({"defaults": {"top_k": 4294967296u64}});
    let (client, log) = fake_api::client(move |method, path, _body| match (method.as_str(), path) {
        ("GET", "/apis/kandle.dev/v1alpha1/modeldeployments") => (200, fake_api::list(&[good.clone(), bad.clone()])),
        ("GET", "/apis/apps/v1/deployments" | "/api/v1/services" | "/apis/policy/v1/poddisruptionbudgets") => {
            (200, fake_api::list(&[]))
        }
        ("GET", SECRET) => (200, secret_meta()),
        ("PATCH", DEPLOYMENT) => (200, bare("apps/v1", "Deployment", "smollm2")),
        ("PATCH", SERVICE) => (200, bare("v1", "Service", "smollm2")),
        ("PATCH", p) if p.ends_with("/status") => (200, stored("x")),
        ("POST", EVENTS) => (201, event_reply()),
        _ => (404, not_found()),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = super::ControllerConfig {
        namespace: None,
        settings: BuildSettings::default(),
        identity: "t".into(),
        router_namespace: "kandle-system".into(),
        router_selector: "app.kubernetes.io/name=kandle-router".into(),
        scale_interval: Duration::from_secs(10),
        tenants_secret: None,
    };
    let controller = tokio::spawn(super::run(client, config, Arc::new(Metrics::default()), async move {
        let _ = stopped.await;
    }));

    let applied =
        fake_api::wait_for(&log, "the good object's Deployment", |r| r.method == Method::PATCH && r.path == DEPLOYMENT)
            .await;
    assert_eq!(applied.body["metadata"]["name"], "smollm2");
    let reported = fake_api::wait_for(&log, "the bad object's status", |r| {
        r.path == "/apis/kandle.dev/v1alpha1/namespaces/models/modeldeployments/broken/status"
    })
    .await;
    let degraded = condition(&reported.body, "Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"].as_str().unwrap_or("").contains("spec.engine.defaults.top_k"), "{degraded}");
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, controller).await.expect("stops on shutdown").expect("controller task");
}

/// An InferencePool as the API server returns it.
fn stored_pool() -> Value {
    let mut pool = bare("inference.networking.k8s.io/v1", "InferencePool", "smollm2");
    pool["spec"] = json!({"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8080}],
                          "endpointPickerRef": {"name": "smollm2-epp", "port": {"number": 9002}, "failureMode": "FailClose"}});
    pool
}

fn forbidden() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"})
}

/// `spec.gateway.inferencePool`: applied with the other children where the
/// InferencePool CRD is installed; where it is not (or the operator may not
/// write it), a condition says so and the pool still runs; removed from the
/// spec, the InferencePool is deleted.
#[tokio::test]
async fn an_inference_pool_is_applied_where_its_crd_is_installed_and_reported_where_not() {
    let mut spec = smollm2_spec();
    spec["gateway"] = json!({"inferencePool": {"endpointPickerRef": {"failureMode": "FailOpen"}}});
    let target = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", spec);
    let round = |pool_status: u16, pool_reply: Value| {
        let mut calls = applied_round(bare("apps/v1", "Deployment", "smollm2"), 0);
        calls.push(Call::new(Method::PATCH, INFERENCE_POOL, pool_status, pool_reply));
        calls.push(Call::new(Method::PATCH, STATUS, 200, stored("smollm2")));
        calls.extend(events(4));
        calls
    };

    // Installed: applied, owned by the ModelDeployment, selecting its pods.
    let seen = run(target.clone(), &[], round(200, stored_pool())).await;
    let pool = &seen[4].body;
    assert_eq!(pool["kind"], "InferencePool");
    assert_eq!(pool["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert_eq!(pool["spec"]["selector"]["matchLabels"], seen[1].body["spec"]["selector"]["matchLabels"]);
    assert_eq!(pool["spec"]["targetPorts"], json!([{"number": 8080}]));
    assert_eq!(
        pool["spec"]["endpointPickerRef"],
        json!({"name": "smollm2-epp", "port": {"number": 9002}, "failureMode": "FailOpen"})
    );
    let status = &seen[5].body;
    let ready = condition(status, "InferencePoolReady");
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("True"), Some("Applied")));
    assert_eq!(condition(status, "Degraded")["status"], "False");

    // Not installed: the API server has no such resource (404). The reconcile
    // succeeds, the workers run, and the condition and a warning say why.
    let seen = run(target.clone(), &[], round(404, not_found())).await;
    let status = &seen[5].body;
    let missing = condition(status, "InferencePoolReady");
    assert_eq!(
        (missing["status"].as_str(), missing["reason"].as_str()),
        (Some("False"), Some("InferencePoolCRDMissing"))
    );
    assert!(missing["message"].as_str().unwrap_or("").contains("inferencepools.inference.networking.k8s.io"));
    assert_eq!(condition(status, "Degraded")["status"], "False");
    let warning = seen[6..].iter().find(|e| e.body["reason"] == "InferencePoolCRDMissing").expect("an event");
    assert_eq!(warning.body["type"], "Warning");

    // Not allowed (the chart's gateway.inferencePools off): said the same way.
    let seen = run(target.clone(), &[], round(403, forbidden())).await;
    assert_eq!(condition(&seen[5].body, "InferencePoolReady")["reason"], "InferencePoolForbidden");

    // Refused by the extension's validation: said on the condition, the pool runs on.
    let invalid = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                         "message": "spec.endpointPickerRef: port is required"});
    let seen = run(target.clone(), &[], round(422, invalid)).await;
    let refused = condition(&seen[5].body, "InferencePoolReady");
    assert_eq!(refused["reason"], "InferencePoolRejected");
    assert!(refused["message"].as_str().unwrap_or("").contains("port is required"));
    assert_eq!(condition(&seen[5].body, "Degraded")["status"], "False");

    // Taken out of the spec: the one made before is deleted, and the condition goes.
    let applied = run(target.clone(), &[], round(200, stored_pool())).await;
    let mut removed = md("smollm2", "uid-1", "2026-01-01T00:00:00Z", smollm2_spec());
    removed.status = Some(serde_json::from_value(applied[5].body["status"].clone()).expect("status"));
    let mut calls = applied_round(bare("apps/v1", "Deployment", "smollm2"), 0);
    calls.push(Call::new(Method::DELETE, INFERENCE_POOL, 200, stored_pool()));
    calls.push(Call::new(Method::PATCH, STATUS, 200, stored("smollm2")));
    let seen = run(removed, &[], calls).await;
    assert!(seen[5].body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .all(|c| c["type"] != "InferencePoolReady"));
}
