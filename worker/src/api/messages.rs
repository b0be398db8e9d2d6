//! Validates `messages` and normalises them into what chat templates expect.

use serde_json::{json, Map, Value as Json};

use super::error::ApiError;

/// Checks every message and returns template-ready copies: content as a string,
/// `developer` as `system`, tool-call arguments parsed into objects.
pub fn normalize(value: Json) -> Result<Vec<Json>, ApiError> {
    let Json::Array(items) = value else {
        return Err(ApiError::wrong_type("messages", "an array", &value));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' must contain at least one message."));
    }
    items.into_iter().enumerate().map(|(i, item)| normalize_one(i, item)).collect()
}

fn normalize_one(i: usize, item: Json) -> Result<Json, ApiError> {
    let param = format!("messages[{i}]");
    let Json::Object(mut m) = item else {
        return Err(ApiError::wrong_type(&param, "an object", &item));
    };
    let role = match m.remove("role") {
        Some(Json::String(r)) => r,
        Some(other) => return Err(ApiError::wrong_type(&format!("{param}.role"), "a string", &other)),
        None => return Err(ApiError::missing(&format!("{param}.role"))),
    };
    let mut out = Map::new();
    let template_role = match role.as_str() {
        "developer" => "system",
        "system" | "user" | "assistant" | "tool" => role.as_str(),
        other => {
            return Err(ApiError::invalid(
                format!("{param}.role"),
                format!("Invalid value: '{other}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'."),
            ))
        }
    };
    out.insert("role".into(), json!(template_role));

    let content = m.remove("content").unwrap_or(Json::Null);
    let has_tool_calls = m.get("tool_calls").is_some_and(|t| !t.is_null());
    let text = match content {
        Json::Null if role == "assistant" && has_tool_calls => String::new(),
        Json::Null => return Err(ApiError::missing(&format!("{param}.content"))),
        other => content_text(&format!("{param}.content"), other)?,
    };
    out.insert("content".into(), json!(text));

    if let Some(name) = m.remove("name") {
        match name {
            Json::String(n) => {
                out.insert("name".into(), json!(n));
            }
            Json::Null => {}
            other => return Err(ApiError::wrong_type(&format!("{param}.name"), "a string", &other)),
        }
    }
    match role.as_str() {
        "assistant" => {
            if let Some(calls) = m.remove("tool_calls").filter(|c| !c.is_null()) {
                out.insert("tool_calls".into(), tool_calls(&format!("{param}.tool_calls"), calls)?);
            }
            for key in ["refusal", "reasoning_content"] {
                match m.remove(key) {
                    None | Some(Json::Null) | Some(Json::String(_)) => {}
                    Some(other) => return Err(ApiError::wrong_type(&format!("{param}.{key}"), "a string", &other)),
                }
            }
        }
        "tool" => match m.remove("tool_call_id") {
            Some(Json::String(id)) => {
                out.insert("tool_call_id".into(), json!(id));
            }
            Some(other) => return Err(ApiError::wrong_type(&format!("{param}.tool_call_id"), "a string", &other)),
            None => return Err(ApiError::missing(&format!("{param}.tool_call_id"))),
        },
        _ => {}
    }
    if let Some(key) = m.keys().next() {
        return Err(ApiError::unknown_param(&format!("{param}.{key}")));
    }
    Ok(Json::Object(out))
}

/// A string, or an array of text parts joined by newlines.
fn content_text(param: &str, content: Json) -> Result<String, ApiError> {
    match content {
        Json::String(s) => Ok(s),
        Json::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                let part_param = format!("{param}[{j}]");
                let kind = part.get("type").and_then(Json::as_str);
                match kind {
                    Some("text") => match part.get("text") {
                        Some(Json::String(t)) => texts.push(t.clone()),
                        Some(other) => {
                            return Err(ApiError::wrong_type(&format!("{part_param}.text"), "a string", other))
                        }
                        None => return Err(ApiError::missing(&format!("{part_param}.text"))),
                    },
                    Some(other @ ("image_url" | "input_audio" | "file" | "video_url" | "video")) => {
                        return Err(ApiError::unsupported(
                            &format!("{part_param}.type"),
                            format!("This model accepts text only; content parts of type '{other}' are not supported."),
                        ))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{part_param}.type"),
                            "Content parts must have a 'type' of 'text'.",
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        other => Err(ApiError::wrong_type(param, "a string or an array of content parts", &other)),
    }
}

/// OpenAI tool calls carry arguments as a JSON string; templates expect an object.
fn tool_calls(param: &str, calls: Json) -> Result<Json, ApiError> {
    let Json::Array(calls) = calls else {
        return Err(ApiError::wrong_type(param, "an array", &calls));
    };
    let mut out = Vec::with_capacity(calls.len());
    for (k, call) in calls.into_iter().enumerate() {
        let call_param = format!("{param}[{k}]");
        let name = call.pointer("/function/name").and_then(Json::as_str);
        let Some(name) = name else {
            return Err(ApiError::missing(&format!("{call_param}.function.name")));
        };
        let arguments = match call.pointer("/function/arguments") {
            Some(Json::String(s)) => serde_json::from_str::<Json>(s).unwrap_or_else(|_| json!(s)),
            Some(Json::Null) | None => json!({}),
            Some(other) => other.clone(),
        };
        let id = call.get("id").cloned().unwrap_or(Json::Null);
        out.push(json!({
            "id": id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
    }
    Ok(Json::Array(out))
}
