//! Endpoint choice. Without a prompt prefix to go by: fewest requests in
//! flight, ties rotating. With one (the prompt's block hashes): the endpoint
//! that served the longest run of its leading blocks; among equals (and for a
//! prefix no endpoint served) the least loaded, then the one the first block
//! ranks highest by rendezvous hashing (the same ranking on every router
//! replica); the preferred endpoint only while under a load bound (as in
//! consistent hashing with bounded loads), else the next in that order.
//! Endpoints that just failed are skipped either way.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::prefix_index::PrefixIndex;
use super::table::{Endpoint, Pool};

/// What the prompt's prefix asks of the choice.
pub struct Prefix<'a> {
    pub index: &'a PrefixIndex,
    /// The prompt's chained block hashes (see `super::prefix`).
    pub blocks: &'a [u64],
    /// An endpoint may carry up to this factor times the mean load (counting
    /// the request being placed), rounded up, before the choice passes it by.
    pub load_factor: f64,
}

/// How a prefix-aware choice went, for `kandle_router_prefix_routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to the endpoint that served the longest part of its prefix.
    Hit,
    /// No endpoint served any of its blocks: sent to the least loaded,
    /// ties going where its first block ranks highest.
    Miss,
    /// The preferred endpoint (a hit or the hashed one) was past the load
    /// bound: sent to the next in line.
    Overloaded,
    /// Shorter than one block: sent to the least loaded endpoint.
    Short,
    /// Not a chat request the router can read (the worker's 400 will say
    /// why): sent to the least loaded endpoint.
    Unreadable,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Overloaded => "overloaded",
            Self::Short => "short",
            Self::Unreadable => "unreadable",
        }
    }
}

/// Picks an endpoint not in `exclude`. Endpoints marked down are used only when
/// nothing else is left. The outcome is `None` without a prefix.
pub fn pick(
    pool: &Pool,
    exclude: &[Arc<Endpoint>],
    prefix: Option<&Prefix<'_>>,
    now: Instant,
) -> Option<(Arc<Endpoint>, Option<Outcome>)> {
    let open: Vec<&Arc<Endpoint>> =
        pool.endpoints.iter().filter(|e| !exclude.iter().any(|x| Arc::ptr_eq(x, e))).collect();
    let up: Vec<&Arc<Endpoint>> = open.iter().copied().filter(|e| !e.is_down(now)).collect();
    let candidates = if up.is_empty() { open } else { up };
    if candidates.is_empty() {
        return None;
    }
    // One reading of each count: they change under concurrent requests, and the
    // choice below must find what it computed here.
    let loads: Vec<usize> = candidates.iter().map(|e| e.in_flight()).collect();
    match prefix {
        Some(prefix) if !prefix.blocks.is_empty() => {
            let (chosen, outcome) = by_prefix(prefix, &candidates, &loads);
            Some((candidates[chosen].clone(), Some(outcome)))
        }
        _ => {
            let chosen = least_loaded(pool, &loads);
            Some((candidates[chosen].clone(), prefix.map(|_| Outcome::Short)))
        }
    }
}

/// The least loaded candidate, ties taken in turn.
fn least_loaded(pool: &Pool, loads: &[usize]) -> usize {
    let least = loads.iter().copied().min().unwrap_or(0);
    let start = pool.rotation.fetch_add(1, Ordering::Relaxed);
    let n = loads.len();
    (0..n).map(|i| (start + i) % n).find(|&i| loads[i] == least).unwrap_or(0)
}

fn by_prefix(prefix: &Prefix<'_>, candidates: &[&Arc<Endpoint>], loads: &[usize]) -> (usize, Outcome) {
    let keys: Vec<u64> = candidates.iter().map(|e| e.key).collect();
    let matched = prefix.index.matched(prefix.blocks, &keys);
    let first_block = prefix.blocks[0];
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| {
        (std::cmp::Reverse(matched[i]), loads[i], std::cmp::Reverse(rendezvous(first_block, keys[i])))
    });
    let preferred = order[0];
    let cap = load_cap(loads, prefix.load_factor);
    // Some endpoint is under the cap when the factor is at least 1 (the loads
    // cannot all reach a cap above their mean); the preferred one otherwise.
    let chosen = order.iter().copied().find(|&i| loads[i] < cap).unwrap_or(preferred);
    let outcome = if chosen != preferred {
        Outcome::Overloaded
    } else if matched[chosen] > 0 {
        Outcome::Hit
    } else {
        Outcome::Miss
    };
    (chosen, outcome)
}

/// The load an endpoint must be under to take a request by preference:
/// `factor` times the mean load with the new request counted, rounded up.
/// Some endpoint is always under it when `factor >= 1`.
fn load_cap(loads: &[usize], factor: f64) -> usize {
    let total = loads.iter().sum::<usize>() + 1;
    (factor * total as f64 / loads.len().max(1) as f64).ceil() as usize
}

/// The rendezvous (highest random weight) score of `endpoint` for `key`: each
/// key ranks the endpoints in its own order, so an endpoint that comes or goes
/// moves only the keys it ranks first.
fn rendezvous(key: u64, endpoint: u64) -> u64 {
    // splitmix64's finalizer: a fixed mix of the two.
    let mut z = key ^ endpoint.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::router::table::{InFlight, PoolSpec, Routes};

    fn pool(n: usize) -> Arc<Pool> {
        let routes = Routes::default();
        let endpoints = (0..n).map(|i| format!("http://10.0.0.{i}:8080")).collect();
        routes.update(vec![PoolSpec { model: "m".into(), aliases: vec![], endpoints, can_come_up: true }]);
        routes.current().lookup("m").cloned().expect("pool")
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn url(pool: &Pool, exclude: &[Arc<Endpoint>]) -> Option<String> {
        pick(pool, exclude, None, now()).map(|(e, _)| e.url.clone())
    }

    /// A choice for `blocks`, which the chosen endpoint then serves.
    fn by_blocks(pool: &Pool, index: &PrefixIndex, blocks: &[u64]) -> (usize, Outcome) {
        let prefix = Prefix { index, blocks, load_factor: 1.25 };
        let (chosen, outcome) = pick(pool, &[], Some(&prefix), now()).expect("an endpoint");
        index.record(blocks, chosen.key);
        let at = pool.endpoints.iter().position(|e| Arc::ptr_eq(e, &chosen)).expect("a pool endpoint");
        (at, outcome.expect("an outcome"))
    }

    fn load(pool: &Pool, endpoint: usize, requests: usize) -> Vec<InFlight> {
        (0..requests).map(|_| pool.endpoints[endpoint].start()).collect()
    }

    /// Counts that change while a choice is made never leave a request without
    /// an endpoint (a re-read count once missed the least it had computed: 503s
    /// under concurrent load on a healthy pool), with or without a prefix.
    #[test]
    fn an_endpoint_is_always_chosen_while_counts_change() {
        let p = pool(2);
        let index = PrefixIndex::default();
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
        let misses = (0..100_000).filter(|_| pick(&p, &[], None, now()).is_none()).count();
        let prefix = Prefix { index: &index, blocks: &[1, 2, 3], load_factor: 1.0 };
        let prefix_misses = (0..100_000).filter(|_| pick(&p, &[], Some(&prefix), now()).is_none()).count();
        stop.store(true, Ordering::Relaxed);
        for t in churn {
            t.join().expect("churn thread");
        }
        assert_eq!((misses, prefix_misses), (0, 0));
    }

    #[test]
    fn least_in_flight_wins() {
        let p = pool(3);
        let _a = load(&p, 0, 2);
        let _b = load(&p, 1, 1);
        for _ in 0..5 {
            assert_eq!(url(&p, &[]), Some(p.endpoints[2].url.clone()));
        }
    }

    #[test]
    fn ties_rotate() {
        let p = pool(3);
        let picks: std::collections::HashSet<String> = (0..6).filter_map(|_| url(&p, &[])).collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn excluded_and_failed_endpoints_are_avoided() {
        let p = pool(3);
        p.endpoints[0].mark_down(Duration::from_secs(30));
        let excluded = vec![p.endpoints[1].clone()];
        for _ in 0..4 {
            assert_eq!(url(&p, &excluded), Some(p.endpoints[2].url.clone()));
        }
        // When only a failed endpoint is left it is still tried.
        let all_but_0 = vec![p.endpoints[1].clone(), p.endpoints[2].clone()];
        assert_eq!(url(&p, &all_but_0), Some(p.endpoints[0].url.clone()));
        let everything = p.endpoints.clone();
        assert!(url(&p, &everything).is_none());
        assert!(url(&pool(0), &[]).is_none());
        // A prefix does not bring back an excluded endpoint.
        let index = PrefixIndex::default();
        let (first, _) = by_blocks(&p, &index, &[5, 6]);
        let excluded = vec![p.endpoints[first].clone()];
        let prefix = Prefix { index: &index, blocks: &[5, 6], load_factor: 1.25 };
        let (again, _) = pick(&p, &excluded, Some(&prefix), now()).expect("an endpoint");
        assert!(!Arc::ptr_eq(&again, &p.endpoints[first]));
    }

    #[test]
    fn a_prefix_goes_back_to_the_endpoint_that_served_it() {
        let p = pool(4);
        let index = PrefixIndex::default();
        let (first, outcome) = by_blocks(&p, &index, &[1, 2]);
        assert_eq!(outcome, Outcome::Miss);
        // The same opening, continued: where it went before, whatever the
        // other endpoints' hashes say about the new blocks.
        for tail in 10..30 {
            assert_eq!(by_blocks(&p, &index, &[1, 2, tail]), (first, Outcome::Hit));
        }
        // The longest match wins: a prefix spilled to another endpoint and
        // continued there goes back there.
        let _busy = load(&p, first, 3);
        let (second, outcome) = by_blocks(&p, &index, &[1, 2, 3, 4]);
        assert_eq!(outcome, Outcome::Overloaded);
        assert_ne!(second, first);
        drop(_busy);
        assert_eq!(by_blocks(&p, &index, &[1, 2, 3, 4, 5]), (second, Outcome::Hit));
        assert_eq!(by_blocks(&p, &index, &[1, 2, 99]).1, Outcome::Hit);
    }

    #[test]
    fn the_load_bound_passes_a_busy_endpoint_by() {
        let p = pool(2);
        let index = PrefixIndex::default();
        let (home, _) = by_blocks(&p, &index, &[7]);
        // Mean load with the new request counted: (1 + 1) / 2, cap ceil(1.25) = 2.
        let busy = load(&p, home, 1);
        assert_eq!(by_blocks(&p, &index, &[7, 8]), (home, Outcome::Hit));
        drop(busy);
        // (2 + 1) / 2 * 1.25 = 1.875: cap 2, and the home endpoint carries 2.
        let _busy = load(&p, home, 2);
        let (other, outcome) = by_blocks(&p, &index, &[7, 9]);
        assert_eq!((other == home, outcome), (false, Outcome::Overloaded));
        // Short prompts go to the least loaded, counted as such.
        let prefix = Prefix { index: &index, blocks: &[], load_factor: 1.25 };
        let (chosen, outcome) = pick(&p, &[], Some(&prefix), now()).expect("an endpoint");
        assert!(!Arc::ptr_eq(&chosen, &p.endpoints[home]));
        assert_eq!(outcome, Some(Outcome::Short));
    }

    #[test]
    fn new_prefixes_and_ties_go_to_the_least_loaded() {
        let p = pool(3);
        let index = PrefixIndex::default();
        let _busy = (load(&p, 0, 1), load(&p, 1, 1));
        for block in 0..20 {
            assert_eq!(by_blocks(&p, &index, &[block]), (2, Outcome::Miss));
        }
        // A prefix two endpoints hold equally: the less loaded of them.
        index.record(&[500, 501], p.endpoints[0].key);
        index.record(&[500, 501], p.endpoints[1].key);
        let _more = load(&p, 1, 1);
        assert_eq!(by_blocks(&p, &index, &[500, 501, 502]), (0, Outcome::Hit));
    }

    #[test]
    fn under_the_bound_no_endpoint_carries_more_than_its_share() {
        let p = pool(4);
        let index = PrefixIndex::default();
        // Every request shares one prefix and stays in flight.
        let mut guards = Vec::new();
        for n in 0..40 {
            let (at, _) = by_blocks(&p, &index, &[42, n]);
            guards.push(p.endpoints[at].start());
            let loads: Vec<usize> = p.endpoints.iter().map(|e| e.in_flight()).collect();
            let cap = load_cap(&loads, 1.25);
            assert!(loads.iter().all(|&l| l <= cap), "{loads:?} past {cap}");
        }
    }

    #[test]
    fn an_endpoint_joining_moves_only_the_prefixes_it_now_ranks_first() {
        let (four, five) = (pool(4), pool(5));
        let moved: Vec<(usize, usize)> = (0..2000u64)
            .map(|key| {
                let block = rendezvous(key, 0x5eed);
                let (a, _) = by_blocks(&four, &PrefixIndex::default(), &[block]);
                let (b, _) = by_blocks(&five, &PrefixIndex::default(), &[block]);
                (a, b)
            })
            .filter(|(a, b)| a != b)
            .collect();
        assert!(moved.iter().all(|&(_, to)| to == 4), "prefixes moved between old endpoints");
        assert!((250..550).contains(&moved.len()), "{} of 2000 moved, expected about 400", moved.len());
        // The index keeps a prefix it has seen where it was, even so.
        let index = PrefixIndex::default();
        let sticky = (0..200u64)
            .filter(|&key| {
                let block = rendezvous(key, 0x5eed);
                let (a, _) = by_blocks(&four, &index, &[block]);
                let (b, _) = by_blocks(&five, &index, &[block]);
                a == b
            })
            .count();
        assert_eq!(sticky, 200);
    }
}
