//! The S3 store: an [`IndexStore`] kept entirely in an S3 bucket, shared by any number of
//! servers.
//!
//! * **Every batch is one log object**, created with a conditional put (`If-None-Match: *`)
//!   at the next sequence number. Exactly one writer wins each number; a loser catches up
//!   (reads the entries it missed) and tries the next one, so no acknowledged batch is ever
//!   lost or overwritten, and a batch is visible whole or not at all.
//! * **Reads** go through this process's [`View`] of the log: where each live value sits
//!   (`(log object, offset, length)`), fetched with ranged GETs. The view catches up with
//!   the bucket at most `refresh` after its last look (on the first read after that), so a
//!   batch acknowledged by another server is visible here within that bound.
//! * **Guarded writes** ([`IndexStore::write_guarded`]) commit only if the scopes they name
//!   are still at the versions the caller read: optimistic concurrency between servers.
//! * **Compaction** (a background thread): a snapshot of the view every
//!   [`S3Options::snapshot_every`] entries, so a cold server reads one snapshot and a short
//!   log; live values of mostly dead log objects copied forward (as `move` entries that a
//!   later write overrides); dead log objects and old snapshots deleted once they are older
//!   than [`S3Options::retention`].
//!
//! Objects hold only what the server gave the store (sealed records, and keys that are
//! index ids, record kinds and keyed MACs): docs/FORMAT.md "S3 store".

mod format;
mod view;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig};
use parking_lot::{Mutex, RwLock};
use sealdb_plugin_api::{IndexStore, KeyValue, StoreError, WriteBatch};

use format::{Loc, Payload};
use view::View;

/// Where the bucket is and how to reach it (the original's `CYBORGDB_S3_*` settings).
#[derive(Clone, Default)]
pub struct S3Settings {
    pub bucket: String,
    pub region: Option<String>,
    /// Object key prefix (a `/` is added when missing).
    pub prefix: Option<String>,
    /// Any S3-compatible endpoint (`http://` allowed).
    pub endpoint: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub session_token: Option<String>,
}

/// Credentials stay out of logs.
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<set>"))
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

/// Behaviour knobs.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Longest a read serves a view older than this (0 = look at the bucket on every read).
    pub refresh: Duration,
    /// Write a snapshot once this many entries followed the last one.
    pub snapshot_every: u64,
    /// Dead log objects and old snapshots are deleted only when older than this, so that
    /// no server still reading an older view can miss them.
    pub retention: Duration,
    /// How often the compaction thread looks (0 = never: tests drive [`S3Store::compact`]).
    pub compact_interval: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(1),
            snapshot_every: 256,
            retention: Duration::from_secs(600),
            compact_interval: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Reads in flight at once for `get_many` and scans.
const READ_CONCURRENCY: usize = 32;
/// Attempts at the next sequence number before a write gives up.
const WRITE_RACES: usize = 256;
/// Largest batch of compaction copies.
const MOVE_BATCH_BYTES: usize = 8 << 20;

struct Inner {
    os: Arc<dyn ObjectStore>,
    prefix: String,
    writer: [u8; 16],
    opts: S3Options,
    view: RwLock<View>,
    /// When the last completed look at the bucket started.
    looked: Mutex<Option<Instant>>,
    /// Held while catching up (one look at a time).
    catching: tokio::sync::Mutex<()>,
    write_lock: Mutex<()>,
}

/// The store; see the module documentation.
pub struct S3Store {
    inner: Arc<Inner>,
    rt: Option<Arc<tokio::runtime::Runtime>>,
    stop: Arc<AtomicBool>,
    compactor: Option<std::thread::JoinHandle<()>>,
}

/// Count one S3 request (`sealdb_s3_requests_total{op}` in `/metrics`).
fn request(op: &'static str) {
    metrics::counter!("sealdb_s3_requests_total", "op" => op).increment(1);
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("S3: {e}"))
}

fn s3_error(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::Corrupt(format!("S3: {e}")),
        e => unavailable(e),
    }
}

impl S3Store {
    /// Connect and read the newest snapshot and the log after it. Fails (naming the bucket)
    /// when the bucket cannot be listed.
    pub fn open(s: &S3Settings, opts: S3Options) -> Result<Self, StoreError> {
        if s.bucket.is_empty() {
            return Err(StoreError::Unavailable(
                "CYBORGDB_S3_BUCKET is required for the s3 store".into(),
            ));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&s.bucket)
            .with_region(s.region.as_deref().unwrap_or("us-east-1"))
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: opts.request_timeout,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(opts.request_timeout)
                    .with_connect_timeout(Duration::from_secs(5)),
            );
        if let Some(e) = &s.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let (Some(a), Some(k)) = (&s.access_key, &s.secret_key) {
            b = b.with_access_key_id(a).with_secret_access_key(k);
            if let Some(t) = &s.session_token {
                b = b.with_token(t);
            }
        }
        let os: Arc<dyn ObjectStore> = Arc::new(b.build().map_err(unavailable)?);
        let mut prefix = s.prefix.clone().unwrap_or_default();
        while prefix.starts_with('/') {
            prefix.remove(0);
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("sealdb-s3")
                .enable_all()
                .build()
                .map_err(unavailable)?,
        );
        let inner = Arc::new(Inner {
            os,
            prefix,
            writer: rand::random(),
            opts: opts.clone(),
            view: RwLock::new(View::default()),
            looked: Mutex::new(None),
            catching: tokio::sync::Mutex::new(()),
            write_lock: Mutex::new(()),
        });
        {
            let i = inner.clone();
            if let Err(e) = run(&rt, async move { i.start().await }) {
                // Dropping a runtime blocks, which panics when the caller is async.
                drop(inner);
                if let Ok(rt) = Arc::try_unwrap(rt) {
                    rt.shutdown_background();
                }
                return Err(match e {
                    StoreError::Corrupt(m) => {
                        StoreError::Corrupt(format!("bucket '{}': {m}", s.bucket))
                    }
                    e => StoreError::Unavailable(format!("bucket '{}': {e}", s.bucket)),
                });
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let compactor = (!opts.compact_interval.is_zero()).then(|| {
            let (i, rt, stop) = (inner.clone(), rt.clone(), stop.clone());
            std::thread::Builder::new()
                .name("sealdb-s3-compact".into())
                .spawn(move || {
                    let mut next = Instant::now() + i.opts.compact_interval;
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(200));
                        if Instant::now() < next {
                            continue;
                        }
                        let j = i.clone();
                        if let Err(e) = run(&rt, async move { j.compact().await }) {
                            tracing::warn!(error = %e, "S3 compaction failed; will retry");
                        }
                        next = Instant::now() + i.opts.compact_interval;
                    }
                })
                .expect("spawn the compaction thread")
        });
        Ok(Self {
            inner,
            rt: Some(rt),
            stop,
            compactor,
        })
    }

    /// Run one compaction pass now (snapshot, copy live values forward, delete what is dead
    /// and older than the retention).
    pub fn compact(&self) -> Result<(), StoreError> {
        let i = self.inner.clone();
        run(self.rt(), async move { i.compact().await })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("present until drop")
    }

    /// The sequence number of the last log entry this process applied.
    pub fn applied(&self) -> u64 {
        self.inner.view.read().applied
    }

    fn fresh(&self) -> Result<(), StoreError> {
        let due = {
            let r = self.inner.opts.refresh;
            let l = self.inner.looked.lock();
            r.is_zero() || l.is_none_or(|t| t.elapsed() >= r)
        };
        if due {
            let i = self.inner.clone();
            run(self.rt(), async move { i.catch_up(false).await })?;
        }
        Ok(())
    }

    /// Run a read on a fresh view; when it met a log object compacted away under a stale
    /// view, catch up and run it once more (a second miss is corruption).
    fn read_retrying<T>(&self, read: impl Fn() -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.fresh()?;
        match read() {
            Err(StoreError::Conflict(_)) => {
                let i = self.inner.clone();
                run(self.rt(), async move { i.catch_up(true).await })?;
                read().map_err(|e| match e {
                    StoreError::Conflict(m) => StoreError::Corrupt(m),
                    e => e,
                })
            }
            r => r,
        }
    }

    fn read_values(&self, locs: Vec<Option<Loc>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let i = self.inner.clone();
        run(self.rt(), async move { i.read_values(locs).await })
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.compactor.take() {
            let _ = h.join();
        }
        // Dropping a runtime blocks, which panics on an async thread; this does not.
        if let Some(rt) = self.rt.take().and_then(|rt| Arc::try_unwrap(rt).ok()) {
            rt.shutdown_background();
        }
    }
}

/// Run a future on the store's own runtime and wait for it (callers are blocking threads,
/// never this runtime's workers).
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    futures::executor::block_on(rt.spawn(f)).map_err(|e| unavailable(format!("task: {e}")))?
}

impl Inner {
    fn path(&self, name: String) -> Path {
        Path::from(name)
    }

    async fn start(&self) -> Result<(), StoreError> {
        let snaps = self.list_seqs("snap/", 0).await?;
        if let Some(&(seq, _, _)) = snaps.last() {
            self.load_snapshot(seq).await?;
        }
        self.catch_up(true).await
    }

    /// `(seq, size, last modified)` of the objects under `dir` after `after`, ascending.
    async fn list_seqs(
        &self,
        dir: &str,
        after: u64,
    ) -> Result<Vec<(u64, u64, chrono_like::Stamp)>, StoreError> {
        let base = self.path(format!("{}{dir}", self.prefix));
        let offset = self.path(format!("{}{dir}{after:020}", self.prefix));
        request("list");
        let mut out: Vec<(u64, u64, chrono_like::Stamp)> = self
            .os
            .list_with_offset(Some(&base), &offset)
            .map_err(s3_error)
            .try_filter_map(|m| async move {
                Ok(format::seq_of(m.location.as_ref(), dir)
                    .filter(|&s| s > after)
                    .map(|s| (s, m.size, chrono_like::Stamp::of(&m))))
            })
            .try_collect()
            .await?;
        // Listing order is the store's business (SeaweedFS does not sort across `/`).
        out.sort_unstable_by_key(|x| x.0);
        Ok(out)
    }

    async fn load_snapshot(&self, seq: u64) -> Result<(), StoreError> {
        let buf = self
            .get_object(format::snap_name(&self.prefix, seq))
            .await?;
        let snap = format::decode_snapshot(&buf, seq)?;
        *self.view.write() = View::from_snapshot(snap);
        Ok(())
    }

    async fn get_object(&self, name: String) -> Result<bytes::Bytes, StoreError> {
        request("get");
        self.os
            .get(&self.path(name))
            .await
            .map_err(s3_error)?
            .bytes()
            .await
            .map_err(s3_error)
    }

    /// Read and apply every entry after the view's. `force` looks even if a look ended
    /// within the refresh bound (writers, and reads that met a deleted object).
    async fn catch_up(&self, force: bool) -> Result<(), StoreError> {
        let _one = self.catching.lock().await;
        if !force {
            if let Some(t) = *self.looked.lock() {
                let r = self.opts.refresh;
                if !r.is_zero() && t.elapsed() < r {
                    return Ok(()); // another thread looked while this one waited
                }
            }
        }
        let started = Instant::now();
        loop {
            let applied = self.view.read().applied;
            let found = self.list_seqs("log/", applied).await?;
            let Some(&(first, _, _)) = found.first() else {
                break;
            };
            if first != applied + 1 {
                // Entries this view never saw were compacted away: start again from the
                // newest snapshot (it covers them).
                let snaps = self.list_seqs("snap/", applied).await?;
                match snaps.iter().rev().find(|s| s.0 + 1 >= first) {
                    Some(&(s, _, _)) => {
                        self.load_snapshot(s).await?;
                        continue;
                    }
                    None => {
                        return Err(StoreError::Corrupt(format!(
                        "S3 store: log entries {} to {} are missing and no snapshot covers them",
                        applied + 1,
                        first - 1
                    )))
                    }
                }
            }
            let run: Vec<u64> = found
                .iter()
                .map(|x| x.0)
                .enumerate()
                .take_while(|&(i, s)| s == first + i as u64)
                .map(|(_, s)| s)
                .collect();
            let n = run.len();
            let mut entries = futures::stream::iter(run.into_iter().map(|s| async move {
                let buf = self.get_object(format::log_name(&self.prefix, s)).await?;
                format::decode_entry(&buf, s)
            }))
            .buffered(16);
            while let Some(e) = entries.next().await {
                let e = e?;
                let mut v = self.view.write();
                if e.seq == v.applied + 1 {
                    v.apply(e);
                }
            }
            if n == found.len() {
                break;
            }
        }
        *self.looked.lock() = Some(started);
        Ok(())
    }

    async fn read_values(
        &self,
        locs: Vec<Option<Loc>>,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        futures::stream::iter(locs.into_iter().map(|at| async move {
            let Some(at) = at else { return Ok(None) };
            if at.len == 0 {
                return Ok(Some(Vec::new()));
            }
            let r = u64::from(at.off)..u64::from(at.off) + u64::from(at.len);
            let path = self.path(format::log_name(&self.prefix, at.seq));
            request("get_range");
            match self.os.get_range(&path, r).await {
                Ok(b) if b.len() == at.len as usize => Ok(Some(b.to_vec())),
                Ok(_) => Err(StoreError::Corrupt(format!(
                    "S3 store: log object {} is shorter than the directory says",
                    at.seq
                ))),
                Err(object_store::Error::NotFound { .. }) => Err(StoreError::Conflict(
                    "a log object was compacted away under a stale view".into(),
                )),
                Err(e) => Err(unavailable(e)),
            }
        }))
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await
    }

    /// Commit `payload` at the next sequence number, if `guards` hold.
    async fn commit(
        &self,
        payload: Payload<'_>,
        guards: &[(&[u8], u64)],
    ) -> Result<u64, StoreError> {
        let batch_id: [u8; 16] = rand::random();
        let scopes: Vec<&[u8]> = guards.iter().map(|g| g.0).collect();
        for _ in 0..WRITE_RACES {
            self.catch_up(true).await?;
            let seq = {
                let v = self.view.read();
                for (s, want) in guards {
                    let have = v.version(s);
                    if have != *want {
                        return Err(StoreError::Conflict(format!(
                            "another server wrote first (version {have}, expected {want})"
                        )));
                    }
                }
                v.applied + 1
            };
            let body = format::encode_entry(seq, self.writer, batch_id, &scopes, &payload)?;
            let path = self.path(format::log_name(&self.prefix, seq));
            request("put");
            let put = self
                .os
                .put_opts(
                    &path,
                    bytes::Bytes::from(body.clone()).into(),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            let ours = match put {
                Ok(_) => true,
                // Lost the race, or a retried request that had in fact landed: the object
                // tells which.
                Err(e) => match self.get_object(format::log_name(&self.prefix, seq)).await {
                    Ok(b) => b.get(..48) == body.get(..48),
                    Err(_) => {
                        return Err(match e {
                            object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. } => {
                                unavailable("log entry exists but cannot be read back; try again")
                            }
                            e => unavailable(e),
                        })
                    }
                },
            };
            if !ours {
                metrics::counter!("sealdb_s3_lost_races_total").increment(1);
            }
            if ours {
                let e = format::decode_entry(&body, seq)?;
                let mut v = self.view.write();
                if v.applied + 1 == seq {
                    v.apply(e);
                }
                metrics::gauge!("sealdb_s3_log_tail_entries").set((v.applied - v.snapshot) as f64);
                return Ok(seq);
            }
        }
        Err(unavailable(format!(
            "gave up after {WRITE_RACES} lost races for the next log entry"
        )))
    }

    /// Delete one object (already gone is fine: another server compacted it).
    async fn delete(&self, name: String) -> Result<(), StoreError> {
        request("delete");
        match self.os.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn compact(&self) -> Result<(), StoreError> {
        self.catch_up(true).await?;
        let (applied, snapshot) = {
            let v = self.view.read();
            (v.applied, v.snapshot)
        };
        let logs = self.list_seqs("log/", 0).await?;
        // Reclaimable bytes after the snapshot: dead objects whole, sparse ones (less than
        // half live) their dead part. A quarter of the bucket reclaimable is worth a
        // snapshot now (it lets those objects go); else every `snapshot_every` entries.
        let (total, reclaimable) = {
            let v = self.view.read();
            logs.iter().fold((0u64, 0u64), |(t, r), (s, size, _)| {
                let live = v.live.get(s).copied().unwrap_or(0).min(*size);
                let waste = if live * 2 < *size { size - live } else { 0 };
                (t + size, if *s > snapshot { r + waste } else { r })
            })
        };
        let due = applied >= snapshot + self.opts.snapshot_every.max(1)
            || (reclaimable > 0 && reclaimable * 4 >= total && applied > snapshot);
        if due {
            let buf = {
                let v = self.view.read();
                format::encode_snapshot(
                    v.applied,
                    v.scopes.iter().map(|(s, n)| (s.as_slice(), *n)),
                    v.keys.iter().map(|(k, at)| (k.as_slice(), *at)),
                )?
            };
            request("put");
            let put = self
                .os
                .put_opts(
                    &self.path(format::snap_name(&self.prefix, applied)),
                    bytes::Bytes::from(buf).into(),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match put {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(unavailable(e)),
            }
            let mut v = self.view.write();
            v.snapshot = v.snapshot.max(applied);
        }
        let snapshot = self.view.read().snapshot;
        let retention = self.opts.retention;
        // Copy forward the live values of mostly dead objects the snapshot covers.
        let sparse: Vec<(u64, u64)> = {
            let v = self.view.read();
            logs.iter()
                .filter(|(s, size, _)| {
                    let live = v.live.get(s).copied().unwrap_or(0);
                    *s <= snapshot && *s < applied && live > 0 && live * 2 < *size
                })
                .map(|(s, size, _)| (*s, *size))
                .collect()
        };
        if !sparse.is_empty() {
            let wanted: std::collections::HashSet<u64> = sparse.iter().map(|x| x.0).collect();
            let held: Vec<(Vec<u8>, Loc)> = self
                .view
                .read()
                .keys
                .iter()
                .filter(|(_, at)| wanted.contains(&at.seq))
                .map(|(k, at)| (k.clone(), *at))
                .collect();
            let mut moves: Vec<(Vec<u8>, Loc, Vec<u8>)> = Vec::new();
            let mut bytes = 0;
            for chunk in held.chunks(256) {
                let vals = self
                    .read_values(chunk.iter().map(|x| Some(x.1)).collect())
                    .await?;
                for ((k, at), val) in chunk.iter().zip(vals) {
                    let val = val.unwrap_or_default();
                    bytes += val.len() + k.len();
                    moves.push((k.clone(), *at, val));
                }
                if bytes >= MOVE_BATCH_BYTES {
                    self.commit(Payload::Moves(&moves), &[]).await?;
                    moves.clear();
                    bytes = 0;
                }
            }
            if !moves.is_empty() {
                self.commit(Payload::Moves(&moves), &[]).await?;
            }
        }
        // Delete dead objects the snapshot covers, once they are older than the retention.
        let applied = self.view.read().applied;
        let dead: Vec<u64> = {
            let v = self.view.read();
            logs.iter()
                .filter(|(s, _, t)| {
                    *s <= snapshot
                        && *s < applied
                        && v.live.get(s).copied().unwrap_or(0) == 0
                        && t.older_than(retention)
                })
                .map(|x| x.0)
                .collect()
        };
        for s in &dead {
            self.delete(format::log_name(&self.prefix, *s)).await?;
        }
        {
            let mut v = self.view.write();
            for s in &dead {
                v.live.remove(s);
            }
        }
        // Keep the two newest snapshots.
        let snaps = self.list_seqs("snap/", 0).await?;
        if snaps.len() > 2 {
            for (s, _, t) in &snaps[..snaps.len() - 2] {
                if t.older_than(retention) {
                    self.delete(format::snap_name(&self.prefix, *s)).await?;
                }
            }
        }
        Ok(())
    }
}

/// Object ages from listings.
mod chrono_like {
    use std::time::{Duration, SystemTime};

    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Stamp(SystemTime);

    impl Stamp {
        pub(crate) fn of(m: &object_store::ObjectMeta) -> Self {
            let secs = m.last_modified.timestamp().max(0) as u64;
            Stamp(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        }

        pub(crate) fn older_than(&self, d: Duration) -> bool {
            SystemTime::now()
                .duration_since(self.0)
                .is_ok_and(|age| age >= d)
        }
    }
}

impl IndexStore for S3Store {
    fn backend(&self) -> &str {
        "s3"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .get_many(std::slice::from_ref(&key.to_vec()))?
            .pop()
            .flatten())
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.read_retrying(|| {
            let locs: Vec<Option<Loc>> = {
                let v = self.inner.view.read();
                keys.iter().map(|k| v.keys.get(k).copied()).collect()
            };
            self.read_values(locs)
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.read_retrying(|| {
            let hits = self.inner.view.read().scan(prefix);
            let (keys, locs): (Vec<Vec<u8>>, Vec<Option<Loc>>) =
                hits.into_iter().map(|(k, at)| (k, Some(at))).unzip();
            let vals = self.read_values(locs)?;
            Ok(keys
                .into_iter()
                .zip(vals)
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect())
        })
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.fresh()?;
        Ok(self
            .inner
            .view
            .read()
            .scan(prefix)
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_guarded(batch, &[]).map(|_| ())
    }

    fn version(&self, scope: &[u8]) -> Option<u64> {
        // A store that cannot look stays at its last view; the read that follows reports.
        let _ = self.fresh();
        Some(self.inner.view.read().version(scope))
    }

    fn write_guarded(
        &self,
        batch: WriteBatch,
        guards: &[(&[u8], u64)],
    ) -> Result<Option<u64>, StoreError> {
        if batch.is_empty() && guards.is_empty() {
            return Ok(None);
        }
        let _w = self.inner.write_lock.lock();
        let i = self.inner.clone();
        let guards: Vec<(Vec<u8>, u64)> = guards.iter().map(|(s, v)| (s.to_vec(), *v)).collect();
        let ops = batch.into_ops();
        run(self.rt(), async move {
            let g: Vec<(&[u8], u64)> = guards.iter().map(|(s, v)| (s.as_slice(), *v)).collect();
            i.commit(Payload::Batch(&ops), &g).await
        })
        .map(Some)
    }
}
