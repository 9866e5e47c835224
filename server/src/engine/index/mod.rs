//! One open index: its keys, its posting lists in memory, and every operation on it.
//!
//! Concurrency: `writer` serialises everything that changes the index (upsert, delete, the
//! final step of training, deleting the index). A writer prepares its change under a *read*
//! lock of `data` (queries keep running), writes it to the store in one atomic batch, and only
//! then takes the write lock for the moment it needs to install the change in memory. So a
//! failed store write leaves memory untouched, and memory never shows what the store lacks.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use sealdb_plugin_api::{IndexStore, WriteBatch};
use serde_json::Value;

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

mod block;
mod search;
mod state;
mod train;

use block::{code_block, quantize_list, wants_quant, Block, PostingList, BLOCK_BYTES};
pub(crate) use state::State;

/// Everything about the index that changes, as held in memory.
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
    lists: Vec<PostingList>,
    locate: HashMap<String, (u32, u32)>,
}

impl Data {
    pub fn n_lists(&self) -> usize {
        self.lists.len().max(1)
    }
    pub fn count(&self) -> usize {
        self.locate.len()
    }
    fn block(&self, list: u32, block: u32) -> Option<&Arc<Block>> {
        self.lists.get(list as usize)?.blocks.get(&block)
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
}

/// One `get` result.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub id: String,
    pub metadata: Option<Arc<Value>>,
    pub vector: Option<Vec<f32>>,
    pub contents: Option<String>,
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
    writer: Mutex<()>,
    training: Mutex<()>,
    /// Bumped by every superseding train request and by delete: a running training whose
    /// number no longer matches stops at its next check.
    train_epoch: AtomicU64,
    /// The engine's shutdown flag: set, every training stops at its next check.
    shutdown: Arc<AtomicBool>,
    data: RwLock<Data>,
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
    locate: Vec<(String, (u32, u32))>,
    dimension: u32,
    epoch: u64,
}

impl Index {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        name: String,
        id: IndexId,
        config: IndexConfig,
        dek: Dek,
        key_check: KeyCheck,
        store: Arc<dyn IndexStore>,
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
            writer: Mutex::new(()),
            training: Mutex::new(()),
            train_epoch: AtomicU64::new(0),
            shutdown,
            data: RwLock::new(data),
            deleted: AtomicBool::new(false),
            progress: Mutex::new(None),
        }
    }

    /// Load the mutable part of an index from the store (state, centroids, blocks), checking
    /// every record against the state record: the meta record's digest, each block's epoch,
    /// and that the blocks present are exactly the manifest's.
    pub(crate) fn load_data(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        metric: Metric,
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
        let st = State::decode(
            &keys
                .open(&fmt::aad(&sk), &sealed)
                .map_err(|_| integrity("the state record failed authentication".into()))?,
        )?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &st.meta_digest[..],
            &meta_digest[..],
        )) {
            return Err(integrity(
                "the meta record is not the one the state record vouches for (replaced or rolled back)".into(),
            ));
        }
        let mut data = Data {
            dimension: st.dimension,
            gen: st.gen,
            trained: st.trained,
            default_probes: st.default_probes,
            epoch: st.epoch,
            meta_digest,
            lists: vec![PostingList::default(); st.n_lists.max(1) as usize],
            ..Data::default()
        };
        if st.trained {
            let ck = fmt::centroids_key(id, st.gen);
            let sealed = store
                .get(&ck)?
                .ok_or_else(|| integrity("the centroids record is missing".into()))?;
            let raw = keys
                .open(&fmt::aad(&ck), &sealed)
                .map_err(|_| integrity("the centroids record failed authentication".into()))?;
            data.centroids =
                Precision::F32.decode(&raw, st.n_lists as usize * st.dimension as usize)?;
        }
        let expected: HashMap<(u32, u32), u64> =
            st.manifest.iter().map(|&(l, b, e)| ((l, b), e)).collect();
        let records = store.scan_prefix(&fmt::list_gen_prefix(id, st.gen))?;
        let blocks: Vec<(u32, u32, Block)> = records
            .par_iter()
            .map(|(k, v)| {
                let (list, bno) = fmt::parse_block_key(k)
                    .ok_or_else(|| integrity("a block record has a malformed key".into()))?;
                let epoch = *expected.get(&(list, bno)).ok_or_else(|| {
                    integrity(format!("block {list}/{bno} is not in the manifest (duplicated or left over)"))
                })?;
                let plain = keys.open(&fmt::aad_at(k, epoch), v).map_err(|_| {
                    integrity(format!(
                        "block {list}/{bno} failed authentication at epoch {epoch} (altered, swapped or rolled back)"
                    ))
                })?;
                let (mut block, _) = Block::decode(&plain)?;
                block.epoch = epoch;
                Ok((list, bno, block))
            })
            .collect::<Result<_, EngineError>>()?;
        if blocks.len() != expected.len() {
            let have: HashSet<(u32, u32)> = blocks.iter().map(|(l, b, _)| (*l, *b)).collect();
            let (l, b) = expected
                .keys()
                .find(|k| !have.contains(k))
                .copied()
                .unwrap_or_default();
            return Err(integrity(format!(
                "block {l}/{b} is missing ({} of {} blocks present)",
                blocks.len(),
                expected.len()
            )));
        }
        for (list, bno, block) in blocks {
            let pl = data.lists.get_mut(list as usize).ok_or_else(|| {
                EngineError::Corrupt("block of a list that does not exist".into())
            })?;
            for id in &block.ids {
                if data.locate.insert(id.clone(), (list, bno)).is_some() {
                    return Err(integrity(format!("item '{id}' appears in two blocks")));
                }
            }
            pl.blocks.insert(bno, Arc::new(block));
        }
        if wants_quant(data.trained, data.default_probes, data.lists.len()) {
            let dim = data.dimension as usize;
            data.lists
                .par_iter_mut()
                .for_each(|pl| quantize_list(pl, dim, metric.is_angular()));
        }
        Ok(data)
    }

    /// `(lists with a quantiser, lists, default probes)`.
    #[cfg(test)]
    pub(crate) fn quant_state(&self) -> (usize, usize, u32) {
        let d = self.data.read();
        let q = d.lists.iter().filter(|pl| pl.quant.is_some()).count();
        (q, d.lists.len(), d.default_probes)
    }

    /// Rough memory held by the open index (vectors, norms, ids, metadata, lookup table).
    pub fn approx_bytes(&self) -> usize {
        let d = self.data.read();
        d.count() * (d.dimension as usize * 4 + 96) + d.centroids.len() * 4
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
        block: &Block,
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
        let st = State::after(&d, d.dimension, epoch, &HashMap::default(), meta_digest);
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
        let keep: Vec<bool> = {
            let mut last: HashMap<&str, usize> =
                HashMap::with_capacity_and_hasher(items.len(), Default::default());
            for (i, it) in items.iter().enumerate() {
                last.insert(it.id.as_str(), i);
            }
            items
                .iter()
                .enumerate()
                .map(|(i, it)| last[it.id.as_str()] == i)
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
            let mut touched: HashMap<(u32, u32), Block> = HashMap::default();
            let mut tails: HashMap<u32, u32> = HashMap::default();
            let mut locate = Vec::with_capacity(items.len());
            for (it, keep) in items.into_iter().zip(keep) {
                if !keep {
                    continue;
                }
                let existing = d.locate.get(&it.id).copied();
                if let Some((l, b)) = existing {
                    let blk = touched.entry((l, b)).or_insert_with(|| {
                        d.block(l, b)
                            .map(|x| x.clone_with_room(cap.saturating_sub(x.len()), dim))
                            .unwrap_or_default()
                    });
                    if let Some(pos) = blk.position(&it.id) {
                        blk.swap_remove(pos, dim);
                    }
                }
                let stored = &it.vector[..];
                let list = if dimension == d.dimension {
                    self.assign_list(&d, stored)
                } else {
                    0
                };
                let tail = *tails.entry(list).or_insert_with(|| {
                    d.lists
                        .get(list as usize)
                        .and_then(|pl| pl.blocks.keys().next_back().copied())
                        .unwrap_or(0)
                });
                let mut bno = tail;
                let full = {
                    let blk = touched.entry((list, bno)).or_insert_with(|| {
                        d.block(list, bno)
                            .map(|x| x.clone_with_room(cap.saturating_sub(x.len()), dim))
                            .unwrap_or_else(|| Block::with_capacity(cap, dim))
                    });
                    blk.len() >= cap
                };
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
                        stored,
                        meta,
                        if has_contents { epoch } else { 0 },
                    );
                match &it.contents {
                    Some(c) if !c.is_empty() => {
                        let ik = fmt::item_key(&self.id, &self.keys.id_locator(&it.id));
                        let mut w = Writer::with_capacity(8 + it.id.len() + c.len());
                        w.u8(1).bytes(it.id.as_bytes()).bytes(c.as_bytes());
                        let sealed = self.keys.seal(&fmt::aad_at(&ik, epoch), &w.0);
                        batch.put(ik, sealed);
                    }
                    // An overwrite without contents drops the old contents; a new item has
                    // no item record to drop.
                    _ if existing.is_some() => {
                        batch.delete(fmt::item_key(&self.id, &self.keys.id_locator(&it.id)));
                    }
                    _ => {}
                }
                locate.push((it.id, (list, bno)));
            }
            let sealed: Vec<(Vec<u8>, Option<Vec<u8>>)> = touched
                .par_iter()
                .map(|(&(l, b), blk)| {
                    if blk.len() == 0 {
                        (fmt::block_key(&self.id, d.gen, l, b), None)
                    } else {
                        let (k, v) = self.seal_block(d.gen, l, b, blk, dim, epoch);
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
            self.put_state(
                &mut batch,
                &State::after(&d, dimension, epoch, &touched, d.meta_digest),
            );
            plan = UpsertPlan {
                touched,
                locate,
                dimension,
                epoch,
            };
        }
        self.store.write(batch)?;
        let mut d = self.data.write();
        d.dimension = plan.dimension;
        d.epoch = plan.epoch;
        self.install(&mut d, plan.touched, plan.epoch);
        for (id, loc) in plan.locate {
            d.locate.insert(id, loc);
        }
        Ok(d.count())
    }

    fn install(&self, d: &mut Data, touched: HashMap<(u32, u32), Block>, epoch: u64) {
        let dim = d.dimension as usize;
        let angular = self.config.metric.is_angular();
        for ((l, b), blk) in touched {
            if d.lists.len() <= l as usize {
                d.lists.resize(l as usize + 1, PostingList::default());
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
                if blk.vecs.capacity() > blk.vecs.len() + blk.vecs.len() / 8 {
                    blk.shrink();
                }
                pl.blocks.insert(b, Arc::new(blk));
            }
        }
    }

    /// Delete items by id; unknown ids are skipped. Returns how many were deleted.
    pub fn delete_ids(&self, ids: &[String]) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        let mut batch = WriteBatch::new();
        let mut removed = Vec::new();
        let (touched, epoch) = {
            let d = self.data.read();
            let dim = d.dimension as usize;
            let epoch = d.epoch + 1;
            let mut touched: HashMap<(u32, u32), Block> = HashMap::default();
            let mut seen = HashSet::new();
            for id in ids {
                if !seen.insert(id.as_str()) {
                    continue;
                }
                let Some(&(l, b)) = d.locate.get(id) else {
                    continue;
                };
                let blk = touched
                    .entry((l, b))
                    .or_insert_with(|| d.block(l, b).map(|x| (**x).clone()).unwrap_or_default());
                if let Some(pos) = blk.position(id) {
                    blk.swap_remove(pos, dim);
                }
                batch.delete(fmt::item_key(&self.id, &self.keys.id_locator(id)));
                removed.push(id.clone());
            }
            for (&(l, b), blk) in &touched {
                if blk.len() == 0 {
                    batch.delete(fmt::block_key(&self.id, d.gen, l, b));
                } else {
                    let (k, v) = self.seal_block(d.gen, l, b, blk, dim, epoch);
                    batch.put(k, v);
                }
            }
            self.put_state(
                &mut batch,
                &State::after(&d, d.dimension, epoch, &touched, d.meta_digest),
            );
            (touched, epoch)
        };
        if removed.is_empty() {
            return Ok(0);
        }
        self.store.write(batch)?;
        let mut d = self.data.write();
        d.epoch = epoch;
        self.install(&mut d, touched, epoch);
        for id in &removed {
            d.locate.remove(id);
        }
        Ok(removed.len())
    }

    /// The contents epoch of each id as memory has it now (0 = none or unknown).
    fn contents_epochs(&self, ids: &[&str]) -> Vec<u64> {
        let d = self.data.read();
        ids.iter()
            .map(|id| {
                let Some(&(l, b)) = d.locate.get(*id) else {
                    return 0;
                };
                d.block(l, b)
                    .and_then(|blk| blk.position(id).map(|p| blk.cepochs[p]))
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Read the contents of items (empty string when none was stored). Each item record must
    /// be at the epoch its block row records; a writer may have replaced it since the epochs
    /// were read, so a mismatch is re-checked once after the writer lets go before it counts
    /// as an integrity failure.
    fn contents_of(&self, ids: &[&str]) -> Result<Vec<String>, EngineError> {
        let keys: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| fmt::item_key(&self.id, &self.keys.id_locator(id)))
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
        let first = read(&self.contents_epochs(ids), &all)?;
        let retry: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| first[i].is_none())
            .collect();
        let mut out: Vec<Option<String>> = first;
        if !retry.is_empty() {
            // Wait for a writer in flight (it stores first, then installs in memory).
            drop(self.writer.lock());
            let second = read(&self.contents_epochs(ids), &retry)?;
            for (&i, v) in retry.iter().zip(second) {
                out[i] = Some(v.ok_or_else(|| EngineError::Integrity {
                    index: self.name.clone(),
                    what: format!(
                        "the contents record of item '{}' is missing or not at its epoch (deleted, altered or rolled back)",
                        ids[i]
                    ),
                })?);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Fetch items by id, in request order; unknown ids are omitted.
    pub fn get(&self, ids: &[String], include: Include) -> Result<Vec<Fetched>, EngineError> {
        let mut out = Vec::with_capacity(ids.len());
        {
            let d = self.data.read();
            let dim = d.dimension as usize;
            for id in ids {
                let Some(&(l, b)) = d.locate.get(id) else {
                    continue;
                };
                let Some(blk) = d.block(l, b) else { continue };
                let Some(pos) = blk.position(id) else {
                    continue;
                };
                out.push(Fetched {
                    id: id.clone(),
                    metadata: include.metadata.then(|| {
                        blk.meta[pos]
                            .clone()
                            .unwrap_or_else(|| Arc::new(Value::Object(Default::default())))
                    }),
                    vector: include.vector.then(|| blk.vector(pos, dim).to_vec()),
                    contents: None,
                });
            }
        }
        if include.contents && !out.is_empty() {
            let ids: Vec<&str> = out.iter().map(|f| f.id.as_str()).collect();
            let contents = self.contents_of(&ids)?;
            for (f, c) in out.iter_mut().zip(contents) {
                f.contents = Some(c);
            }
        }
        Ok(out)
    }

    /// Every id, and the count.
    pub fn list_ids(&self) -> Vec<String> {
        let d = self.data.read();
        let mut ids = Vec::with_capacity(d.count());
        for pl in &d.lists {
            for blk in pl.blocks.values() {
                ids.extend(blk.ids.iter().cloned());
            }
        }
        ids
    }
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
        manifest: vec![(0, 0, 4), (1, 0, 5)],
    };
    vec![
        b.encode(4, Precision::F32),
        b.encode(4, Precision::F16),
        st.encode(),
    ]
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Index>();
    is::<Metric>();
}
