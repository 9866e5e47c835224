//! One open index: its keys, the resident directory of its posting lists, and every
//! operation on it. Posting-list blocks live in the store and are decrypted on demand through
//! the shared [`BlockCache`]; an item's block is found through its position record.
//!
//! Concurrency: `writer` serialises everything that changes the index (upsert, delete, the
//! final step of training, deleting the index). A writer prepares its change under a *read*
//! lock of `data` (queries keep running), writes it to the store in one atomic batch, and only
//! then takes the write lock for the moment it needs to install the change in memory. So a
//! failed store write leaves memory untouched, and memory never shows what the store lacks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use sealdb_plugin_api::{IndexStore, WriteBatch};
use serde_json::Value;

use super::cache::{BlockCache, BlockKey};
use super::distance::{self, Metric, Quant};
use super::filter::Filter;
use super::format::{self as fmt, IndexId, Reader, Writer};
use super::kmeans::{self, KMeansParams};
use super::progress::{Phase, Progress};
use super::{EngineError, IndexConfig, Precision};
use crate::keys::{self, Dek, IndexKeys, Kek};

/// Hash maps keyed by ids and block coordinates: foldhash is several times faster than SipHash
/// on short keys and still seeded per process, so clients cannot precompute collisions.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

mod block;
mod idfilter;
mod search;
mod state;
mod train;

pub use block::Block;
use block::{code_block, wants_quant, BlockMeta, ListDir, BLOCK_BYTES};
pub(crate) use state::State;
use state::{apply_pages, PageChanges, PageId};

/// Everything about the index that changes and stays resident: the state record's facts,
/// the centroids and the directory of blocks (no vectors, ids or metadata).
#[derive(Default)]
pub(crate) struct Data {
    pub dimension: u32,
    pub gen: u32,
    pub trained: bool,
    /// Calibrated default `n_probes` (0 = use the formula).
    pub default_probes: u32,
    /// Write epoch of the state record: bumped by every batch that changes the index.
    pub epoch: u64,
    /// Digest of the meta record the state record vouches for.
    pub meta_digest: [u8; 32],
    centroids: Vec<f32>,
    lists: Vec<ListDir>,
    count: usize,
    /// Epoch of every manifest page of generation `gen`.
    pages: BTreeMap<PageId, u64>,
}

impl Data {
    pub fn n_lists(&self) -> usize {
        self.lists.len().max(1)
    }
    pub fn count(&self) -> usize {
        self.count
    }
    fn meta_of(&self, list: u32, block: u32) -> Option<&BlockMeta> {
        self.lists.get(list as usize)?.blocks.get(&block)
    }
}

/// An item's row: its block and position (`None` = not in the index).
type Row = Option<(Arc<Block>, usize)>;

/// Blocks fetched for one request, by `(list, block)`.
type Blocks = HashMap<(u32, u32), Arc<Block>>;

/// A block with its number in its list.
type BlockAt = (u32, Arc<Block>);

/// One list's blocks as read, in block order.
type ListRead = Vec<BlockAt>;

/// The blocks of some lists, each list in block order (what a query probed).
#[derive(Default)]
pub(crate) struct ListBlocks {
    lists: HashMap<u32, Vec<(u32, Arc<Block>)>>,
}

impl ListBlocks {
    pub(crate) fn get(&self, list: u32, block: u32) -> Option<&Arc<Block>> {
        let v = self.lists.get(&list)?;
        v.binary_search_by_key(&block, |x| x.0)
            .ok()
            .map(|i| &v[i].1)
    }
    pub(crate) fn insert(&mut self, list: u32, blocks: Vec<(u32, Arc<Block>)>) {
        self.lists.insert(list, blocks);
    }
    /// Keep only the blocks `top`'s candidates point into, taking them from `runs` (blocks
    /// read after those already held, in list and block order).
    fn keep_referenced(&mut self, top: &search::TopK, runs: Vec<(usize, ListRead)>) {
        let wanted: HashSet<(u32, u32)> = top.referenced().collect();
        self.lists.retain(|&l, v| {
            v.retain(|(b, _)| wanted.contains(&(l, *b)));
            !v.is_empty()
        });
        for (li, run) in runs {
            for (b, blk) in run {
                if wanted.contains(&(li as u32, b)) {
                    self.lists.entry(li as u32).or_default().push((b, blk));
                }
            }
        }
    }
}

/// How a presented KEK is verified: by unwrapping the stored wrapped DEK with it (one
/// AES-GCM operation on 32 bytes) and comparing the result with the index's DEK.
/// Also remembers the index's KMS envelope, which changes together with the wrapped DEK.
pub(crate) struct KeyCheck {
    pub wrapped_dek: Vec<u8>,
    pub aad: Vec<u8>,
    pub envelope: Option<super::Envelope>,
}

/// What a request brings to open an index.
#[derive(Clone, Copy)]
pub enum Access<'a> {
    /// The index key as the client sent it (if it sent one).
    Kek(Option<&'a Kek>),
    /// A data key already unwrapped from an RBAC user grant.
    Dek(&'a Dek),
}

/// What an item looks like on the way in.
pub struct NewItem {
    pub id: String,
    pub vector: Vec<f32>,
    pub metadata: Option<serde_json::Map<String, Value>>,
    pub contents: Option<String>,
}

/// Which optional fields a query or get should return.
#[derive(Debug, Clone, Copy, Default)]
pub struct Include {
    pub distance: bool,
    pub metadata: bool,
    pub vector: bool,
    pub contents: bool,
}

impl Include {
    /// Everything an item stores (what `get` returns when the request names no fields).
    pub const STORED: Include = Include {
        distance: false,
        metadata: true,
        vector: true,
        contents: true,
    };
}

/// One search result.
#[derive(Debug, Clone)]
pub struct Hit {
    pub id: String,
    pub distance: f32,
    pub metadata: Option<Arc<Value>>,
    pub vector: Option<Vec<f32>>,
    pub contents: Option<String>,
    /// The epoch of the item's contents record (0 = none), for reading contents.
    pub(crate) cepoch: u64,
}

/// One `get` result.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub id: String,
    pub metadata: Option<Arc<Value>>,
    pub vector: Option<Vec<f32>>,
    pub contents: Option<String>,
    pub(crate) cepoch: u64,
}

/// Search knobs, resolved by the caller.
#[derive(Debug, Clone)]
pub struct SearchParams {
    pub top_k: usize,
    pub n_probes: Option<usize>,
    pub greedy: bool,
    pub filter: Option<Filter>,
    pub include: Include,
}

/// Training knobs; `None` means "choose".
#[derive(Debug, Clone, Default)]
pub struct TrainParams {
    pub n_lists: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_iters: Option<usize>,
    pub tolerance: Option<f64>,
    pub max_memory_mb: Option<usize>,
    /// Give up (with [`CancelReason::TimeLimit`]) once this much time has passed.
    pub time_limit: Option<std::time::Duration>,
}

/// Why a training stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// A newer train request for the same index took over.
    Superseded,
    /// The index is being deleted.
    Deleted,
    /// The server is shutting down.
    Shutdown,
    /// The training ran past its time limit.
    TimeLimit(std::time::Duration),
    /// (Background training only) another training of the index is running.
    Busy,
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Superseded => f.write_str("a newer train request for this index took over"),
            Self::Deleted => f.write_str("the index is being deleted"),
            Self::Shutdown => f.write_str("the server is shutting down"),
            Self::TimeLimit(d) => write!(
                f,
                "training ran past the limit of {} s (--max-train-seconds / SEALDB_MAX_TRAIN_SECONDS)",
                d.as_secs()
            ),
            Self::Busy => f.write_str("another training of this index is running"),
        }
    }
}

/// Auto `n_lists`: the power of two nearest to sqrt(n) (on a log scale), between 1 and 65536.
pub fn auto_n_lists(n: usize) -> usize {
    if n < 4 {
        return 1;
    }
    let root = (n as f64).sqrt();
    let exp = root.log2().round().clamp(0.0, 16.0) as u32;
    1usize << exp
}

/// Auto `n_probes` for a trained index.
pub fn auto_n_probes(n_lists: usize) -> usize {
    (n_lists / 8).clamp(8.min(n_lists), 256).max(1)
}

/// An open index.
pub struct Index {
    pub name: String,
    pub id: IndexId,
    pub config: IndexConfig,
    pub(crate) keys: IndexKeys,
    dek: Dek,
    key_check: RwLock<KeyCheck>,
    store: Arc<dyn IndexStore>,
    cache: Arc<BlockCache>,
    writer: Mutex<()>,
    training: Mutex<()>,
    /// Bumped by every superseding train request and by delete: a running training whose
    /// number no longer matches stops at its next check.
    train_epoch: AtomicU64,
    /// The engine's shutdown flag: set, every training stops at its next check.
    shutdown: Arc<AtomicBool>,
    data: RwLock<Data>,
    /// Odd while a write is between its store write and its install (see `consistent`).
    write_seq: AtomicU64,
    /// Which ids may exist (writers only; built on the first upsert, dropped by training).
    id_filter: Mutex<Option<idfilter::IdFilter>>,
    deleted: AtomicBool,
    /// The running training's progress, if one runs.
    pub(crate) progress: Mutex<Option<Arc<super::progress::Progress>>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct UpsertPlan {
    touched: HashMap<(u32, u32), Block>,
    pages: PageChanges,
    /// Locators of the items the batch adds.
    added: Vec<[u8; 16]>,
    dimension: u32,
    epoch: u64,
}

/// Blocks one scan reads (and holds) at a time: about 56 MiB of 56 KiB blocks. Unit tests
/// use 3, so that every scan in them spans several chunks.
const READ_CHUNK_BLOCKS: usize = if cfg!(test) { 3 } else { 1024 };

thread_local! {
    /// Hits through directory pointers on this thread (see [`block::TOUCH_EVERY`]).
    static TOUCHES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// How often a reader that keeps meeting writes in flight reads again before it reports the
/// mismatch.
const RACE_RETRIES: usize = 64;

/// Makes `write_seq` even again when a write's store-and-install window closes.
pub(crate) struct WriteWindow<'a>(&'a AtomicU64);

impl Drop for WriteWindow<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// How long a reader that met a batch stored but not yet installed waits for its writer
/// before it looks again.
const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Index {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        name: String,
        id: IndexId,
        config: IndexConfig,
        dek: Dek,
        key_check: KeyCheck,
        store: Arc<dyn IndexStore>,
        cache: Arc<BlockCache>,
        data: Data,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        Self {
            name,
            config,
            keys: IndexKeys::derive(&dek),
            dek,
            id,
            key_check: RwLock::new(key_check),
            store,
            cache,
            writer: Mutex::new(()),
            training: Mutex::new(()),
            train_epoch: AtomicU64::new(0),
            shutdown,
            data: RwLock::new(data),
            write_seq: AtomicU64::new(0),
            id_filter: Mutex::new(None),
            deleted: AtomicBool::new(false),
            progress: Mutex::new(None),
        }
    }

    /// Load the resident part of an index (state record, centroids, quantisers): no block
    /// is read. The meta record must be the one the state record vouches for; every block is
    /// checked against the manifest's epoch when it is read.
    pub(crate) fn load_data(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        angular: bool,
        meta_digest: [u8; 32],
    ) -> Result<Data, EngineError> {
        let integrity = |what: String| EngineError::Integrity {
            index: name.to_owned(),
            what,
        };
        let sk = fmt::state_key(id);
        let sealed = store
            .get(&sk)?
            .ok_or_else(|| integrity("the state record is missing".into()))?;
        let decoded = State::decode(
            &keys
                .open(&fmt::aad(&sk), &sealed)
                .map_err(|_| integrity("the state record failed authentication".into()))?,
        )?;
        let mut st = decoded.state;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &st.meta_digest[..],
            &meta_digest[..],
        )) {
            return Err(integrity(
                "the meta record is not the one the state record vouches for (replaced or rolled back)".into(),
            ));
        }
        let manifest: Vec<state::Entry> = match decoded.legacy_manifest {
            Some(legacy) => {
                let (upgraded, manifest) =
                    Self::upgrade_v3(store, name, id, keys, angular, st, &legacy)?;
                st = upgraded;
                manifest
            }
            None => {
                let pkeys: Vec<Vec<u8>> = st
                    .pages
                    .iter()
                    .map(|&(lg, bg, _)| fmt::page_key(id, st.gen, lg, bg))
                    .collect();
                let values = store.get_many(&pkeys)?;
                let mut all = Vec::new();
                for ((&(lg, bg, e), k), v) in st.pages.iter().zip(&pkeys).zip(values) {
                    let v =
                        v.ok_or_else(|| integrity(format!("manifest page {lg}/{bg} is missing")))?;
                    let plain = keys.open(&fmt::aad_at(k, e), &v).map_err(|_| {
                        integrity(format!(
                            "manifest page {lg}/{bg} failed authentication at epoch {e} (altered, swapped or rolled back)"
                        ))
                    })?;
                    all.extend(state::decode_page(&plain, (lg, bg))?);
                }
                all
            }
        };
        let n_lists = st.n_lists.max(1) as usize;
        let mut data = Data {
            dimension: st.dimension,
            gen: st.gen,
            trained: st.trained,
            default_probes: st.default_probes,
            epoch: st.epoch,
            meta_digest,
            lists: vec![ListDir::default(); n_lists],
            ..Data::default()
        };
        let dim = st.dimension as usize;
        if st.trained {
            let ck = fmt::centroids_key(id, st.gen);
            let sealed = store
                .get(&ck)?
                .ok_or_else(|| integrity("the centroids record is missing".into()))?;
            let raw = keys
                .open(&fmt::aad(&ck), &sealed)
                .map_err(|_| integrity("the centroids record failed authentication".into()))?;
            data.centroids = Precision::F32.decode(&raw, n_lists * dim)?;
            if wants_quant(true, st.default_probes, n_lists) {
                let qk = fmt::quant_key(id, st.gen);
                let sealed = store
                    .get(&qk)?
                    .ok_or_else(|| integrity("the quantiser record is missing".into()))?;
                let raw = keys
                    .open(&fmt::aad(&qk), &sealed)
                    .map_err(|_| integrity("the quantiser record failed authentication".into()))?;
                for (l, q) in decode_quants(&raw, n_lists, dim)?.into_iter().enumerate() {
                    data.lists[l].quant = q.map(Arc::new);
                }
            }
        }
        data.pages = st.pages.iter().map(|&(lg, bg, e)| ((lg, bg), e)).collect();
        for &(l, b, epoch, rows) in &manifest {
            let pl = data.lists.get_mut(l as usize).ok_or_else(|| {
                EngineError::Corrupt("manifest names a list that does not exist".into())
            })?;
            if rows == 0 || pl.blocks.insert(b, BlockMeta::new(epoch, rows)).is_some() {
                return Err(EngineError::Corrupt(format!(
                    "manifest entry {l}/{b} is empty or repeated"
                )));
            }
            data.count += rows as usize;
        }
        Ok(data)
    }

    /// Upgrade an index written before position records (state record v3): read every
    /// block once (each checked at its manifest epoch), write the position records of its
    /// items in bounded batches, then the manifest pages and the state record v4. A crash in
    /// between leaves the v3 state in charge, and the next open starts over.
    fn upgrade_v3(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        angular: bool,
        mut st: State,
        legacy: &[(u32, u32, u64)],
    ) -> Result<(State, Vec<state::Entry>), EngineError> {
        let n_lists = st.n_lists.max(1) as usize;
        let dim = st.dimension as usize;
        let quant = wants_quant(st.trained, st.default_probes, n_lists);
        let mut bounds = vec![distance::QuantBounds::new(dim); if quant { n_lists } else { 0 }];
        tracing::info!(index = %name, blocks = legacy.len(), "upgrading the index to position records and manifest pages");
        let per_read = (64usize << 20) / BLOCK_BYTES;
        let mut manifest = Vec::with_capacity(legacy.len());
        for chunk in legacy.chunks(per_read) {
            let bkeys: Vec<Vec<u8>> = chunk
                .iter()
                .map(|&(l, b, _)| fmt::block_key(id, st.gen, l, b))
                .collect();
            let values = store.get_many(&bkeys)?;
            type Done = ((u32, u32, u64, u32), Vec<(Vec<u8>, Vec<u8>)>, Block);
            let done: Vec<Done> = chunk
                .par_iter()
                .zip(bkeys.par_iter().zip(values.into_par_iter()))
                .map(|(&(l, b, e), (k, v))| {
                    let fail = |what: &str| EngineError::Integrity {
                        index: name.to_owned(),
                        what: format!("block {l}/{b} {what}"),
                    };
                    let v = v.ok_or_else(|| fail("is missing"))?;
                    let plain = keys
                        .open(&fmt::aad_at(k, e), &v)
                        .map_err(|_| fail("failed authentication"))?;
                    let (blk, _) = Block::decode(&plain)?;
                    let pos = blk
                        .ids
                        .iter()
                        .map(|item| {
                            let loc = keys.id_locator(item);
                            (
                                fmt::pos_key(id, st.gen, &loc),
                                keys.seal_position(&loc, st.gen, l, b).to_vec(),
                            )
                        })
                        .collect();
                    Ok(((l, b, e, blk.len() as u32), pos, blk))
                })
                .collect::<Result<_, EngineError>>()?;
            let mut batch = WriteBatch::new();
            for (entry, pos, blk) in done {
                if let Some(qb) = bounds.get_mut(entry.0 as usize) {
                    for row in block::quant_rows(&blk, dim, angular).chunks_exact(dim.max(1)) {
                        qb.add(row);
                    }
                }
                if entry.3 > 0 {
                    manifest.push(entry);
                }
                for (k, v) in pos {
                    batch.put(k, v);
                }
            }
            store.write(batch)?;
        }
        let sk = fmt::state_key(id);
        let mut batch = WriteBatch::new();
        st.pages = state::put_all_pages(id, keys, st.gen, st.epoch, &manifest, &mut batch);
        if quant {
            let qs: Vec<Option<Quant>> = bounds
                .into_iter()
                .map(distance::QuantBounds::finish)
                .collect();
            let qk = fmt::quant_key(id, st.gen);
            batch.put(
                qk.clone(),
                keys.seal(&fmt::aad(&qk), &encode_quants(&qs, dim)),
            );
        }
        batch.put(sk.clone(), keys.seal(&fmt::aad(&sk), &st.encode()));
        store.write(batch)?;
        Ok((st, manifest))
    }

    /// `(cached blocks of quantised lists, those of them without codes)`.
    #[doc(hidden)]
    pub fn cached_codes(&self) -> (usize, usize) {
        let d = self.data.read();
        let dim = d.dimension as usize;
        let (mut n, mut bad) = (0, 0);
        for (l, pl) in d.lists.iter().enumerate() {
            if pl.quant.is_none() {
                continue;
            }
            for (&b, m) in &pl.blocks {
                if let Some(blk) = self.cache.get(&self.key_at(d.gen, l, b, m.epoch)) {
                    n += 1;
                    if blk.codes.len() != blk.len() * dim {
                        bad += 1;
                    }
                }
            }
        }
        (n, bad)
    }

    /// `(lists with a quantiser, lists, default probes)`.
    #[cfg(test)]
    pub(crate) fn quant_state(&self) -> (usize, usize, u32) {
        let d = self.data.read();
        let q = d.lists.iter().filter(|pl| pl.quant.is_some()).count();
        (q, d.lists.len(), d.default_probes)
    }

    /// The cache key of block `list/block` of generation `gen` at `epoch`.
    fn key_at(&self, gen: u32, list: usize, block: u32, epoch: u64) -> BlockKey {
        BlockKey {
            index: self.id,
            gen,
            list: list as u32,
            block,
            epoch,
        }
    }

    /// Read blocks at the epochs `want` gives, from the cache or else the store (one batched
    /// read for all misses, decrypted across cores). With `keep`, blocks read from the store
    /// enter the cache (bulk readers such as training and `list_ids` pass `false`).
    fn read_blocks(
        &self,
        gen: u32,
        want: &[(u32, u32, u64)],
        quant: &(dyn Fn(u32) -> Option<Arc<Quant>> + Sync),
        keep: bool,
    ) -> Result<Vec<Arc<Block>>, EngineError> {
        let key_of = |&(list, block, epoch): &(u32, u32, u64)| BlockKey {
            index: self.id,
            gen,
            list,
            block,
            epoch,
        };
        let mut out: Vec<Option<Arc<Block>>> =
            want.iter().map(|w| self.cache.get(&key_of(w))).collect();
        let missing: Vec<usize> = (0..want.len()).filter(|&i| out[i].is_none()).collect();
        self.cache.count(want.len() - missing.len(), missing.len());
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let keys: Vec<Vec<u8>> = missing
            .iter()
            .map(|&i| fmt::block_key(&self.id, gen, want[i].0, want[i].1))
            .collect();
        let values = self.store.get_many(&keys)?;
        let angular = self.config.metric.is_angular();
        let read: Vec<Arc<Block>> = missing
            .par_iter()
            .zip(keys.par_iter().zip(values.into_par_iter()))
            .map(|(&i, (k, v))| {
                let (l, b, epoch) = want[i];
                let v = v.ok_or_else(|| EngineError::Integrity {
                    index: self.name.clone(),
                    what: format!("block {l}/{b} is missing"),
                })?;
                let plain = self.keys.open(&fmt::aad_at(k, epoch), &v).map_err(|_| {
                    EngineError::Integrity {
                        index: self.name.clone(),
                        what: format!(
                            "block {l}/{b} failed authentication at epoch {epoch} (altered, swapped or rolled back)"
                        ),
                    }
                })?;
                let (mut blk, dim) = Block::decode(&plain)?;
                blk.epoch = epoch;
                if let Some(q) = quant(l) {
                    code_block(&q, &mut blk, dim, angular);
                }
                let blk = Arc::new(blk);
                if keep {
                    self.cache.insert(key_of(&want[i]), blk.clone());
                }
                Ok(blk)
            })
            .collect::<Result<_, EngineError>>()?;
        for (&i, blk) in missing.iter().zip(read) {
            out[i] = Some(blk);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Read the blocks `(list, block)` at the epochs the directory `d` holds.
    fn fetch(&self, d: &Data, refs: &[(u32, u32)], keep: bool) -> Result<Blocks, EngineError> {
        let mut want = Vec::with_capacity(refs.len());
        for &(l, b) in refs {
            let m = d.meta_of(l, b).ok_or_else(|| EngineError::Integrity {
                index: self.name.clone(),
                what: format!("block {l}/{b} is not in the manifest"),
            })?;
            want.push((l, b, m.epoch));
        }
        want.sort_unstable();
        want.dedup();
        let quant = |l: u32| d.lists.get(l as usize).and_then(|pl| pl.quant.clone());
        let blocks = self.read_blocks(d.gen, &want, &quant, keep)?;
        Ok(want
            .into_iter()
            .map(|(l, b, _)| (l, b))
            .zip(blocks)
            .collect())
    }

    /// The blocks `refs` (`(list, block)`, any order; each must be in the directory) in
    /// that order: one cache lookup per block, one batched store read for all the misses.
    fn fetch_refs(
        &self,
        d: &Data,
        refs: &[(usize, u32)],
        keep: bool,
    ) -> Result<Vec<Arc<Block>>, EngineError> {
        let mut out: Vec<Option<Arc<Block>>> = Vec::with_capacity(refs.len());
        let mut missing: Vec<(usize, &BlockMeta)> = Vec::new();
        let mut want: Vec<(u32, u32, u64)> = Vec::new();
        for (i, &(li, b)) in refs.iter().enumerate() {
            let m = d
                .lists
                .get(li)
                .and_then(|pl| pl.blocks.get(&b))
                .ok_or_else(|| EngineError::Integrity {
                    index: self.name.clone(),
                    what: format!("block {li}/{b} is not in the manifest"),
                })?;
            let key = BlockKey {
                index: self.id,
                gen: d.gen,
                list: li as u32,
                block: b,
                epoch: m.epoch,
            };
            let got = match m.hot() {
                Some(blk) => {
                    if TOUCHES.with(|t| {
                        let n = t.get().wrapping_add(1);
                        t.set(n);
                        n % block::TOUCH_EVERY == 0
                    }) {
                        self.cache.get(&key);
                    }
                    Some(blk)
                }
                None => {
                    let got = self.cache.get(&key);
                    if let Some(blk) = &got {
                        m.set_hot(blk);
                    }
                    got
                }
            };
            if got.is_none() {
                missing.push((i, m));
                want.push((li as u32, b, m.epoch));
            }
            out.push(got);
        }
        self.cache.count(refs.len() - missing.len(), 0);
        if !want.is_empty() {
            let quant = |l: u32| d.lists.get(l as usize).and_then(|pl| pl.quant.clone());
            // read_blocks counts the misses (it finds them missing again).
            let read = self.read_blocks(d.gen, &want, &quant, keep)?;
            for ((i, m), blk) in missing.into_iter().zip(read) {
                if keep {
                    m.set_hot(&blk);
                }
                out[i] = Some(blk);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// `(list, block)` of every block of `lists`, list by list in block order.
    fn list_refs(d: &Data, lists: &[usize]) -> Vec<(usize, u32)> {
        lists
            .iter()
            .flat_map(|&li| {
                d.lists
                    .get(li)
                    .into_iter()
                    .flat_map(move |pl| pl.blocks.keys().map(move |&b| (li, b)))
            })
            .collect()
    }

    /// Read `refs` a chunk of at most [`READ_CHUNK_BLOCKS`] at a time, handing each chunk to
    /// `f` as runs of consecutive blocks of one list; a chunk's blocks are dropped (unless
    /// the cache keeps them) before the next is read, so a scan of any size holds one chunk.
    fn for_chunks(
        &self,
        d: &Data,
        refs: &[(usize, u32)],
        keep: bool,
        mut f: impl FnMut(Vec<(usize, ListRead)>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        for chunk in refs.chunks(READ_CHUNK_BLOCKS) {
            let blocks = self.fetch_refs(d, chunk, keep)?;
            let mut runs: Vec<(usize, ListRead)> = Vec::new();
            for (&(li, b), blk) in chunk.iter().zip(blocks) {
                match runs.last_mut() {
                    Some((l, run)) if *l == li => run.push((b, blk)),
                    _ => runs.push((li, vec![(b, blk)])),
                }
            }
            f(runs)?;
        }
        Ok(())
    }

    /// Run a reader on a consistent view. A writer stores its batch before it installs it in
    /// memory, so a reader can meet a record newer than the directory it holds; such a
    /// mismatch is an integrity error only if it persists after the writer finished.
    ///
    /// `write_seq` tells the two apart: a writer makes it odd before its store write and even
    /// again after it installed the batch, so a reader whose view could have met a newer
    /// record saw it odd, or saw it change, while it read. Such a reader waits for the
    /// writer and reads again (every retry means another write landed meanwhile); a mismatch
    /// with no write in flight is reported at once.
    fn consistent<T>(&self, f: impl Fn(&Data) -> Result<T, EngineError>) -> Result<T, EngineError> {
        let mut tries = 0;
        loop {
            let s0 = self.write_seq.load(Ordering::SeqCst);
            let r = f(&self.data.read());
            match r {
                Err(EngineError::Integrity { .. }) if tries < RACE_RETRIES && self.raced(s0) => {
                    tries += 1;
                    self.wait_for_writer();
                }
                r => return r,
            }
        }
    }

    /// Whether a write was in flight at some point since `write_seq` read `s0`.
    fn raced(&self, s0: u64) -> bool {
        s0 % 2 == 1 || self.write_seq.load(Ordering::SeqCst) != s0
    }

    /// Wait (briefly) until no write is between its store write and its install.
    fn wait_for_writer(&self) {
        let until = std::time::Instant::now() + WRITER_WAIT;
        while self.write_seq.load(Ordering::SeqCst) % 2 == 1 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Mark a write in flight from now until the returned guard drops (after the install).
    pub(crate) fn write_window(&self) -> WriteWindow<'_> {
        self.write_seq.fetch_add(1, Ordering::SeqCst);
        WriteWindow(&self.write_seq)
    }

    /// Where each item sits in generation `gen` (`None` = not in the index), from the
    /// position records.
    fn positions(
        &self,
        gen: u32,
        locators: &[[u8; 16]],
    ) -> Result<Vec<Option<(u32, u32)>>, EngineError> {
        let keys: Vec<Vec<u8>> = locators
            .iter()
            .map(|l| fmt::pos_key(&self.id, gen, l))
            .collect();
        let values = self.store.get_many(&keys)?;
        locators
            .iter()
            .zip(values)
            .map(|(loc, v)| {
                let Some(v) = v else { return Ok(None) };
                self.keys
                    .open_position(loc, gen, &v)
                    .map(Some)
                    .map_err(|_| EngineError::Integrity {
                        index: self.name.clone(),
                        what: "a position record failed authentication".into(),
                    })
            })
            .collect()
    }

    /// The position record of an item at `(list, block)` in generation `gen`.
    fn seal_position(
        &self,
        gen: u32,
        locator: &[u8; 16],
        list: u32,
        block: u32,
    ) -> (Vec<u8>, Vec<u8>) {
        (
            fmt::pos_key(&self.id, gen, locator),
            self.keys.seal_position(locator, gen, list, block).to_vec(),
        )
    }

    fn locators(&self, ids: &[&str]) -> Vec<[u8; 16]> {
        ids.par_iter()
            .with_min_len(256)
            .map(|id| self.keys.id_locator(id))
            .collect()
    }

    /// An item that a position record puts in a block without it: the record or the block
    /// was tampered with.
    fn misplaced(&self, id: &str) -> EngineError {
        EngineError::Integrity {
            index: self.name.clone(),
            what: format!("item '{id}' is not in the block its position record names"),
        }
    }

    /// Memory held by the open index itself, outside the block cache: centroids,
    /// quantisers and the block directory.
    pub fn approx_bytes(&self) -> usize {
        let d = self.data.read();
        let blocks: usize = d.lists.iter().map(|pl| pl.blocks.len()).sum();
        let quants = d.lists.iter().filter(|pl| pl.quant.is_some()).count();
        let filter = self
            .id_filter
            .try_lock()
            .and_then(|f| f.as_ref().map(|f| f.bytes()))
            .unwrap_or(0);
        filter
            + d.centroids.len() * 4
            + blocks * 48
            + d.lists.len() * 64
            + quants * (d.dimension as usize * 4 + 32)
    }

    /// The index's data key (for minting RBAC user grants).
    pub(crate) fn dek(&self) -> &Dek {
        &self.dek
    }

    /// Check the key a request brought against the index's data key, in constant time.
    pub(crate) fn check_access(&self, access: Access<'_>) -> Result<(), EngineError> {
        let ok = match access {
            Access::Dek(d) => d.ct_eq(&self.dek),
            Access::Kek(None) => return Err(EngineError::MissingKey(self.name.clone())),
            Access::Kek(Some(k)) => {
                let kc = self.key_check.read();
                keys::unwrap_dek(k, &kc.wrapped_dek, &kc.aad).is_ok_and(|d| d.ct_eq(&self.dek))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(EngineError::WrongKey(self.name.clone()))
        }
    }

    /// Where this index's KEK comes from.
    pub(crate) fn key_source(&self) -> super::KeySource {
        match &self.key_check.read().envelope {
            None => super::KeySource::Client,
            Some(e) => super::KeySource::Kms(e.clone()),
        }
    }

    /// After a rewrap was stored: verify presented keys against the new wrap.
    pub(crate) fn set_key_check(&self, kc: KeyCheck) {
        *self.key_check.write() = kc;
    }

    pub(crate) fn ensure_live(&self) -> Result<(), EngineError> {
        if self.deleted.load(Ordering::Acquire) {
            Err(EngineError::NotFound(self.name.clone()))
        } else {
            Ok(())
        }
    }

    /// Stop a running training of this index at its next check (it fails with
    /// [`CancelReason::Superseded`] unless a more specific reason applies).
    pub(crate) fn cancel_training(&self) {
        self.train_epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn mark_deleted(&self) -> parking_lot::MutexGuard<'_, ()> {
        let g = self.writer.lock();
        self.deleted.store(true, Ordering::Release);
        g
    }

    /// A consistent read view of the index.
    pub(crate) fn read(&self) -> parking_lot::RwLockReadGuard<'_, Data> {
        self.data.read()
    }

    fn block_cap(dim: usize, precision: Precision) -> usize {
        (BLOCK_BYTES / (dim.max(1) * precision.bytes())).clamp(16, 4096)
    }

    #[allow(clippy::too_many_arguments)]
    fn seal_block(
        &self,
        gen: u32,
        list: u32,
        bno: u32,
        block: &mut Block,
        dim: usize,
        epoch: u64,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = fmt::block_key(&self.id, gen, list, bno);
        let sealed = self.keys.seal(
            &fmt::aad_at(&key, epoch),
            &block.encode(dim, self.config.precision),
        );
        (key, sealed)
    }

    /// Put the state record for a batch at `epoch` into `batch`.
    fn put_state(&self, batch: &mut WriteBatch, st: &State) {
        let sk = fmt::state_key(&self.id);
        batch.put(sk.clone(), self.keys.seal(&fmt::aad(&sk), &st.encode()));
    }

    /// A rewrap changes the meta record: the state record must vouch for the new one, in the
    /// same batch. Call with the writer lock held ([`Self::lock_writer`]); `apply` after the
    /// batch is stored.
    pub(crate) fn state_for_meta(&self, meta_digest: [u8; 32]) -> (u64, Vec<u8>, Vec<u8>) {
        let d = self.data.read();
        let epoch = d.epoch + 1;
        let st = State::of(&d, d.dimension, epoch, meta_digest, &d.pages);
        let sk = fmt::state_key(&self.id);
        let v = self.keys.seal(&fmt::aad(&sk), &st.encode());
        (epoch, sk, v)
    }

    /// Record in memory what [`Self::state_for_meta`] stored.
    pub(crate) fn apply_meta(&self, epoch: u64, meta_digest: [u8; 32]) {
        let mut d = self.data.write();
        d.epoch = epoch;
        d.meta_digest = meta_digest;
    }

    /// Serialise with upserts, deletes and training's final step.
    pub(crate) fn lock_writer(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.writer.lock()
    }

    fn assign_list(&self, d: &Data, v: &[f32]) -> u32 {
        if !d.trained || d.lists.len() <= 1 {
            return 0;
        }
        let dim = d.dimension as usize;
        if self.config.metric.is_angular() {
            kmeans::nearest(&distance::normalized(v), &d.centroids, dim).0 as u32
        } else {
            kmeans::nearest(v, &d.centroids, dim).0 as u32
        }
    }

    /// Insert or overwrite items. All items are validated first; on any error nothing is
    /// written. Returns the number of vectors the index now holds.
    pub fn upsert(&self, mut items: Vec<NewItem>) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        if let Some(it) = items.iter().find(|it| has_non_finite(&it.vector)) {
            return Err(EngineError::Invalid(format!(
                "item '{}' has a NaN or infinite component",
                it.id
            )));
        }
        // Stored precision next (in place, across cores): from here on every vector is
        // exactly what a later read will return.
        let precision = self.config.precision;
        if precision != Precision::F32 {
            if let Some(it) = items
                .par_iter_mut()
                .with_min_len(64)
                .map(|it| {
                    precision.round_in_place(&mut it.vector);
                    it
                })
                .find_first(|it| has_non_finite(&it.vector))
            {
                return Err(EngineError::Invalid(format!(
                    "item '{}' has a component beyond float16's range (+-65504)",
                    it.id
                )));
            }
        }
        // Later duplicates of an id win, as if the items were upserted one by one.
        let items: Vec<NewItem> = {
            let mut last: HashMap<&str, usize> =
                HashMap::with_capacity_and_hasher(items.len(), Default::default());
            for (i, it) in items.iter().enumerate() {
                last.insert(it.id.as_str(), i);
            }
            let keep: Vec<bool> = items
                .iter()
                .enumerate()
                .map(|(i, it)| last[it.id.as_str()] == i)
                .collect();
            items
                .into_iter()
                .zip(keep)
                .filter_map(|(it, k)| k.then_some(it))
                .collect()
        };
        let plan;
        let mut batch = WriteBatch::new();
        {
            let d = self.data.read();
            let mut dimension = d.dimension;
            for it in &items {
                if it.id.is_empty() {
                    return Err(EngineError::Invalid("item ids must not be empty".into()));
                }
                if dimension == 0 {
                    dimension = it.vector.len() as u32;
                    if dimension == 0 {
                        return Err(EngineError::Invalid(format!(
                            "item '{}' has an empty vector",
                            it.id
                        )));
                    }
                }
                if it.vector.len() != dimension as usize {
                    return Err(EngineError::Invalid(format!(
                        "item '{}' has {} dimensions but index '{}' has {}; nothing was written",
                        it.id,
                        it.vector.len(),
                        self.name,
                        dimension
                    )));
                }
            }
            let dim = dimension as usize;
            let cap = Self::block_cap(dim, self.config.precision);
            let epoch = d.epoch + 1;
            let ids: Vec<&str> = items.iter().map(|it| it.id.as_str()).collect();
            let locators = self.locators(&ids);
            // Position records are read only for ids the filter cannot rule out.
            let old = {
                let mut filter = self.id_filter.lock();
                if !filter.as_ref().is_some_and(|f| f.has_room(items.len())) {
                    *filter = Some(self.build_filter(d.gen, d.count() + items.len())?);
                }
                let f = filter.as_ref().expect("built above");
                let maybe: Vec<usize> = (0..locators.len())
                    .filter(|&i| f.may_contain(&locators[i]))
                    .collect();
                let probe: Vec<[u8; 16]> = maybe.iter().map(|&i| locators[i]).collect();
                let found = self.positions(d.gen, &probe)?;
                let mut old = vec![None; locators.len()];
                for (i, at) in maybe.into_iter().zip(found) {
                    old[i] = at;
                }
                old
            };
            let lists: Vec<u32> = if dimension == d.dimension {
                items
                    .par_iter()
                    .with_min_len(64)
                    .map(|it| self.assign_list(&d, &it.vector))
                    .collect()
            } else {
                vec![0; items.len()]
            };
            // The blocks this batch changes: the old homes of overwritten items, and the last
            // block of every list that receives items.
            let last_block = |l: u32| {
                d.lists
                    .get(l as usize)
                    .and_then(|pl| pl.blocks.keys().next_back().copied())
            };
            let mut needed: Vec<(u32, u32)> = old.iter().flatten().copied().collect();
            let mut seen_lists: HashSet<u32> = HashSet::default();
            for &l in &lists {
                if seen_lists.insert(l) {
                    if let Some(b) = last_block(l) {
                        needed.push((l, b));
                    }
                }
            }
            let have = self.fetch(&d, &needed, true)?;
            let copy = |l: u32, b: u32| {
                have.get(&(l, b))
                    .map(|x| x.clone_with_room(cap.saturating_sub(x.len()), dim))
            };
            let mut touched: HashMap<(u32, u32), Block> = HashMap::default();
            let mut tails: HashMap<u32, u32> = HashMap::default();
            // Item records are sealed across cores after the placement loop.
            let mut contents: Vec<Option<(String, String)>> = Vec::new();
            for (i, it) in items.into_iter().enumerate() {
                if let Some((l, b)) = old[i] {
                    let blk = touched
                        .entry((l, b))
                        .or_insert_with(|| copy(l, b).unwrap_or_default());
                    let pos = blk.position(&it.id).ok_or_else(|| self.misplaced(&it.id))?;
                    blk.swap_remove(pos, dim);
                }
                let list = lists[i];
                let tail = *tails
                    .entry(list)
                    .or_insert_with(|| last_block(list).unwrap_or(0));
                let mut bno = tail;
                let full = touched
                    .entry((list, bno))
                    .or_insert_with(|| {
                        copy(list, bno).unwrap_or_else(|| Block::with_capacity(cap, dim))
                    })
                    .len()
                    >= cap;
                if full {
                    bno = tail + 1;
                    tails.insert(list, bno);
                }
                let meta = it.metadata.map(|m| Arc::new(Value::Object(m)));
                let has_contents = it.contents.as_deref().is_some_and(|c| !c.is_empty());
                touched
                    .entry((list, bno))
                    .or_insert_with(|| Block::with_capacity(cap, dim))
                    .push(
                        it.id.clone(),
                        &it.vector,
                        meta,
                        if has_contents { epoch } else { 0 },
                    );
                match it.contents {
                    Some(c) if !c.is_empty() => {
                        contents.resize(i, None);
                        contents.push(Some((it.id, c)));
                    }
                    // An overwrite without contents drops the old contents; a new item has
                    // no item record to drop.
                    _ if old[i].is_some() => {
                        batch.delete(fmt::item_key(&self.id, &locators[i]));
                    }
                    _ => {}
                }
                if old[i] != Some((list, bno)) {
                    let (k, v) = self.seal_position(d.gen, &locators[i], list, bno);
                    batch.put(k, v);
                }
            }
            let records: Vec<(Vec<u8>, Vec<u8>)> = contents
                .par_iter()
                .enumerate()
                .with_min_len(64)
                .filter_map(|(i, c)| {
                    let (id, c) = c.as_ref()?;
                    let ik = fmt::item_key(&self.id, &locators[i]);
                    let mut w = Writer::with_capacity(8 + id.len() + c.len());
                    w.u8(1).bytes(id.as_bytes()).bytes(c.as_bytes());
                    let sealed = self.keys.seal(&fmt::aad_at(&ik, epoch), &w.0);
                    Some((ik, sealed))
                })
                .collect();
            drop(contents);
            for (k, v) in records {
                batch.put(k, v);
            }
            let gen = d.gen;
            let sealed: Vec<(Vec<u8>, Option<Vec<u8>>)> = touched
                .par_iter_mut()
                .map(|(&(l, b), blk)| {
                    if blk.len() == 0 {
                        (fmt::block_key(&self.id, gen, l, b), None)
                    } else {
                        let (k, v) = self.seal_block(gen, l, b, blk, dim, epoch);
                        (k, Some(v))
                    }
                })
                .collect();
            for (k, v) in sealed {
                match v {
                    Some(v) => batch.put(k, v),
                    None => batch.delete(k),
                };
            }
            let pages =
                self.put_state_after(&mut batch, &d, dimension, epoch, &touched, d.meta_digest);
            plan = UpsertPlan {
                touched,
                pages,
                added: locators
                    .iter()
                    .zip(&old)
                    .filter(|(_, o)| o.is_none())
                    .map(|(l, _)| *l)
                    .collect(),
                dimension,
                epoch,
            };
        }
        let _window = self.write_window();
        self.store.write(batch)?;
        let mut d = self.data.write();
        d.dimension = plan.dimension;
        d.epoch = plan.epoch;
        d.count += plan.added.len();
        if let Some(f) = self.id_filter.lock().as_mut() {
            for l in &plan.added {
                f.insert(l);
            }
        }
        apply_pages(&mut d.pages, &plan.pages);
        self.install(&mut d, plan.touched, plan.epoch);
        Ok(d.count())
    }

    /// Record in the directory (and the cache) the blocks a stored batch rewrote.
    fn install(&self, d: &mut Data, touched: HashMap<(u32, u32), Block>, epoch: u64) {
        let dim = d.dimension as usize;
        let angular = self.config.metric.is_angular();
        let gen = d.gen;
        for ((l, b), blk) in touched {
            if d.lists.len() <= l as usize {
                d.lists.resize(l as usize + 1, ListDir::default());
            }
            let pl = &mut d.lists[l as usize];
            if blk.len() == 0 {
                pl.blocks.remove(&b);
            } else {
                let mut blk = blk;
                blk.epoch = epoch;
                match &pl.quant {
                    Some(q) => code_block(q, &mut blk, dim, angular),
                    None => blk.codes = Vec::new(),
                }
                blk.shrink();
                let meta = BlockMeta::new(epoch, blk.len() as u32);
                let key = BlockKey {
                    index: self.id,
                    gen,
                    list: l,
                    block: b,
                    epoch,
                };
                let blk = Arc::new(blk);
                meta.set_hot(&blk);
                pl.blocks.insert(b, meta);
                self.cache.insert(key, blk);
            }
        }
    }

    /// Delete items by id; unknown ids are skipped. Returns how many were deleted.
    pub fn delete_ids(&self, ids: &[String]) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        let mut batch = WriteBatch::new();
        let (touched, pages, epoch, removed) = {
            let d = self.data.read();
            let dim = d.dimension as usize;
            let epoch = d.epoch + 1;
            let mut seen = HashSet::default();
            let ids: Vec<&str> = ids
                .iter()
                .map(String::as_str)
                .filter(|id| seen.insert(*id))
                .collect();
            let locators = self.locators(&ids);
            let at = self.positions(d.gen, &locators)?;
            let refs: Vec<(u32, u32)> = at.iter().flatten().copied().collect();
            let have = self.fetch(&d, &refs, true)?;
            let mut touched: HashMap<(u32, u32), Block> = HashMap::default();
            let mut removed = 0usize;
            for ((id, loc), at) in ids.iter().zip(&locators).zip(&at) {
                let Some((l, b)) = *at else { continue };
                let blk = touched.entry((l, b)).or_insert_with(|| {
                    have.get(&(l, b)).map(|x| (**x).clone()).unwrap_or_default()
                });
                let pos = blk.position(id).ok_or_else(|| self.misplaced(id))?;
                blk.swap_remove(pos, dim);
                batch.delete(fmt::item_key(&self.id, loc));
                batch.delete(fmt::pos_key(&self.id, d.gen, loc));
                removed += 1;
            }
            for (&(l, b), blk) in touched.iter_mut() {
                if blk.len() == 0 {
                    batch.delete(fmt::block_key(&self.id, d.gen, l, b));
                } else {
                    let (k, v) = self.seal_block(d.gen, l, b, blk, dim, epoch);
                    batch.put(k, v);
                }
            }
            let pages =
                self.put_state_after(&mut batch, &d, d.dimension, epoch, &touched, d.meta_digest);
            (touched, pages, epoch, removed)
        };
        if removed == 0 {
            return Ok(0);
        }
        let _window = self.write_window();
        self.store.write(batch)?;
        let mut d = self.data.write();
        d.epoch = epoch;
        d.count -= removed;
        apply_pages(&mut d.pages, &pages);
        self.install(&mut d, touched, epoch);
        Ok(removed)
    }

    /// Rows of `ids` as the view `d` has them: `(block, position)` per id, `None` for ids
    /// not in the index.
    fn rows_of(&self, d: &Data, ids: &[&str], keep: bool) -> Result<Vec<Row>, EngineError> {
        let at = self.positions(d.gen, &self.locators(ids))?;
        let refs: Vec<(u32, u32)> = at.iter().flatten().copied().collect();
        let have = self.fetch(d, &refs, keep)?;
        ids.iter()
            .zip(at)
            .map(|(id, at)| {
                let Some(lb) = at else { return Ok(None) };
                let blk = have.get(&lb).ok_or_else(|| self.misplaced(id))?;
                let pos = blk.position(id).ok_or_else(|| self.misplaced(id))?;
                Ok(Some((blk.clone(), pos)))
            })
            .collect()
    }

    /// Read the contents of items (empty string when none was stored) whose rows gave
    /// `epochs`. Each item record must be at the epoch its row records; a writer may have
    /// replaced it since the rows were read, so a mismatch is looked at again after the
    /// writer lets go before it counts as an integrity failure.
    fn contents_of(&self, ids: &[&str], epochs: &[u64]) -> Result<Vec<String>, EngineError> {
        let keys: Vec<Vec<u8>> = self
            .locators(ids)
            .iter()
            .map(|l| fmt::item_key(&self.id, l))
            .collect();
        let read = |epochs: &[u64], which: &[usize]| -> Result<Vec<Option<String>>, EngineError> {
            let wanted: Vec<Vec<u8>> = which
                .iter()
                .filter(|&&i| epochs[i] != 0)
                .map(|&i| keys[i].clone())
                .collect();
            let mut values = self.store.get_many(&wanted)?.into_iter();
            which
                .iter()
                .map(|&i| {
                    if epochs[i] == 0 {
                        return Ok(Some(String::new()));
                    }
                    let Some(sealed) = values.next().flatten() else {
                        return Ok(None);
                    };
                    let Ok(plain) = self.keys.open(&fmt::aad_at(&keys[i], epochs[i]), &sealed)
                    else {
                        return Ok(None);
                    };
                    let mut r = Reader::new(&plain, "item record");
                    r.u8()?;
                    r.bytes()?;
                    Ok(Some(r.str()?.to_owned()))
                })
                .collect()
        };
        let all: Vec<usize> = (0..ids.len()).collect();
        let first = read(epochs, &all)?;
        let mut retry: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| first[i].is_none())
            .collect();
        let mut out: Vec<Option<String>> = first;
        // The rows' epochs were read before this call: a mismatch may be a write that landed
        // since. Read those items' rows again, then their records; from then on a mismatch
        // counts only if no write was in flight meanwhile.
        let mut tries = 0;
        while !retry.is_empty() {
            let s0 = self.write_seq.load(Ordering::SeqCst);
            let again: Vec<&str> = retry.iter().map(|&i| ids[i]).collect();
            let rows = self.consistent(|d| self.rows_of(d, &again, true))?;
            let mut now = vec![0u64; ids.len()];
            for (&i, row) in retry.iter().zip(&rows) {
                now[i] = row.as_ref().map_or(0, |(b, p)| b.cepochs[*p]);
            }
            let second = read(&now, &retry)?;
            let mut still = Vec::new();
            for (&i, v) in retry.iter().zip(second) {
                match v {
                    Some(v) => out[i] = Some(v),
                    None => still.push(i),
                }
            }
            if let Some(&i) = still.first() {
                if tries >= RACE_RETRIES || !self.raced(s0) {
                    return Err(EngineError::Integrity {
                        index: self.name.clone(),
                        what: format!(
                            "the contents record of item '{}' is missing or not at its epoch (deleted, altered or rolled back)",
                            ids[i]
                        ),
                    });
                }
                tries += 1;
                self.wait_for_writer();
            }
            retry = still;
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Fetch items by id, in request order; unknown ids are omitted.
    pub fn get(&self, ids: &[String], include: Include) -> Result<Vec<Fetched>, EngineError> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        // A chunk of ids at a time, so a large get holds a bounded number of blocks.
        let mut out = self.consistent(|d| {
            let dim = d.dimension as usize;
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(READ_CHUNK_BLOCKS) {
                let rows = self.rows_of(d, chunk, true)?;
                out.extend(chunk.iter().zip(rows).filter_map(|(id, row)| {
                    let (blk, pos) = row?;
                    Some(Fetched {
                        id: (*id).to_owned(),
                        metadata: include.metadata.then(|| {
                            blk.meta[pos]
                                .clone()
                                .unwrap_or_else(|| Arc::new(Value::Object(Default::default())))
                        }),
                        vector: include.vector.then(|| blk.vector(pos, dim).to_vec()),
                        contents: None,
                        cepoch: blk.cepochs[pos],
                    })
                }));
            }
            Ok(out)
        })?;
        if include.contents && !out.is_empty() {
            let ids: Vec<&str> = out.iter().map(|f| f.id.as_str()).collect();
            let epochs: Vec<u64> = out.iter().map(|f| f.cepoch).collect();
            let contents = self.contents_of(&ids, &epochs)?;
            for (f, c) in out.iter_mut().zip(contents) {
                f.contents = Some(c);
            }
        }
        Ok(out)
    }

    /// Every id. Reads every block (through the cache, without filling it).
    pub fn list_ids(&self) -> Result<Vec<String>, EngineError> {
        self.consistent(|d| {
            let mut ids = Vec::with_capacity(d.count());
            let all: Vec<usize> = (0..d.lists.len()).collect();
            self.for_chunks(d, &Self::list_refs(d, &all), false, |runs| {
                for (_, run) in runs {
                    for (_, blk) in run {
                        ids.extend(blk.ids.iter().cloned());
                    }
                }
                Ok(())
            })?;
            Ok(ids)
        })
    }
}

/// Plaintext of the quantiser record: per list, a flag, then (when set) the step and the
/// per-dimension minimum (docs/FORMAT.md "Quantiser record").
pub(crate) fn encode_quants(lists: &[Option<Quant>], dim: usize) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + lists.len() * (5 + dim * 4));
    w.u8(1).u32(lists.len() as u32);
    for q in lists {
        match q {
            None => {
                w.u8(0);
            }
            Some(q) => {
                let (min, step) = q.params();
                w.u8(1).raw(&step.to_le_bytes());
                for x in min {
                    w.raw(&x.to_le_bytes());
                }
            }
        }
    }
    w.0
}

fn decode_quants(
    buf: &[u8],
    n_lists: usize,
    dim: usize,
) -> Result<Vec<Option<Quant>>, EngineError> {
    let bad = || EngineError::Corrupt("bad quantiser record".into());
    let mut r = Reader::new(buf, "quantiser record");
    if r.u8()? != 1 || r.u32()? as usize != n_lists {
        return Err(bad());
    }
    let f32_at = |r: &mut Reader<'_>| -> Result<f32, EngineError> {
        Ok(f32::from_le_bytes(
            r.take(4)?.try_into().map_err(|_| bad())?,
        ))
    };
    (0..n_lists)
        .map(|_| match r.u8()? {
            0 => Ok(None),
            1 => {
                let step = f32_at(&mut r)?;
                let min = (0..dim).map(|_| f32_at(&mut r)).collect::<Result<_, _>>()?;
                Quant::from_params(min, step).map(Some).ok_or_else(bad)
            }
            _ => Err(bad()),
        })
        .collect()
}

/// Whether `v` holds a NaN or an infinity (no early exit, so the loop vectorises).
fn has_non_finite(v: &[f32]) -> bool {
    v.iter().fold(false, |bad, x| bad | !x.is_finite())
}

/// Decoders of stored index data, for the fuzz harness (`crate::fuzz`).
#[cfg(test)]
pub(crate) fn fuzz_decoders(buf: &[u8]) {
    if let Ok((b, dim)) = Block::decode(buf) {
        // A decoded block must be internally consistent.
        assert_eq!(b.vecs.len(), b.len() * dim);
        assert_eq!(b.cepochs.len(), b.len());
        assert_eq!(b.meta.len(), b.len());
        assert_eq!(b.inv_norms.len(), b.len());
    }
    let _ = State::decode(buf);
    let _ = state::decode_page(buf, (0, 0));
}

/// [`state::encode_page`], for the layout test.
#[cfg(test)]
pub(crate) fn state_page_for_test(entries: &[(u32, u32, u64, u32)]) -> Vec<u8> {
    state::encode_page(entries)
}

/// Valid encodings to start mutating from.
#[cfg(test)]
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let mut b = Block::with_capacity(3, 4);
    b.push("a".into(), &[1.0, 2.0, 3.0, 4.0], None, 0);
    b.push(
        "bb".into(),
        &[0.5; 4],
        Some(Arc::new(serde_json::json!({"k": [1, "x"]}))),
        9,
    );
    b.push("ccc".into(), &[-1.0; 4], None, 2);
    let st = State {
        dimension: 4,
        gen: 1,
        trained: true,
        n_lists: 2,
        default_probes: 1,
        epoch: 5,
        meta_digest: [3; 32],
        pages: vec![(0, 0, 4), (0, 1, 5)],
    };
    vec![
        b.encode(4, Precision::F32),
        b.encode(4, Precision::F16),
        st.encode(),
        state::encode_page(&[(0, 0, 4, 3), (1, 2, 5, 1)]),
    ]
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Index>();
    is::<Metric>();
}
