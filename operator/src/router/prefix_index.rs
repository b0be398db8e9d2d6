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
    /// blocks it served; `decide` picks one of them by index, which is then
    /// recorded as holding every block. One lock over both, so concurrent
    /// requests with one prefix see each other's choice.
    pub fn choose(&self, blocks: &[u64], endpoints: &[u64], decide: impl FnOnce(&[usize]) -> usize) -> usize {
        // A poisoned lock only means another request panicked mid-update; the
        // map is still a valid (if approximate) index.
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let matched = state.matched(blocks, endpoints);
        let chosen = decide(&matched);
        if let Some(&endpoint) = endpoints.get(chosen) {
            state.record(blocks, endpoint, self.capacity);
        }
        chosen
    }

    /// Blocks remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().map(|s| s.blocks.len()).unwrap_or(0)
    }
}

impl State {
    fn matched(&self, blocks: &[u64], endpoints: &[u64]) -> Vec<usize> {
        let mut matched = vec![0; endpoints.len()];
        let mut still: Vec<usize> = (0..endpoints.len()).collect();
        for (depth, block) in blocks.iter().enumerate() {
            let Some(holders) = self.blocks.get(block) else { break };
            still.retain(|&i| holders.holds(endpoints[i]));
            if still.is_empty() {
                break;
            }
            for &i in &still {
                matched[i] = depth + 1;
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
    fn leading_blocks_count_until_the_first_one_an_endpoint_lacks() {
        let index = PrefixIndex::default();
        let (a, b, c) = (11, 22, 33);
        index.choose(&[1, 2, 3, 4], &[a, b], |_| 0);
        index.choose(&[1, 2, 7], &[a, b], |_| 1);
        let mut seen = Vec::new();
        index.choose(&[1, 2, 3, 9], &[a, b, c], |m| {
            seen = m.to_vec();
            2
        });
        assert_eq!(seen, vec![3, 2, 0]);
        // c now holds 1, 2, 3 and 9; a block in the middle missing ends the match.
        index.choose(&[1, 5, 3], &[a, b, c], |m| {
            seen = m.to_vec();
            0
        });
        assert_eq!(seen, vec![1, 1, 1]);
    }

    #[test]
    fn a_block_remembers_its_latest_holders_only() {
        let index = PrefixIndex::default();
        for endpoint in 1..=(HOLDERS as u64 + 1) {
            index.choose(&[7], &[endpoint], |_| 0);
        }
        let all: Vec<u64> = (1..=(HOLDERS as u64 + 1)).collect();
        let mut seen = Vec::new();
        index.choose(&[7], &all, |m| {
            seen = m.to_vec();
            usize::MAX // an index past the list records nothing
        });
        assert_eq!(seen[0], 0, "the oldest holder was dropped");
        assert!(seen[1..].iter().all(|&m| m == 1));
        // Touching a holder again moves it first without duplicating it.
        index.choose(&[7], &[3], |_| 0);
        index.choose(&[7], &[9], |_| 0);
        index.choose(&[7], &all, |m| {
            seen = m.to_vec();
            usize::MAX
        });
        assert_eq!(seen, vec![0, 0, 1, 1, 1]);
    }

    #[test]
    fn the_least_recently_routed_blocks_are_forgotten_past_capacity() {
        let index = PrefixIndex::with_capacity(100);
        index.choose(&[1], &[5], |_| 0);
        for block in 1000..1200 {
            index.choose(&[block], &[5], |_| 0);
        }
        assert!(index.len() <= 100);
        let mut seen = Vec::new();
        index.choose(&[1], &[5], |m| {
            seen = m.to_vec();
            usize::MAX
        });
        assert_eq!(seen, vec![0]);
        index.choose(&[1199], &[5], |m| {
            seen = m.to_vec();
            usize::MAX
        });
        assert_eq!(seen, vec![1], "recent blocks stay");
    }
}
