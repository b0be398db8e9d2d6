//! The grammar of a tool call in each format the parser reads, for constrained
//! decoding: every call names an offered tool (or the named one) and carries
//! arguments valid against its parameters.
//!
//! - `required` / named: the answer is calls from the first token, opener
//!   included (`<tool_call>`, `[TOOL_CALLS]`, or a bare JSON object; kandle's
//!   generic format writes several forced calls as a JSON array);
//! - `auto` with an opener anywhere in the text (Hermes, Mistral): free text,
//!   lazily constrained from the opener on: the rest of that call, then only
//!   further calls (when several are allowed) or the end;
//! - `auto` where a call is the whole answer (Llama 3, generic): calls, or
//!   text whose first non-blank character is not `{`.
//!
//! Markers the tokenizer holds as special tokens are written `<[id]>`, so the
//! grammar asks for that one token rather than its spelling in bytes.

use serde_json::{json, Value as Json};

use super::grammar::{one_line, OutputFormat};
use super::tool_calls::ToolFormat;

/// Which calls `tool_choice` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallChoice<'a> {
    /// Text or calls.
    Auto,
    /// At least one call.
    Required,
    /// One call of this function.
    Named(&'a str),
}

/// A call grammar, and the opener that switches it on when it is lazy.
#[derive(Debug, Clone, PartialEq)]
pub struct CallGrammar {
    pub format: OutputFormat,
    /// `auto` in formats whose calls may follow text: the grammar applies to
    /// what comes after this text.
    pub opener: Option<&'static str>,
}

/// The grammar for calls of `tools` written in `style`. `special` gives the
/// id of a marker the tokenizer holds as one special token.
pub fn call_grammar(
    style: ToolFormat,
    tools: &[Json],
    choice: CallChoice<'_>,
    several: bool,
    special: impl Fn(&str) -> Option<u32>,
) -> CallGrammar {
    let name = match choice {
        CallChoice::Named(name) => Some(name),
        _ => None,
    };
    let several = several && name.is_none();
    let arguments = if style == ToolFormat::Llama3 { "parameters" } else { "arguments" };
    let value = one_line(json!({"anyOf": call_schemas(tools, name, arguments)}), true);
    let marker = |text: &str| special(text).map(|id| format!("<[{id}]>")).unwrap_or_else(|| json!(text).to_string());
    let auto = choice == CallChoice::Auto;
    let (start, opener) = match style {
        ToolFormat::Generic | ToolFormat::Llama3 => {
            let separator = if style == ToolFormat::Llama3 { "; " } else { "\n" };
            let calls = match (several, style, auto) {
                (false, _, _) => "value".into(),
                // Forced calls as an array (vLLM's form for `required`): after
                // a call the model writes `,` or `]`, and `]` ends the answer.
                // Free separators let a small model open call after call
                // until max_tokens.
                (true, ToolFormat::Generic, false) => "\"[\" value (\", \" value)* \"]\"".into(),
                (true, _, _) => format!("value ({} value)*", json!(separator)),
            };
            let start = if auto { "(calls | TEXT)?" } else { "calls" };
            (format!("start: {start}\ncalls: {calls}\nTEXT: /\\s*[^{{\\s][\\s\\S]*/"), None)
        }
        ToolFormat::Hermes => {
            let (open, close) = (marker("<tool_call>"), marker("</tool_call>"));
            let more = if several { "(\"\\n\" call)*" } else { "" };
            let rest = format!("\"\\n\" value \"\\n\" {close}");
            let start = if auto { format!("{rest} {more}") } else { format!("call {more}") };
            (format!("start: {start}\ncall: {open} {rest}"), auto.then_some("<tool_call>"))
        }
        ToolFormat::Mistral => {
            let list = if several { "\"[\" value (\", \" value)* \"]\"" } else { "\"[\" value \"]\"" };
            let start = if auto { list.to_string() } else { format!("{} {list}", marker("[TOOL_CALLS]")) };
            (format!("start: {start}"), auto.then_some("[TOOL_CALLS]"))
        }
    };
    CallGrammar { format: OutputFormat::Lark(format!("{start}\nvalue: %json {value}")), opener }
}

/// One object per offered tool (or only `name`): `{"name": <its name>,
/// <arguments>: <its parameters>}`, in that order.
fn call_schemas(tools: &[Json], name: Option<&str>, arguments: &str) -> Vec<Json> {
    tools
        .iter()
        .filter_map(|t| t.get("function"))
        .filter(|f| name.is_none_or(|n| f.get("name").and_then(Json::as_str) == Some(n)))
        .map(|f| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": f.get("name").cloned().unwrap_or(Json::Null)},
                    arguments: f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
                },
                "required": ["name", arguments],
                "additionalProperties": false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::grammar::tests::byte_tokenizer;
    use crate::engine::grammar::Grammars;

    fn tools() -> Vec<Json> {
        vec![
            json!({"type": "function", "function": {"name": "n", "parameters": {"type": "object",
                "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false}}}),
            json!({"type": "function", "function": {"name": "t"}}),
        ]
    }

    /// Feeds `text` token by token under the mask; whether every token was
    /// allowed and the end allowed after it.
    fn accepts(tokenizer: &tokenizers::Tokenizer, grammar: &CallGrammar, text: &str) -> bool {
        let end = tokenizer.token_to_id("<end>").expect("end token");
        let grammars = Grammars::new(Arc::new(tokenizer.clone()), end).expect("grammars");
        let mut constraint = grammars.constraint(&grammar.format).expect("constraint");
        if let Some(opener) = grammar.opener {
            constraint = constraint.after(opener);
        }
        let vocab = tokenizer.get_vocab_size(true);
        for token in tokenizer.encode(text, false).expect("encode").get_ids().iter().copied() {
            let mut logits = vec![0f32; vocab];
            if constraint.active() {
                constraint.mask(&mut logits).expect("mask");
            }
            if !logits[token as usize].is_finite() {
                return false;
            }
            let piece = tokenizer.decode(&[token], false).expect("decode");
            constraint.advance(token, &piece).expect("advance");
        }
        let mut logits = vec![0f32; vocab];
        if constraint.active() {
            constraint.mask(&mut logits).expect("mask");
        }
        logits[end as usize].is_finite()
    }

    #[test]
    fn each_format_takes_its_own_calls_only() {
        let tokenizer = byte_tokenizer(&[]);
        let none = |_: &str| None;
        let grammar = |style, choice, several| call_grammar(style, &tools(), choice, several, none);
        use CallChoice::*;
        use ToolFormat::*;
        for (style, choice, several, text, valid) in [
            (Generic, Required, true, "[{\"name\": \"n\", \"arguments\": {\"n\": 1}}]", true),
            (Generic, Required, true, "[{\"name\": \"n\", \"arguments\": {\"n\": 1}}, {\"name\": \"t\", \"arguments\": {}}]", true),
            (Generic, Required, true, "{\"name\": \"n\", \"arguments\": {\"n\": 1}}\n{\"name\": \"t\", \"arguments\": {}}", false),
            (Generic, Required, false, "{\"name\": \"n\", \"arguments\": {\"n\": 1}}", true),
            (Generic, Required, false, "{\"name\": \"n\", \"arguments\": {\"n\": 1}}\n{\"name\": \"t\", \"arguments\": {}}", false),
            (Generic, Required, true, "{\"name\": \"n\", \"arguments\": {\"n\": \"x\"}}", false),
            (Generic, Named("t"), true, "{\"name\": \"n\", \"arguments\": {\"n\": 1}}", false),
            (Generic, Named("t"), true, "{\"name\": \"t\", \"arguments\": {}}", true),
            (Generic, Required, true, "Hello", false),
            (Generic, Auto, true, "Hello {", true),
            (Generic, Auto, true, "", true),
            (Generic, Auto, true, " \n{\"name\": \"n\"}", false),
            (Llama3, Required, true, "{\"name\": \"n\", \"parameters\": {\"n\": 1}}; {\"name\": \"t\", \"parameters\": {}}", true),
            (Llama3, Required, true, "{\"name\": \"n\", \"arguments\": {\"n\": 1}}", false),
            (Hermes, Required, false, "<tool_call>\n{\"name\": \"n\", \"arguments\": {\"n\": 1}}\n</tool_call>", true),
            (Hermes, Required, true, "<tool_call>\n{\"name\": \"n\", \"arguments\": {\"n\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>", true),
            (Hermes, Required, false, "{\"name\": \"n\", \"arguments\": {\"n\": 1}}", false),
            // auto: anything until the opener, then a valid call and nothing but calls.
            (Hermes, Auto, true, "Let me see. <tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>", true),
            (Hermes, Auto, true, "No tools { needed }", true),
            (Hermes, Auto, true, "So <tool_call>\n{\"name\": \"zz\"", false),
            (Hermes, Auto, false, "<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call> and more", false),
            (Mistral, Required, true, "[TOOL_CALLS][{\"name\": \"n\", \"arguments\": {\"n\": 1}}, {\"name\": \"t\", \"arguments\": {}}]", true),
            (Mistral, Named("n"), true, "[TOOL_CALLS][{\"name\": \"n\", \"arguments\": {\"n\": 1}}, {\"name\": \"n\", \"arguments\": {\"n\": 2}}]", false),
            (Mistral, Auto, false, "Sure.[TOOL_CALLS][{\"name\": \"t\", \"arguments\": {}}]", true),
        ] {
            assert_eq!(accepts(&tokenizer, &grammar(style, choice, several), text), valid, "{style:?} {choice:?}: {text}");
        }
    }

    /// A marker that is one special token is asked for as that token.
    #[test]
    fn special_markers_are_single_tokens() {
        let tokenizer = byte_tokenizer(&["[TOOL_CALLS]"]);
        let id = tokenizer.token_to_id("[TOOL_CALLS]").expect("marker");
        let forced = call_grammar(ToolFormat::Mistral, &tools(), CallChoice::Required, false, |t| {
            (t == "[TOOL_CALLS]").then_some(id)
        });
        let OutputFormat::Lark(lark) = &forced.format else { panic!("lark") };
        assert!(lark.starts_with(&format!("start: <[{id}]> ")), "{lark}");
        assert!(accepts(&tokenizer, &forced, "[TOOL_CALLS][{\"name\": \"t\", \"arguments\": {}}]"));
    }
}
