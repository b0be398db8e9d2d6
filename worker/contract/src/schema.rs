//! Schema touches for Kubernetes: integer formats it knows (`int32`, `int64`)
//! instead of schemars' `uint32`/`uint64`, which it ignores and warns about.

use schemars::Schema;
use serde_json::json;

/// A non-negative count held in a `u64`.
pub(crate) fn count(schema: &mut Schema) {
    integer(schema, 0, i64::MAX as u64);
}

/// An integer in `min..=max`, stated as `int64` with explicit bounds.
pub(crate) fn integer(schema: &mut Schema, min: i64, max: u64) {
    schema.insert("format".into(), json!("int64"));
    schema.insert("minimum".into(), json!(min));
    schema.insert("maximum".into(), json!(max));
}
