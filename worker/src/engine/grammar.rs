//! Constrained decoding: a request's output format (a JSON schema, any JSON
//! object) becomes an llguidance matcher per sequence. Before each sampling
//! step the matcher's token mask sends every token the grammar forbids to
//! minus infinity (so log-probabilities are those of the constrained
//! distribution); each accepted token advances it. Once the grammar is
//! complete only the end-of-sequence token remains allowed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value as Json;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// JSON valid against `schema` (`response_format: json_schema`); `strict`:
    /// keywords the grammar cannot enforce are errors, else ignored.
    JsonSchema { schema: Json, strict: bool },
    /// Tool calls: a JSON value valid against `schema`, or (`several`) one or
    /// more, one per line; or (`or_text`) free text whose first non-blank
    /// character is not `{`, or nothing.
    Calls { schema: Json, several: bool, or_text: bool },
}

/// The model's vocabulary as llguidance sees it; builds a matcher per request.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

/// A tokenizer as llguidance's token environment: the vocabulary's bytes in a
/// trie, and the model's own tokenizer for text the grammar fixes.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(bytes).ok().and_then(|text| self.tokenizer.encode(text, false).ok()) {
            Some(encoding) => encoding.get_ids().to_vec(),
            None => self.trie.greedy_tokenize(bytes),
        }
    }
}

impl Grammars {
    /// `eos`: the token that ends a constrained answer.
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>, eos: u32) -> Result<Self, String> {
        let json: Json =
            serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[]).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A fresh matcher for `format`, or why the format cannot be enforced.
    pub fn constraint(&self, format: &OutputFormat) -> Result<Constraint, String> {
        let (mut schema, strict) = match format {
            OutputFormat::JsonObject => (serde_json::json!({"type": "object"}), true),
            OutputFormat::JsonSchema { schema, strict } => (schema.clone(), *strict),
            OutputFormat::Calls { schema, .. } => (schema.clone(), true),
        };
        // One line, with the separators `json.dumps` writes: no whitespace
        // between values for a model to repeat forever.
        if let Some(object) = schema.as_object_mut() {
            object.entry("x-guidance").or_insert_with(|| {
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                    "lenient": !strict,
                })
            });
        }
        let grammar = match format {
            OutputFormat::Calls { several, or_text, .. } => {
                let calls = if *several { "value (\"\\n\" value)*" } else { "value" };
                let start = if *or_text { "(calls | TEXT)?" } else { "calls" };
                TopLevelGrammar::from_lark(format!(
                    "start: {start}\ncalls: {calls}\nvalue: %json {schema}\nTEXT: /\\s*[^{{\\s][\\s\\S]*/"
                ))
            }
            _ => TopLevelGrammar::from_json_schema(schema),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint { matcher: Box::new(matcher) })
    }
}

/// One sequence's matcher.
#[derive(Clone)]
pub struct Constraint {
    /// Boxed: a matcher is large, and requests move through queues.
    matcher: Box<Matcher>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sends every token the grammar forbids now to minus infinity; returns
    /// how long computing the mask took.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<Duration, String> {
        let started = Instant::now();
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| format!("grammar: {e}"))?;
        let took = started.elapsed();
        let known = allowed.len().min(logits.len());
        for (token, logit) in logits.iter_mut().enumerate() {
            if token >= known || !allowed.is_allowed(token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(took)
    }

    /// Advances past a sampled token (one the mask allowed).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| format!("grammar: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: one token per byte plus an end token.
    fn byte_tokenizer() -> Arc<tokenizers::Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let vocab: tokenizers::models::bpe::Vocab =
            ByteLevel::alphabet().into_iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().expect("bpe");
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        tokenizer.add_special_tokens(vec![tokenizers::AddedToken::from("<end>", true)]).expect("specials");
        Arc::new(tokenizer)
    }

    /// Greedy decoding under the mask with logits that prefer the wrong bytes
    /// still produces valid JSON of the schema, then only the end token. (The
    /// schema is bounded: logits this adversarial would write digits forever.)
    #[test]
    fn the_mask_keeps_output_inside_the_schema() {
        let tokenizer = byte_tokenizer();
        let vocab = tokenizer.get_vocab_size(true);
        let end = tokenizer.token_to_id("<end>").expect("end token");
        let grammars = Grammars::new(tokenizer.clone(), end).expect("grammars");
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
                "ok": {"type": "boolean"},
                "color": {"enum": ["red", "green"]}
            },
            "required": ["n", "ok", "color"],
            "additionalProperties": false
        });
        let format = OutputFormat::JsonSchema { schema, strict: true };
        let mut constraint = grammars.constraint(&format).expect("constraint");
        let mut out = Vec::new();
        for step in 0..200 {
            // Logits that favour 'x' and then the lowest ids: never valid JSON by themselves.
            let mut logits: Vec<f32> = (0..vocab).map(|t| -(t as f32) / vocab as f32).collect();
            if let Some(x) = tokenizer.token_to_id("x") {
                logits[x as usize] = 10.0;
            }
            constraint.mask(&mut logits).expect("mask");
            let token = (0..vocab).max_by(|a, b| logits[*a].total_cmp(&logits[*b])).expect("a token") as u32;
            if token == end {
                break;
            }
            assert!(step < 199, "no end after 200 tokens: {out:?}");
            constraint.advance(token).expect("advance");
            out.push(token);
        }
        let text = tokenizer.decode(&out, false).expect("decode");
        let value: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(value["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)), "{value}");
        assert!(value["ok"].is_boolean() && (value["color"] == "red" || value["color"] == "green"), "{value}");
    }

    /// Calls: one value, or several one per line, each valid; with text, also
    /// anything that does not open a value.
    #[test]
    fn calls_take_one_or_more_values_or_text() {
        let tokenizer = byte_tokenizer();
        let end = tokenizer.token_to_id("<end>").expect("end token");
        let grammars = Grammars::new(tokenizer.clone(), end).expect("grammars");
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}},
            "required": ["n"], "additionalProperties": false});
        let ids = |text: &str| tokenizer.encode(text, false).expect("encode").get_ids().to_vec();
        let calls = |several, or_text| OutputFormat::Calls { schema: schema.clone(), several, or_text };
        for (format, text, valid) in [
            (calls(true, false), "{\"n\": 1}", true),
            (calls(true, false), "{\"n\": 1}\n{\"n\": 22}", true),
            (calls(false, false), "{\"n\": 1}\n{\"n\": 22}", false),
            (calls(true, false), "{\"n\": 1}{\"n\": 2}", false),
            (calls(true, false), "{\"n\": \"x\"}", false),
            (calls(true, false), "Hello {", false),
            (calls(true, true), "Hello {", true),
            (calls(true, true), "{\"n\": 1}\n{\"n\": 22}", true),
            (calls(false, true), "{\"n\": \"x\"}", false),
            (calls(false, true), "", true),
            (calls(false, true), " \n{\"n\": 1}", false),
            (calls(false, true), " \nHi", true),
        ] {
            let mut constraint = grammars.constraint(&format).expect("constraint");
            let mut ok = true;
            for token in ids(text) {
                let mut logits = vec![0f32; tokenizer.get_vocab_size(true)];
                constraint.mask(&mut logits).expect("mask");
                ok &= logits[token as usize].is_finite();
                if !ok {
                    break;
                }
                constraint.advance(token).expect("advance");
            }
            assert_eq!(ok, valid, "{format:?}: {text}");
            if valid {
                let mut logits = vec![0f32; tokenizer.get_vocab_size(true)];
                constraint.mask(&mut logits).expect("mask");
                assert!(logits[end as usize].is_finite(), "{text}: may end");
            }
        }
    }

    #[test]
    fn a_schema_llguidance_cannot_compile_is_an_error() {
        let tokenizer = byte_tokenizer();
        let end = tokenizer.token_to_id("<end>").expect("end token");
        let grammars = Grammars::new(tokenizer, end).expect("grammars");
        let bad = serde_json::json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}});
        assert!(grammars.constraint(&OutputFormat::JsonSchema { schema: bad, strict: true }).is_err());
        let bad_type = serde_json::json!({"type": "no-such-type"});
        assert!(grammars.constraint(&OutputFormat::JsonSchema { schema: bad_type, strict: false }).is_err());
        // A keyword the grammar cannot enforce: an error when strict, ignored otherwise.
        let unknown = serde_json::json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true});
        assert!(grammars.constraint(&OutputFormat::JsonSchema { schema: unknown.clone(), strict: true }).is_err());
        assert!(grammars.constraint(&OutputFormat::JsonSchema { schema: unknown, strict: false }).is_ok());
    }
}
