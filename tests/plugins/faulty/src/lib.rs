//! `faulty-kms` and `faulty-store`, for the server's failure tests only.
//!
//! `faulty-store` keeps records in memory; while the file named by its config field `flag`
//! exists, every call fails as the file says: `error` (an I/O error), `panic`, or `hang`.
//!
//! `faulty-kms`: slot field `mode`:
//! * `ok`: wraps by XOR with a fixed pad, prefixed with the context (not secure; a test double);
//! * `panic`: every wrap/unwrap panics;
//! * `hang`: every wrap/unwrap sleeps for an hour;
//! * `flag`: like `ok` while the file named by field `flag` is absent, a panic when it exists
//!   (so one running server can be switched between behaviours).

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::RwLock;

use sealdb_plugin_api::abi::flat_json;
use sealdb_plugin_api::kms::{optional, required};
use sealdb_plugin_api::{
    BlockingKmsProvider, IndexStore, KeyValue, KmsError, SlotFields, StoreError, Wrapped,
    WriteBatch, WriteOp, Zeroizing,
};

pub struct Faulty {
    mode: String,
    flag: Option<String>,
}

impl Faulty {
    fn from_fields(f: &SlotFields) -> Result<Self, KmsError> {
        let mode = required(f, "mode")?.to_owned();
        if !["ok", "panic", "hang", "flag"].contains(&mode.as_str()) {
            return Err(KmsError::Config(format!(
                "field 'mode': unknown mode '{mode}'"
            )));
        }
        Ok(Self {
            mode,
            flag: optional(f, "flag").map(str::to_owned),
        })
    }

    fn misbehave(&self) {
        let mode = match (&*self.mode, &self.flag) {
            ("flag", Some(path)) if std::path::Path::new(path).exists() => "panic",
            (m, _) => m,
        };
        match mode {
            "panic" => panic!("faulty-kms was told to panic"),
            "hang" => std::thread::sleep(Duration::from_secs(3600)),
            _ => {}
        }
    }
}

impl BlockingKmsProvider for Faulty {
    fn key_id(&self) -> &str {
        "faulty"
    }
    fn region(&self) -> &str {
        ""
    }
    fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError> {
        self.misbehave();
        let mut c = context.to_vec();
        c.extend(kek.iter().map(|b| b ^ 0xa5));
        Ok(Wrapped {
            ciphertext: c,
            key_version: "1".into(),
        })
    }
    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        self.misbehave();
        let body = wrapped
            .strip_prefix(context)
            .ok_or_else(|| KmsError::Unwrap("wrong context".into()))?;
        Ok(Zeroizing::new(body.iter().map(|b| b ^ 0xa5).collect()))
    }
    fn health(&self) -> Result<(), KmsError> {
        Ok(())
    }
}

pub struct FaultyStore {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
    flag: String,
}

impl FaultyStore {
    fn open(config: &str) -> Result<Self, StoreError> {
        let c = flat_json::decode(config).map_err(StoreError::Unavailable)?;
        let flag = c
            .get("flag")
            .cloned()
            .ok_or_else(|| StoreError::Unavailable("config needs 'flag'".into()))?;
        Ok(Self {
            map: RwLock::new(BTreeMap::new()),
            flag,
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        match std::fs::read_to_string(&self.flag)
            .as_deref()
            .map(str::trim)
        {
            Ok("panic") => panic!("faulty-store was told to panic"),
            Ok("hang") => {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(())
            }
            Ok(_) => Err(StoreError::Io("faulty-store was told to fail".into())),
            Err(_) => Ok(()),
        }
    }
}

impl IndexStore for FaultyStore {
    fn backend(&self) -> &str {
        "faulty-store"
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.check()?;
        Ok(self.map.read().unwrap().get(key).cloned())
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.check()?;
        Ok(self
            .map
            .read()
            .unwrap()
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.check()?;
        let mut m = self.map.write().unwrap();
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { key, value } => {
                    m.insert(key, value);
                }
                WriteOp::Delete { key } => {
                    m.remove(&key);
                }
                WriteOp::DeletePrefix { prefix } => m.retain(|k, _| !k.starts_with(&prefix)),
            }
        }
        Ok(())
    }
}

sealdb_plugin_api::declare_plugin! {
    name: "sealdb-test-faulty-plugin",
    version: "0.1.0",
    kms: { provider: "faulty-kms", instance: Faulty, create: Faulty::from_fields },
    store: { name: "faulty-store", instance: FaultyStore, open: FaultyStore::open },
}
