//! Parses and validates a Chat Completions body field by field, so every rejection
//! names the offending `param`.

use kandle_contract::sampling::{self, Interval};
use kandle_contract::SamplingDefaults;
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use crate::engine::grammar::OutputFormat;
use crate::engine::{SamplingParams, Stopping};

pub const MAX_N: u64 = 8;
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// A validated request. Sampling fields the client left out are `None`, so the
/// model's defaults can fill them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub model: String,
    /// Messages normalised for the chat template (text content, `developer` as
    /// `system`, tool-call arguments as objects).
    pub messages: Vec<Json>,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingOverrides,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
    pub tools: Option<Vec<Json>>,
    pub tool_choice: ToolChoice,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: bool,
    pub enable_thinking: Option<bool>,
    pub thinking_budget: Option<usize>,
    pub reasoning_effort: Option<String>,
    /// `response_format` other than text: the output is constrained to it.
    pub response_format: Option<OutputFormat>,
    /// vLLM's `cache_salt`: prefix-cache blocks are shared only with requests
    /// carrying the same salt.
    pub cache_salt: Option<String>,
    /// vLLM's `min_tokens`, `ignore_eos`, `stop_token_ids`,
    /// `include_stop_str_in_output` and `skip_special_tokens`.
    pub stopping: Stopping,
    /// vLLM's `chat_template_kwargs`: more variables for the chat template
    /// (`enable_thinking` among them is read as the top-level one).
    pub template_kwargs: Map<String, Json>,
}

/// Variables the chat template gets from kandle itself, which
/// `chat_template_kwargs` cannot replace.
const TEMPLATE_OWN: [&str; 6] =
    ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "reasoning_effort"];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Text or calls, as the model chooses.
    #[default]
    Auto,
    /// No tools offered.
    None,
    /// At least one call, of any offered tool.
    Required,
    /// A call of this function.
    Named(String),
}

/// Sampling values given in a request (or in the model's defaults).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

/// The model's defaults (`--sampling-defaults`, already validated by the contract).
impl From<&SamplingDefaults> for SamplingOverrides {
    fn from(d: &SamplingDefaults) -> Self {
        let f = |v: Option<f64>| v.map(|x| x as f32);
        Self {
            temperature: f(d.temperature),
            top_p: f(d.top_p),
            top_k: d.top_k.map(|k| k as usize),
            min_p: f(d.min_p),
            presence_penalty: f(d.presence_penalty),
            frequency_penalty: f(d.frequency_penalty),
            repetition_penalty: f(d.repetition_penalty),
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingOverrides {
    /// Request values first, then `defaults`, then the neutral values.
    pub fn resolve(&self, defaults: &SamplingOverrides, logprobs: Option<usize>) -> SamplingParams {
        let base = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.or(defaults.temperature).unwrap_or(base.temperature),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(base.top_p),
            top_k: self.top_k.or(defaults.top_k).unwrap_or(base.top_k),
            min_p: self.min_p.or(defaults.min_p).unwrap_or(base.min_p),
            presence_penalty: self.presence_penalty.or(defaults.presence_penalty).unwrap_or(base.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(defaults.frequency_penalty).unwrap_or(base.frequency_penalty),
            repetition_penalty: self
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(base.repetition_penalty),
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
            logprobs,
        }
    }
}

/// Parses a request body. `vocab_size` bounds `logit_bias` keys.
pub fn parse(body: &[u8], vocab_size: usize) -> Result<ChatRequest, ApiError> {
    let mut f = Fields::of(body)?;

    let model = f.string("model")?.ok_or_else(|| ApiError::missing("model"))?;
    let messages = match f.take("messages") {
        None => return Err(ApiError::missing("messages")),
        Some(v) => super::messages::normalize(v)?,
    };
    let max_tokens = f.uint("max_tokens", 1, u64::from(u32::MAX))?;
    let max_completion_tokens = f.uint("max_completion_tokens", 1, u64::from(u32::MAX))?;
    let sampling = parse_sampling(&mut f, vocab_size)?;
    let n = f.uint("n", 1, MAX_N)?.unwrap_or(1) as usize;
    let stop = parse_stop(&mut f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = parse_stream_options(&mut f, stream)?;
    let logprobs = parse_logprobs(&mut f)?;
    let tools = parse_tools(&mut f)?;
    let tool_choice = parse_tool_choice(&mut f, tools.as_deref())?;
    let parallel_tool_calls = f.bool("parallel_tool_calls")?.unwrap_or(true);
    f.string("user")?;
    let mut enable_thinking = f.bool("enable_thinking")?;
    let thinking_budget = f.uint("thinking_budget", 1, u64::from(u32::MAX))?.map(|v| v as usize);
    let reasoning_effort = f.one_of("reasoning_effort", &["none", "minimal", "low", "medium", "high"])?;
    let response_format = parse_response_format(&mut f)?;
    let cache_salt = f.string("cache_salt")?;
    if cache_salt.as_deref() == Some("") {
        return Err(ApiError::invalid("cache_salt", "'cache_salt' must be a non-empty string if provided."));
    }
    let max_tokens = max_completion_tokens.or(max_tokens).map(|v| v as usize);
    let stopping = parse_stopping(&mut f, vocab_size, max_tokens)?;
    if stopping.ignore_eos && (response_format.is_some() || tools.is_some()) {
        // A finished grammar allows only the end token: ignored, it would repeat to the limit.
        return Err(ApiError::invalid(
            "ignore_eos",
            "'ignore_eos' cannot be combined with 'response_format' or 'tools': their grammar ends the answer.",
        ));
    }
    let template_kwargs = parse_template_kwargs(&mut f, &mut enable_thinking)?;
    reject_unavailable(&mut f)?;

    f.none_left()?;
    Ok(ChatRequest {
        model,
        messages,
        max_tokens,
        sampling,
        n,
        stop,
        stream,
        include_usage,
        logprobs,
        tools,
        tool_choice,
        parallel_tool_calls,
        enable_thinking,
        thinking_budget,
        reasoning_effort,
        response_format,
        cache_salt,
        stopping,
        template_kwargs,
    })
}

/// vLLM's stopping extensions, shared by chat and text completions.
pub(super) fn parse_stopping(
    f: &mut Fields,
    vocab_size: usize,
    max_tokens: Option<usize>,
) -> Result<Stopping, ApiError> {
    let base = Stopping::default();
    let min_tokens = f.uint("min_tokens", 0, u64::from(u32::MAX))?.map_or(0, |v| v as usize);
    if let Some(max) = max_tokens.filter(|max| min_tokens > *max) {
        return Err(ApiError::invalid(
            "min_tokens",
            format!("'min_tokens' ({min_tokens}) must be less than or equal to 'max_tokens' ({max})."),
        ));
    }
    let stop_token_ids = match f.take("stop_token_ids") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(ids)) => ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let param = format!("stop_token_ids[{i}]");
                let id = id.as_u64().ok_or_else(|| ApiError::wrong_type(&param, "a token id (an integer)", id))?;
                if id as usize >= vocab_size {
                    return Err(ApiError::invalid(&param, format!("`{id}` is not a token id of this model.")));
                }
                Ok(id as u32)
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(ApiError::wrong_type("stop_token_ids", "an array of token ids", &other)),
    };
    Ok(Stopping {
        min_tokens,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(base.ignore_eos),
        stop_token_ids,
        include_stop_str_in_output: f.bool("include_stop_str_in_output")?.unwrap_or(base.include_stop_str_in_output),
        skip_special_tokens: f.bool("skip_special_tokens")?.unwrap_or(base.skip_special_tokens),
    })
}

/// `chat_template_kwargs`: an object of template variables; its
/// `enable_thinking` (how Qwen3 users turn thinking off through vLLM) is the
/// top-level `enable_thinking`, which it must not contradict.
fn parse_template_kwargs(f: &mut Fields, enable_thinking: &mut Option<bool>) -> Result<Map<String, Json>, ApiError> {
    let mut kwargs = match f.take("chat_template_kwargs") {
        None | Some(Json::Null) => return Ok(Map::new()),
        Some(Json::Object(kwargs)) => kwargs,
        Some(other) => return Err(ApiError::wrong_type("chat_template_kwargs", "an object", &other)),
    };
    if let Some(own) = TEMPLATE_OWN.iter().find(|k| kwargs.contains_key(**k)) {
        return Err(ApiError::invalid(
            format!("chat_template_kwargs.{own}"),
            format!("'{own}' is set by the server from the request; it cannot be passed to the template."),
        ));
    }
    if let Some(value) = kwargs.remove("enable_thinking") {
        let param = "chat_template_kwargs.enable_thinking";
        let on = expect_bool(param, &value)?;
        if enable_thinking.is_some_and(|top| top != on) {
            return Err(ApiError::invalid(param, "It contradicts the request's 'enable_thinking'."));
        }
        *enable_thinking = Some(on);
    }
    Ok(kwargs)
}

pub(super) fn parse_sampling(f: &mut Fields, vocab_size: usize) -> Result<SamplingOverrides, ApiError> {
    let temperature = f.number("temperature", sampling::TEMPERATURE)?;
    let top_p = f.number("top_p", sampling::TOP_P)?;
    let top_k = f.uint("top_k", 0, u64::from(sampling::TOP_K_MAX))?.map(|v| v as usize);
    let min_p = f.number("min_p", sampling::MIN_P)?;
    let presence_penalty = f.number("presence_penalty", sampling::PRESENCE_PENALTY)?;
    let frequency_penalty = f.number("frequency_penalty", sampling::FREQUENCY_PENALTY)?;
    let repetition_penalty = f.number("repetition_penalty", sampling::REPETITION_PENALTY)?;
    let logit_bias = parse_logit_bias(f, vocab_size)?;
    let seed = match f.take("seed") {
        None | Some(Json::Null) => None,
        Some(v) => match v.as_i64() {
            Some(s) => Some(s as u64),
            None => return Err(ApiError::wrong_type("seed", "an integer", &v)),
        },
    };
    Ok(SamplingOverrides {
        temperature,
        top_p,
        top_k,
        min_p,
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        logit_bias,
        seed,
    })
}

fn parse_logit_bias(f: &mut Fields, vocab_size: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match f.take("logit_bias") {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Object(map)) => map,
        Some(other) => return Err(ApiError::wrong_type("logit_bias", "an object", &other)),
    };
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let param = format!("logit_bias.{key}");
        let token: u32 = key.parse().ok().filter(|t| (*t as usize) < vocab_size).ok_or_else(|| {
            ApiError::invalid(&param, format!("Invalid key in 'logit_bias': `{key}` is not a token id of this model."))
        })?;
        let bias = value.as_f64().ok_or_else(|| ApiError::wrong_type(&param, "a number", &value))?;
        check_range(&param, LOGIT_BIAS, bias)?;
        out.push((token, bias as f32));
    }
    Ok(out)
}

pub(super) fn parse_stop(f: &mut Fields) -> Result<Vec<String>, ApiError> {
    let stops = match f.take("stop") {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::String(s)) => vec![s],
        Some(Json::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Json::String(s) => Ok(s),
                other => Err(ApiError::wrong_type(&format!("stop[{i}]"), "a string", &other)),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(ApiError::wrong_type("stop", "a string or an array of strings", &other)),
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            "stop",
            format!("Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}.", stops.len()),
        ));
    }
    if let Some(i) = stops.iter().position(String::is_empty) {
        return Err(ApiError::invalid(format!("stop[{i}]"), "Stop sequences must not be empty."));
    }
    Ok(stops)
}

pub(super) fn parse_stream_options(f: &mut Fields, stream: bool) -> Result<bool, ApiError> {
    let options = match f.take("stream_options") {
        None | Some(Json::Null) => return Ok(false),
        Some(Json::Object(options)) => options,
        Some(other) => return Err(ApiError::wrong_type("stream_options", "an object", &other)),
    };
    if !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    let mut include_usage = false;
    for (key, value) in options {
        match key.as_str() {
            "include_usage" => include_usage = expect_bool("stream_options.include_usage", &value)?,
            // Usage in the final chunk is what kandle reports; obfuscation padding is not needed.
            "include_obfuscation" => {
                expect_bool("stream_options.include_obfuscation", &value)?;
            }
            other => return Err(ApiError::unknown_param(&format!("stream_options.{other}"))),
        }
    }
    Ok(include_usage)
}

fn parse_logprobs(f: &mut Fields) -> Result<Option<usize>, ApiError> {
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.uint("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
    match (logprobs, top) {
        (false, Some(t)) if t > 0 => {
            Err(ApiError::invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true."))
        }
        (false, _) => Ok(None),
        (true, top) => Ok(Some(top.unwrap_or(0) as usize)),
    }
}

fn parse_tools(f: &mut Fields) -> Result<Option<Vec<Json>>, ApiError> {
    let tools = match f.take("tools") {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Array(tools)) => tools,
        Some(other) => return Err(ApiError::wrong_type("tools", "an array", &other)),
    };
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool.get("type").and_then(Json::as_str) != Some("function") {
            return Err(ApiError::invalid(format!("{param}.type"), "Only tools of type 'function' are supported."));
        }
        let name = tool.pointer("/function/name").and_then(Json::as_str);
        if !name.is_some_and(valid_function_name) {
            return Err(ApiError::invalid(
                format!("{param}.function.name"),
                "Function names must be 1-64 characters of a-z, A-Z, 0-9, underscores and dashes.",
            ));
        }
        if let Some(params) = tool.pointer("/function/parameters") {
            if !params.is_object() {
                return Err(ApiError::wrong_type(&format!("{param}.function.parameters"), "an object", params));
            }
        }
    }
    Ok((!tools.is_empty()).then_some(tools))
}

fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_tool_choice(f: &mut Fields, tools: Option<&[Json]>) -> Result<ToolChoice, ApiError> {
    let choice = match f.take("tool_choice") {
        None | Some(Json::Null) => return Ok(ToolChoice::Auto),
        Some(Json::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => return Err(ApiError::invalid("tool_choice", format!("Invalid 'tool_choice': `{other}`."))),
        },
        Some(Json::Object(choice)) => {
            let name = match (choice.get("type").and_then(Json::as_str), choice.get("function")) {
                (Some("function"), Some(function)) => function.get("name").and_then(Json::as_str),
                _ => None,
            };
            let Some(name) = name else {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "A named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                ));
            };
            ToolChoice::Named(name.to_string())
        }
        Some(other) => return Err(ApiError::wrong_type("tool_choice", "a string or an object", &other)),
    };
    match (&choice, tools) {
        (ToolChoice::Required | ToolChoice::Named(_), None) => {
            Err(ApiError::invalid("tool_choice", "tool_choice 'required' or a named function needs 'tools'."))
        }
        (ToolChoice::Named(name), Some(tools))
            if !tools.iter().any(|t| t.pointer("/function/name").and_then(Json::as_str) == Some(name)) =>
        {
            Err(ApiError::invalid("tool_choice", format!("tool_choice names '{name}', which is not among the tools.")))
        }
        _ => Ok(choice),
    }
}

/// `text` (or none): free text. `json_object`: any JSON object.
/// `json_schema`: `{"name", "schema", "strict", "description"}`; the schema is
/// compiled when the request is prepared (an unsupported or invalid schema is
/// a 400 naming `response_format`). With `strict: true` unknown schema keywords
/// are errors; otherwise they are ignored.
fn parse_response_format(f: &mut Fields) -> Result<Option<OutputFormat>, ApiError> {
    let format = match f.take("response_format") {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Object(format)) => format,
        Some(other) => return Err(ApiError::wrong_type("response_format", "an object", &other)),
    };
    let kind = format.get("type").and_then(Json::as_str);
    let check_keys = |allowed: &[&str]| match format.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(ApiError::invalid(
            "response_format",
            format!("Unrecognized field '{key}' in response_format of type '{}'.", kind.unwrap_or_default()),
        )),
        None => Ok(()),
    };
    match kind {
        Some("text") => check_keys(&["type"]).map(|()| None),
        Some("json_object") => check_keys(&["type"]).map(|()| Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            check_keys(&["type", "json_schema"])?;
            let Some(Json::Object(spec)) = format.get("json_schema") else {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "response_format of type 'json_schema' needs a 'json_schema' object.",
                ));
            };
            if let Some(key) = spec.keys().find(|k| !["name", "schema", "strict", "description"].contains(&k.as_str()))
            {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    format!("Unrecognized field '{key}' in response_format.json_schema."),
                ));
            }
            match spec.get("name") {
                Some(Json::String(name))
                    if !name.is_empty()
                        && name.len() <= 64
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                _ => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'.",
                    ))
                }
            }
            let strict = match spec.get("strict") {
                None | Some(Json::Null) => false,
                Some(Json::Bool(b)) => *b,
                Some(other) => {
                    return Err(ApiError::wrong_type("response_format.json_schema.strict", "a boolean", other))
                }
            };
            let schema = match spec.get("schema") {
                None | Some(Json::Null) => serde_json::json!({}),
                Some(Json::Object(schema)) => Json::Object(schema.clone()),
                Some(other) => {
                    return Err(ApiError::wrong_type("response_format.json_schema.schema", "an object", other))
                }
            };
            Ok(Some(OutputFormat::JsonSchema { schema, strict }))
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "response_format.type must be one of 'text', 'json_object', 'json_schema'.",
        )),
    }
}

/// Features a text-only local worker cannot honour: accepted at their off value,
/// rejected otherwise, never silently ignored.
fn reject_unavailable(f: &mut Fields) -> Result<(), ApiError> {
    if let Some(v) = f.take("modalities") {
        let text_only = v.is_null() || v.as_array().is_some_and(|m| m.iter().all(|x| x == "text"));
        if !text_only {
            return Err(ApiError::unsupported(
                "modalities",
                "This model only produces text: modalities must be [\"text\"].",
            ));
        }
    }
    for key in ["audio", "prediction", "web_search_options", "functions", "function_call"] {
        if let Some(v) = f.take(key) {
            if !v.is_null() {
                let hint = if key.starts_with("function") { " Use 'tools' and 'tool_choice'." } else { "" };
                return Err(ApiError::unsupported(key, format!("'{key}' is not supported by this server.{hint}")));
            }
        }
    }
    for key in ["enable_search", "enable_code_interpreter", "vl_high_resolution_images", "store"] {
        if f.bool(key)? == Some(true) {
            return Err(ApiError::unsupported(
                key,
                format!("'{key}' is not available on this server; it must be false."),
            ));
        }
    }
    if let Some(v) = f.take("search_options") {
        if !(v.is_null() || v.is_object()) {
            return Err(ApiError::wrong_type("search_options", "an object", &v));
        }
    }
    if let Some(v) = f.take("metadata") {
        let valid = v.is_null() || v.as_object().is_some_and(|m| m.len() <= 16 && m.values().all(Json::is_string));
        if !valid {
            return Err(ApiError::invalid("metadata", "metadata must be an object of at most 16 string values."));
        }
    }
    f.one_of("service_tier", &["auto", "default"])?;
    Ok(())
}

/// The request object, consumed field by field.
/// A request body's fields, taken one by one as they are read.
pub(super) struct Fields {
    obj: Map<String, Json>,
}

impl Fields {
    /// The body's fields, if it is a JSON object.
    pub(super) fn of(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice(body).map_err(ApiError::bad_json)? {
            Json::Object(obj) => Ok(Self { obj }),
            _ => Err(ApiError::bad_json("the body must be a JSON object")),
        }
    }

    /// A field nobody read: a 400 naming it.
    pub(super) fn none_left(&self) -> Result<(), ApiError> {
        match self.obj.keys().next() {
            Some(key) => Err(ApiError::unknown_param(key)),
            None => Ok(()),
        }
    }

    pub(super) fn take(&mut self, key: &str) -> Option<Json> {
        self.obj.remove(key)
    }

    pub(super) fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(other) => Err(ApiError::wrong_type(key, "a string", &other)),
        }
    }

    pub(super) fn one_of(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
        let value = self.string(key)?;
        if let Some(v) = &value {
            if !allowed.contains(&v.as_str()) {
                return Err(ApiError::invalid(
                    key,
                    format!("Invalid value for '{key}': `{v}`. Supported values are: {}.", allowed.join(", ")),
                ));
            }
        }
        Ok(value)
    }

    pub(super) fn bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => expect_bool(key, &v).map(Some),
        }
    }

    pub(super) fn number(&mut self, key: &str, range: Interval) -> Result<Option<f32>, ApiError> {
        match self.take(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| ApiError::wrong_type(key, "a number", &v))?;
                check_range(key, range, x)?;
                Ok(Some(x as f32))
            }
        }
    }

    pub(super) fn uint(&mut self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.take(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => {
                let Some(x) = v.as_i64() else {
                    return Err(ApiError::wrong_type(key, "an integer", &v));
                };
                if x < min as i64 || (x as u64) > max {
                    return Err(ApiError::invalid(
                        key,
                        format!("Invalid '{key}': expected an integer from {min} to {max}, but got {x} instead."),
                    ));
                }
                Ok(Some(x as u64))
            }
        }
    }
}

pub(super) fn expect_bool(key: &str, v: &Json) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| ApiError::wrong_type(key, "a boolean", v))
}

/// The range of each `logit_bias` value.
const LOGIT_BIAS: Interval = Interval::closed(-100.0, 100.0);

fn check_range(key: &str, range: Interval, x: f64) -> Result<(), ApiError> {
    if range.contains(x) {
        return Ok(());
    }
    Err(ApiError::invalid(key, format!("Invalid '{key}': expected a value {}, but got {x} instead.", range.describe())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VOCAB: usize = 1000;

    fn body(extra: Json) -> Vec<u8> {
        let mut req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let (Json::Object(base), Json::Object(extra)) = (&mut req, extra) {
            base.extend(extra);
        }
        serde_json::to_vec(&req).expect("serializes")
    }

    fn rejected(extra: Json) -> ApiError {
        parse(&body(extra.clone()), VOCAB).expect_err(&format!("{extra} should be rejected"))
    }

    #[test]
    fn minimal_request_gets_neutral_values() {
        let req = parse(&body(json!({})), VOCAB).expect("valid");
        assert_eq!(req.model, "m");
        assert_eq!(req.n, 1);
        assert!(!req.stream && !req.include_usage);
        assert_eq!(req.max_tokens, None);
        assert_eq!(req.sampling, SamplingOverrides::default());
        assert_eq!(req.messages, vec![json!({"role": "user", "content": "hi"})]);
    }

    #[test]
    fn every_field_is_read() {
        let req = parse(
            &body(json!({
                "max_tokens": 10, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
                "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
                "logit_bias": {"5": -100, "7": 2.5}, "seed": 11, "n": 2, "stop": "END", "stream": true,
                "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3, "user": "u1",
                "enable_thinking": false, "reasoning_effort": "low", "tool_choice": "none",
                "parallel_tool_calls": false, "response_format": {"type": "text"}, "modalities": ["text"],
                "enable_search": false, "store": false, "metadata": {"team": "a"}, "service_tier": "auto",
                "thinking_budget": 100
            })),
            VOCAB,
        )
        .expect("valid");
        assert_eq!(req.max_tokens, Some(7));
        assert_eq!(req.sampling.temperature, Some(0.5));
        assert_eq!(req.sampling.top_k, Some(40));
        assert_eq!(req.sampling.logit_bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!(req.sampling.seed, Some(11));
        assert_eq!(req.n, 2);
        assert_eq!(req.stop, vec!["END".to_string()]);
        assert!(req.stream && req.include_usage);
        assert_eq!(req.logprobs, Some(3));
        assert_eq!(req.tool_choice, ToolChoice::None);
        assert_eq!(req.enable_thinking, Some(false));
        assert_eq!(req.thinking_budget, Some(100));
        assert_eq!(req.reasoning_effort.as_deref(), Some("low"));
    }

    /// vLLM's extensions: read, defaults off (special tokens skipped), and
    /// `chat_template_kwargs.enable_thinking` taken as the top-level flag.
    #[test]
    fn vllm_extensions_are_read() {
        let plain = parse(&body(json!({})), VOCAB).expect("valid");
        assert_eq!(plain.stopping, Stopping::default());
        assert!(plain.stopping.skip_special_tokens && plain.template_kwargs.is_empty());
        let req = parse(
            &body(json!({"min_tokens": 3, "max_tokens": 3, "ignore_eos": true, "stop_token_ids": [4, 9],
                         "include_stop_str_in_output": true, "skip_special_tokens": false,
                         "chat_template_kwargs": {"enable_thinking": false, "custom": {"a": 1}}})),
            VOCAB,
        )
        .expect("valid");
        let want = Stopping {
            min_tokens: 3,
            ignore_eos: true,
            stop_token_ids: vec![4, 9],
            include_stop_str_in_output: true,
            skip_special_tokens: false,
        };
        assert_eq!(req.stopping, want);
        assert_eq!(req.enable_thinking, Some(false));
        assert_eq!(Json::Object(req.template_kwargs), json!({"custom": {"a": 1}}));
    }

    #[test]
    fn every_rejected_field_is_named() {
        let cases = [
            (json!({"model": 5}), "model"),
            (json!({"messages": "hi"}), "messages"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 1.5}), "max_tokens"),
            (json!({"max_completion_tokens": -1}), "max_completion_tokens"),
            (json!({"temperature": 2.1}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": "1"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.01}), "top_p"),
            (json!({"top_k": -1}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"logit_bias": [1]}), "logit_bias"),
            (json!({"logit_bias": {"x": 1}}), "logit_bias.x"),
            (json!({"logit_bias": {"1000": 1}}), "logit_bias.1000"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias.5"),
            (json!({"logit_bias": {"5": "big"}}), "logit_bias.5"),
            (json!({"seed": "s"}), "seed"),
            (json!({"n": 0}), "n"),
            (json!({"n": 9}), "n"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop": ["a", 1]}), "stop[1]"),
            (json!({"stop": ["a", ""]}), "stop[1]"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"stream_options": {"include_usage": true}}), "stream_options"),
            (json!({"stream": true, "stream_options": {"include_usage": 1}}), "stream_options.include_usage"),
            (json!({"stream": true, "stream_options": {"chunk": 1}}), "stream_options.chunk"),
            (json!({"logprobs": "true"}), "logprobs"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
            (json!({"tools": {}}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}), "tools[0].function.name"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tool_choice": "sometimes"}), "tool_choice"),
            (json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}), "tool_choice"),
            (json!({"parallel_tool_calls": "no"}), "parallel_tool_calls"),
            (json!({"user": 7}), "user"),
            (json!({"cache_salt": 7}), "cache_salt"),
            (json!({"cache_salt": ""}), "cache_salt"),
            (json!({"enable_thinking": "on"}), "enable_thinking"),
            (json!({"min_tokens": -1}), "min_tokens"),
            (json!({"min_tokens": 9, "max_tokens": 8}), "min_tokens"),
            (json!({"ignore_eos": "yes"}), "ignore_eos"),
            (json!({"ignore_eos": true, "response_format": {"type": "json_object"}}), "ignore_eos"),
            (json!({"stop_token_ids": 5}), "stop_token_ids"),
            (json!({"stop_token_ids": [1, "2"]}), "stop_token_ids[1]"),
            (json!({"stop_token_ids": [VOCAB]}), "stop_token_ids[0]"),
            (json!({"skip_special_tokens": 1}), "skip_special_tokens"),
            (
                json!({"include_stop_str_in_output": null, "spaces_between_special_tokens": true}),
                "spaces_between_special_tokens",
            ),
            (json!({"include_stop_str_in_output": "no"}), "include_stop_str_in_output"),
            (json!({"chat_template_kwargs": []}), "chat_template_kwargs"),
            (json!({"chat_template_kwargs": {"messages": []}}), "chat_template_kwargs.messages"),
            (json!({"chat_template_kwargs": {"enable_thinking": "no"}}), "chat_template_kwargs.enable_thinking"),
            (
                json!({"enable_thinking": true, "chat_template_kwargs": {"enable_thinking": false}}),
                "chat_template_kwargs.enable_thinking",
            ),
            (json!({"thinking_budget": 0}), "thinking_budget"),
            (json!({"reasoning_effort": "max"}), "reasoning_effort"),
            (json!({"response_format": {"type": "json_object", "schema": {}}}), "response_format"),
            (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
            (json!({"response_format": {"type": "json_schema", "json_schema": []}}), "response_format.json_schema"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}}),
                "response_format.json_schema.strict",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
                "response_format.json_schema.name",
            ),
            (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
            (json!({"response_format": "json"}), "response_format"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"audio": {"voice": "alloy"}}), "audio"),
            (json!({"prediction": {"type": "content"}}), "prediction"),
            (json!({"web_search_options": {}}), "web_search_options"),
            (json!({"functions": []}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"enable_search": true}), "enable_search"),
            (json!({"enable_code_interpreter": true}), "enable_code_interpreter"),
            (json!({"vl_high_resolution_images": true}), "vl_high_resolution_images"),
            (json!({"store": true}), "store"),
            (json!({"search_options": 3}), "search_options"),
            (json!({"metadata": {"a": 1}}), "metadata"),
            (json!({"service_tier": "flex"}), "service_tier"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tool_choice": {"type": "function"}}), "tool_choice"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                       "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (json!({"parallel_tool_calls": "yes"}), "parallel_tool_calls"),
            (json!({"best_of": 2}), "best_of"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": [1]}), "messages[0]"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "function", "content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
            (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
            (json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), "messages[0].content[0].text"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (json!({"messages": [{"role": "user", "content": [{"kind": "text"}]}]}), "messages[0].content[0].type"),
            (json!({"messages": [{"role": "user", "content": "x", "name": 3}]}), "messages[0].name"),
            (json!({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}), "messages[0].mood"),
            (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
            (json!({"messages": [{"role": "assistant", "tool_calls": 1}]}), "messages[0].tool_calls"),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]}),
                "messages[0].tool_calls[0].function.name",
            ),
        ];
        for (extra, param) in cases {
            let e = rejected(extra.clone());
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{extra}");
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn model_and_messages_are_required() {
        let e = parse(br#"{"messages": [{"role": "user", "content": "x"}]}"#, VOCAB).expect_err("no model");
        assert_eq!((e.param.as_deref(), e.code), (Some("model"), Some("missing_required_parameter")));
        let e = parse(br#"{"model": "m"}"#, VOCAB).expect_err("no messages");
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn malformed_bodies_are_invalid_json() {
        for bad in [&b"{"[..], b"[]", b"\"text\"", b"", b"{\"model\": \"m\",}"] {
            assert_eq!(parse(bad, VOCAB).expect_err("rejected").code, Some("invalid_json"));
        }
    }

    #[test]
    fn messages_are_normalised_for_templates() {
        let req = parse(
            &body(json!({"messages": [
                {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ]})),
            VOCAB,
        )
        .expect("valid");
        assert_eq!(req.messages[0], json!({"role": "system", "content": "a\nb"}));
        assert_eq!(req.messages[1]["content"], "");
        assert_eq!(req.messages[1]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(req.messages[2], json!({"role": "tool", "content": "42", "tool_call_id": "c1"}));
    }

    #[test]
    fn request_values_override_defaults() {
        let defaults = SamplingOverrides { temperature: Some(0.7), top_p: Some(0.8), ..Default::default() };
        let given = SamplingOverrides { temperature: Some(0.1), ..Default::default() };
        let p = given.resolve(&defaults, None);
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.1, 0.8, 0));
    }

    /// The request parser and the shared contract (which the CRD schema is
    /// built from) agree on every boundary of every knob.
    #[test]
    fn request_ranges_are_the_contract_ranges() {
        for knob in kandle_contract::sampling::KNOBS {
            for x in knob.range.probes() {
                let parsed = parse(&body(json!({knob.param: x})), VOCAB);
                assert_eq!(parsed.is_ok(), knob.range.contains(x), "{} = {x}: {parsed:?}", knob.param);
                let as_default: SamplingDefaults =
                    serde_json::from_value(json!({knob.param: x})).expect("defaults decode");
                assert_eq!(as_default.validate().is_ok(), knob.range.contains(x), "default {} = {x}", knob.param);
            }
        }
        for (k, ok) in [(0, true), (u64::from(u32::MAX), true), (u64::from(u32::MAX) + 1, false)] {
            assert_eq!(parse(&body(json!({"top_k": k})), VOCAB).is_ok(), ok, "top_k = {k}");
        }
    }
}
