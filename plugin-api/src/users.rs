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
}
