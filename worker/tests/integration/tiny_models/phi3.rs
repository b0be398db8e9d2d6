//! The tiny Phi-3 (fused q/k/v and gate/up, half of each head rotating)
//! against candle-transformers' Phi-3 on the same weights.

use candle_core::{Device, Tensor};
use candle_transformers::models::phi3;

use super::{assert_matches_reference, reference_parts, write_checkpoint, CHATML, REFERENCE_PROMPT};

#[test]
fn phi3_matches_candle_transformers() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "phi3", CHATML);
    let (config, vb) = reference_parts::<phi3::Config>(dir.path());
    let mut reference = phi3::Model::new(&config, vb).expect("model");
    assert_matches_reference(dir.path(), &REFERENCE_PROMPT, |ids: &Tensor, offset| reference.forward(ids, offset));
}

/// The same tiny Phi-3 written as a GGUF file the way llama.cpp lays Phi-3
/// out (fused `attn_qkv` and `ffn_up`, gate first; `rope.dimension_count`),
/// in Q8_0: it loads, splits its fused projections by rows, and gives the
/// logits of the safetensors checkpoint quantized to Q8_0 at load, which are
/// the same bytes through the same kernels.
#[test]
fn phi3_gguf_with_fused_projections_matches_the_checkpoint() {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::{GgmlDType, QTensor};
    use kandle_worker::model::{self, LoadOptions};

    use super::{alone, max_diff, CONTEXT, HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS};

    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), "phi3", CHATML);
    let weights = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).expect("weights");
    let get = |name: &str| weights.get(name).unwrap_or_else(|| panic!("{name}"));
    let q8 = |name: &str| QTensor::quantize(get(name), GgmlDType::Q8_0).expect("quantize");
    let f32 = |name: &str| QTensor::quantize(get(name), GgmlDType::F32).expect("f32");
    let mut tensors = vec![
        ("token_embd.weight".to_string(), q8("model.embed_tokens.weight")),
        ("output_norm.weight".to_string(), f32("model.norm.weight")),
    ];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        tensors.extend([
            (format!("blk.{i}.attn_norm.weight"), f32(&format!("{p}.input_layernorm.weight"))),
            (format!("blk.{i}.attn_qkv.weight"), q8(&format!("{p}.self_attn.qkv_proj.weight"))),
            (format!("blk.{i}.attn_output.weight"), q8(&format!("{p}.self_attn.o_proj.weight"))),
            (format!("blk.{i}.ffn_norm.weight"), f32(&format!("{p}.post_attention_layernorm.weight"))),
            (format!("blk.{i}.ffn_up.weight"), q8(&format!("{p}.mlp.gate_up_proj.weight"))),
            (format!("blk.{i}.ffn_down.weight"), q8(&format!("{p}.mlp.down_proj.weight"))),
        ]);
    }
    let metadata = [
        ("general.architecture", Value::String("phi3".into())),
        ("phi3.context_length", Value::U32(CONTEXT as u32)),
        ("phi3.embedding_length", Value::U32(HIDDEN as u32)),
        ("phi3.feed_forward_length", Value::U32(INTERMEDIATE as u32)),
        ("phi3.block_count", Value::U32(LAYERS as u32)),
        ("phi3.attention.head_count", Value::U32(HEADS as u32)),
        ("phi3.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("phi3.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("phi3.rope.freq_base", Value::F32(10_000.0)),
        ("phi3.rope.dimension_count", Value::U32((HEAD_DIM / 2) as u32)),
    ];
    // Beside tokenizer.json, which the loader takes over GGUF metadata.
    let path = dir.path().join("tiny-phi3.Q8_0.gguf");
    let mut file = std::fs::File::create(&path).expect("create");
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors).expect("write gguf");
    drop(file);

    let gguf = model::load(&path, &LoadOptions::default()).expect("the GGUF loads");
    assert_eq!((gguf.info.architecture.as_str(), gguf.model.config().rotary_dim), ("phi3", HEAD_DIM / 2));
    let quantized = LoadOptions { quantize: Some(model::Quantize::Q8_0), ..Default::default() };
    let checkpoint = model::load(dir.path(), &quantized).expect("the checkpoint loads");
    let tokens: Vec<u32> = (3..20).collect();
    let (a, b) = (alone(&gguf.model, &tokens), alone(&checkpoint.model, &tokens));
    let size = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_diff(&a, &b) <= 1e-5 * size, "{} (largest logit {size})", max_diff(&a, &b));
}
