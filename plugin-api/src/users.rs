//! The user-directory contract for per-index RBAC users.

use thiserror::Error;

/// Errors a [`UserStore`] reports.
#[derive(Debug, Error)]
pub enum UserStoreError {
    /// The backing medium failed.
    #[error("user store I/O failed: {0}")]
    Io(String),
    /// A stored record could not be decoded.
    #[error("user store is corrupt: {0}")]
    Corrupt(String),
    /// Shared stores only ([`UserStore::put_if`]): another server changed the index's user
    /// directory first; nothing was written.
    #[error("user store conflict: {0}")]
    Conflict(String),
}

/// Keeps one opaque, already sealed record per `(index id, user id)`.
///
/// The server seals every record before it reaches the store (the record holds the user's
/// wrapped copies of the index data key and a hash of the user's secret, never the secret
/// itself), so an implementation only stores and returns bytes. `index_id` and `user_id` are
/// random identifiers, not names.
pub trait UserStore: Send + Sync + 'static {
    /// Insert or replace a user record.
    fn put(&self, index_id: &[u8], user_id: &[u8], record: &[u8]) -> Result<(), UserStoreError>;
    /// Read one user record.
    fn get(&self, index_id: &[u8], user_id: &[u8]) -> Result<Option<Vec<u8>>, UserStoreError>;
    /// Every `(user id, record)` of one index, ordered by user id.
    fn list(&self, index_id: &[u8]) -> Result<Vec<crate::store::KeyValue>, UserStoreError>;
    /// Remove one user; returns whether it existed.
    fn delete(&self, index_id: &[u8], user_id: &[u8]) -> Result<bool, UserStoreError>;
    /// Remove every user of an index (the index is being deleted).
    fn delete_index(&self, index_id: &[u8]) -> Result<(), UserStoreError>;

    /// Shared stores (several servers on one bucket) only: the version of an index's user
    /// directory, moved by every [`put_if`](Self::put_if). `None` (the default) for stores
    /// one process owns.
    fn version(&self, _index_id: &[u8]) -> Option<u64> {
        None
    }

    /// [`put`](Self::put), only if the index's user directory is still at `version` (from
    /// [`version`](Self::version)); else [`UserStoreError::Conflict`] and nothing is written.
    /// Stores one process owns have no other writers: the default puts.
    fn put_if(
        &self,
        index_id: &[u8],
        user_id: &[u8],
        record: &[u8],
        _version: Option<u64>,
    ) -> Result<(), UserStoreError> {
        self.put(index_id, user_id, record)
    }
}

/// A [`UserStore`] kept inside an [`IndexStore`](crate::IndexStore), under the keys
/// `'U' || index id || user id` (the user record kind of the server's format). Stores that have
/// no user directory of their own (the filesystem store, plugin stores) use it; since the server
/// deletes an index with one batch over its `'U' || index id` prefix, the index's users go in
/// the same atomic batch.
pub struct KvUserStore<S: ?Sized>(pub std::sync::Arc<S>);

impl<S: crate::IndexStore + ?Sized> KvUserStore<S> {
    fn prefix(index_id: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + index_id.len() + 16);
        k.push(b'U');
        k.extend_from_slice(index_id);
        k
    }
    fn key(index_id: &[u8], user_id: &[u8]) -> Vec<u8> {
        let mut k = Self::prefix(index_id);
        k.extend_from_slice(user_id);
        k
    }
}

fn io(e: crate::StoreError) -> UserStoreError {
    match e {
        crate::StoreError::Conflict(m) => UserStoreError::Conflict(m),
        e => UserStoreError::Io(e.to_string()),
    }
}

impl<S: crate::IndexStore + ?Sized> UserStore for KvUserStore<S> {
    fn put(&self, index_id: &[u8], user_id: &[u8], record: &[u8]) -> Result<(), UserStoreError> {
        let mut b = crate::WriteBatch::new();
        b.put(Self::key(index_id, user_id), record.to_vec());
        self.0.write(b).map_err(io)
    }
    fn get(&self, index_id: &[u8], user_id: &[u8]) -> Result<Option<Vec<u8>>, UserStoreError> {
        self.0.get(&Self::key(index_id, user_id)).map_err(io)
    }
    fn list(&self, index_id: &[u8]) -> Result<Vec<crate::store::KeyValue>, UserStoreError> {
        let p = Self::prefix(index_id);
        Ok(self
            .0
            .scan_prefix(&p)
            .map_err(io)?
            .into_iter()
            .map(|(k, v)| (k[p.len()..].to_vec(), v))
            .collect())
    }
    fn delete(&self, index_id: &[u8], user_id: &[u8]) -> Result<bool, UserStoreError> {
        let k = Self::key(index_id, user_id);
        let existed = self.0.get(&k).map_err(io)?.is_some();
        let mut b = crate::WriteBatch::new();
        b.delete(k);
        self.0.write(b).map_err(io)?;
        Ok(existed)
    }
    fn delete_index(&self, index_id: &[u8]) -> Result<(), UserStoreError> {
        let mut b = crate::WriteBatch::new();
        b.delete_prefix(Self::prefix(index_id));
        self.0.write(b).map_err(io)
    }
    fn version(&self, index_id: &[u8]) -> Option<u64> {
        self.0.version(&Self::prefix(index_id))
    }
    fn put_if(
        &self,
        index_id: &[u8],
        user_id: &[u8],
        record: &[u8],
        version: Option<u64>,
    ) -> Result<(), UserStoreError> {
        let mut b = crate::WriteBatch::new();
        b.put(Self::key(index_id, user_id), record.to_vec());
        match version {
            None => self.0.write(b).map_err(io),
            Some(v) => self
                .0
                .write_guarded(b, &[(&Self::prefix(index_id), v)])
                .map(|_| ())
                .map_err(io),
        }
    }
}
