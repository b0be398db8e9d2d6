//! Tool calls in a model's output, parsed as the text streams in. Each format
//! current models write has an opener that starts a call and a way to tell
//! where the call ends; text outside calls is content. A call that does not
//! parse (malformed JSON, no name) is given back as content, never an error.
//!
//! - Hermes / Qwen: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`,
//!   anywhere in the output, any number of them.
//! - Llama 3.x: the output is `{"name": .., "parameters": {..}}` (optionally
//!   after `<|python_tag|>`), several separated by `;`.
//! - Mistral: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`.
//! - Generic (kandle's prompt for templates without tools): the output is one
//!   JSON object `{"name": .., "arguments": {..}}`, or several in a row, or
//!   (calls the grammar forces, several allowed) a JSON array of them.
//!
//! A streaming parser (for calls the grammar constrains, so written
//! `{"name": "..", "arguments": {..}}` on one line) also gives each call's
//! name as soon as its arguments start, then the arguments piece by piece.

use serde_json::Value as Json;

/// Which way the model writes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
    Mistral,
    Generic,
}

impl ToolFormat {
    /// The markers this format writes around calls.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &[HERMES_OPEN, HERMES_CLOSE],
            Self::Llama3 => &[PYTHON_TAG],
            Self::Mistral => &[MISTRAL_OPEN],
            Self::Generic => &[],
        }
    }

    /// The format a chat template that renders tools teaches its model, by the
    /// markers it writes.
    pub fn of_template(source: &str) -> Self {
        if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\"") {
            Self::Llama3
        } else {
            Self::Hermes
        }
    }
}

/// How a response reads the calls of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallReading {
    pub format: ToolFormat,
    /// The grammar constrains the calls: they are streamed as they come.
    pub constrained: bool,
}

impl CallReading {
    pub fn parser(self) -> ToolCallParser {
        match self.constrained {
            true => ToolCallParser::streaming(self.format),
            false => ToolCallParser::new(self.format),
        }
    }

    /// An answer's content split into text and calls.
    pub fn split(self, content: &str) -> (String, Vec<ToolCall>) {
        let mut parser = self.parser();
        let mut pieces = parser.push(content);
        pieces.extend(parser.finish());
        assemble(pieces)
    }
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    /// A whole call.
    Call(ToolCall),
    /// A call whose arguments follow in [`Piece::Arguments`] (streaming parser).
    CallStart {
        name: String,
    },
    /// More of the last started call's arguments (JSON text).
    Arguments(String),
}

/// The text and the calls of whole pieces.
pub fn assemble(pieces: Vec<Piece>) -> (String, Vec<ToolCall>) {
    let (mut text, mut calls) = (String::new(), Vec::<ToolCall>::new());
    for piece in pieces {
        match piece {
            Piece::Content(t) => text.push_str(&t),
            Piece::Call(call) => calls.push(call),
            Piece::CallStart { name } => calls.push(ToolCall { name, arguments: String::new() }),
            Piece::Arguments(more) => {
                if let Some(call) = calls.last_mut() {
                    call.arguments.push_str(&more);
                }
            }
        }
    }
    (text, calls)
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// Tracks where a JSON value ends: depth of brackets outside strings.
#[derive(Debug, Default, Clone)]
struct JsonEnd {
    depth: usize,
    in_string: bool,
    escaped: bool,
    started: bool,
}

impl JsonEnd {
    /// Feeds one character; true when it closes the outermost value.
    fn feed(&mut self, c: char) -> bool {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => {
                self.depth += 1;
                self.started = true;
            }
            '}' | ']' if self.depth > 0 => {
                self.depth -= 1;
                return self.started && self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

#[derive(Debug)]
enum State {
    /// Free text (Hermes, Mistral), or the start of the output (Llama 3,
    /// generic: a call must come first).
    Text,
    /// Inside a call: its raw text so far (opener included), and where its
    /// JSON ends.
    Call { raw: String, json: JsonEnd },
    /// Llama 3 / generic: after a call, only `;`, whitespace or another call.
    Between { raw: String },
    /// Llama 3 / generic output that did not start with a call: all content.
    Plain,
}

/// Where a streaming parser is inside the calls after an opener.
#[derive(Debug, Default)]
enum Scan {
    /// Before a call object.
    #[default]
    Between,
    /// A call object's text up to the start of its arguments.
    Head(String),
    /// Inside the arguments.
    Arguments(JsonEnd),
    /// After the arguments, until the call object closes.
    Tail,
    /// Not the constrained layout: the calls are given whole when they end.
    Off,
}

/// A streaming parser's view of the calls after one opener.
#[derive(Debug, Default)]
struct CallScan {
    scan: Scan,
    /// Calls already given as [`Piece::CallStart`].
    started: usize,
}

/// How far a call object's start matches `{"name": "<name>", "<key>": {`.
enum Head {
    Partial,
    Done(String),
    No,
}

fn head(text: &str) -> Head {
    const NAME: &str = "{\"name\": \"";
    let Some(rest) = text.strip_prefix(NAME) else {
        return if NAME.starts_with(text) { Head::Partial } else { Head::No };
    };
    let Some(end) = rest.find('"') else {
        return if rest.contains('\\') { Head::No } else { Head::Partial };
    };
    let (name, after) = (&rest[..end], &rest[end + 1..]);
    if name.contains('\\') || name.is_empty() {
        return Head::No;
    }
    let keys = [", \"arguments\": {", ", \"parameters\": {"];
    if keys.contains(&after) {
        Head::Done(name.to_string())
    } else if keys.iter().any(|k| k.starts_with(after)) {
        Head::Partial
    } else {
        Head::No
    }
}

impl CallScan {
    fn feed(&mut self, c: char, out: &mut Vec<Piece>) {
        match &mut self.scan {
            Scan::Between if c == '{' => self.scan = Scan::Head("{".into()),
            Scan::Between | Scan::Off => {}
            Scan::Head(text) => {
                text.push(c);
                match head(text) {
                    Head::Partial => {}
                    Head::No => self.scan = Scan::Off,
                    Head::Done(name) => {
                        out.push(Piece::CallStart { name });
                        out.push(Piece::Arguments("{".into()));
                        let mut json = JsonEnd::default();
                        json.feed('{');
                        self.scan = Scan::Arguments(json);
                        self.started += 1;
                    }
                }
            }
            Scan::Arguments(json) => {
                out.push(Piece::Arguments(c.to_string()));
                if json.feed(c) {
                    self.scan = Scan::Tail;
                }
            }
            Scan::Tail => {
                self.scan = if c == '}' { Scan::Between } else { Scan::Off };
            }
        }
    }
}

/// Splits streamed output into content and calls.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    state: State,
    /// Text not yet known to be content or the start of an opener.
    pending: String,
    /// Streaming parsers: the calls after the current opener.
    scan: Option<CallScan>,
    streaming: bool,
}

impl ToolCallParser {
    /// A parser that gives each call whole once it ends.
    pub fn new(format: ToolFormat) -> Self {
        Self { format, state: State::Text, pending: String::new(), scan: None, streaming: false }
    }

    /// A parser that gives a call's name as its arguments start, then the
    /// arguments as they come (for calls the grammar constrains).
    pub fn streaming(format: ToolFormat) -> Self {
        Self { streaming: true, ..Self::new(format) }
    }

    /// Enters a call whose raw text so far is `raw`.
    fn open_call(&mut self, raw: String, json: JsonEnd, out: &mut Vec<Piece>) {
        if self.streaming {
            let body = match self.format {
                ToolFormat::Hermes => &raw[HERMES_OPEN.len()..],
                ToolFormat::Mistral => &raw[MISTRAL_OPEN.len()..],
                ToolFormat::Llama3 | ToolFormat::Generic => raw.trim_start().trim_start_matches(PYTHON_TAG),
            };
            let mut scan = CallScan::default();
            for c in body.chars() {
                scan.feed(c, out);
            }
            self.scan = Some(scan);
        }
        self.state = State::Call { raw, json };
    }

    /// Feeds the next piece of output; returns what it completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        for c in text.chars() {
            self.feed(c, &mut out);
        }
        self.release(&mut out);
        merge(out)
    }

    /// The end of the output: whatever is held back becomes content (a call
    /// that never closed included, unless the grammar wrote it).
    pub fn finish(mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.scan = None;
        let rest = match std::mem::replace(&mut self.state, State::Plain) {
            // A call the grammar constrained, cut short (by max_tokens): what
            // streamed of it stays a call; the rest was never content.
            State::Call { .. } if self.streaming => String::new(),
            State::Between { raw } if self.streaming && raw.trim().is_empty() => String::new(),
            State::Call { raw, .. } | State::Between { raw } => raw,
            State::Text | State::Plain => String::new(),
        };
        let held = std::mem::take(&mut self.pending) + &rest;
        if !held.is_empty() {
            out.push(Piece::Content(held));
        }
        merge(out)
    }

    fn feed(&mut self, c: char, out: &mut Vec<Piece>) {
        match &mut self.state {
            State::Plain => self.pending.push(c),
            State::Text => {
                self.pending.push(c);
                match self.format {
                    ToolFormat::Hermes | ToolFormat::Mistral => {
                        let opener = if self.format == ToolFormat::Hermes { HERMES_OPEN } else { MISTRAL_OPEN };
                        if let Some(at) = self.pending.find(opener) {
                            let before: String = self.pending.drain(..at).collect();
                            if !before.is_empty() {
                                out.push(Piece::Content(before));
                            }
                            let raw = std::mem::take(&mut self.pending);
                            self.open_call(raw, JsonEnd::default(), out);
                        }
                    }
                    ToolFormat::Llama3 | ToolFormat::Generic => {
                        let trimmed = self.pending.trim_start();
                        let tagged = self.format == ToolFormat::Llama3 && trimmed.starts_with(PYTHON_TAG);
                        // Generic calls are an object, or (forced, several) an array of them.
                        let array = self.format == ToolFormat::Generic && trimmed.starts_with('[');
                        if trimmed.starts_with('{') || array || tagged {
                            let raw = std::mem::take(&mut self.pending);
                            let mut json = JsonEnd::default();
                            if !tagged {
                                json.feed(if array { '[' } else { '{' });
                            }
                            self.open_call(raw, json, out);
                        } else if !(trimmed.is_empty()
                            || self.format == ToolFormat::Llama3 && PYTHON_TAG.starts_with(trimmed))
                        {
                            self.state = State::Plain;
                        }
                    }
                }
            }
            State::Call { raw, json } => {
                raw.push(c);
                if let Some(scan) = &mut self.scan {
                    scan.feed(c, out);
                }
                let done = match self.format {
                    ToolFormat::Hermes => raw.ends_with(HERMES_CLOSE),
                    _ => json.feed(c),
                };
                if done {
                    let raw = std::mem::take(raw);
                    self.state = self.after_call(raw, out);
                }
            }
            State::Between { raw } => {
                raw.push(c);
                if c == '{' {
                    let mut json = JsonEnd::default();
                    json.feed('{');
                    let raw = std::mem::take(raw);
                    self.open_call(raw, json, out);
                } else if !(c == ';' || c.is_whitespace()) {
                    // Text after the calls: the rest is content.
                    self.pending.push_str(&std::mem::take(raw));
                    self.state = State::Plain;
                }
            }
        }
    }

    /// A call's raw text is complete: parse it, or give it back as content.
    fn after_call(&mut self, raw: String, out: &mut Vec<Piece>) -> State {
        let body = match self.format {
            ToolFormat::Hermes => &raw[HERMES_OPEN.len()..raw.len() - HERMES_CLOSE.len()],
            ToolFormat::Mistral => &raw[MISTRAL_OPEN.len()..],
            ToolFormat::Llama3 => raw.trim_start().strip_prefix(PYTHON_TAG).unwrap_or(raw.trim_start()),
            ToolFormat::Generic => raw.as_str(),
        };
        let body = body.trim_start_matches(|c: char| c == ';' || c.is_whitespace());
        let calls = match serde_json::from_str::<Json>(body.trim()) {
            Ok(Json::Array(items)) if matches!(self.format, ToolFormat::Mistral | ToolFormat::Generic) => {
                items.iter().map(call_of).collect::<Option<Vec<_>>>().filter(|c| !c.is_empty())
            }
            Ok(item @ Json::Object(_)) if self.format != ToolFormat::Mistral => call_of(&item).map(|c| vec![c]),
            _ => None,
        };
        // Calls already streamed are not given again.
        let started = self.scan.take().map_or(0, |s| s.started);
        match calls.or_else(|| (started > 0).then(Vec::new)) {
            Some(calls) => {
                out.extend(calls.into_iter().skip(started).map(Piece::Call));
                match self.format {
                    ToolFormat::Hermes | ToolFormat::Mistral => State::Text,
                    ToolFormat::Llama3 | ToolFormat::Generic => State::Between { raw: String::new() },
                }
            }
            None => {
                out.push(Piece::Content(raw));
                match self.format {
                    ToolFormat::Hermes => State::Text,
                    _ => State::Plain,
                }
            }
        }
    }

    /// Moves text that can no longer start an opener out as content.
    fn release(&mut self, out: &mut Vec<Piece>) {
        let keep = match (&self.state, self.format) {
            (State::Plain, _) => 0,
            (State::Text, ToolFormat::Hermes) => held_prefix(&self.pending, HERMES_OPEN),
            (State::Text, ToolFormat::Mistral) => held_prefix(&self.pending, MISTRAL_OPEN),
            // Llama 3 / generic hold the start of the output until it is
            // known whether it is a call.
            (State::Text, _) => self.pending.len(),
            _ => 0,
        };
        let cut = self.pending.len() - keep;
        if cut > 0 {
            out.push(Piece::Content(self.pending.drain(..cut).collect()));
        }
    }
}

/// Length of the longest suffix of `text` that begins `opener`.
fn held_prefix(text: &str, opener: &str) -> usize {
    (1..opener.len().min(text.len() + 1))
        .rev()
        .find(|n| text.is_char_boundary(text.len() - n) && opener.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// `{"name": .., "arguments" | "parameters": {..}}` (arguments may also be a
/// JSON string holding an object).
fn call_of(item: &Json) -> Option<ToolCall> {
    let name = item.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let arguments = match item.get("arguments").or_else(|| item.get("parameters")) {
        None | Some(Json::Null) => "{}".to_string(),
        Some(Json::Object(map)) => Json::Object(map.clone()).to_string(),
        Some(Json::String(text)) if serde_json::from_str::<Json>(text).is_ok_and(|v| v.is_object()) => text.clone(),
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

/// Joins neighbouring content pieces.
fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (out.last_mut(), piece) {
            (Some(Piece::Content(text)), Piece::Content(more)) => text.push_str(&more),
            (Some(Piece::Arguments(text)), Piece::Arguments(more)) => text.push_str(&more),
            (_, Piece::Content(more)) if more.is_empty() => {}
            (_, piece) => out.push(piece),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(parser: fn(ToolFormat) -> ToolCallParser, format: ToolFormat, text: &str) -> Vec<Piece> {
        let mut parser = parser(format);
        let mut pieces = parser.push(text);
        pieces.extend(parser.finish());
        merge(pieces)
    }

    /// The same output fed in two pieces split at every character boundary,
    /// and one character at a time, gives the same content and calls.
    fn split_anywhere(parser: fn(ToolFormat) -> ToolCallParser, format: ToolFormat, text: &str) -> Vec<Piece> {
        let want = whole(parser, format, text);
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        for at in bounds {
            let mut p = parser(format);
            let mut pieces = p.push(&text[..at]);
            pieces.extend(p.push(&text[at..]));
            pieces.extend(p.finish());
            assert_eq!(merge(pieces), want, "{format:?} split at {at}: {text:?}");
        }
        let mut p = parser(format);
        let mut pieces: Vec<Piece> = text.chars().flat_map(|c| p.push(&c.to_string())).collect();
        pieces.extend(p.finish());
        assert_eq!(merge(pieces), want, "{format:?} char by char");
        want
    }

    fn same_split_anywhere(format: ToolFormat, text: &str) -> Vec<Piece> {
        split_anywhere(ToolCallParser::new, format, text)
    }

    fn call(name: &str, arguments: &str) -> Piece {
        Piece::Call(ToolCall { name: name.into(), arguments: arguments.into() })
    }

    #[test]
    fn hermes_calls_among_text() {
        let text = "Let me check é.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris <3\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let got = same_split_anywhere(ToolFormat::Hermes, text);
        assert_eq!(
            got,
            vec![
                Piece::Content("Let me check é.\n".into()),
                call("weather", r#"{"city":"Paris <3"}"#),
                Piece::Content("\n".into()),
                call("time", "{}"),
            ]
        );
    }

    #[test]
    fn llama3_json_calls() {
        let text = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"a}b\"}}; {\"name\": \"time\", \"parameters\": {}}";
        let got = same_split_anywhere(ToolFormat::Llama3, text);
        assert_eq!(got, vec![call("search", r#"{"q":"a}b"}"#), call("time", "{}")]);
        assert_eq!(
            same_split_anywhere(ToolFormat::Llama3, "Hello {there}"),
            vec![Piece::Content("Hello {there}".into())]
        );
    }

    #[test]
    fn mistral_call_arrays() {
        let text = "[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": [2, 3]}}, {\"name\": \"neg\", \"arguments\": \"{\\\"x\\\": 1}\"}]";
        let got = same_split_anywhere(ToolFormat::Mistral, text);
        assert_eq!(got, vec![call("add", r#"{"a":1,"b":[2,3]}"#), call("neg", r#"{"x": 1}"#)]);
    }

    #[test]
    fn generic_json_calls() {
        let text = " {\"name\": \"lookup\", \"arguments\": {\"id\": \"x\\\"y\"}}\n{\"name\": \"lookup\", \"arguments\": {\"id\": \"z\"}}";
        let got = same_split_anywhere(ToolFormat::Generic, text);
        assert_eq!(got, vec![call("lookup", r#"{"id":"x\"y"}"#), call("lookup", r#"{"id":"z"}"#)]);
        let array = "[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"x\": 1}}]";
        assert_eq!(same_split_anywhere(ToolFormat::Generic, array), vec![call("a", "{}"), call("b", r#"{"x":1}"#)]);
        // Text in brackets that is no call array stays content.
        let text = "[1] See the note.";
        assert_eq!(same_split_anywhere(ToolFormat::Generic, text), vec![Piece::Content(text.into())]);
    }

    /// Malformed calls come back as content, exactly as written.
    #[test]
    fn malformed_calls_are_content() {
        for (format, text) in [
            (ToolFormat::Hermes, "a <tool_call>{\"name\": oops}</tool_call> b"),
            (ToolFormat::Hermes, "unclosed <tool_call>{\"name\": \"f\", \"arguments\": {}}"),
            (ToolFormat::Hermes, "<tool_call>{\"arguments\": {}}</tool_call>"),
            (ToolFormat::Mistral, "[TOOL_CALLS] [{\"name\": 3}]"),
            (ToolFormat::Mistral, "[TOOL_CALLS] [{\"name\": \"f\""),
            (ToolFormat::Llama3, "{\"name\": \"f\", \"parameters\": [1]} tail"),
            (ToolFormat::Generic, "{\"nam"),
            (ToolFormat::Generic, "Sure! {\"name\": \"f\"}"),
        ] {
            let got = same_split_anywhere(format, text);
            assert_eq!(got, vec![Piece::Content(text.into())], "{format:?}: {text:?}");
        }
    }

    #[test]
    fn text_after_generic_calls_is_content() {
        let got = same_split_anywhere(ToolFormat::Generic, "{\"name\": \"f\"} and more");
        assert_eq!(got, vec![call("f", "{}"), Piece::Content(" and more".into())]);
    }

    fn start(name: &str) -> Piece {
        Piece::CallStart { name: name.into() }
    }

    fn arguments(text: &str) -> Piece {
        Piece::Arguments(text.into())
    }

    /// Constrained calls stream: the name once the arguments start, then the
    /// arguments as written; the pieces assemble to the calls.
    #[test]
    fn streaming_gives_the_name_first_then_argument_fragments() {
        use ToolFormat::*;
        let content = |t: &str| Piece::Content(t.into());
        for (format, text, want) in [
            (
                Hermes,
                "Hi <tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"P }\"}}\n</tool_call>",
                vec![content("Hi "), start("w"), arguments(r#"{"city": "P }"}"#)],
            ),
            (
                Mistral,
                "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": [1]}}, {\"name\": \"b\", \"arguments\": {}}]",
                vec![start("a"), arguments(r#"{"x": [1]}"#), start("b"), arguments("{}")],
            ),
            (
                Llama3,
                "{\"name\": \"s\", \"parameters\": {\"q\": 1}}; {\"name\": \"t\", \"parameters\": {}}",
                vec![start("s"), arguments(r#"{"q": 1}"#), start("t"), arguments("{}")],
            ),
            (
                Generic,
                "{\"name\": \"f\", \"arguments\": {\"n\": 2}}\n{\"name\": \"g\", \"arguments\": {}}",
                vec![start("f"), arguments(r#"{"n": 2}"#), start("g"), arguments("{}")],
            ),
            // Not the constrained layout: the call is given whole when it ends.
            (Generic, "{\"arguments\": {\"n\": 1}, \"name\": \"f\"}", vec![call("f", r#"{"n":1}"#)]),
            // Cut short (max_tokens) after it started: still a call.
            (Hermes, "<tool_call>\n{\"name\": \"w\", \"arguments\": {\"ci", vec![start("w"), arguments("{\"ci")]),
            // Forced generic calls as an array.
            (
                Generic,
                "[{\"name\": \"f\", \"arguments\": {\"n\": 2}}, {\"name\": \"g\", \"arguments\": {}}]",
                vec![start("f"), arguments(r#"{"n": 2}"#), start("g"), arguments("{}")],
            ),
            // A constrained call cut before its name: never content.
            (Generic, "{\"name\": \"f\", \"arguments\": {}}\n{\"name\": \"", vec![start("f"), arguments("{}")]),
            (Generic, "[{\"name\": \"f\", \"arguments\": {}}, {\"na", vec![start("f"), arguments("{}")]),
            (Hermes, "Hi <tool_call>\n{\"na", vec![content("Hi ")]),
        ] {
            assert_eq!(split_anywhere(ToolCallParser::streaming, format, text), want, "{format:?}: {text}");
        }
        let mut parser = ToolCallParser::streaming(Generic);
        assert_eq!(parser.push("{\"name\": \"f\", \"arguments\": "), vec![]);
        assert_eq!(parser.push("{\"n"), vec![start("f"), arguments("{\"n")]);
        let (text, calls) = assemble(vec![content("a"), start("f"), arguments("{\"n\""), arguments(": 1}")]);
        assert_eq!((text.as_str(), calls), ("a", vec![ToolCall { name: "f".into(), arguments: "{\"n\": 1}".into() }]));
    }
}
