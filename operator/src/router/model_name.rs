//! The name a client asked for and the name a pool serves. A request reaches the
//! worker under the pool's served name (a worker need not know the aliases a
//! route file gives its pool); the answer goes back naming what the client
//! asked for. Only the value of `model` changes: every other byte of a body is
//! passed on as it came.

use std::ops::Range;

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::json_body::{replaced, span_of};

/// The fields of a JSON object that may carry the model: `model` itself,
/// `data` (the `/api/v1` envelope, whose `data` is the chat completion), or
/// `response` (a Responses stream event, whose `response` is the response).
#[derive(Deserialize)]
struct ModelFields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    response: Option<&'a RawValue>,
}

/// Where the string value of `model` lies in `json`: at the top level, else
/// inside a top-level `data` or `response` object. Whitespace around the
/// object is allowed.
fn model_span(json: &[u8]) -> Option<Range<usize>> {
    let fields: ModelFields = serde_json::from_slice(json).ok()?;
    let raw = match (fields.model, fields.data.or(fields.response)) {
        (Some(model), _) => model,
        (None, Some(inner)) => serde_json::from_str::<ModelFields>(inner.get()).ok()?.model?,
        (None, None) => return None,
    };
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    span_of(json, text)
}

/// `json` with its model (see [`model_span`]) set to `name`; `None` when it names none.
pub fn with_model(json: &[u8], name: &str) -> Option<Vec<u8>> {
    let span = model_span(json)?;
    Some(replaced(json, span, &serde_json::to_vec(name).ok()?))
}

/// Takes the complete lines (up to the last newline) out of `pending`, leaving
/// the unfinished one; `None` while there is no complete line.
pub fn complete_lines(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let last_newline = pending.iter().rposition(|&b| b == b'\n')?;
    let rest = pending.split_off(last_newline + 1);
    Some(std::mem::replace(pending, rest))
}

/// Renames the model in a worker's answer as it passes: an event stream line by
/// line as each line completes (every `data:` line holding a JSON object with a
/// model), a JSON body once it is whole.
#[derive(Debug)]
pub struct Renamer {
    name: String,
    event_stream: bool,
    pending: Vec<u8>,
}

impl Renamer {
    pub fn new(name: &str, event_stream: bool) -> Self {
        Self { name: name.to_string(), event_stream, pending: Vec::new() }
    }

    /// Takes the next chunk of the answer; returns what may be sent now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        if !self.event_stream {
            return Bytes::new();
        }
        match complete_lines(&mut self.pending) {
            Some(complete) => self.renamed_lines(&complete),
            None => Bytes::new(),
        }
    }

    /// The end of the answer: whatever is still held, renamed.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        if self.event_stream {
            self.renamed_lines(&rest)
        } else {
            Bytes::from(with_model(&rest, &self.name).unwrap_or(rest))
        }
    }

    fn renamed_lines(&self, text: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(text.len());
        for line in text.split_inclusive(|&b| b == b'\n') {
            match line.strip_prefix(b"data:").and_then(|payload| with_model(payload, &self.name)) {
                Some(renamed) => {
                    out.extend_from_slice(b"data:");
                    out.extend_from_slice(&renamed);
                }
                None => out.extend_from_slice(line),
            }
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: impl AsRef<[u8]>) -> String {
        String::from_utf8_lossy(b.as_ref()).into_owned()
    }

    #[test]
    fn only_the_model_value_changes() {
        let body = br#"{"model": "alias", "messages":[{"role":"user","content":"\"model\": \"x\""}], "n":1}"#;
        let out = with_model(body, "served").expect("has a model");
        assert_eq!(
            text(out),
            r#"{"model": "served", "messages":[{"role":"user","content":"\"model\": \"x\""}], "n":1}"#
        );
        // Names needing escapes are written as JSON strings.
        let out = with_model(br#"{"id":"1","model":"m"}"#, "a\"b").expect("has a model");
        assert_eq!(text(out), r#"{"id":"1","model":"a\"b"}"#);
    }

    #[test]
    fn the_envelope_model_is_inside_data() {
        let body = br#"{"success":true,"code":"","message":"","data":{"id":"x","model":"served","choices":[]}}"#;
        let out = with_model(body, "alias").expect("has a model");
        assert_eq!(
            text(out),
            r#"{"success":true,"code":"","message":"","data":{"id":"x","model":"alias","choices":[]}}"#
        );
    }

    #[test]
    fn a_responses_event_model_is_inside_response() {
        let body = br#"{"type":"response.completed","response":{"id":"resp_1","model":"served"},"sequence_number":9}"#;
        let out = with_model(body, "alias").expect("has a model");
        assert_eq!(
            text(&out),
            r#"{"type":"response.completed","response":{"id":"resp_1","model":"alias"},"sequence_number":9}"#
        );
    }

    #[test]
    fn bodies_without_a_string_model_are_left_alone() {
        for body in [&br#"{"error":{"message":"m","model":"x"}}"#[..], br#"{"model":7}"#, b"[DONE]", b"not json", b""] {
            assert_eq!(with_model(body, "alias"), None, "{}", text(body));
        }
    }

    #[test]
    fn event_streams_are_renamed_line_by_line_across_chunk_boundaries() {
        let stream = "data: {\"id\":\"c\",\"model\":\"served\",\"choices\":[]}\n\n\
                      data: {\"error\":{\"message\":\"boom\"}}\n\n\
                      data: [DONE]\n\n";
        let want = stream.replace("\"served\"", "\"alias\"");
        for split in 0..stream.len() {
            let mut renamer = Renamer::new("alias", true);
            let mut out = Vec::new();
            out.extend_from_slice(&renamer.push(&stream.as_bytes()[..split]));
            out.extend_from_slice(&renamer.push(&stream.as_bytes()[split..]));
            out.extend_from_slice(&renamer.finish());
            assert_eq!(text(out), want, "split at {split}");
        }
        // A complete line is sent at once, not held until the end.
        let mut renamer = Renamer::new("alias", true);
        assert_eq!(
            text(renamer.push(b"data: {\"model\":\"served\"}\n\ndata: {\"mo")),
            "data: {\"model\":\"alias\"}\n\n"
        );
    }

    #[test]
    fn json_answers_are_renamed_once_whole() {
        let mut renamer = Renamer::new("alias", false);
        assert!(renamer.push(br#"{"id":"c","mod"#).is_empty());
        assert!(renamer.push(br#"el":"served","usage":{}}"#).is_empty());
        assert_eq!(text(renamer.finish()), r#"{"id":"c","model":"alias","usage":{}}"#);
    }
}
