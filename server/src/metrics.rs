//! Prometheus metrics: the `metrics` facade wherever something is counted, the
//! `metrics-exporter-prometheus` recorder behind it, and `GET /metrics` rendering both the
//! recorded families and gauges read at scrape time (open indexes, cached bytes, vectors,
//! write-ahead-log size).
//!
//! Labels are bounded: operations, statuses, KMS slots, models. Index names (which can be
//! sensitive) appear only with `--metrics-index-labels`. Before [`install`] (unit tests, the
//! `--print-openapi` path) every call is a no-op.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sealdb_plugin_api::{IndexStore, KeyValue, StoreError, WriteBatch};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INDEX_LABELS: AtomicBool = AtomicBool::new(false);

/// Latency buckets (seconds) of every histogram.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Install the process-wide recorder (once; later calls keep the first).
pub fn install(index_labels: bool) -> Result<(), String> {
    INDEX_LABELS.store(index_labels, Ordering::Relaxed);
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    let _ = HANDLE.set(handle);
    Ok(())
}

/// Whether index names may be labels.
pub fn index_labels() -> bool {
    INDEX_LABELS.load(Ordering::Relaxed)
}

/// One HTTP request.
pub fn request(operation: &'static str, status: u16, secs: f64) {
    counter!("sealdb_requests_total", "operation" => operation, "status" => status.to_string())
        .increment(1);
    histogram!("sealdb_request_duration_seconds", "operation" => operation).record(secs);
}

/// One KMS call.
pub fn kms_call(slot: &str, operation: &'static str, ok: bool, secs: f64) {
    let slot = slot.to_owned();
    counter!("sealdb_kms_calls_total", "slot" => slot.clone(), "operation" => operation)
        .increment(1);
    if !ok {
        counter!("sealdb_kms_failures_total", "slot" => slot.clone(), "operation" => operation)
            .increment(1);
    }
    histogram!("sealdb_kms_call_duration_seconds", "slot" => slot, "operation" => operation)
        .record(secs);
}

/// One training run (explicit or background).
pub fn training(index: &str, background: bool, ok: bool, secs: f64) {
    let kind = if background { "background" } else { "explicit" };
    let result = if ok { "ok" } else { "failed" };
    if index_labels() {
        let index = index.to_owned();
        counter!("sealdb_training_runs_total", "kind" => kind, "result" => result, "index" => index.clone()).increment(1);
        histogram!("sealdb_training_duration_seconds", "kind" => kind, "index" => index)
            .record(secs);
    } else {
        counter!("sealdb_training_runs_total", "kind" => kind, "result" => result).increment(1);
        histogram!("sealdb_training_duration_seconds", "kind" => kind).record(secs);
    }
}

/// An open of an index: found in memory (hit) or loaded from the store (miss).
pub fn index_cache(hit: bool) {
    if hit {
        counter!("sealdb_index_cache_hits_total").increment(1);
    } else {
        counter!("sealdb_index_cache_misses_total").increment(1);
    }
}

/// One embedding forward pass.
pub fn embed_batch(model: &'static str, texts: usize, secs: f64) {
    counter!("sealdb_embedding_batches_total", "model" => model).increment(1);
    counter!("sealdb_embedding_texts_total", "model" => model).increment(texts as u64);
    histogram!("sealdb_embedding_batch_duration_seconds", "model" => model).record(secs);
}

/// What is read at scrape time.
pub struct Snapshot {
    pub open_indexes: usize,
    /// Bytes open indexes hold outside the block cache.
    pub cached_bytes: usize,
    /// The shared cache of decrypted blocks.
    pub blocks: crate::engine::cache::CacheStats,
    /// `(index, vectors)` of the open indexes.
    pub vectors: Vec<(String, usize)>,
    /// The disk store's directory, for the write-ahead-log size.
    pub wal_dir: Option<PathBuf>,
}

/// The text exposition of every family.
pub fn render(s: Snapshot) -> String {
    gauge!("sealdb_open_indexes").set(s.open_indexes as f64);
    gauge!("sealdb_index_cache_bytes").set(s.cached_bytes as f64);
    gauge!("sealdb_block_cache_bytes").set(s.blocks.bytes as f64);
    gauge!("sealdb_block_cache_budget_bytes").set(s.blocks.budget as f64);
    gauge!("sealdb_block_cache_reserved_bytes").set(s.blocks.reserved as f64);
    gauge!("sealdb_block_cache_blocks").set(s.blocks.blocks as f64);
    counter!("sealdb_block_cache_hits_total").absolute(s.blocks.hits);
    counter!("sealdb_block_cache_misses_total").absolute(s.blocks.misses);
    if index_labels() {
        for (name, n) in &s.vectors {
            gauge!("sealdb_index_vectors", "index" => name.clone()).set(*n as f64);
        }
    }
    gauge!("sealdb_open_index_vectors")
        .set(s.vectors.iter().map(|(_, n)| *n).sum::<usize>() as f64);
    if let Some(dir) = &s.wal_dir {
        let bytes: u64 = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.starts_with("wal-") && n.ends_with(".log")
                    })
                    .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                    .sum()
            })
            .unwrap_or(0);
        gauge!("sealdb_wal_bytes").set(bytes as f64);
    }
    match HANDLE.get() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// An [`IndexStore`] that times its batches (`sealdb_store_batch_duration_seconds`).
pub struct MeteredStore(pub Arc<dyn IndexStore>);

impl IndexStore for MeteredStore {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.0.get_many(keys)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.0.scan_prefix(prefix)
    }
    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.0.scan_keys(prefix)
    }
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.0.write(batch);
        let result = if r.is_ok() { "ok" } else { "failed" };
        histogram!("sealdb_store_batch_duration_seconds", "result" => result)
            .record(t.elapsed().as_secs_f64());
        r
    }
    fn version(&self, scope: &[u8]) -> Option<u64> {
        self.0.version(scope)
    }
    fn write_guarded(
        &self,
        batch: WriteBatch,
        guards: &[(&[u8], u64)],
    ) -> Result<Option<u64>, StoreError> {
        let t = Instant::now();
        let r = self.0.write_guarded(batch, guards);
        let result = match &r {
            Ok(_) => "ok",
            Err(StoreError::Conflict(_)) => "conflict",
            Err(_) => "failed",
        };
        histogram!("sealdb_store_batch_duration_seconds", "result" => result)
            .record(t.elapsed().as_secs_f64());
        r
    }
}
