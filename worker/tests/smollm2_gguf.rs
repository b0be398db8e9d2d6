//! Checks against the real SmolLM2-135M-Instruct GGUF file (fetched by
//! scripts/fetch-smollm2.sh; the test script passes its path in KANDLE_TEST_GGUF).

use std::path::PathBuf;
use std::sync::OnceLock;

use kandle_worker::model::{self, LoadedModel, RenderOptions};
use serde_json::json;

fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = std::env::var_os("KANDLE_TEST_GGUF")
            .map(PathBuf::from)
            .expect("KANDLE_TEST_GGUF must name SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh prints it)");
        model::load(&path, None).expect("SmolLM2 loads")
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
    // 8192 in the file, clipped to the rotary window candle's implementation precomputes.
    assert_eq!(info.context_length, 4096);
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
    let model =
        model::load(&path, Some("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>")).expect("loads");
    let text = model.template.render(&[json!({"role": "user", "content": "Hi"})], &RenderOptions::default());
    assert_eq!(text.expect("renders"), "[user]Hi>");
}
