//! The key-management contract: wrap and unwrap an index's key-encryption key (KEK) through an
//! external KMS.
//!
//! A *slot* is one named entry of the server's `kms.registry` configuration (`kms_name` in the
//! API). The server builds one [`KmsProvider`] per slot at start, from the slot's fields, and
//! calls it whenever a KMS-backed index needs its KEK: at create (wrap a fresh KEK), when the
//! cached plaintext KEK has expired (unwrap), on rewrap (unwrap, then wrap under the slot's
//! current key version) and for readiness (health).
//!
//! The trait is async (calls are network round trips) and object safe: the server holds
//! `Arc<dyn KmsProvider>`. It is small on purpose, so that a dynamically loaded plugin can
//! offer the same four calls over a C ABI (a blocking ABI called off the runtime).

use std::collections::BTreeMap;

use async_trait::async_trait;
use thiserror::Error;
use zeroize::Zeroizing;

/// Errors a [`KmsProvider`] reports. The text is shown to operators (logs, 502 bodies), so it
/// must never include key material or credentials.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KmsError {
    /// The KMS refused the operation (bad credentials, policy, disabled key).
    #[error("KMS denied the request: {0}")]
    Denied(String),
    /// The KMS could not be reached or answered with a transient failure.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// The wrapped blob does not open under this provider (wrong key, wrong context, damaged,
    /// or a key version that may no longer decrypt).
    #[error("KMS could not unwrap the key: {0}")]
    Unwrap(String),
    /// The slot is misconfigured (missing or malformed field, unknown key).
    #[error("KMS misconfigured: {0}")]
    Config(String),
}

/// What [`KmsProvider::wrap`] returns: the ciphertext to store and the KMS key version that
/// made it (recorded in the index's envelope; empty when the KMS does not expose versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub ciphertext: Vec<u8>,
    pub key_version: String,
}

/// The fields of one slot as written in the YAML file, `${VAR}` references already expanded.
/// Every value is a string; a provider parses what it needs and names the field it rejects.
pub type SlotFields = BTreeMap<String, String>;

/// One configured KMS slot that protects index KEKs.
///
/// `context` is bound to the wrapped key (AWS encryption context, or authenticated inside the
/// wrapped payload): unwrapping with another context must fail. The server passes a value
/// derived from the index's random id, so an envelope copied to another index does not open.
#[async_trait]
pub trait KmsProvider: Send + Sync + 'static {
    /// Provider kind, recorded in envelopes and shown by describe (`"vault"`, `"aws-kms"`).
    fn provider(&self) -> &str;

    /// The key this slot wraps under (AWS key id/ARN/alias, Vault `mount/key_name`). Recorded in
    /// the envelope; a change in the configuration is treated as a rotation at start.
    fn key_id(&self) -> &str;

    /// The key's region (AWS), or `""` where the notion does not apply.
    fn region(&self) -> &str;

    /// Wrap a 32-byte KEK under the slot's current key version.
    async fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError>;

    /// Unwrap what [`wrap`](Self::wrap) returned (under any key version the KMS still accepts),
    /// with the same context. The plaintext is wiped when dropped.
    async fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError>;

    /// A cheap liveness probe: the KMS answers and the slot's key is usable.
    async fn health(&self) -> Result<(), KmsError>;
}

/// The blocking form of a KMS provider, for plugins loaded over the C ABI (a plain Rust
/// implementation of this trait becomes a plugin through `declare_plugin!`). The server runs
/// its calls on the blocking pool with a timeout; calls may come from several threads at once.
pub trait BlockingKmsProvider: Send + Sync + 'static {
    /// See [`KmsProvider::key_id`].
    fn key_id(&self) -> &str;
    /// See [`KmsProvider::region`].
    fn region(&self) -> &str;
    /// See [`KmsProvider::wrap`].
    fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError>;
    /// See [`KmsProvider::unwrap`].
    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError>;
    /// See [`KmsProvider::health`].
    fn health(&self) -> Result<(), KmsError>;
}

/// Read a required field of a slot, naming it when absent or empty.
pub fn required<'a>(fields: &'a SlotFields, name: &str) -> Result<&'a str, KmsError> {
    match fields.get(name).map(|s| s.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(KmsError::Config(format!("field '{name}' is required"))),
    }
}

/// Read an optional field (absent and empty are the same).
pub fn optional<'a>(fields: &'a SlotFields, name: &str) -> Option<&'a str> {
    fields.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// The optional `timeout_seconds` field: a whole number of seconds from 1 to 300, or
/// `default_secs` when absent.
pub fn timeout_field(
    fields: &SlotFields,
    default_secs: u64,
) -> Result<std::time::Duration, KmsError> {
    match optional(fields, "timeout_seconds") {
        None => Ok(std::time::Duration::from_secs(default_secs)),
        Some(t) => match t.parse::<u64>() {
            Ok(s) if (1..=300).contains(&s) => Ok(std::time::Duration::from_secs(s)),
            _ => Err(KmsError::Config(
                "field 'timeout_seconds' must be a whole number from 1 to 300".into(),
            )),
        },
    }
}

/// An optional URL field, which must start with `http://` or `https://`.
pub fn url_field<'a>(fields: &'a SlotFields, name: &str) -> Result<Option<&'a str>, KmsError> {
    match optional(fields, name) {
        Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
            Err(KmsError::Config(format!(
                "field '{name}' must start with http:// or https://"
            )))
        }
        other => Ok(other),
    }
}

/// Refuse fields a provider does not know, so a typo does not silently fall back to a default.
pub fn only_known(fields: &SlotFields, known: &[&str]) -> Result<(), KmsError> {
    for k in fields.keys() {
        if k != "provider" && !known.contains(&k.as_str()) {
            return Err(KmsError::Config(format!(
                "unknown field '{k}' (this provider takes: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_helpers_name_the_field() {
        let mut f = SlotFields::new();
        f.insert("key_id".into(), "  k1 ".into());
        f.insert("region".into(), "".into());
        assert_eq!(required(&f, "key_id").unwrap(), "k1");
        let e = required(&f, "region").unwrap_err();
        assert_eq!(e, KmsError::Config("field 'region' is required".into()));
        assert_eq!(optional(&f, "region"), None);
        assert!(only_known(&f, &["key_id", "region"]).is_ok());
        let e = only_known(&f, &["key_id"]).unwrap_err().to_string();
        assert!(e.contains("unknown field 'region'"), "{e}");
    }
}
