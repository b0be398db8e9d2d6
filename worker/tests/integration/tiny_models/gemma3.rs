//! The tiny Gemma 3 against candle-transformers' Gemma 3 on the same weights,
//! and its windowed layer against the same model without a window.

use candle_core::Tensor;
use candle_transformers::models::gemma3;
use kandle_worker::model::{self, LoadOptions};
use serde_json::json;

use super::{
    assert_matches_reference, assert_window_cuts_only_past_it, patch_config, reference_parts, write_checkpoint, CHATML,
};
use super::{GEMMA_WINDOW, REFERENCE_PROMPT};

/// Writes the tiny Gemma 3 with `window` in place of its own.
fn checkpoint(window: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "gemma3", CHATML);
    patch_config(dir.path(), json!({"sliding_window": window}));
    dir
}

/// Within the window (candle's windowed layers keep one more position than
/// Hugging Face's and llama.cpp's, so the reference runs inside it): the
/// scaled embedding, norms as offsets from 1, q/k norms, post norms, GeGLU and
/// each layer's own rotary base.
#[test]
fn gemma3_matches_candle_transformers() {
    let dir = checkpoint(64);
    let (config, vb) = reference_parts::<gemma3::Config>(dir.path());
    let mut reference = gemma3::Model::new(false, &config, vb).expect("model");
    assert_matches_reference(dir.path(), &REFERENCE_PROMPT, |ids: &Tensor, offset| reference.forward(ids, offset));
}

/// The windowed layer: within its window the model is the one without a
/// window; past it the logits change.
#[test]
fn gemma3_windowed_layers_read_only_their_window() {
    let (full, windowed) = (checkpoint(64), checkpoint(GEMMA_WINDOW));
    let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    for options in [LoadOptions::default(), quantized] {
        let full = model::load(full.path(), &options).expect("loads");
        let windowed = model::load(windowed.path(), &options).expect("loads");
        let config = windowed.model.config();
        assert_eq!((config.layer_window(0), config.layer_window(1)), (Some(GEMMA_WINDOW), None));
        assert_window_cuts_only_past_it(&full.model, &windowed.model, GEMMA_WINDOW);
    }
}
