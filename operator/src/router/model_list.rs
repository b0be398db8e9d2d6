//! `GET …/models`: the union of the models of the pools whose workers accept the
//! caller's key (with tenants on: of the pools the caller's tenant may call). Pools are asked in parallel, each under a time limit, and each
//! answer is reused for a few seconds.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::balancer;
use super::errors::RouterError;
use super::proxy::RouterState;
use super::table::Pool;

/// How long a pool's answer to "which models does this key see" is reused.
const MODEL_LIST_TTL: Duration = Duration::from_secs(5);

/// What a pool said when asked for its models with the caller's key.
#[derive(Debug, Clone)]
enum PoolAnswer {
    Models(Vec<Value>),
    Rejected,
    Unavailable,
}

/// Recent answers by pool and (a hash of) the caller's Authorization header.
#[derive(Debug, Default)]
pub struct ModelListCache(Mutex<HashMap<(String, u64), (Instant, PoolAnswer)>>);

impl ModelListCache {
    fn get(&self, key: &(String, u64)) -> Option<PoolAnswer> {
        let cache = self.0.lock().ok()?;
        cache.get(key).filter(|(at, _)| at.elapsed() < MODEL_LIST_TTL).map(|(_, answer)| answer.clone())
    }

    fn put(&self, key: (String, u64), answer: PoolAnswer) {
        if let Ok(mut cache) = self.0.lock() {
            cache.retain(|_, (at, _)| at.elapsed() < MODEL_LIST_TTL);
            cache.insert(key, (Instant::now(), answer));
        }
    }
}

pub async fn models(State(state): State<RouterState>, headers: HeaderMap) -> Response {
    if !state.is_synced() {
        return RouterError::not_ready().into_response();
    }
    // With tenants on, the key is the router's to check, and only the pools
    // the tenant may call are listed.
    let tenant = match state.authenticate(&headers) {
        Ok(tenant) => tenant,
        Err(e) => return e.into_response(),
    };
    let authorization = state.upstream_authorization(&headers);
    let key = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        authorization.as_ref().map(|v| v.as_bytes().to_vec()).hash(&mut h);
        h.finish()
    };
    let table = state.routes().current();
    let answers = futures::future::join_all(
        table
            .pools()
            .iter()
            .filter(|pool| tenant.as_ref().is_none_or(|t| t.may_call(pool.names())))
            .map(|pool| pool_models(&state, pool, authorization.as_ref(), key)),
    )
    .await;
    let rejected = answers.iter().any(|a| matches!(a, PoolAnswer::Rejected));
    let mut data = Vec::new();
    for answer in answers {
        if let PoolAnswer::Models(models) = answer {
            data.extend(models);
        }
    }
    if data.is_empty() && rejected {
        return RouterError::invalid_key().into_response();
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn pool_models(
    state: &RouterState,
    pool: &Arc<Pool>,
    authorization: Option<&HeaderValue>,
    key: u64,
) -> PoolAnswer {
    let cache_key = (pool.model.clone(), key);
    if let Some(answer) = state.model_lists().get(&cache_key) {
        return answer;
    }
    let Some((endpoint, _)) = balancer::pick(pool, &[], None, Instant::now()) else { return PoolAnswer::Unavailable };
    // The limit covers the whole exchange, body included: a worker that hangs
    // leaves its pool out of this list instead of holding the list back.
    let mut request =
        state.client().get(format!("{}/v1/models", endpoint.url)).timeout(state.settings().model_list_timeout);
    if let Some(auth) = authorization {
        request = request.header(header::AUTHORIZATION, auth.clone());
    }
    let answer = match request.send().await {
        Ok(r) if r.status() == StatusCode::UNAUTHORIZED || r.status() == StatusCode::FORBIDDEN => PoolAnswer::Rejected,
        Ok(r) if r.status().is_success() => match r.bytes().await.map(|b| serde_json::from_slice::<Value>(&b)) {
            Ok(Ok(list)) => PoolAnswer::Models(list.get("data").and_then(Value::as_array).cloned().unwrap_or_default()),
            Ok(Err(_)) => PoolAnswer::Unavailable,
            Err(e) => {
                tracing::warn!(endpoint = %endpoint.url, error = %e, "model list not read");
                PoolAnswer::Unavailable
            }
        },
        Ok(_) => PoolAnswer::Unavailable,
        Err(e) => {
            if e.is_connect() {
                endpoint.mark_down(state.settings().cooldown);
            } else {
                tracing::warn!(endpoint = %endpoint.url, error = %e, "model list not read");
            }
            PoolAnswer::Unavailable
        }
    };
    if !matches!(answer, PoolAnswer::Unavailable) {
        state.model_lists().put(cache_key, answer.clone());
    }
    answer
}
