//! The DiskIVF engine: encrypted indexes on an [`IndexStore`]. Knows nothing of HTTP.
//!
//! * [`Engine`] owns the store, the table of open indexes and the training worker.
//! * [`index::Index`] is one open index (posting lists in memory, sealed blocks in the store).
//! * [`format`] is the byte layout of everything stored; [`distance`], [`kmeans`], [`filter`]
//!   are the numeric and query building blocks; [`text`] and [`tq`] hold BM25's and the
//!   quantized precisions' pure parts, `precision` the storage precisions.

pub mod cache;
pub mod distance;
pub mod filter;
pub mod format;
pub mod index;
pub mod kmeans;
pub mod meta;
mod precision;
pub mod progress;
pub mod text;
pub mod tq;
pub mod training;

pub use precision::Precision;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rand::RngCore;
use sealdb_plugin_api::{IndexStore, StoreError, WriteBatch};

use crate::keys::{self, Dek, IndexKeys, Kek};
pub use distance::Metric;
use format::{IndexId, Reader, Writer};
pub use index::{
    Access, CancelReason, Fetched, Hit, Include, Index, NewItem, SearchParams, TrainParams,
};
use index::{Data, KeyCheck};
pub use meta::Envelope;
use meta::{config_aad, dek_aad, meta_digest, MetaRecord};
pub use training::{Trainer, TrainingStatus};

/// Everything that can go wrong in the engine. The API layer maps each variant to exactly one
/// HTTP status (see `api/error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("index '{0}' not found")]
    NotFound(String),
    #[error("index '{0}' already exists")]
    AlreadyExists(String),
    #[error("wrong encryption key for index '{0}'")]
    WrongKey(String),
    #[error("index '{0}' is encrypted with a client-supplied key: send its index_key")]
    MissingKey(String),
    /// A request that is well formed but not acceptable (bad name, both or neither key, ...).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed input that fails validation (dimensions, filters, parameters).
    #[error("{0}")]
    Invalid(String),
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store returned records that do not fit together: altered, swapped, duplicated,
    /// deleted or rolled back (see docs/THREAT-MODEL.md).
    #[error("integrity check failed for index '{index}': {what}")]
    Integrity { index: String, what: String },
    /// A training stopped before it finished.
    #[error("training stopped: {0}")]
    Cancelled(CancelReason),
}

/// The immutable part of an index's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexConfig {
    pub metric: Metric,
    pub precision: Precision,
    pub embedding_model: Option<String>,
    /// Dimension given at create (0 = fixed by the first upsert).
    pub declared_dimension: u32,
    pub created_at: u64,
    /// 0.18 `metadata_schema`, in the order given at create (immutable).
    pub metadata_schema: Vec<(String, FieldSchema)>,
    /// 0.18 BM25 parameters (`k1`, `b`); used only when a field is `full_text`.
    pub bm25: Bm25,
    /// Whether writes maintain the value index of the schema's filterable fields: true for
    /// every index created since it exists; an older index with a schema (config version
    /// 2) has no value index and filters by scanning.
    pub value_index: bool,
}

/// BM25 scoring parameters of an index (fixed at create).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25 {
    pub k1: f64,
    pub b: f64,
}

impl Default for Bm25 {
    fn default() -> Self {
        Self { k1: 1.2, b: 0.75 }
    }
}

/// How one metadata field is indexed (0.18 `metadata_schema`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSchema {
    /// Exact-match filterable by `query_metadata` (default true).
    pub filterable: bool,
    /// `$regex` / `$contains` answerable by `query_metadata` (default false).
    pub pattern: bool,
    /// Analysed for BM25 full-text search (default false).
    pub full_text: bool,
}

impl IndexConfig {
    /// The schema entry of a metadata path, if the schema names it.
    pub fn field_schema(&self, path: &str) -> Option<FieldSchema> {
        self.metadata_schema
            .iter()
            .find(|(n, _)| n == path)
            .map(|(_, f)| *f)
    }

    /// The `full_text` fields, in schema order (their position is their number in the text
    /// statistics record).
    pub fn text_fields(&self) -> Vec<&str> {
        self.metadata_schema
            .iter()
            .filter(|(_, f)| f.full_text)
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

impl IndexConfig {
    /// docs/FORMAT.md "Meta record": version 2 appends the metadata schema, version 3 the
    /// BM25 parameters (versions 1 and 2 still decode, with the defaults).
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(3)
            .u8(self.metric.code())
            .u8(self.precision.code())
            .u32(self.declared_dimension)
            .bytes(self.embedding_model.as_deref().unwrap_or("").as_bytes())
            .u64(self.created_at)
            .u32(self.metadata_schema.len() as u32);
        for (name, f) in &self.metadata_schema {
            w.bytes(name.as_bytes())
                .u8(u8::from(f.filterable) | u8::from(f.pattern) << 1 | u8::from(f.full_text) << 2);
        }
        w.u64(self.bm25.k1.to_bits())
            .u64(self.bm25.b.to_bits())
            .u8(u8::from(self.value_index));
        w.0
    }
    fn decode(buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "index config");
        let version = r.u8()?;
        if !(1..=3).contains(&version) {
            return Err(EngineError::Corrupt("unknown config version".into()));
        }
        let metric = Metric::from_code(r.u8()?)
            .ok_or_else(|| EngineError::Corrupt("unknown metric".into()))?;
        let precision = Precision::from_code(r.u8()?)
            .ok_or_else(|| EngineError::Corrupt("unknown precision".into()))?;
        let declared_dimension = r.u32()?;
        let model = r.str()?.to_owned();
        let created_at = r.u64()?;
        let mut metadata_schema = Vec::new();
        if version >= 2 {
            let n = r.u32()? as usize;
            if n > r.remaining() / 5 {
                return Err(EngineError::Corrupt(
                    "metadata schema count is too large".into(),
                ));
            }
            for _ in 0..n {
                let name = r.str()?.to_owned();
                let flags = r.u8()?;
                metadata_schema.push((
                    name,
                    FieldSchema {
                        filterable: flags & 1 != 0,
                        pattern: flags & 2 != 0,
                        full_text: flags & 4 != 0,
                    },
                ));
            }
        }
        let mut bm25 = Bm25::default();
        let mut value_index = false;
        if version >= 3 {
            bm25.k1 = f64::from_bits(r.u64()?);
            bm25.b = f64::from_bits(r.u64()?);
            value_index = r.u8()? & 1 != 0;
        }
        Ok(Self {
            metric,
            precision,
            embedding_model: (!model.is_empty()).then_some(model),
            declared_dimension,
            created_at,
            metadata_schema,
            bm25,
            value_index,
        })
    }
}

/// What `create` needs.
pub struct CreateSpec {
    pub name: String,
    /// From [`new_index_id`]; a KMS envelope's context is derived from it before create.
    pub id: IndexId,
    pub kek: Kek,
    /// `Some` for a KMS-backed index: how the KEK is wrapped.
    pub envelope: Option<Envelope>,
    pub config: IndexConfig,
}

/// A fresh random index id.
pub fn new_index_id() -> IndexId {
    let mut id = [0u8; format::INDEX_ID_LEN];
    rand::rng().fill_bytes(&mut id);
    id
}

/// Where an index's KEK comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// The client sends it on every request.
    Client,
    /// A KMS slot unwraps it from this envelope.
    Kms(Envelope),
}

/// What `describe` reports.
#[derive(Debug, Clone)]
pub struct IndexInfo {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    pub precision: Precision,
    pub embedding_model: Option<String>,
    pub is_trained: bool,
    pub n_lists: usize,
    pub num_vectors: usize,
    pub metadata_schema: Vec<(String, FieldSchema)>,
    pub bm25: Bm25,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Start background training once an untrained index holds at least this many vectors.
    pub auto_train_min_vectors: usize,
    pub auto_train: bool,
    /// Budget for decrypted data (`None` = unlimited, `Some(0)` = keep nothing): the block
    /// cache holds at most this many bytes of decrypted blocks, and idle open indexes
    /// (centroids, quantisers, block directory, keys) are dropped beyond it too.
    pub cache_limit_bytes: Option<usize>,
    /// How long one training may run before it is stopped (`None` = no limit).
    pub train_time_limit: Option<std::time::Duration>,
    /// Vector bytes from which background trainings give a generation the 4-bit first pass
    /// (`None`: 1 GiB).
    pub coarse_min_bytes: Option<u64>,
    /// Merge position runs in background threads, off the write path (on a store of its
    /// own; a shared store always merges in line). Off: every write that leaves a merge due
    /// does it before it returns, which keeps the store's contents a function of the
    /// requests alone (the engine's unit tests).
    pub background_merges: bool,
}

/// Check an index name: 1-255 bytes, no control characters, not the reserved `default`.
pub fn validate_name(name: &str) -> Result<(), EngineError> {
    if name.is_empty() || name.len() > 255 {
        return Err(EngineError::BadRequest(
            "index_name must be between 1 and 255 bytes long".into(),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(EngineError::BadRequest(
            "index_name must not contain control characters".into(),
        ));
    }
    if name == "default" {
        return Err(EngineError::BadRequest(
            "index_name 'default' is reserved; choose another name".into(),
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Slot {
    index: RwLock<Option<Arc<Index>>>,
    last_used: std::sync::atomic::AtomicU64,
}

/// The table of open indexes and its memory budget.
///
/// An open index holds its DEK, derived keys and decrypted posting lists. With a budget
/// (`Some(bytes)`), whenever the last user of an index lets go, idle indexes are dropped,
/// least recently used first, until the open ones fit; `Some(0)` keeps nothing between
/// requests. An index in use (a request in flight, queued or running training) is never
/// dropped, so one index never has two live handles.
#[derive(Default)]
struct Cache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    limit: Option<usize>,
    tick: std::sync::atomic::AtomicU64,
}

impl Cache {
    fn touch(&self, slot: &Slot) {
        use std::sync::atomic::Ordering::Relaxed;
        slot.last_used
            .store(self.tick.fetch_add(1, Relaxed), Relaxed);
    }

    fn enforce(&self) {
        let Some(limit) = self.limit else { return };
        let mut slots = self.slots.lock();
        let mut loaded: Vec<(String, u64, usize, bool)> = Vec::new();
        let mut total = 0usize;
        for (name, slot) in slots.iter() {
            // A slot being loaded (write-locked) is busy, not idle: skip it rather than wait
            // for the load while holding the table lock.
            let Some(guard) = slot.index.try_read() else {
                continue;
            };
            if let Some(ix) = guard.as_ref() {
                let bytes = ix.approx_bytes();
                total += bytes;
                let idle = Arc::strong_count(ix) == 1;
                loaded.push((
                    name.clone(),
                    slot.last_used.load(std::sync::atomic::Ordering::Relaxed),
                    bytes,
                    idle,
                ));
            }
        }
        if total <= limit && limit > 0 {
            return;
        }
        loaded.sort_by_key(|l| l.1);
        for (name, _, bytes, idle) in loaded {
            if total <= limit && limit > 0 {
                break;
            }
            if !idle {
                continue;
            }
            if let Some(slot) = slots.get(&name) {
                let Some(mut guard) = slot.index.try_write() else {
                    continue;
                };
                if guard.as_ref().is_some_and(|ix| Arc::strong_count(ix) == 1) {
                    *guard = None;
                    drop(guard);
                    slots.remove(&name);
                    total = total.saturating_sub(bytes);
                    tracing::debug!(index = %name, "index dropped from memory");
                }
            }
        }
    }
}

/// A request's hold on an open index. Dereferences to the index; dropping the last hold lets
/// the cache budget drop the index from memory.
pub struct Lease {
    ix: Option<Arc<Index>>,
    cache: Arc<Cache>,
}

impl std::ops::Deref for Lease {
    type Target = Arc<Index>;
    fn deref(&self) -> &Arc<Index> {
        self.ix.as_ref().expect("present until drop")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.ix.take());
        self.cache.enforce();
    }
}

/// The engine: one store, many indexes.
pub struct Engine {
    store: Arc<dyn IndexStore>,
    config: EngineConfig,
    cache: Arc<Cache>,
    blocks: Arc<cache::BlockCache>,
    create_lock: Mutex<()>,
    trainer: Arc<Trainer>,
    /// Set once at shutdown: every training stops at its next check.
    shutdown: Arc<std::sync::atomic::AtomicBool>,
}

impl Engine {
    pub fn new(store: Arc<dyn IndexStore>, config: EngineConfig) -> Arc<Self> {
        Arc::new(Self {
            store,
            cache: Arc::new(Cache {
                limit: config.cache_limit_bytes,
                ..Cache::default()
            }),
            blocks: Arc::new(cache::BlockCache::new(
                config.cache_limit_bytes.map_or(u64::MAX / 4, |b| b as u64),
            )),
            create_lock: Mutex::new(()),
            trainer: Trainer::start(config.train_time_limit, config.coarse_min_bytes),
            shutdown: Arc::default(),
            config,
        })
    }

    /// Begin shutting down: running trainings stop within about a second, queued background
    /// trainings are dropped. Requests already in flight finish.
    pub fn begin_shutdown(&self) {
        self.shutdown
            .store(true, std::sync::atomic::Ordering::Release);
        self.trainer.stop();
    }

    /// Wait until no open index has a position-run merge running in the background (after
    /// [`Self::begin_shutdown`] they stop at their next batch; tests wait for them to end
    /// before they look at the store).
    pub fn settle_merges(&self) {
        let open: Vec<Arc<Index>> = {
            let slots = self.cache.slots.lock();
            slots
                .values()
                // A slot being loaded has no merger yet.
                .filter_map(|slot| slot.index.try_read()?.clone())
                .collect()
        };
        for ix in open {
            ix.settle_merges();
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Names of all indexes, sorted.
    pub fn list(&self) -> Result<Vec<String>, EngineError> {
        let keys = self.store.scan_keys(&[format::kind::META])?;
        Ok(keys
            .into_iter()
            .filter_map(|k| String::from_utf8(k[1..].to_vec()).ok())
            .collect())
    }

    /// Create an index.
    pub fn create(&self, spec: CreateSpec) -> Result<(), EngineError> {
        validate_name(&spec.name)?;
        let _g = self.create_lock.lock();
        let mk = format::meta_key(&spec.name);
        // Shared stores: the name's version before the check, so that a create of the same
        // name by another server in between makes this one conflict.
        let ns = format::name_scope(&spec.name);
        let name_version = self.store.version(&ns);
        if self.store.get(&mk)?.is_some() {
            return Err(EngineError::AlreadyExists(spec.name));
        }
        let id = spec.id;
        let dek = Dek::random();
        let keys = IndexKeys::derive(&dek);
        let meta = MetaRecord {
            id,
            envelope: spec.envelope,
            wrapped_dek: keys::wrap_dek(&spec.kek, &dek, &dek_aad(&mk, &id)),
            sealed_config: keys.seal(&config_aad(&mk, &id), &spec.config.encode()),
        };
        let sk = format::state_key(&id);
        let raw_meta = meta.encode();
        let state =
            index::State::fresh(spec.config.declared_dimension, meta_digest(&raw_meta)).encode();
        let mut batch = WriteBatch::new();
        batch
            .put(mk, raw_meta)
            .put(sk.clone(), keys.seal(&format::aad(&sk), &state));
        match name_version {
            None => self.store.write(batch)?,
            Some(v) => {
                let is = format::index_scope(&id);
                match self.store.write_guarded(batch, &[(&ns, v), (&is, 0)]) {
                    Ok(_) => {}
                    Err(StoreError::Conflict(_)) => {
                        return Err(EngineError::AlreadyExists(spec.name));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // A stale slot (e.g. from a deleted index of the same name) must not survive.
        self.cache.slots.lock().remove(&spec.name);
        Ok(())
    }

    /// Open an index with the caller's key, verifying it.
    pub fn open(&self, name: &str, kek: Option<&Kek>) -> Result<Lease, EngineError> {
        self.open_with(name, Access::Kek(kek))
    }

    /// Open an index with a key or an RBAC-unwrapped data key, verifying it.
    pub fn open_with(&self, name: &str, access: Access<'_>) -> Result<Lease, EngineError> {
        let ix = self.open_arc(name, access)?;
        Ok(Lease {
            ix: Some(ix),
            cache: self.cache.clone(),
        })
    }

    fn open_arc(&self, name: &str, access: Access<'_>) -> Result<Arc<Index>, EngineError> {
        let slot = self
            .cache
            .slots
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone();
        self.cache.touch(&slot);
        let open = slot.index.read().clone();
        if let Some(ix) = open {
            // Shared stores: another server's writes are loaded before this request reads.
            if let Err(e) = ix.refresh(false) {
                if matches!(e, EngineError::NotFound(_)) {
                    *slot.index.write() = None;
                    self.cache.slots.lock().remove(name);
                }
                return Err(e);
            }
            ix.check_access(access)?;
            crate::metrics::index_cache(true);
            return Ok(ix);
        }
        let mut guard = slot.index.write();
        if let Some(ix) = guard.as_ref() {
            ix.check_access(access)?;
            crate::metrics::index_cache(true);
            return Ok(ix.clone());
        }
        crate::metrics::index_cache(false);
        let mut loaded = self.load(name, access);
        // Shared stores: a load that read records of a write landing meanwhile (another
        // server's) meets them as a mismatch; it loads again.
        let shared = self.store.version(b"").is_some();
        for _ in 0..index::CONFLICT_RETRIES {
            match &loaded {
                Err(EngineError::Integrity { .. }) if shared => loaded = self.load(name, access),
                _ => break,
            }
        }
        match loaded {
            Ok(ix) => {
                *guard = Some(ix.clone());
                Ok(ix)
            }
            Err(e) => {
                drop(guard);
                let mut slots = self.cache.slots.lock();
                if slots
                    .get(name)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.index.read().is_none())
                {
                    slots.remove(name);
                }
                Err(e)
            }
        }
    }

    fn meta(&self, name: &str) -> Result<MetaRecord, EngineError> {
        Ok(self.meta_raw(name)?.0)
    }

    /// The meta record and its digest.
    fn meta_raw(&self, name: &str) -> Result<(MetaRecord, [u8; 32]), EngineError> {
        let raw = self
            .store
            .get(&format::meta_key(name))?
            .ok_or_else(|| EngineError::NotFound(name.to_owned()))?;
        Ok((MetaRecord::decode(&raw)?, meta_digest(&raw)))
    }

    /// Whether an index of this name exists.
    pub fn exists(&self, name: &str) -> Result<bool, EngineError> {
        Ok(self.store.get(&format::meta_key(name))?.is_some())
    }

    /// The id of an index and where its KEK comes from (from memory when it is open).
    pub fn key_source(&self, name: &str) -> Result<(IndexId, KeySource), EngineError> {
        if let Some(slot) = self.cache.slots.lock().get(name) {
            if let Some(ix) = slot.index.read().as_ref() {
                return Ok((ix.id, ix.key_source()));
            }
        }
        let meta = self.meta(name)?;
        Ok((
            meta.id,
            meta.envelope.map_or(KeySource::Client, KeySource::Kms),
        ))
    }

    /// `(name, id, envelope)` of every KMS-backed index (for the start-up drift check).
    pub fn kms_indexes(&self) -> Result<Vec<(String, IndexId, Envelope)>, EngineError> {
        let mut out = Vec::new();
        for (k, v) in self.store.scan_prefix(&[format::kind::META])? {
            let name = String::from_utf8(k[1..].to_vec())
                .map_err(|_| EngineError::Corrupt("index name is not UTF-8".into()))?;
            let m = MetaRecord::decode(&v)?;
            if let Some(e) = m.envelope {
                out.push((name, m.id, e));
            }
        }
        Ok(out)
    }

    /// Re-key an index: the DEK (and so all data) stays; it is wrapped anew under `new_kek`
    /// and the meta record records `envelope` (`None` = the client supplies `new_kek`), in
    /// one write. `old` must open the index. Nothing changes when the write fails.
    pub fn rewrap(
        &self,
        name: &str,
        old: &Kek,
        new_kek: &Kek,
        envelope: Option<Envelope>,
    ) -> Result<(), EngineError> {
        let ix = self.open_arc(name, Access::Kek(Some(old)))?;
        let _g = self.create_lock.lock();
        ix.refresh(true)?;
        let _w = ix.lock_writer();
        ix.ensure_live()?;
        let mk = format::meta_key(name);
        let current = self.meta(name)?;
        if current.id != ix.id {
            return Err(EngineError::NotFound(name.to_owned()));
        }
        let aad = dek_aad(&mk, &ix.id);
        let meta = MetaRecord {
            id: ix.id,
            envelope: envelope.clone(),
            wrapped_dek: keys::wrap_dek(new_kek, ix.dek(), &aad),
            sealed_config: current.sealed_config,
        };
        // The state record vouches for the new meta record in the same batch.
        let raw_meta = meta.encode();
        let digest = meta_digest(&raw_meta);
        let (epoch, sk, sealed_state) = ix.state_for_meta(digest);
        let mut batch = WriteBatch::new();
        batch.put(mk, raw_meta).put(sk, sealed_state);
        ix.commit_naming(batch, &[&format::name_scope(name)])?;
        ix.apply_meta(epoch, digest);
        ix.set_key_check(KeyCheck {
            aad,
            wrapped_dek: meta.wrapped_dek,
            envelope,
        });
        Ok(())
    }

    /// The random id of an index (RBAC grants are bound to it).
    pub fn index_id(&self, name: &str) -> Result<IndexId, EngineError> {
        if let Some(slot) = self.cache.slots.lock().get(name) {
            if let Some(ix) = slot.index.read().as_ref() {
                return Ok(ix.id);
            }
        }
        Ok(self.meta(name)?.id)
    }

    /// `(name, id)` of every index.
    pub fn list_with_ids(&self) -> Result<Vec<(String, IndexId)>, EngineError> {
        self.store
            .scan_prefix(&[format::kind::META])?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8(k[1..].to_vec())
                    .map_err(|_| EngineError::Corrupt("index name is not UTF-8".into()))?;
                Ok((name, MetaRecord::decode(&v)?.id))
            })
            .collect()
    }

    fn load(&self, name: &str, access: Access<'_>) -> Result<Arc<Index>, EngineError> {
        let mk = format::meta_key(name);
        let (meta, digest) = self.meta_raw(name)?;
        // Read before the state record: the data loaded is at least this new.
        let seen = self.store.version(&format::index_scope(&meta.id));
        let key_check = KeyCheck {
            aad: dek_aad(&mk, &meta.id),
            wrapped_dek: meta.wrapped_dek.clone(),
            envelope: meta.envelope.clone(),
        };
        let dek = match access {
            Access::Kek(kek) => {
                let kek = kek.ok_or_else(|| EngineError::MissingKey(name.to_owned()))?;
                keys::unwrap_dek(kek, &key_check.wrapped_dek, &key_check.aad)
                    .map_err(|_| EngineError::WrongKey(name.to_owned()))?
            }
            Access::Dek(d) => d.clone(),
        };
        let ikeys = IndexKeys::derive(&dek);
        let config = IndexConfig::decode(
            &ikeys
                .open(&config_aad(&mk, &meta.id), &meta.sealed_config)
                .map_err(|_| match access {
                    Access::Dek(_) => EngineError::WrongKey(name.to_owned()),
                    Access::Kek(_) => {
                        EngineError::Corrupt("index config failed authentication".into())
                    }
                })?,
        )?;
        let data: Data = Index::load_data(
            self.store.as_ref(),
            name,
            &meta.id,
            &ikeys,
            config.metric.is_angular(),
            config.precision,
            digest,
        )?;
        Ok(Arc::new_cyclic(|me| {
            Index::assemble(
                name.to_owned(),
                meta.id,
                config,
                dek,
                key_check,
                self.store.clone(),
                self.blocks.clone(),
                data,
                self.shutdown.clone(),
                seen,
                self.config.background_merges,
                me.clone(),
            )
        }))
    }

    /// Delete an index and everything it stores, atomically. Returns the deleted index's id.
    pub fn delete(&self, name: &str, kek: Option<&Kek>) -> Result<IndexId, EngineError> {
        let ix = self.open_arc(name, Access::Kek(kek))?;
        // A training of this index stops first (it holds the writer lock while it writes).
        ix.cancel_training();
        self.trainer.forget(name);
        let _g = self.create_lock.lock();
        let _w = ix.mark_deleted();
        let mut batch = WriteBatch::new();
        batch.delete(format::meta_key(name));
        for kind in [
            format::kind::STATE,
            format::kind::CENTROIDS,
            format::kind::LIST,
            format::kind::POS,
            format::kind::RUN,
            format::kind::QUANT,
            format::kind::PAGE,
            format::kind::ITEM,
            format::kind::USER,
            format::kind::TERM,
            format::kind::VALUE,
            format::kind::TEXT_STATS,
            format::kind::COARSE,
            format::kind::CODES,
            format::kind::ROWS,
        ] {
            batch.delete_prefix(format::scoped_prefix(kind, &ix.id));
        }
        // Shared stores: the batch moves the index's and the name's versions, so other
        // servers drop the index; a concurrent write there only makes this try again.
        let names = [format::name_scope(name)];
        let mut res = ix.commit_naming(batch.clone(), &[&names[0]]);
        for _ in 0..index::CONFLICT_RETRIES {
            if !matches!(res, Err(EngineError::Store(StoreError::Conflict(_)))) {
                break;
            }
            ix.reload_version();
            res = ix.commit_naming(batch.clone(), &[&names[0]]);
        }
        self.cache.slots.lock().remove(name);
        self.blocks.forget(&ix.id, None);
        self.trainer.forget(name);
        res?;
        Ok(ix.id)
    }

    /// What describe shows.
    pub fn describe(&self, ix: &Index) -> IndexInfo {
        let d = ix.read();
        IndexInfo {
            name: ix.name.clone(),
            dimension: d.dimension,
            metric: ix.config.metric,
            precision: ix.config.precision,
            embedding_model: ix.config.embedding_model.clone(),
            is_trained: d.trained,
            n_lists: if d.trained { d.n_lists() } else { 1 },
            num_vectors: d.count(),
            metadata_schema: ix.config.metadata_schema.clone(),
            bm25: ix.config.bm25,
        }
    }

    /// After an upsert: queue background training when the index wants it. Returns the
    /// message to report, if training was queued.
    pub fn maybe_auto_train(&self, ix: &Arc<Index>) -> Option<String> {
        if !self.config.auto_train {
            return None;
        }
        let (n, trained, n_lists) = {
            let d = ix.read();
            (d.count(), d.trained, d.n_lists())
        };
        let threshold = self.config.auto_train_min_vectors.max(2);
        let wants = if !trained {
            n >= threshold
        } else {
            index::auto_n_lists(n) > n_lists
        };
        if wants && self.trainer.enqueue(ix.clone()) {
            Some(format!(
                "Index training has been triggered (vectors: {n}, threshold: {threshold})"
            ))
        } else {
            None
        }
    }

    /// Train now, in the caller's thread, reporting it in the training status meanwhile.
    pub fn train_now(&self, ix: &Arc<Index>, p: &TrainParams) -> Result<usize, EngineError> {
        let _mark = self.trainer.mark_explicit(&ix.name);
        let started = std::time::Instant::now();
        let r = ix.train(p);
        crate::metrics::training(&ix.name, false, r.is_ok(), started.elapsed().as_secs_f64());
        r
    }

    /// The progress of every training running now.
    pub fn training_progress(&self) -> Vec<progress::TrainingProgress> {
        let slots = self.cache.slots.lock();
        let mut out: Vec<_> = slots
            .values()
            .filter_map(|slot| {
                let g = slot.index.try_read()?;
                let ix = g.as_ref()?;
                let p = ix.progress.lock().clone()?;
                Some(p.snapshot())
            })
            .collect();
        out.sort_by(|a, b| a.index.cmp(&b.index));
        out
    }

    /// The block cache's size and counters.
    pub fn cache_stats(&self) -> cache::CacheStats {
        self.blocks.stats()
    }

    /// Open indexes, the bytes they hold outside the block cache, and `(name, vectors)` of
    /// each.
    pub fn open_stats(&self) -> (usize, usize, Vec<(String, usize)>) {
        let slots = self.cache.slots.lock();
        let mut bytes = 0;
        let mut per = Vec::new();
        for (name, slot) in slots.iter() {
            if let Some(g) = slot.index.try_read() {
                if let Some(ix) = g.as_ref() {
                    bytes += ix.approx_bytes();
                    per.push((name.clone(), ix.read().count()));
                }
            }
        }
        (per.len(), bytes, per)
    }

    pub fn training_status(&self) -> TrainingStatus {
        self.trainer.status()
    }
}

#[cfg(test)]
mod tests;
