//! The default, embedded [`IndexStore`]: one [redb](https://docs.rs/redb) file on local disk.
//!
//! All records live in a single table keyed by the server's byte keys. A [`WriteBatch`] is one
//! redb write transaction, committed with redb's default durability (fsync before `write`
//! returns), which gives the trait's crash guarantee: after a crash a batch is either wholly
//! visible or absent.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sealdb_plugin_api::store::prefix_upper_bound;
use sealdb_plugin_api::{
    IndexStore, KeyValue, StoreError, UserStore, UserStoreError, WriteBatch, WriteOp,
};

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("users");

/// redb page-cache size.
pub const CACHE_BYTES: usize = 8 << 20;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "sealdb.redb";

/// An [`IndexStore`] backed by a redb database file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedbStore {
    /// Open (creating if needed) the store in directory `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        Self::open_file(&dir.join(FILE_NAME))
    }

    /// Open (creating if needed) the database file at `path`.
    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        // The server keeps opened indexes decrypted in memory, so redb's page cache would
        // only duplicate them; a small cache keeps memory proportional to the data once.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                    "{} is already open in another process",
                    path.display()
                )),
                other => StoreError::Io(format!("cannot open {}: {other}", path.display())),
            })?;
        // Create the table so that readers never see "table does not exist".
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(RECORDS).map_err(io)?;
        tx.open_table(USERS).map_err(io)?;
        tx.commit().map_err(io)?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn scan<T>(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(RECORDS).map_err(io)?;
        let mut out = Vec::new();
        let upper = prefix_upper_bound(prefix);
        let iter = match &upper {
            Some(end) => table.range::<&[u8]>(prefix..end.as_slice()),
            None => table.range::<&[u8]>(prefix..),
        }
        .map_err(io)?;
        for entry in iter {
            let (k, v) = entry.map_err(io)?;
            out.push(f(k.value(), v.value()));
        }
        Ok(out)
    }
}

impl IndexStore for RedbStore {
    fn backend(&self) -> &str {
        "redb"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(RECORDS).map_err(io)?;
        Ok(table.get(key).map_err(io)?.map(|v| v.value().to_vec()))
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(RECORDS).map_err(io)?;
        keys.iter()
            .map(|k| {
                Ok(table
                    .get(k.as_slice())
                    .map_err(io)?
                    .map(|v| v.value().to_vec()))
            })
            .collect()
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.scan(prefix, |k, v| (k.to_vec(), v.to_vec()))
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.scan(prefix, |k, _| k.to_vec())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(RECORDS).map_err(io)?;
            for op in batch.into_ops() {
                match op {
                    WriteOp::Put { key, value } => {
                        table.insert(key.as_slice(), value.as_slice()).map_err(io)?;
                    }
                    WriteOp::Delete { key } => {
                        table.remove(key.as_slice()).map_err(io)?;
                    }
                    WriteOp::DeletePrefix { prefix } => {
                        let upper = prefix_upper_bound(&prefix);
                        let keys: Vec<Vec<u8>> = {
                            let iter = match &upper {
                                Some(end) => {
                                    table.range::<&[u8]>(prefix.as_slice()..end.as_slice())
                                }
                                None => table.range::<&[u8]>(prefix.as_slice()..),
                            }
                            .map_err(io)?;
                            let mut keys = Vec::new();
                            for entry in iter {
                                keys.push(entry.map_err(io)?.0.value().to_vec());
                            }
                            keys
                        };
                        for k in keys {
                            table.remove(k.as_slice()).map_err(io)?;
                        }
                    }
                }
            }
        }
        // Dropping `tx` without commit aborts it, so an error above leaves nothing behind.
        tx.commit().map_err(io)
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
