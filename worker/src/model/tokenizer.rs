//! Tokenizers: read from `tokenizer.json`, or rebuilt from a GGUF file's metadata.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf_meta::Metadata;
use super::LoadError;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's numbering).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Split patterns of the BPE pre-tokenizers that llama.cpp names in `tokenizer.ggml.pre`.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn from_file(path: &Path) -> Result<Tokenizer, LoadError> {
    Tokenizer::from_file(path).map_err(|e| LoadError::Format(format!("cannot read {}: {e}", path.display())))
}

/// Rebuilds the Hugging Face tokenizer a GGUF file was converted from, out of its
/// vocabulary, merges, token types and pre-tokenizer name.
pub fn from_gguf(meta: &Metadata<'_>) -> Result<Tokenizer, LoadError> {
    let kind = meta.require_string("tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(LoadError::Unsupported(format!(
            "GGUF tokenizer model `{kind}` cannot be rebuilt from metadata; \
             put its tokenizer.json beside the GGUF file"
        )));
    }
    let tokens = meta.string_array("tokenizer.ggml.tokens")?;
    let merges = meta
        .string_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| LoadError::Format(format!("malformed BPE merge `{m}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let types = meta.int_array("tokenizer.ggml.token_type").unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(LoadError::Format(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }

    let vocab =
        tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect::<tokenizers::models::bpe::Vocab>();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| LoadError::Format(format!("invalid BPE vocabulary: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(meta.string("tokenizer.ggml.pre"))?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(content, t)| AddedToken::from(content.clone(), *t == TOKEN_TYPE_CONTROL).normalized(false))
        .collect();
    tokenizer.add_special_tokens(added).map_err(|e| LoadError::Format(format!("cannot add special tokens: {e}")))?;
    Ok(tokenizer)
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` name stands for.
fn pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper, LoadError> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, LoadError> {
        Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map(Into::into)
            .map_err(|e| LoadError::Format(format!("pre-tokenizer pattern: {e}")))
    };
    Ok(match pre.unwrap_or("default") {
        "llama-bpe" | "llama3" | "falcon3" | "pixtral" => {
            Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]).into()
        }
        "qwen2" | "qwen35" | "deepseek-r1-qwen" => Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]).into(),
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        other => {
            if !matches!(other, "default" | "gpt2" | "gpt-2") {
                tracing::warn!(pre = other, "unknown GGUF pre-tokenizer, using GPT-2's");
            }
            byte_level(true)
        }
    })
}
