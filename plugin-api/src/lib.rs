//! Contracts between the SealDB server and its plugins.
//!
//! This crate is deliberately small and has no heavy dependencies: a storage backend, a key
//! management service or a user directory implements one trait from here and nothing else.
//!
//! * [`IndexStore`] — an ordered key/value store with atomic batches. It only ever sees sealed
//!   (encrypted and authenticated) values; see the server's `docs/FORMAT.md` for what the keys
//!   and values are.
//! * [`KmsProvider`] — wraps and unwraps index key-encryption keys with an external KMS.
//! * [`UserStore`] — keeps per-index user records for RBAC.
//!
//! All traits are object safe (`Arc<dyn IndexStore>` is how the server holds them). The store
//! and user-store methods are blocking: the server calls them from its blocking thread pool,
//! never from an async task, so an implementation may do file I/O directly. [`KmsProvider`] is
//! async (its calls are network round trips; `async-trait` is re-exported for implementors).
//! All stay expressible over a plain C ABI for dynamically loaded plugins.

pub mod abi;
pub mod export;
pub mod kms;
pub mod store;
pub mod users;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use async_trait::async_trait;
pub use kms::{BlockingKmsProvider, KmsError, KmsProvider, SlotFields, Wrapped};
pub use store::{IndexStore, KeyValue, StoreError, WriteBatch, WriteOp};
pub use users::{KvUserStore, UserStore, UserStoreError};
pub use zeroize::Zeroizing;
