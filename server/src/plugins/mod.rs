//! The registry of KMS providers and stores, built-in and loaded from plugin libraries,
//! through one path: a built-in and a plugin are both a factory under a name. `kms.registry`
//! slots name a provider; `--db-type` names a store.
//!
//! * [`loader`]: loading a library and calling through its C tables (all host-side `unsafe`).
//! * [`dylib`]: a loaded plugin's tables as a [`KmsProvider`] / [`IndexStore`], with timeouts.

pub mod dylib;
pub mod loader;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sealdb_plugin_api::{
    async_trait, IndexStore, KmsError, KmsProvider, KvUserStore, SlotFields, UserStore,
};

pub use loader::Plugin;

/// The configured stores: indexes and users (one backend serves both).
pub struct Stores {
    pub index: Arc<dyn IndexStore>,
    pub users: Arc<dyn UserStore>,
}

impl Stores {
    /// Both stores in one throwaway in-memory backend.
    pub fn memory() -> Self {
        Self::layered(Arc::new(sealdb_store_memory::MemoryStore::new()))
    }

    /// RBAC records live inside the index store (under `'U' || index id`), so deleting an
    /// index removes its grants in the same atomic batch.
    pub fn layered(index: Arc<dyn IndexStore>) -> Self {
        Self {
            users: Arc::new(KvUserStore(index.clone())),
            index,
        }
    }
}

/// When the disk backend acknowledges a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Sync,
    Relaxed,
}

/// What a store factory gets to open its store.
pub struct StoreSettings<'a> {
    pub disk_path: &'a Path,
    pub durability: Durability,
    /// Compact the store's file before opening it (`--compact-on-start`; redb only).
    pub compact: bool,
    /// Longest a plugin call may take.
    pub plugin_timeout: Duration,
    /// The bucket of the `s3` store, and how it behaves.
    pub s3: sealdb_store_s3::S3Settings,
    pub s3_options: sealdb_store_s3::S3Options,
}

/// Opens a store by name.
pub trait StoreFactory: Send + Sync {
    fn open(&self, s: &StoreSettings<'_>) -> Result<Stores, String>;
}

/// Makes a KMS provider for one slot from its fields.
#[async_trait]
pub trait KmsFactory: Send + Sync {
    async fn create(&self, fields: &SlotFields) -> Result<Arc<dyn KmsProvider>, KmsError>;
}

/// Keys only: a plugin's configuration can hold credentials.
impl std::fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginConfig")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One `plugins:` entry of the YAML file.
#[derive(Clone, PartialEq)]
pub struct PluginConfig {
    pub path: PathBuf,
    /// Hex SHA-256 the file must have.
    pub sha256: Option<String>,
    /// Handed to a store plugin as JSON (with `disk_path` added when absent).
    pub config: serde_json::Map<String, serde_json::Value>,
}

struct Vault;
struct Aws;

#[async_trait]
impl KmsFactory for Vault {
    async fn create(&self, f: &SlotFields) -> Result<Arc<dyn KmsProvider>, KmsError> {
        Ok(Arc::new(sealdb_kms_vault::VaultProvider::new(f).await?))
    }
}

#[async_trait]
impl KmsFactory for Aws {
    async fn create(&self, f: &SlotFields) -> Result<Arc<dyn KmsProvider>, KmsError> {
        Ok(Arc::new(sealdb_kms_aws::AwsKmsProvider::new(f).await?))
    }
}

struct DylibKmsFactory {
    plugin: Arc<Plugin>,
    provider: String,
    timeout: Duration,
}

#[async_trait]
impl KmsFactory for DylibKmsFactory {
    async fn create(&self, f: &SlotFields) -> Result<Arc<dyn KmsProvider>, KmsError> {
        Ok(Arc::new(
            dylib::DylibKms::create(self.plugin.clone(), &self.provider, f, self.timeout).await?,
        ))
    }
}

struct Redb;

/// How the built-in redb store lays out a new data directory: each generation's blocks, row
/// records, codes and runs in files of their own, so that a training's final batch, which
/// deletes the old generation, deletes its files (docs/FORMAT.md "Store files").
pub fn redb_grouping() -> sealdb_store_redb::Grouping {
    sealdb_store_redb::Grouping {
        kinds: crate::engine::format::GENERATION_KINDS,
        prefix_len: crate::engine::format::GENERATION_PREFIX_LEN,
    }
}
struct Memory;
struct Filesystem;
struct S3;

impl StoreFactory for S3 {
    fn open(&self, s: &StoreSettings<'_>) -> Result<Stores, String> {
        let st = sealdb_store_s3::S3Store::open(&s.s3, s.s3_options.clone())
            .map_err(|e| format!("CYBORGDB_DB_TYPE=s3: {e}"))?;
        Ok(Stores::layered(Arc::new(st)))
    }
}

impl StoreFactory for Redb {
    fn open(&self, s: &StoreSettings<'_>) -> Result<Stores, String> {
        if s.compact {
            let t = std::time::Instant::now();
            let (before, after) =
                sealdb_store_redb::RedbStore::compact_dir(s.disk_path, redb_grouping())
                    .map_err(|e| format!("--compact-on-start: {e}"))?;
            tracing::info!(
                before_bytes = before,
                after_bytes = after,
                secs = t.elapsed().as_secs_f32(),
                "store compacted"
            );
        }
        let r = Arc::new(
            sealdb_store_redb::RedbStore::open_dir_with(
                s.disk_path,
                sealdb_store_redb::WalOptions {
                    durability: match s.durability {
                        Durability::Sync => sealdb_store_redb::Durability::Sync,
                        Durability::Relaxed => sealdb_store_redb::Durability::Relaxed,
                    },
                    grouping: redb_grouping(),
                    ..Default::default()
                },
            )
            .map_err(|e| format!("CYBORGDB_DISK_PATH={}: {e}", s.disk_path.display()))?,
        );
        Ok(Stores::layered(r))
    }
}

impl StoreFactory for Memory {
    fn open(&self, _: &StoreSettings<'_>) -> Result<Stores, String> {
        Ok(Stores::memory())
    }
}

impl StoreFactory for Filesystem {
    fn open(&self, s: &StoreSettings<'_>) -> Result<Stores, String> {
        let fs = sealdb_store_fs::FsStore::open(s.disk_path)
            .map_err(|e| format!("CYBORGDB_DISK_PATH={}: {e}", s.disk_path.display()))?;
        Ok(Stores::layered(Arc::new(fs)))
    }
}

struct DylibStoreFactory {
    plugin: Arc<Plugin>,
    config: serde_json::Map<String, serde_json::Value>,
}

impl StoreFactory for DylibStoreFactory {
    fn open(&self, s: &StoreSettings<'_>) -> Result<Stores, String> {
        let mut config = self.config.clone();
        config
            .entry("disk_path")
            .or_insert_with(|| s.disk_path.display().to_string().into());
        let text = serde_json::Value::Object(config).to_string();
        let store =
            dylib::DylibStore::open(self.plugin.clone(), &text, s.plugin_timeout).map_err(|e| {
                format!(
                    "store plugin '{}' ({}): {e}",
                    self.plugin.name,
                    self.plugin.path.display()
                )
            })?;
        Ok(Stores::layered(Arc::new(store)))
    }
}

/// Providers and stores by name.
pub struct Registry {
    kms: BTreeMap<String, Arc<dyn KmsFactory>>,
    stores: BTreeMap<String, Arc<dyn StoreFactory>>,
    /// Loaded plugin libraries, in configuration order.
    pub plugins: Vec<Arc<Plugin>>,
}

/// Names a plugin may not take.
const RESERVED: &[&str] = &[sealdb_kms_none::NAME];

impl Registry {
    /// The built-ins: providers `vault`, `aws-kms`; stores `disk` (redb), `memory`,
    /// `filesystem`, `s3`.
    pub fn builtin() -> Self {
        let mut kms: BTreeMap<String, Arc<dyn KmsFactory>> = BTreeMap::new();
        kms.insert(sealdb_kms_vault::NAME.into(), Arc::new(Vault));
        kms.insert(sealdb_kms_aws::NAME.into(), Arc::new(Aws));
        let mut stores: BTreeMap<String, Arc<dyn StoreFactory>> = BTreeMap::new();
        stores.insert("disk".into(), Arc::new(Redb));
        stores.insert("memory".into(), Arc::new(Memory));
        stores.insert("filesystem".into(), Arc::new(Filesystem));
        stores.insert("s3".into(), Arc::new(S3));
        Self {
            kms,
            stores,
            plugins: Vec::new(),
        }
    }

    /// Load every configured plugin and register what it offers. Any failure is an error
    /// naming the file and the reason.
    pub fn load(&mut self, cfgs: &[PluginConfig], timeout: Duration) -> Result<(), String> {
        for c in cfgs {
            let at = |e: String| format!("plugin {}: {e}", c.path.display());
            let p = Arc::new(loader::load(&c.path, c.sha256.as_deref()).map_err(at)?);
            if let Some(name) = &p.kms_provider {
                if RESERVED.contains(&name.as_str()) || self.kms.contains_key(name) {
                    return Err(at(format!(
                        "its KMS provider name '{name}' is already taken"
                    )));
                }
                self.kms.insert(
                    name.clone(),
                    Arc::new(DylibKmsFactory {
                        plugin: p.clone(),
                        provider: name.clone(),
                        timeout,
                    }),
                );
            }
            if let Some(name) = &p.store_name {
                if self.stores.contains_key(name) {
                    return Err(at(format!("its store name '{name}' is already taken")));
                }
                self.stores.insert(
                    name.clone(),
                    Arc::new(DylibStoreFactory {
                        plugin: p.clone(),
                        config: c.config.clone(),
                    }),
                );
            }
            tracing::info!(plugin = %p.name, version = %p.version, path = %p.path.display(),
                kms = ?p.kms_provider, store = ?p.store_name, abi_minor = p.abi_minor, "plugin loaded");
            self.plugins.push(p);
        }
        Ok(())
    }

    /// The KMS provider factories (the KMS registry keeps them for drift handling).
    pub fn kms_factories(&self) -> BTreeMap<String, Arc<dyn KmsFactory>> {
        self.kms.clone()
    }

    /// Store names, sorted.
    pub fn store_names(&self) -> Vec<String> {
        self.stores.keys().cloned().collect()
    }

    /// Open the store `--db-type` names (built-in names are case-insensitive).
    pub fn open_store(&self, db_type: &str, s: &StoreSettings<'_>) -> Result<Stores, String> {
        let f = self
            .stores
            .get(db_type)
            .or_else(|| self.stores.get(&db_type.to_ascii_lowercase()))
            .ok_or_else(|| {
                format!(
                    "CYBORGDB_DB_TYPE={db_type}: unknown store (this server has: {})",
                    self.store_names().join(", ")
                )
            })?;
        f.open(s)
    }
}
