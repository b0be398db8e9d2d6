//! Tools for models whose chat template has no place for them: kandle's
//! generic tool prompt in the system message, earlier calls written back as the
//! JSON the prompt asks for (`tool_grammar` constrains calls to it).

use serde_json::{json, Value as Json};

/// `messages` with the tools described in the system message (merged into
/// the first one, or a new one first) and earlier assistant calls as JSON text.
pub fn with_tools(messages: &[Json], tools: &[Json]) -> Vec<Json> {
    let listing: Vec<String> = tools
        .iter()
        .filter_map(|t| t.get("function"))
        .map(|f| {
            json!({
                "name": f.get("name").cloned().unwrap_or(Json::Null),
                "description": f.get("description").cloned().unwrap_or(Json::Null),
                "parameters": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
            })
            .to_string()
        })
        .collect();
    let prompt = format!(
        "You can call these tools:\n{}\n\nTo call a tool, answer with only a JSON object \
         {{\"name\": <tool name>, \"arguments\": <an object of its parameters>}}; for several calls, \
         write one such object after another. Otherwise answer normally.",
        listing.join("\n")
    );
    let mut out: Vec<Json> = messages.iter().map(written_calls).collect();
    match out.first_mut() {
        Some(first) if first.get("role").and_then(Json::as_str) == Some("system") => {
            let content = first.get("content").and_then(Json::as_str).unwrap_or_default();
            first["content"] = Json::String(format!("{content}\n\n{prompt}").trim_start().to_string());
        }
        _ => out.insert(0, json!({"role": "system", "content": prompt})),
    }
    out
}

/// An assistant message's `tool_calls` appended to its content as the JSON
/// objects the generic prompt asks for.
fn written_calls(message: &Json) -> Json {
    let Some(calls) = message.get("tool_calls").and_then(Json::as_array) else { return message.clone() };
    let written: Vec<String> = calls
        .iter()
        .filter_map(|c| c.get("function"))
        .map(|f| {
            json!({
                "name": f.get("name").cloned().unwrap_or(Json::Null),
                "arguments": f.get("arguments").cloned().unwrap_or_else(|| json!({})),
            })
            .to_string()
        })
        .collect();
    let mut message = message.clone();
    let content = message.get("content").and_then(Json::as_str).unwrap_or_default().to_string();
    message["content"] = Json::String([content, written.join("\n")].join("\n").trim().to_string());
    if let Some(object) = message.as_object_mut() {
        object.remove("tool_calls");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Json> {
        vec![
            json!({"type": "function", "function": {"name": "weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "time"}}),
        ]
    }

    #[test]
    fn the_prompt_joins_the_system_message_and_calls_become_json() {
        let messages = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "-3 C"}),
        ];
        let out = with_tools(&messages, &tools());
        assert_eq!(out.len(), 4);
        let system = out[0]["content"].as_str().expect("system");
        assert!(system.starts_with("Be brief.") && system.contains("\"name\":\"weather\""), "{system}");
        assert_eq!(out[2]["content"], json!({"name": "weather", "arguments": {"city": "Oslo"}}).to_string());
        assert!(out[2].get("tool_calls").is_none());
        assert_eq!(out[3], messages[3]);
        let without_system = with_tools(&messages[1..2], &tools());
        assert_eq!(without_system[0]["role"], "system");
    }
}
