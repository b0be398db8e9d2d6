//! Accounting of the paged KV cache's blocks, and the prefix cache.
//!
//! Every block has a reference count: the sequences whose block tables list
//! it. A full block of computed tokens is registered under a SHA-256 chain
//! hash of every token up to its end, seeded by the request's cache salt;
//! another sequence whose prompt starts with the same tokens (and salt) takes
//! the block by reference instead of computing it again. A hit is trusted only
//! when the block's own tokens and the hash of the block before it match too,
//! so a forged hash cannot hand one prompt's keys and values to another (only
//! a SHA-256 collision on an earlier block could). A registered block nobody
//! references stays cached until its memory is needed: then the least recently
//! used one is evicted.
//!
//! Reference counts are checked in release builds: releasing a block nobody
//! holds, or sharing a free one, is an error that changes nothing (a block on
//! the free list twice would be handed to two sequences at once).

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// A hash of a cache salt and every token from the start of a sequence to the end of a block.
pub type PrefixHash = [u8; 32];

/// Where a sequence's hash chain starts: from its cache salt (vLLM's
/// `cache_salt`), so blocks are shared only between requests with the same salt.
pub fn root_hash(salt: Option<&str>) -> PrefixHash {
    let mut h = Sha256::new();
    h.update(b"kandle prefix cache v1\0");
    if let Some(salt) = salt {
        h.update([1]);
        h.update(salt.as_bytes());
    }
    h.finalize().into()
}

/// The hash of a full block following the block hashed `previous`.
pub fn chain_hash(previous: &PrefixHash, tokens: &[u32]) -> PrefixHash {
    let mut h = Sha256::new();
    h.update(previous);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// A full block as the prefix cache knows it.
#[derive(Debug, Clone, Copy)]
pub struct BlockKey<'a> {
    /// The hash of the blocks before it (the chain's root for the first).
    pub parent: PrefixHash,
    pub hash: PrefixHash,
    pub tokens: &'a [u32],
}

/// The keys of the full blocks of `tokens`, chained from `root`.
pub fn block_keys(root: PrefixHash, tokens: &[u32], block_size: usize) -> Vec<BlockKey<'_>> {
    let mut parent = root;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let hash = chain_hash(&parent, chunk);
            let key = BlockKey { parent, hash, tokens: chunk };
            parent = hash;
            key
        })
        .collect()
}

/// A reference count that would go wrong: a bug in the scheduler, refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV block {block}: {what}")]
pub struct BlockError {
    pub block: u32,
    pub what: &'static str,
}

/// What the prefix cache keeps of a registered block, to check a hit against.
struct Registered {
    parent: PrefixHash,
    hash: PrefixHash,
    tokens: Box<[u32]>,
}

impl Registered {
    fn matches(&self, key: &BlockKey<'_>) -> bool {
        self.hash == key.hash && self.parent == key.parent && *self.tokens == *key.tokens
    }
}

pub struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    /// Blocks nobody references and no hash names.
    free: Vec<u32>,
    /// What each registered block is known by.
    registered: Vec<Option<Registered>>,
    by_hash: HashMap<PrefixHash, u32>,
    /// Registered blocks nobody references, by the time they were last released.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    caching: bool,
}

/// What the prefix cache holds of a prompt's leading full blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    pub blocks: usize,
    /// Of those, the ones nobody references (counted in [`BlockPool::available`] too).
    pub idle: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            // Popped from the end: block 0 first.
            free: (0..num_blocks as u32).rev().collect(),
            registered: (0..num_blocks).map(|_| None).collect(),
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
                if let Some(r) = self.registered[b as usize].take() {
                    self.by_hash.remove(&r.hash);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// The registered block `key` names, if its tokens and parent match too.
    fn find(&self, key: &BlockKey<'_>) -> Option<u32> {
        if !self.caching {
            return None;
        }
        let block = *self.by_hash.get(&key.hash)?;
        self.registered[block as usize].as_ref().filter(|r| r.matches(key)).map(|_| block)
    }

    /// How many of the leading blocks `keys` names the prefix cache holds
    /// (without taking them), and how many of those are idle.
    pub fn held(&self, keys: &[BlockKey<'_>]) -> Held {
        let mut held = Held::default();
        for key in keys {
            let Some(block) = self.find(key) else { break };
            held.blocks += 1;
            held.idle += usize::from(self.refs[block as usize] == 0);
        }
        held
    }

    /// Takes a reference to the cached block `key` names, if there is one.
    pub fn lookup(&mut self, key: &BlockKey<'_>) -> Option<u32> {
        let block = self.find(key)?;
        self.share(block).ok()?;
        Some(block)
    }

    /// One more reference to a block already referenced (or idle in the cache).
    pub fn share(&mut self, block: u32) -> Result<(), BlockError> {
        let b = self.index(block)?;
        if self.refs[b] == 0 {
            if self.registered[b].is_none() {
                return Err(BlockError { block, what: "shared while free" });
            }
            self.idle.remove(&self.idle_since[b]);
        }
        self.refs[b] += 1;
        Ok(())
    }

    /// Names a full block of computed tokens by its key, so later sequences
    /// can share it. A hash already taken keeps its block.
    pub fn register(&mut self, block: u32, key: &BlockKey<'_>) {
        let b = block as usize;
        if !self.caching || self.registered.get(b).is_none_or(Option::is_some) || self.by_hash.contains_key(&key.hash) {
            return;
        }
        self.registered[b] = Some(Registered { parent: key.parent, hash: key.hash, tokens: key.tokens.into() });
        self.by_hash.insert(key.hash, block);
    }

    /// Drops one reference; an unreferenced block becomes free, or idle in the
    /// cache when it is registered.
    pub fn release(&mut self, block: u32) -> Result<(), BlockError> {
        let b = self.index(block)?;
        if self.refs[b] == 0 {
            return Err(BlockError { block, what: "released while nobody holds it" });
        }
        self.refs[b] -= 1;
        if self.refs[b] > 0 {
            return Ok(());
        }
        if self.registered[b].is_some() {
            self.clock += 1;
            self.idle_since[b] = self.clock;
            self.idle.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
        Ok(())
    }

    /// Releases every block of a table (last first, so a prompt's leading
    /// blocks are evicted last); the first error, after trying them all.
    pub fn release_all(&mut self, blocks: &mut Vec<u32>) -> Result<(), BlockError> {
        let mut first = Ok(());
        for b in blocks.drain(..).rev() {
            let result = self.release(b);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    /// The sequences holding `block` (tests check the count against the block tables).
    #[cfg(test)]
    pub fn references(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    fn index(&self, block: u32) -> Result<usize, BlockError> {
        let b = block as usize;
        if b < self.refs.len() {
            Ok(b)
        } else {
            Err(BlockError { block, what: "outside the pool" })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tokens: &[u32], block_size: usize) -> Vec<BlockKey<'_>> {
        block_keys(root_hash(None), tokens, block_size)
    }

    #[test]
    fn allocate_share_release_and_account() {
        let mut pool = BlockPool::new(4, 16, true);
        let a = pool.allocate().expect("block");
        let b = pool.allocate().expect("block");
        assert_eq!((pool.used(), pool.available()), (2, 2));
        pool.share(a).expect("held");
        pool.release(a).expect("held twice");
        assert_eq!(pool.used(), 2, "still referenced once");
        pool.release(a).expect("held once");
        pool.release(b).expect("held");
        assert_eq!((pool.used(), pool.available()), (0, 4));
        let all: Vec<u32> = (0..4).map(|_| pool.allocate().expect("block")).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(pool.allocate(), None, "exhausted");
    }

    /// A refcount bug is refused and changes nothing: the block is not put on
    /// the free list a second time (where two sequences would both get it).
    #[test]
    fn reference_count_errors_are_refused_in_release_builds_too() {
        let mut pool = BlockPool::new(2, 4, false);
        let a = pool.allocate().expect("a");
        pool.release(a).expect("held");
        assert_eq!(pool.release(a), Err(BlockError { block: a, what: "released while nobody holds it" }));
        assert!(pool.share(a).is_err(), "sharing a free block");
        assert!(pool.release(7).is_err() && pool.share(7).is_err(), "outside the pool");
        let (x, y) = (pool.allocate().expect("x"), pool.allocate().expect("y"));
        assert_ne!(x, y, "the double release left one free entry");
        assert_eq!(pool.allocate(), None);
        let mut table = vec![x, x, y];
        assert!(pool.release_all(&mut table).is_err(), "x held once, listed twice");
        assert_eq!(pool.available(), 2, "every block still came back once");
    }

    #[test]
    fn registered_blocks_are_shared_kept_idle_and_evicted_oldest_first() {
        let mut pool = BlockPool::new(3, 2, true);
        let tokens = [1, 2, 3, 4, 5];
        let keys = keys(&tokens, 2);
        assert_eq!(keys.len(), 2, "only full blocks are keyed");
        let (a, b) = (pool.allocate().expect("a"), pool.allocate().expect("b"));
        pool.register(a, &keys[0]);
        pool.register(b, &keys[1]);
        assert_eq!(pool.held(&keys), Held { blocks: 2, idle: 0 });
        assert_eq!(pool.lookup(&keys[0]), Some(a), "shared while referenced");
        pool.release(a).expect("held");
        pool.release(a).expect("held");
        pool.release(b).expect("held");
        assert_eq!((pool.used(), pool.available()), (0, 3), "idle cached blocks count as available");
        assert_eq!(pool.held(&keys), Held { blocks: 2, idle: 2 });
        assert_eq!(pool.lookup(&keys[1]), Some(b), "kept after its sequences ended");
        pool.release(b).expect("held");
        // Needing all three blocks evicts the idle ones, least recently released first.
        let c = pool.allocate().expect("free block");
        let d = pool.allocate().expect("evicts a");
        assert_eq!(d, a);
        assert_eq!(pool.lookup(&keys[0]), None, "evicted");
        let e = pool.allocate().expect("evicts b");
        assert_eq!(e, b);
        assert_eq!(pool.lookup(&keys[1]), None);
        assert_ne!(c, d);
    }

    /// Two different blocks forced onto one hash (what a tenant searching for a
    /// collision would build): the second never gets the first's block.
    #[test]
    fn a_hash_collision_shares_nothing() {
        let mut pool = BlockPool::new(4, 2, true);
        let first = [1, 2];
        let key = keys(&first, 2)[0];
        let a = pool.allocate().expect("a");
        pool.register(a, &key);
        let other_tokens = [7, 8];
        let forged = BlockKey { tokens: &other_tokens, ..key };
        assert_eq!(pool.lookup(&forged), None, "same hash, other tokens");
        assert_eq!(pool.held(&[forged]), Held::default());
        let other_parent = BlockKey { parent: root_hash(Some("x")), ..key };
        assert_eq!(pool.lookup(&other_parent), None, "same hash and tokens, other prefix");
        assert_eq!(pool.lookup(&key), Some(a), "the real key still hits");
    }

    #[test]
    fn the_cache_salt_keeps_blocks_apart() {
        let tokens = [1, 2, 3, 4];
        let plain = block_keys(root_hash(None), &tokens, 2);
        let salted = block_keys(root_hash(Some("tenant-a")), &tokens, 2);
        let mut pool = BlockPool::new(4, 2, true);
        let a = pool.allocate().expect("a");
        pool.register(a, &salted[0]);
        assert_eq!(pool.lookup(&plain[0]), None, "unsalted request");
        assert_eq!(pool.lookup(&block_keys(root_hash(Some("tenant-b")), &tokens, 2)[0]), None, "other salt");
        assert_eq!(pool.lookup(&block_keys(root_hash(Some("tenant-a")), &tokens, 2)[0]), Some(a), "same salt");
        assert_ne!(root_hash(None), root_hash(Some("")), "no salt is not the empty salt");
    }

    #[test]
    fn block_keys_depend_on_everything_before() {
        let one = keys(&[1, 2, 3, 4], 2);
        let other = keys(&[9, 2, 3, 4], 2);
        assert_ne!(one[1].hash, other[1].hash, "same block, different prefix");
        assert_eq!(one[1].parent, one[0].hash);
        let longer = keys(&[1, 2, 3, 4, 7], 2);
        assert_eq!(longer.len(), 2);
        assert_eq!((longer[1].hash, longer[1].tokens), (one[1].hash, one[1].tokens));
    }

    #[test]
    fn without_caching_nothing_is_found() {
        let mut pool = BlockPool::new(2, 2, false);
        let a = pool.allocate().expect("a");
        let key = keys(&[1, 2], 2)[0];
        pool.register(a, &key);
        assert_eq!(pool.lookup(&key), None);
        pool.release(a).expect("held");
        assert_eq!(pool.available(), 2);
    }
}
