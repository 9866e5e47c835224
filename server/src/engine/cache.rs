//! The shared cache of decrypted posting-list blocks, their 4-bit codes, the row records
//! and heads of split blocks, and position-run pages (`--index-cache-mb`).
//!
//! One cache serves every open index. Entries are keyed by the block's full identity
//! `(index, generation, list, block, epoch)`, so a rewritten block is a new entry and a stale
//! one can never be returned: it is simply never asked for again and ages out. The weight
//! of an entry is the memory its decrypted block holds ([`Block::weight`]), and the cache
//! never holds more than its budget (eviction by quick_cache's CLOCK-Pro policy, which
//! resists scans better than plain LRU). A budget of 0 keeps nothing: every read decrypts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::format::IndexId;
use super::index::{Block, Codes, RunPage};

/// The identity of one decrypted block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BlockKey {
    pub index: IndexId,
    pub gen: u32,
    pub list: u32,
    pub block: u32,
    pub epoch: u64,
}

/// The identity of one decrypted page of a position run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RunKey {
    pub index: IndexId,
    pub gen: u32,
    pub run: u64,
    pub page: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Block(BlockKey),
    Run(RunKey),
    /// The 4-bit codes of a block (its identity, as the block's).
    Codes(BlockKey),
    /// One opened row record of a split block: the block's identity and the record's number.
    Rows(BlockKey, u32),
    /// The head of a split block (ids, metadata, contents epochs; no rows).
    Head(BlockKey),
}

impl Key {
    fn of(&self) -> (&IndexId, u32) {
        match self {
            Key::Block(k) | Key::Codes(k) | Key::Rows(k, _) | Key::Head(k) => (&k.index, k.gen),
            Key::Run(k) => (&k.index, k.gen),
        }
    }
}

#[derive(Clone)]
enum Val {
    Block(Arc<Block>),
    Run(Arc<RunPage>),
    Codes(Arc<Codes>),
    Rows(Arc<Vec<u8>>),
}

#[derive(Clone)]
struct ByWeight;

impl quick_cache::Weighter<Key, Val> for ByWeight {
    fn weight(&self, _key: &Key, val: &Val) -> u64 {
        // Zero-weight entries would never be evicted.
        match val {
            Val::Block(b) => b.weight().max(1) as u64,
            Val::Run(p) => p.weight().max(1) as u64,
            Val::Codes(c) => c.weight().max(1) as u64,
            Val::Rows(r) => r.len() as u64 + 64,
        }
    }
}

type Inner = quick_cache::sync::Cache<Key, Val, ByWeight, foldhash::fast::RandomState>;

/// The cache and its counters.
pub struct BlockCache {
    inner: Option<Inner>,
    budget: u64,
    /// Bytes of the budget lent out to work outside the cache (see [`Self::reserve`]).
    reserved: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What `/metrics` and the debug log report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of decrypted blocks and run pages held now.
    pub bytes: u64,
    /// The budget in bytes.
    pub budget: u64,
    /// Bytes of the budget lent to trainings' buffers now (the cache holds at most
    /// `budget - reserved`).
    pub reserved: u64,
    /// Entries (blocks and run pages) held now.
    pub blocks: u64,
    pub hits: u64,
    pub misses: u64,
}

/// Typical block weight, to size the cache's tables (not a limit).
const TYPICAL_BLOCK: u64 = 64 * 1024;

impl BlockCache {
    /// A cache holding at most `budget` bytes of decrypted blocks.
    pub fn new(budget: u64) -> Self {
        let inner = (budget > 0).then(|| {
            let items = (budget / TYPICAL_BLOCK).clamp(64, 1 << 16) as usize;
            // The budget is split evenly across shards and a block must fit in its shard's
            // share: at least 16 typical blocks per shard, at most 64 shards.
            let shards = (budget / (16 * TYPICAL_BLOCK))
                .clamp(1, 64)
                .next_power_of_two();
            let shards = if shards > budget / (16 * TYPICAL_BLOCK) && shards > 1 {
                shards / 2
            } else {
                shards
            };
            let opts = quick_cache::OptionsBuilder::new()
                .estimated_items_capacity(items)
                .weight_capacity(budget)
                .shards(shards as usize)
                .build()
                .expect("valid cache options");
            Inner::with_options(
                opts,
                ByWeight,
                foldhash::fast::RandomState::default(),
                Default::default(),
            )
        });
        Self {
            inner,
            budget,
            reserved: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// A cached block (callers report hits and misses with [`Self::count`], once per
    /// request rather than once per block).
    pub(crate) fn get(&self, key: &BlockKey) -> Option<Arc<Block>> {
        match self.inner.as_ref()?.get(&Key::Block(*key))? {
            Val::Block(b) => Some(b),
            _ => None,
        }
    }

    /// A cached page of a position run.
    pub(crate) fn get_run(&self, key: &RunKey) -> Option<Arc<RunPage>> {
        match self.inner.as_ref()?.get(&Key::Run(*key))? {
            Val::Run(p) => Some(p),
            _ => None,
        }
    }

    /// The cached 4-bit codes of a block.
    pub(crate) fn get_codes(&self, key: &BlockKey) -> Option<Arc<Codes>> {
        match self.inner.as_ref()?.get(&Key::Codes(*key))? {
            Val::Codes(c) => Some(c),
            _ => None,
        }
    }

    /// Keep the 4-bit codes of a block.
    pub(crate) fn insert_codes(&self, key: BlockKey, codes: Arc<Codes>) {
        if let Some(c) = &self.inner {
            c.insert(Key::Codes(key), Val::Codes(codes));
        }
    }

    /// A cached row record of a split block: its plaintext rows.
    pub(crate) fn get_rows(&self, key: &BlockKey, record: u32) -> Option<Arc<Vec<u8>>> {
        match self.inner.as_ref()?.get(&Key::Rows(*key, record))? {
            Val::Rows(r) => Some(r),
            _ => None,
        }
    }

    /// Keep an opened row record of a split block.
    pub(crate) fn insert_rows(&self, key: BlockKey, record: u32, rows: Arc<Vec<u8>>) {
        if let Some(c) = &self.inner {
            c.insert(Key::Rows(key, record), Val::Rows(rows));
        }
    }

    /// The cached head of a split block.
    pub(crate) fn get_head(&self, key: &BlockKey) -> Option<Arc<Block>> {
        match self.inner.as_ref()?.get(&Key::Head(*key))? {
            Val::Block(b) => Some(b),
            _ => None,
        }
    }

    /// Keep the head of a split block.
    pub(crate) fn insert_head(&self, key: BlockKey, head: Arc<Block>) {
        if let Some(c) = &self.inner {
            c.insert(Key::Head(key), Val::Block(head));
        }
    }

    /// Keep a page of a position run.
    pub(crate) fn insert_run(&self, key: RunKey, page: Arc<RunPage>) {
        if let Some(c) = &self.inner {
            c.insert(Key::Run(key), Val::Run(page));
        }
    }

    pub(crate) fn count(&self, hits: usize, misses: usize) {
        if hits > 0 {
            self.hits.fetch_add(hits as u64, Relaxed);
        }
        if misses > 0 {
            self.misses.fetch_add(misses as u64, Relaxed);
        }
    }

    /// Drop one decrypted block (its codes, if cached, stay).
    pub(crate) fn remove(&self, key: &BlockKey) {
        if let Some(c) = &self.inner {
            c.remove(&Key::Block(*key));
        }
    }

    /// The whole budget, whatever is lent out now.
    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    /// Keep a block (a block heavier than the cache's share for it is not kept).
    pub(crate) fn insert(&self, key: BlockKey, block: Arc<Block>) {
        if let Some(c) = &self.inner {
            c.insert(Key::Block(key), Val::Block(block));
        }
    }

    /// Drop every entry of an index (deleted), or of one of its generations (retrained).
    pub(crate) fn forget(&self, index: &IndexId, gen: Option<u32>) {
        if let Some(c) = &self.inner {
            c.retain(|k, _| {
                let (i, g) = k.of();
                i != index || gen.is_some_and(|want| g != want)
            });
        }
    }

    /// Lend `bytes` of the budget to work outside the cache (a training's buffers): the
    /// cache shrinks by that much (evicting as needed) until the returned guard drops, so
    /// that the cache and the work together stay within `--index-cache-mb`.
    pub(crate) fn reserve(&self, bytes: u64) -> Reservation<'_> {
        self.reserved.fetch_add(bytes, Relaxed);
        self.resize();
        Reservation { cache: self, bytes }
    }

    fn resize(&self) {
        if let Some(c) = &self.inner {
            c.set_capacity(self.budget.saturating_sub(self.reserved.load(Relaxed)));
        }
    }

    /// Cached entries of generation `gen` of an index.
    #[cfg(test)]
    pub(crate) fn cached_of(&self, index: &IndexId, gen: u32) -> usize {
        self.inner.as_ref().map_or(0, |c| {
            c.iter().filter(|(k, _)| k.of() == (index, gen)).count()
        })
    }

    /// Cached whole blocks and cached codes of generation `gen` of an index.
    #[cfg(test)]
    pub(crate) fn cached_kinds_of(&self, index: &IndexId, gen: u32) -> (usize, usize) {
        self.inner.as_ref().map_or((0, 0), |c| {
            c.iter().filter(|(k, _)| k.of() == (index, gen)).fold(
                (0, 0),
                |(b, n), (k, _)| match k {
                    Key::Block(_) => (b + 1, n),
                    Key::Codes(_) => (b, n + 1),
                    Key::Run(_) | Key::Rows(..) | Key::Head(_) => (b, n),
                },
            )
        })
    }

    /// What the cache may hold now: the budget less what is lent out.
    pub(crate) fn capacity(&self) -> u64 {
        self.budget.saturating_sub(self.reserved.load(Relaxed))
    }

    /// Bytes of the budget lent out now.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Relaxed)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            bytes: self.inner.as_ref().map_or(0, |c| c.weight()),
            budget: self.budget,
            reserved: self.reserved.load(Relaxed),
            blocks: self.inner.as_ref().map_or(0, |c| c.len() as u64),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
        }
    }
}

/// Budget lent out by [`BlockCache::reserve`], returned on drop.
pub(crate) struct Reservation<'a> {
    cache: &'a BlockCache,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.cache.reserved.fetch_sub(self.bytes, Relaxed);
        self.cache.resize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_shrinks_the_cache_until_it_drops() {
        let c = BlockCache::new(64 << 20);
        let key = |block: u32| BlockKey {
            index: [1; 16],
            gen: 0,
            list: 0,
            block,
            epoch: 1,
        };
        let blk = |n: usize| {
            let mut b = Block::with_capacity(n, 128, super::super::Precision::F32);
            for i in 0..n {
                b.push(i.to_string(), &[0.5; 128], None, 0);
            }
            let (b, _) = Block::decode(&b.encode(128, super::super::Precision::F32)).unwrap();
            Arc::new(b)
        };
        for i in 0..200 {
            c.insert(key(i), blk(100));
        }
        let full = c.stats().bytes;
        assert!(full > 8 << 20 && full <= 64 << 20, "{full}");
        {
            let _r = c.reserve(60 << 20);
            assert_eq!(c.reserved(), 60 << 20);
            assert!(c.stats().bytes <= 4 << 20, "{:?}", c.stats());
        }
        assert_eq!(c.reserved(), 0);
        for i in 0..200 {
            c.insert(key(i), blk(100));
        }
        assert!(c.stats().bytes > 8 << 20, "the whole budget is back");
    }
}
