//! One open index: its keys, the resident directory of its posting lists, and every
//! operation on it. Posting-list blocks live in the store and are decrypted on demand through
//! the shared [`BlockCache`]; an item's block is found through its position record.
//!
//! Concurrency: `writer` serialises everything that changes the index (upsert, delete, the
//! final step of training, deleting the index, and each store write of a background merge
//! of position runs, see `merge`). A writer prepares its change under a *read*
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
mod coarse;
mod idfilter;
mod items;
mod load;
mod merge;
mod read;
mod runs;
mod search;
mod segments;
mod state;
mod text;
mod train;
mod write;

pub(crate) use text::MetaChange;

pub use block::Block;
use block::{code_block, wants_quant, BlockMeta, ListDir, BLOCK_BYTES};
pub(crate) use coarse::Codes;
pub use runs::RunPage;
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
    /// The live position runs of generation `gen`, newest first (levels ascending).
    runs: Vec<Arc<runs::Run>>,
    /// Whether every block of `gen` in a list with a coarse quantiser has a codes record
    /// (the coarse record's version, see [`coarse`]).
    codes_stored: bool,
    /// Whether `gen` was written as split blocks ([`segments`]; the quantiser or coarse
    /// record's version 3): writes keep sealing its blocks that way.
    split_rows: bool,
}

impl Data {
    pub fn n_lists(&self) -> usize {
        self.lists.len().max(1)
    }
    pub fn count(&self) -> usize {
        self.count
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
    /// Add one block (kept in block order within its list; a block held already stays).
    pub(crate) fn add(&mut self, list: u32, block: u32, blk: Arc<Block>) {
        let v = self.lists.entry(list).or_default();
        if let Err(i) = v.binary_search_by_key(&block, |x| x.0) {
            v.insert(i, (block, blk));
        }
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
#[derive(Clone)]
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
    /// Vector bytes from which a generation gets the 4-bit first pass (`None`: 1 GiB,
    /// [`coarse::COARSE_MIN_BYTES`]); tests and benchmarks lower it.
    pub coarse_min_bytes: Option<u64>,
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
    /// Shared stores only (several servers on one bucket): this index's scope there, and
    /// its version as of the data this process holds (see [`Index::commit`]).
    scope: Option<Vec<u8>>,
    seen: AtomicU64,
    /// The background position-run mergers (see `merge`), and this index's own handle
    /// that they hold while they run.
    mergers: merge::Mergers,
    /// Whether position runs merge in the background (see `merge`).
    merge_behind: bool,
    me: std::sync::Weak<Index>,
}

/// Where an index's batches go: through the index (guarded on a shared store), or straight
/// to the store before the index is assembled (the in-place upgrades at open).
#[derive(Clone, Copy)]
pub(crate) enum Sink<'a> {
    Store(&'a dyn IndexStore),
    Index(&'a Index),
}

impl Sink<'_> {
    pub(crate) fn write(&self, b: WriteBatch) -> Result<(), EngineError> {
        match self {
            Sink::Store(s) => Ok(s.write(b)?),
            Sink::Index(ix) => ix.commit(b),
        }
    }
}

/// How often a write that lost a race with another server reloads the index and tries again.
pub(crate) const CONFLICT_RETRIES: usize = 8;

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
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
        seen: Option<u64>,
        background_merges: bool,
        me: std::sync::Weak<Index>,
    ) -> Self {
        Self {
            merge_behind: background_merges && seen.is_none(),
            scope: seen.map(|_| fmt::index_scope(&id)),
            seen: AtomicU64::new(seen.unwrap_or(0)),
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
            mergers: merge::Mergers::default(),
            me,
        }
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

    /// `(run id, entries)` of the live position runs, newest first.
    #[cfg(test)]
    pub(crate) fn run_ids(&self) -> Vec<(u64, u64)> {
        self.data
            .read()
            .runs
            .iter()
            .map(|r| (r.id, r.entries))
            .collect()
    }

    /// The level of every live position run, newest first.
    #[cfg(test)]
    pub(crate) fn run_levels(&self) -> Vec<u8> {
        self.data.read().runs.iter().map(|r| r.level).collect()
    }

    /// Lists with a coarse quantiser (the 4-bit first pass).
    #[cfg(test)]
    pub(crate) fn coarse_lists(&self) -> usize {
        self.data
            .read()
            .lists
            .iter()
            .filter(|pl| pl.coarse.is_some())
            .count()
    }

    /// The row count of every block in the manifest.
    #[cfg(test)]
    pub(crate) fn block_rows(&self) -> Vec<u32> {
        let d = self.data.read();
        d.lists
            .iter()
            .flat_map(|pl| pl.blocks.values().map(|m| m.rows))
            .collect()
    }

    /// `(lists with a quantiser, lists, default probes)`.
    #[cfg(test)]
    pub(crate) fn quant_state(&self) -> (usize, usize, u32) {
        let d = self.data.read();
        let q = d.lists.iter().filter(|pl| pl.quant.is_some()).count();
        (q, d.lists.len(), d.default_probes)
    }

    /// Memory held by the open index itself, outside the block cache: centroids,
    /// quantisers and the block directory.
    pub fn approx_bytes(&self) -> usize {
        let d = self.data.read();
        let blocks: usize = d.lists.iter().map(|pl| pl.blocks.len()).sum();
        let quants = d
            .lists
            .iter()
            .filter(|pl| pl.quant.is_some() || pl.coarse.is_some())
            .count();
        let filter = self
            .id_filter
            .try_lock()
            .and_then(|f| f.as_ref().map(|f| f.bytes()))
            .unwrap_or(0);
        let runs: usize = d.runs.iter().map(|r| r.resident_bytes()).sum();
        filter
            + runs
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

    /// Store a batch of this index. On a shared store it commits only if no other server
    /// wrote the index since this process last loaded or wrote it (else
    /// `StoreError::Conflict`, nothing written), and the index's version moves on.
    pub(crate) fn commit(&self, batch: WriteBatch) -> Result<(), EngineError> {
        self.commit_naming(batch, &[])
    }

    /// [`Index::commit`], also naming `names` (other scopes, guarded at the versions the
    /// store reports now), so that the batch moves their versions too.
    pub(crate) fn commit_naming(
        &self,
        batch: WriteBatch,
        names: &[&[u8]],
    ) -> Result<(), EngineError> {
        let Some(scope) = &self.scope else {
            return Ok(self.store.write(batch)?);
        };
        let mut guards: Vec<(&[u8], u64)> = vec![(scope, self.seen.load(Ordering::Acquire))];
        for n in names {
            guards.push((n, self.store.version(n).unwrap_or(0)));
        }
        if let Some(n) = self.store.write_guarded(batch, &guards)? {
            self.seen.store(n, Ordering::Release);
        }
        Ok(())
    }

    /// Adopt the store's current version of this index without loading it (delete, which
    /// replaces everything whatever was written meanwhile).
    pub(crate) fn reload_version(&self) {
        if let Some(v) = self.scope.as_ref().and_then(|s| self.store.version(s)) {
            self.seen.store(v, Ordering::Release);
        }
    }

    /// Whether another server wrote this index since this process loaded or wrote it.
    pub(crate) fn stale(&self) -> bool {
        self.scope.as_ref().is_some_and(|s| {
            self.store
                .version(s)
                .is_some_and(|v| v != self.seen.load(Ordering::Acquire))
        })
    }

    /// Shared stores: if another server wrote this index, load its resident part again (in
    /// place, between this process's own writes). An index deleted or replaced meanwhile is
    /// [`EngineError::NotFound`].
    ///
    /// Without `wait`, an index whose writer lock is taken (a write or training of this
    /// process runs) is left as it is: that writer meets the other server's write as a
    /// conflict and reloads, and requests are not held up behind it.
    pub(crate) fn refresh(&self, wait: bool) -> Result<(), EngineError> {
        let Some(scope) = &self.scope else {
            return Ok(());
        };
        if !self.stale() {
            return Ok(());
        }
        let _w = if wait {
            self.writer.lock()
        } else {
            match self.writer.try_lock() {
                Some(g) => g,
                None => return Ok(()),
            }
        };
        let gone = || {
            self.deleted.store(true, Ordering::Release);
            EngineError::NotFound(self.name.clone())
        };
        let mk = fmt::meta_key(&self.name);
        let mut tries = 0;
        loop {
            let Some(v) = self.store.version(scope) else {
                return Ok(());
            };
            if v == self.seen.load(Ordering::Acquire) {
                return Ok(()); // another request reloaded it meanwhile
            }
            let raw = self.store.get(&mk)?.ok_or_else(gone)?;
            let meta = super::meta::MetaRecord::decode(&raw)?;
            if meta.id != self.id {
                return Err(gone());
            }
            let loaded = Self::load_data(
                &*self.store,
                &self.name,
                &self.id,
                &self.keys,
                self.config.metric.is_angular(),
                self.config.precision,
                super::meta::meta_digest(&raw),
            );
            let data = match loaded {
                Ok(d) => d,
                // Records of a write that landed while this load read: load again.
                Err(EngineError::Integrity { .. })
                    if tries < RACE_RETRIES && self.store.version(scope) != Some(v) =>
                {
                    tries += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let _window = self.write_window();
            *self.data.write() = data;
            *self.id_filter.lock() = None;
            {
                let mut kc = self.key_check.write();
                kc.wrapped_dek = meta.wrapped_dek;
                kc.envelope = meta.envelope;
            }
            self.seen.store(v, Ordering::Release);
            tracing::debug!(index = %self.name, version = v, "reloaded after another server's write");
            return Ok(());
        }
    }

    /// Run a write; when it lost a race with another server's write to this index, reload
    /// and run it again (up to [`CONFLICT_RETRIES`] times). `again` makes the next attempt's
    /// input (only asked for on shared stores).
    pub(crate) fn retrying<I, T>(
        &self,
        input: I,
        again: impl Fn(&I) -> I,
        op: impl Fn(I) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if self.scope.is_none() {
            return op(input);
        }
        let mut input = input;
        for attempt in 0.. {
            let next = again(&input);
            match op(input) {
                Err(EngineError::Store(sealdb_plugin_api::StoreError::Conflict(_)))
                    if attempt < CONFLICT_RETRIES =>
                {
                    self.refresh(true)?;
                    input = next;
                }
                // A record newer than this process's copy of the index: it was read after
                // another server's write landed, before this process loaded it.
                Err(EngineError::Integrity { .. })
                    if attempt < CONFLICT_RETRIES && self.stale() =>
                {
                    self.refresh(true)?;
                    input = next;
                }
                r => return r,
            }
        }
        unreachable!("the loop returns")
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

    /// Rows per block: about [`BLOCK_BYTES`] stored, but for quantized vectors no more than
    /// float16 would hold: every row also carries its id and metadata, which a write
    /// re-seals with the whole block, and a packed block's scan decodes it (rotated) into a
    /// scratch buffer of `rows × dim` floats.
    fn block_cap(dim: usize, precision: Precision) -> usize {
        let row = precision.row_bytes(dim.max(1)).max(2 * dim.max(1));
        (BLOCK_BYTES / row).clamp(16, 4096)
    }

    /// The records of a block at `epoch`: one sealed record, or with `split` the block
    /// record (its head) and its row records ([`segments`]). The block record comes first.
    #[allow(clippy::too_many_arguments)]
    fn seal_block(
        &self,
        gen: u32,
        list: u32,
        bno: u32,
        block: &mut Block,
        dim: usize,
        epoch: u64,
        split: bool,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let precision = self.config.precision;
        let plain = block.encode(dim, precision);
        if split {
            let rb = precision.row_bytes(dim);
            let head = plain.len().saturating_sub(block.len() * rb);
            return segments::seal_split(
                &self.keys,
                &self.id,
                (gen, list, bno),
                epoch,
                &plain,
                head,
                rb,
            );
        }
        let key = fmt::block_key(&self.id, gen, list, bno);
        let sealed = self.keys.seal(&fmt::aad_at(&key, epoch), &plain);
        vec![(key, sealed)]
    }

    /// Whether writes to generation `d` seal split blocks: generations written that way
    /// (large ones, whose queries rescore candidates row by row).
    fn split(&self, d: &Data) -> bool {
        d.split_rows && matches!(self.config.precision, Precision::F32 | Precision::F16)
    }

    /// Rows per block in generation `d`.
    fn cap_of(&self, d: &Data, dim: usize) -> usize {
        if self.split(d) {
            segments::block_cap(self.config.precision.row_bytes(dim))
        } else {
            Self::block_cap(dim, self.config.precision)
        }
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
        let st = State::of(&d, d.dimension, epoch, meta_digest, &d.pages, &d.runs);
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
}

/// Decoders of stored index data, for the fuzz harness (`crate::fuzz`).
#[cfg(test)]
pub(crate) fn fuzz_decoders(buf: &[u8]) {
    if let Ok((b, dim)) = Block::decode(buf) {
        // A decoded block must be internally consistent.
        if b.is_packed() {
            assert!(b.vecs.is_empty());
            assert_eq!(b.packed.len(), b.len() * b.held_as.row_bytes(dim));
        } else {
            assert_eq!(b.vecs.len(), b.len() * dim);
        }
        // Every row decodes, whichever way a reader asks for it.
        assert_eq!(b.rows_f32(dim).len(), b.len() * dim);
        assert_eq!(b.scan_rows(dim).len(), b.len() * dim);
        assert_eq!(b.cepochs.len(), b.len());
        assert_eq!(b.meta.len(), b.len());
        assert_eq!(b.inv_norms.len(), b.len());
    }
    if let Some(parts) = segments::parts(buf) {
        assert!(!parts.is_empty());
        assert!(parts.iter().map(|p| p.len()).sum::<usize>() <= buf.len());
    }
    let _ = Block::decode_head(buf);
    let _ = Codes::decode(buf, 3, 5);
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
    let mut b = Block::with_capacity(3, 4, Precision::F32);
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
        runs: vec![(7, 0, 1000, 1), (9, 2, 70_000, 35)],
    };
    vec![
        b.encode(4, Precision::F32),
        b.encode(4, Precision::F16),
        b.encode(4, Precision::Tq(8)),
        b.encode(4, Precision::Tq(4)),
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
