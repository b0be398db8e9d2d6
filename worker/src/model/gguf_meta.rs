//! Typed access to GGUF metadata values.

use candle_core::quantized::gguf_file::{Content, Value};

use super::LoadError;

/// Reads metadata keys of a GGUF file with clear errors for missing or mistyped keys.
pub struct Metadata<'a> {
    content: &'a Content,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a Content) -> Self {
        Self { content }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Option<&'a str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn require_string(&self, key: &str) -> Result<&'a str, LoadError> {
        self.string(key).ok_or_else(|| missing(key, "a string"))
    }

    /// Any integer type, as GGUF writers disagree on widths.
    pub fn uint(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(value_as_u64)
    }

    pub fn require_uint(&self, key: &str) -> Result<u64, LoadError> {
        self.uint(key).ok_or_else(|| missing(key, "an integer"))
    }

    /// Any float type (or an integer written where a float was meant).
    pub fn float(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(x) => Some(f64::from(*x)),
            Value::F64(x) => Some(*x),
            other => value_as_u64(other).map(|x| x as f64),
        }
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>, LoadError> {
        let values = match self.get(key) {
            Some(Value::Array(values)) => values,
            _ => return Err(missing(key, "an array of strings")),
        };
        values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(missing(key, "an array of strings")),
            })
            .collect()
    }

    /// An array of floats (any float or integer type).
    pub fn float_array(&self, key: &str) -> Option<Vec<f64>> {
        match self.get(key) {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Some(f64::from(*x)),
                    Value::F64(x) => Some(*x),
                    other => value_as_i64(other).map(|x| x as f64),
                })
                .collect(),
            _ => None,
        }
    }

    pub fn int_array(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key) {
            Some(Value::Array(values)) => values.iter().map(value_as_i64).collect(),
            _ => None,
        }
    }
}

fn missing(key: &str, what: &str) -> LoadError {
    LoadError::Format(format!("GGUF metadata key `{key}` is missing or is not {what}"))
}

fn value_as_u64(v: &Value) -> Option<u64> {
    value_as_i64(v).and_then(|i| u64::try_from(i).ok())
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}
