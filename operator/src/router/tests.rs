//! The router in front of fake workers (small HTTP servers on local ports): what
//! each worker receives, and what the client gets back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::proxy::{RouterSettings, RouterState, Tenancy};
use super::table::{PoolSpec, Routes};

type Answer = Arc<dyn Fn(&Value) -> Response + Send + Sync>;

/// A worker that records every request body and answers with `answer`.
struct FakeWorker {
    url: String,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl FakeWorker {
    async fn start(answer: impl Fn(&Value) -> Response + Send + Sync + 'static) -> Self {
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let answer: Answer = Arc::new(answer);
        let recorder = seen.clone();
        let app = axum::Router::new().fallback(move |body: Bytes| {
            let (recorder, answer) = (recorder.clone(), answer.clone());
            async move {
                let request = serde_json::from_slice(&body).unwrap_or(Value::Null);
                recorder.lock().unwrap().push(request.clone());
                answer(&request)
            }
        });
        let url = serve(app).await;
        Self { url, seen }
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Answers like a kandle worker serving only `served`: the model the request
/// named, a stream when asked, 404 for any other name.
fn kandle_worker(served: &'static str) -> impl Fn(&Value) -> Response + Send + Sync + 'static {
    move |request| {
        if request["model"] != served {
            let error = json!({"error": {"message": "no such model", "type": "invalid_request_error",
                                         "param": "model", "code": "model_not_found"}});
            return (StatusCode::NOT_FOUND, axum::Json(error)).into_response();
        }
        let completion = |object: &str| json!({"id": "c1", "object": object, "model": request["model"], "choices": []});
        if request["stream"] == true {
            let events = format!(
                "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
                completion("chat.completion.chunk"),
                completion("chat.completion.chunk")
            );
            ([(header::CONTENT_TYPE, "text/event-stream")], events).into_response()
        } else {
            axum::Json(completion("chat.completion")).into_response()
        }
    }
}

fn settings() -> RouterSettings {
    RouterSettings {
        max_body_bytes: 1 << 20,
        prefix_routing: true,
        prefix_load_factor: 1.25,
        cooldown: Duration::from_secs(5),
        model_list_timeout: Duration::from_millis(300),
        hold_timeout: Duration::from_secs(5),
        max_held: 4,
    }
}

/// A synced router over `pools`; returns its base URL.
async fn router(pools: Vec<PoolSpec>, settings: RouterSettings) -> String {
    router_and_routes(pools, settings).await.0
}

/// A synced router over `pools`, and its routes, for a test to change.
async fn router_and_routes(pools: Vec<PoolSpec>, settings: RouterSettings) -> (String, Arc<Routes>, RouterState) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let routes = Arc::new(Routes::default());
    routes.update(pools);
    let state = RouterState::new(routes.clone(), reqwest::Client::new(), settings, Tenancy::default());
    state.set_synced();
    (serve(super::app(state.clone())).await, routes, state)
}

fn pool(model: &str, aliases: &[&str], workers: &[&FakeWorker]) -> PoolSpec {
    PoolSpec {
        model: model.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        endpoints: workers.iter().map(|w| w.url.clone()).collect(),
        can_come_up: true,
    }
}

async fn chat(router: &str, body: Value) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let response = reqwest::Client::new()
        .post(format!("{router}/v1/chat/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.text().await.unwrap())
}

fn data_lines(events: &str) -> Vec<&str> {
    events.lines().filter_map(|l| l.strip_prefix("data: ")).collect()
}

#[tokio::test]
async fn an_alias_reaches_the_worker_as_the_served_name_and_the_answer_names_the_alias() {
    let worker = FakeWorker::start(kandle_worker("model-b")).await;
    let router = router(vec![pool("model-b", &["model-b-alias"], &[&worker])], settings()).await;

    let (status, _, body) = chat(&router, json!({"model": "model-b-alias", "messages": []})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["model"], "model-b-alias");

    let (status, _, events) = chat(&router, json!({"model": "model-b-alias", "messages": [], "stream": true})).await;
    assert_eq!(status, StatusCode::OK, "{events}");
    let lines = data_lines(&events);
    assert_eq!(lines.len(), 3, "{events}");
    for chunk in &lines[..2] {
        assert_eq!(serde_json::from_str::<Value>(chunk).unwrap()["model"], "model-b-alias");
    }
    assert_eq!(lines[2], "[DONE]");

    // The served name itself passes untouched.
    let (status, _, body) = chat(&router, json!({"model": "model-b", "messages": []})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["model"], "model-b");

    let models: Vec<Value> = worker.seen().iter().map(|r| r["model"].clone()).collect();
    assert_eq!(models, ["model-b", "model-b", "model-b"]);
    // Nothing but the model changed on the way.
    assert_eq!(worker.seen()[1], json!({"model": "model-b", "messages": [], "stream": true}));
}

/// Answers every request with `status`, a Retry-After and an error object, as a
/// worker still loading (503) or with a full queue (429) does.
fn busy_worker(status: StatusCode) -> impl Fn(&Value) -> Response + Send + Sync + 'static {
    move |_| {
        let error = json!({"error": {"message": "busy", "type": "server_error", "param": null, "code": "busy"}});
        (status, [(header::RETRY_AFTER, "7")], axum::Json(error)).into_response()
    }
}

#[tokio::test]
async fn a_loading_or_full_worker_passes_the_request_to_a_free_one() {
    let loading = FakeWorker::start(busy_worker(StatusCode::SERVICE_UNAVAILABLE)).await;
    let full = FakeWorker::start(busy_worker(StatusCode::TOO_MANY_REQUESTS)).await;
    let free = FakeWorker::start(kandle_worker("m")).await;
    let router = router(vec![pool("m", &[], &[&loading, &full, &free])], settings()).await;
    for _ in 0..6 {
        let (status, _, body) = chat(&router, json!({"model": "m", "messages": []})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(free.seen().len(), 6);
    // Ties rotate, so the busy workers were each offered requests first.
    assert!(!loading.seen().is_empty() && !full.seen().is_empty());
}

#[tokio::test]
async fn when_every_worker_is_busy_the_last_answer_passes_through() {
    let workers = [
        FakeWorker::start(busy_worker(StatusCode::SERVICE_UNAVAILABLE)).await,
        FakeWorker::start(busy_worker(StatusCode::TOO_MANY_REQUESTS)).await,
    ];
    let router = router(vec![pool("m", &[], &[&workers[0], &workers[1]])], settings()).await;
    let (status, headers, body) = chat(&router, json!({"model": "m", "messages": []})).await;
    assert!(status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
    assert_eq!(headers.get(header::RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"7"[..]));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "busy");
    assert_eq!(workers.iter().map(|w| w.seen().len()).collect::<Vec<_>>(), [1, 1], "each tried once");
}

#[tokio::test]
async fn attempts_are_bounded_in_a_large_busy_pool() {
    let mut workers = Vec::new();
    for _ in 0..5 {
        workers.push(FakeWorker::start(busy_worker(StatusCode::TOO_MANY_REQUESTS)).await);
    }
    let router = router(vec![pool("m", &[], &workers.iter().collect::<Vec<_>>())], settings()).await;
    let (status, _, _) = chat(&router, json!({"model": "m", "messages": []})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(workers.iter().map(|w| w.seen().len()).sum::<usize>(), 3);
}

#[tokio::test]
async fn a_worker_that_hangs_does_not_hold_back_the_model_list() {
    // Headers at once, then a body that never comes.
    let hanging = FakeWorker::start(|_| {
        Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>()).into_response()
    })
    .await;
    let answering = FakeWorker::start(|_| {
        axum::Json(json!({"object": "list", "data": [{"id": "b", "object": "model"}]})).into_response()
    })
    .await;
    let router = router(vec![pool("a", &[], &[&hanging]), pool("b", &[], &[&answering])], settings()).await;
    let request = reqwest::Client::new().get(format!("{router}/v1/models")).send();
    let response =
        tokio::time::timeout(Duration::from_secs(5), request).await.expect("the list is not held back").unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let list: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(list["data"], json!([{"id": "b", "object": "model"}]));
    assert_eq!(hanging.seen().len(), 1, "the hanging worker was asked");
}

/// The router's `/metrics` value of `kandle_router_held{model}`.
async fn held(router: &str, model: &str) -> i64 {
    let text = reqwest::get(format!("{router}/metrics")).await.unwrap().text().await.unwrap();
    let prefix = format!("kandle_router_held{{model=\"{model}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

/// Polls `held` until it reads `n` (the requests reached the queue).
async fn until_held(router: &str, model: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while held(router, model).await != n {
        assert!(tokio::time::Instant::now() < deadline, "never {n} held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn at_zero(model: &str) -> PoolSpec {
    PoolSpec { model: model.into(), aliases: vec![], endpoints: vec![], can_come_up: true }
}

#[tokio::test]
async fn requests_for_a_pool_at_zero_are_held_until_an_endpoint_appears() {
    let (router, routes, _state) = router_and_routes(vec![at_zero("m")], settings()).await;
    let plain = tokio::spawn(chat_owned(router.clone(), json!({"model": "m", "messages": []})));
    let streamed = tokio::spawn(chat_owned(router.clone(), json!({"model": "m", "messages": [], "stream": true})));
    until_held(&router, "m", 2).await;
    assert!(!plain.is_finished() && !streamed.is_finished());

    let worker = FakeWorker::start(kandle_worker("m")).await;
    routes.update(vec![pool("m", &[], &[&worker])]);
    let (status, _, body) = plain.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, events) = streamed.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{events}");
    assert_eq!(data_lines(&events).last(), Some(&"[DONE]"));
    assert_eq!(worker.seen().len(), 2);
    assert_eq!(held(&router, "m").await, 0);
}

#[tokio::test]
async fn a_held_request_times_out_with_503_and_retry_after() {
    let mut s = settings();
    s.hold_timeout = Duration::from_millis(300);
    let router = router(vec![at_zero("m")], s).await;
    let started = std::time::Instant::now();
    let (status, headers, body) = chat(&router, json!({"model": "m", "messages": []})).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "no_ready_endpoint");
    assert_eq!(held(&router, "m").await, 0);
}

#[tokio::test]
async fn past_the_queue_bound_requests_get_429_and_a_client_that_leaves_frees_its_place() {
    let (router, routes, _state) = router_and_routes(vec![at_zero("m")], settings()).await;
    let mut waiting: Vec<_> =
        (0..4).map(|_| tokio::spawn(chat_owned(router.clone(), json!({"model": "m", "messages": []})))).collect();
    until_held(&router, "m", 4).await;
    let (status, headers, body) = chat(&router, json!({"model": "m", "messages": []})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.contains_key(header::RETRY_AFTER));

    // One client gives up: its place is free again.
    waiting.pop().unwrap().abort();
    until_held(&router, "m", 3).await;
    waiting.push(tokio::spawn(chat_owned(router.clone(), json!({"model": "m", "messages": []}))));
    until_held(&router, "m", 4).await;

    let worker = FakeWorker::start(kandle_worker("m")).await;
    routes.update(vec![pool("m", &[], &[&worker])]);
    for request in waiting {
        assert_eq!(request.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(worker.seen().len(), 4, "the client that left never reached a worker");
}

#[tokio::test]
async fn a_pool_that_cannot_come_up_is_refused_at_once() {
    let mut degraded = at_zero("m");
    degraded.can_come_up = false;
    let (router, routes, _state) = router_and_routes(vec![degraded, at_zero("other")], settings()).await;
    let (status, _, body) = chat(&router, json!({"model": "m", "messages": []})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(held(&router, "m").await, 0);

    // A held request whose pool then turns Degraded, or goes, is answered then.
    let held_other = tokio::spawn(chat_owned(router.clone(), json!({"model": "other", "messages": []})));
    until_held(&router, "other", 1).await;
    routes.update(vec![]);
    assert_eq!(held_other.await.unwrap().0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_stopping_router_answers_its_held_requests_and_refuses_new_ones() {
    let (router, _routes, state) = router_and_routes(vec![at_zero("m")], settings()).await;
    let waiting = tokio::spawn(chat_owned(router.clone(), json!({"model": "m", "messages": []})));
    until_held(&router, "m", 1).await;
    state.lifecycle().begin_draining();
    let (status, _, body) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "shutting_down");
    let ready = reqwest::get(format!("{router}/ready")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = chat(&router, json!({"model": "m", "messages": []})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

async fn chat_owned(router: String, body: Value) -> (StatusCode, reqwest::header::HeaderMap, String) {
    chat(&router, body).await
}

async fn metric_lines(router: &str, name: &str) -> Vec<String> {
    let text = reqwest::get(format!("{router}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name)).map(str::to_string).collect()
}

/// Requests that share a long system prompt reach the worker that served it,
/// whatever they ask; other prompts spread; the outcomes are counted.
#[tokio::test]
async fn a_shared_system_prompt_keeps_to_one_worker() {
    let workers = [
        FakeWorker::start(kandle_worker("m")).await,
        FakeWorker::start(kandle_worker("m")).await,
        FakeWorker::start(kandle_worker("m")).await,
    ];
    let on = router(vec![pool("m", &[], &workers.iter().collect::<Vec<_>>())], settings()).await;
    let system = |n: usize| (0..100).map(|i| format!("Rule {i} of policy {n}. ")).collect::<String>();
    let ask = |n: usize, question: usize| {
        json!({"model": "m", "messages": [{"role": "system", "content": system(n)},
                                          {"role": "user", "content": format!("Question {question}?")}]})
    };
    for question in 0..6 {
        for policy in 0..4 {
            assert_eq!(chat(&on, ask(policy, question)).await.0, StatusCode::OK);
        }
    }
    // Each policy's requests all went to one worker.
    for policy in 0..4 {
        let marker = format!("policy {policy}.");
        let holding: Vec<usize> = (0..workers.len())
            .filter(|&w| {
                workers[w].seen().iter().any(|r| r["messages"][0]["content"].as_str().unwrap().contains(&marker))
            })
            .collect();
        assert_eq!(holding.len(), 1, "policy {policy} went to workers {holding:?}");
    }
    let counted = metric_lines(&on, "kandle_router_prefix_routing_total").await;
    let count = |outcome: &str| -> u64 {
        let prefix = format!("kandle_router_prefix_routing_total{{model=\"m\",outcome=\"{outcome}\"}} ");
        counted.iter().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!((count("miss"), count("hit"), count("overloaded")), (4, 20, 0), "{counted:?}");
    // A short prompt goes by load, counted as short.
    assert_eq!(chat(&on, ask_short()).await.0, StatusCode::OK);
    let counted = metric_lines(&on, "kandle_router_prefix_routing_total").await;
    assert!(counted.iter().any(|l| l.contains("outcome=\"short\"} 1")), "{counted:?}");

    // Off, the same workload spreads by load alone and nothing is counted.
    let spread: Vec<FakeWorker> =
        futures::future::join_all((0..3).map(|_| FakeWorker::start(kandle_worker("m")))).await;
    let settings = RouterSettings { prefix_routing: false, ..settings() };
    let off = router(vec![pool("m", &[], &spread.iter().collect::<Vec<_>>())], settings).await;
    for question in 0..3 {
        assert_eq!(chat(&off, ask(0, question)).await.0, StatusCode::OK);
    }
    assert!(spread.iter().all(|w| w.seen().len() == 1));
    assert!(metric_lines(&off, "kandle_router_prefix_routing").await.is_empty());
}

fn ask_short() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
}
