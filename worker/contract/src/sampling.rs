//! Sampling knobs: their ranges (checked by the worker for every request and for
//! its `--sampling-defaults`, and stated in the CRD schema) and the per-model
//! defaults a ModelDeployment may set.

use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An interval of numbers, closed, or open at its lower end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub min: f64,
    pub max: f64,
    /// The lower end itself is outside (`(min, max]`).
    pub min_exclusive: bool,
}

impl Interval {
    /// `[min, max]`
    pub const fn closed(min: f64, max: f64) -> Self {
        Self { min, max, min_exclusive: false }
    }

    /// `(min, max]`
    pub const fn above(min: f64, max: f64) -> Self {
        Self { min, max, min_exclusive: true }
    }

    pub fn contains(&self, x: f64) -> bool {
        let low_ok = if self.min_exclusive { x > self.min } else { x >= self.min };
        x.is_finite() && low_ok && x <= self.max
    }

    /// "at least 0 and at most 2", "greater than 0 and at most 1".
    pub fn describe(&self) -> String {
        let lower = if self.min_exclusive { "greater than" } else { "at least" };
        format!("{lower} {} and at most {}", self.min, self.max)
    }

    /// Values on, just inside and just outside both ends: the table the CRD
    /// schema and the worker are both tested against.
    pub fn probes(&self) -> [f64; 6] {
        let step = 1e-3;
        [self.min - step, self.min, self.min + step, self.max - step, self.max, self.max + step]
    }
}

/// Sampling temperature; 0 is greedy.
pub const TEMPERATURE: Interval = Interval::closed(0.0, 2.0);
/// Nucleus mass: above 0, since an empty nucleus samples nothing.
pub const TOP_P: Interval = Interval::above(0.0, 1.0);
pub const MIN_P: Interval = Interval::closed(0.0, 1.0);
pub const PRESENCE_PENALTY: Interval = Interval::closed(-2.0, 2.0);
pub const FREQUENCY_PENALTY: Interval = Interval::closed(-2.0, 2.0);
/// Multiplicative: 0 would divide by zero, 1 disables it.
pub const REPETITION_PENALTY: Interval = Interval::above(0.0, 2.0);
/// Largest `top_k` (the field is a `u32`); 0 disables it.
pub const TOP_K_MAX: u32 = u32::MAX;

/// A fractional knob: its request parameter name, its CRD field name and range.
#[derive(Debug, Clone, Copy)]
pub struct Knob {
    pub param: &'static str,
    pub field: &'static str,
    pub range: Interval,
}

/// Every fractional knob, in the order the API reference lists them.
pub const KNOBS: [Knob; 6] = [
    Knob { param: "temperature", field: "temperature", range: TEMPERATURE },
    Knob { param: "top_p", field: "topP", range: TOP_P },
    Knob { param: "min_p", field: "minP", range: MIN_P },
    Knob { param: "presence_penalty", field: "presencePenalty", range: PRESENCE_PENALTY },
    Knob { param: "frequency_penalty", field: "frequencyPenalty", range: FREQUENCY_PENALTY },
    Knob { param: "repetition_penalty", field: "repetitionPenalty", range: REPETITION_PENALTY },
];

/// A value outside its knob's range.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfRange {
    /// The request parameter name (`top_p`).
    pub param: &'static str,
    pub message: String,
}

impl std::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OutOfRange {}

/// Per-model sampling defaults; a request's own values win. Field names are
/// camelCase like the rest of the API; the request parameters' snake_case
/// spelling (`top_p`) is accepted too.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = knob_schemas)]
pub struct SamplingDefaults {
    /// Sampling temperature, 0 (greedy) to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, above 0 and at most 1.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "top_p")]
    pub top_p: Option<f64>,
    /// Sample from the k most likely tokens; 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "top_k")]
    pub top_k: Option<u32>,
    /// Drop tokens less likely than this fraction of the most likely one, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "min_p")]
    pub min_p: Option<f64>,
    /// Penalty on tokens already present, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "presence_penalty")]
    pub presence_penalty: Option<f64>,
    /// Penalty growing with each repetition, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "frequency_penalty")]
    pub frequency_penalty: Option<f64>,
    /// Multiplicative penalty on every token seen, above 0 and at most 2; 1 disables.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "repetition_penalty")]
    pub repetition_penalty: Option<f64>,
}

impl SamplingDefaults {
    /// The fractional knobs with their values, in [`KNOBS`] order.
    pub fn values(&self) -> [(Knob, Option<f64>); 6] {
        [
            (KNOBS[0], self.temperature),
            (KNOBS[1], self.top_p),
            (KNOBS[2], self.min_p),
            (KNOBS[3], self.presence_penalty),
            (KNOBS[4], self.frequency_penalty),
            (KNOBS[5], self.repetition_penalty),
        ]
    }

    /// Checks every value against its knob's range.
    pub fn validate(&self) -> Result<(), OutOfRange> {
        for (knob, value) in self.values() {
            if let Some(x) = value.filter(|x| !knob.range.contains(*x)) {
                return Err(OutOfRange {
                    param: knob.param,
                    message: format!("{} must be {}, got {x}", knob.param, knob.range.describe()),
                });
            }
        }
        Ok(())
    }
}

/// Every knob whose CRD field name differs from its request parameter name.
fn spellings() -> Vec<(&'static str, &'static str)> {
    let mut spellings = vec![("topK", "top_k")];
    spellings.extend(KNOBS.iter().filter(|k| k.param != k.field).map(|k| (k.field, k.param)));
    spellings
}

/// States each knob's range in the schema (with `exclusiveMinimum` where the
/// lower end is open), bounds `topK` by its type, and lists the snake_case
/// spellings as properties too, so the API server keeps them.
fn knob_schemas(schema: &mut Schema) {
    let Some(Value::Object(props)) = schema.get_mut("properties") else { return };
    for knob in KNOBS {
        if let Some(Value::Object(p)) = props.get_mut(knob.field) {
            p.insert("minimum".into(), json!(knob.range.min));
            p.insert("maximum".into(), json!(knob.range.max));
            if knob.range.min_exclusive {
                p.insert("exclusiveMinimum".into(), json!(true));
            }
        }
    }
    if let Some(top_k) = props.get_mut("topK") {
        if let Ok(s) = <&mut Schema>::try_from(top_k) {
            crate::schema::integer(s, 0, u64::from(TOP_K_MAX));
        }
    }
    for (field, legacy) in spellings() {
        let Some(mut old) = props.get(field).cloned() else { continue };
        old["description"] = json!(format!("Older spelling of {field}, still accepted."));
        props.insert(legacy.to_string(), old);
    }
}

/// Schema constraints that only one spelling of each knob is set, for the
/// schema of the field holding [`SamplingDefaults`] (constraints on the struct
/// itself are lost when the CRD schema inlines an optional field). Structural
/// `not`/`required` rather than CEL: CEL escapes `_` in field names differently
/// across implementations.
pub fn one_spelling_each(schema: &mut Schema) {
    let pairs: Vec<Value> =
        spellings().into_iter().map(|(field, legacy)| json!({"not": {"required": [field, legacy]}})).collect();
    schema.insert("allOf".into(), Value::Array(pairs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_state_their_ends() {
        assert!(TOP_P.contains(1.0) && !TOP_P.contains(0.0) && TOP_P.contains(1e-9));
        assert!(TEMPERATURE.contains(0.0) && TEMPERATURE.contains(2.0) && !TEMPERATURE.contains(2.001));
        assert!(!TEMPERATURE.contains(f64::NAN));
        assert_eq!(TOP_P.describe(), "greater than 0 and at most 1");
        assert_eq!(MIN_P.describe(), "at least 0 and at most 1");
    }

    #[test]
    fn both_spellings_deserialize_and_camel_case_is_written() {
        let old: SamplingDefaults = serde_json::from_str(r#"{"top_p": 0.8, "top_k": 40}"#).expect("old spelling");
        let new: SamplingDefaults = serde_json::from_str(r#"{"topP": 0.8, "topK": 40}"#).expect("new spelling");
        assert_eq!(old, new);
        assert_eq!(serde_json::to_string(&new).expect("json"), r#"{"topP":0.8,"topK":40}"#);
        assert!(serde_json::from_str::<SamplingDefaults>(r#"{"topP": 0.8, "top_p": 0.9}"#).is_err());
        assert!(serde_json::from_str::<SamplingDefaults>(r#"{"top_q": 0.8}"#).is_err());
    }

    #[test]
    fn validation_names_the_knob() {
        let zero = SamplingDefaults { top_p: Some(0.0), ..SamplingDefaults::default() };
        let err = zero.validate().expect_err("top_p 0 is refused");
        assert_eq!(err.param, "top_p");
        assert!(err.message.contains("greater than 0"), "{}", err.message);
        let ok = SamplingDefaults { repetition_penalty: Some(2.0), ..SamplingDefaults::default() };
        assert_eq!(ok.validate(), Ok(()));
    }
}
