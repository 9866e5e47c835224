//! Who is calling (`X-API-Key` → [`Principal`]) and what they may do.
//!
//! * No root key and no legacy key: authentication is off ([`Principal::Open`]).
//! * `CYBORGDB_SERVICE_ROOT_KEY`: the root key may do everything; `cdbk_` user keys minted under
//!   it work on their one index, within their permissions, enforced by unwrapping grants.
//! * `CYBORGDB_API_KEY` (legacy single-key mode): full access except user management.
//!
//! Invariant: key comparisons are constant-time and no presented key is logged or echoed.

use std::sync::Arc;

use sealdb_plugin_api::UserStore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::engine::{Access, Engine, EngineError, Lease};
use crate::keys::Kek;
use crate::users::{Permission, Token, UserError, Users};

/// What a request wants to do.
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
    /// Mint, list, revoke users.
    ManageUsers,
}

/// An authenticated caller.
#[derive(Debug)]
pub enum Principal {
    /// Authentication is off.
    Open,
    /// The root key.
    Root,
    /// The legacy single API key.
    Legacy,
    /// A `cdbk_` user key (format and tag checked; grants checked on use).
    User(Token),
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn secret(s: Option<String>) -> Option<Zeroizing<String>> {
    s.filter(|k| !k.is_empty()).map(Zeroizing::new)
}

/// Constant-time equality that does not leak the length either: both sides are hashed to 32
/// bytes first, and the digests are compared.
fn same(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (da, db) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    da.as_slice().ct_eq(db.as_slice()).into()
}

/// The configured credentials.
pub struct Auth {
    root: Option<Zeroizing<String>>,
    legacy: Option<Zeroizing<String>>,
    users: Option<Users>,
}

impl Auth {
    pub fn new(
        root: Option<String>,
        legacy: Option<String>,
        user_store: Arc<dyn UserStore>,
    ) -> Result<Self, String> {
        let root = secret(root);
        if let Some(r) = &root {
            if r.chars().count() < 32 {
                tracing::warn!(
                    "CYBORGDB_SERVICE_ROOT_KEY is shorter than 32 characters: use a long random key (for example 64 hex digits)"
                );
            }
        }
        let users = match &root {
            None => None,
            Some(r) => Some(
                Users::new(user_store, r)
                    .map_err(|e| format!("opening the user directory: {e}"))?,
            ),
        };
        Ok(Self {
            root,
            legacy: secret(legacy),
            users,
        })
    }

    /// Whether requests must carry an API key.
    pub fn enabled(&self) -> bool {
        self.root.is_some() || self.legacy.is_some()
    }

    /// Whether per-index users exist (a root key is configured).
    pub fn rbac_enabled(&self) -> bool {
        self.users.is_some()
    }

    /// The user directory, when RBAC is on.
    pub fn users(&self) -> Option<&Users> {
        self.users.as_ref()
    }

    /// Identify the caller.
    pub fn authenticate(&self, key: Option<&str>) -> Result<Principal, AuthError> {
        if !self.enabled() {
            return Ok(Principal::Open);
        }
        let key = key.ok_or_else(|| {
            AuthError::Unauthenticated(
                "API Key is required: send it in the X-API-Key header".into(),
            )
        })?;
        if self.root.as_ref().is_some_and(|r| same(key, r)) {
            return Ok(Principal::Root);
        }
        if self.legacy.as_ref().is_some_and(|l| same(key, l)) {
            return Ok(Principal::Legacy);
        }
        if key.starts_with("cdbk_") {
            if let Some(users) = &self.users {
                return Ok(Principal::User(users.parse_token(key)?));
            }
        }
        Err(AuthError::Unauthenticated("Invalid API Key".into()))
    }

    /// Check that `p` may perform `action` at all (per-index permissions come later, from the
    /// grant, in [`open_index`](Self::open_index)).
    pub fn require(&self, p: &Principal, action: Action) -> Result<(), AuthError> {
        match (action, p) {
            (Action::ManageUsers, Principal::Root) => Ok(()),
            (Action::ManageUsers, Principal::Open) => Err(AuthError::Forbidden(
                "User management needs RBAC: start the server with CYBORGDB_SERVICE_ROOT_KEY set"
                    .into(),
            )),
            (Action::ManageUsers, _) => Err(AuthError::Forbidden(
                "User management requires the root API key".into(),
            )),
            (Action::Admin, Principal::User(_)) => Err(AuthError::Forbidden(
                "This operation requires an admin (root) API key; user keys can only read or write vectors"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Open the index `name` for `action` as `p`: user keys unwrap the index's data key from
    /// their grant for the needed permission; everyone else brings the index key.
    pub fn open_index(
        &self,
        engine: &Engine,
        p: &Principal,
        action: Action,
        name: &str,
        kek: Option<&Kek>,
    ) -> Result<Lease, AuthError> {
        self.require(p, action)?;
        let Principal::User(token) = p else {
            return Ok(engine.open(name, kek)?);
        };
        let perm = match action {
            Action::Write => Permission::Write,
            _ => Permission::Read,
        };
        let users = self
            .users
            .as_ref()
            .expect("user principals exist only with RBAC");
        if engine.index_id(name)? != token.index_id {
            return Err(AuthError::Forbidden(format!(
                "This API key is not valid for index '{name}'"
            )));
        }
        let dek = users.unwrap_for(token, perm)?;
        Ok(engine.open_with(name, Access::Dek(&dek))?)
    }

    /// The index names `p` may see: all of them, or a user's own index.
    pub fn visible(&self, engine: &Engine, p: &Principal) -> Result<Vec<String>, AuthError> {
        Ok(match p {
            Principal::User(t) => engine
                .list_with_ids()?
                .into_iter()
                .filter(|(_, id)| *id == t.index_id)
                .map(|(n, _)| n)
                .collect(),
            _ => engine.list()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealdb_store_memory::MemoryStore;

    fn auth(root: Option<&str>, legacy: Option<&str>) -> Auth {
        Auth::new(
            root.map(Into::into),
            legacy.map(Into::into),
            Arc::new(MemoryStore::new()),
        )
        .unwrap()
    }

    #[test]
    fn open_without_keys() {
        let a = auth(None, None);
        assert!(matches!(a.authenticate(None).unwrap(), Principal::Open));
        assert!(a.require(&Principal::Open, Action::Admin).is_ok());
        assert!(matches!(
            a.require(&Principal::Open, Action::ManageUsers),
            Err(AuthError::Forbidden(_))
        ));
    }

    #[test]
    fn root_and_legacy() {
        let a = auth(Some("s3cret"), Some("legacy"));
        assert!(matches!(
            a.authenticate(None),
            Err(AuthError::Unauthenticated(_))
        ));
        let e = a.authenticate(Some("guess")).unwrap_err();
        assert!(!e.to_string().contains("guess"));
        assert!(matches!(
            a.authenticate(Some("s3cret")).unwrap(),
            Principal::Root
        ));
        let l = a.authenticate(Some("legacy")).unwrap();
        assert!(matches!(l, Principal::Legacy));
        assert!(a.require(&l, Action::Admin).is_ok());
        assert!(matches!(
            a.require(&l, Action::ManageUsers),
            Err(AuthError::Forbidden(_))
        ));
        assert!(matches!(
            a.authenticate(Some("cdbk_1_AAAA")),
            Err(AuthError::User(UserError::Unauthenticated(_)))
        ));
    }
}
