//! Checks against the real SmolLM2-135M-Instruct GGUF file (fetched by
//! scripts/fetch-smollm2.sh; the test script passes its path in KANDLE_TEST_GGUF).

use std::path::PathBuf;
use std::sync::OnceLock;

use kandle_worker::model::{self, LoadOptions, LoadedModel, RenderOptions};
use serde_json::json;

use crate::common;

fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = std::env::var_os("KANDLE_TEST_GGUF")
            .map(PathBuf::from)
            .expect("KANDLE_TEST_GGUF must name SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh prints it)");
        model::load(&path, &LoadOptions::default()).expect("SmolLM2 loads")
    })
}

fn ids(text: &str) -> Vec<u32> {
    smollm2().tokenizer.encode(text, false).expect("encodes").get_ids().to_vec()
}

#[test]
fn metadata_is_read_from_the_file() {
    let info = &smollm2().info;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.quantization, "Q4_1");
    // The file's whole context: kandle's runtime has no fixed rotary window.
    assert_eq!(info.context_length, 8192);
    assert_eq!(info.parameters, 134_515_008);
}

#[test]
fn tokenizer_rebuilt_from_metadata_matches_known_ids() {
    // Ids are the positions of these strings in the file's tokenizer.ggml.tokens.
    assert_eq!(ids("Hello world"), vec![19556, 905]);
    assert_eq!(ids("Hello, how are you?"), vec![19556, 28, 638, 359, 346, 47]);
    assert_eq!(ids(" the"), vec![260]);
    assert_eq!(ids(" café"), vec![37366]);
    // SmolLM2 splits numbers into single digits.
    assert_eq!(ids("2024"), vec![34, 32, 34, 36]);
    // Control tokens are matched whole, never split into pieces.
    assert_eq!(ids("<|im_start|>user\nHi<|im_end|>\n")[..3], [1, 4093, 198]);
    assert_eq!(ids("<|im_end|>"), vec![2]);
}

#[test]
fn tokenizer_round_trips_text() {
    for text in [
        "Hello world",
        "  leading spaces and\ttabs\n\nnew lines ",
        "naïve café — 東京 🚀 ünïcödé",
        "fn main() { println!(\"{}\", 1_000_000); }",
        "3.14159 + 2e10 = ?",
    ] {
        let decoded = smollm2().tokenizer.decode(&ids(text), false).expect("decodes");
        assert_eq!(decoded, text);
    }
}

#[test]
fn end_of_turn_and_end_of_text_stop_generation() {
    let special = &smollm2().special;
    assert!(special.stop_ids.contains(&2), "<|im_end|> (EOS) stops");
    assert!(special.stop_ids.contains(&0), "<|endoftext|> stops");
    assert!(!special.add_bos);
}

#[test]
fn the_files_own_chat_template_is_used() {
    let messages = [json!({"role": "user", "content": "Hi"})];
    let text = smollm2().template.render(&messages, &RenderOptions::default()).expect("renders");
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn template_override_replaces_the_files() {
    let path = std::env::var_os("KANDLE_TEST_GGUF").map(PathBuf::from).expect("KANDLE_TEST_GGUF");
    let model = model::load(
        &path,
        &LoadOptions {
            chat_template: Some("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>"),
            context_limit: Some(64),
            ..Default::default()
        },
    )
    .expect("loads");
    let text = model.template.render(&[json!({"role": "user", "content": "Hi"})], &RenderOptions::default());
    assert_eq!(text.expect("renders"), "[user]Hi>");
}

mod runtime {
    use std::fs::File;
    use std::io::BufReader;

    use candle_core::quantized::gguf_file::Content;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama;
    use kandle_worker::runtime::StepSequence;

    use super::common::forward;
    use super::*;

    fn prompt(text: &str) -> Vec<u32> {
        ids(text)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn argmax(v: &[f32]) -> usize {
        v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
    }

    /// The runtime's logits for a whole prompt, alone, from an empty cache.
    fn alone(tokens: &[u32]) -> Vec<f32> {
        let model = &smollm2().model;
        let cache = model.kv_cache(16, 64).expect("cache");
        let blocks: Vec<u32> = (0..tokens.len().div_ceil(16) as u32).collect();
        let step = StepSequence::new(tokens.to_vec(), 0, blocks);
        forward(model, &[step], &cache).remove(0)
    }

    /// kandle's forward pass agrees with candle's own quantized Llama on SmolLM2.
    #[test]
    fn logits_match_candles_reference_implementation() {
        let path = std::env::var_os("KANDLE_TEST_GGUF").map(PathBuf::from).expect("KANDLE_TEST_GGUF");
        let mut reader = BufReader::new(File::open(&path).expect("open"));
        let content = Content::read(&mut reader).expect("gguf");
        let mut reference = quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).expect("ref");
        let tokens = prompt("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n");
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu).expect("t").unsqueeze(0).expect("batch");
        let want = reference.forward(&input, 0).expect("forward").flatten_all().expect("flat");
        let want = want.to_vec1::<f32>().expect("logits");
        // Both quantize activations to 8 bits before each Q4_1 matmul, so a
        // one-ulp difference upstream (sums in another order, an f16 KV cache)
        // can flip a rounding and move single logits by a point or so; the
        // distribution and the model's choice stay the same.
        let got = alone(&tokens);
        let similarity = cosine(&got, &want);
        assert!(similarity > 0.995, "cosine similarity {similarity}, max diff {}", max_diff(&got, &want));
        assert_eq!(argmax(&got), argmax(&want));
    }

    /// Greedy answers to a fixed prompt set, token by token, against candle's
    /// quantized Llama (the kernels the worker ran before its own): the same
    /// tokens, or, where the two part, their two choices were within 1.0 of each
    /// other in both sets of logits (a near tie that 8-bit activation rounding
    /// can flip).
    #[test]
    fn greedy_answers_match_the_previous_kernels() {
        let path = std::env::var_os("KANDLE_TEST_GGUF").map(PathBuf::from).expect("KANDLE_TEST_GGUF");
        let model = &smollm2().model;
        let prompts = [
            "What is the capital of France?",
            "Write a haiku about the sea.",
            "List three prime numbers.",
            "Explain what a thread pool is in one sentence.",
        ];
        let (mut same, mut total) = (0, 0);
        for question in prompts {
            let mut reader = BufReader::new(File::open(&path).expect("open"));
            let content = Content::read(&mut reader).expect("gguf");
            let mut reference =
                quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).expect("ref");
            let mut tokens = prompt(&format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"));
            let cache = model.kv_cache(16, 64).expect("cache");
            let blocks: Vec<u32> = (0..64).collect();
            let mut step = StepSequence::new(tokens.clone(), 0, blocks);
            let mut fed = 0;
            for _ in 0..24 {
                let ours = forward(model, std::slice::from_ref(&step), &cache).remove(0);
                let input = Tensor::new(&tokens[fed..], &Device::Cpu).expect("t").unsqueeze(0).expect("batch");
                let theirs = reference.forward(&input, fed).expect("forward").flatten_all().expect("flat");
                let theirs = theirs.to_vec1::<f32>().expect("logits");
                fed = tokens.len();
                let (a, b) = (argmax(&ours), argmax(&theirs));
                total += 1;
                if a != b {
                    let close = |l: &[f32]| (l[a] - l[b]).abs() <= 1.0;
                    assert!(close(&ours) && close(&theirs), "{question:?}: {a} vs {b} after {same} equal tokens");
                    break;
                }
                same += 1;
                step = StepSequence::new(vec![a as u32], tokens.len(), step.blocks);
                tokens.push(a as u32);
            }
        }
        eprintln!("{same} of {total} greedy tokens equal to candle's");
        assert!(same * 2 > total, "{same} of {total}");
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    }

    /// Sequences at different positions, prefilling in chunks and decoding, in
    /// one forward pass: each gets the logits it gets alone.
    #[test]
    fn batched_logits_equal_single_sequence_logits() {
        let model = &smollm2().model;
        let cache = model.kv_cache(16, 64).expect("cache");
        let a = prompt("<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\nRed");
        let b = prompt("Once upon a time, in a land far away, there lived a");
        let c = prompt("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19");
        let (blocks_a, blocks_b, blocks_c) = (vec![5u32, 1, 9], vec![2u32, 7, 3], vec![11u32, 0, 4, 13, 8]);
        // Step 1: a's prompt but its last token, and c's first 10 tokens.
        let first = [
            StepSequence::new(a[..a.len() - 1].to_vec(), 0, blocks_a.clone()),
            StepSequence::new(c[..10].to_vec(), 0, blocks_c.clone()),
        ];
        forward(model, &first, &cache);
        // Step 2: a decodes its last token, b prefills whole, c prefills the rest.
        let second = [
            StepSequence::new(vec![a[a.len() - 1]], a.len() - 1, blocks_a),
            StepSequence::new(b.clone(), 0, blocks_b),
            StepSequence::new(c[10..].to_vec(), 10, blocks_c),
        ];
        let batched = forward(model, &second, &cache);
        for (name, tokens, got) in [("a", &a, &batched[0]), ("b", &b, &batched[1]), ("c", &c, &batched[2])] {
            let diff = max_diff(got, &alone(tokens));
            assert!(diff < 1e-3, "{name}: {diff}");
        }
    }
}

mod engine {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kandle_worker::api::request::{ChatRequest, SamplingOverrides};
    use kandle_worker::metrics::Metrics;
    use kandle_worker::service::{EngineLimits, ModelService};

    use super::common::{completions, metric};
    use super::*;

    fn service(max_batch_size: usize, max_batch_tokens: usize) -> (ModelService, Arc<Metrics>) {
        let path = std::env::var_os("KANDLE_TEST_GGUF").map(PathBuf::from).expect("KANDLE_TEST_GGUF");
        let loaded =
            model::load(&path, &LoadOptions { context_limit: Some(2048), ..Default::default() }).expect("loads");
        let metrics = Arc::new(Metrics::default());
        let limits = EngineLimits {
            max_batch_size,
            max_batch_tokens,
            max_waiting: 16,
            max_context: Some(2048),
            kv_cache_memory: None,
            prefix_cache: false,
            step_timeout: std::time::Duration::from_secs(120),
        };
        let service =
            ModelService::start(loaded, limits, SamplingOverrides::default(), metrics.clone()).expect("engine");
        (service, metrics)
    }

    fn request(text: &str, max_tokens: usize) -> ChatRequest {
        ChatRequest {
            model: "smollm2".into(),
            messages: vec![json!({"role": "user", "content": text})],
            max_tokens: Some(max_tokens),
            n: 1,
            sampling: SamplingOverrides { temperature: Some(0.0), ..Default::default() },
            ..Default::default()
        }
    }

    /// Greedy completions of eight prompts of different lengths are the same
    /// decoded one at a time and all together in shared forward passes.
    #[tokio::test]
    async fn greedy_output_is_the_same_alone_and_batched() {
        let prompts = [
            "Hi",
            "Name three colors.",
            "What is the capital of France? Answer in one word.",
            "Count from one to five.",
            "Write a haiku about the sea.",
            "Explain in one sentence why the sky is blue, for a child who asks at bedtime.",
            "2+2=",
            "List the planets of the solar system in order from the sun, separated by commas.",
        ];
        let requests: Vec<ChatRequest> = prompts.iter().map(|p| request(p, 12)).collect();
        let (one_at_a_time, _) = service(1, 256);
        let mut alone = Vec::new();
        for r in &requests {
            alone.extend(completions(&one_at_a_time, std::slice::from_ref(r)).await);
        }
        let (batching, metrics) = service(8, 64);
        let together = completions(&batching, &requests).await;
        assert_eq!(together, alone);
        let (sum, count) =
            (metric(&metrics, "kandle_step_sequences_sum"), metric(&metrics, "kandle_step_sequences_count"));
        assert!(sum / count > 2.0, "sequences were meant to share steps: {sum} in {count}");
    }

    /// A client that leaves during a long prefill (chunked, 16 tokens a step)
    /// frees its blocks at the next step.
    #[tokio::test]
    async fn cancellation_during_prefill_frees_blocks() {
        let (service, metrics) = service(4, 16);
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(60);
        let prepared = service.prepare(&request(&long, 8)).expect("prepares");
        let prompt_tokens = prepared.prompt_tokens as f64;
        service.engine.submit(prepared.request).expect("submits");
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(&metrics, "kandle_prefill_tokens_total") < 32.0 {
            assert!(Instant::now() < deadline, "prefill never started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(prepared.events);
        assert!(metric(&metrics, "kandle_prefill_tokens_total") < prompt_tokens, "still prefilling when cancelled");
        assert!(metric(&metrics, "vllm:kv_cache_usage_perc") > 0.0);
        while metric(&metrics, "vllm:kv_cache_usage_perc") != 0.0
            || metric(&metrics, "vllm:num_requests_running") != 0.0
        {
            assert!(Instant::now() < deadline, "blocks still held after the client left");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(metric(&metrics, "kandle_prefill_tokens_total") < prompt_tokens, "the prefill did not run to its end");
    }
}

#[test]
fn quantize_is_refused_for_gguf_files() {
    let path = std::env::var_os("KANDLE_TEST_GGUF").map(PathBuf::from).expect("KANDLE_TEST_GGUF");
    let options = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    let error = model::load(&path, &options).expect_err("refused");
    assert!(error.to_string().contains("--quantize applies to safetensors"), "{error}");
}
