//! KMS slots: the registry built from the YAML `kms.registry`, the cache of unwrapped KEKs,
//! and the key operations of KMS-backed indexes (create, resolve, rekey, start-up drift).
//!
//! * A slot is a name plus a provider built from its fields (`plugins/kms-*`). The registry is
//!   built and validated once at start; it never changes while the server runs.
//! * The KEK of a KMS-backed index is unwrapped through its slot and kept in memory for
//!   `INDEX_KEK_CACHE_TTL_SECONDS`, at most one KMS call in flight per index. When the cache has
//!   expired and the KMS fails, the request fails with 502 naming the slot; the next request
//!   tries again, so service resumes by itself when the KMS is back.
//! * Every wrap is bound to the index's random id (the provider's context), so an envelope
//!   copied onto another index does not unwrap there.
//!
//! Everything here blocks (provider futures run on the runtime through `Handle::block_on`):
//! call it from the blocking pool, as the API handlers do.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sealdb_plugin_api::{KmsError, KmsProvider, SlotFields};

use crate::engine::format::IndexId;
use crate::engine::Envelope;
use crate::keys::{Kek, KEY_LEN};
use crate::plugins::KmsFactory;

/// One slot as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotConfig {
    pub name: String,
    pub provider: String,
    /// Every field but `provider`, `${VAR}` expanded.
    pub fields: SlotFields,
}

/// Field names only: values can be tokens and secret ids.
impl std::fmt::Debug for SlotConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotConfig")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a KMS operation failed. `UnknownSlot` is the caller's mistake (400); the others are
/// the KMS's (502), and always name the slot.
#[derive(Debug, thiserror::Error)]
pub enum KmsFailure {
    #[error("no KMS slot named '{0}' is configured on this server{1}")]
    UnknownSlot(String, String),
    #[error("KMS slot '{slot}' ({provider}): {error}")]
    Provider {
        slot: String,
        provider: String,
        error: KmsError,
    },
    #[error("KMS slot '{slot}' ({provider}) did not answer within {secs} s")]
    Timeout {
        slot: String,
        provider: String,
        secs: u64,
    },
    #[error("KMS slot '{0}' returned a key that is not {KEY_LEN} bytes long")]
    BadKey(String),
}

struct Slot {
    provider: Arc<dyn KmsProvider>,
    fields: SlotFields,
    kind: String,
}

struct Cached {
    kek: Kek,
    /// The wrap it came from: a rekeyed index misses the cache.
    wrapped: Vec<u8>,
    at: Instant,
}

/// `(slot, key id, region)` an envelope was wrapped under.
type Snapshot = (String, String, String);

/// The registry and its KEK cache.
pub struct Kms {
    slots: BTreeMap<String, Slot>,
    ttl: Duration,
    call_timeout: Duration,
    /// The runtime provider futures run on (`None` only for a registry with no slots).
    rt: Option<tokio::runtime::Handle>,
    cache: Mutex<HashMap<IndexId, Arc<Mutex<Option<Cached>>>>>,
    /// Provider factories by name (built-in and plugins).
    factories: BTreeMap<String, Arc<dyn KmsFactory>>,
    /// Providers for envelopes wrapped under an earlier key id or region of a slot.
    previous: Mutex<HashMap<Snapshot, Arc<dyn KmsProvider>>>,
}

/// Build the provider of one slot through the registry's factories.
async fn build_provider(
    factories: &BTreeMap<String, Arc<dyn KmsFactory>>,
    kind: &str,
    fields: &SlotFields,
) -> Result<Arc<dyn KmsProvider>, KmsError> {
    if kind == sealdb_kms_none::NAME {
        return Err(KmsError::Config(
            "provider 'none' is reserved for client-supplied keys and cannot be configured: \
             omit kms_name to use index_key"
                .into(),
        ));
    }
    match factories.get(kind) {
        Some(f) => f.create(fields).await,
        None => Err(KmsError::Config(format!(
            "unknown provider '{kind}' (this server has: {})",
            factories.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The fields that address the key an envelope was made with, when the slot's key id or
/// region has changed since.
/// Only the built-in providers can be pointed back at an earlier key; a plugin's key id is
/// opaque to the server.
fn fields_for_snapshot(kind: &str, fields: &SlotFields, env: &Envelope) -> Option<SlotFields> {
    let mut f = fields.clone();
    match kind {
        sealdb_kms_vault::NAME => {
            let (mount, key) = env.key_id.rsplit_once('/')?;
            f.insert("mount".into(), mount.into());
            f.insert("key_name".into(), key.into());
        }
        sealdb_kms_aws::NAME => {
            f.insert("key_id".into(), env.key_id.clone());
            f.insert("region".into(), env.region.clone());
        }
        _ => return None,
    }
    Some(f)
}

/// The context every wrap of an index's KEK is bound to.
pub fn context(id: &IndexId) -> Vec<u8> {
    let mut c = b"sealdb/v1/kek/".to_vec();
    c.extend_from_slice(id);
    c
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Kms {
    /// Build and validate every slot. A bad slot is an error naming the slot and the field.
    pub async fn build(
        configs: &[SlotConfig],
        factories: BTreeMap<String, Arc<dyn KmsFactory>>,
        ttl: Duration,
        call_timeout: Duration,
    ) -> Result<Self, String> {
        let mut slots = BTreeMap::new();
        for c in configs {
            if c.name == sealdb_kms_none::NAME {
                return Err(format!(
                    "kms.registry.{}: the slot name '{}' is reserved (omit kms_name to use client-supplied keys)",
                    c.name, c.name
                ));
            }
            let provider = build_provider(&factories, &c.provider, &c.fields)
                .await
                .map_err(|e| format!("kms.registry.{}: {e}", c.name))?;
            slots.insert(
                c.name.clone(),
                Slot {
                    provider,
                    fields: c.fields.clone(),
                    kind: c.provider.clone(),
                },
            );
        }
        Ok(Self {
            slots,
            ttl,
            call_timeout,
            rt: Some(tokio::runtime::Handle::current()),
            cache: Mutex::default(),
            factories,
            previous: Mutex::default(),
        })
    }

    /// A registry without slots (every `kms_name` is unknown).
    pub fn empty() -> Self {
        Self {
            slots: BTreeMap::new(),
            ttl: Duration::ZERO,
            call_timeout: Duration::from_secs(1),
            rt: None,
            cache: Mutex::default(),
            factories: BTreeMap::new(),
            previous: Mutex::default(),
        }
    }

    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.rt
            .as_ref()
            .expect("a registry with slots was built on a runtime")
            .block_on(fut)
    }

    /// Slot names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.slots.keys().cloned().collect()
    }

    fn slot(&self, name: &str) -> Result<&Slot, KmsFailure> {
        self.slots.get(name).ok_or_else(|| {
            let known = if self.slots.is_empty() {
                " (none is)".to_owned()
            } else {
                format!(
                    " (configured: {})",
                    self.slots.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            KmsFailure::UnknownSlot(name.to_owned(), known)
        })
    }

    /// Check that a slot exists (before any work is done for a request naming it).
    pub fn check_slot(&self, name: &str) -> Result<(), KmsFailure> {
        self.slot(name).map(|_| ())
    }

    /// The provider kind of a slot.
    pub fn provider_of(&self, name: &str) -> Option<&str> {
        self.slots.get(name).map(|s| s.kind.as_str())
    }

    fn call<T>(
        &self,
        slot: &str,
        provider: &str,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, KmsError>>,
    ) -> Result<T, KmsFailure> {
        // The timer is made inside the runtime (block_on enters its context).
        let limit = self.call_timeout;
        let started = Instant::now();
        let r = self.block_on(async move { tokio::time::timeout(limit, fut).await });
        crate::metrics::kms_call(
            slot,
            op,
            matches!(r, Ok(Ok(_))),
            started.elapsed().as_secs_f64(),
        );
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(KmsFailure::Provider {
                slot: slot.to_owned(),
                provider: provider.to_owned(),
                error,
            }),
            Err(_) => Err(KmsFailure::Timeout {
                slot: slot.to_owned(),
                provider: provider.to_owned(),
                secs: self.call_timeout.as_secs(),
            }),
        }
    }

    /// Wrap `kek` for index `id` under the slot's current key: the envelope to store.
    pub fn wrap(&self, slot_name: &str, id: &IndexId, kek: &Kek) -> Result<Envelope, KmsFailure> {
        let slot = self.slot(slot_name)?;
        let p = &slot.provider;
        let w = self.call(
            slot_name,
            p.provider(),
            "wrap",
            p.wrap(kek.expose(), &context(id)),
        )?;
        Ok(Envelope {
            slot: slot_name.to_owned(),
            provider: p.provider().to_owned(),
            key_id: p.key_id().to_owned(),
            region: p.region().to_owned(),
            key_version: w.key_version,
            wrapped_kek: w.ciphertext,
            created_at: now_secs(),
        })
    }

    /// A fresh KEK for index `id`, wrapped by the slot.
    pub fn new_kek(&self, slot_name: &str, id: &IndexId) -> Result<(Kek, Envelope), KmsFailure> {
        let kek = Kek::random();
        let env = self.wrap(slot_name, id, &kek)?;
        Ok((kek, env))
    }

    /// Whether the slot's provider, key id or region differ from what the envelope recorded.
    pub fn drifted(&self, env: &Envelope) -> Result<bool, KmsFailure> {
        let slot = self.slot(&env.slot)?;
        let p = &slot.provider;
        Ok(p.provider() != env.provider || p.key_id() != env.key_id || p.region() != env.region)
    }

    /// The provider that can unwrap `env`: the slot's own, or one built for the key id and
    /// region the envelope recorded when the configuration has moved on since.
    fn provider_for(&self, env: &Envelope) -> Result<Arc<dyn KmsProvider>, KmsFailure> {
        let slot = self.slot(&env.slot)?;
        if !self.drifted(env)? {
            return Ok(slot.provider.clone());
        }
        let fail = |error: KmsError| KmsFailure::Provider {
            slot: env.slot.clone(),
            provider: env.provider.clone(),
            error,
        };
        if slot.kind != env.provider {
            return Err(fail(KmsError::Config(format!(
                "this index was wrapped by provider '{}' and the slot is now '{}': \
                 configure the old settings under another slot name and rewrap onto this one",
                env.provider, slot.kind
            ))));
        }
        let key = (env.slot.clone(), env.key_id.clone(), env.region.clone());
        if let Some(p) = self.previous.lock().get(&key) {
            return Ok(p.clone());
        }
        let fields = fields_for_snapshot(&slot.kind, &slot.fields, env).ok_or_else(|| {
            fail(KmsError::Config(format!(
                "the slot's key changed from '{}' to '{}' and provider '{}' cannot address the old one",
                env.key_id,
                slot.provider.key_id(),
                slot.kind
            )))
        })?;
        let p = self
            .block_on(build_provider(&self.factories, &slot.kind, &fields))
            .map_err(fail)?;
        self.previous.lock().insert(key, p.clone());
        Ok(p)
    }

    /// The KEK of index `id` from its envelope: cached, or unwrapped through the slot (one
    /// call in flight per index; concurrent requests wait for it and share the result).
    pub fn kek_for(&self, id: &IndexId, env: &Envelope) -> Result<Kek, KmsFailure> {
        let entry = self.cache.lock().entry(*id).or_default().clone();
        let mut cached = entry.lock();
        if let Some(c) = cached.as_ref() {
            if c.wrapped == env.wrapped_kek && c.at.elapsed() < self.ttl {
                return Ok(c.kek.clone());
            }
        }
        *cached = None;
        let p = self.provider_for(env)?;
        let raw = self.call(
            &env.slot,
            &env.provider,
            "unwrap",
            p.unwrap(&env.wrapped_kek, &context(id)),
        )?;
        let bytes: [u8; KEY_LEN] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KmsFailure::BadKey(env.slot.clone()))?;
        let kek = Kek::from_bytes(bytes);
        if !self.ttl.is_zero() {
            *cached = Some(Cached {
                kek: kek.clone(),
                wrapped: env.wrapped_kek.clone(),
                at: Instant::now(),
            });
        }
        Ok(kek)
    }

    /// Put a KEK just wrapped (create, rekey) in the cache, so the next request needs no
    /// KMS call.
    pub fn remember(&self, id: &IndexId, env: &Envelope, kek: &Kek) {
        if self.ttl.is_zero() {
            return;
        }
        let entry = self.cache.lock().entry(*id).or_default().clone();
        *entry.lock() = Some(Cached {
            kek: kek.clone(),
            wrapped: env.wrapped_kek.clone(),
            at: Instant::now(),
        });
    }

    /// Drop what is cached for an index (deleted, or moved off KMS).
    pub fn forget(&self, id: &IndexId) {
        self.cache.lock().remove(id);
    }

    /// Health of every slot, by name.
    pub fn health(&self) -> Vec<(String, Result<(), KmsFailure>)> {
        self.slots
            .iter()
            .map(|(name, s)| {
                let p = &s.provider;
                (
                    name.clone(),
                    self.call(name, p.provider(), "health", p.health()),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealdb_plugin_api::{async_trait, Wrapped, Zeroizing};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A provider that XORs with a fixed pad and counts calls: enough to test the cache and
    /// the single flight, which no real KMS call should decide.
    struct Counting {
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl KmsProvider for Counting {
        fn provider(&self) -> &str {
            "test"
        }
        fn key_id(&self) -> &str {
            "k"
        }
        fn region(&self) -> &str {
            ""
        }
        async fn wrap(&self, kek: &[u8], ctx: &[u8]) -> Result<Wrapped, KmsError> {
            let mut c = ctx.to_vec();
            c.extend(kek.iter().map(|b| b ^ 0x5a));
            Ok(Wrapped {
                ciphertext: c,
                key_version: "1".into(),
            })
        }
        async fn unwrap(&self, w: &[u8], ctx: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(KmsError::Unavailable("down".into()));
            }
            let body = w
                .strip_prefix(ctx)
                .ok_or_else(|| KmsError::Unwrap("wrong context".into()))?;
            Ok(Zeroizing::new(body.iter().map(|b| b ^ 0x5a).collect()))
        }
        async fn health(&self) -> Result<(), KmsError> {
            Ok(())
        }
    }

    fn registry(rt: &tokio::runtime::Runtime, ttl: Duration) -> (Arc<Kms>, Arc<Counting>) {
        let p = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            fail: Default::default(),
        });
        let mut slots = BTreeMap::new();
        slots.insert(
            "s".to_string(),
            Slot {
                provider: p.clone() as Arc<dyn KmsProvider>,
                fields: SlotFields::new(),
                kind: "test".into(),
            },
        );
        let kms = Kms {
            slots,
            ttl,
            call_timeout: Duration::from_secs(5),
            rt: Some(rt.handle().clone()),
            cache: Mutex::default(),
            factories: BTreeMap::new(),
            previous: Mutex::default(),
        };
        (Arc::new(kms), p)
    }

    #[test]
    fn one_call_in_flight_per_index_and_cached_for_the_ttl() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (kms, p) = registry(&rt, Duration::from_secs(60));
        let id = [3u8; 16];
        let (kek, env) = kms.new_kek("s", &id).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (kms, env) = (kms.clone(), env.clone());
                std::thread::spawn(move || kms.kek_for(&id, &env).unwrap())
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap().ct_eq(&kek));
        }
        assert_eq!(
            p.calls.load(Ordering::SeqCst),
            1,
            "single flight, then cached"
        );
        // Bound to the index: the same envelope does not unwrap for another id.
        assert!(matches!(
            kms.kek_for(&[4u8; 16], &env),
            Err(KmsFailure::Provider {
                error: KmsError::Unwrap(_),
                ..
            })
        ));
    }

    #[test]
    fn an_expired_cache_with_the_kms_down_fails_then_recovers() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (kms, p) = registry(&rt, Duration::ZERO);
        let id = [5u8; 16];
        let (kek, env) = kms.new_kek("s", &id).unwrap();
        p.fail.store(true, Ordering::SeqCst);
        let e = kms.kek_for(&id, &env).unwrap_err();
        assert!(e.to_string().contains("KMS slot 's' (test)"), "{e}");
        p.fail.store(false, Ordering::SeqCst);
        assert!(kms.kek_for(&id, &env).unwrap().ct_eq(&kek));
        assert!(matches!(
            kms.wrap("nope", &id, &kek),
            Err(KmsFailure::UnknownSlot(..))
        ));
    }
}
