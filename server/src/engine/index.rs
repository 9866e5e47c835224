//! One open index: its keys, its posting lists in memory, and every operation on it.
//!
//! Concurrency: `writer` serialises everything that changes the index (upsert, delete, the
//! final step of training, deleting the index). A writer prepares its change under a *read*
//! lock of `data` (queries keep running), writes it to the store in one atomic batch, and only
//! then takes the write lock for the moment it needs to install the change in memory. So a
//! failed store write leaves memory untouched, and memory never shows what the store lacks.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// k-means iterations when the request does not say: the objective rarely improves after
/// this many (FAISS uses the same default); `max_iters` in the request overrides it.
const DEFAULT_MAX_ITERS: usize = 25;

/// k-means sample size per list (FAISS warns below 39; more costs time, not quality, and the
/// calibrated n_probes absorbs what little list quality is lost).
const TRAIN_SAMPLE_PER_LIST: usize = 128;

/// Default early stop for k-means: fewer than this fraction of sample points changed list in
/// the last iteration.
const SETTLE_FRACTION: f64 = 0.01;

/// Training writes the new generation in store batches of about this size (each batch is
/// built, sealed and dropped, next to the old generation).
const TRAIN_WRITE_CHUNK_BYTES: usize = 4 << 20;

/// Target plaintext size of one posting-list block.
const BLOCK_BYTES: usize = 56 * 1024;

/// A posting-list block in memory.
#[derive(Clone, Default)]
pub(crate) struct Block {
    ids: Vec<String>,
    vecs: Vec<f32>,
    inv_norms: Vec<f32>,
    meta: Vec<Option<Arc<Value>>>,
    /// 8-bit codes of `vecs` under the list's [`Quant`] (empty when the list has none).
    /// Only [`code_block`] writes them; edits leave them stale until the block is installed.
    codes: Vec<u8>,
}

impl Block {
    fn len(&self) -> usize {
        self.ids.len()
    }

    /// An empty block with room for `rows` vectors, so that filling it never over-allocates.
    fn with_capacity(rows: usize, dim: usize) -> Self {
        Self {
            ids: Vec::with_capacity(rows),
            vecs: Vec::with_capacity(rows * dim),
            inv_norms: Vec::with_capacity(rows),
            meta: Vec::with_capacity(rows),
            codes: Vec::new(),
        }
    }

    /// Drop spare capacity (a block grown by pushes can hold up to twice its size).
    fn shrink(&mut self) {
        self.ids.shrink_to_fit();
        self.vecs.shrink_to_fit();
        self.inv_norms.shrink_to_fit();
        self.meta.shrink_to_fit();
    }

    /// A copy with room for `rows` more vectors (a plain clone has no spare capacity, so
    /// filling it would reallocate as it grows).
    fn clone_with_room(&self, rows: usize, dim: usize) -> Self {
        let mut b = Self::with_capacity(self.len() + rows, dim);
        b.ids.extend_from_slice(&self.ids);
        b.vecs.extend_from_slice(&self.vecs);
        b.inv_norms.extend_from_slice(&self.inv_norms);
        b.meta.extend_from_slice(&self.meta);
        b.codes.extend_from_slice(&self.codes);
        b
    }

    fn push(&mut self, id: String, vec: &[f32], meta: Option<Arc<Value>>) {
        self.push_row(id, vec, distance::inv_norm(vec), meta);
    }

    /// [`Block::push`] with the row's inverse norm already known.
    fn push_row(&mut self, id: String, vec: &[f32], inv_norm: f32, meta: Option<Arc<Value>>) {
        self.ids.push(id);
        self.vecs.extend_from_slice(vec);
        self.inv_norms.push(inv_norm);
        self.meta.push(meta);
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|x| x == id)
    }

    fn swap_remove(&mut self, pos: usize, dim: usize) {
        let last = self.ids.len() - 1;
        self.ids.swap_remove(pos);
        self.inv_norms.swap_remove(pos);
        self.meta.swap_remove(pos);
        if pos != last {
            let (head, tail) = self.vecs.split_at_mut(last * dim);
            head[pos * dim..(pos + 1) * dim].copy_from_slice(&tail[..dim]);
        }
        self.vecs.truncate(last * dim);
    }

    fn vector(&self, pos: usize, dim: usize) -> &[f32] {
        &self.vecs[pos * dim..(pos + 1) * dim]
    }

    /// Plaintext encoding; see docs/FORMAT.md "Posting-list block".
    fn encode(&self, dim: usize, precision: Precision) -> Vec<u8> {
        let mut w = Writer::with_capacity(10 + self.len() * (24 + dim * 4));
        w.u8(1)
            .u8(precision.code())
            .u32(dim as u32)
            .u32(self.len() as u32);
        for (id, meta) in self.ids.iter().zip(&self.meta) {
            w.bytes(id.as_bytes());
            match meta {
                Some(m) => w.bytes(&serde_json::to_vec(m.as_ref()).unwrap_or_default()),
                None => w.bytes(b""),
            };
        }
        precision.encode_into(&self.vecs, &mut w.0);
        w.0
    }

    fn decode(buf: &[u8]) -> Result<(Block, usize), EngineError> {
        let mut r = Reader::new(buf, "posting-list block");
        if r.u8()? != 1 {
            return Err(EngineError::Corrupt(
                "unknown posting-list block version".into(),
            ));
        }
        let precision = Precision::from_code(r.u8()?)
            .ok_or_else(|| EngineError::Corrupt("unknown storage precision in block".into()))?;
        let dim = r.u32()? as usize;
        let n = r.u32()? as usize;
        let mut b = Block::default();
        for _ in 0..n {
            b.ids.push(r.str()?.to_owned());
            let m = r.bytes()?;
            b.meta.push(if m.is_empty() {
                None
            } else {
                Some(Arc::new(serde_json::from_slice(m).map_err(|_| {
                    EngineError::Corrupt("bad metadata in posting-list block".into())
                })?))
            });
        }
        b.vecs = precision.decode(r.rest(), n * dim)?;
        b.inv_norms = b
            .vecs
            .chunks_exact(dim.max(1))
            .map(distance::inv_norm)
            .collect();
        if dim == 0 {
            b.inv_norms = vec![0.0; n];
        }
        Ok((b, dim))
    }
}

#[derive(Clone, Default)]
pub(crate) struct PostingList {
    blocks: BTreeMap<u32, Arc<Block>>,
    /// Set on indexes whose default probe count is large (see [`wants_quant`]).
    quant: Option<Arc<Quant>>,
}

/// Rows as the quantiser sees them: unit length for angular metrics.
fn quant_rows(blk: &Block, dim: usize, angular: bool) -> std::borrow::Cow<'_, [f32]> {
    if angular {
        blk.vecs
            .chunks_exact(dim)
            .zip(&blk.inv_norms)
            .flat_map(|(r, inv)| r.iter().map(move |x| x * inv))
            .collect()
    } else {
        std::borrow::Cow::Borrowed(&blk.vecs)
    }
}

fn code_block(q: &Quant, blk: &mut Block, dim: usize, angular: bool) {
    blk.codes = q.encode(&quant_rows(blk, dim, angular));
}

/// Whether an index's lists get an 8-bit first pass: when its calibrated default probes at
/// least a quarter of the lists, scans dominate query time and are memory bound, so a quarter
/// of the traffic pays for the codes' memory (one byte per dimension and vector). Indexes
/// with well-separated clusters probe few lists and never pay it.
fn wants_quant(trained: bool, default_probes: u32, n_lists: usize) -> bool {
    trained && n_lists > 1 && default_probes as usize * 4 >= n_lists
}

/// Fit the list's quantiser and code every block.
fn quantize_list(pl: &mut PostingList, dim: usize, angular: bool) {
    let rows: Vec<std::borrow::Cow<'_, [f32]>> = pl
        .blocks
        .values()
        .map(|b| quant_rows(b, dim, angular))
        .collect();
    let Some(q) = Quant::fit(rows.iter().flat_map(|r| r.chunks_exact(dim)), dim) else {
        pl.quant = None;
        return;
    };
    let codes: Vec<Vec<u8>> = rows.iter().map(|r| q.encode(r)).collect();
    drop(rows);
    for (blk, c) in pl.blocks.values_mut().zip(codes) {
        Arc::make_mut(blk).codes = c;
    }
    pl.quant = Some(Arc::new(q));
}

impl PostingList {
    fn len(&self) -> usize {
        self.blocks.values().map(|b| b.len()).sum()
    }
}

/// Everything about the index that changes, as held in memory.
#[derive(Default)]
pub(crate) struct Data {
    pub dimension: u32,
    pub gen: u32,
    pub trained: bool,
    /// Calibrated default `n_probes` (0 = use the formula).
    pub default_probes: u32,
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

/// The persisted, mutable facts about an index (the sealed state record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    pub dimension: u32,
    pub gen: u32,
    pub trained: bool,
    pub n_lists: u32,
    /// Default `n_probes` calibrated at training (0 = not calibrated).
    pub default_probes: u32,
}

impl State {
    /// Plaintext of the sealed state record; see docs/FORMAT.md "State record".
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(2)
            .u32(self.dimension)
            .u32(self.gen)
            .u8(self.trained as u8)
            .u32(self.n_lists)
            .u32(self.default_probes);
        w.0
    }

    /// Reads versions 1 (no calibrated probes) and 2.
    fn decode(buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "state record");
        let version = r.u8()?;
        if !(1..=2).contains(&version) {
            return Err(EngineError::Corrupt("unknown state record version".into()));
        }
        Ok(Self {
            dimension: r.u32()?,
            gen: r.u32()?,
            trained: r.u8()? != 0,
            n_lists: r.u32()?,
            default_probes: if version >= 2 { r.u32()? } else { 0 },
        })
    }

    #[cfg(test)]
    pub(crate) fn decode_for_test(buf: &[u8]) -> Result<Self, EngineError> {
        Self::decode(buf)
    }

    pub(crate) fn fresh(dimension: u32) -> Self {
        Self {
            dimension,
            gen: 0,
            trained: false,
            n_lists: 1,
            default_probes: 0,
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
    keys: IndexKeys,
    dek: Dek,
    key_check: RwLock<KeyCheck>,
    store: Arc<dyn IndexStore>,
    writer: Mutex<()>,
    training: Mutex<()>,
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
            data: RwLock::new(data),
            deleted: AtomicBool::new(false),
            progress: Mutex::new(None),
        }
    }

    /// Load the mutable part of an index from the store (state, centroids, blocks).
    pub(crate) fn load_data(
        store: &dyn IndexStore,
        id: &IndexId,
        keys: &IndexKeys,
        declared_dim: u32,
        metric: Metric,
    ) -> Result<Data, EngineError> {
        let sk = fmt::state_key(id);
        let st = match store.get(&sk)? {
            Some(sealed) => State::decode(&keys.open(&fmt::aad(&sk), &sealed).map_err(corrupt)?)?,
            None => State::fresh(declared_dim),
        };
        let State {
            dimension,
            gen,
            trained,
            n_lists,
            default_probes,
        } = st;
        let mut data = Data {
            dimension,
            gen,
            trained,
            default_probes,
            lists: vec![PostingList::default(); n_lists.max(1) as usize],
            ..Data::default()
        };
        if trained {
            let ck = fmt::centroids_key(id, gen);
            let sealed = store
                .get(&ck)?
                .ok_or_else(|| EngineError::Corrupt("centroids record missing".into()))?;
            let raw = keys.open(&fmt::aad(&ck), &sealed).map_err(corrupt)?;
            data.centroids = Precision::F32.decode(&raw, n_lists as usize * dimension as usize)?;
        }
        let records = store.scan_prefix(&fmt::list_gen_prefix(id, gen))?;
        let blocks: Vec<(u32, u32, Block)> = records
            .par_iter()
            .map(|(k, v)| {
                let (list, bno) = fmt::parse_block_key(k)
                    .ok_or_else(|| EngineError::Corrupt("malformed block key".into()))?;
                let plain = keys.open(&fmt::aad(k), v).map_err(corrupt)?;
                let (block, _) = Block::decode(&plain)?;
                Ok((list, bno, block))
            })
            .collect::<Result<_, EngineError>>()?;
        for (list, bno, block) in blocks {
            let pl = data.lists.get_mut(list as usize).ok_or_else(|| {
                EngineError::Corrupt("block of a list that does not exist".into())
            })?;
            for id in &block.ids {
                data.locate.insert(id.clone(), (list, bno));
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

    fn ensure_live(&self) -> Result<(), EngineError> {
        if self.deleted.load(Ordering::Acquire) {
            Err(EngineError::NotFound(self.name.clone()))
        } else {
            Ok(())
        }
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

    fn seal_block(
        &self,
        gen: u32,
        list: u32,
        bno: u32,
        block: &Block,
        dim: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = fmt::block_key(&self.id, gen, list, bno);
        let sealed = self
            .keys
            .seal(&fmt::aad(&key), &block.encode(dim, self.config.precision));
        (key, sealed)
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
                touched
                    .entry((list, bno))
                    .or_insert_with(|| Block::with_capacity(cap, dim))
                    .push(it.id.clone(), stored, meta);
                match &it.contents {
                    Some(c) if !c.is_empty() => {
                        let ik = fmt::item_key(&self.id, &self.keys.id_locator(&it.id));
                        let mut w = Writer::with_capacity(8 + it.id.len() + c.len());
                        w.u8(1).bytes(it.id.as_bytes()).bytes(c.as_bytes());
                        let sealed = self.keys.seal(&fmt::aad(&ik), &w.0);
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
                        let (k, v) = self.seal_block(d.gen, l, b, blk, dim);
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
            if dimension != d.dimension {
                let sk = fmt::state_key(&self.id);
                let st = State {
                    dimension,
                    gen: d.gen,
                    trained: d.trained,
                    n_lists: d.n_lists() as u32,
                    default_probes: d.default_probes,
                };
                batch.put(sk.clone(), self.keys.seal(&fmt::aad(&sk), &st.encode()));
            }
            plan = UpsertPlan {
                touched,
                locate,
                dimension,
            };
        }
        self.store.write(batch)?;
        let mut d = self.data.write();
        d.dimension = plan.dimension;
        self.install(&mut d, plan.touched);
        for (id, loc) in plan.locate {
            d.locate.insert(id, loc);
        }
        Ok(d.count())
    }

    fn install(&self, d: &mut Data, touched: HashMap<(u32, u32), Block>) {
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
        let touched = {
            let d = self.data.read();
            let dim = d.dimension as usize;
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
                    let (k, v) = self.seal_block(d.gen, l, b, blk, dim);
                    batch.put(k, v);
                }
            }
            touched
        };
        if removed.is_empty() {
            return Ok(0);
        }
        self.store.write(batch)?;
        let mut d = self.data.write();
        self.install(&mut d, touched);
        for id in &removed {
            d.locate.remove(id);
        }
        Ok(removed.len())
    }

    /// Read the contents of items (empty string when none was stored).
    fn contents_of(&self, ids: &[&str]) -> Result<Vec<String>, EngineError> {
        let keys: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| fmt::item_key(&self.id, &self.keys.id_locator(id)))
            .collect();
        let values = self.store.get_many(&keys)?;
        keys.iter()
            .zip(values)
            .map(|(k, v)| match v {
                None => Ok(String::new()),
                Some(sealed) => {
                    let plain = self.keys.open(&fmt::aad(k), &sealed).map_err(corrupt)?;
                    let mut r = Reader::new(&plain, "item record");
                    r.u8()?;
                    r.bytes()?;
                    Ok(r.str()?.to_owned())
                }
            })
            .collect()
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

    /// Search: one result list per query, nearest first.
    pub fn search(
        &self,
        queries: &[Vec<f32>],
        p: &SearchParams,
    ) -> Result<Vec<Vec<Hit>>, EngineError> {
        let mut results = {
            let d = self.data.read();
            let dim = d.dimension as usize;
            for q in queries {
                if dim != 0 && q.len() != dim {
                    return Err(EngineError::Invalid(format!(
                        "query vector has {} dimensions but index '{}' has {}",
                        q.len(),
                        self.name,
                        dim
                    )));
                }
                if q.iter().any(|x| !x.is_finite()) {
                    return Err(EngineError::Invalid(
                        "query vector has a NaN or infinite component".into(),
                    ));
                }
            }
            if d.count() == 0 {
                return Ok(queries.iter().map(|_| Vec::new()).collect());
            }
            if queries.len() == 1 {
                // No fork/join for one query: rayon's wake-up costs more than a small probe.
                vec![self.search_one(&d, &queries[0], p)]
            } else if queries.len() >= BATCH_GEMM_MIN && p.filter.is_none() {
                self.search_batch(&d, queries, p)
            } else {
                queries
                    .par_iter()
                    .map(|q| self.search_one(&d, q, p))
                    .collect::<Vec<_>>()
            }
        };
        if p.include.contents {
            for hits in &mut results {
                let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
                let contents = self.contents_of(&ids)?;
                for (h, c) in hits.iter_mut().zip(contents) {
                    h.contents = Some(c);
                }
            }
        }
        Ok(results)
    }

    /// The probe budget and the lists in the order to probe them. Without a filter only the
    /// first `probes` lists are returned (and put in order); a filter may need to go further.
    fn probe_order(&self, d: &Data, q: &[f32], p: &SearchParams) -> (usize, Vec<usize>) {
        let ivf = d.trained && d.lists.len() > 1;
        let mut probes = if ivf {
            p.n_probes.filter(|&n| n > 0).unwrap_or_else(|| {
                if d.default_probes > 0 {
                    d.default_probes as usize
                } else {
                    auto_n_probes(d.lists.len())
                }
            })
        } else {
            d.lists.len()
        };
        if p.greedy {
            probes = probes.saturating_mul(2);
        }
        let probes = probes.min(d.lists.len());
        // All centroid distances in one kernel call, then only the first `probes` are sorted.
        let order: Vec<usize> = if ivf {
            let mut dists = Vec::with_capacity(d.lists.len());
            distance::scan(Metric::SquaredEuclidean, q, &d.centroids, &[], &mut dists);
            let mut cd: Vec<(f32, usize)> = dists.into_iter().zip(0..).collect();
            let by_dist = |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0);
            if p.filter.is_none() && probes < cd.len() {
                cd.select_nth_unstable_by(probes, by_dist);
                cd.truncate(probes);
            }
            cd.sort_unstable_by(by_dist);
            cd.into_iter().map(|(_, i)| i).collect()
        } else {
            (0..d.lists.len()).collect()
        };
        (probes, order)
    }

    fn query_view<'q>(&self, q: &'q [f32], buf: &'q mut Vec<f32>) -> &'q [f32] {
        if self.config.metric.is_angular() {
            *buf = distance::normalized(q);
            buf
        } else {
            q
        }
    }

    fn search_one(&self, d: &Data, q: &[f32], p: &SearchParams) -> Vec<Hit> {
        let metric = self.config.metric;
        let dim = d.dimension as usize;
        let mut qn = Vec::new();
        let q = self.query_view(q, &mut qn);
        let (probes, order) = self.probe_order(d, q, p);
        let probed = &order[..probes.min(order.len())];
        // Quantised lists: a first pass over the 8-bit codes keeps RERANK times more
        // candidates, which are then rescored exactly.
        let quant = p.filter.is_none() && probed.iter().any(|&li| d.lists[li].quant.is_some());
        let k = if quant {
            p.top_k.saturating_mul(RERANK).max(p.top_k + 32)
        } else {
            p.top_k
        };
        let volume: usize = probed.iter().map(|&li| d.lists[li].len()).sum();
        let scan = |top: &mut TopK, li: usize| {
            if quant {
                top.scan_list_quant(metric, q, li, &d.lists[li], dim);
            } else {
                top.scan_list(metric, q, li, &d.lists[li], None);
            }
        };
        let heap = if p.filter.is_none() && volume >= PARALLEL_SCAN_MIN {
            // A large unfiltered scan: split the lists across cores, merge the partial top-k.
            // Two runs of lists per worker: each run fills its own heap from empty, so more
            // and smaller pieces would cost heap work without balancing load any better.
            let run = probed
                .len()
                .div_ceil(2 * rayon::current_num_threads())
                .max(1);
            probed
                .par_chunks(run)
                .map(|lists| {
                    let mut top = TopK::new(k);
                    for &li in lists {
                        scan(&mut top, li);
                    }
                    top
                })
                .reduce(|| TopK::new(k), TopK::merge)
        } else {
            let mut top = TopK::new(k);
            for (n, &li) in order.iter().enumerate() {
                // A filtered query keeps probing until it has k matches.
                if n >= probes && (p.filter.is_none() || top.heap.len() >= k) {
                    break;
                }
                if p.filter.is_none() {
                    scan(&mut top, li);
                } else {
                    top.scan_list(metric, q, li, &d.lists[li], p.filter.as_ref());
                }
            }
            top
        }
        .heap;
        let mut cands = heap.into_vec();
        if quant {
            self.rescore(d, q, &mut cands);
            cands.sort_unstable_by(|a, b| a.score.total_cmp(&b.score));
            cands.truncate(p.top_k);
        }
        self.hits(d, cands, p)
    }

    /// Unfiltered batches: each posting list is read once for all the queries that probe it,
    /// and their distances come from one matrix product per block
    /// (`|q-x|^2 = |q|^2 + |x|^2 - 2 q.x`, or `1 - q.x/|x|` for cosine) instead of one scan per
    /// query. The k winners of each query are then rescored with the exact kernel, so the
    /// distances reported are the same as for a single query.
    fn search_batch(&self, d: &Data, queries: &[Vec<f32>], p: &SearchParams) -> Vec<Vec<Hit>> {
        let metric = self.config.metric;
        let dim = d.dimension as usize;
        let nq = queries.len();
        let k = p.top_k;
        let mut qm: Vec<f32> = Vec::with_capacity(nq * dim);
        let mut by_list: Vec<Vec<u32>> = vec![Vec::new(); d.lists.len()];
        for (qi, q) in queries.iter().enumerate() {
            let mut qn = Vec::new();
            let q = self.query_view(q, &mut qn);
            qm.extend_from_slice(q);
            let (probes, order) = self.probe_order(d, q, p);
            for &li in &order[..probes.min(order.len())] {
                by_list[li].push(qi as u32);
            }
        }
        let q_norms: Vec<f32> = qm.chunks_exact(dim).map(|q| distance::dot(q, q)).collect();
        let work: Vec<(usize, &Vec<u32>)> = by_list
            .iter()
            .enumerate()
            .filter(|(li, qs)| !qs.is_empty() && d.lists[*li].len() > 0)
            .collect();
        let tops = work
            .par_iter()
            .fold(
                || (0..nq).map(|_| TopK::new(k)).collect::<Vec<_>>(),
                |mut tops, &(li, qs)| {
                    let mut sub = Vec::with_capacity(qs.len() * dim);
                    for &qi in qs {
                        sub.extend_from_slice(&qm[qi as usize * dim..][..dim]);
                    }
                    let Ok(sub) = ndarray::Array2::from_shape_vec((qs.len(), dim), sub) else {
                        return tops;
                    };
                    for (&bno, blk) in &d.lists[li].blocks {
                        let n = blk.len();
                        let Ok(x) = ndarray::ArrayView2::from_shape((n, dim), &blk.vecs[..n * dim])
                        else {
                            continue;
                        };
                        let dots = sub.dot(&x.t());
                        let x_norms: Vec<f32> = if metric.is_angular() {
                            Vec::new()
                        } else {
                            blk.vecs
                                .chunks_exact(dim)
                                .map(|r| distance::dot(r, r))
                                .collect()
                        };
                        for (row, &qi) in dots.rows().into_iter().zip(qs) {
                            let top = &mut tops[qi as usize];
                            let qn = q_norms[qi as usize];
                            for (pos, &dt) in row.iter().enumerate() {
                                let s = if metric.is_angular() {
                                    1.0 - dt * blk.inv_norms[pos]
                                } else {
                                    (qn + x_norms[pos] - 2.0 * dt).max(0.0)
                                };
                                if !top.beats_worst(s) {
                                    continue;
                                }
                                top.push(Cand {
                                    score: s,
                                    list: li as u32,
                                    block: bno,
                                    pos: pos as u32,
                                });
                            }
                        }
                    }
                    tops
                },
            )
            .reduce(
                || (0..nq).map(|_| TopK::new(k)).collect::<Vec<_>>(),
                |a, b| a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect(),
            );
        tops.into_par_iter()
            .enumerate()
            .map(|(qi, top)| {
                let mut cands = top.heap.into_vec();
                self.rescore(d, &qm[qi * dim..][..dim], &mut cands);
                self.hits(d, cands, p)
            })
            .collect()
    }

    /// Replace candidate scores with exact ones (the same kernels as a single scan).
    fn rescore(&self, d: &Data, q: &[f32], cands: &mut [Cand]) {
        let dim = d.dimension as usize;
        let angular = self.config.metric.is_angular();
        for c in cands {
            if let Some(blk) = d.block(c.list, c.block) {
                let row = blk.vector(c.pos as usize, dim);
                c.score = if angular {
                    1.0 - distance::dot(q, row) * blk.inv_norms[c.pos as usize]
                } else {
                    distance::l2sq(q, row)
                };
            }
        }
    }

    /// Candidates to hits, nearest first.
    fn hits(&self, d: &Data, mut cands: Vec<Cand>, p: &SearchParams) -> Vec<Hit> {
        let metric = self.config.metric;
        let dim = d.dimension as usize;
        cands.sort_unstable_by(|a, b| a.score.total_cmp(&b.score));
        cands
            .into_iter()
            .filter_map(|c| {
                let blk = d.block(c.list, c.block)?;
                let pos = c.pos as usize;
                Some(Hit {
                    id: blk.ids[pos].clone(),
                    distance: metric.finish(c.score),
                    metadata: p.include.metadata.then(|| {
                        blk.meta[pos]
                            .clone()
                            .unwrap_or_else(|| Arc::new(Value::Object(Default::default())))
                    }),
                    vector: p.include.vector.then(|| blk.vector(pos, dim).to_vec()),
                    contents: None,
                })
            })
            .collect()
    }

    /// Train (or retrain) the IVF lists. Blocks until done; queries keep working meanwhile.
    /// Returns the number of lists.
    pub fn train(&self, p: &TrainParams) -> Result<usize, EngineError> {
        let _t = self.training.lock();
        self.ensure_live()?;
        let progress = Arc::new(Progress::new(&self.name));
        *self.progress.lock() = Some(progress.clone());
        struct Clear<'a>(&'a Mutex<Option<Arc<Progress>>>);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                *self.0.lock() = None;
            }
        }
        let _clear = Clear(&self.progress);
        let (sample, dim, k, seed) = {
            let d = self.data.read();
            let n = d.count();
            let dim = d.dimension as usize;
            if n == 0 {
                return Err(EngineError::Invalid(format!(
                    "index '{}' has no vectors to train on",
                    self.name
                )));
            }
            let k = match p.n_lists.filter(|&k| k > 0) {
                Some(k) => {
                    if n < 2 * k {
                        return Err(EngineError::Invalid(format!(
                            "training {k} lists needs at least {} vectors; index '{}' has {n}",
                            2 * k,
                            self.name
                        )));
                    }
                    k
                }
                None => auto_n_lists(n),
            };
            // Sample at most TRAIN_SAMPLE_PER_LIST points per list, and no more than
            // max_memory allows.
            let mut cap = (k * TRAIN_SAMPLE_PER_LIST).max(k);
            if let Some(mb) = p.max_memory_mb.filter(|&m| m > 0) {
                cap = cap.min(((mb << 20) / (dim * 4)).max(k));
            }
            let stride = (n as f64 / cap.min(n) as f64).max(1.0);
            let mut sample = Vec::with_capacity(cap.min(n) * dim);
            let mut next = 0f64;
            let mut i = 0usize;
            for pl in &d.lists {
                for blk in pl.blocks.values() {
                    progress.set(Phase::Sampling, i, n);
                    for pos in 0..blk.len() {
                        if i as f64 >= next {
                            let v = blk.vector(pos, dim);
                            if self.config.metric.is_angular() {
                                sample.extend(distance::normalized(v));
                            } else {
                                sample.extend_from_slice(v);
                            }
                            next += stride;
                        }
                        i += 1;
                    }
                }
            }
            (sample, dim, k, n as u64 ^ d.gen as u64)
        };
        let params = KMeansParams {
            k,
            max_iters: p.max_iters.filter(|&x| x > 0).unwrap_or(DEFAULT_MAX_ITERS),
            tolerance: p.tolerance.filter(|t| *t >= 0.0).unwrap_or(1e-6),
            // Without explicit convergence settings, stop once fewer than SETTLE_FRACTION of
            // the sample changes list; explicit max_iters or tolerance are followed as given.
            settle: if p.max_iters.is_none() && p.tolerance.is_none() {
                SETTLE_FRACTION
            } else {
                0.0
            },
            batch_size: p.batch_size.filter(|&x| x > 0).unwrap_or(2048),
            seed,
        };
        let t_kmeans = std::time::Instant::now();
        progress.set(Phase::KMeans, 0, params.max_iters);
        let (centroids, passes) = kmeans::train_observed(&sample, dim, &params, &mut |pass| {
            progress.set(Phase::KMeans, pass, params.max_iters)
        });
        tracing::debug!(index = %self.name, rows = sample.len() / dim, passes, secs = t_kmeans.elapsed().as_secs_f32(), "k-means done");
        drop(sample);
        let k = centroids.len() / dim;
        self.install_training(centroids, k, dim, params.batch_size, &progress)
    }

    fn install_training(
        &self,
        centroids: Vec<f32>,
        k: usize,
        dim: usize,
        batch: usize,
        progress: &Progress,
    ) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        let cap = Self::block_cap(dim, self.config.precision);
        let angular = self.config.metric.is_angular();
        // 1. Queries keep running: label every row, calibrate n_probes, plan where rows go.
        let (blocks, labels, gen, old_gen, probes, count) = {
            let d = self.data.read();
            // Every existing block is already a contiguous matrix: assign it in place.
            let blocks: Vec<Arc<Block>> = d
                .lists
                .iter()
                .flat_map(|pl| pl.blocks.values().cloned())
                .collect();
            progress.set(Phase::Assigning, 0, blocks.len());
            let labels: Vec<Vec<u32>> = blocks
                .par_iter()
                .map(|b| {
                    progress.step();
                    if angular {
                        let normed: Vec<f32> = b
                            .vecs
                            .chunks_exact(dim)
                            .flat_map(distance::normalized)
                            .collect();
                        kmeans::assign(&normed, dim, &centroids, batch).0
                    } else {
                        kmeans::assign(&b.vecs, dim, &centroids, batch).0
                    }
                })
                .collect();
            let chunks: Vec<&[f32]> = blocks.iter().map(|b| b.vecs.as_slice()).collect();
            let flat_labels: Vec<u32> = labels.iter().flatten().copied().collect();
            let t_cal = std::time::Instant::now();
            let probes = calibrate_probes(&chunks, dim, angular, &flat_labels, &centroids);
            tracing::debug!(index = %self.name, probes, secs = t_cal.elapsed().as_secs_f32(), "n_probes calibrated");
            (blocks, labels, d.gen + 1, d.gen, probes, d.count())
        };
        // Each list takes its rows in the order of the old blocks, `cap` rows per block. The
        // store copy below and the in-memory move in step 3 both follow this one order.
        let mut rows_of: Vec<Vec<(u32, u32)>> = vec![Vec::new(); k];
        for (bi, labs) in labels.iter().enumerate() {
            for (pos, &l) in labs.iter().enumerate() {
                rows_of[l as usize].push((bi as u32, pos as u32));
            }
        }
        let mut locate = HashMap::with_capacity_and_hasher(count, Default::default());
        for (l, rows) in rows_of.iter().enumerate() {
            for (i, &(bi, pos)) in rows.iter().enumerate() {
                let id = blocks[bi as usize].ids[pos as usize].clone();
                locate.insert(id, (l as u32, (i / cap) as u32));
            }
        }
        // 2. Write the new generation in bounded chunks, built a few lists at a time and
        // dropped once sealed, so memory never holds a second full copy. Nothing refers to it
        // until the state record is switched in the final batch below, so a crash in between
        // leaves only unreferenced blocks; the first chunk deletes leftovers of any earlier
        // attempt.
        let t_write = std::time::Instant::now();
        let build = |l: usize, b: usize| {
            let rows = &rows_of[l][b * cap..((b + 1) * cap).min(rows_of[l].len())];
            let mut blk = Block::with_capacity(rows.len(), dim);
            for &(bi, pos) in rows {
                let src = &blocks[bi as usize];
                let pos = pos as usize;
                blk.push_row(
                    src.ids[pos].clone(),
                    src.vector(pos, dim),
                    src.inv_norms[pos],
                    src.meta[pos].clone(),
                );
            }
            blk
        };
        let jobs: Vec<(usize, usize)> = (0..k)
            .flat_map(|l| (0..rows_of[l].len().div_ceil(cap)).map(move |b| (l, b)))
            .collect();
        let per_chunk = (TRAIN_WRITE_CHUNK_BYTES / BLOCK_BYTES).max(1);
        let mut first = true;
        let n_chunks = jobs.len().div_ceil(per_chunk);
        for (ci, chunk) in jobs.chunks(per_chunk).enumerate() {
            progress.set(Phase::Writing, ci, n_chunks);
            let mut batch = WriteBatch::new();
            if std::mem::take(&mut first) {
                batch.delete_prefix(fmt::list_gen_prefix(&self.id, gen));
            }
            let sealed: Vec<(Vec<u8>, Vec<u8>)> = chunk
                .par_iter()
                .map(|&(l, b)| self.seal_block(gen, l as u32, b as u32, &build(l, b), dim))
                .collect();
            for (k, v) in sealed {
                batch.put(k, v);
            }
            self.store.write(batch)?;
        }
        let per_list: Vec<usize> = rows_of.iter().map(Vec::len).collect();
        drop(rows_of);
        drop(blocks);
        let mut batch = WriteBatch::new();
        batch.delete_prefix(fmt::list_gen_prefix(&self.id, old_gen));
        batch.delete(fmt::centroids_key(&self.id, old_gen));
        let ck = fmt::centroids_key(&self.id, gen);
        let mut raw = Vec::with_capacity(centroids.len() * 4);
        Precision::F32.encode_into(&centroids, &mut raw);
        batch.put(ck.clone(), self.keys.seal(&fmt::aad(&ck), &raw));
        let sk = fmt::state_key(&self.id);
        let st = State {
            dimension: dim as u32,
            gen,
            trained: true,
            n_lists: k as u32,
            default_probes: probes as u32,
        };
        batch.put(sk.clone(), self.keys.seal(&fmt::aad(&sk), &st.encode()));
        self.store.write(batch)?;
        tracing::debug!(index = %self.name, secs = t_write.elapsed().as_secs_f32(), "new generation written");
        // 3. The store has switched; now memory does. Rows move from the old blocks into the
        // new ones in the same order as above, each old block freed once emptied, so the
        // process never holds both generations. Queries wait for this step (a copy of the
        // vectors, plus 8-bit codes where used: 40-60 ms per 100k 128-d vectors here).
        let t_swap = std::time::Instant::now();
        progress.set(Phase::Swapping, 0, 1);
        let mut d = self.data.write();
        let old = std::mem::take(&mut d.lists);
        let mut lists = vec![PostingList::default(); k];
        let mut placed = vec![0usize; k];
        let room = |l: usize, placed: usize| (per_list[l] - placed).min(cap);
        let mut fill: Vec<Block> = (0..k)
            .map(|l| Block::with_capacity(room(l, 0), dim))
            .collect();
        let old_blocks = old.into_iter().flat_map(|pl| pl.blocks.into_values());
        for (blk, labs) in old_blocks.zip(&labels) {
            let Block {
                ids,
                vecs,
                inv_norms,
                meta,
                ..
            } = Arc::try_unwrap(blk).unwrap_or_else(|shared| (*shared).clone());
            for (pos, ((id, m), &l)) in ids.into_iter().zip(meta).zip(labs).enumerate() {
                let l = l as usize;
                fill[l].push_row(id, &vecs[pos * dim..(pos + 1) * dim], inv_norms[pos], m);
                placed[l] += 1;
                if fill[l].len() == cap || placed[l] == per_list[l] {
                    let next = Block::with_capacity(room(l, placed[l]), dim);
                    let full = std::mem::replace(&mut fill[l], next);
                    let bno = lists[l].blocks.len() as u32;
                    lists[l].blocks.insert(bno, Arc::new(full));
                }
            }
        }
        if wants_quant(true, probes as u32, lists.len()) {
            lists
                .par_iter_mut()
                .for_each(|pl| quantize_list(pl, dim, angular));
        }
        d.gen = gen;
        d.trained = true;
        d.default_probes = probes as u32;
        d.centroids = centroids;
        d.lists = lists;
        d.locate = locate;
        tracing::debug!(index = %self.name, secs = t_swap.elapsed().as_secs_f32(), "generation swapped in memory");
        Ok(k)
    }
}

/// Recall@10 the default `n_probes` must reach on the calibration sample.
const CALIBRATION_RECALL: f64 = 0.99;

/// Choose the default `n_probes`: the fewest lists that give recall@10 >= 0.99 when stored
/// vectors themselves are the queries (their own entry excluded). For each sampled point we
/// rank lists by centroid distance and note the rank of each true neighbour's list; recall at
/// `p` probes is the share of neighbours whose list rank is below `p`.
fn calibrate_probes(
    chunks: &[&[f32]],
    dim: usize,
    angular: bool,
    labels: &[u32],
    centroids: &[f32],
) -> usize {
    let n = labels.len();
    let k = centroids.len() / dim;
    if k <= 1 || n < 50 {
        return k.max(1);
    }
    let nq = 200.min(n / 4);
    let step = n / nq;
    let picks: Vec<usize> = (0..nq).map(|i| i * step + step / 2).collect();
    // Row i of the concatenated chunks.
    let starts = kmeans::row_starts(chunks, dim);
    let row = |i: usize| {
        let c = starts.partition_point(|&s| s <= i) - 1;
        let off = i - starts[c];
        &chunks[c][off * dim..(off + 1) * dim]
    };
    let queries: Vec<f32> = picks
        .iter()
        .flat_map(|&i| {
            if angular {
                distance::normalized(row(i))
            } else {
                row(i).to_vec()
            }
        })
        .collect();
    let truth = kmeans::exact_neighbours(chunks, dim, angular, &queries, &picks, 10);
    // hist[r] = number of true neighbours whose list has rank r for their query.
    let hist: Vec<usize> = queries
        .par_chunks(dim)
        .zip(&truth)
        .map(|(q, nbrs)| {
            let mut cd: Vec<(f32, u32)> = centroids
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, c)| (distance::l2sq(q, c), i as u32))
                .collect();
            cd.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            let mut rank = vec![0usize; k];
            for (r, (_, c)) in cd.iter().enumerate() {
                rank[*c as usize] = r;
            }
            let mut h = vec![0usize; k];
            for &j in nbrs {
                h[rank[labels[j] as usize]] += 1;
            }
            h
        })
        .reduce(
            || vec![0usize; k],
            |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        );
    let total: usize = hist.iter().sum();
    let mut covered = 0usize;
    for (r, h) in hist.iter().enumerate() {
        covered += h;
        if covered as f64 >= CALIBRATION_RECALL * total as f64 {
            // One extra list of headroom for queries that are not stored points.
            return (r + 2).min(k);
        }
    }
    k
}

/// Unfiltered queries that scan at least this many vectors use all cores.
const PARALLEL_SCAN_MIN: usize = 8_192;

/// Candidates kept per result by the first pass over quantised lists.
const RERANK: usize = 4;

/// Unfiltered batches of at least this many queries are answered list by list with matrix
/// products (see `search_batch`).
const BATCH_GEMM_MIN: usize = 8;

/// A bounded max-heap of the best `k` candidates seen so far.
struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<Cand>,
    scores: Vec<f32>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: std::collections::BinaryHeap::with_capacity(k + 1),
            scores: Vec::new(),
        }
    }

    fn scan_list(
        &mut self,
        metric: Metric,
        q: &[f32],
        li: usize,
        list: &PostingList,
        filter: Option<&Filter>,
    ) {
        let mut scores = std::mem::take(&mut self.scores);
        for (&bno, blk) in &list.blocks {
            distance::scan(metric, q, &blk.vecs, &blk.inv_norms, &mut scores);
            self.offer_block(&scores, li, bno, blk, filter);
        }
        self.scores = scores;
    }

    /// Offer one block's scores (row order) to the heap, skipping rows the filter rejects.
    fn offer_block(
        &mut self,
        scores: &[f32],
        li: usize,
        bno: u32,
        blk: &Block,
        filter: Option<&Filter>,
    ) {
        for (pos, &s) in scores.iter().enumerate() {
            if !self.beats_worst(s) {
                continue;
            }
            if let Some(f) = filter {
                if !f.matches(blk.meta[pos].as_deref()) {
                    continue;
                }
            }
            self.push(Cand {
                score: s,
                list: li as u32,
                block: bno,
                pos: pos as u32,
            });
        }
    }

    /// Whether a candidate with score `s` would enter the heap.
    fn beats_worst(&self, s: f32) -> bool {
        self.heap.len() < self.k || s < self.heap.peek().map_or(f32::INFINITY, |c| c.score)
    }

    /// First pass over a quantised list: approximate scores in the metric's units
    /// (squared L2, or `|a-b|^2 / 2 = 1 - cos` for unit vectors). Blocks whose codes are
    /// missing are scanned exactly.
    fn scan_list_quant(
        &mut self,
        metric: Metric,
        q: &[f32],
        li: usize,
        list: &PostingList,
        dim: usize,
    ) {
        let Some(quant) = &list.quant else {
            return self.scan_list(metric, q, li, list, None);
        };
        let qc = quant.prepare(q);
        let unit = quant.step() * quant.step() * if metric.is_angular() { 0.5 } else { 1.0 };
        let mut raw = Vec::new();
        let mut scores = std::mem::take(&mut self.scores);
        for (&bno, blk) in &list.blocks {
            if blk.codes.len() == blk.len() * dim {
                distance::quant_scan(&qc, &blk.codes, &mut raw);
                // Compare in code units first: most rows fail one integer comparison.
                let mut limit = self.raw_limit(unit);
                for (pos, &r) in raw.iter().enumerate() {
                    if r > limit {
                        continue;
                    }
                    let s = r as f32 * unit;
                    if self.beats_worst(s) {
                        self.push(Cand {
                            score: s,
                            list: li as u32,
                            block: bno,
                            pos: pos as u32,
                        });
                        limit = self.raw_limit(unit);
                    }
                }
            } else {
                distance::scan(metric, q, &blk.vecs, &blk.inv_norms, &mut scores);
                self.offer_block(&scores, li, bno, blk, None);
            }
        }
        self.scores = scores;
    }

    /// The largest raw code distance that could still enter the heap, for a list whose code
    /// unit is `unit` (a superset bound: `beats_worst` decides).
    fn raw_limit(&self, unit: f32) -> u32 {
        if self.heap.len() < self.k {
            return u32::MAX;
        }
        let w = self.heap.peek().map_or(f32::INFINITY, |c| c.score) / unit;
        if w.is_nan() || w >= u32::MAX as f32 {
            u32::MAX
        } else {
            w.max(0.0) as u32
        }
    }

    fn push(&mut self, c: Cand) {
        self.heap.push(c);
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }

    fn merge(mut self, other: TopK) -> TopK {
        for c in other.heap {
            self.push(c);
        }
        self
    }
}

#[derive(PartialEq)]
struct Cand {
    score: f32,
    list: u32,
    block: u32,
    pos: u32,
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score)
    }
}

/// Whether `v` holds a NaN or an infinity (no early exit, so the loop vectorises).
fn has_non_finite(v: &[f32]) -> bool {
    v.iter().fold(false, |bad, x| bad | !x.is_finite())
}

fn corrupt(_: crate::keys::KeyError) -> EngineError {
    EngineError::Corrupt("a stored record failed authentication (altered or moved)".into())
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Index>();
    is::<Metric>();
}
