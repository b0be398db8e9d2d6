//! A fuzz pass over the request parser through the whole HTTP stack (router,
//! middleware, validation, and the engine of a tiny model for what passes):
//! arbitrary bytes, arbitrary JSON, chat requests built from the real
//! parameters with values in range, out of range and of wrong types, and such
//! requests cut short or with a byte changed. No input may panic or get a 5xx,
//! and every rejection is an OpenAI error object.
//!
//! `PROPTEST_CASES=N` sets the cases per kind of input (default
//! [`CASES`]); `PROPTEST_RNG_SEED=S` another seed than the fixed one CI uses.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use axum::http::StatusCode;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use serde_json::{json, Map, Value};

/// Cases per kind of input in a plain `cargo test`.
const CASES: u32 = 1000;
const SEED: u64 = 13;

/// A request body, shown as text when a case fails.
#[derive(Clone)]
struct Body(Vec<u8>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

fn json_body(value: Value) -> Body {
    Body(value.to_string().into_bytes())
}

fn config() -> Config {
    let mut config = Config { failure_persistence: None, ..Config::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    config
}

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("JSON numbers are finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(text(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A parameter's value: mostly what `plausible` makes, sometimes anything.
fn param(plausible: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
    prop_oneof![9 => plausible, 1 => any_json()].boxed()
}

/// Mostly a number in `[lo, hi]`, else one up to as far outside it again.
fn number(lo: f64, hi: f64) -> BoxedStrategy<Value> {
    let margin = hi - lo;
    param(prop_oneof![3 => lo..=hi, 1 => lo - margin..hi + margin].prop_map(Value::from))
}

/// Mostly an integer in `[lo, hi]`, else one just outside it.
fn integer(lo: i64, hi: i64) -> BoxedStrategy<Value> {
    param(prop_oneof![3 => lo..=hi, 1 => lo - 2..=hi + 2].prop_map(Value::from))
}

fn flag() -> BoxedStrategy<Value> {
    param(any::<bool>().prop_map(Value::from))
}

fn one_of(values: &'static [&'static str]) -> BoxedStrategy<Value> {
    param(prop_oneof![9 => proptest::sample::select(values).prop_map(Value::from), 1 => text().prop_map(Value::from)])
}

fn function_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z_]{1,8}", text()]
}

fn message() -> BoxedStrategy<Value> {
    let role = prop_oneof![
        6 => Just("user"),
        3 => proptest::sample::select(&["system", "developer", "assistant"][..]),
        1 => proptest::sample::select(&["tool", "function", "", "User"][..]),
    ];
    let part = (proptest::sample::select(&["text", "image_url", "input_audio", "refusal"][..]), text())
        .prop_map(|(kind, text)| json!({"type": kind, "text": text}));
    let content = param(prop_oneof![
        8 => text().prop_map(Value::from),
        2 => vec(part, 0..3).prop_map(Value::Array),
        1 => Just(Value::Null),
    ]);
    let call = (function_name(), text())
        .prop_map(|(name, arguments)| json!({"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}));
    let calls = param(vec(call, 0..2).prop_map(Value::Array));
    (
        param(role.prop_map(Value::from)),
        option::weighted(0.97, content),
        option::weighted(0.05, calls),
        option::weighted(0.05, param(text().prop_map(Value::from))),
    )
        .prop_map(|(role, content, calls, call_id)| {
            let mut m = Map::new();
            m.insert("role".into(), role);
            for (key, value) in [("content", content), ("tool_calls", calls), ("tool_call_id", call_id)] {
                if let Some(value) = value {
                    m.insert(key.into(), value);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

fn tool() -> impl Strategy<Value = Value> {
    let parameters = prop_oneof![
        Just(json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})),
        any_json(),
    ];
    (function_name(), parameters).prop_map(
        |(name, parameters)| json!({"type": "function", "function": {"name": name, "parameters": parameters}}),
    )
}

/// Chat Completions bodies; half of them with a valid model and message, so
/// that their other parameters reach the engine when they are valid too.
fn chat_request() -> BoxedStrategy<Value> {
    let anchored = (any_request(), text()).prop_map(|(mut request, content)| {
        request["model"] = json!("tiny");
        request["messages"] = json!([{"role": "user", "content": content}]);
        request
    });
    prop_oneof![any_request(), anchored].boxed()
}

/// A Chat Completions body: each parameter present or not, valid or not.
fn any_request() -> BoxedStrategy<Value> {
    let field = |name: &'static str, p: f64, value: BoxedStrategy<Value>| {
        option::weighted(p, value.prop_map(move |v| (name.to_string(), v))).boxed()
    };
    let response_format = prop_oneof![
        Just(json!({"type": "text"})),
        Just(json!({"type": "json_object"})),
        any_json().prop_map(|schema| json!({"type": "json_schema", "json_schema": {"name": "out", "schema": schema}})),
    ];
    let tool_choice = prop_oneof![
        proptest::sample::select(&["auto", "none", "required"][..]).prop_map(Value::from),
        function_name().prop_map(|name| json!({"type": "function", "function": {"name": name}})),
    ];
    let stop =
        prop_oneof![text().prop_map(Value::from), vec(text().prop_map(Value::from), 0..6).prop_map(Value::Array)];
    let bias = btree_map(prop_oneof!["[0-9]{1,3}", text()], (-150.0..150.0).prop_map(Value::from), 0..3)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    let fields = vec![
        field("model", 0.95, param(prop_oneof![4 => Just(Value::from("tiny")), 1 => text().prop_map(Value::from)])),
        field("messages", 0.95, param(vec(message(), 1..4).prop_map(Value::Array))),
        // Small budgets: a request that passes is generated to its end.
        field("max_tokens", 0.5, integer(1, 6)),
        field("max_completion_tokens", 0.2, integer(1, 6)),
        field("temperature", 0.3, number(0.0, 2.0)),
        field("top_p", 0.1, number(0.0, 1.0)),
        field("top_k", 0.1, integer(0, 50)),
        field("min_p", 0.1, number(0.0, 1.0)),
        field("presence_penalty", 0.1, number(-2.0, 2.0)),
        field("frequency_penalty", 0.1, number(-2.0, 2.0)),
        field("repetition_penalty", 0.1, number(0.0, 2.0)),
        field("logit_bias", 0.1, param(bias)),
        field("seed", 0.1, param(any::<i64>().prop_map(Value::from))),
        field("n", 0.1, integer(1, 3)),
        field("stop", 0.1, param(stop)),
        field("stream", 0.4, flag()),
        field("stream_options", 0.1, param(any::<bool>().prop_map(|u| json!({"include_usage": u})))),
        field("logprobs", 0.1, flag()),
        field("top_logprobs", 0.1, integer(0, 20)),
        field("response_format", 0.1, param(response_format)),
        field("tools", 0.1, param(vec(tool(), 0..3).prop_map(Value::Array))),
        field("tool_choice", 0.1, param(tool_choice)),
        field("parallel_tool_calls", 0.05, flag()),
        field("user", 0.05, param(text().prop_map(Value::from))),
        field("enable_thinking", 0.05, flag()),
        field("thinking_budget", 0.05, integer(1, 8)),
        field("reasoning_effort", 0.05, one_of(&["none", "minimal", "low", "medium", "high"])),
        field("service_tier", 0.05, one_of(&["auto", "default", "flex"])),
        field("store", 0.05, flag()),
        field("modalities", 0.05, param(Just(json!(["text"])))),
        field("metadata", 0.05, any_json()),
    ];
    (fields, option::weighted(0.05, (text(), any_json())))
        .prop_map(|(fields, unknown)| Value::Object(fields.into_iter().flatten().chain(unknown).collect()))
        .boxed()
}

/// A chat request's bytes cut short, or with one byte changed.
fn damaged_chat_request() -> impl Strategy<Value = Body> {
    (chat_request(), any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(request, at, byte, cut)| {
        let mut bytes = request.to_string().into_bytes();
        let at = at.index(bytes.len());
        if cut {
            bytes.truncate(at);
        } else {
            bytes[at] = byte;
        }
        Body(bytes)
    })
}

/// Not a 5xx; an answer when it succeeded, an OpenAI error object when not.
fn check(status: StatusCode, body: &str) -> Result<(), TestCaseError> {
    prop_assert!(!status.is_server_error(), "{status}: {body}");
    if status == StatusCode::OK {
        if body.starts_with("data: ") {
            prop_assert!(body.trim_end().ends_with("data: [DONE]"), "unfinished stream: {body}");
            prop_assert!(!body.contains("data: {\"error\""), "error event: {body}");
        } else {
            let answer: Value = serde_json::from_str(body).map_err(|e| TestCaseError::fail(format!("{e}: {body}")))?;
            prop_assert_eq!(&answer["object"], "chat.completion", "{}", body);
        }
        return Ok(());
    }
    let answer: Value = serde_json::from_str(body).map_err(|e| TestCaseError::fail(format!("{e}: {body}")))?;
    let error = &answer["error"];
    prop_assert!(error["message"].is_string() && error["type"].is_string(), "{status}: {body}");
    prop_assert!(error.get("param").is_some() && error.get("code").is_some(), "{status}: {body}");
    Ok(())
}

#[test]
fn request_fuzz_never_panics_never_5xx_and_rejects_with_openai_errors() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _entered = runtime.enter();
    let (served, _dir) = super::Served::new("llama", super::CHATML);
    let kinds: [(&str, BoxedStrategy<Body>); 4] = [
        ("bytes", vec(any::<u8>(), 0..256).prop_map(Body).boxed()),
        ("json", any_json().prop_map(json_body).boxed()),
        ("chat", chat_request().prop_map(json_body).boxed()),
        ("damaged chat", damaged_chat_request().boxed()),
    ];
    let statuses = RefCell::new(BTreeMap::<u16, usize>::new());
    let mut counts = Vec::new();
    for (kind, strategy) in kinds {
        let sent = Cell::new(0usize);
        let outcome = TestRunner::new(config()).run(&strategy, |body| {
            let (status, text) = runtime.block_on(served.post(body.0));
            sent.set(sent.get() + 1);
            *statuses.borrow_mut().entry(status.as_u16()).or_default() += 1;
            check(status, &text)
        });
        if let Err(e) = outcome {
            panic!("{kind}: {e}");
        }
        counts.push(format!("{} {kind}", sent.get()));
    }
    let total: usize = statuses.borrow().values().sum();
    eprintln!(
        "request fuzz: {total} requests ({}) through the HTTP stack, none panicked or got a 5xx; statuses {:?}",
        counts.join(", "),
        statuses.borrow()
    );
    assert!(statuses.borrow().contains_key(&200), "no generated request was valid: the generators need fixing");
}
