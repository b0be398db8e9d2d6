//! Endpoint choice: fewest requests in flight, skipping endpoints that just failed,
//! with optional prompt-prefix affinity under a load bound.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::table::{Endpoint, Pool};

/// Picks an endpoint not in `exclude`. Endpoints marked down are used only when
/// nothing else is left. With `affinity`, the endpoint the key hashes to wins
/// unless it carries more than `max_imbalance` requests above the least loaded.
pub fn pick(
    pool: &Pool,
    exclude: &[Arc<Endpoint>],
    affinity: Option<u64>,
    max_imbalance: usize,
    now: Instant,
) -> Option<Arc<Endpoint>> {
    let open: Vec<&Arc<Endpoint>> =
        pool.endpoints.iter().filter(|e| !exclude.iter().any(|x| Arc::ptr_eq(x, e))).collect();
    let up: Vec<&Arc<Endpoint>> = open.iter().copied().filter(|e| !e.is_down(now)).collect();
    let candidates = if up.is_empty() { open } else { up };
    if candidates.is_empty() {
        return None;
    }
    // One reading of each count: they change under concurrent requests, and the
    // choice below must find the least it computed here.
    let loads: Vec<usize> = candidates.iter().map(|e| e.in_flight()).collect();
    let least = loads.iter().copied().min().unwrap_or(0);
    if let Some(key) = affinity {
        // Hash over the pool's full endpoint list, so the choice is stable while
        // endpoints come and go elsewhere.
        let preferred = &pool.endpoints[(key % pool.endpoints.len() as u64) as usize];
        if candidates.iter().any(|c| Arc::ptr_eq(c, preferred)) && preferred.in_flight() <= least + max_imbalance {
            return Some(preferred.clone());
        }
    }
    let start = pool.rotation.fetch_add(1, Ordering::Relaxed);
    let n = candidates.len();
    (0..n).map(|i| (start + i) % n).find(|&i| loads[i] == least).map(|i| candidates[i].clone())
}

/// A stable hash of the conversation's opening, for prefix affinity.
pub fn prefix_key(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Messages {
        messages: Vec<serde_json::Value>,
    }
    let parsed: Messages = serde_json::from_slice(body).ok()?;
    let first_two: Vec<String> = parsed.messages.iter().take(2).map(|m| m.to_string()).collect();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    first_two.hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::router::table::{PoolSpec, Routes};

    fn pool(n: usize) -> Arc<Pool> {
        let routes = Routes::default();
        let endpoints = (0..n).map(|i| format!("http://10.0.0.{i}:8080")).collect();
        routes.update(vec![PoolSpec { model: "m".into(), aliases: vec![], endpoints, can_come_up: true }]);
        routes.current().lookup("m").cloned().expect("pool")
    }

    fn now() -> Instant {
        Instant::now()
    }

    /// Counts that change while a choice is made never leave a request without
    /// an endpoint (a re-read count once missed the least it had computed: 503s
    /// under concurrent load on a healthy pool).
    #[test]
    fn an_endpoint_is_always_chosen_while_counts_change() {
        let p = pool(2);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn: Vec<_> = (0..3)
            .map(|i| {
                let (p, stop) = (p.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _guard = p.endpoints[i % 2].start();
                    }
                })
            })
            .collect();
        let misses = (0..200_000).filter(|_| pick(&p, &[], None, 0, now()).is_none()).count();
        stop.store(true, Ordering::Relaxed);
        for t in churn {
            t.join().expect("churn thread");
        }
        assert_eq!(misses, 0);
    }

    #[test]
    fn least_in_flight_wins() {
        let p = pool(3);
        let _a = p.endpoints[0].start();
        let _b = p.endpoints[0].start();
        let _c = p.endpoints[1].start();
        for _ in 0..5 {
            assert_eq!(pick(&p, &[], None, 0, now()).map(|e| e.url.clone()), Some(p.endpoints[2].url.clone()));
        }
    }

    #[test]
    fn ties_rotate() {
        let p = pool(3);
        let picks: std::collections::HashSet<String> =
            (0..6).filter_map(|_| pick(&p, &[], None, 0, now())).map(|e| e.url.clone()).collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn excluded_and_failed_endpoints_are_avoided() {
        let p = pool(3);
        p.endpoints[0].mark_down(Duration::from_secs(30));
        let excluded = vec![p.endpoints[1].clone()];
        for _ in 0..4 {
            assert_eq!(pick(&p, &excluded, None, 0, now()).map(|e| e.url.clone()), Some(p.endpoints[2].url.clone()));
        }
        // When only a failed endpoint is left it is still tried.
        let all_but_0 = vec![p.endpoints[1].clone(), p.endpoints[2].clone()];
        assert_eq!(pick(&p, &all_but_0, None, 0, now()).map(|e| e.url.clone()), Some(p.endpoints[0].url.clone()));
        let everything = p.endpoints.clone();
        assert!(pick(&p, &everything, None, 0, now()).is_none());
        assert!(pick(&pool(0), &[], None, 0, now()).is_none());
    }

    #[test]
    fn affinity_is_sticky_within_the_load_bound() {
        let p = pool(4);
        let key = 6; // 6 % 4 = endpoint 2
        let chosen = pick(&p, &[], Some(key), 2, now()).expect("endpoint");
        assert_eq!(chosen.url, p.endpoints[2].url);
        let _g1 = p.endpoints[2].start();
        let _g2 = p.endpoints[2].start();
        assert_eq!(pick(&p, &[], Some(key), 2, now()).map(|e| e.url.clone()), Some(p.endpoints[2].url.clone()));
        let _g3 = p.endpoints[2].start();
        let other = pick(&p, &[], Some(key), 2, now()).expect("endpoint");
        assert_ne!(other.url, p.endpoints[2].url, "affinity must yield past the bound");
    }

    #[test]
    fn prefix_key_depends_on_the_opening_only() {
        let a = br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"q"}]}"#;
        let b = br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"q"},{"role":"assistant","content":"x"}]}"#;
        let c = br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"other"}]}"#;
        assert_eq!(prefix_key(a), prefix_key(b));
        assert_ne!(prefix_key(a), prefix_key(c));
        assert_eq!(prefix_key(b"not json"), None);
    }
}
