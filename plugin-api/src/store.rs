//! The storage contract: an ordered byte-key/byte-value map with atomic batches.

use thiserror::Error;

/// Errors an [`IndexStore`] reports. Every variant carries a human readable reason; none may
/// carry key material or record contents.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The underlying medium failed (disk full, permission denied, network down, ...).
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The store's own structures are damaged and cannot be read.
    #[error("storage is corrupt: {0}")]
    Corrupt(String),
    /// The store cannot serve requests right now (closed, locked by another process, ...).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Shared stores only ([`IndexStore::write_guarded`]): another writer changed a guarded
    /// scope first. Nothing of the batch was written; read again and retry.
    #[error("storage conflict: {0}")]
    Conflict(String),
}

/// A `(key, value)` pair returned by scans.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One operation of a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Insert or overwrite `key`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Remove `key`; removing a missing key is not an error.
    Delete { key: Vec<u8> },
    /// Remove every key that starts with `prefix`.
    DeletePrefix { prefix: Vec<u8> },
}

/// An ordered list of writes applied atomically by [`IndexStore::write`].
///
/// Operations apply in order, so a `Put` after a `DeletePrefix` covering the same key survives.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue an insert-or-overwrite.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Queue a removal of one key.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::Delete { key: key.into() });
        self
    }

    /// Queue a removal of every key starting with `prefix`.
    pub fn delete_prefix(&mut self, prefix: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }

    /// Whether no operation is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of queued operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The queued operations, in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// Take the queued operations.
    pub fn into_ops(self) -> Vec<WriteOp> {
        self.ops
    }

    /// Queue every operation of `other` after those already queued.
    pub fn extend(&mut self, other: WriteBatch) -> &mut Self {
        self.ops.extend(other.ops);
        self
    }
}

/// An ordered key/value store holding one server's indexes.
///
/// # Contract
/// * **Opaque values.** Values are arbitrary bytes; the server only writes sealed (AES-256-GCM)
///   records, so an implementation never needs to look inside them.
/// * **Ordering.** Keys compare as unsigned byte strings; [`scan_prefix`](Self::scan_prefix)
///   returns matches in ascending key order.
/// * **Atomicity and durability.** [`write`](Self::write) applies a whole batch or nothing.
///   Once it returns `Ok`, the batch survives a process crash; after a crash during the call,
///   either the whole batch is visible or none of it is.
/// * **Isolation.** A read that runs concurrently with a write sees the store either before
///   or after the batch, never part of it.
/// * **Blocking.** Methods may block on I/O; callers run them off the async executor.
pub trait IndexStore: Send + Sync + 'static {
    /// Short name of the backend, for logs (`"redb"`, `"memory"`, ...).
    fn backend(&self) -> &str;

    /// Read one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Read several keys at once; the result is parallel to `keys`. Backends that can read
    /// many keys in one transaction should override this.
    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// Every `(key, value)` whose key starts with `prefix`, in ascending key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError>;

    /// Every key starting with `prefix`, in ascending order. Backends that can list keys
    /// without reading values should override this.
    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .scan_prefix(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Apply `batch` atomically and durably (see the trait documentation).
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Shared stores (several servers writing one bucket) only: the version of `scope`, the
    /// sequence number of the last batch that named it in [`write_guarded`](Self::write_guarded)
    /// (`0` when none did), as this process sees the store now. A store that one process owns
    /// returns `None` (the default), and callers skip every freshness check.
    fn version(&self, _scope: &[u8]) -> Option<u64> {
        None
    }

    /// [`write`](Self::write), applied only if every `(scope, version)` in `guards` still
    /// holds when the batch commits; the batch then becomes the new version of each of those
    /// scopes, which is returned. When another writer changed one of them first, nothing is
    /// written and the result is [`StoreError::Conflict`]. Stores that one process owns have
    /// no other writers: the default writes and returns `None`.
    fn write_guarded(
        &self,
        batch: WriteBatch,
        _guards: &[(&[u8], u64)],
    ) -> Result<Option<u64>, StoreError> {
        self.write(batch).map(|()| None)
    }
}

/// The smallest key strictly greater than every key starting with `prefix`, or `None` when
/// no such key exists (the prefix is empty or all `0xff`). Useful for range-based backends.
pub fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_bound_increments_last_byte() {
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_upper_bound(&[0xff, 0xff]), None);
        assert_eq!(prefix_upper_bound(b""), None);
    }

    #[test]
    fn batch_keeps_order() {
        let mut b = WriteBatch::new();
        b.delete_prefix("a").put("a1", "x").delete("a2");
        assert_eq!(b.len(), 3);
        assert!(matches!(b.ops()[1], WriteOp::Put { .. }));
    }
}
