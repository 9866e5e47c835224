//! `example-file-kms`: a SealDB KMS provider as a plugin library.
//!
//! Each slot names a master key file (`key_file`: 64 hex characters, 32 bytes). Index keys are
//! wrapped with AES-256-GCM under that master key, the server's context as associated data, so
//! a wrapped key only unwraps for the index it was made for. The file is read on every call,
//! so replacing or removing it takes effect at once: a missing or unreadable file is reported
//! as `unavailable` (the server answers 502 and recovers when the file is back).
//!
//! Wrapped form: `0x01 || nonce (12) || ciphertext || tag (16)`. The key id reported to the
//! server is a key check value (`kcv:` + 12 hex digits of an AES-GCM tag over nothing), which
//! changes when the master key does and reveals nothing about it.
//!
//! No `unsafe` here: `declare_plugin!` writes the C exports.

use std::path::PathBuf;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sealdb_plugin_api::kms::{only_known, required};
use sealdb_plugin_api::{BlockingKmsProvider, KmsError, SlotFields, Wrapped, Zeroizing};

/// The provider name slots use.
pub const PROVIDER: &str = "example-file-kms";
const VERSION: u8 = 1;

/// One slot: the master key file.
pub struct FileKms {
    key_file: PathBuf,
    key_id: String,
}

fn parse_hex_key(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let t = text.trim().as_bytes();
    if t.len() != 64 {
        return None;
    }
    let mut k = Zeroizing::new([0u8; 32]);
    for (i, pair) in t.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        k[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(k)
}

impl FileKms {
    /// Build a slot from its fields (`key_file`). The file must be readable now.
    pub fn from_fields(fields: &SlotFields) -> Result<Self, KmsError> {
        only_known(fields, &["key_file"])?;
        let key_file = PathBuf::from(required(fields, "key_file")?);
        let mut p = Self {
            key_file,
            key_id: String::new(),
        };
        let cipher = p.cipher().map_err(|e| match e {
            KmsError::Unavailable(m) => KmsError::Config(format!("field 'key_file': {m}")),
            other => other,
        })?;
        p.key_id = kcv(&cipher);
        sealdb_plugin_api::export::log_info(&format!(
            "example-file-kms slot ready ({}, key {})",
            p.key_file.display(),
            p.key_id
        ));
        Ok(p)
    }

    fn cipher(&self) -> Result<Aes256Gcm, KmsError> {
        let text = Zeroizing::new(std::fs::read_to_string(&self.key_file).map_err(|e| {
            KmsError::Unavailable(format!("cannot read {}: {e}", self.key_file.display()))
        })?);
        let key = parse_hex_key(&text).ok_or_else(|| {
            KmsError::Config(format!(
                "{} must hold 64 hexadecimal characters",
                self.key_file.display()
            ))
        })?;
        Aes256Gcm::new_from_slice(&key[..])
            .map_err(|_| KmsError::Config("bad master key length".into()))
    }
}

fn kcv(cipher: &Aes256Gcm) -> String {
    let tag = cipher
        .encrypt(
            &Nonce::from([0u8; 12]),
            Payload {
                msg: b"",
                aad: b"sealdb-example-kcv",
            },
        )
        .unwrap_or_default();
    let hex: String = tag.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("kcv:{hex}")
}

impl BlockingKmsProvider for FileKms {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn region(&self) -> &str {
        ""
    }

    fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError> {
        let cipher = self.cipher()?;
        let nonce = Nonce::generate();
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: kek,
                    aad: context,
                },
            )
            .map_err(|_| KmsError::Unavailable("encryption failed".into()))?;
        let mut out = vec![VERSION];
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(Wrapped {
            ciphertext: out,
            key_version: "1".into(),
        })
    }

    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let cipher = self.cipher()?;
        let (v, rest) = wrapped
            .split_first()
            .ok_or_else(|| KmsError::Unwrap("empty wrapped key".into()))?;
        if *v != VERSION || rest.len() < 12 + 16 {
            return Err(KmsError::Unwrap("not an example-file-kms wrap".into()));
        }
        let (nonce, ct) = rest.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().expect("12 bytes");
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| KmsError::Unwrap("the master key or the context does not match".into()))
    }

    fn health(&self) -> Result<(), KmsError> {
        self.cipher().map(|_| ())
    }
}

sealdb_plugin_api::declare_plugin! {
    name: "sealdb-example-kms-plugin",
    version: env!("CARGO_PKG_VERSION"),
    kms: { provider: PROVIDER, instance: FileKms, create: FileKms::from_fields },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(dir: &std::path::Path, key: &str) -> FileKms {
        let f = dir.join("master.key");
        std::fs::write(&f, key).unwrap();
        let mut fields = SlotFields::new();
        fields.insert("key_file".into(), f.display().to_string());
        FileKms::from_fields(&fields).unwrap()
    }

    #[test]
    fn wraps_bound_to_the_context_and_the_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = slot(dir.path(), &"ab".repeat(32));
        let w = p.wrap(&[9; 32], b"index-1").unwrap();
        assert_eq!(&p.unwrap(&w.ciphertext, b"index-1").unwrap()[..], &[9; 32]);
        assert!(matches!(
            p.unwrap(&w.ciphertext, b"index-2"),
            Err(KmsError::Unwrap(_))
        ));
        let other = slot(dir.path(), &"cd".repeat(32));
        assert_ne!(other.key_id(), p.key_id());
        assert!(matches!(
            other.unwrap(&w.ciphertext, b"index-1"),
            Err(KmsError::Unwrap(_))
        ));
        std::fs::remove_file(dir.path().join("master.key")).unwrap();
        assert!(matches!(p.health(), Err(KmsError::Unavailable(_))));
    }

    #[test]
    fn bad_fields_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "short").unwrap();
        let mut fields = SlotFields::new();
        fields.insert("key_file".into(), f.display().to_string());
        assert!(matches!(
            FileKms::from_fields(&fields),
            Err(KmsError::Config(_))
        ));
        assert!(matches!(
            FileKms::from_fields(&SlotFields::new()),
            Err(KmsError::Config(_))
        ));
    }
}
