//! Constrained decoding: a request's output format (a JSON schema, any JSON
//! object) becomes an llguidance matcher per sequence. Before each sampling
//! step the matcher's token mask sends every token the grammar forbids to
//! minus infinity (so log-probabilities are those of the constrained
//! distribution); each accepted token advances it, and text the grammar
//! forces next is appended as tokens without sampling. Once the grammar is
//! complete only the end-of-sequence token remains allowed. A lazy constraint
//! (tool calls in `auto` mode) waits, unmasked, until the output writes its
//! opener, and constrains what follows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value as Json};

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// JSON valid against `schema` (`response_format: json_schema`); `strict`:
    /// keywords the grammar cannot enforce are errors, else ignored.
    JsonSchema { schema: Json, strict: bool },
    /// A lark grammar (tool calls); its `%json` values come from [`one_line`].
    Lark(String),
}

/// `schema` for JSON on one line, with the separators `json.dumps` writes and
/// no other whitespace (nothing for a model to repeat forever); `strict`:
/// keywords the grammar cannot enforce are errors.
pub fn one_line(mut schema: Json, strict: bool) -> Json {
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
    schema
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
        let tokenizer = crate::model::tokenizer::without_space_prefix(&tokenizer);
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[]).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A fresh matcher for `format`, or why the format cannot be enforced.
    pub fn constraint(&self, format: &OutputFormat) -> Result<Constraint, String> {
        let grammar = match format {
            OutputFormat::JsonObject => TopLevelGrammar::from_json_schema(one_line(json!({"type": "object"}), true)),
            OutputFormat::JsonSchema { schema, strict } => {
                TopLevelGrammar::from_json_schema(one_line(schema.clone(), *strict))
            }
            OutputFormat::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint { matcher: Box::new(matcher), phase: Phase::Active, prepared: None })
    }
}

/// Whether a constraint masks yet.
#[derive(Debug, Clone)]
enum Phase {
    /// Lazy: the output is free until it writes `opener` (`seen` holds the
    /// end of the output that could be its start).
    Waiting {
        opener: String,
        seen: String,
    },
    Active,
    /// The text after the opener did not fit the grammar: unconstrained from
    /// there (the call is then given back as content).
    Off,
}

/// One sequence's matcher.
#[derive(Clone)]
pub struct Constraint {
    /// Boxed: a matcher is large, and requests move through queues.
    matcher: Box<Matcher>,
    phase: Phase,
    /// The next token's mask (what the grammar allows, or why it failed)
    /// and how long it took, computed ahead.
    prepared: Option<(Result<SimpleVob, String>, Duration)>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("phase", &self.phase)
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Computes the mask of the next token ahead of [`Constraint::mask`],
    /// so that it can run while the forward pass computes the logits.
    pub fn prepare(&mut self) {
        let started = Instant::now();
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| format!("grammar: {e}"));
        self.prepared = Some((allowed, started.elapsed()));
    }

    /// Sends every token the grammar forbids now to minus infinity (with the
    /// prepared mask, else one computed now); returns how long computing the
    /// mask took.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<Duration, String> {
        if self.prepared.is_none() {
            self.prepare();
        }
        let Some((allowed, took)) = self.prepared.take() else { return Err("grammar: no mask".into()) };
        let allowed = allowed?;
        let known = allowed.len().min(logits.len());
        for (token, logit) in logits.iter_mut().enumerate() {
            if token >= known || !allowed.is_allowed(token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(took)
    }

    /// Lazy from now: no mask until the output writes `opener`; the grammar
    /// then constrains the text after it.
    pub fn after(mut self, opener: &str) -> Self {
        self.phase = Phase::Waiting { opener: opener.to_string(), seen: String::new() };
        self
    }

    /// Whether the next token is masked.
    pub fn active(&self) -> bool {
        matches!(self.phase, Phase::Active)
    }

    /// Advances past an accepted token (one the mask allowed, when active);
    /// `text` is what it added to the output.
    pub fn advance(&mut self, token: u32, text: &str) -> Result<(), String> {
        self.prepared = None;
        match &mut self.phase {
            Phase::Active if self.matcher.is_stopped() => Ok(()),
            Phase::Active => self.matcher.consume_token(token).map_err(|e| format!("grammar: {e}")),
            Phase::Off => Ok(()),
            Phase::Waiting { opener, seen } => {
                seen.push_str(text);
                let Some(at) = seen.find(opener.as_str()) else {
                    // Keep only what could still be the start of the opener.
                    let keep = seen.len().saturating_sub(opener.len());
                    let cut = (keep..=seen.len()).find(|&i| seen.is_char_boundary(i)).unwrap_or(seen.len());
                    seen.drain(..cut);
                    return Ok(());
                };
                let rest = seen[at + opener.len()..].to_string();
                self.phase = Phase::Active;
                if !rest.is_empty() && !self.consume_text(&rest) {
                    self.phase = Phase::Off;
                }
                Ok(())
            }
        }
    }

    /// Consumes text the output already holds past the opener; false when
    /// the grammar does not accept it.
    fn consume_text(&mut self, text: &str) -> bool {
        let Ok(env) = self.matcher.tok_env() else { return false };
        let tokens = env.tokenize_bytes(text.as_bytes());
        self.matcher.consume_tokens(&tokens).is_ok() && !self.matcher.is_error()
    }

    /// Tokens the grammar allows no alternative to now, consumed: the caller
    /// appends them without sampling.
    pub fn fast_forward(&mut self) -> Vec<u32> {
        if !self.active() || self.matcher.is_stopped() {
            return Vec::new();
        }
        self.prepared = None;
        self.matcher.consume_ff_tokens()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level vocabulary: one token per byte, an end token and `specials`.
    pub(crate) fn byte_tokenizer(specials: &[&str]) -> tokenizers::Tokenizer {
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        // Sorted: the same ids in every tokenizer this builds.
        let mut symbols: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        symbols.sort_unstable();
        let vocab: tokenizers::models::bpe::Vocab =
            symbols.into_iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().expect("bpe");
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let specials = std::iter::once("<end>").chain(specials.iter().copied());
        tokenizer
            .add_special_tokens(specials.map(|t| tokenizers::AddedToken::from(t, true)).collect::<Vec<_>>())
            .expect("specials");
        tokenizer
    }

    /// Greedy decoding under the mask with logits that prefer the wrong bytes
    /// still produces valid JSON of the schema, then only the end token. (The
    /// schema is bounded: logits this adversarial would write digits forever.)
    #[test]
    fn the_mask_keeps_output_inside_the_schema() {
        let tokenizer = Arc::new(byte_tokenizer(&[]));
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
            constraint.advance(token, "").expect("advance");
            out.push(token);
        }
        let text = tokenizer.decode(&out, false).expect("decode");
        let value: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(value["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)), "{value}");
        assert!(value["ok"].is_boolean() && (value["color"] == "red" || value["color"] == "green"), "{value}");
    }

    /// Text the grammar fixes comes back as tokens to append without sampling.
    #[test]
    fn forced_text_is_fast_forwarded() {
        let tokenizer = Arc::new(byte_tokenizer(&[]));
        let end = tokenizer.token_to_id("<end>").expect("end token");
        let grammars = Grammars::new(tokenizer.clone(), end).expect("grammars");
        let schema = json!({"type": "object", "properties": {"color": {"const": "red"}, "n": {"type": "integer"}},
            "required": ["color", "n"], "additionalProperties": false});
        let mut constraint = grammars.constraint(&OutputFormat::JsonSchema { schema, strict: true }).expect("c");
        let forced = constraint.fast_forward();
        assert_eq!(tokenizer.decode(&forced, false).expect("decode"), "{\"color\": \"red\", \"n\": ");
        let mut logits = vec![0f32; tokenizer.get_vocab_size(true)];
        constraint.mask(&mut logits).expect("mask");
        let digit = tokenizer.token_to_id("7").expect("7");
        assert!(logits[digit as usize].is_finite() && !logits[end as usize].is_finite());
    }

    /// A lazy constraint masks nothing until the opener, then takes the text
    /// after it (even inside the token that wrote the opener); text that does
    /// not fit switches it off.
    #[test]
    fn a_lazy_constraint_starts_after_its_opener() {
        let tokenizer = Arc::new(byte_tokenizer(&[]));
        let end = tokenizer.token_to_id("<end>").expect("end token");
        let grammars = Grammars::new(tokenizer.clone(), end).expect("grammars");
        let format = OutputFormat::Lark("start: \"(\" /[0-9]+/ \")\"".into());
        let lazy = grammars.constraint(&format).expect("constraint").after("<go>");
        let mut on = lazy.clone();
        for piece in ["Well <", "g", "o>(1"] {
            assert!(!on.active());
            on.advance(0, piece).expect("advance");
        }
        assert!(on.active());
        let mut logits = vec![0f32; tokenizer.get_vocab_size(true)];
        on.mask(&mut logits).expect("mask");
        let allowed = |text: &str| logits[tokenizer.token_to_id(text).expect("byte") as usize].is_finite();
        assert!(allowed("2") && allowed(")") && !allowed("(") && !allowed("x"));
        let mut off = lazy;
        off.advance(0, "<go>x").expect("advance");
        assert!(!off.active());
    }

    #[test]
    fn a_schema_llguidance_cannot_compile_is_an_error() {
        let tokenizer = Arc::new(byte_tokenizer(&[]));
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
