//! Limits kept in this process: right for one router replica (or as the
//! reference the Redis store is tested against).

use std::collections::HashMap;
use std::sync::Mutex;

use super::bucket::{Bucket, Standing};
use super::{Admission, Refusal, Which};
use crate::tenants::Limits;

#[derive(Debug, Default)]
struct TenantState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    running: u32,
}

#[derive(Debug, Default)]
pub struct LocalStore {
    tenants: Mutex<HashMap<String, TenantState>>,
}

impl LocalStore {
    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut TenantState) -> T) -> T {
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(tenants.entry(tenant.to_string()).or_default())
    }

    /// Admits one request at `now` (seconds) or says which limit refuses it.
    pub fn admit(&self, tenant: &str, limits: &Limits, now: f64) -> Admission {
        self.with(tenant, |state| {
            let requests = limits.requests_per_minute.map(|limit| {
                let limit = u64::from(limit);
                (state.requests.unwrap_or(Bucket::full(limit, now)).refilled(limit, now), limit)
            });
            let tokens = limits
                .tokens_per_minute
                .map(|limit| (state.tokens.unwrap_or(Bucket::full(limit, now)).refilled(limit, now), limit));
            let refusal = if limits.concurrent_requests.is_some_and(|limit| state.running >= limit) {
                Some(Refusal { which: Which::Concurrency, retry_after: std::time::Duration::from_secs(1) })
            } else if let Some((bucket, limit)) = tokens.filter(|(b, _)| b.level < 1.0) {
                Some(Refusal { which: Which::Tokens, retry_after: bucket.time_to(1.0, limit) })
            } else if let Some((bucket, limit)) = requests.filter(|(b, _)| b.level < 1.0) {
                Some(Refusal { which: Which::Requests, retry_after: bucket.time_to(1.0, limit) })
            } else {
                None
            };
            let requests = requests.map(|(mut bucket, limit)| {
                if refusal.is_none() {
                    bucket.level -= 1.0;
                }
                state.requests = Some(bucket);
                Standing::of(bucket, limit)
            });
            let tokens = tokens.map(|(bucket, limit)| {
                state.tokens = Some(bucket);
                Standing::of(bucket, limit)
            });
            if refusal.is_none() && limits.concurrent_requests.is_some() {
                state.running += 1;
            }
            Admission { requests, tokens, refusal }
        })
    }

    /// Takes `used` tokens from the tenant's budget (it may go below zero: the
    /// next requests wait until it has refilled past it).
    pub fn charge(&self, tenant: &str, limits: &Limits, used: u64, now: f64) {
        let Some(limit) = limits.tokens_per_minute else { return };
        self.with(tenant, |state| {
            let mut bucket = state.tokens.unwrap_or(Bucket::full(limit, now)).refilled(limit, now);
            bucket.level -= used as f64;
            state.tokens = Some(bucket);
        });
    }

    /// A request admitted earlier has ended.
    pub fn release(&self, tenant: &str) {
        self.with(tenant, |state| state.running = state.running.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_admits_a_burst_then_one_per_refill() {
        let store = LocalStore::default();
        let limits = Limits { requests_per_minute: Some(3), ..Default::default() };
        for remaining in [2, 1, 0] {
            let a = store.admit("t", &limits, 0.0);
            assert!(a.refusal.is_none());
            assert_eq!(a.requests.map(|s| s.remaining), Some(remaining));
        }
        let refused = store.admit("t", &limits, 1.0);
        let refusal = refused.refusal.expect("past the limit");
        assert_eq!(refusal.which, Which::Requests);
        assert!((refusal.retry_after.as_secs_f64() - 19.0).abs() < 1e-6, "one request refills in 20 s: {refusal:?}");
        assert!(store.admit("t", &limits, 20.0).refusal.is_none());
        assert!(store.admit("other", &limits, 20.0).refusal.is_none(), "tenants are apart");
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_block_until_refilled() {
        let store = LocalStore::default();
        let limits = Limits { tokens_per_minute: Some(600), ..Default::default() };
        assert!(store.admit("t", &limits, 0.0).refusal.is_none());
        store.charge("t", &limits, 900, 0.0);
        let refused = store.admit("t", &limits, 0.0);
        assert_eq!(refused.tokens.map(|s| s.remaining), Some(0));
        let refusal = refused.refusal.expect("in debt");
        assert_eq!(refusal.which, Which::Tokens);
        // -300 refills at 10 per second: past 1 after 30.1 s.
        assert!((refusal.retry_after.as_secs_f64() - 30.1).abs() < 1e-6, "{refusal:?}");
        assert!(store.admit("t", &limits, 31.0).refusal.is_none());
    }

    #[test]
    fn concurrent_requests_count_until_released() {
        let store = LocalStore::default();
        let limits = Limits { concurrent_requests: Some(2), ..Default::default() };
        assert!(store.admit("t", &limits, 0.0).refusal.is_none());
        assert!(store.admit("t", &limits, 0.0).refusal.is_none());
        assert_eq!(store.admit("t", &limits, 0.0).refusal.map(|r| r.which), Some(Which::Concurrency));
        store.release("t");
        assert!(store.admit("t", &limits, 0.0).refusal.is_none());
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let store = LocalStore::default();
        let limits = Limits { requests_per_minute: Some(1), concurrent_requests: Some(1), ..Default::default() };
        assert!(store.admit("t", &limits, 0.0).refusal.is_none());
        assert!(store.admit("t", &limits, 0.0).refusal.is_some());
        store.release("t");
        // The refused request neither ran nor used a request of the minute.
        let a = store.admit("t", &limits, 60.0);
        assert!(a.refusal.is_none(), "{a:?}");
    }
}
