//! What an answer used, read as it passes through the router: the `usage` of a
//! JSON answer, or of a stream's last chunk. A streamed request from a tenant
//! is sent on with `stream_options.include_usage` set, so that every stream
//! reports its usage; the usage chunk is taken out again when the client did
//! not ask for it. An answer cut short (the client left, the worker broke
//! off) is charged the prompt the worker reported in [`PROMPT_TOKENS_HEADER`]
//! and, for what was relayed, a token per content chunk of a stream or per
//! four bytes of a JSON body.

use axum::body::Bytes;
use serde::Deserialize;

pub use kandle_contract::http::PROMPT_TOKENS_HEADER;

use super::json_body::{members, replaced, span_of, with_last_member};
use super::model_name::complete_lines;

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    /// Whether the counts are the worker's own (false: estimated from a stream cut short).
    pub reported: bool,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A streamed chat request made to report its usage: `Some((body, client_asked))`
/// where the body has `stream_options.include_usage` true and `client_asked`
/// says whether it had it already; `None` for a request that does not stream
/// (or is not an object: the worker answers it with a 400 as it is). Members
/// are read as the worker reads them (escaped names decoded, the last of a
/// repeated name wins), so no spelling of the body keeps the usage away.
pub fn with_usage_reported(json: &[u8]) -> Option<(Vec<u8>, bool)> {
    let members = members(json)?;
    if members.get("stream").map(|raw| raw.get()) != Some("true") {
        return None;
    }
    let raw = members.get("stream_options").filter(|raw| raw.get() != "null");
    let Some(raw) = raw else {
        // No stream_options (or null): one that asks for usage.
        return Some((with_last_member(json, &members, "stream_options", r#"{"include_usage":true}"#)?, false));
    };
    let options: StreamOptions = serde_json::from_str(raw.get()).unwrap_or_default();
    if options.include_usage == Some(true) {
        return Some((json.to_vec(), true));
    }
    // stream_options without include_usage: set it in that object (the worker
    // still judges the object's other members).
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw.get()).ok()?;
    object.insert("include_usage".into(), serde_json::Value::Bool(true));
    let span = span_of(json, raw.get())?;
    Some((replaced(json, span, &serde_json::to_vec(&object).ok()?), false))
}

#[derive(Deserialize)]
struct Answer {
    usage: Option<UsageFields>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    /// The `/api/v1` envelope's chat completion.
    data: Option<Box<Answer>>,
    /// A Responses stream event's response (its usage in the last one).
    response: Option<Box<Answer>>,
}

/// Chat's and legacy completions' usage, or the Responses API's (its names
/// read as aliases).
#[derive(Deserialize)]
struct UsageFields {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
    #[serde(alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u64,
}

impl From<UsageFields> for Usage {
    fn from(u: UsageFields) -> Self {
        Self {
            prompt: u.prompt_tokens,
            cached: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            completion: u.completion_tokens,
            reported: true,
        }
    }
}

/// Bodies past this are passed on without their usage read.
const MAX_METERED_BODY: usize = 16 * 1024 * 1024;

/// Reads the usage of an answer as it passes, and (in a stream whose client
/// did not ask for it) takes the usage chunk out.
#[derive(Debug)]
pub struct Meter {
    event_stream: bool,
    strip_usage_chunk: bool,
    pending: Vec<u8>,
    /// The prompt as the worker counted it (its header), for a stream cut short.
    prompt_tokens: u64,
    content_chunks: u64,
    /// Bytes of a JSON answer relayed.
    body_bytes: u64,
    usage: Option<Usage>,
    /// A usage chunk was just dropped: drop the blank line that ends its event too.
    dropping_event: bool,
}

impl Meter {
    pub fn new(event_stream: bool, strip_usage_chunk: bool, prompt_tokens: u64) -> Self {
        Self {
            event_stream,
            strip_usage_chunk,
            pending: Vec::new(),
            prompt_tokens,
            content_chunks: 0,
            body_bytes: 0,
            usage: None,
            dropping_event: false,
        }
    }

    /// Takes the next chunk of the answer; returns what goes on to the client
    /// now (a stream's complete lines; a JSON body as it came).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if !self.event_stream {
            self.body_bytes += chunk.len() as u64;
            if self.pending.len() + chunk.len() <= MAX_METERED_BODY {
                self.pending.extend_from_slice(&chunk);
            }
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        match complete_lines(&mut self.pending) {
            Some(complete) => self.lines(&complete),
            None => Bytes::new(),
        }
    }

    /// The end of the answer: what is still held back.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        if self.event_stream {
            return self.lines(&rest);
        }
        if let Ok(answer) = serde_json::from_slice::<Answer>(&rest) {
            self.usage = answer.usage.or_else(|| answer.data.and_then(|d| d.usage)).map(Usage::from);
        }
        Bytes::new()
    }

    /// The usage: the worker's, else (an answer cut short or past what is
    /// read) the estimate.
    pub fn usage(&self) -> Usage {
        let relayed = if self.event_stream { self.content_chunks } else { self.body_bytes.div_ceil(4) };
        self.usage.unwrap_or(Usage { prompt: self.prompt_tokens, cached: 0, completion: relayed, reported: false })
    }

    fn lines(&mut self, text: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(text.len());
        for line in text.split_inclusive(|&b| b == b'\n') {
            if self.dropping_event {
                self.dropping_event = false;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
            }
            if let Some(payload) = line.strip_prefix(b"data:") {
                // With include_usage every chunk has a `usage` member (null but in the last).
                let answer = contains(payload, b"\"usage\"").then(|| serde_json::from_slice::<Answer>(payload).ok());
                // A Responses stream: the usage is the final event's response's.
                let answer = answer.map(|a| {
                    a.map(|a| match a {
                        Answer { usage: None, response: Some(response), .. } => *response,
                        a => a,
                    })
                });
                if let Some(Some(Answer { usage: Some(usage), choices, .. })) = answer {
                    self.usage = Some(usage.into());
                    if self.strip_usage_chunk && choices.as_ref().is_some_and(Vec::is_empty) {
                        self.dropping_event = true;
                        continue;
                    }
                } else if contains(payload, b"\"delta\"")
                    && (has_text(payload, b"\"content\":\"")
                        || has_text(payload, b"\"reasoning_content\":\"")
                        || contains(payload, b"\"tool_calls\"")
                        || has_text(payload, b"\"delta\":\""))
                    || has_text(payload, b"\"text\":\"") && contains(payload, b"\"text_completion\"")
                {
                    self.content_chunks += 1;
                }
            }
            out.extend_from_slice(line);
        }
        Bytes::from(out)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `field` (a key and the opening quote of its string value) is there
/// with a value that is not empty.
fn has_text(haystack: &[u8], field: &[u8]) -> bool {
    haystack.windows(field.len()).enumerate().any(|(i, w)| w == field && haystack.get(i + field.len()) != Some(&b'"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: impl AsRef<[u8]>) -> String {
        String::from_utf8_lossy(b.as_ref()).into_owned()
    }

    #[test]
    fn streamed_requests_are_made_to_report_usage() {
        let (body, asked) = with_usage_reported(br#"{"model":"m","stream":true}"#).expect("streams");
        assert_eq!(text(body), r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(!asked);
        // Spellings that must not keep the usage away: null options, a
        // repeated member (the worker reads the last), an escaped name.
        let (body, _) = with_usage_reported(br#"{"stream":true,"stream_options":null}"#).expect("streams");
        assert_eq!(text(body), r#"{"stream":true,"stream_options":null,"stream_options":{"include_usage":true}}"#);
        let (body, _) =
            with_usage_reported(br#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":{}}"#)
                .expect("streams");
        assert_eq!(
            text(body),
            r#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":{"include_usage":true}}"#
        );
        let (body, _) = with_usage_reported(br#"{"stream":true,"stream\u005foptions":null}"#).expect("streams");
        assert!(text(body).ends_with(r#","stream_options":{"include_usage":true}}"#));
        assert_eq!(with_usage_reported(br#"{"stream":true,"stream":false}"#), None, "the last `stream` counts");
        let (body, asked) =
            with_usage_reported(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).expect("streams");
        assert_eq!(text(body), r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(asked);
        let (body, asked) =
            with_usage_reported(br#"{"stream_options": {"include_usage": false}, "stream": true}"#).expect("streams");
        assert_eq!(text(body), r#"{"stream_options": {"include_usage":true}, "stream": true}"#);
        assert!(!asked);
        // Not streamed, or not ours to judge: passed on as it came.
        assert_eq!(with_usage_reported(br#"{"model":"m"}"#), None);
        assert_eq!(with_usage_reported(br#"{"stream":"yes"}"#), None);
        assert_eq!(with_usage_reported(b"[1]"), None);
    }

    // As a worker streams with include_usage: `usage` null in every chunk but the last.
    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n\
        data: [DONE]\n\n";

    fn relay(meter: &mut Meter, body: &str, split: usize) -> String {
        let mut out = Vec::new();
        out.extend_from_slice(&meter.push(Bytes::copy_from_slice(&body.as_bytes()[..split])));
        out.extend_from_slice(&meter.push(Bytes::copy_from_slice(&body.as_bytes()[split..])));
        out.extend_from_slice(&meter.finish());
        text(out)
    }

    /// The Responses API's usage (`input_tokens`, `output_tokens`): in its
    /// JSON answer, and in its stream's last event, inside `response`;
    /// deltas of a stream cut short count as content.
    #[test]
    fn responses_usage_is_read_by_its_own_names() {
        let body = r#"{"id":"resp_1","object":"response","usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens":3}}"#;
        let mut meter = Meter::new(false, false, 0);
        relay(&mut meter, body, 7);
        assert_eq!(meter.usage(), Usage { prompt: 9, cached: 4, completion: 3, reported: true });
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
                      event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
                      event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}}\n\n";
        let mut meter = Meter::new(true, false, 0);
        assert_eq!(relay(&mut meter, stream, 40), stream, "nothing is taken out of a Responses stream");
        assert_eq!(meter.usage(), Usage { prompt: 5, cached: 0, completion: 2, reported: true });
        let cut = &stream[..stream.find("event: response.completed").expect("the last event")];
        let mut meter = Meter::new(true, false, 5);
        relay(&mut meter, cut, 10);
        assert_eq!(meter.usage(), Usage { prompt: 5, cached: 0, completion: 1, reported: false });
    }

    #[test]
    fn a_stream_reports_its_usage_and_loses_the_chunk_nobody_asked_for() {
        let usage_line = STREAM.lines().nth(6).expect("usage line");
        let without = STREAM.replace(&format!("{usage_line}\n\n"), "");
        for split in 0..STREAM.len() {
            let mut meter = Meter::new(true, true, 0);
            assert_eq!(relay(&mut meter, STREAM, split), without, "split at {split}");
            assert_eq!(meter.usage(), Usage { prompt: 12, cached: 8, completion: 2, reported: true });
            let mut meter = Meter::new(true, false, 0);
            assert_eq!(relay(&mut meter, STREAM, split), STREAM, "split at {split}");
            assert_eq!(meter.usage().total(), 14);
        }
    }

    #[test]
    fn a_stream_cut_short_is_estimated_from_the_prompt_header_and_chunks() {
        let mut meter = Meter::new(true, true, 30);
        let cut = &STREAM[..STREAM.find("finish_reason").expect("has a finish")];
        meter.push(Bytes::copy_from_slice(cut.as_bytes()));
        // The role chunk's empty content is no token.
        assert_eq!(meter.usage(), Usage { prompt: 30, cached: 0, completion: 1, reported: false });
    }

    #[test]
    fn a_json_answer_passes_as_it_came_and_reports_its_usage() {
        let body = r#"{"id":"c","choices":[{"index":0}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#;
        let mut meter = Meter::new(false, false, 0);
        assert_eq!(relay(&mut meter, body, 10), body);
        assert_eq!(meter.usage(), Usage { prompt: 5, cached: 0, completion: 7, reported: true });
        let envelope = r#"{"success":true,"data":{"usage":{"prompt_tokens":1,"completion_tokens":2}}}"#;
        let mut meter = Meter::new(false, false, 0);
        relay(&mut meter, envelope, 3);
        assert_eq!(meter.usage().total(), 3);
    }

    #[test]
    fn a_json_answer_cut_short_is_estimated_from_the_prompt_header_and_bytes() {
        let mut meter = Meter::new(false, false, 20);
        meter.push(Bytes::from_static(br#"{"id":"c","choices":[{"message":{"content":"some"#));
        assert_eq!(meter.finish(), Bytes::new());
        assert_eq!(meter.usage(), Usage { prompt: 20, cached: 0, completion: 12, reported: false });
    }
}
