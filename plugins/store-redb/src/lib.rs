//! The default, embedded [`IndexStore`]: a redb file on local disk behind a write-ahead log.
//!
//! All records live in a single redb table keyed by the server's byte keys. A [`WriteBatch`]
//! is appended to the log as one checksummed record (made durable with `fdatasync` under
//! [`Durability::Sync`], the default) and is visible to readers at once; a background thread
//! moves the log into redb in large durable transactions (see [`wal`]). After a crash the log
//! is replayed on open, so a batch is either wholly visible or absent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, TableDefinition};
use sealdb_plugin_api::store::prefix_upper_bound;
use sealdb_plugin_api::{IndexStore, KeyValue, StoreError, UserStore, UserStoreError, WriteBatch};

pub mod wal;
pub use wal::{Durability, WalOptions};

pub(crate) const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("users");

/// redb page-cache size.
pub const CACHE_BYTES: usize = 8 << 20;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "sealdb.redb";

/// An [`IndexStore`] backed by a redb database file and a write-ahead log in the same
/// directory.
pub struct RedbStore {
    db: Arc<Database>,
    wal: Arc<wal::Wal>,
    checkpointer: Option<JoinHandle<()>>,
    path: PathBuf,
}

pub(crate) fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedbStore {
    /// Open (creating if needed) the store in directory `dir`, with default options.
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        Self::open_dir_with(dir, WalOptions::default())
    }

    /// Compact the store in directory `dir`, which no process may have open: replay any
    /// log left behind, then let redb move the live pages to the front of the file and
    /// truncate it (what trainings and deletes freed is otherwise kept for reuse, never
    /// returned). Returns the file's size before and after.
    pub fn compact_dir(dir: &Path) -> Result<(u64, u64), StoreError> {
        drop(Self::open_dir(dir)?);
        let path = dir.join(FILE_NAME);
        let size = || {
            std::fs::metadata(&path)
                .map(|m| m.len())
                .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))
        };
        let before = size()?;
        let mut db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .open(&path)
            .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))?;
        db.compact().map_err(io)?;
        drop(db);
        Ok((before, size()?))
    }

    /// Open (creating if needed) the store in directory `dir`. Log segments left by a crash
    /// are replayed into the database before this returns.
    pub fn open_dir_with(dir: &Path, opts: WalOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        // The server caches what it decrypted under its own budget and the OS caches the
        // file; a small redb cache keeps memory from counting the data a third time.
        // The kernel's readahead stays on: it reads about three times the bytes a cold
        // query asks for (10M x 128: 12.5 MB from the disk for 3.9 MB of values), yet with
        // POSIX_FADV_RANDOM the same queries took 39-40 ms instead of 19-26 ms with the page
        // cache dropped, as neighbouring records (a list's codes, a block's row records)
        // then cost a read each.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                    "{} is already open in another process",
                    path.display()
                )),
                other => StoreError::Io(format!("cannot open {}: {other}", path.display())),
            })?;
        // Create the tables so that readers never see "table does not exist".
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(RECORDS).map_err(io)?;
        tx.open_table(USERS).map_err(io)?;
        tx.commit().map_err(io)?;
        let db = Arc::new(db);
        let wal = Arc::new(wal::Wal::open(db.clone(), dir, opts)?);
        let worker = wal.clone();
        let checkpointer = std::thread::Builder::new()
            .name("redb-checkpoint".into())
            .spawn(move || worker.run_checkpointer())
            .map_err(io)?;
        Ok(Self {
            db,
            wal,
            checkpointer: Some(checkpointer),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop as a crash would: the log is left on disk, unapplied. For tests of recovery.
    #[doc(hidden)]
    pub fn crash(mut self) {
        self.wal.shutdown(true);
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Some(h) = self.checkpointer.take() {
            // Hand the last segment over and let the checkpointer drain; if that fails the
            // log stays on disk and the next open replays it.
            let _ = self.wal.freeze_active();
            self.wal.shutdown(false);
            let _ = h.join();
        }
    }
}

impl IndexStore for RedbStore {
    fn backend(&self) -> &str {
        "redb"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.wal.get(key)
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.wal.get_many(keys)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self
            .wal
            .scan(prefix, true)?
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect())
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .wal
            .scan(prefix, false)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.wal.write(batch.into_ops())
    }
}

fn uio<E: std::fmt::Display>(e: E) -> UserStoreError {
    UserStoreError::Io(e.to_string())
}

fn user_key(index_id: &[u8], user_id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + index_id.len() + user_id.len());
    k.push(index_id.len() as u8);
    k.extend_from_slice(index_id);
    k.extend_from_slice(user_id);
    k
}

fn user_prefix(index_id: &[u8]) -> Vec<u8> {
    user_key(index_id, &[])
}

/// Users live in their own table of the same file, keyed `len(index id) || index id || user id`.
impl UserStore for RedbStore {
    fn put(&self, index_id: &[u8], user_id: &[u8], record: &[u8]) -> Result<(), UserStoreError> {
        let tx = self.db.begin_write().map_err(uio)?;
        {
            let mut t = tx.open_table(USERS).map_err(uio)?;
            t.insert(user_key(index_id, user_id).as_slice(), record)
                .map_err(uio)?;
        }
        tx.commit().map_err(uio)
    }

    fn get(&self, index_id: &[u8], user_id: &[u8]) -> Result<Option<Vec<u8>>, UserStoreError> {
        let tx = self.db.begin_read().map_err(uio)?;
        let t = tx.open_table(USERS).map_err(uio)?;
        Ok(t.get(user_key(index_id, user_id).as_slice())
            .map_err(uio)?
            .map(|v| v.value().to_vec()))
    }

    fn list(&self, index_id: &[u8]) -> Result<Vec<KeyValue>, UserStoreError> {
        let tx = self.db.begin_read().map_err(uio)?;
        let t = tx.open_table(USERS).map_err(uio)?;
        let prefix = user_prefix(index_id);
        let mut out = Vec::new();
        let iter = match prefix_upper_bound(&prefix) {
            Some(end) => t.range::<&[u8]>(prefix.as_slice()..end.as_slice()),
            None => t.range::<&[u8]>(prefix.as_slice()..),
        }
        .map_err(uio)?;
        for e in iter {
            let (k, v) = e.map_err(uio)?;
            out.push((k.value()[prefix.len()..].to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn delete(&self, index_id: &[u8], user_id: &[u8]) -> Result<bool, UserStoreError> {
        let tx = self.db.begin_write().map_err(uio)?;
        let existed = {
            let mut t = tx.open_table(USERS).map_err(uio)?;
            let existed = t
                .remove(user_key(index_id, user_id).as_slice())
                .map_err(uio)?
                .is_some();
            existed
        };
        tx.commit().map_err(uio)?;
        Ok(existed)
    }

    fn delete_index(&self, index_id: &[u8]) -> Result<(), UserStoreError> {
        let ids: Vec<Vec<u8>> = self.list(index_id)?.into_iter().map(|(k, _)| k).collect();
        let tx = self.db.begin_write().map_err(uio)?;
        {
            let mut t = tx.open_table(USERS).map_err(uio)?;
            for id in ids {
                t.remove(user_key(index_id, &id).as_slice()).map_err(uio)?;
            }
        }
        tx.commit().map_err(uio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_returns_freed_pages_and_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let key = |i: u32| format!("k{i:05}").into_bytes();
        let value = |i: u32| vec![(i % 251) as u8; 16 << 10];
        {
            let s = RedbStore::open_dir(dir.path()).unwrap();
            for chunk in (0..2000u32).collect::<Vec<_>>().chunks(100) {
                let mut b = WriteBatch::new();
                for &i in chunk {
                    b.put(key(i), value(i));
                }
                s.write(b).unwrap();
            }
        }
        // Reopening replays the log into redb: the values now have pages in the file, which
        // the deletes then free (deleted in the same replay, they would never get pages).
        let s = RedbStore::open_dir(dir.path()).unwrap();
        let mut b = WriteBatch::new();
        for i in (0..2000u32).filter(|i| i % 10 != 0) {
            b.delete(key(i));
        }
        s.write(b).unwrap();
        drop(s);
        let (before, after) = RedbStore::compact_dir(dir.path()).unwrap();
        assert!(before > 20 << 20, "{before}");
        assert!(after * 3 < before, "{before} -> {after}");
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            after
        );
        let s = RedbStore::open_dir(dir.path()).unwrap();
        let all = s.scan_prefix(b"k").unwrap();
        assert_eq!(all.len(), 200);
        for (k, v) in all {
            let i: u32 = std::str::from_utf8(&k[1..]).unwrap().parse().unwrap();
            assert_eq!(i % 10, 0);
            assert_eq!(v, value(i));
        }
        drop(s);
        // A store open elsewhere is not compacted under it.
        let _open = RedbStore::open_dir(dir.path()).unwrap();
        assert!(RedbStore::compact_dir(dir.path()).is_err());
    }

    #[test]
    fn batch_prefix_scan_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open_dir(dir.path()).unwrap();
            let mut b = WriteBatch::new();
            b.put(b"a/1".to_vec(), b"one".to_vec())
                .put(b"a/2".to_vec(), b"two".to_vec())
                .put(b"b/1".to_vec(), b"three".to_vec());
            s.write(b).unwrap();
            let mut b = WriteBatch::new();
            b.delete(b"a/1".to_vec());
            s.write(b).unwrap();
        }
        let s = RedbStore::open_dir(dir.path()).unwrap();
        assert_eq!(IndexStore::get(&s, b"a/1").unwrap(), None);
        assert_eq!(IndexStore::get(&s, b"a/2").unwrap(), Some(b"two".to_vec()));
        assert_eq!(s.scan_keys(b"a/").unwrap(), vec![b"a/2".to_vec()]);
        let mut b = WriteBatch::new();
        b.delete_prefix(b"a/".to_vec())
            .put(b"a/9".to_vec(), b"x".to_vec());
        s.write(b).unwrap();
        let all = s.scan_prefix(b"").unwrap();
        assert_eq!(
            all,
            vec![
                (b"a/9".to_vec(), b"x".to_vec()),
                (b"b/1".to_vec(), b"three".to_vec())
            ]
        );
        assert_eq!(
            s.get_many(&[b"b/1".to_vec(), b"zz".to_vec()]).unwrap(),
            vec![Some(b"three".to_vec()), None]
        );
    }

    fn small_segments(durability: Durability) -> WalOptions {
        WalOptions {
            durability,
            segment_bytes: 300,
            segment_keys: 8,
        }
    }

    fn put(s: &RedbStore, k: &str, v: &str) {
        let mut b = WriteBatch::new();
        b.put(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        s.write(b).unwrap();
    }

    #[test]
    fn crash_before_checkpoint_loses_no_acknowledged_batch() {
        for durability in [Durability::Sync, Durability::Relaxed] {
            let dir = tempfile::tempdir().unwrap();
            let opts = WalOptions {
                durability,
                ..WalOptions::default()
            };
            let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
            for i in 0..50 {
                put(&s, &format!("a/{i:03}"), &format!("v{i}"));
            }
            let mut b = WriteBatch::new();
            b.delete_prefix(b"a/00".to_vec())
                .put(b"a/005".to_vec(), b"again".to_vec())
                .delete(b"a/049".to_vec());
            s.write(b).unwrap();
            // Nothing was checkpointed: everything lives in the log.
            assert_eq!(wal::segment_files(dir.path()).len(), 1);
            s.crash();
            let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
            let keys = s.scan_keys(b"a/").unwrap();
            assert_eq!(keys.len(), 50 - 10 + 1 - 1);
            assert_eq!(
                IndexStore::get(&s, b"a/005").unwrap(),
                Some(b"again".to_vec())
            );
            assert_eq!(IndexStore::get(&s, b"a/007").unwrap(), None);
            assert_eq!(IndexStore::get(&s, b"a/049").unwrap(), None);
            assert_eq!(
                IndexStore::get(&s, b"a/048").unwrap(),
                Some(b"v48".to_vec())
            );
            // A clean close leaves everything in redb: without any log the data is intact.
            drop(s);
            for f in wal::segment_files(dir.path()) {
                std::fs::remove_file(f).unwrap();
            }
            let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
            assert_eq!(s.scan_keys(b"a/").unwrap().len(), 40);
        }
    }

    #[test]
    fn torn_log_tail_is_ignored_and_earlier_batches_survive() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open_dir(dir.path()).unwrap();
        put(&s, "k1", "one");
        put(&s, "k2", "two");
        s.crash();
        let log = wal::segment_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        // Half of a third record, as if the process died during the append.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3, 4, 0, 0]).unwrap();
        drop(f);
        assert!(std::fs::metadata(&log).unwrap().len() > len);
        let s = RedbStore::open_dir(dir.path()).unwrap();
        assert_eq!(IndexStore::get(&s, b"k1").unwrap(), Some(b"one".to_vec()));
        assert_eq!(IndexStore::get(&s, b"k2").unwrap(), Some(b"two".to_vec()));
        // New writes after the recovered log are not hidden behind the torn record.
        put(&s, "k3", "three");
        s.crash();
        let s = RedbStore::open_dir(dir.path()).unwrap();
        assert_eq!(s.scan_keys(b"k").unwrap().len(), 3);
    }

    /// Random batches against a BTreeMap model while tiny segments force constant
    /// checkpoints in the background; reads must always match the model.
    #[test]
    fn reads_match_a_model_across_checkpoints_and_reopen() {
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let opts = small_segments(Durability::Relaxed);
        let mut s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
        for round in 0..400 {
            let mut b = WriteBatch::new();
            for _ in 0..rng.random_range(1..5) {
                let k =
                    format!("{}/{}", rng.random_range(0..4), rng.random_range(0..30)).into_bytes();
                match rng.random_range(0..10) {
                    0 => {
                        let p = k[..2].to_vec();
                        model.retain(|key, _| !key.starts_with(&p));
                        b.delete_prefix(p);
                    }
                    1..=3 => {
                        model.remove(&k);
                        b.delete(k);
                    }
                    _ => {
                        let v = format!("v{round}-{}", rng.random_range(0..1000)).into_bytes();
                        model.insert(k.clone(), v.clone());
                        b.put(k, v);
                    }
                }
            }
            s.write(b).unwrap();
            let p = format!("{}/", rng.random_range(0..4)).into_bytes();
            let want: Vec<KeyValue> = model
                .iter()
                .filter(|(k, _)| k.starts_with(&p))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(s.scan_prefix(&p).unwrap(), want, "round {round}");
            let k = format!("{}/{}", rng.random_range(0..4), rng.random_range(0..30)).into_bytes();
            assert_eq!(IndexStore::get(&s, &k).unwrap(), model.get(&k).cloned());
            if round % 100 == 99 {
                if round % 200 == 199 {
                    s.crash();
                } else {
                    drop(s);
                }
                s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
                let all: Vec<KeyValue> = model.clone().into_iter().collect();
                assert_eq!(s.scan_prefix(b"").unwrap(), all, "after reopen at {round}");
            }
        }
    }

    /// Several writers and readers at once, with segments so small that every few batches
    /// rotate and writers regularly wait for the checkpointer (the backpressure path).
    #[test]
    fn concurrent_writers_and_readers_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            durability: Durability::Relaxed,
            segment_bytes: 2048,
            segment_keys: 16,
        };
        let s = std::sync::Arc::new(RedbStore::open_dir_with(dir.path(), opts).unwrap());
        let writers: Vec<_> = (0..4u32)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for round in 0..150u32 {
                        let mut b = WriteBatch::new();
                        for k in 0..5u32 {
                            b.put(
                                format!("w{t}/{:02}", (round + k) % 20).into_bytes(),
                                format!("{round}").into_bytes(),
                            );
                        }
                        if round % 7 == 0 {
                            b.delete(format!("w{t}/{:02}", round % 20).into_bytes());
                        }
                        s.write(b).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    for (k, v) in s.scan_prefix(b"w").unwrap() {
                        // Every visible value is a whole number some batch wrote.
                        let v: u32 = String::from_utf8(v).unwrap().parse().unwrap();
                        assert!(v < 150, "{k:?}");
                    }
                }
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        reader.join().unwrap();
        // What each key must hold: replay each writer's batches in order.
        let mut want = std::collections::BTreeMap::new();
        for t in 0..4u32 {
            for round in 0..150u32 {
                for k in 0..5u32 {
                    want.insert(format!("w{t}/{:02}", (round + k) % 20), format!("{round}"));
                }
                if round % 7 == 0 {
                    want.remove(&format!("w{t}/{:02}", round % 20));
                }
            }
        }
        let want: Vec<KeyValue> = want
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
            .collect();
        assert_eq!(s.scan_prefix(b"w").unwrap(), want);
        let s = std::sync::Arc::into_inner(s).unwrap();
        s.crash();
        let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
        assert_eq!(s.scan_prefix(b"w").unwrap(), want);
    }

    #[test]
    fn users_roundtrip_and_are_scoped_per_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open_dir(dir.path()).unwrap();
        s.put(b"idx1", b"u1", b"r1").unwrap();
        s.put(b"idx1", b"u2", b"r2").unwrap();
        s.put(b"idx10", b"u9", b"r9").unwrap();
        assert_eq!(
            UserStore::get(&s, b"idx1", b"u2").unwrap(),
            Some(b"r2".to_vec())
        );
        let l = s.list(b"idx1").unwrap();
        assert_eq!(
            l,
            vec![
                (b"u1".to_vec(), b"r1".to_vec()),
                (b"u2".to_vec(), b"r2".to_vec())
            ]
        );
        assert!(s.delete(b"idx1", b"u1").unwrap());
        assert!(!s.delete(b"idx1", b"u1").unwrap());
        s.delete_index(b"idx1").unwrap();
        assert!(s.list(b"idx1").unwrap().is_empty());
        assert_eq!(s.list(b"idx10").unwrap().len(), 1);
    }

    #[test]
    fn second_open_of_same_file_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let _s = RedbStore::open_dir(dir.path()).unwrap();
        assert!(matches!(
            RedbStore::open_dir(dir.path()),
            Err(StoreError::Unavailable(_))
        ));
    }
}

#[cfg(test)]
mod conformance_tests {
    use std::sync::Arc;

    #[test]
    fn conforms_to_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        sealdb_plugin_api::conformance::run_all(&move || {
            Arc::new(super::RedbStore::open_dir(&p).unwrap())
        });
    }
}
