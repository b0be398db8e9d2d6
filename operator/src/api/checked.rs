//! Objects read from the API server that may not decode: one bad object must not
//! stop a list or a watch (and with it the controller or the router) for all the
//! others. The failure names the field, so it can be reported on the object.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `K` as stored, or why it could not be decoded.
#[derive(Debug, Clone)]
pub struct Checked<K>(pub Result<K, Undecodable>);

/// An object whose fields do not fit its Rust type (written before the schema
/// bounded them, or by a newer version of the CRD).
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    pub metadata: ObjectMeta,
    /// The field at fault and what is wrong with it, e.g.
    /// `spec.engine.defaults.topK: invalid value: integer 4294967296, expected u32`.
    pub error: String,
    /// The object's `status` as stored, when there is one.
    pub status: Option<Value>,
}

impl<K> Checked<K> {
    pub fn valid(&self) -> Option<&K> {
        self.0.as_ref().ok()
    }
}

impl<'de, K: DeserializeOwned + Resource> Deserialize<'de> for Checked<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match serde_path_to_error::deserialize::<_, K>(&value) {
            Ok(object) => Ok(Self(Ok(object))),
            Err(e) => {
                let metadata = value.get("metadata").cloned().unwrap_or(Value::Null);
                let metadata = ObjectMeta::deserialize(metadata).map_err(D::Error::custom)?;
                let error = format!("{}: {}", e.path(), e.inner());
                Ok(Self(Err(Undecodable { metadata, error, status: value.get("status").cloned() })))
            }
        }
    }
}

impl<K: Resource> Resource for Checked<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match &self.0 {
            Ok(object) => object.meta(),
            Err(bad) => &bad.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            Ok(object) => object.meta_mut(),
            Err(bad) => &mut bad.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::ModelDeployment;

    #[test]
    fn names_the_field_that_does_not_decode() {
        let checked: Checked<ModelDeployment> = serde_json::from_value(json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "bad", "namespace": "ml", "generation": 3},
            "spec": {"source": {"url": "file:///m"}, "auth": {"disabled": true},
                     "engine": {"defaults": {"topK": 4294967296u64}}},
            "status": {"phase": "Ready"},
        }))
        .expect("an undecodable object still decodes as Checked");
        let bad = checked.0.expect_err("undecodable");
        assert_eq!(bad.metadata.name.as_deref(), Some("bad"));
        assert_eq!(bad.metadata.generation, Some(3));
        assert!(bad.error.starts_with("spec.engine.defaults.topK: "), "{}", bad.error);
        assert!(bad.error.contains("4294967296"), "{}", bad.error);
        assert_eq!(bad.status, Some(json!({"phase": "Ready"})));
    }

    #[test]
    fn valid_objects_decode() {
        let checked: Checked<ModelDeployment> = serde_json::from_value(json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "ok", "namespace": "ml"},
            "spec": {"source": {"url": "file:///m"}, "auth": {"disabled": true}},
        }))
        .expect("decodes");
        assert_eq!(checked.valid().map(|md| md.spec.replicas), Some(1));
    }
}
