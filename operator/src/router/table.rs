//! The route table: model names (and aliases) → pools of worker endpoints.
//! Rebuilt whole on every discovery change; endpoints that stay keep their
//! in-flight counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

/// A pool as a discovery source describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub model: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Base URLs of ready workers, e.g. `http://10.0.0.7:8080`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Whether the pool can get an endpoint while it has none (scaled to zero and
    /// scaling up, pods starting, a route file that may list one): requests
    /// for it are then held rather than refused. Every pool of a route file can.
    #[serde(skip, default = "can_come_up")]
    pub can_come_up: bool,
}

fn can_come_up() -> bool {
    true
}

/// One worker.
#[derive(Debug)]
pub struct Endpoint {
    pub url: String,
    /// A fixed fingerprint of the URL: the endpoint's name in prefix routing,
    /// the same in every router replica.
    pub key: u64,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` until which the endpoint is skipped after a
    /// failed connection (0: never failed).
    down_until_ms: AtomicU64,
    epoch: Instant,
}

impl Endpoint {
    pub fn new(url: String) -> Self {
        let key = super::prefix::fingerprint(url.as_bytes());
        Self { url, key, in_flight: AtomicUsize::new(0), down_until_ms: AtomicU64::new(0), epoch: Instant::now() }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_down(&self, now: Instant) -> bool {
        self.down_until_ms.load(Ordering::SeqCst) > now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Skips the endpoint for `cooldown` after a connection failure.
    pub fn mark_down(&self, cooldown: Duration) {
        let until = Instant::now().saturating_duration_since(self.epoch) + cooldown;
        self.down_until_ms.store(until.as_millis() as u64, Ordering::SeqCst);
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// Decrements the endpoint's in-flight count when the request ends, however it ends.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
pub struct Pool {
    /// The canonical model name.
    pub model: String,
    pub aliases: Vec<String>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// See [`PoolSpec::can_come_up`].
    pub can_come_up: bool,
    /// Rotates the starting point among equally loaded endpoints.
    pub(crate) rotation: AtomicUsize,
}

impl Pool {
    /// The names clients may call the pool by: its model and its aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.model.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    by_name: HashMap<String, Arc<Pool>>,
    pools: Vec<Arc<Pool>>,
    /// Names more than one pool claims (the first keeps each).
    contested: Vec<String>,
}

impl RouteTable {
    pub fn lookup(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }
}

/// The current table, swapped whole on updates.
#[derive(Debug)]
pub struct Routes {
    table: RwLock<Arc<RouteTable>>,
    changed: watch::Sender<()>,
}

impl Default for Routes {
    fn default() -> Self {
        Self { table: RwLock::default(), changed: watch::Sender::new(()) }
    }
}

impl Routes {
    /// Wakes on every update after this call.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    pub fn current(&self) -> Arc<RouteTable> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the table. The first pool to claim a name keeps it; later claims
    /// are logged and ignored.
    pub fn update(&self, specs: Vec<PoolSpec>) {
        let old = self.current();
        let known: HashMap<&str, &Arc<Endpoint>> =
            old.pools.iter().flat_map(|p| p.endpoints.iter()).map(|e| (e.url.as_str(), e)).collect();
        let mut table = RouteTable::default();
        for spec in specs {
            let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
            for url in spec.endpoints {
                let url = url.trim_end_matches('/').to_string();
                if endpoints.iter().any(|e| e.url == url) {
                    continue;
                }
                endpoints.push(
                    known.get(url.as_str()).map(|e| (*e).clone()).unwrap_or_else(|| Arc::new(Endpoint::new(url))),
                );
            }
            let pool = Arc::new(Pool {
                model: spec.model.clone(),
                aliases: spec.aliases.clone(),
                endpoints,
                can_come_up: spec.can_come_up,
                rotation: AtomicUsize::new(0),
            });
            for name in std::iter::once(&spec.model).chain(&spec.aliases) {
                if table.by_name.contains_key(name) {
                    // Said once when the conflict appears, not on every rebuild.
                    if !old.contested.contains(name) {
                        tracing::warn!(model = %name, "model name claimed twice; the first pool keeps it");
                    }
                    table.contested.push(name.clone());
                    continue;
                }
                table.by_name.insert(name.clone(), pool.clone());
            }
            table.pools.push(pool);
        }
        let mut current = match self.table.write() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = Arc::new(table);
        drop(current);
        self.changed.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, aliases: &[&str], endpoints: &[&str]) -> PoolSpec {
        PoolSpec {
            model: model.into(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            can_come_up: true,
        }
    }

    #[test]
    fn names_and_aliases_route_to_their_pool() {
        let routes = Routes::default();
        routes.update(vec![spec("a", &["gpt-4o-mini"], &["http://1:80"]), spec("b", &[], &["http://2:80"])]);
        let t = routes.current();
        assert_eq!(t.lookup("a").map(|p| p.model.as_str()), Some("a"));
        assert_eq!(t.lookup("gpt-4o-mini").map(|p| p.model.as_str()), Some("a"));
        assert_eq!(t.lookup("b").map(|p| p.endpoints[0].url.as_str()), Some("http://2:80"));
        assert!(t.lookup("c").is_none());
    }

    #[test]
    fn first_claim_keeps_a_name() {
        let routes = Routes::default();
        routes.update(vec![spec("a", &["x"], &["http://1:80"]), spec("b", &["x", "a"], &["http://2:80"])]);
        let t = routes.current();
        assert_eq!(t.lookup("x").map(|p| p.model.as_str()), Some("a"));
        assert_eq!(t.lookup("a").map(|p| p.model.as_str()), Some("a"));
        assert_eq!(t.lookup("b").map(|p| p.model.as_str()), Some("b"));
        assert_eq!(t.contested, ["x", "a"]);
    }

    #[test]
    fn updates_keep_in_flight_counts_of_endpoints_that_stay() {
        let routes = Routes::default();
        routes.update(vec![spec("a", &[], &["http://1:80/", "http://2:80"])]);
        let guard = routes.current().lookup("a").map(|p| p.endpoints[0].start()).expect("endpoint");
        routes.update(vec![spec("a", &[], &["http://1:80", "http://3:80"])]);
        let t = routes.current();
        let pool = t.lookup("a").expect("pool");
        assert_eq!(pool.endpoints.iter().map(|e| e.url.as_str()).collect::<Vec<_>>(), ["http://1:80", "http://3:80"]);
        assert_eq!(pool.endpoints[0].in_flight(), 1);
        drop(guard);
        assert_eq!(pool.endpoints[0].in_flight(), 0);
    }
}
