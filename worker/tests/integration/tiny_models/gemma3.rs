//! The tiny Gemma 3 against candle-transformers' Gemma 3 on the same weights,
//! and its windowed layer against the same model without a window.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::gemma3;
use kandle_worker::model::{self, LoadOptions};
use serde_json::json;

use super::{alone, assert_window_cuts_only_past_it, max_diff, patch_config, write_checkpoint, CHATML, GEMMA_WINDOW};

/// Writes the tiny Gemma 3 with `window` in place of its own.
fn checkpoint(window: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "gemma3", CHATML);
    patch_config(dir.path(), json!({"sliding_window": window}));
    dir
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Logits of each prefix's last token by candle-transformers' Gemma 3: the
/// prompt but its last token at once, then the last one as a decode step.
fn reference(dir: &std::path::Path, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let config: gemma3::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("config");
    // SAFETY: the test wrote the file and nothing changes it while it is mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
    }
    .expect("weights");
    let mut model = gemma3::Model::new(false, &config, vb).expect("model");
    let (head, last) = tokens.split_at(tokens.len() - 1);
    let run = |model: &mut gemma3::Model, ids: &[u32], offset: usize| -> Vec<f32> {
        let ids = Tensor::new(ids, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        model.forward(&ids, offset).and_then(|l| l.flatten_all()).and_then(|l| l.to_vec1()).expect("forward")
    };
    let prefill = run(&mut model, head, 0);
    let decode = run(&mut model, last, head.len());
    (prefill, decode)
}

/// Within the window (candle's windowed layers keep one more position than
/// Hugging Face's and llama.cpp's, so the reference runs inside it): the
/// scaled embedding, norms as offsets from 1, q/k norms, post norms, GeGLU and
/// each layer's own rotary base, dense (candle's tensor operations) to float
/// rounding and quantized at load (kandle's CPU kernels) to Q8_0's.
#[test]
fn gemma3_matches_candle_transformers() {
    let dir = checkpoint(64);
    let tokens: Vec<u32> = vec![5, 61, 17, 200, 3, 90, 44, 12, 150, 7, 31];
    let (want_prefill, want_decode) = reference(dir.path(), &tokens);
    let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    for options in [LoadOptions::default(), quantized] {
        let loaded = model::load(dir.path(), &options).expect("loads");
        let kernels = loaded.model.kernels();
        let (n, m) = (tokens.len(), tokens.len() - 1);
        for (got, want, what) in [
            (alone(&loaded.model, &tokens[..m]), &want_prefill, "prefill"),
            (alone(&loaded.model, &tokens[..n]), &want_decode, "decode"),
        ] {
            let size = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            if options.quantize.is_none() {
                let diff = max_diff(&got, want);
                assert!(diff < 1e-4 * size.max(1.0), "{kernels} {what}: {diff} (largest logit {size})");
            } else {
                let c = cosine(&got, want);
                assert!(c > 0.995, "{kernels} {what}: cosine {c}");
            }
        }
    }
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
