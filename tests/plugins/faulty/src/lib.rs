//! `faulty-kms`, for the server's failure tests only. Slot field `mode`:
//! * `ok`: wraps by XOR with a fixed pad, prefixed with the context (not secure; a test double);
//! * `panic`: every wrap/unwrap panics;
//! * `hang`: every wrap/unwrap sleeps for an hour;
//! * `flag`: like `ok` while the file named by field `flag` is absent, a panic when it exists
//!   (so one running server can be switched between behaviours).

use std::time::Duration;

use sealdb_plugin_api::kms::{optional, required};
use sealdb_plugin_api::{BlockingKmsProvider, KmsError, SlotFields, Wrapped, Zeroizing};

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

sealdb_plugin_api::declare_plugin! {
    name: "sealdb-test-faulty-plugin",
    version: "0.1.0",
    kms: { provider: "faulty-kms", instance: Faulty, create: Faulty::from_fields },
}
