//! Requests held for a pool that has no ready endpoint yet but can come up (a
//! pool at zero that the controller scales up on demand, pods still starting).
//! Each model has a bounded FIFO queue; when a route-table update gives the pool
//! an endpoint (or says it cannot come up, or removes it), its queue is released
//! in arrival order and each request routes again. A request that leaves while
//! held (client gone) takes its place out of the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

use super::metrics::ModelLabel;
use super::table::RouteTable;

/// The held requests of every model, each queue at most `limit` long, counted
/// per model in `gauge` (the demand a pool at zero has).
#[derive(Debug)]
pub struct Holding {
    limit: usize,
    queues: Mutex<Queues>,
    gauge: Family<ModelLabel, Gauge>,
}

#[derive(Debug, Default)]
struct Queues {
    next_id: u64,
    by_model: HashMap<String, VecDeque<(u64, oneshot::Sender<()>)>>,
}

/// The queue of `model` is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

impl Holding {
    pub fn new(limit: usize, gauge: Family<ModelLabel, Gauge>) -> Self {
        Self { limit, queues: Mutex::default(), gauge }
    }

    fn count(&self, model: &str, held: usize) {
        self.gauge.get_or_create(&ModelLabel { model: model.to_string() }).set(held as i64);
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the last place in `model`'s queue.
    pub fn enter(self: &Arc<Self>, model: &str) -> Result<Place, QueueFull> {
        let mut queues = self.queues();
        let id = queues.next_id;
        let queue = queues.by_model.entry(model.to_string()).or_default();
        if queue.len() >= self.limit {
            return Err(QueueFull);
        }
        let (tx, rx) = oneshot::channel();
        queue.push_back((id, tx));
        let held = queue.len();
        queues.next_id += 1;
        self.count(model, held);
        Ok(Place { holding: self.clone(), model: model.to_string(), id, released: rx })
    }

    /// Releases, first come first, every request held for a model whose pool
    /// `table` gives an endpoint, says cannot come up, or no longer has.
    pub fn release(&self, table: &RouteTable) {
        let mut queues = self.queues();
        queues.by_model.retain(|model, queue| {
            let waiting = table.lookup(model).is_some_and(|pool| pool.endpoints.is_empty() && pool.can_come_up);
            if !waiting {
                for (_, tx) in queue.drain(..) {
                    // A receiver already gone left on its own; nothing to tell it.
                    let _ = tx.send(());
                }
                self.count(model, 0);
            }
            !queue.is_empty()
        });
    }

    fn leave(&self, model: &str, id: u64) {
        let mut queues = self.queues();
        if let Some(queue) = queues.by_model.get_mut(model) {
            queue.retain(|(held, _)| *held != id);
            let held = queue.len();
            if held == 0 {
                queues.by_model.remove(model);
            }
            self.count(model, held);
        }
    }
}

/// A request's place in its model's queue; dropping it gives the place up.
#[derive(Debug)]
pub struct Place {
    holding: Arc<Holding>,
    model: String,
    id: u64,
    released: oneshot::Receiver<()>,
}

impl Place {
    /// Resolves when the queue is released.
    pub async fn released(&mut self) {
        // A sender dropped without sending means the queue went away with it:
        // route again either way.
        let _ = (&mut self.released).await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.holding.leave(&self.model, self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::router::table::{PoolSpec, Routes};

    fn table(endpoints: &[&str], can_come_up: bool) -> Arc<RouteTable> {
        let routes = Routes::default();
        routes.update(vec![PoolSpec {
            model: "m".into(),
            aliases: vec![],
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            can_come_up,
        }]);
        routes.current()
    }

    fn held(holding: &Holding, model: &str) -> usize {
        holding.queues().by_model.get(model).map_or(0, VecDeque::len)
    }

    async fn is_released(place: &mut Place) -> bool {
        tokio::time::timeout(Duration::from_millis(20), place.released()).await.is_ok()
    }

    #[tokio::test]
    async fn places_are_bounded_and_given_back_on_drop() {
        let holding = Arc::new(Holding::new(2, Family::default()));
        let a = holding.enter("m").expect("first place");
        let _b = holding.enter("m").expect("second place");
        assert_eq!(holding.enter("m").err(), Some(QueueFull));
        assert!(holding.enter("other").is_ok(), "each model has its own queue");
        drop(a);
        assert_eq!(held(&holding, "m"), 1);
        assert!(holding.enter("m").is_ok(), "a place given back can be taken");
    }

    #[tokio::test]
    async fn an_endpoint_releases_the_queue_in_arrival_order() {
        let holding = Arc::new(Holding::new(8, Family::default()));
        let mut places: Vec<Place> = (0..3).map(|_| holding.enter("m").expect("place")).collect();
        holding.release(&table(&[], true));
        assert!(!is_released(&mut places[0]).await, "still no endpoint: still held");
        assert_eq!(held(&holding, "m"), 3);
        assert_eq!(holding.gauge.get_or_create(&ModelLabel { model: "m".into() }).get(), 3);

        // The order in which the senders fire is the order of arrival.
        let order = {
            let queues = holding.queues();
            queues.by_model["m"].iter().map(|(id, _)| *id).collect::<Vec<_>>()
        };
        assert_eq!(order, places.iter().map(|p| p.id).collect::<Vec<_>>());

        holding.release(&table(&["http://1:80"], true));
        for place in &mut places {
            assert!(is_released(place).await);
        }
        assert_eq!(held(&holding, "m"), 0);
        assert_eq!(holding.gauge.get_or_create(&ModelLabel { model: "m".into() }).get(), 0);
    }

    #[tokio::test]
    async fn a_pool_that_cannot_come_up_or_is_gone_releases_its_queue() {
        let holding = Arc::new(Holding::new(8, Family::default()));
        let mut degraded = holding.enter("m").expect("place");
        holding.release(&table(&[], false));
        assert!(is_released(&mut degraded).await);

        let mut removed = holding.enter("m").expect("place");
        holding.release(&RouteTable::default());
        assert!(is_released(&mut removed).await);
    }
}
