//! Which endpoints recently served which prompt blocks (the chained block
//! hashes of [`super::prefix`]): the router's picture of the workers' prefix
//! caches. It is an estimate, as any router's is: a worker evicts blocks the
//! index still names, and another router replica's requests are not in it.
//! The index forgets the least recently routed blocks past its capacity.

use std::collections::HashMap;
use std::sync::Mutex;

/// Endpoints remembered per block, most recent first: a prefix shared widely
/// enough to spill over the load bound lives on a few endpoints at once.
const HOLDERS: usize = 4;

/// Blocks remembered at most: 65,536 blocks of 256 bytes are 16 MiB of
/// prompt text (about 4M tokens), more than a pool's caches hold; the index
/// itself takes a few MiB.
pub const CAPACITY: usize = 1 << 16;

pub struct PrefixIndex {
    state: Mutex<State>,
    capacity: usize,
}

struct State {
    blocks: HashMap<u64, Holders>,
    /// Counts recorded blocks: the age of an entry.
    tick: u64,
}

#[derive(Clone, Copy)]
struct Holders {
    endpoints: [u64; HOLDERS],
    len: usize,
    touched: u64,
}

impl Holders {
    fn holds(&self, endpoint: u64) -> bool {
        self.endpoints[..self.len].contains(&endpoint)
    }

    /// Puts `endpoint` first, dropping the oldest holder when full.
    fn promote(&mut self, endpoint: u64) {
        let at = self.endpoints[..self.len].iter().position(|&e| e == endpoint).unwrap_or_else(|| {
            self.len = (self.len + 1).min(HOLDERS);
            self.len - 1
        });
        self.endpoints.copy_within(0..at, 1);
        self.endpoints[0] = endpoint;
    }
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl PrefixIndex {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { state: Mutex::new(State { blocks: HashMap::new(), tick: 0 }), capacity: capacity.max(2) }
    }

    /// For each of `endpoints` (their keys), how many of `blocks`' leading
    /// blocks it served.
    pub fn matched(&self, blocks: &[u64], endpoints: &[u64]) -> Vec<usize> {
        self.lock().matched(blocks, endpoints)
    }

    /// Records that `endpoint` served every one of `blocks`.
    pub fn record(&self, blocks: &[u64], endpoint: u64) {
        self.lock().record(blocks, endpoint, self.capacity);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another request panicked mid-update; the
        // map is still a valid (if approximate) index.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().blocks.len()
    }
}

impl State {
    /// A block's hash is chained over every block before it, so an endpoint
    /// that served block `d` served the whole prefix up to it: its match is
    /// the deepest block it is among the holders of (a shared opening block
    /// that has since had other holders does not cut it short).
    fn matched(&self, blocks: &[u64], endpoints: &[u64]) -> Vec<usize> {
        let mut matched = vec![0; endpoints.len()];
        let mut open = endpoints.len();
        for (depth, block) in blocks.iter().enumerate().rev() {
            let Some(holders) = self.blocks.get(block) else { continue };
            for (i, &endpoint) in endpoints.iter().enumerate() {
                if matched[i] == 0 && holders.holds(endpoint) {
                    matched[i] = depth + 1;
                    open -= 1;
                }
            }
            if open == 0 {
                break;
            }
        }
        matched
    }

    fn record(&mut self, blocks: &[u64], endpoint: u64, capacity: usize) {
        for &block in blocks {
            self.tick += 1;
            let touched = self.tick;
            let holders = self.blocks.entry(block).or_insert(Holders { endpoints: [0; HOLDERS], len: 0, touched });
            holders.promote(endpoint);
            holders.touched = touched;
        }
        if self.blocks.len() > capacity {
            // Keep the blocks touched within the last half capacity of
            // records: at most half the capacity, so this runs once per
            // half-capacity new blocks at most.
            let keep_after = self.tick.saturating_sub((capacity / 2) as u64);
            self.blocks.retain(|_, h| h.touched > keep_after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_matches_up_to_the_deepest_block_it_served() {
        let index = PrefixIndex::default();
        let (a, b, c) = (11, 22, 33);
        index.record(&[1, 2, 3, 4], a);
        index.record(&[1, 2, 7], b);
        assert_eq!(index.matched(&[1, 2, 3, 9], &[a, b, c]), vec![3, 2, 0]);
        // Block 1 shared by more endpoints than it remembers: `a` still
        // matches through its deeper blocks (chained hashes imply the rest).
        for other in 100..110 {
            index.record(&[1], other);
        }
        assert_eq!(index.matched(&[1, 2, 3, 4, 5], &[a, b, c, 109]), vec![4, 2, 0, 1]);
        assert_eq!(index.matched(&[], &[a]), vec![0]);
        assert_eq!(index.matched(&[8], &[]), Vec::<usize>::new());
    }

    #[test]
    fn a_block_remembers_its_latest_holders_only() {
        let index = PrefixIndex::default();
        for endpoint in 1..=(HOLDERS as u64 + 1) {
            index.record(&[7], endpoint);
        }
        let all: Vec<u64> = (1..=(HOLDERS as u64 + 1)).collect();
        let seen = index.matched(&[7], &all);
        assert_eq!(seen[0], 0, "the oldest holder was dropped");
        assert!(seen[1..].iter().all(|&m| m == 1));
        // Touching a holder again moves it first without duplicating it.
        index.record(&[7], 3);
        index.record(&[7], 9);
        assert_eq!(index.matched(&[7], &all), vec![0, 0, 1, 1, 1]);
    }

    #[test]
    fn the_least_recently_routed_blocks_are_forgotten_past_capacity() {
        let index = PrefixIndex::with_capacity(100);
        index.record(&[1], 5);
        for block in 1000..1200 {
            index.record(&[block], 5);
        }
        assert!(index.len() <= 100);
        assert_eq!(index.matched(&[1], &[5]), vec![0]);
        assert_eq!(index.matched(&[1199], &[5]), vec![1], "recent blocks stay");
    }
}
