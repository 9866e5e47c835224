//! Who is calling: `X-API-Key` to a [`Principal`], and what that principal may do.
//!
//! Invariant: key comparisons are constant-time and no presented key is ever logged or echoed.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::api::error::ApiError;

/// What a request wants to do; decides which principals may do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// List indexes, training status.
    ListIndexes,
    /// Describe, query, get, list ids, count.
    Read,
    /// Upsert, delete vectors.
    Write,
    /// Create, train, delete indexes.
    Admin,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Authentication is off (no root key configured).
    Open,
    /// The root key.
    Root,
}

/// The configured credentials.
pub struct Auth {
    root: Option<Zeroizing<String>>,
}

impl Auth {
    pub fn new(root: Option<String>) -> Self {
        Self {
            root: root.filter(|k| !k.is_empty()).map(Zeroizing::new),
        }
    }

    /// Whether requests must carry an API key.
    pub fn enabled(&self) -> bool {
        self.root.is_some()
    }

    /// Authenticate `key` and check it may perform `action` on `index`.
    pub fn authorize(
        &self,
        key: Option<&str>,
        _action: Action,
        _index: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let Some(root) = &self.root else {
            return Ok(Principal::Open);
        };
        let key = key.ok_or_else(|| {
            ApiError::unauthorized("API Key is required: send it in the X-API-Key header")
        })?;
        if bool::from(key.as_bytes().ct_eq(root.as_bytes())) {
            return Ok(Principal::Root);
        }
        Err(ApiError::unauthorized("Invalid API Key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_root_key() {
        let a = Auth::new(None);
        assert_eq!(
            a.authorize(None, Action::Admin, None).unwrap(),
            Principal::Open
        );
    }

    #[test]
    fn root_key_required_when_set() {
        let a = Auth::new(Some("s3cret".into()));
        assert_eq!(
            a.authorize(None, Action::Read, None).unwrap_err().status,
            401
        );
        let e = a.authorize(Some("guess"), Action::Read, None).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(!e.detail.contains("guess"));
        assert_eq!(
            a.authorize(Some("s3cret"), Action::Admin, None).unwrap(),
            Principal::Root
        );
    }
}
