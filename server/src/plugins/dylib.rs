//! Adapters from a loaded plugin's tables to the server's traits: [`DylibKms`] is an async
//! [`KmsProvider`] whose calls run on the blocking pool under a timeout; [`DylibStore`] is an
//! [`IndexStore`] whose calls run on a small pool of threads under a timeout. A plugin that
//! errors, panics (caught inside the plugin) or hangs fails that one call with a message
//! naming the plugin; the server keeps serving. A hung call keeps its thread.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sealdb_plugin_api::abi::{codec, flat_json, status, Bytes, KmsTable, StoreTable};
use sealdb_plugin_api::{
    async_trait, IndexStore, KeyValue, KmsError, KmsProvider, SlotFields, StoreError, Wrapped,
    WriteBatch, Zeroizing,
};

use super::loader::{Handle, Plugin, Reply};

fn kms_error(plugin: &str, r: &Reply) -> KmsError {
    let m = format!("plugin '{plugin}': {}", r.message());
    match r.status {
        status::DENIED => KmsError::Denied(m),
        status::CANNOT_UNWRAP => KmsError::Unwrap(m),
        status::INVALID | status::NOT_FOUND => KmsError::Config(m),
        _ => KmsError::Unavailable(m),
    }
}

fn store_error(plugin: &str, r: &Reply) -> StoreError {
    let m = format!("store plugin '{plugin}': {}", r.message());
    match r.status {
        status::UNAVAILABLE => StoreError::Unavailable(m),
        status::INVALID => StoreError::Corrupt(m),
        _ => StoreError::Io(m),
    }
}

struct KmsInner {
    plugin: Arc<Plugin>,
    table: &'static KmsTable,
    handle: Handle,
}

impl Drop for KmsInner {
    fn drop(&mut self) {
        (self.table.destroy)(self.handle.0);
    }
}

/// A KMS slot served by a plugin.
pub struct DylibKms {
    inner: Arc<KmsInner>,
    provider: String,
    key_id: String,
    region: String,
    timeout: Duration,
}

impl DylibKms {
    /// Create the plugin's instance for one slot (its fields go over as a JSON object).
    pub async fn create(
        plugin: Arc<Plugin>,
        provider: &str,
        fields: &SlotFields,
        timeout: Duration,
    ) -> Result<Self, KmsError> {
        let table = plugin.kms.ok_or_else(|| {
            KmsError::Config(format!("plugin '{}' has no KMS provider", plugin.name))
        })?;
        let config = flat_json::encode(fields);
        let p = plugin.clone();
        let made = run_blocking(&plugin.name, timeout, move || {
            p.make(|h, out| (table.create)(Bytes::of(config.as_bytes()), h, out))
        })
        .await?
        .map_err(|m| KmsError::Config(format!("plugin '{}': {m}", plugin.name)))?;
        let (handle, info) = made;
        let info = String::from_utf8_lossy(&info).into_owned();
        let (key_id, region) = info.split_once('\0').unwrap_or((info.as_str(), ""));
        Ok(Self {
            key_id: key_id.to_owned(),
            region: region.to_owned(),
            provider: provider.to_owned(),
            inner: Arc::new(KmsInner {
                plugin,
                table,
                handle,
            }),
            timeout,
        })
    }

    async fn call(
        &self,
        secret: bool,
        f: impl FnOnce(&KmsInner, *mut sealdb_plugin_api::abi::Buf) -> u32 + Send + 'static,
    ) -> Result<Reply, KmsError> {
        let inner = self.inner.clone();
        let name = self.inner.plugin.name.clone();
        let reply = run_blocking(&name, self.timeout, move || {
            inner.plugin.call(secret, |out| f(&inner, out))
        })
        .await?;
        if reply.status == status::OK {
            Ok(reply)
        } else {
            Err(kms_error(&name, &reply))
        }
    }
}

/// Run a blocking plugin call on the blocking pool, giving up after `timeout`.
async fn run_blocking<T: Send + 'static>(
    plugin: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KmsError> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(KmsError::Unavailable(format!(
            "plugin '{plugin}' call failed: {e}"
        ))),
        Err(_) => Err(KmsError::Unavailable(format!(
            "plugin '{plugin}' did not answer within {} s",
            timeout.as_secs()
        ))),
    }
}

#[async_trait]
impl KmsProvider for DylibKms {
    fn provider(&self) -> &str {
        &self.provider
    }
    fn key_id(&self) -> &str {
        &self.key_id
    }
    fn region(&self) -> &str {
        &self.region
    }

    async fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError> {
        let kek = Zeroizing::new(kek.to_vec());
        let ctx = context.to_vec();
        let r = self
            .call(false, move |i, out| {
                (i.table.wrap)(i.handle.0, Bytes::of(&kek), Bytes::of(&ctx), out)
            })
            .await?;
        let bad = || KmsError::Unavailable("plugin returned a malformed wrap".into());
        let n = r.bytes.get(..4).ok_or_else(bad)?;
        let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
        let ct = r.bytes.get(4..4 + n).ok_or_else(bad)?.to_vec();
        let version = String::from_utf8_lossy(&r.bytes[4 + n..]).into_owned();
        Ok(Wrapped {
            ciphertext: ct,
            key_version: version,
        })
    }

    async fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let w = wrapped.to_vec();
        let ctx = context.to_vec();
        let r = self
            .call(true, move |i, out| {
                (i.table.unwrap)(i.handle.0, Bytes::of(&w), Bytes::of(&ctx), out)
            })
            .await?;
        Ok(Zeroizing::new(r.bytes))
    }

    async fn health(&self) -> Result<(), KmsError> {
        self.call(false, |i, out| (i.table.health)(i.handle.0, out))
            .await
            .map(|_| ())
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run store-plugin calls, so a caller can stop waiting for a hung one.
struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Pool {
    fn new(threads: usize, name: &str) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("plugin-{name}-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawning a plugin worker thread");
        }
        Self { tx: Mutex::new(tx) }
    }
}

/// An index store served by a plugin.
pub struct DylibStore {
    plugin: Arc<Plugin>,
    table: &'static StoreTable,
    handle: Handle,
    timeout: Duration,
    pool: Pool,
    name: String,
}

impl Drop for DylibStore {
    fn drop(&mut self) {
        (self.table.close)(self.handle.0);
    }
}

impl DylibStore {
    /// Open the plugin's store with a JSON configuration.
    pub fn open(plugin: Arc<Plugin>, config_json: &str, timeout: Duration) -> Result<Self, String> {
        let table = plugin
            .store
            .ok_or_else(|| format!("plugin '{}' has no store", plugin.name))?;
        let (handle, _) =
            plugin.make(|h, out| (table.open)(Bytes::of(config_json.as_bytes()), h, out))?;
        let name = plugin.store_name.clone().unwrap_or_default();
        Ok(Self {
            pool: Pool::new(16, &plugin.name),
            plugin,
            table,
            handle,
            timeout,
            name,
        })
    }

    fn call(
        &self,
        f: impl FnOnce(&'static StoreTable, Handle, *mut sealdb_plugin_api::abi::Buf) -> u32
            + Send
            + 'static,
    ) -> Result<Reply, StoreError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let (plugin, table, handle) = (self.plugin.clone(), self.table, self.handle);
        let job: Job = Box::new(move || {
            let reply = plugin.call(false, |out| f(table, handle, out));
            let _ = rtx.send(reply);
        });
        self.pool
            .tx
            .lock()
            .send(job)
            .map_err(|_| StoreError::Unavailable("store plugin workers are gone".into()))?;
        // A hung plugin is the plugin's failure (500), not an outage of a store behind it.
        rrx.recv_timeout(self.timeout).map_err(|_| {
            StoreError::Io(format!(
                "store plugin '{}' did not answer within {} s",
                self.plugin.name,
                self.timeout.as_secs()
            ))
        })
    }

    fn ok(&self, r: Reply) -> Result<Vec<u8>, StoreError> {
        if r.status == status::OK {
            Ok(r.bytes)
        } else {
            Err(store_error(&self.plugin.name, &r))
        }
    }
}

fn corrupt(e: String) -> StoreError {
    StoreError::Corrupt(format!("store plugin returned malformed data: {e}"))
}

impl IndexStore for DylibStore {
    fn backend(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        let r = self.call(move |t, h, out| (t.get)(h.0, Bytes::of(&key), out))?;
        if r.status == status::NOT_FOUND {
            return Ok(None);
        }
        self.ok(r).map(Some)
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let enc = codec::encode_list(keys);
        let r = self.call(move |t, h, out| (t.get_many)(h.0, Bytes::of(&enc), out))?;
        let vals = codec::decode_options(&self.ok(r)?).map_err(corrupt)?;
        if vals.len() != keys.len() {
            return Err(corrupt(
                "get_many answered the wrong number of values".into(),
            ));
        }
        Ok(vals)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let p = prefix.to_vec();
        let r = self.call(move |t, h, out| (t.scan)(h.0, Bytes::of(&p), 0, out))?;
        codec::decode_pairs(&self.ok(r)?).map_err(corrupt)
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let p = prefix.to_vec();
        let r = self.call(move |t, h, out| (t.scan)(h.0, Bytes::of(&p), 1, out))?;
        codec::decode_list(&self.ok(r)?).map_err(corrupt)
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let enc = codec::encode_batch(&batch);
        let r = self.call(move |t, h, out| (t.write)(h.0, Bytes::of(&enc), out))?;
        self.ok(r).map(|_| ())
    }
}
