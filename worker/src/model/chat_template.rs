//! The model's own Jinja chat template, rendered the way Hugging Face renders it.

use minijinja::value::{Serde, Value};
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;

use kandle_contract::http::TemplateOrigin;

use super::LoadError;
use crate::engine::tool_calls::ToolFormat;

const TEMPLATE_NAME: &str = "chat";

/// The template to render: the flag's, else the model's own, else ChatML
/// (said in the log: a base model without a template may answer poorly in it).
pub fn choose(flag: Option<&str>, model: Option<String>) -> (String, TemplateOrigin) {
    match (flag, model) {
        (Some(flag), _) => (flag.to_string(), TemplateOrigin::Flag),
        (None, Some(own)) => (own, TemplateOrigin::Model),
        (None, None) => {
            tracing::warn!(
                "the model has no chat template: rendering chats in ChatML, the default (set --chat-template for another)"
            );
            (CHATML.to_string(), TemplateOrigin::Default)
        }
    }
}

/// The end of a ChatML turn.
pub const CHATML_END: &str = "<|im_end|>";

/// ChatML, for models that ship no template of their own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// What a template can do, read from its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateFeatures {
    /// The template renders a `tools` list.
    pub tools: bool,
    /// How the template's model writes tool calls.
    pub tool_format: ToolFormat,
    /// The template knows `<think>` blocks (a reasoning model).
    pub thinking: bool,
}

/// Inputs of one rendering, beyond the messages.
#[derive(Debug, Default, Clone)]
pub struct RenderOptions<'a> {
    pub tools: Option<&'a [Json]>,
    pub enable_thinking: Option<bool>,
    pub reasoning_effort: Option<&'a str>,
    /// More variables (vLLM's `chat_template_kwargs`); the ones above win.
    pub extra: Option<&'a serde_json::Map<String, Json>>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    features: TemplateFeatures,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("features", &self.features).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, LoadError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| LoadError::Format(format!("chat template syntax: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| LoadError::Format(format!("chat template does not parse: {e}")))?;
        let features = TemplateFeatures {
            tools: source.contains("tools"),
            tool_format: ToolFormat::of_template(source),
            thinking: source.contains("<think>") || source.contains("enable_thinking"),
        };
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), features })
    }

    pub fn features(&self) -> TemplateFeatures {
        self.features
    }

    /// Renders `messages` (OpenAI-shaped, already normalised) into the prompt text,
    /// ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Json], options: &RenderOptions<'_>) -> Result<String, String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| e.to_string())?;
        let ctx = context! {
            messages => Serde(messages),
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => options.tools.map(Serde),
            enable_thinking => options.enable_thinking,
            reasoning_effort => options.reasoning_effort,
            ..options.extra.map(|extra| Value::from(Serde(extra))).unwrap_or_default()
        };
        template.render(ctx).map_err(|e| describe(&e))
    }
}

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)` as Llama 3 templates call it; dates are rendered in UTC.
fn strftime_now(format: String) -> String {
    let days =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0);
    let (year, month, day) = civil_from_days(days as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%B", month_name)
        .replace("%b", &month_name[..3])
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn describe(e: &JinjaError) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("template error").to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The template shipped in SmolLM2-135M-Instruct's GGUF file.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").expect("template parses")
    }

    #[test]
    fn smollm2_adds_default_system_prompt() {
        let out =
            smollm2().render(&[json!({"role": "user", "content": "Hi"})], &RenderOptions::default()).expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_keeps_given_system_prompt_and_turns() {
        let messages = [
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "1+1?"}),
            json!({"role": "assistant", "content": "2"}),
            json!({"role": "user", "content": "2+2?"}),
        ];
        let out = smollm2().render(&messages, &RenderOptions::default()).expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n\
             <|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!smollm2().features().tools);
        assert!(!smollm2().features().thinking);
    }

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with a user') }}{% endif %}ok",
            "",
            "",
        )
        .expect("parses");
        let err =
            t.render(&[json!({"role": "assistant", "content": "x"})], &RenderOptions::default()).expect_err("raises");
        assert_eq!(err, "Conversation must start with a user");
    }

    #[test]
    fn python_string_methods_and_tools_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'].strip() }}{% endfor %}{% if tools %}|{{ tools[0]['function']['name'] }}|{{ tools | tojson }}{% endif %}{% if enable_thinking is false %}|nothink{% endif %}",
            "",
            "",
        )
        .expect("parses");
        let tools =
            [json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}})];
        let out = t
            .render(
                &[json!({"role": "user", "content": "  hi  "})],
                &RenderOptions { tools: Some(&tools), enable_thinking: Some(false), ..Default::default() },
            )
            .expect("renders");
        assert_eq!(
            out,
            // Python's json.dumps spacing, as Hugging Face renders `tojson`.
            r#"hi|get_weather|[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]|nothink"#
        );
        assert!(t.features().tools);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }

    #[test]
    fn broken_template_is_a_load_error() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn the_flag_wins_then_the_models_own_then_chatml() {
        assert_eq!(choose(Some("flag"), Some("own".into())), ("flag".to_string(), TemplateOrigin::Flag));
        assert_eq!(choose(None, Some("own".into())), ("own".to_string(), TemplateOrigin::Model));
        assert_eq!(choose(None, None), (CHATML.to_string(), TemplateOrigin::Default));
        // A newer worker's value reads as unknown, not as a broken /ready.
        let newer: TemplateOrigin = serde_json::from_value(serde_json::json!("file")).expect("reads");
        assert_eq!(newer, TemplateOrigin::Unknown);
        let ready = serde_json::to_value(TemplateOrigin::Default).expect("serializes");
        assert_eq!(ready, "default");
    }
}
