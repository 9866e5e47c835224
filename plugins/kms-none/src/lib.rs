//! The reserved `none` provider: indexes whose key the client sends on every request.
//!
//! It holds no key and can wrap nothing. It exists so that every index's envelope names a
//! provider (`none` for client-key indexes, as the original service records them), and so that
//! the name is taken: the server refuses a YAML slot with `provider: none` and a `kms_name`
//! of `none`; the client-key path is chosen by omitting `kms_name`.

use sealdb_plugin_api::{async_trait, KmsError, KmsProvider, Wrapped, Zeroizing};

/// The provider name reserved for client-supplied keys.
pub const NAME: &str = "none";

/// The `none` provider. Every call fails with [`KmsError::Config`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoneProvider;

fn refuse() -> KmsError {
    KmsError::Config(
        "the 'none' provider holds no keys: the client supplies index_key on every request".into(),
    )
}

#[async_trait]
impl KmsProvider for NoneProvider {
    fn provider(&self) -> &str {
        NAME
    }
    fn key_id(&self) -> &str {
        ""
    }
    fn region(&self) -> &str {
        ""
    }
    async fn wrap(&self, _kek: &[u8], _context: &[u8]) -> Result<Wrapped, KmsError> {
        Err(refuse())
    }
    async fn unwrap(
        &self,
        _wrapped: &[u8],
        _context: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        Err(refuse())
    }
    async fn health(&self) -> Result<(), KmsError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn none_wraps_nothing() {
        let p = NoneProvider;
        assert_eq!(p.provider(), "none");
        assert!(matches!(
            p.wrap(&[0; 32], b"c").await,
            Err(KmsError::Config(_))
        ));
        assert!(matches!(
            p.unwrap(b"x", b"c").await,
            Err(KmsError::Config(_))
        ));
        assert!(p.health().await.is_ok());
    }
}
