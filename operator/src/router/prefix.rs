//! A chat request's prompt as the router sees it: the messages (and tools)
//! rendered to the bytes a chat template lays out in the same order, cut into
//! blocks of [`BLOCK_BYTES`] (about 64 tokens of text), each block's hash
//! chained to the ones before it. Two requests share their first `k` block
//! hashes exactly when their prompts share those bytes, so the block hashes
//! stand for the KV blocks a worker's prefix cache could reuse.
//!
//! The rendering is prefix-stable: a message renders the same whatever
//! follows it, so a conversation's next turn starts with every block of the
//! turn before. The chain is seeded with the model and the `cache_salt` (the
//! tenant's, with tenants), as the workers' prefix cache is: requests that
//! cannot share KV blocks never share a block hash. The hash is SHA-256, a
//! fixed algorithm, so every router replica and version computes the same.

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::json_body::members;

/// Bytes per block: about 64 tokens of English text.
pub const BLOCK_BYTES: usize = 256;
/// Blocks hashed at most (256 KiB of prompt): a prefix that long already
/// decides where the request goes.
pub const MAX_BLOCKS: usize = 1024;

/// Ends one rendered message (ASCII record separator).
const END_OF_MESSAGE: u8 = 0x1e;
/// Separates fields within a rendered message (ASCII unit separator).
const FIELD: u8 = 0x1f;

/// The chained block hashes of a chat request's prompt (complete blocks
/// only), or `None` when the body is not a chat request the router can read
/// (the worker answers those with a 400).
pub fn chat_blocks(body: &[u8], model: &str) -> Option<Vec<u64>> {
    // Members as the worker reads them: the last of a repeated name wins (a
    // tenant's salt is written after the client's).
    let members = members(body)?;
    let messages: Vec<Message<'_>> = serde_json::from_str(members.get("messages")?.get()).ok()?;
    let tools = members.get("tools").copied().filter(|raw| raw.get() != "null");
    let salt: Option<String> = match members.get("cache_salt") {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => None,
    };
    let mut rendered = Vec::with_capacity(body.len());
    if let Some(tools) = tools {
        // Templates place tool definitions ahead of the conversation.
        rendered.extend_from_slice(b"tools");
        rendered.push(FIELD);
        rendered.extend_from_slice(tools.get().as_bytes());
        rendered.push(END_OF_MESSAGE);
    }
    for message in &messages {
        message.render(&mut rendered);
        if rendered.len() >= BLOCK_BYTES * MAX_BLOCKS {
            break;
        }
    }
    Some(chained(&rendered, model, salt.as_deref().unwrap_or("")))
}

/// The prefix blocks of a legacy completion's (first) prompt: its text, or
/// its token ids, as the worker reads `prompt`; salted as chat's are.
pub fn prompt_blocks(body: &[u8], model: &str) -> Option<Vec<u64>> {
    let members = members(body)?;
    let prompt: serde_json::Value = serde_json::from_str(members.get("prompt")?.get()).ok()?;
    let salt: Option<String> = match members.get("cache_salt") {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => None,
    };
    let first = match &prompt {
        serde_json::Value::Array(items) if items.first()?.is_array() || items.first()?.is_string() => items.first()?,
        other => other,
    };
    let rendered = match first {
        serde_json::Value::String(text) => text.as_bytes().to_vec(),
        serde_json::Value::Array(ids) => {
            ids.iter().map(|id| id.as_u64().map(|id| (id as u32).to_le_bytes())).collect::<Option<Vec<_>>>()?.concat()
        }
        _ => return None,
    };
    Some(chained(&rendered, model, salt.as_deref().unwrap_or("")))
}

/// The prefix blocks of a Responses request: its `instructions`, then its
/// `input` (a string, or the items as they came), salted as chat's are.
pub fn responses_blocks(body: &[u8], model: &str) -> Option<Vec<u64>> {
    let members = members(body)?;
    let salt: Option<String> = match members.get("cache_salt") {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => None,
    };
    let mut rendered = Vec::with_capacity(body.len());
    if let Some(instructions) = members.get("instructions").filter(|raw| raw.get() != "null") {
        rendered.extend_from_slice(instructions.get().as_bytes());
        rendered.push(END_OF_MESSAGE);
    }
    let input = members.get("input")?;
    match serde_json::from_str::<String>(input.get()) {
        Ok(text) => rendered.extend_from_slice(text.as_bytes()),
        Err(_) => rendered.extend_from_slice(input.get().as_bytes()),
    }
    Some(chained(&rendered, model, salt.as_deref().unwrap_or("")))
}

/// A fixed 64-bit fingerprint of `bytes` (the first 8 bytes of its SHA-256).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    first_word(&Sha256::digest(bytes))
}

fn first_word(digest: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(word)
}

/// The hashes of `rendered`'s complete blocks, each over the previous hash
/// and the block's bytes, the first over the model and salt.
fn chained(rendered: &[u8], model: &str, salt: &str) -> Vec<u64> {
    let mut seed = Sha256::new();
    seed.update(b"kandle-prefix-v1");
    for part in [model, salt] {
        seed.update((part.len() as u64).to_le_bytes());
        seed.update(part.as_bytes());
    }
    let mut previous = seed.finalize();
    rendered
        .chunks_exact(BLOCK_BYTES)
        .take(MAX_BLOCKS)
        .map(|block| {
            previous = Sha256::new().chain_update(previous).chain_update(block).finalize();
            first_word(&previous)
        })
        .collect()
}

/// The fields of a message a template renders. Content is text or a list of
/// parts (text parts by their text, others as written); everything else the
/// template shows of a message (a name, tool calls, the call answered) by its
/// JSON as the client wrote it.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_call_id: Option<&'a RawValue>,
}

// Untagged enums buffer what they read, which a borrowed `RawValue` cannot
// come from: their other cases hold owned values.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(serde_json::Value),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Part {
    Text {
        #[serde(rename = "type")]
        _kind: TextKind,
        text: String,
    },
    Other(serde_json::Value),
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum TextKind {
    Text,
}

impl Message<'_> {
    fn render(&self, out: &mut Vec<u8>) {
        let raw = |out: &mut Vec<u8>, value: Option<&RawValue>| {
            if let Some(value) = value {
                out.extend_from_slice(value.get().as_bytes());
            }
            out.push(FIELD);
        };
        raw(out, self.role);
        raw(out, self.name);
        match &self.content {
            Some(Content::Text(text)) => out.extend_from_slice(text.as_bytes()),
            Some(Content::Parts(parts)) => {
                for part in parts {
                    match part {
                        Part::Text { text, .. } => out.extend_from_slice(text.as_bytes()),
                        Part::Other(value) => out.extend_from_slice(value.to_string().as_bytes()),
                    }
                }
            }
            Some(Content::Other(value)) => out.extend_from_slice(value.to_string().as_bytes()),
            None => {}
        }
        out.push(FIELD);
        raw(out, self.tool_calls);
        raw(out, self.tool_call_id);
        out.push(END_OF_MESSAGE);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn blocks(body: serde_json::Value) -> Vec<u64> {
        chat_blocks(body.to_string().as_bytes(), "m").expect("a chat request")
    }

    fn long(seed: &str) -> String {
        (0..200).map(|i| format!("{seed} sentence {i}. ")).collect()
    }

    #[test]
    fn a_shared_opening_shares_its_blocks_and_nothing_after() {
        let system = long("policy");
        let a = blocks(
            json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": long("why")}]}),
        );
        let b = blocks(
            json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": long("how")}]}),
        );
        let shared = system.len() / BLOCK_BYTES;
        assert!(shared >= 10 && a.len() > shared + 10 && b.len() > shared + 10);
        assert_eq!(a[..shared], b[..shared]);
        // Chained: once apart, apart for good even where the bytes agree again.
        let differing = a.iter().zip(&b).position(|(x, y)| x != y).expect("they part");
        assert!(a[differing..].iter().zip(&b[differing..]).all(|(x, y)| x != y));
        let other = blocks(json!({"messages": [{"role": "system", "content": long("rules")}]}));
        assert_ne!(a[0], other[0]);
    }

    /// A legacy completion's blocks: its first prompt's text (or token ids),
    /// salted; a longer prompt keeps a shorter one's blocks.
    #[test]
    fn completion_prompts_have_blocks_too() {
        let prompt = |p: serde_json::Value| prompt_blocks(json!({"prompt": p}).to_string().as_bytes(), "m");
        let text = long("doc");
        let one = prompt(json!(text)).expect("a prompt");
        assert!(one.len() >= 10);
        assert_eq!(prompt(json!([text, "other"])), Some(one.clone()), "the first of several prompts");
        let longer = prompt(json!(format!("{text}{}", long("more")))).expect("a prompt");
        assert_eq!(longer[..one.len()], one[..]);
        let ids: Vec<u32> = (0..300).collect();
        let by_ids = prompt(json!(ids)).expect("token ids");
        assert_eq!(prompt(json!([ids, [1, 2]])), Some(by_ids.clone()));
        assert!(!by_ids.is_empty());
        let salted = prompt_blocks(json!({"prompt": text, "cache_salt": "t"}).to_string().as_bytes(), "m");
        assert_ne!(salted.expect("salted")[0], one[0]);
        assert_eq!(prompt(json!(5)), None);
    }

    #[test]
    fn responses_requests_have_blocks_from_instructions_and_input() {
        let body = |v: serde_json::Value| responses_blocks(v.to_string().as_bytes(), "m");
        let text = long("doc");
        let one = body(json!({"instructions": "Be brief.", "input": text})).expect("blocks");
        let longer = body(json!({"instructions": "Be brief.", "input": format!("{text}{}", long("more"))}));
        assert_eq!(longer.expect("blocks")[..one.len()], one[..]);
        assert_ne!(body(json!({"input": text})).expect("blocks")[0], one[0], "instructions come first");
        assert!(body(json!({"input": [{"role": "user", "content": text}]})).is_some_and(|b| !b.is_empty()));
        assert_eq!(body(json!({"instructions": "x"})), None);
    }

    #[test]
    fn a_conversation_keeps_its_earlier_turns_blocks() {
        let first = json!([{"role": "system", "content": "short"}, {"role": "user", "content": long("question")}]);
        let mut next = first.as_array().cloned().expect("array");
        next.push(json!({"role": "assistant", "content": long("answer")}));
        next.push(json!({"role": "user", "content": "and then?"}));
        let before = blocks(json!({"messages": first}));
        let after = blocks(json!({"messages": next}));
        assert!(!before.is_empty() && after.len() > before.len());
        assert_eq!(after[..before.len()], before[..]);
    }

    #[test]
    fn model_salt_tools_and_parts_decide_the_blocks() {
        let messages = json!([{"role": "user", "content": long("q")}]);
        let plain = blocks(json!({"messages": messages}));
        let body = json!({"messages": messages}).to_string();
        assert_ne!(chat_blocks(body.as_bytes(), "other-model"), Some(plain.clone()));
        assert_ne!(blocks(json!({"messages": messages, "cache_salt": "tenant:a"})), plain);
        assert_ne!(blocks(json!({"messages": messages, "cache_salt": "tenant:\"a\"\n"})), plain);
        assert_eq!(blocks(json!({"messages": messages, "cache_salt": null})), plain);
        // A repeated member reads as the worker reads it: the last one (the
        // router writes a tenant's salt after the client's).
        let clients = format!(r#"{{"messages":{messages},"cache_salt":"mine"}}"#);
        let salted = crate::router::cache_salt::salted(clients.as_bytes(), "a");
        let salted = salted.expect("an object");
        assert_eq!(
            chat_blocks(&salted, "m"),
            Some(blocks(json!({"messages": messages, "cache_salt": "tenant:a:mine"})))
        );
        assert_ne!(blocks(json!({"messages": messages, "tools": [{"type": "function"}]})), plain);
        // Text given as parts renders as the same text; other parts and
        // contents count as written.
        let parts = json!([{"role": "user", "content": [{"type": "text", "text": long("q")}]}]);
        assert_eq!(blocks(json!({"messages": parts})), plain);
        let image =
            json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(600))}});
        let with_image =
            blocks(json!({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]}));
        let other_image =
            json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "B".repeat(600))}});
        assert!(with_image.len() >= 2);
        assert_ne!(
            with_image,
            blocks(
                json!({"messages": [{"role": "user", "content": [other_image, {"type": "text", "text": "what?"}]}]})
            )
        );
        assert!(!blocks(json!({"messages": [{"role": "user", "content": {"odd": long("x")}}]})).is_empty());
        // Other fields of the body do not matter.
        assert_eq!(blocks(json!({"messages": messages, "temperature": 0.2, "model": "x"})), plain);
    }

    #[test]
    fn short_prompts_have_no_block_and_unreadable_bodies_none() {
        assert!(blocks(json!({"messages": [{"role": "user", "content": "hi"}]})).is_empty());
        assert_eq!(chat_blocks(b"not json", "m"), None);
        assert_eq!(chat_blocks(br#"{"messages": 3}"#, "m"), None);
        let huge = "x".repeat(BLOCK_BYTES * (MAX_BLOCKS + 10));
        assert_eq!(blocks(json!({"messages": [{"role": "user", "content": huge}]})).len(), MAX_BLOCKS);
    }
}
