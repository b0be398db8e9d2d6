//! Tokenizers: read from `tokenizer.json`, or rebuilt from a GGUF file's metadata.

use std::path::Path;
use std::sync::Arc;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf_meta::Metadata;
use super::LoadError;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's numbering).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_UNUSED: i64 = 5;

/// SentencePiece's space.
const SPACE: &str = "\u{2581}";

/// Split patterns of the BPE pre-tokenizers that llama.cpp names in `tokenizer.ggml.pre`.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn from_file(path: &Path) -> Result<Tokenizer, LoadError> {
    Tokenizer::from_file(path).map_err(|e| LoadError::Format(format!("cannot read {}: {e}", path.display())))
}

/// Rebuilds the tokenizer a GGUF file was converted from, out of its metadata:
/// `gpt2` (byte-level BPE: vocabulary, merges, pre-tokenizer name) or `llama`
/// (SentencePiece: vocabulary, scores, byte fallback).
pub fn from_gguf(meta: &Metadata<'_>) -> Result<Tokenizer, LoadError> {
    let kind = meta.require_string("tokenizer.ggml.model")?;
    let tokens = meta.string_array("tokenizer.ggml.tokens")?;
    let types = meta.int_array("tokenizer.ggml.token_type").unwrap_or_else(|| vec![TOKEN_TYPE_NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(LoadError::Format(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let mut tokenizer = match kind {
        "gpt2" => byte_level_bpe(meta, &tokens)?,
        "llama" => sentencepiece(meta, &tokens, &types)?,
        other => {
            return Err(LoadError::Unsupported(format!(
                "GGUF tokenizer model `{other}` cannot be rebuilt from metadata (kandle rebuilds `gpt2` and \
                 `llama`); put its tokenizer.json beside the GGUF file"
            )))
        }
    };
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(content, t)| AddedToken::from(content.clone(), *t == TOKEN_TYPE_CONTROL).normalized(false))
        .collect();
    tokenizer.add_special_tokens(added).map_err(|e| LoadError::Format(format!("cannot add special tokens: {e}")))?;
    Ok(tokenizer)
}

/// One token's text, as logprobs show it: with the leading space a
/// SentencePiece piece (`▁Hello`) holds, which its decoder strips from the
/// start of a text.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    let decoded = tokenizer.decode(&[id], false).unwrap_or_default();
    match tokenizer.id_to_token(id) {
        Some(piece) if piece.starts_with(SPACE) && !decoded.starts_with(' ') => format!(" {decoded}"),
        _ => decoded,
    }
}

/// `tokenizer` for text inside an answer (what a grammar fixes): a
/// SentencePiece tokenizer's space prefix belongs to the start of a prompt,
/// not to a fragment, so its `Prepend` normalizer is left out.
/// A tokenizer without one is shared, not copied.
pub fn without_space_prefix(tokenizer: &Arc<Tokenizer>) -> Arc<Tokenizer> {
    let kept = match tokenizer.get_normalizer() {
        Some(NormalizerWrapper::Prepend(_)) => None,
        Some(NormalizerWrapper::Sequence(sequence))
            if sequence.as_ref().iter().any(|n| matches!(n, NormalizerWrapper::Prepend(_))) =>
        {
            let rest = sequence.as_ref().iter().filter(|n| !matches!(n, NormalizerWrapper::Prepend(_))).cloned();
            Some(NormalizerSequence::new(rest.collect()))
        }
        _ => return tokenizer.clone(),
    };
    let mut fragments = Tokenizer::clone(tokenizer);
    // Setting a normalizer only fails for added tokens that no longer
    // normalize; then the tokenizer stays as it was.
    if fragments.with_normalizer(kept).is_err() {
        return tokenizer.clone();
    }
    Arc::new(fragments)
}

/// GPT-2-style byte-level BPE.
fn byte_level_bpe(meta: &Metadata<'_>, tokens: &[String]) -> Result<Tokenizer, LoadError> {
    let merges = meta
        .string_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| LoadError::Format(format!("malformed BPE merge `{m}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab =
        tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect::<tokenizers::models::bpe::Vocab>();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| LoadError::Format(format!("invalid BPE vocabulary: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(meta.string("tokenizer.ggml.pre"))?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// SentencePiece's BPE (Llama, Mistral, Gemma): spaces become `▁` (one put
/// before the text with `tokenizer.ggml.add_space_prefix`, default on, as
/// llama.cpp reads it), then adjacent pieces merge, the pair whose merged
/// piece scores highest first; a character no piece covers becomes its
/// UTF-8 bytes' `<0xXX>` pieces. Expressed as BPE: every way to split a
/// piece into two pieces is a merge, ranked by the merged piece's score.
fn sentencepiece(meta: &Metadata<'_>, tokens: &[String], types: &[i64]) -> Result<Tokenizer, LoadError> {
    let scores = meta
        .float_array("tokenizer.ggml.scores")
        .ok_or_else(|| LoadError::Format("GGUF metadata key `tokenizer.ggml.scores` is missing".into()))?;
    if scores.len() != tokens.len() {
        return Err(LoadError::Format(format!("{} token scores for {} tokens", scores.len(), tokens.len())));
    }
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
    let merges = sentencepiece_merges(tokens, types, &scores, &vocab);
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = meta.uint("tokenizer.ggml.unknown_token_id").and_then(|id| tokens.get(id as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| LoadError::Format(format!("invalid SentencePiece vocabulary: {e}")))?;

    let prefix = meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let space = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| LoadError::Format(format!("SentencePiece normalizer: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        normalizers.push(Prepend::new(SPACE.into()).into());
    }
    normalizers.push(space(" ", SPACE)?.into());
    let mut decoders: Vec<DecoderWrapper> =
        vec![space(SPACE, " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| LoadError::Format(format!("SentencePiece normalizer: {e}")))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Every split of a mergeable piece into two pieces of the vocabulary, the
/// merges of higher-scoring pieces first (ties: lower ids first, then the
/// split further left).
fn sentencepiece_merges(
    tokens: &[String],
    types: &[i64],
    scores: &[f64],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f64, usize, usize, (String, String))> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Control, byte and unknown pieces are never made by merging.
        if !matches!(types[id], TOKEN_TYPE_NORMAL | TOKEN_TYPE_USER_DEFINED | TOKEN_TYPE_UNUSED) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id, at, (left.to_string(), right.to_string())));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, _, merge)| merge).collect()
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

    use super::*;

    const UNKNOWN: i64 = 2;
    const BYTE: i64 = 6;

    /// A `llama` (SentencePiece) GGUF header: `<unk>`, `<s>`, `</s>`, the 256
    /// byte pieces, then `pieces` with their scores.
    fn sentencepiece_gguf(pieces: &[(&str, f32)], add_space_prefix: Option<bool>) -> Content {
        let mut all: Vec<(String, f32, i64)> = vec![
            ("<unk>".into(), 0.0, UNKNOWN),
            ("<s>".into(), 0.0, TOKEN_TYPE_CONTROL),
            ("</s>".into(), 0.0, TOKEN_TYPE_CONTROL),
        ];
        all.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, BYTE)));
        all.extend(pieces.iter().map(|(p, s)| (p.to_string(), *s, TOKEN_TYPE_NORMAL)));
        let array = |f: &dyn Fn(&(String, f32, i64)) -> Value| Value::Array(all.iter().map(f).collect());
        let mut metadata = HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
            ("tokenizer.ggml.tokens".to_string(), array(&|t| Value::String(t.0.clone()))),
            ("tokenizer.ggml.scores".to_string(), array(&|t| Value::F32(t.1))),
            ("tokenizer.ggml.token_type".to_string(), array(&|t| Value::I32(t.2 as i32))),
            ("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0)),
        ]);
        if let Some(prefix) = add_space_prefix {
            metadata.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(prefix));
        }
        Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
    }

    /// SentencePiece's own procedure, written out: spaces to `▁`, then merge
    /// the adjacent pair whose merged piece scores highest (the leftmost on a
    /// tie) until none is a piece; characters no piece holds become bytes.
    fn reference(pieces: &[(&str, f32)], text: &str, prefix: bool) -> Vec<String> {
        let score: HashMap<&str, f32> = pieces.iter().copied().collect();
        let prefix = if prefix && !text.is_empty() { SPACE } else { "" };
        let text = format!("{prefix}{}", text.replace(' ', SPACE));
        let mut symbols: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let best = (0..symbols.len().saturating_sub(1))
                .filter_map(|i| score.get(format!("{}{}", symbols[i], symbols[i + 1]).as_str()).map(|s| (i, *s)))
                .fold(None, |best: Option<(usize, f32)>, (i, s)| match best {
                    Some((_, b)) if b >= s => best,
                    _ => Some((i, s)),
                });
            let Some((i, _)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        symbols
            .into_iter()
            .flat_map(|s| {
                if score.contains_key(s.as_str()) {
                    vec![s]
                } else {
                    s.bytes().map(|b| format!("<0x{b:02X}>")).collect()
                }
            })
            .collect()
    }

    const PIECES: &[(&str, f32)] = &[
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.1),
        ("l", -2.2),
        ("o", -2.3),
        ("w", -2.4),
        ("r", -2.5),
        ("d", -2.6),
        ("a", -2.7),
        ("ll", -3.0),
        ("he", -3.1),
        ("llo", -3.5),
        ("hello", -4.0),
        ("\u{2581}hello", -4.5),
        ("\u{2581}w", -3.2),
        ("or", -3.3),
        ("\u{2581}wor", -5.0),
        ("ld", -3.4),
        ("\u{2581}world", -6.0),
        ("\u{2581}\u{2581}", -5.5),
        ("ra", -7.0),
        ("\u{2581}h", -9.0),
    ];

    #[test]
    fn sentencepiece_pieces_come_out_as_sentencepiece_makes_them() {
        for prefix in [None, Some(false)] {
            let content = sentencepiece_gguf(PIECES, prefix);
            let tokenizer = from_gguf(&Metadata::new(&content)).expect("a tokenizer");
            let with_prefix = prefix.unwrap_or(true);
            for text in ["hello world", "hello  world", "held", "whorled", "ahoy é!", " world", "", "llollo a\u{2581}b"]
            {
                let encoding = tokenizer.encode(text, false).expect("encodes");
                assert_eq!(
                    encoding.get_tokens(),
                    reference(PIECES, text, with_prefix),
                    "{text:?} prefix {with_prefix}"
                );
                let decoded = tokenizer.decode(encoding.get_ids(), false).expect("decodes");
                // `▁` in the text reads back as a space, as in SentencePiece.
                assert_eq!(decoded, text.replace('\u{2581}', " "), "{text:?} prefix {with_prefix}");
            }
        }
    }

    #[test]
    fn a_tokens_text_keeps_its_leading_space() {
        let content = sentencepiece_gguf(PIECES, None);
        let tokenizer = from_gguf(&Metadata::new(&content)).expect("a tokenizer");
        let id = |piece: &str| tokenizer.token_to_id(piece).expect("a piece");
        assert_eq!(token_text(&tokenizer, id("\u{2581}world")), " world");
        assert_eq!(token_text(&tokenizer, id("ld")), "ld");
        assert_eq!(token_text(&tokenizer, id("\u{2581}")), " ");
    }

    #[test]
    fn fragments_are_tokenized_without_the_space_prefix() {
        let content = sentencepiece_gguf(PIECES, None);
        let tokenizer = Arc::new(from_gguf(&Metadata::new(&content)).expect("a tokenizer"));
        let tokens = |t: &Tokenizer, text: &str| t.encode(text, false).expect("encodes").get_tokens().to_vec();
        assert_eq!(tokens(&tokenizer, "hello"), ["\u{2581}hello"]);
        let fragments = without_space_prefix(&tokenizer);
        assert_eq!(tokens(&fragments, "hello"), ["hello"]);
        assert_eq!(tokens(&fragments, "hello world"), ["hello", "\u{2581}world"]);
        // Without a space prefix there is nothing to take out: the same tokenizer.
        let plain = Arc::new(from_gguf(&Metadata::new(&sentencepiece_gguf(PIECES, Some(false)))).expect("a tokenizer"));
        assert!(Arc::ptr_eq(&without_space_prefix(&plain), &plain));
    }

    #[test]
    fn control_pieces_are_special_and_a_missing_score_list_is_an_error() {
        let content = sentencepiece_gguf(PIECES, None);
        let tokenizer = from_gguf(&Metadata::new(&content)).expect("a tokenizer");
        let encoding = tokenizer.encode("<s>hello", false).expect("encodes");
        assert_eq!(encoding.get_tokens()[0], "<s>");
        assert_eq!(tokenizer.decode(encoding.get_ids(), true).expect("decodes"), "hello");
        let mut content = sentencepiece_gguf(PIECES, None);
        content.metadata.remove("tokenizer.ggml.scores");
        let error = from_gguf(&Metadata::new(&content)).map(drop).expect_err("refused");
        assert!(error.to_string().contains("tokenizer.ggml.scores"), "{error}");
        content.metadata.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
        let error = from_gguf(&Metadata::new(&content)).map(drop).expect_err("refused");
        assert!(error.to_string().contains("`t5`"), "{error}");
    }
}
