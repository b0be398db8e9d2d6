//! Parses and validates a legacy Completions body (`POST …/completions`) field
//! by field, with the chat parser's readers, so every rejection names its
//! `param`.

use serde_json::Value as Json;

use super::error::ApiError;
use super::request::{self, Fields, SamplingOverrides};
use crate::engine::Stopping;

/// Prompts in one request.
pub const MAX_PROMPTS: usize = 16;
/// Choices in one request: prompts × `n`.
pub const MAX_CHOICES: usize = 64;
/// `logprobs`: alternatives per token, as OpenAI allows.
pub const MAX_LOGPROBS: u64 = 5;
/// `max_tokens` when the request leaves it out (OpenAI's legacy default).
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// One prompt: text, or token ids given as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompts: Vec<Prompt>,
    /// Text after the insertion point (fill in the middle).
    pub suffix: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingOverrides,
    /// Choices per prompt.
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    /// Alternatives per token (0: the sampled token's log-probability only).
    pub logprobs: Option<usize>,
    pub cache_salt: Option<String>,
    pub stopping: Stopping,
}

/// Parses a request body. `vocab_size` bounds token ids and `logit_bias` keys.
pub fn parse(body: &[u8], vocab_size: usize) -> Result<CompletionRequest, ApiError> {
    let mut f = Fields::of(body)?;
    let model = f.string("model")?.ok_or_else(|| ApiError::missing("model"))?;
    let prompts = match f.take("prompt") {
        None | Some(Json::Null) => return Err(ApiError::missing("prompt")),
        Some(v) => parse_prompts(v, vocab_size)?,
    };
    let suffix = f.string("suffix")?;
    let max_tokens = f.uint("max_tokens", 0, u64::from(u32::MAX))?.map_or(DEFAULT_MAX_TOKENS, |v| v as usize);
    let sampling = request::parse_sampling(&mut f, vocab_size)?;
    let n = f.uint("n", 1, request::MAX_N)?.unwrap_or(1) as usize;
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!("{} prompts with n = {n} make more than {MAX_CHOICES} choices.", prompts.len()),
        ));
    }
    match f.uint("best_of", 0, 20)?.map(|b| b as usize) {
        Some(best_of) if best_of < n && !(best_of <= 1 && n == 1) => {
            return Err(ApiError::invalid("best_of", format!("'best_of' ({best_of}) must be at least 'n' ({n}).")));
        }
        // Candidates beyond the returned choices are not generated here.
        Some(best_of) if best_of > n => {
            return Err(ApiError::unsupported(
                "best_of",
                format!("'best_of' must equal 'n' ({n}) on this server: it returns every choice it generates."),
            ));
        }
        _ => {}
    }
    let stop = request::parse_stop(&mut f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = request::parse_stream_options(&mut f, stream)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && suffix.is_some() {
        return Err(ApiError::invalid("echo", "'echo' cannot be combined with 'suffix'."));
    }
    let logprobs = f.uint("logprobs", 0, MAX_LOGPROBS)?.map(|v| v as usize);
    f.string("user")?;
    let cache_salt = f.string("cache_salt")?;
    if cache_salt.as_deref() == Some("") {
        return Err(ApiError::invalid("cache_salt", "'cache_salt' must be a non-empty string if provided."));
    }
    let stopping = request::parse_stopping(&mut f, vocab_size, Some(max_tokens))?;
    f.none_left()?;
    Ok(CompletionRequest {
        model,
        prompts,
        suffix,
        max_tokens,
        sampling,
        n,
        stop,
        stream,
        include_usage,
        echo,
        logprobs,
        cache_salt,
        stopping,
    })
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of
/// lists of token ids; each element of a list is a prompt of its own.
fn parse_prompts(value: Json, vocab_size: usize) -> Result<Vec<Prompt>, ApiError> {
    let form = "a string, an array of strings, an array of token ids or an array of arrays of token ids";
    let prompts = match value {
        Json::String(text) => vec![Prompt::Text(text)],
        Json::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "'prompt' must not be an empty array."));
        }
        Json::Array(items) if items[0].is_number() => vec![Prompt::Tokens(token_ids(&items, "prompt", vocab_size)?)],
        Json::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let param = format!("prompt[{i}]");
                match item {
                    Json::String(text) => Ok(Prompt::Text(text)),
                    Json::Array(ids) if !ids.is_empty() => Ok(Prompt::Tokens(token_ids(&ids, &param, vocab_size)?)),
                    Json::Array(_) => Err(ApiError::invalid(&param, "A prompt of token ids must not be empty.")),
                    other => Err(ApiError::wrong_type(&param, "a string or an array of token ids", &other)),
                }
            })
            .collect::<Result<_, _>>()?,
        other => return Err(ApiError::wrong_type("prompt", form, &other)),
    };
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("At most {MAX_PROMPTS} prompts per request, got {}.", prompts.len()),
        ));
    }
    Ok(prompts)
}

fn token_ids(items: &[Json], param: &str, vocab_size: usize) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let at = format!("{param}[{i}]");
            match id.as_u64() {
                Some(id) if (id as usize) < vocab_size => Ok(id as u32),
                Some(id) => Err(ApiError::invalid(&at, format!("`{id}` is not a token id of this model."))),
                None => Err(ApiError::wrong_type(&at, "a token id (an integer)", id)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const VOCAB: usize = 1000;

    fn body(extra: Json) -> Vec<u8> {
        let mut req = json!({"model": "m", "prompt": "Once"});
        if let (Json::Object(base), Json::Object(extra)) = (&mut req, extra) {
            base.extend(extra);
        }
        serde_json::to_vec(&req).expect("serializes")
    }

    #[test]
    fn defaults_and_every_prompt_form() {
        let req = parse(&body(json!({})), VOCAB).expect("valid");
        assert_eq!(req.prompts, vec![Prompt::Text("Once".into())]);
        assert_eq!((req.max_tokens, req.n, req.echo, req.logprobs), (DEFAULT_MAX_TOKENS, 1, false, None));
        let prompts = |p: Json| parse(&body(json!({"prompt": p})), VOCAB).expect("valid").prompts;
        assert_eq!(prompts(json!(["a", "b"])), vec![Prompt::Text("a".into()), Prompt::Text("b".into())]);
        assert_eq!(prompts(json!([1, 2, 3])), vec![Prompt::Tokens(vec![1, 2, 3])]);
        assert_eq!(prompts(json!([[1], [2, 3]])), vec![Prompt::Tokens(vec![1]), Prompt::Tokens(vec![2, 3])]);
        let req = parse(
            &body(json!({"max_tokens": 0, "n": 3, "best_of": 3, "echo": true, "logprobs": 5, "stop": ["\n"],
                         "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.5,
                         "seed": 3, "user": "u", "suffix": null, "min_tokens": 0, "ignore_eos": true})),
            VOCAB,
        )
        .expect("valid");
        assert_eq!((req.max_tokens, req.n, req.echo, req.logprobs), (0, 3, true, Some(5)));
        assert!(req.stream && req.include_usage && req.stopping.ignore_eos);
    }

    #[test]
    fn every_rejected_field_is_named() {
        let cases = [
            (json!({"prompt": null}), "prompt"),
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": []}), "prompt"),
            (json!({"prompt": ["a", 7]}), "prompt[1]"),
            (json!({"prompt": [[1], []]}), "prompt[1]"),
            (json!({"prompt": [1, 1000]}), "prompt[1]"),
            (json!({"prompt": [[1, "x"]]}), "prompt[0][1]"),
            (json!({"prompt": vec!["a"; MAX_PROMPTS + 1]}), "prompt"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"n": 0}), "n"),
            (json!({"prompt": vec!["a"; 9], "n": 8}), "n"),
            (json!({"n": 9}), "n"),
            (json!({"echo": true, "suffix": "x"}), "echo"),
            (json!({"best_of": 2}), "best_of"),
            (json!({"best_of": 1, "n": 2}), "best_of"),
            (json!({"logprobs": 6}), "logprobs"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"echo": "yes"}), "echo"),
            (json!({"suffix": 3}), "suffix"),
            (json!({"stream_options": {"include_usage": true}}), "stream_options"),
            (json!({"min_tokens": 17}), "min_tokens"),
            (json!({"messages": []}), "messages"),
        ];
        for (extra, param) in cases {
            let e = parse(&body(extra.clone()), VOCAB).expect_err(&format!("{extra} should be rejected"));
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{extra}: {}", e.message);
        }
    }
}
