//! The key-management contract: wrap and unwrap an index's key-encryption key (KEK).

use thiserror::Error;

/// Errors a [`KmsProvider`] reports. None may include key material.
#[derive(Debug, Error)]
pub enum KmsError {
    /// The KMS refused the operation (bad credentials, policy, disabled key).
    #[error("KMS denied the request: {0}")]
    Denied(String),
    /// The KMS could not be reached or answered with a transient failure.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// The wrapped blob does not open under this provider (wrong key, wrong context, damaged).
    #[error("KMS could not unwrap the key: {0}")]
    Unwrap(String),
    /// The provider is misconfigured (missing key id, bad address, ...).
    #[error("KMS misconfigured: {0}")]
    Config(String),
}

/// A configured KMS slot (`kms_name` in the API) that protects index KEKs.
///
/// `context` is bound to the wrapped key (Vault transit `context`, AWS encryption context,
/// AES-GCM associated data): unwrapping with another context must fail. The server passes the
/// index name and id there. Methods block; the server calls them off the async executor.
pub trait KmsProvider: Send + Sync + 'static {
    /// Provider kind, for logs and describe output (`"vault"`, `"aws-kms"`, ...).
    fn provider(&self) -> &str;

    /// Wrap a 32-byte KEK; the result is stored next to the index.
    fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Vec<u8>, KmsError>;

    /// Unwrap what [`wrap`](Self::wrap) returned, with the same context.
    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Vec<u8>, KmsError>;

    /// Cheap liveness probe used at start-up and by health checks.
    fn health(&self) -> Result<(), KmsError>;
}
