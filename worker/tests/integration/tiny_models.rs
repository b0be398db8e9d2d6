//! Tiny Llama, Qwen2, Qwen3, Gemma 3 and Phi-3 checkpoints with random weights, written by the test
//! itself in the Hugging Face layout, then loaded and served through the HTTP router.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device, Tensor};
use kandle_contract::engine::KvCacheMemory;
use kandle_worker::api::request::{ChatRequest, SamplingOverrides};
use kandle_worker::api::state::{AppState, HttpSettings};
use kandle_worker::metrics::Metrics;
use kandle_worker::model::{self, LoadOptions};
use kandle_worker::runtime::{Logits, Model, StepSequence};
use kandle_worker::service::{EngineLimits, ModelService};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};
use tower::ServiceExt;

use crate::common;
mod gemma3;
mod phi3;
mod request_fuzz;

const HIDDEN: usize = 32;
const INTERMEDIATE: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const CONTEXT: usize = 128;
/// The tiny Gemma 3's window (its layer 0; layer 1 attends globally).
const GEMMA_WINDOW: usize = 5;
const SPECIALS: [(&str, bool); 9] = [
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<think>", false),
    ("</think>", false),
    ("<tool_call>", false),
    ("</tool_call>", false),
    // Qwen's fill-in-the-middle markers.
    ("<|fim_prefix|>", true),
    ("<|fim_suffix|>", true),
    ("<|fim_middle|>", true),
];

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// ChatML that takes tools, as Qwen's templates do (its model answers with
/// Hermes `<tool_call>` blocks).
const HERMES: &str = "{% if tools %}<|im_start|>system\nT<|im_end|>\n{% endif %}\
{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
const THINKING: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}";

/// A byte-level BPE tokenizer over every byte, without merges.
fn tokenizer() -> Tokenizer {
    let mut symbols: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    symbols.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab =
        symbols.into_iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().expect("bpe");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let added: Vec<AddedToken> = SPECIALS.iter().map(|(t, special)| AddedToken::from(*t, *special)).collect();
    tokenizer.add_special_tokens(added).expect("specials");
    tokenizer
}

/// Normal weights (standard deviation 0.5, by Box-Muller) from a seeded
/// generator: every run tests the same checkpoint, so a bound that holds holds
/// every time.
fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            0.5 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
}

/// Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json;
/// returns the number of parameters written.
fn write_checkpoint(dir: &Path, arch: &str, template: &str) -> u64 {
    let tok = tokenizer();
    let vocab = tok.get_vocab_size(true);
    tok.save(dir.join("tokenizer.json"), false).expect("save tokenizer");
    let im_end = tok.token_to_id("<|im_end|>").expect("im_end");

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let gemma = arch == "gemma3";
    let mut put = |name: String, shape: &[usize]| {
        let t = match (name.ends_with("norm.weight"), gemma) {
            // Gemma's norms are offsets from 1: random ones test that they are taken as such.
            (true, true) => (random(&mut rng, shape) * 0.4).expect("scale"),
            (true, false) => Tensor::ones(shape, DType::F32, &Device::Cpu).expect("ones"),
            (false, _) => random(&mut rng, shape),
        };
        tensors.insert(name, t);
    };
    put("model.embed_tokens.weight".into(), &[vocab, HIDDEN]);
    put("model.norm.weight".into(), &[HIDDEN]);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        if arch == "phi3" {
            put(format!("{p}.self_attn.qkv_proj.weight"), &[(HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN]);
            put(format!("{p}.mlp.gate_up_proj.weight"), &[2 * INTERMEDIATE, HIDDEN]);
        } else {
            put(format!("{p}.self_attn.q_proj.weight"), &[HEADS * HEAD_DIM, HIDDEN]);
            put(format!("{p}.self_attn.k_proj.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN]);
            put(format!("{p}.self_attn.v_proj.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN]);
            put(format!("{p}.mlp.gate_proj.weight"), &[INTERMEDIATE, HIDDEN]);
            put(format!("{p}.mlp.up_proj.weight"), &[INTERMEDIATE, HIDDEN]);
        }
        put(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HEADS * HEAD_DIM]);
        if arch == "qwen2" {
            put(format!("{p}.self_attn.q_proj.bias"), &[HEADS * HEAD_DIM]);
            put(format!("{p}.self_attn.k_proj.bias"), &[KV_HEADS * HEAD_DIM]);
            put(format!("{p}.self_attn.v_proj.bias"), &[KV_HEADS * HEAD_DIM]);
        }
        if arch == "qwen3" || gemma {
            put(format!("{p}.self_attn.q_norm.weight"), &[HEAD_DIM]);
            put(format!("{p}.self_attn.k_norm.weight"), &[HEAD_DIM]);
        }
        if gemma {
            put(format!("{p}.pre_feedforward_layernorm.weight"), &[HIDDEN]);
            put(format!("{p}.post_feedforward_layernorm.weight"), &[HIDDEN]);
        }
        put(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTERMEDIATE]);
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN]);
        put(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN]);
    }
    let parameters = tensors.values().map(|t| t.elem_count() as u64).sum();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save weights");

    let mut config = json!({
        "model_type": arch,
        "architectures": ["TinyForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "attention_bias": false,
        "sliding_window": CONTEXT,
        "max_window_layers": LAYERS,
        "use_sliding_window": false,
        "eos_token_id": im_end,
        "torch_dtype": "float32",
    });
    if gemma {
        // Layer 0 windowed (rotary base 100), layer 1 global (10,000); the
        // keys candle-transformers' Gemma 3 reads, too.
        let extra = json!({"hidden_activation": "gelu_pytorch_tanh", "rope_local_base_freq": 100.0,
            "query_pre_attn_scalar": HEAD_DIM, "sliding_window": GEMMA_WINDOW, "sliding_window_pattern": 2,
            "final_logit_softcapping": null, "attn_logit_softcapping": null, "rms_norm_eps": 1e-6});
        if let (Some(c), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
    }
    if arch == "phi3" {
        // Half of each head rotates.
        config["partial_rotary_factor"] = json!(0.5);
    }
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let tok_config = json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": null});
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).expect("tokenizer config");
    parameters
}

fn step(tokens: &[u32], start: usize, blocks: &[u32]) -> StepSequence {
    StepSequence::new(tokens.to_vec(), start, blocks.to_vec())
}

#[test]
fn each_architecture_loads_and_runs() {
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let parameters = write_checkpoint(dir.path(), arch, CHATML);
        let loaded = model::load(dir.path(), &LoadOptions::default()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(loaded.info.architecture, arch);
        assert_eq!(loaded.info.context_length, CONTEXT as u64);
        assert_eq!(loaded.info.quantization, "F32");
        assert_eq!(loaded.info.parameters, parameters, "{arch}");
        let vocab = loaded.tokenizer.get_vocab_size(true);
        let cache = loaded.model.kv_cache(4, 8).expect("cache");
        let prefill = common::forward(&loaded.model, &[step(&[1, 2, 3], 0, &[0])], &cache);
        assert_eq!((prefill.len(), prefill[0].len()), (1, vocab), "{arch}");
        let next = common::forward(&loaded.model, &[step(&[4], 3, &[0])], &cache);
        assert_eq!((next.len(), next[0].len()), (1, vocab), "{arch}");
        let im_end = loaded.tokenizer.token_to_id("<|im_end|>").expect("im_end");
        assert!(loaded.special.stop_ids.contains(&im_end), "{arch}");
    }
}

#[test]
fn missing_tensor_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "llama", CHATML);
    let mut tensors = HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), random(&mut ChaCha8Rng::seed_from_u64(1), &[8, HIDDEN]));
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).expect("save");
    assert!(model::load(dir.path(), &LoadOptions::default()).is_err());
}

/// Serves a checkpoint in-process and answers requests through the real router.
struct Served {
    router: axum::Router,
    ban: Value,
    tokenizer: Tokenizer,
}

impl Served {
    fn new(arch: &str, template: &str) -> (Self, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_checkpoint(dir.path(), arch, template);
        let loaded = model::load(dir.path(), &LoadOptions::default()).expect("loads");
        // Random weights would stop at random; banning the end markers makes lengths exact.
        let mut ban = serde_json::Map::new();
        for t in ["<|im_end|>", "<|im_start|>", "</think>"] {
            let id = loaded.tokenizer.token_to_id(t).expect("special");
            ban.insert(id.to_string(), json!(-100));
        }
        let loaded_tokenizer = loaded.tokenizer.clone();
        let metrics = Arc::new(Metrics::default());
        let state = AppState::new(
            HttpSettings {
                served_model_name: "tiny".into(),
                aliases: vec![],
                max_body_bytes: 1 << 20,
                defaults: SamplingOverrides::default(),
            },
            None,
            metrics.clone(),
        );
        let limits = EngineLimits {
            max_batch_size: 4,
            max_batch_tokens: 64,
            max_waiting: 8,
            max_context: None,
            kv_cache_memory: None,
            prefix_cache: true,
            step_timeout: std::time::Duration::from_secs(120),
        };
        state.set_model(ModelService::start(loaded, limits, SamplingOverrides::default(), metrics).expect("engine"));
        let tokenizer = loaded_tokenizer;
        (Self { router: kandle_worker::api::router(state), ban: Value::Object(ban), tokenizer }, dir)
    }

    async fn chat(&self, mut body: Value) -> (StatusCode, String) {
        body["model"] = json!("tiny");
        body["messages"] = json!([{"role": "user", "content": "Hi there"}]);
        let mut bias = self.ban.clone();
        if let (Some(all), Some(more)) = (bias.as_object_mut(), body["logit_bias"].as_object()) {
            all.extend(more.clone());
        }
        body["logit_bias"] = bias;
        self.post(body.to_string()).await
    }

    /// POSTs `body` as it is to the chat path; the status and the whole answer.
    async fn post(&self, body: impl Into<Body>) -> (StatusCode, String) {
        self.post_to("/v1/chat/completions", body).await
    }

    /// POSTs `body` as it is to `path`; the status and the whole answer.
    async fn post_to(&self, path: &str, body: impl Into<Body>) -> (StatusCode, String) {
        let request =
            Request::post(path).header("content-type", "application/json").body(body.into()).expect("request");
        let response = self.router.clone().oneshot(request).await.expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn special_id(&self, token: &str) -> u32 {
        self.tokenizer.token_to_id(token).expect("token")
    }

    async fn chat_json(&self, body: Value) -> Value {
        let (status, text) = self.chat(body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        serde_json::from_str(&text).expect("json")
    }
}

#[tokio::test]
async fn safetensors_model_serves_chat_completions() {
    let (served, _dir) = Served::new("llama", CHATML);
    let r = served.chat_json(json!({"max_tokens": 6, "temperature": 0})).await;
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 6);
    assert!(r["choices"][0]["message"]["reasoning_content"].is_null());

    let sampled = json!({"max_tokens": 12, "temperature": 1.0, "seed": 5});
    let a = served.chat_json(sampled.clone()).await;
    let b = served.chat_json(sampled).await;
    assert_eq!(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]);

    let (status, text) = served.chat(json!({"max_tokens": 3, "stream": true})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let (status, text) = served.chat(json!({"max_tokens": CONTEXT})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("context_length_exceeded"), "{text}");

    let (status, text) = served.chat(json!({"enable_thinking": true})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains(r#""param":"enable_thinking""#), "{text}");
}

/// vLLM's stopping extensions on chat, end to end: `min_tokens` holds the end
/// token back, `ignore_eos` generates through it (`skip_special_tokens:
/// false` shows it), `stop_token_ids` ends at a token keeping its text,
/// `include_stop_str_in_output` keeps the stop string.
#[tokio::test]
async fn vllm_stopping_extensions_work_on_chat() {
    let (served, _dir) = Served::new("llama", CHATML);
    let im_end = served.special_id("<|im_end|>").to_string();
    let a = served.tokenizer.token_to_id("a").expect("a").to_string();
    let answer = |r: &Value| {
        let choice = &r["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap_or_default().to_string();
        (text, choice["finish_reason"].clone(), r["usage"]["completion_tokens"].clone())
    };
    let ends_now = json!({ &im_end: 100 });
    let r = served.chat_json(json!({"max_tokens": 8, "temperature": 0, "logit_bias": ends_now})).await;
    assert_eq!(answer(&r), (String::new(), json!("stop"), json!(0)), "{r}");
    let r = served.chat_json(json!({"max_tokens": 8, "min_tokens": 3, "temperature": 0, "logit_bias": ends_now})).await;
    assert_eq!((answer(&r).1, answer(&r).2), (json!("stop"), json!(3)), "{r}");
    let through = json!({"max_tokens": 4, "ignore_eos": true, "temperature": 0, "logit_bias": ends_now});
    let r = served.chat_json(through.clone()).await;
    assert_eq!(answer(&r), (String::new(), json!("length"), json!(4)), "{r}");
    let mut shown = through;
    shown["skip_special_tokens"] = json!(false);
    let r = served.chat_json(shown).await;
    assert_eq!(answer(&r), ("<|im_end|>".repeat(4), json!("length"), json!(4)), "{r}");

    let only_a = json!({ &a: 100 });
    let r = served
        .chat_json(json!({"max_tokens": 8, "stop_token_ids": [a.parse::<u32>().expect("id")],
                                    "logit_bias": only_a}))
        .await;
    assert_eq!(answer(&r), ("a".to_string(), json!("stop"), json!(1)), "{r}");
    let r = served.chat_json(json!({"max_tokens": 8, "stop": ["aa"], "logit_bias": only_a})).await;
    assert_eq!(answer(&r).0, "");
    let r = served
        .chat_json(json!({"max_tokens": 8, "stop": ["aa"], "include_stop_str_in_output": true,
                                    "logit_bias": only_a}))
        .await;
    assert_eq!(answer(&r), ("aa".to_string(), json!("stop"), json!(2)), "{r}");
}

/// The Responses API on a model whose template thinks: the reasoning is an
/// output item before the message (raw `reasoning_text`, or `summary_text`
/// when a summary is asked for), counted in `reasoning_tokens`; streamed as
/// its own typed events. A model that does not think refuses an effort.
#[tokio::test]
async fn responses_put_reasoning_in_its_own_item() {
    let (served, _dir) = Served::new("qwen3", THINKING);
    let mut ban = served.ban.clone();
    if let Some(ban) = ban.as_object_mut() {
        ban.remove(&served.special_id("</think>").to_string());
    }
    let body = |extra: Value| {
        let mut body = json!({"model": "tiny", "input": "Hi", "max_output_tokens": 24, "temperature": 0,
                              "reasoning": {"effort": "low"}, "logit_bias": ban});
        if let (Some(b), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(extra.clone());
        }
        body.to_string()
    };
    let (status, text) = served.post_to("/v1/responses", body(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let r: Value = serde_json::from_str(&text).expect("json");
    let output = r["output"].as_array().expect("output");
    assert_eq!(output[0]["type"], "reasoning", "{r}");
    assert_eq!(output[0]["content"][0]["type"], "reasoning_text");
    assert!(output[0]["content"][0]["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(r["usage"]["output_tokens_details"]["reasoning_tokens"].as_u64().is_some_and(|n| n > 0), "{r}");
    let (_, text) =
        served.post_to("/v1/responses", body(json!({"reasoning": {"effort": "low", "summary": "auto"}}))).await;
    let r: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(r["output"][0]["summary"][0]["type"], "summary_text", "{r}");
    let (status, text) = served.post_to("/v1/responses", body(json!({"stream": true}))).await;
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    let first_delta = kinds.iter().position(|k| *k == "response.reasoning_text.delta").expect("reasoning deltas");
    assert!(kinds[..first_delta].contains(&"response.output_item.added"), "{kinds:?}");
    assert!(kinds.contains(&"response.reasoning_text.done"));

    let (plain, _dir) = Served::new("llama", CHATML);
    let (status, text) = plain
        .post_to("/v1/responses", json!({"model": "tiny", "input": "Hi", "reasoning": {"effort": "high"}}).to_string())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains(r#""param":"reasoning.effort""#), "{text}");
}

/// Legacy completions' `suffix` on a tokenizer with Qwen's fill-in-the-middle
/// markers: the prompt becomes prefix, suffix, middle (the three markers and
/// both texts, byte by byte here); token-id prompts cannot take a suffix.
#[tokio::test]
async fn a_suffix_fills_in_the_middle_where_the_tokenizer_can() {
    let (served, _dir) = Served::new("llama", CHATML);
    let complete = |extra: Value| {
        let mut body = json!({"model": "tiny", "prompt": "def f(", "max_tokens": 3, "temperature": 0});
        if let (Some(b), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(extra.clone());
        }
        body.to_string()
    };
    let (status, text) = served.post_to("/v1/completions", complete(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let plain: Value = serde_json::from_str(&text).expect("json");
    let (status, text) = served.post_to("/v1/completions", complete(json!({"suffix": "):\n"}))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let filled: Value = serde_json::from_str(&text).expect("json");
    let tokens = |r: &Value| r["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!(tokens(&filled), tokens(&plain) + 3 + 3, "three markers and the three bytes of the suffix");
    let (status, text) = served.post_to("/v1/completions", complete(json!({"prompt": [1, 2], "suffix": "x"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains(r#""param":"suffix""#), "{text}");
}

/// `chat_template_kwargs`: variables the template reads, and Qwen3's
/// `enable_thinking` through it.
#[tokio::test]
async fn chat_template_kwargs_reach_the_template() {
    let greeting = format!("{{% if greeting %}}{{{{ greeting }}}}{{% endif %}}{CHATML}");
    let (served, _dir) = Served::new("llama", &greeting);
    let prompt = |r: Value| r["usage"]["prompt_tokens"].as_u64().expect("usage");
    let plain = prompt(served.chat_json(json!({"max_tokens": 1})).await);
    let kwargs = json!({"max_tokens": 1, "chat_template_kwargs": {"greeting": "hello"}});
    assert_eq!(prompt(served.chat_json(kwargs).await), plain + 5, "five more bytes");

    let (thinker, _dir) = Served::new("qwen3", THINKING);
    let off = json!({"max_tokens": 5, "chat_template_kwargs": {"enable_thinking": false}});
    let r = thinker.chat_json(off).await;
    assert!(r["choices"][0]["message"]["reasoning_content"].is_null(), "{r}");
    assert_eq!(r["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);
}

#[tokio::test]
async fn thinking_budget_closes_reasoning_and_counts_it() {
    let (served, _dir) = Served::new("qwen3", THINKING);
    let r = served.chat_json(json!({"max_tokens": 20, "thinking_budget": 3, "seed": 1})).await;
    let message = &r["choices"][0]["message"];
    assert!(!message["reasoning_content"].as_str().expect("reasoning").is_empty(), "{r}");
    // Three sampled tokens, then the engine's "\n" and "</think>".
    assert_eq!(r["usage"]["completion_tokens_details"]["reasoning_tokens"], 5, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 20);
    assert!(message["content"].is_string());

    let off = served.chat_json(json!({"max_tokens": 5, "enable_thinking": false})).await;
    assert!(off["choices"][0]["message"]["reasoning_content"].is_null(), "{off}");
    assert_eq!(off["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);

    let (status, text) = served.chat(json!({"enable_thinking": false, "thinking_budget": 4})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
}

/// A template in the Hermes format: calls are constrained in that format
/// (`<tool_call>` opener included) for named, required and — once the model
/// writes the opener — auto choices; arguments stream as fragments and
/// reassemble to the non-streamed call.
#[tokio::test]
async fn hermes_template_calls_are_constrained_and_streamed() {
    let (served, _dir) = Served::new("qwen2", HERMES);
    let parameters = json!({"type": "object", "properties": {"c": {"enum": ["r", "g"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["c", "n"], "additionalProperties": false});
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": parameters}},
        {"type": "function", "function": {"name": "g"}}]);
    let valid = |call: &Value| {
        assert_eq!(call["type"], "function", "{call}");
        assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{call}");
        assert_eq!(call["function"]["name"], "f", "{call}");
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments")).expect("arguments json");
        assert!(["r", "g"].contains(&arguments["c"].as_str().expect("c")), "{arguments}");
        assert!((0..=9).contains(&arguments["n"].as_i64().expect("n")), "{arguments}");
    };
    let named = json!({"type": "function", "function": {"name": "f"}});
    let tool_call = served.special_id("<tool_call>");
    // Random weights: `auto` is pushed to open a call, and offered only `f`
    // (any object of `g` could go on forever).
    let auto = (json!("auto"), json!({tool_call.to_string(): 100}), json!([tools[0]]));
    for (choice, bias, tools) in [(named.clone(), json!({}), tools.clone()), auto] {
        for seed in 0..3 {
            let body = json!({"tools": tools, "tool_choice": choice, "seed": seed, "max_tokens": 60,
                "parallel_tool_calls": false, "logit_bias": bias});
            let r = served.chat_json(body).await;
            let choice = &r["choices"][0];
            assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
            assert!(choice["message"]["content"].is_null(), "{r}");
            let calls = choice["message"]["tool_calls"].as_array().expect("calls");
            assert_eq!(calls.len(), 1, "{r}");
            valid(&calls[0]);
        }
    }

    let body = json!({"tools": tools, "tool_choice": named, "seed": 7, "max_tokens": 60});
    let whole = served.chat_json(body.clone()).await;
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, text) = served.chat(streamed).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let deltas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("chunk"))
        .flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(deltas.len() > 2, "the arguments arrive in fragments: {text}");
    assert!(deltas[0]["id"].is_string() && deltas[0]["function"]["name"] == "f", "{text}");
    assert!(deltas[1..].iter().all(|d| d["id"].is_null() && d["function"]["name"].is_null()), "{text}");
    let arguments: String = deltas.iter().filter_map(|d| d["function"]["arguments"].as_str()).collect();
    assert_eq!(arguments, whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{text}");
    assert!(text.contains(r#""finish_reason":"tool_calls""#), "{text}");
}

/// Two sequences of one step whose block tables name the same block would
/// have two threads write one KV slot: the CPU forward pass refuses the step
/// (in release builds too) instead of racing.
#[test]
fn a_step_whose_tokens_share_a_kv_slot_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "llama", CHATML);
    let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    let loaded = model::load(dir.path(), &quantized).expect("loads");
    let cache = loaded.model.kv_cache(4, 8).expect("cache");
    let mut logits = Logits::default();
    let shared = [step(&[1, 2], 0, &[3]), step(&[5, 6], 0, &[3])];
    let e = loaded.model.forward(&shared, &cache, &mut logits).expect_err("slots shared");
    assert!(e.to_string().contains("write KV slot"), "{e}");
    let outside = [step(&[1, 2], 0, &[8])];
    assert!(loaded.model.forward(&outside, &cache, &mut logits).is_err(), "block 8 of 8");
    assert!(loaded.model.forward(&[step(&[1, 2], 0, &[3]), step(&[5], 0, &[4])], &cache, &mut logits).is_ok());
}

/// A tokenizer that knows more ids than the model has embedding rows: a prompt
/// holding one is a 400 before it is queued, and the engine's per-sequence
/// check refuses such a sequence (and any that does not fit) on its own.
#[test]
fn token_ids_past_the_embedding_are_refused_before_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "llama", CHATML);
    let mut tok = tokenizer();
    tok.add_tokens([AddedToken::from("<|extra|>", false)]).expect("added");
    tok.save(dir.path().join("tokenizer.json"), false).expect("save tokenizer");
    let loaded = model::load(dir.path(), &LoadOptions::default()).expect("loads");
    let rows = loaded.model.vocab_rows();
    let extra = loaded.tokenizer.token_to_id("<|extra|>").expect("extra");
    assert_eq!(extra as usize, rows, "the tokenizer's last id is past the table");
    let cache = loaded.model.kv_cache(4, 8).expect("cache");
    let model = &loaded.model;
    assert!(model.check(&step(&[1, 2], 0, &[0]), &cache).is_ok());
    for (bad, why) in [
        (step(&[1, extra], 0, &[0]), "vocabulary"),
        (step(&[], 0, &[0]), "without tokens"),
        (step(&[1, 2], 3, &[0]), "do not hold"),
        (step(&[1], 0, &[8]), "outside the KV cache"),
        (step(&[1], CONTEXT, &[0; CONTEXT / 4 + 1]), "past the context"),
    ] {
        let e = model.check(&bad, &cache).expect_err(why);
        assert!(e.contains(why), "{e}");
    }
    let (service, _) = tiny_service_from(loaded);
    let ask = ChatRequest {
        model: "tiny".into(),
        messages: vec![json!({"role": "user", "content": "hi <|extra|>"})],
        n: 1,
        ..Default::default()
    };
    let e = service.prepare(&ask).err().expect("refused");
    assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("messages")), "{}", e.message);
    assert!(e.message.contains("cannot read"), "{}", e.message);
}

/// Logits of a whole prompt run alone from an empty cache.
fn alone(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let cache = model.kv_cache(4, 32).expect("cache");
    let blocks: Vec<u32> = (0..tokens.len().div_ceil(4) as u32).collect();
    common::forward(model, &[step(tokens, 0, &blocks)], &cache).remove(0)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every architecture, dense (candle's tensor operations) and quantized at
/// load (kandle's CPU kernels): sequences at different positions (a decode, a
/// whole prompt, the second chunk of another) in one forward pass get the
/// logits each gets alone.
#[test]
fn batched_logits_equal_single_sequence_logits() {
    // Gemma 3's sequences run past its window (5) in its windowed layer.
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_checkpoint(dir.path(), arch, CHATML);
        let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
        for options in [LoadOptions::default(), quantized] {
            let loaded = model::load(dir.path(), &options).expect("loads");
            let model = &loaded.model;
            let kernels = model.kernels();
            assert_eq!(kernels == "candle", options.quantize.is_none(), "{arch}: {kernels}");
            let cache = model.kv_cache(4, 32).expect("cache");
            let a: Vec<u32> = (1..10).collect();
            let b: Vec<u32> = (20..27).collect();
            let c: Vec<u32> = (40..53).collect();
            common::forward(model, &[step(&a[..8], 0, &[9, 3, 17]), step(&c[..5], 0, &[2, 30, 11, 6])], &cache);
            let second = [step(&a[8..], 8, &[9, 3, 17]), step(&b, 0, &[25, 0]), step(&c[5..], 5, &[2, 30, 11, 6])];
            let batched = common::forward(model, &second, &cache);
            for (name, tokens, got) in [("a", &a, &batched[0]), ("b", &b, &batched[1]), ("c", &c, &batched[2])] {
                let expected = alone(model, tokens);
                // Batched and single kernels sum in different orders: allow the
                // rounding that comes with the logits' size (random weights make
                // it vary run to run); a wrong position or mixed-up sequence is
                // off by the logits' own size.
                let size = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = max_diff(got, &expected);
                assert!(diff < 2e-4 * size.max(5.0), "{arch} {kernels} {name}: {diff} (largest logit {size})");
            }
        }
    }
}

/// Sliding-window attention (Mistral's `sliding_window`), dense and quantized
/// at load: within the window the model is the full-attention one; past it
/// the window changes the logits (the last tokens no longer read the first),
/// and sequences batched at different positions get what each gets alone.
#[test]
fn a_sliding_window_reads_only_the_last_positions() {
    const WINDOW: usize = 5;
    let (full_dir, windowed_dir) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    write_checkpoint(full_dir.path(), "mistral", CHATML);
    write_checkpoint(windowed_dir.path(), "mistral", CHATML);
    patch_config(windowed_dir.path(), json!({"sliding_window": WINDOW, "use_sliding_window": true}));
    let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    for options in [LoadOptions::default(), quantized] {
        let full = model::load(full_dir.path(), &options).expect("loads");
        let windowed = model::load(windowed_dir.path(), &options).expect("loads");
        assert_eq!(windowed.model.config().sliding_window, Some(WINDOW));
        assert_window_cuts_only_past_it(&full.model, &windowed.model, WINDOW);
        let kernels = windowed.model.kernels();
        let long: Vec<u32> = (1..14).collect();

        let model = &windowed.model;
        let cache = model.kv_cache(4, 32).expect("cache");
        let c: Vec<u32> = (40..53).collect();
        common::forward(model, &[step(&long[..8], 0, &[9, 3, 17, 21]), step(&c[..5], 0, &[2, 30, 11, 6])], &cache);
        let second = [step(&long[8..], 8, &[9, 3, 17, 21]), step(&c[5..], 5, &[2, 30, 11, 6])];
        let batched = common::forward(model, &second, &cache);
        for (name, tokens, got) in [("long", &long, &batched[0]), ("c", &c, &batched[1])] {
            let expected = alone(model, tokens);
            let size = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(5.0);
            let diff = max_diff(got, &expected);
            assert!(diff < 2e-4 * size, "{kernels} {name}: {diff}");
        }
    }
}

/// The prompt the candle-transformers references run.
const REFERENCE_PROMPT: [u32; 11] = [5, 61, 17, 200, 3, 90, 44, 12, 150, 7, 31];

/// A candle-transformers model's config and weights from the checkpoint in `dir`.
fn reference_parts<C: serde::de::DeserializeOwned>(dir: &Path) -> (C, candle_nn::VarBuilder<'static>) {
    let config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"));
    // SAFETY: the test wrote the file and nothing changes it while it is mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
    };
    (config.expect("config"), vb.expect("weights"))
}

/// The checkpoint in `dir` gives the reference's logits (`forward(ids, offset)`
/// with a KV cache of its own): the prompt but its last token at once, then
/// that token as a decode step; dense (candle's tensor operations) to float
/// rounding, quantized at load (kandle's CPU kernels) to Q8_0's.
fn assert_matches_reference(
    dir: &Path,
    tokens: &[u32],
    mut forward: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
) {
    let mut logits = |ids: &[u32], offset: usize| -> Vec<f32> {
        let ids = Tensor::new(ids, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        forward(&ids, offset).and_then(|l| l.flatten_all()).and_then(|l| l.to_vec1()).expect("forward")
    };
    let m = tokens.len() - 1;
    let want = [logits(&tokens[..m], 0), logits(&tokens[m..], m)];
    let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    for options in [LoadOptions::default(), quantized] {
        let loaded = model::load(dir, &options).expect("loads");
        let kernels = loaded.model.kernels();
        for (got, want) in [alone(&loaded.model, &tokens[..m]), alone(&loaded.model, tokens)].iter().zip(&want) {
            let size = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            if options.quantize.is_none() {
                // Sums in another order, through random weights that amplify
                // rounding: up to about 10^-3 of the largest logit (it varies
                // with the random checkpoint). A wrong operation moves them by
                // percents (SiLU for GELU: 2%; rotating whole heads for Phi's
                // partial rotation: 80%).
                let diff = max_diff(got, want);
                assert!(diff < 3e-3 * size.max(1.0), "{kernels}: {diff} (largest logit {size})");
            } else {
                let dot: f32 = got.iter().zip(want).map(|(x, y)| x * y).sum();
                let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
                let cosine = dot / (norm(got) * norm(want));
                assert!(cosine > 0.995, "{kernels}: cosine {cosine}");
            }
        }
    }
}

/// Rewrites the keys of `patch` in the checkpoint's config.json.
fn patch_config(dir: &Path, patch: Value) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    if let (Some(c), Some(patch)) = (config.as_object_mut(), patch.as_object()) {
        c.extend(patch.clone());
    }
    std::fs::write(&path, config.to_string()).expect("config");
}

/// Within `window` tokens the windowed model is the full one; past it the
/// logits change (the last tokens no longer read the first).
fn assert_window_cuts_only_past_it(full: &Model, windowed: &Model, window: usize) {
    let kernels = windowed.kernels();
    let short: Vec<u32> = (1..=window as u32).collect();
    let long: Vec<u32> = (1..14).collect();
    let (a, b) = (alone(full, &short), alone(windowed, &short));
    let size = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(5.0);
    assert!(max_diff(&a, &b) < 2e-4 * size, "{kernels}: within the window");
    let (a, b) = (alone(full, &long), alone(windowed, &long));
    assert!(max_diff(&a, &b) > 1e-2 * size, "{kernels}: past the window the logits must change");
}

/// Greedy completions of `prompts`, all submitted at once.
async fn generate(service: &ModelService, prompts: &[&str], max_tokens: usize) -> Vec<String> {
    let requests: Vec<ChatRequest> = prompts
        .iter()
        .map(|p| ChatRequest {
            model: "tiny".into(),
            messages: vec![json!({"role": "user", "content": p})],
            max_tokens: Some(max_tokens),
            n: 1,
            sampling: SamplingOverrides { temperature: Some(0.0), logit_bias: banned(service), ..Default::default() },
            ..Default::default()
        })
        .collect();
    common::completions(service, &requests).await
}

/// End markers banned, so every completion runs to max_tokens.
fn banned(service: &ModelService) -> Vec<(u32, f32)> {
    ["<|im_end|>", "<|im_start|>", "</think>"]
        .iter()
        .filter_map(|t| service.tokenizer.token_to_id(t))
        .map(|id| (id, -100.0))
        .collect()
}

fn tiny_service(
    dir: &Path,
    kv_cache_memory: Option<KvCacheMemory>,
    max_batch_tokens: usize,
) -> (ModelService, Arc<Metrics>) {
    let loaded = model::load(dir, &LoadOptions::default()).expect("loads");
    tiny_service_with(loaded, kv_cache_memory, max_batch_tokens)
}

fn tiny_service_from(loaded: model::LoadedModel) -> (ModelService, Arc<Metrics>) {
    tiny_service_with(loaded, None, 64)
}

fn tiny_service_with(
    loaded: model::LoadedModel,
    kv_cache_memory: Option<KvCacheMemory>,
    max_batch_tokens: usize,
) -> (ModelService, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let limits = EngineLimits {
        max_batch_size: 4,
        max_batch_tokens,
        max_waiting: 8,
        max_context: None,
        kv_cache_memory,
        prefix_cache: true,
        step_timeout: std::time::Duration::from_secs(120),
    };
    let service = ModelService::start(loaded, limits, SamplingOverrides::default(), metrics.clone()).expect("engine");
    (service, metrics)
}

/// A prompt past both the context (32) and the KV pool (16 tokens) is told the
/// context, the limit it would still pass with a larger pool; one within the
/// context but past the pool is told the pool.
#[test]
fn a_refusal_names_the_limit_the_prompt_passes_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "llama", CHATML);
    let loaded = model::load(dir.path(), &LoadOptions::default()).expect("loads");
    let block_bytes = 2 * LAYERS * 16 * KV_HEADS * HEAD_DIM * 2;
    let limits = EngineLimits {
        max_batch_size: 1,
        max_batch_tokens: 64,
        max_waiting: 8,
        max_context: Some(32),
        kv_cache_memory: Some(KvCacheMemory::Bytes(block_bytes as u64)),
        prefix_cache: true,
        step_timeout: std::time::Duration::from_secs(120),
    };
    let service = ModelService::start(loaded, limits, SamplingOverrides::default(), Arc::new(Metrics::default()))
        .expect("engine");
    let ask = |content: &str| ChatRequest {
        model: "tiny".into(),
        messages: vec![json!({"role": "user", "content": content})],
        n: 1,
        ..Default::default()
    };
    let e = service.prepare(&ask(&"word ".repeat(40))).err().expect("past both");
    assert!(e.message.contains("maximum context length is 32 tokens"), "{}", e.message);
    // A token a byte: 19 for the template, 2 for the text.
    let e = service.prepare(&ask("hi")).err().expect("past the pool");
    assert!(e.message.contains("KV cache holds 16 tokens"), "{}", e.message);
}

/// A KV pool too small for four sequences at once: the youngest are preempted
/// and recomputed, and every output is what it is with room for all.
#[tokio::test]
async fn preemption_and_recompute_give_the_same_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "llama", CHATML);
    let prompts = ["Hi there", "Tell me more", "What is up?", "Bye now"];
    let (roomy, _) = tiny_service(dir.path(), None, 64);
    let want = generate(&roomy, &prompts, 24).await;
    // Each sequence needs 3 blocks of 16 tokens; 6 blocks hold two at a time.
    let block_bytes = 2 * LAYERS * 16 * KV_HEADS * HEAD_DIM * 2;
    let (tight, metrics) = tiny_service(dir.path(), Some(KvCacheMemory::Bytes((6 * block_bytes) as u64)), 64);
    let got = generate(&tight, &prompts, 24).await;
    assert!(common::metric(&metrics, "kandle_preemptions_total") > 0.0, "the pool was meant to run dry");
    assert_eq!(got, want);
}

/// `--quantize q8_0`: linear layers whose inner size is a multiple of 32 are
/// quantized at load (here the down projection), the rest stay dense; the
/// logits stay close to the unquantized model's.
#[test]
fn quantize_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "qwen2", CHATML);
    let dense = model::load(dir.path(), &LoadOptions::default()).expect("loads");
    let options = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    let quantized = model::load(dir.path(), &options).expect("loads quantized");
    assert_eq!(quantized.info.quantization, "Q8_0");
    let tokens: Vec<u32> = (3..15).collect();
    let (a, b) = (alone(&dense.model, &tokens), alone(&quantized.model, &tokens));
    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(dot / (norm(&a) * norm(&b)) > 0.99);
}
