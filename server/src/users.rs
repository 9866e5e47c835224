//! RBAC users: `cdbk_` tokens and their cryptographic grants.
//!
//! A user is `(index id, user id)` plus a 32-byte secret that only the token carries. The
//! [`UserStore`] keeps, per user, a SHA-256 verifier of the secret and one wrap of the index's
//! DEK per permission, each under `HKDF(secret, "sealdb/v1/user-wrap/<perm>")`. A request with a
//! user token unwraps the DEK for the permission it needs: no wrap, no access (403), no record
//! (revoked) or wrong secret, 401. Revoking deletes the record, so the next request fails.
//!
//! Token: `cdbk_1_` + base64url(index id (16) || user id (16) || secret (32) || tag (8)); the tag
//! is `HMAC-SHA256(HKDF(root key), everything before it)[..8]`, a cheap filter for garbage and
//! forged tokens. Rotating the root key therefore invalidates every user token.
//!
//! User record (value in the `UserStore`): `u8 version (1) || verifier (32) || u8 n ||
//! n × (u8 permission (1 read, 2 write) || u32 LE length || wrapped DEK)`; wrapped DEK =
//! AES-256-GCM(nonce || ct || tag) with AAD `"SDB1/user-dek" || index id || user id || perm`.

use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sealdb_plugin_api::{UserStore, UserStoreError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::engine::format::{IndexId, Reader, Writer};
use crate::engine::EngineError;
use crate::keys::{self, Dek, Kek};

/// A permission a user can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    Read,
    Write,
}

impl Permission {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
    fn code(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Read),
            2 => Some(Self::Write),
            _ => None,
        }
    }
}

/// Why a user operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Garbage, forged or revoked token (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The token is valid but lacks the permission, or belongs to another index (403).
    #[error("{0}")]
    Denied(String),
    /// No such user (404).
    #[error("user '{0}' not found")]
    NotFound(String),
    /// Malformed user id (400).
    #[error("{0}")]
    BadRequest(String),
    #[error("user store failure: {0}")]
    Store(#[from] UserStoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A parsed user token. The secret is zeroized on drop.
pub struct Token {
    pub index_id: IndexId,
    pub user_id: [u8; 16],
    secret: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(user {})", hex::encode(self.user_id))
    }
}

const TOKEN_PREFIX: &str = "cdbk_1_";
const TOKEN_BODY: usize = 16 + 16 + 32;

fn hkdf32(ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<Sha256>::new(Some(b"sealdb-users-v1"), ikm)
        .expand(info, out.as_mut())
        .expect("32 bytes is a valid HKDF output length");
    out
}

fn verifier(secret: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"sealdb/v1/user-verifier");
    h.update(secret);
    h.finalize().into()
}

fn wrap_key(secret: &[u8; 32], p: Permission) -> Kek {
    let k = hkdf32(
        secret,
        format!("sealdb/v1/user-wrap/{}", p.as_str()).as_bytes(),
    );
    Kek::from_bytes(*k)
}

fn wrap_aad(index_id: &IndexId, user_id: &[u8; 16], p: Permission) -> Vec<u8> {
    [b"SDB1/user-dek".as_slice(), index_id, user_id, &[p.code()]].concat()
}

struct UserRecord {
    verifier: [u8; 32],
    wraps: Vec<(Permission, Vec<u8>)>,
}

impl UserRecord {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(1).raw(&self.verifier).u8(self.wraps.len() as u8);
        for (p, wrap) in &self.wraps {
            w.u8(p.code()).bytes(wrap);
        }
        w.0
    }
    fn decode(buf: &[u8]) -> Result<Self, UserError> {
        let corrupt = |_| UserError::Store(UserStoreError::Corrupt("bad user record".into()));
        let mut r = Reader::new(buf, "user record");
        if r.u8().map_err(corrupt)? != 1 {
            return Err(UserError::Store(UserStoreError::Corrupt(
                "unknown user record version".into(),
            )));
        }
        let verifier: [u8; 32] = r.take(32).map_err(corrupt)?.try_into().expect("32 bytes");
        let n = r.u8().map_err(corrupt)?;
        let mut wraps = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let p = Permission::from_code(r.u8().map_err(corrupt)?).ok_or_else(|| {
                UserError::Store(UserStoreError::Corrupt("unknown permission".into()))
            })?;
            wraps.push((p, r.bytes().map_err(corrupt)?.to_vec()));
        }
        Ok(Self { verifier, wraps })
    }
}

/// RBAC over a [`UserStore`]; `tag_key` is derived from the root key.
pub struct Users {
    store: Arc<dyn UserStore>,
    tag_key: Zeroizing<[u8; 32]>,
}

impl Users {
    pub fn new(store: Arc<dyn UserStore>, root_key: &str) -> Self {
        Self {
            store,
            tag_key: hkdf32(root_key.as_bytes(), b"sealdb/v1/token-tag"),
        }
    }

    fn tag(&self, body: &[u8]) -> [u8; 8] {
        let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(self.tag_key.as_ref())
            .expect("HMAC takes any key length");
        m.update(body);
        let full = m.finalize().into_bytes();
        full[..8].try_into().expect("8 bytes")
    }

    /// Parse and check a `cdbk_` token (format and tag only; the grant is checked on use).
    pub fn parse_token(&self, text: &str) -> Result<Token, UserError> {
        let invalid = || UserError::Unauthenticated("Invalid user API key".into());
        let b64 = text.strip_prefix(TOKEN_PREFIX).ok_or_else(invalid)?;
        let raw = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64)
                .map_err(|_| invalid())?,
        );
        if raw.len() != TOKEN_BODY + 8 {
            return Err(invalid());
        }
        let (body, tag) = raw.split_at(TOKEN_BODY);
        if !bool::from(self.tag(body).ct_eq(tag)) {
            return Err(invalid());
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&body[32..]);
        Ok(Token {
            index_id: body[..16].try_into().expect("16 bytes"),
            user_id: body[16..32].try_into().expect("16 bytes"),
            secret,
        })
    }

    /// Mint a user for the index whose id and DEK are given. Returns `(user id hex, token)`.
    pub fn mint(
        &self,
        index_id: &IndexId,
        dek: &Dek,
        perms: &[Permission],
    ) -> Result<(String, Zeroizing<String>), UserError> {
        let mut user_id = [0u8; 16];
        let mut secret = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut user_id);
        rand::rng().fill_bytes(secret.as_mut());
        let mut perms = perms.to_vec();
        perms.sort();
        perms.dedup();
        let record = UserRecord {
            verifier: verifier(&secret),
            wraps: perms
                .iter()
                .map(|&p| {
                    (
                        p,
                        keys::wrap_dek(
                            &wrap_key(&secret, p),
                            dek,
                            &wrap_aad(index_id, &user_id, p),
                        ),
                    )
                })
                .collect(),
        };
        self.store.put(index_id, &user_id, &record.encode())?;
        let mut body = Zeroizing::new(Vec::with_capacity(TOKEN_BODY + 8));
        body.extend_from_slice(index_id);
        body.extend_from_slice(&user_id);
        body.extend_from_slice(secret.as_ref());
        let tag = self.tag(&body);
        body.extend_from_slice(&tag);
        let token = Zeroizing::new(format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.as_slice())
        ));
        Ok((hex::encode(user_id), token))
    }

    /// Unwrap the index DEK for `perm` with a token.
    pub fn unwrap_for(&self, token: &Token, perm: Permission) -> Result<Dek, UserError> {
        let revoked =
            || UserError::Unauthenticated("Invalid user API key (revoked or unknown)".into());
        let raw = self
            .store
            .get(&token.index_id, &token.user_id)?
            .ok_or_else(revoked)?;
        let rec = UserRecord::decode(&raw)?;
        if !bool::from(rec.verifier.ct_eq(&verifier(&token.secret))) {
            return Err(revoked());
        }
        let wrap = rec
            .wraps
            .iter()
            .find(|(p, _)| *p == perm)
            .map(|(_, w)| w)
            .ok_or_else(|| {
                UserError::Denied(format!(
                    "permission denied: this API key does not have '{}' permission",
                    perm.as_str()
                ))
            })?;
        keys::unwrap_dek(
            &wrap_key(&token.secret, perm),
            wrap,
            &wrap_aad(&token.index_id, &token.user_id, perm),
        )
        .map_err(|_| UserError::Denied("permission denied".into()))
    }

    /// `(user id hex, permissions)` of every user of an index.
    pub fn list(&self, index_id: &IndexId) -> Result<Vec<(String, Vec<Permission>)>, UserError> {
        self.store
            .list(index_id)?
            .into_iter()
            .map(|(uid, rec)| {
                let rec = UserRecord::decode(&rec)?;
                Ok((
                    hex::encode(uid),
                    rec.wraps.iter().map(|(p, _)| *p).collect(),
                ))
            })
            .collect()
    }

    /// Revoke a user (erase its grants).
    pub fn revoke(&self, index_id: &IndexId, user_id_hex: &str) -> Result<(), UserError> {
        let bad = || {
            UserError::BadRequest(format!(
                "user_id must be 32 hexadecimal characters, got '{}'",
                user_id_hex.chars().take(64).collect::<String>()
            ))
        };
        let raw = hex::decode(user_id_hex).map_err(|_| bad())?;
        if raw.len() != 16 {
            return Err(bad());
        }
        if self.store.delete(index_id, &raw)? {
            Ok(())
        } else {
            Err(UserError::NotFound(user_id_hex.to_owned()))
        }
    }

    /// Forget every user of a deleted index.
    pub fn delete_index(&self, index_id: &IndexId) -> Result<(), UserError> {
        Ok(self.store.delete_index(index_id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealdb_store_memory::MemoryStore;

    #[test]
    fn mint_unwrap_revoke() {
        let users = Users::new(Arc::new(MemoryStore::new()), "root");
        let dek = Dek::random();
        let ix = [3u8; 16];
        let (uid, tok) = users.mint(&ix, &dek, &[Permission::Read]).unwrap();
        assert_eq!(uid.len(), 32);
        assert!(tok.starts_with("cdbk_1_"));
        let t = users.parse_token(&tok).unwrap();
        assert!(users.unwrap_for(&t, Permission::Read).unwrap().ct_eq(&dek));
        assert!(matches!(
            users.unwrap_for(&t, Permission::Write),
            Err(UserError::Denied(_))
        ));
        assert_eq!(
            users.list(&ix).unwrap(),
            vec![(uid.clone(), vec![Permission::Read])]
        );
        // Forged, truncated and other-root tokens are rejected.
        assert!(users.parse_token(&tok[..tok.len() - 2]).is_err());
        let mut forged = tok.to_string();
        let c = if forged.ends_with('A') { 'B' } else { 'A' };
        forged.pop();
        forged.push(c);
        assert!(users.parse_token(&forged).is_err());
        assert!(Users::new(Arc::new(MemoryStore::new()), "other")
            .parse_token(&tok)
            .is_err());
        users.revoke(&ix, &uid).unwrap();
        assert!(matches!(
            users.unwrap_for(&t, Permission::Read),
            Err(UserError::Unauthenticated(_))
        ));
        assert!(matches!(
            users.revoke(&ix, &uid),
            Err(UserError::NotFound(_))
        ));
        assert!(matches!(
            users.revoke(&ix, "xyz"),
            Err(UserError::BadRequest(_))
        ));
    }

    #[test]
    fn raw_redb_file_holds_no_dek_or_user_secret() {
        use crate::engine::{CreateSpec, Engine, EngineConfig, IndexConfig, Metric, Precision};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(sealdb_store_redb::RedbStore::open_dir(dir.path()).unwrap());
        let engine = Engine::new(
            store.clone(),
            EngineConfig {
                auto_train_min_vectors: 1 << 30,
                auto_train: false,
                cache_limit_bytes: None,
                train_time_limit: None,
            },
        );
        let kek = Kek::random();
        engine
            .create(CreateSpec {
                name: "i".into(),
                id: crate::engine::new_index_id(),
                envelope: None,
                kek: kek.clone(),
                config: IndexConfig {
                    metric: Metric::Euclidean,
                    precision: Precision::F32,
                    embedding_model: None,
                    declared_dimension: 2,
                    created_at: 0,
                },
            })
            .unwrap();
        let ix = engine.open("i", Some(&kek)).unwrap();
        let users = Users::new(store.clone(), "root");
        let mut secrets = Vec::new();
        for perms in [
            &[Permission::Read][..],
            &[Permission::Read, Permission::Write],
        ] {
            let (_, tok) = users.mint(&ix.id, ix.dek(), perms).unwrap();
            let t = users.parse_token(&tok).unwrap();
            assert!(users
                .unwrap_for(&t, Permission::Read)
                .unwrap()
                .ct_eq(ix.dek()));
            secrets.push(*t.secret);
            secrets.push(*wrap_key(&t.secret, Permission::Read).expose());
        }
        let dek = *ix.dek().expose();
        drop((ix, engine, users, store));
        let blob: Vec<u8> = std::fs::read_dir(dir.path())
            .unwrap()
            .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(!blob.is_empty());
        let contains = |n: &[u8]| blob.windows(n.len()).any(|w| w == n);
        assert!(!contains(&dek), "DEK in the clear");
        assert!(!contains(kek.expose()), "KEK in the clear");
        for s in &secrets {
            assert!(!contains(s), "user secret or wrap key in the clear");
        }
    }
}
