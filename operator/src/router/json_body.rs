//! Edits of a request body that leave the rest of it byte for byte as the
//! client wrote it. Members are read as the worker reads them (escaped names
//! decoded, the last of a repeated name wins), and a member the router sets
//! is written last, so that it is the one the worker reads.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::value::RawValue;

/// The members of a JSON object body; `None` when it is not an object.
pub fn members(json: &[u8]) -> Option<HashMap<String, &RawValue>> {
    serde_json::from_slice(json).ok()
}

/// `json` (an object of `members`) with `"name": value` appended as its last member.
pub fn with_last_member(json: &[u8], members: &HashMap<String, &RawValue>, name: &str, value: &str) -> Option<Vec<u8>> {
    let close = json.iter().rposition(|&b| b == b'}')?;
    let mut out = Vec::with_capacity(json.len() + name.len() + value.len() + 4);
    out.extend_from_slice(&json[..close]);
    if !members.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(serde_json::Value::String(name.to_string()).to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&json[close..]);
    Some(out)
}

/// Where `part` (a raw value borrowed from `whole`) lies in it: its address says.
pub fn span_of(whole: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// `json` with the bytes at `span` replaced by `with`.
pub fn replaced(json: &[u8], span: Range<usize>, with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() - span.len() + with.len());
    out.extend_from_slice(&json[..span.start]);
    out.extend_from_slice(with);
    out.extend_from_slice(&json[span.end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_goes_last_and_the_rest_stays_as_written() {
        let body = br#"{ "model" : "m" }"#;
        let m = members(body).expect("object");
        assert_eq!(with_last_member(body, &m, "n", "2").expect("edited"), br#"{ "model" : "m" ,"n":2}"#);
        let empty = members(b"{}").expect("object");
        assert_eq!(with_last_member(b"{}", &empty, "n", "2").expect("edited"), br#"{"n":2}"#);
        assert!(members(b"[1]").is_none());
    }

    #[test]
    fn a_raw_value_is_found_where_it_lies_and_replaced_there() {
        let body = br#"{"a": [1, 2], "b": 3}"#;
        let m = members(body).expect("object");
        let span = span_of(body, m["a"].get()).expect("inside");
        assert_eq!(&body[span.clone()], b"[1, 2]");
        assert_eq!(replaced(body, span, b"0"), br#"{"a": 0, "b": 3}"#);
        assert_eq!(span_of(body, "elsewhere"), None);
    }
}
