//! Checks against the real Gemma 3 270M Q4_K_M GGUF file (fetched by
//! scripts/fetch-gemma3.sh; the test script passes its path in
//! KANDLE_TEST_GEMMA3): its layer pattern, its SentencePiece tokenizer against
//! llama.cpp's ids, and its windowed layers batched against alone past the
//! window.

use std::path::PathBuf;
use std::sync::OnceLock;

use kandle_worker::model::{self, LoadOptions, LoadedModel, TemplateOrigin};
use kandle_worker::runtime::StepSequence;

use crate::common;

fn gemma3() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = std::env::var_os("KANDLE_TEST_GEMMA3")
            .map(PathBuf::from)
            .expect("KANDLE_TEST_GEMMA3 must name gemma-3-270m-q4_k_m.gguf (scripts/fetch-gemma3.sh prints it)");
        let options = LoadOptions { context_limit: Some(2048), ..Default::default() };
        model::load(&path, &options).expect("Gemma 3 loads")
    })
}

#[test]
fn layer_pattern_and_metadata_are_gemma_3s() {
    let loaded = gemma3();
    assert_eq!((loaded.info.architecture.as_str(), loaded.info.quantization.as_str()), ("gemma3", "Q4_K_M"));
    assert_eq!(loaded.info.context_length, 32768);
    let config = loaded.model.config();
    assert_eq!((config.layers, config.hidden, config.head_dim, config.vocab), (18, 640, 256, 262_144));
    let windows: Vec<Option<usize>> = (0..18).map(|i| config.layer_window(i)).collect();
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(*w, if i % 6 == 5 { None } else { Some(512) }, "layer {i}");
    }
    assert_eq!(config.local_rope_theta, Some(10_000.0));
    assert_eq!(config.attention_scale, 1.0 / 16.0);
    assert_eq!(config.kv_window(), None, "the global layers read every position");
    // No chat template in the file: the documented default.
    assert_eq!(loaded.template_origin, TemplateOrigin::Default);
    assert!(loaded.special.add_bos);
    assert!(loaded.special.stop_ids.contains(&1), "<eos>");
    assert!(loaded.special.stop_ids.contains(&106), "<end_of_turn>");
}

/// Ids llama.cpp's /tokenize gives for the same file (BOS first).
#[test]
fn tokenizer_matches_llama_cpp() {
    let loaded = gemma3();
    for (text, want) in [
        ("Hello, world! How are you?", vec![2, 9259, 236764, 1902, 236888, 2088, 659, 611, 236881]),
        ("  leading spaces and\ttabs\nnewlines", vec![2, 138, 26016, 9952, 532, 255968, 39218, 107, 208697]),
        ("naïve café 東京 🚀 ok", vec![2, 1789, 238527, 560, 33443, 86459, 236743, 242015, 7546]),
        ("def f(x):\n    return x**2", vec![2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 1018, 236778]),
    ] {
        let mut ids = vec![2];
        ids.extend_from_slice(loaded.tokenizer.encode(text, false).expect("encodes").get_ids());
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(loaded.tokenizer.decode(&ids[1..], false).expect("decodes"), text);
    }
}

/// A prompt past the 512-token window, computed in one step alone and in
/// chunks batched with another sequence: the same next-token logits.
#[test]
fn batched_equals_alone_past_the_window() {
    let model = &gemma3().model;
    let tokens: Vec<u32> = (0..600u32).map(|i| 1000 + (i * 7919) % 5000).collect();
    let other: Vec<u32> = (0..40u32).map(|i| 2000 + i).collect();
    let cache = model.kv_cache(16, 128).expect("cache");
    let blocks = |first: u32, n: usize| -> Vec<u32> { (first..first + n.div_ceil(16) as u32).collect() };
    let step =
        |tokens: &[u32], start: usize, blocks: &[u32]| StepSequence::new(tokens.to_vec(), start, blocks.to_vec());
    let alone = common::forward(model, &[step(&tokens, 0, &blocks(0, 600))], &cache).remove(0);
    let (a, b) = (blocks(40, 600), blocks(90, 40));
    common::forward(model, &[step(&tokens[..300], 0, &a), step(&other, 0, &b)], &cache);
    common::forward(model, &[step(&tokens[300..599], 300, &a)], &cache);
    let batched = common::forward(model, &[step(&other[..1], 40, &b), step(&tokens[599..], 599, &a)], &cache);
    let size = alone.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = alone.iter().zip(&batched[1]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 2e-3 * size, "{diff} (largest logit {size})");
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    assert_eq!(argmax(&alone), argmax(&batched[1]));
}
