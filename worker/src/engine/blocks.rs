//! Accounting of the paged KV cache's blocks, and the prefix cache.
//!
//! Every block has a reference count: the sequences whose block tables list
//! it. A full block of computed tokens is registered under a hash of all the
//! tokens up to its end; another sequence whose prompt starts with the same
//! tokens takes the block by reference instead of computing it again. A
//! registered block nobody references stays cached until its memory is needed:
//! then the least recently used one is evicted.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A hash of every token from the start of a sequence to the end of a block.
pub type PrefixHash = u64;

/// The hash of a full block following the block hashed `previous`.
pub fn chain_hash(previous: PrefixHash, tokens: &[u32]) -> PrefixHash {
    // SipHash with fixed keys: the same tokens hash alike for the whole process.
    let mut h = std::hash::DefaultHasher::new();
    previous.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The hashes of the full blocks of `tokens`.
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<PrefixHash> {
    let mut previous = 0;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            previous = chain_hash(previous, chunk);
            previous
        })
        .collect()
}

pub struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    /// Blocks nobody references and no hash names.
    free: Vec<u32>,
    /// The hash each registered block is known by.
    hash_of: Vec<Option<PrefixHash>>,
    by_hash: HashMap<PrefixHash, u32>,
    /// Registered blocks nobody references, by the time they were last released.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    caching: bool,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            // Popped from the end: block 0 first.
            free: (0..num_blocks as u32).rev().collect(),
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; num_blocks],
            clock: 0,
            caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a sequence may still take: free, or cached and idle.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks some sequence references.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// A block for new tokens: a free one, else the least recently used idle cached one.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Whether the prefix cache holds a block for `hash`.
    pub fn holds(&self, hash: PrefixHash) -> bool {
        self.caching && self.by_hash.contains_key(&hash)
    }

    /// Takes a reference to the cached block for `hash`, if there is one.
    pub fn lookup(&mut self, hash: PrefixHash) -> Option<u32> {
        if !self.caching {
            return None;
        }
        let block = *self.by_hash.get(&hash)?;
        self.share(block);
        Some(block)
    }

    /// One more reference to a block already referenced (or idle in the cache).
    pub fn share(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refs[b] > 0 || self.hash_of[b].is_some(), "share of a free block");
        if self.refs[b] == 0 {
            self.idle.remove(&self.idle_since[b]);
        }
        self.refs[b] += 1;
    }

    /// Names a full block of computed tokens by its prefix hash, so later
    /// sequences can share it. A hash already taken keeps its block.
    pub fn register(&mut self, block: u32, hash: PrefixHash) {
        if !self.caching || self.hash_of[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hash_of[block as usize] = Some(hash);
        self.by_hash.insert(hash, block);
    }

    /// Drops one reference; an unreferenced block becomes free, or idle in the
    /// cache when a hash names it.
    pub fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refs[b] > 0, "release of a free block");
        self.refs[b] = self.refs[b].saturating_sub(1);
        if self.refs[b] > 0 {
            return;
        }
        if self.hash_of[b].is_some() {
            self.clock += 1;
            self.idle_since[b] = self.clock;
            self.idle.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    pub fn release_all(&mut self, blocks: &mut Vec<u32>) {
        for b in blocks.drain(..).rev() {
            self.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_share_release_and_account() {
        let mut pool = BlockPool::new(4, 16, true);
        let a = pool.allocate().expect("block");
        let b = pool.allocate().expect("block");
        assert_eq!((pool.used(), pool.available()), (2, 2));
        pool.share(a);
        pool.release(a);
        assert_eq!(pool.used(), 2, "still referenced once");
        pool.release(a);
        pool.release(b);
        assert_eq!((pool.used(), pool.available()), (0, 4));
        let all: Vec<u32> = (0..4).map(|_| pool.allocate().expect("block")).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(pool.allocate(), None, "exhausted");
    }

    #[test]
    fn registered_blocks_are_shared_kept_idle_and_evicted_oldest_first() {
        let mut pool = BlockPool::new(3, 2, true);
        let hashes = prefix_hashes(&[1, 2, 3, 4, 5], 2);
        assert_eq!(hashes.len(), 2, "only full blocks are hashed");
        let (a, b) = (pool.allocate().expect("a"), pool.allocate().expect("b"));
        pool.register(a, hashes[0]);
        pool.register(b, hashes[1]);
        assert_eq!(pool.lookup(hashes[0]), Some(a), "shared while referenced");
        pool.release(a);
        pool.release(a);
        pool.release(b);
        assert_eq!((pool.used(), pool.available()), (0, 3), "idle cached blocks count as available");
        assert_eq!(pool.lookup(hashes[1]), Some(b), "kept after its sequences ended");
        pool.release(b);
        // Needing all three blocks evicts the idle ones, least recently released first.
        let c = pool.allocate().expect("free block");
        let d = pool.allocate().expect("evicts a");
        assert_eq!(d, a);
        assert_eq!(pool.lookup(hashes[0]), None, "evicted");
        let e = pool.allocate().expect("evicts b");
        assert_eq!(e, b);
        assert_eq!(pool.lookup(hashes[1]), None);
        assert_ne!(c, d);
    }

    #[test]
    fn prefix_hashes_depend_on_everything_before() {
        let one = prefix_hashes(&[1, 2, 3, 4], 2);
        let other = prefix_hashes(&[9, 2, 3, 4], 2);
        assert_ne!(one[1], other[1], "same block, different prefix");
        assert_eq!(one, prefix_hashes(&[1, 2, 3, 4, 7], 2));
    }

    #[test]
    fn without_caching_nothing_is_found() {
        let mut pool = BlockPool::new(2, 2, false);
        let a = pool.allocate().expect("a");
        pool.register(a, 7);
        assert_eq!(pool.lookup(7), None);
        pool.release(a);
        assert_eq!(pool.available(), 2);
    }
}
