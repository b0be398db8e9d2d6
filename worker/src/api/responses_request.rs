//! The Responses API's request (`POST …/responses`) read as the chat request
//! it asks for: `input` items become messages (`function_call` and
//! `function_call_output` items the assistant's calls and the tools'
//! answers), flat function tools become chat tools, `text.format` becomes
//! `response_format`, `reasoning.effort` becomes `reasoning_effort`. The chat
//! parser then validates it all, and its errors name the Responses
//! parameters. What a stateless server cannot do (`store`,
//! `previous_response_id`, `conversation`, `background`, prompt templates,
//! hosted tools) is a 400 naming it.

use serde_json::{json, Map, Value as Json};

use super::error::ApiError;
use super::request::{self, ChatRequest, Fields};

/// `include` values this server honours.
const LOGPROBS_INCLUDE: &str = "message.output_text.logprobs";

/// A validated Responses request: the chat request it runs as, and what the
/// response object repeats of it.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    pub chat: ChatRequest,
    pub echo: Echoed,
}

/// The request's values the Response object echoes.
#[derive(Debug, Clone, Default)]
pub struct Echoed {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub metadata: Map<String, Json>,
    pub tools: Vec<Json>,
    pub tool_choice: Json,
    pub text_format: Json,
    pub reasoning_effort: Option<String>,
    /// `reasoning.summary` was asked for: reasoning goes out as summary text.
    pub reasoning_summary: Option<String>,
    pub user: Option<String>,
    pub top_logprobs: usize,
}

/// Parses a request body. `vocab_size` bounds `logit_bias` keys.
pub fn parse(body: &[u8], vocab_size: usize) -> Result<ResponsesRequest, ApiError> {
    let mut f = Fields::of(body)?;
    let mut chat = Map::new();
    let mut echo = Echoed::default();
    chat.insert("model".into(), f.take("model").unwrap_or(Json::Null));
    echo.instructions = f.string("instructions")?;
    let mut messages = Vec::new();
    if let Some(instructions) = &echo.instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match f.take("input") {
        None | Some(Json::Null) => return Err(ApiError::missing("input")),
        Some(Json::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Json::Array(items)) => input_items(items, &mut messages)?,
        Some(other) => return Err(ApiError::wrong_type("input", "a string or an array of input items", &other)),
    }
    chat.insert("messages".into(), Json::Array(messages));
    echo.max_output_tokens = f.uint("max_output_tokens", 1, u64::from(u32::MAX))?;
    if let Some(max) = echo.max_output_tokens {
        chat.insert("max_tokens".into(), max.into());
    }
    for key in ["temperature", "top_p", "parallel_tool_calls", "stream", "user", "seed", "top_k", "min_p"] {
        if let Some(v) = f.take(key) {
            chat.insert(key.into(), v);
        }
    }
    for key in ["repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "cache_salt"] {
        if let Some(v) = f.take(key) {
            chat.insert(key.into(), v);
        }
    }
    echo.user = chat.get("user").and_then(Json::as_str).map(str::to_string);
    if let Some(options) = f.take("stream_options").filter(|o| !o.is_null()) {
        stream_options(&options)?;
    }
    if let Some(tools) = f.take("tools").filter(|t| !t.is_null()) {
        let (chat_tools, echoed) = tools_of(tools)?;
        chat.insert("tools".into(), chat_tools);
        echo.tools = echoed;
    }
    echo.tool_choice = json!("auto");
    if let Some(choice) = f.take("tool_choice").filter(|c| !c.is_null()) {
        chat.insert("tool_choice".into(), tool_choice_of(&choice)?);
        echo.tool_choice = choice;
    }
    echo.text_format = json!({"type": "text"});
    if let Some(text) = f.take("text").filter(|t| !t.is_null()) {
        if let Some(format) = text_format(&text)? {
            echo.text_format = format.clone();
            chat.insert("response_format".into(), response_format_of(format));
        }
    }
    if let Some(reasoning) = f.take("reasoning").filter(|r| !r.is_null()) {
        let Json::Object(reasoning) = reasoning else {
            return Err(ApiError::wrong_type("reasoning", "an object", &reasoning));
        };
        for (key, value) in reasoning {
            match (key.as_str(), value) {
                (_, Json::Null) => {}
                ("effort", Json::String(effort)) => {
                    chat.insert("reasoning_effort".into(), Json::String(effort.clone()));
                    echo.reasoning_effort = Some(effort);
                }
                ("summary" | "generate_summary", Json::String(s))
                    if matches!(s.as_str(), "auto" | "concise" | "detailed") =>
                {
                    echo.reasoning_summary = Some(s);
                }
                ("effort" | "summary" | "generate_summary", other) => {
                    return Err(ApiError::invalid(format!("reasoning.{key}"), format!("Invalid value: {other}.")));
                }
                (other, _) => return Err(ApiError::unknown_param(&format!("reasoning.{other}"))),
            }
        }
    }
    let top_logprobs = f.uint("top_logprobs", 0, request::MAX_TOP_LOGPROBS)?;
    if let Some(include) = f.take("include").filter(|i| !i.is_null()) {
        let Json::Array(include) = include else {
            return Err(ApiError::wrong_type("include", "an array", &include));
        };
        for (i, item) in include.iter().enumerate() {
            if item.as_str() != Some(LOGPROBS_INCLUDE) {
                return Err(ApiError::unsupported(
                    &format!("include[{i}]"),
                    format!("Only '{LOGPROBS_INCLUDE}' can be included by this server."),
                ));
            }
            chat.insert("logprobs".into(), Json::Bool(true));
        }
    }
    if let Some(n) = top_logprobs {
        echo.top_logprobs = n as usize;
        if chat.contains_key("logprobs") {
            chat.insert("top_logprobs".into(), n.into());
        }
    }
    match f.take("metadata") {
        None | Some(Json::Null) => {}
        Some(Json::Object(metadata)) => {
            if metadata.len() > 16 || metadata.values().any(|v| !v.is_string()) {
                return Err(ApiError::invalid("metadata", "'metadata' holds at most 16 string values."));
            }
            echo.metadata = metadata;
        }
        Some(other) => return Err(ApiError::wrong_type("metadata", "an object", &other)),
    }
    stateless(&mut f)?;
    for key in ["safety_identifier", "prompt_cache_key", "service_tier"] {
        f.string(key)?;
    }
    f.none_left()?;
    let chat_body = serde_json::to_vec(&Json::Object(chat)).map_err(|e| ApiError::internal(e.to_string()))?;
    let chat = request::parse(&chat_body, vocab_size).map_err(renamed)?;
    Ok(ResponsesRequest { chat, echo })
}

/// `input` items as chat messages.
fn input_items(items: Vec<Json>, messages: &mut Vec<Json>) -> Result<(), ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid("input", "'input' must hold at least one item."));
    }
    for (i, item) in items.into_iter().enumerate() {
        let param = format!("input[{i}]");
        let Json::Object(item) = item else {
            return Err(ApiError::wrong_type(&param, "an input item (an object)", &item));
        };
        let text = |key: &str| item.get(key).and_then(Json::as_str).map(str::to_string);
        match item.get("type").and_then(Json::as_str).unwrap_or("message") {
            "message" => {
                let role = text("role").unwrap_or_default();
                if !matches!(role.as_str(), "user" | "assistant" | "system" | "developer") {
                    return Err(ApiError::invalid(format!("{param}.role"), format!("Invalid role `{role}`.")));
                }
                let content = content_text(item.get("content"), &format!("{param}.content"))?;
                messages.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let (Some(call_id), Some(name), Some(arguments)) = (text("call_id"), text("name"), text("arguments"))
                else {
                    return Err(ApiError::invalid(&param, "A function_call item needs call_id, name and arguments."));
                };
                let call =
                    json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Calls in a row are one assistant turn.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let Some(call_id) = text("call_id") else {
                    return Err(ApiError::missing(&format!("{param}.call_id")));
                };
                let output = content_text(item.get("output"), &format!("{param}.output"))?;
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            // Earlier reasoning: the templates kandle serves do not take it back.
            "reasoning" => {}
            other => {
                return Err(ApiError::unsupported(
                    &format!("{param}.type"),
                    format!("Input items of type `{other}` are not supported by this server."),
                ));
            }
        }
    }
    Ok(())
}

/// A message's or a tool output's text: a string, or text parts joined.
fn content_text(content: Option<&Json>, param: &str) -> Result<String, ApiError> {
    match content {
        Some(Json::String(text)) => Ok(text.clone()),
        Some(Json::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let at = format!("{param}[{j}]");
                match part.get("type").and_then(Json::as_str) {
                    Some("input_text" | "output_text") => match part.get("text").and_then(Json::as_str) {
                        Some(text) => texts.push(text.to_string()),
                        None => return Err(ApiError::missing(&format!("{at}.text"))),
                    },
                    Some("refusal") => texts.push(part.get("refusal").and_then(Json::as_str).unwrap_or("").into()),
                    Some(other) => {
                        return Err(ApiError::unsupported(
                            &format!("{at}.type"),
                            format!("Content parts of type `{other}` are not supported: this model reads text."),
                        ));
                    }
                    None => return Err(ApiError::missing(&format!("{at}.type"))),
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(ApiError::wrong_type(param, "a string or an array of content parts", other)),
        None => Err(ApiError::missing(param)),
    }
}

fn stream_options(options: &Json) -> Result<(), ApiError> {
    let Json::Object(options) = options else {
        return Err(ApiError::wrong_type("stream_options", "an object", options));
    };
    for (key, value) in options {
        match key.as_str() {
            "include_obfuscation" => {
                request::expect_bool("stream_options.include_obfuscation", value)?;
            }
            other => return Err(ApiError::unknown_param(&format!("stream_options.{other}"))),
        }
    }
    Ok(())
}

/// Flat function tools as chat tools, and as the response echoes them.
fn tools_of(tools: Json) -> Result<(Json, Vec<Json>), ApiError> {
    let Json::Array(tools) = tools else {
        return Err(ApiError::wrong_type("tools", "an array", &tools));
    };
    let mut chat_tools = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("type").and_then(Json::as_str) != Some("function") {
            return Err(ApiError::unsupported(
                &format!("tools[{i}].type"),
                "Only tools of type 'function' are supported by this server (no hosted tools).",
            ));
        }
        let mut function = Map::new();
        for key in ["name", "description", "parameters", "strict"] {
            if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                function.insert(key.into(), v.clone());
            }
        }
        chat_tools.push(json!({"type": "function", "function": function}));
    }
    Ok((Json::Array(chat_tools), tools))
}

fn tool_choice_of(choice: &Json) -> Result<Json, ApiError> {
    match choice {
        Json::String(_) => Ok(choice.clone()),
        Json::Object(c) if c.get("type").and_then(Json::as_str) == Some("function") => match c.get("name") {
            Some(Json::String(name)) => Ok(json!({"type": "function", "function": {"name": name}})),
            _ => Err(ApiError::missing("tool_choice.name")),
        },
        Json::Object(_) => Err(ApiError::unsupported(
            "tool_choice",
            "tool_choice may be 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...} here.",
        )),
        other => Err(ApiError::wrong_type("tool_choice", "a string or an object", other)),
    }
}

/// `text.format` (and `text.verbosity`, at its default only).
fn text_format(text: &Json) -> Result<Option<&Json>, ApiError> {
    let Json::Object(text) = text else {
        return Err(ApiError::wrong_type("text", "an object", text));
    };
    let mut format = None;
    for (key, value) in text {
        match (key.as_str(), value) {
            (_, Json::Null) => {}
            ("format", value) => format = Some(value),
            ("verbosity", Json::String(v)) if v == "medium" => {}
            ("verbosity", _) => {
                return Err(ApiError::unsupported("text.verbosity", "Only 'medium' verbosity is available."));
            }
            (other, _) => return Err(ApiError::unknown_param(&format!("text.{other}"))),
        }
    }
    Ok(format)
}

/// `text.format` as chat's `response_format` (json_schema's fields are flat
/// here, nested there).
fn response_format_of(format: &Json) -> Json {
    match format.get("type").and_then(Json::as_str) {
        Some("json_schema") => {
            let mut schema = format.as_object().cloned().unwrap_or_default();
            schema.remove("type");
            json!({"type": "json_schema", "json_schema": schema})
        }
        _ => format.clone(),
    }
}

/// What needs server-side state: refused unless at its off value.
fn stateless(f: &mut Fields) -> Result<(), ApiError> {
    if f.bool("store")? == Some(true) {
        return Err(ApiError::unsupported(
            "store",
            "This server keeps no responses: send 'store': false (previous_response_id is not available either).",
        ));
    }
    if f.bool("background")? == Some(true) {
        return Err(ApiError::unsupported("background", "Background responses need stored responses."));
    }
    for key in ["previous_response_id", "conversation", "prompt", "context_management"] {
        if f.take(key).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported(
                key,
                format!("'{key}' needs responses stored on the server; this one keeps none (send the whole input)."),
            ));
        }
    }
    if let Some(truncation) = f.string("truncation")? {
        if truncation != "disabled" {
            return Err(ApiError::unsupported("truncation", "Only 'disabled' truncation is available."));
        }
    }
    if let Some(v) = f.take("max_tool_calls") {
        if !(v.is_null() || v.is_u64()) {
            return Err(ApiError::wrong_type("max_tool_calls", "an integer", &v));
        }
    }
    Ok(())
}

/// A chat request's error (the parser's, or the prompt's preparation) in
/// the Responses request's words.
pub(super) fn renamed(mut e: ApiError) -> ApiError {
    if let Some(param) = e.param.take() {
        let renamed = match param.as_str() {
            p if p == "messages" || p.starts_with("messages[") => "input".to_string(),
            "max_tokens" => "max_output_tokens".to_string(),
            "response_format" => "text.format".to_string(),
            "reasoning_effort" => "reasoning.effort".to_string(),
            "logprobs" | "top_logprobs" => "top_logprobs".to_string(),
            p if p.starts_with("response_format.json_schema.") => {
                format!("text.format.{}", &p["response_format.json_schema.".len()..])
            }
            p if p.starts_with("response_format.") => format!("text.format.{}", &p["response_format.".len()..]),
            p if p.starts_with("tools[") => p.replacen(".function.", ".", 1),
            p => p.to_string(),
        };
        e.param = Some(renamed);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: usize = 1000;

    fn parse_json(body: Json) -> Result<ResponsesRequest, ApiError> {
        let mut base = json!({"model": "m", "input": "hi"});
        if let (Some(b), Some(extra)) = (base.as_object_mut(), body.as_object()) {
            b.extend(extra.clone());
        }
        parse(&serde_json::to_vec(&base).expect("json"), VOCAB)
    }

    #[test]
    fn items_tools_and_formats_become_the_chat_request() {
        let req = parse_json(json!({
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"x\":1}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
            ],
            "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}, "strict": null}],
            "tool_choice": {"type": "function", "name": "w"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
            "max_output_tokens": 32, "temperature": 0.5, "store": false, "metadata": {"k": "v"},
            "include": ["message.output_text.logprobs"], "top_logprobs": 2
        }))
        .expect("valid");
        let messages = &req.chat.messages;
        assert_eq!(messages.len(), 5, "{messages:?}");
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[2]["tool_calls"].as_array().map(Vec::len), Some(2), "calls in a row are one turn");
        assert_eq!((messages[3]["role"].as_str(), messages[3]["tool_call_id"].as_str()), (Some("tool"), Some("c1")));
        assert_eq!(req.chat.max_tokens, Some(32));
        assert_eq!(req.chat.logprobs, Some(2));
        assert!(req.chat.response_format.is_some());
        assert_eq!(req.echo.metadata.get("k"), Some(&json!("v")));
    }

    #[test]
    fn what_cannot_be_honoured_is_a_400_naming_it() {
        for (body, param) in [
            (json!({"input": null}), "input"),
            (json!({"input": 5}), "input"),
            (json!({"input": []}), "input"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[0].content[0].type",
            ),
            (json!({"input": [{"type": "item_reference", "id": "x"}]}), "input[0].type"),
            (json!({"input": [{"type": "function_call", "name": "w"}]}), "input[0]"),
            (json!({"store": true}), "store"),
            (json!({"previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"background": true}), "background"),
            (json!({"truncation": "auto"}), "truncation"),
            (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
            (json!({"tools": [{"type": "function", "name": "bad name"}]}), "tools[0].name"),
            (json!({"text": {"format": {"type": "yaml"}}}), "text.format.type"),
            (json!({"include": ["reasoning.encrypted_content"]}), "include[0]"),
            (json!({"max_output_tokens": 0}), "max_output_tokens"),
            (json!({"temperature": 3}), "temperature"),
            (json!({"reasoning": {"effort": "max"}}), "reasoning.effort"),
            (json!({"n": 2}), "n"),
        ] {
            let e = parse_json(body.clone()).expect_err(&format!("{body} should be rejected"));
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{body}: {}", e.message);
        }
    }
}
