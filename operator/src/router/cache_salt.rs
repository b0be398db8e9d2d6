//! A tenant's prefix-cache salt: with tenants, every request reaches the
//! worker with vLLM's `cache_salt` set from its tenant, so KV blocks a prompt
//! computed are reused only by requests of the same tenant and one tenant
//! cannot learn from cache timing what another sent. A salt the client gave is
//! kept inside the tenant's (`tenant:<name>:<salt>`), so it can narrow the
//! sharing further but never reach another tenant's blocks.

use super::json_body::{members, with_last_member};

/// The request body with `cache_salt` set for `tenant`, written as the last
/// member so that it is the one the worker reads. `None` leaves the body as it
/// is: not an object, or a `cache_salt` that is not a string (the worker
/// answers that with a 400).
pub fn salted(json: &[u8], tenant: &str) -> Option<Vec<u8>> {
    let members = members(json)?;
    let salt = match members.get("cache_salt").map(|raw| raw.get()) {
        None | Some("null") => format!("tenant:{tenant}"),
        Some(raw) => {
            let given: String = serde_json::from_str(raw).ok()?;
            format!("tenant:{tenant}:{given}")
        }
    };
    with_last_member(json, &members, "cache_salt", &serde_json::Value::String(salt).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salt_of(body: &[u8]) -> serde_json::Value {
        let value: serde_json::Value = serde_json::from_slice(body).expect("still JSON");
        value["cache_salt"].clone()
    }

    #[test]
    fn every_spelling_ends_with_the_tenants_salt() {
        let body = salted(br#"{"model":"m"}"#, "team-a").expect("object");
        assert_eq!(body, br#"{"model":"m","cache_salt":"tenant:team-a"}"#);
        assert_eq!(salt_of(&salted(br#"{"cache_salt":null,"model":"m"}"#, "a").expect("null")), "tenant:a");
        // The client's salt narrows within the tenant; another tenant's name in it reaches nothing.
        let body = salted(br#"{"model":"m","cache_salt":"tenant:b"}"#, "a").expect("string");
        assert_eq!(salt_of(&body), "tenant:a:tenant:b");
        // An escaped name is the same member to the worker (the last one wins there).
        let body = salted(br#"{"model":"m","cache\u005fsalt":"x"}"#, "a").expect("escaped");
        assert_eq!(salt_of(&body), "tenant:a:x");
        assert_eq!(salted(b"{}", "a").expect("empty"), br#"{"cache_salt":"tenant:a"}"#);
        // Not ours to judge: the worker's 400 names it.
        assert_eq!(salted(br#"{"cache_salt":7}"#, "a"), None);
        assert_eq!(salted(b"[1]", "a"), None);
    }
}
