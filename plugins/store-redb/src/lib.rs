//! The default, embedded [`IndexStore`]: redb files on local disk behind a write-ahead log.
//!
//! Records live in a redb table keyed by the server's byte keys: in the main file, or, for
//! key families the [`Grouping`] names, in a file per group that a prefix delete of the
//! group removes whole (see [`files`]). A [`WriteBatch`]
//! is appended to the log as one checksummed record (made durable with `fdatasync` under
//! [`Durability::Sync`], the default) and is visible to readers at once; a background thread
//! moves the log into redb in large durable transactions (see [`wal`]). After a crash the log
//! is replayed on open, so a batch is either wholly visible or absent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{ReadableDatabase, TableDefinition};
use sealdb_plugin_api::store::prefix_upper_bound;
use sealdb_plugin_api::{IndexStore, KeyValue, StoreError, UserStore, UserStoreError, WriteBatch};

pub mod files;
pub mod wal;
pub use files::Grouping;
pub use wal::{Durability, WalOptions};

pub(crate) const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("users");

/// redb page-cache size.
pub const CACHE_BYTES: usize = 8 << 20;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "sealdb.redb";

/// An [`IndexStore`] backed by redb database files and a write-ahead log in the same
/// directory.
pub struct RedbStore {
    files: Arc<files::Files>,
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
    /// log left behind, move every record to the file `grouping` puts it in (a store laid
    /// out otherwise, e.g. created before groups, takes `grouping` from then on), then let
    /// redb move the live pages of each file to its front and truncate it (what deletes
    /// inside a file freed is otherwise kept for reuse, never returned). Returns the files'
    /// total size before and after.
    pub fn compact_dir(dir: &Path, grouping: Grouping) -> Result<(u64, u64), StoreError> {
        // Replay the log (a compaction that stopped part-way wrote none after it began).
        drop(Self::open_inner(dir, WalOptions::default(), true)?);
        let main = dir.join(FILE_NAME);
        let paths = |dir: &Path| [vec![main.clone()], files::group_paths(dir)].concat();
        let size = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| StoreError::Io(format!("{}: {e}", p.display())))
        };
        let mut before = 0;
        for path in paths(dir) {
            before += size(&path)?;
        }
        files::regroup(dir, files::open_db(&main, CACHE_BYTES, false)?, grouping)?;
        let mut after = 0;
        for path in paths(dir) {
            let mut db = files::open_db(&path, CACHE_BYTES, false)?;
            db.compact().map_err(io)?;
            drop(db);
            after += size(&path)?;
        }
        Ok((before, after))
    }

    /// Open (creating if needed) the store in directory `dir`. Log segments left by a crash
    /// are replayed into the database before this returns.
    pub fn open_dir_with(dir: &Path, opts: WalOptions) -> Result<Self, StoreError> {
        Self::open_inner(dir, opts, false)
    }

    /// [`open_dir_with`](Self::open_dir_with); `compacting`: also a store whose records an
    /// interrupted compaction was moving, for the compaction that finishes the move.
    fn open_inner(dir: &Path, opts: WalOptions, compacting: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        // The server caches what it decrypted under its own budget and the OS caches the
        // files; small redb caches keep memory from counting the data a third time.
        // The kernel's readahead stays on: it reads about three times the bytes a cold
        // query asks for (10M x 128: 12.5 MB from the disk for 3.9 MB of values), yet with
        // POSIX_FADV_RANDOM the same queries took 39-40 ms instead of 19-26 ms with the page
        // cache dropped, as neighbouring records (a list's codes, a block's row records)
        // then cost a read each.
        let db = files::open_db(&path, CACHE_BYTES, true)?;
        // Create the tables so that readers never see "table does not exist".
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(RECORDS).map_err(io)?;
        tx.open_table(USERS).map_err(io)?;
        tx.commit().map_err(io)?;
        let files = Arc::new(match compacting {
            true => files::Files::open_any(dir, db, opts.grouping)?,
            false => files::Files::open(dir, db, opts.grouping)?,
        });
        let wal = Arc::new(wal::Wal::open(files.clone(), dir, opts)?);
        let worker = wal.clone();
        let checkpointer = std::thread::Builder::new()
            .name("redb-checkpoint".into())
            .spawn(move || worker.run_checkpointer())
            .map_err(io)?;
        Ok(Self {
            files,
            wal,
            checkpointer: Some(checkpointer),
            path,
        })
    }

    /// The main database file.
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
        let tx = self.files.main.begin_write().map_err(uio)?;
        {
            let mut t = tx.open_table(USERS).map_err(uio)?;
            t.insert(user_key(index_id, user_id).as_slice(), record)
                .map_err(uio)?;
        }
        tx.commit().map_err(uio)
    }

    fn get(&self, index_id: &[u8], user_id: &[u8]) -> Result<Option<Vec<u8>>, UserStoreError> {
        let tx = self.files.main.begin_read().map_err(uio)?;
        let t = tx.open_table(USERS).map_err(uio)?;
        Ok(t.get(user_key(index_id, user_id).as_slice())
            .map_err(uio)?
            .map(|v| v.value().to_vec()))
    }

    fn list(&self, index_id: &[u8]) -> Result<Vec<KeyValue>, UserStoreError> {
        let tx = self.files.main.begin_read().map_err(uio)?;
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
        let tx = self.files.main.begin_write().map_err(uio)?;
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
        let tx = self.files.main.begin_write().map_err(uio)?;
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
mod tests;

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

    /// The same contract with most of the suite's keys in group files.
    #[test]
    fn conforms_to_the_store_contract_with_groups() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        let opts = super::WalOptions {
            grouping: super::Grouping {
                kinds: b"LMkscb\x01\x02",
                prefix_len: 2,
            },
            ..Default::default()
        };
        sealdb_plugin_api::conformance::run_all(&move || {
            Arc::new(super::RedbStore::open_dir_with(&p, opts).unwrap())
        });
    }
}
