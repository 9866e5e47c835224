//! A throwaway in-memory [`IndexStore`] (`CYBORGDB_DB_TYPE=memory`): nothing survives a restart.
//! Useful for tests and demos; it still only ever holds sealed values.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use sealdb_plugin_api::store::prefix_upper_bound;
use sealdb_plugin_api::{
    IndexStore, KeyValue, StoreError, UserStore, UserStoreError, WriteBatch, WriteOp,
};

/// Users keyed by `(index id, user id)`.
type UserMap = BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>>;

/// An [`IndexStore`] in a `BTreeMap` behind a lock.
#[derive(Default)]
pub struct MemoryStore {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
    users: RwLock<UserMap>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn range_of(prefix: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let end = match prefix_upper_bound(prefix) {
        Some(e) => Bound::Excluded(e),
        None => Bound::Unbounded,
    };
    (Bound::Included(prefix.to_vec()), end)
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("memory store lock poisoned".into())
}

impl IndexStore for MemoryStore {
    fn backend(&self) -> &str {
        "memory"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.read().map_err(poisoned)?.get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let map = self.map.read().map_err(poisoned)?;
        Ok(map
            .range(range_of(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut map = self.map.write().map_err(poisoned)?;
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { key, value } => {
                    map.insert(key, value);
                }
                WriteOp::Delete { key } => {
                    map.remove(&key);
                }
                WriteOp::DeletePrefix { prefix } => {
                    let keys: Vec<Vec<u8>> = map
                        .range(range_of(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in keys {
                        map.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }
}

fn upoisoned<T>(_: T) -> UserStoreError {
    UserStoreError::Io("memory store lock poisoned".into())
}

impl UserStore for MemoryStore {
    fn put(&self, index_id: &[u8], user_id: &[u8], record: &[u8]) -> Result<(), UserStoreError> {
        self.users
            .write()
            .map_err(upoisoned)?
            .insert((index_id.to_vec(), user_id.to_vec()), record.to_vec());
        Ok(())
    }

    fn get(&self, index_id: &[u8], user_id: &[u8]) -> Result<Option<Vec<u8>>, UserStoreError> {
        Ok(self
            .users
            .read()
            .map_err(upoisoned)?
            .get(&(index_id.to_vec(), user_id.to_vec()))
            .cloned())
    }

    fn list(&self, index_id: &[u8]) -> Result<Vec<KeyValue>, UserStoreError> {
        Ok(self
            .users
            .read()
            .map_err(upoisoned)?
            .iter()
            .filter(|((i, _), _)| i == index_id)
            .map(|((_, u), r)| (u.clone(), r.clone()))
            .collect())
    }

    fn delete(&self, index_id: &[u8], user_id: &[u8]) -> Result<bool, UserStoreError> {
        Ok(self
            .users
            .write()
            .map_err(upoisoned)?
            .remove(&(index_id.to_vec(), user_id.to_vec()))
            .is_some())
    }

    fn delete_index(&self, index_id: &[u8]) -> Result<(), UserStoreError> {
        self.users
            .write()
            .map_err(upoisoned)?
            .retain(|(i, _), _| i != index_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ops() {
        let s = MemoryStore::new();
        let mut b = WriteBatch::new();
        b.put(b"x/1".to_vec(), b"1".to_vec())
            .put(b"x/2".to_vec(), b"2".to_vec())
            .put(b"y".to_vec(), b"3".to_vec());
        s.write(b).unwrap();
        assert_eq!(s.scan_keys(b"x/").unwrap().len(), 2);
        let mut b = WriteBatch::new();
        b.delete_prefix(b"x/".to_vec());
        s.write(b).unwrap();
        assert!(s.scan_prefix(b"x/").unwrap().is_empty());
        assert_eq!(IndexStore::get(&s, b"y").unwrap(), Some(b"3".to_vec()));
    }
}

#[cfg(test)]
mod conformance_tests {
    use std::sync::Arc;

    #[test]
    fn conforms_to_the_store_contract() {
        // One instance stands for "the same data" on every open.
        let m = Arc::new(super::MemoryStore::new());
        sealdb_plugin_api::conformance::run_all(&move || m.clone());
    }
}
