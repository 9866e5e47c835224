//! The key hierarchy and record sealing.
//!
//! ```text
//! KEK (32 B, from the client on every call, or from a KMS slot)
//!  ├─ HKDF "sealdb/v2/kek-commit" -> commitment key: HMAC over the wrap's AAD, stored
//!  └─ HKDF "sealdb/v2/kek-wrap"   -> wraps DEK (32 B, random per index, stored only wrapped)
//!      ├─ HKDF "sealdb/v2/record-root" -> R; every sealed record gets its own key
//!      │     K_rec = HMAC-SHA256(R, "sealdb/v2/record" || salt || 0x01), salt: 16 random bytes
//!      └─ HKDF "sealdb/v2/id-mac"      -> HMAC-SHA256 key turning ids into store locators
//! ```
//!
//! **Nonce bound.** AES-GCM with random 96-bit nonces is safe for about 2^32 messages per
//! key. Here no key seals more than one record: each seal draws a fresh 128-bit salt and
//! derives its own key (`K_rec` is HKDF-Expand of the PRK `R` with info
//! `"sealdb/v2/record" || salt`, as in Tink's AES-GCM-HKDF and the AWS Encryption SDK). The
//! remaining bound is a collision between two salts: below 2^-32 for up to 2^48 records
//! sealed under one index (89 years at 100,000 seals per second). [`MESSAGES_PER_KEY`] says
//! so in code and `tests::every_seal_uses_its_own_key` checks it.
//!
//! **Key commitment.** AES-GCM is not key-committing: a ciphertext can be built that opens
//! under two keys. The wrapped DEK is therefore preceded by a commitment, an HMAC under a key
//! derived from the KEK; a KEK that does not reproduce it is wrong, before any decryption.
//!
//! Invariant: key material lives in [`Kek`]/[`Dek`] newtypes that zeroize on drop and whose
//! `Debug` prints nothing secret, so a key cannot end up in a log by accident.

use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key in the hierarchy.
pub const KEY_LEN: usize = 32;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Random salt of one sealed record (selects its derived key).
pub const SALT_LEN: usize = 16;
/// Bytes a record sealed by [`IndexKeys::seal`] adds to its plaintext (salt + nonce + tag).
pub const SEAL_OVERHEAD: usize = SALT_LEN + NONCE_LEN + TAG_LEN;
/// Messages sealed under any one AES-GCM key of an index's records: each record has its own.
pub const MESSAGES_PER_KEY: usize = 1;
/// Length of the key commitment in front of a wrapped DEK.
pub const COMMIT_LEN: usize = 32;

/// Errors of the key layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The supplied key text is not 64 hex characters.
    #[error("index_key must be 64 hexadecimal characters (32 bytes); {0}")]
    BadFormat(String),
    /// A ciphertext did not authenticate: wrong key, or the record was moved or altered.
    #[error("ciphertext failed authentication")]
    Open,
}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// Wrap raw key bytes.
            pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }
            /// A fresh random key from the OS generator.
            pub fn random() -> Self {
                let mut k = [0u8; KEY_LEN];
                rand::rng().fill_bytes(&mut k);
                Self(k)
            }
            /// The raw key bytes.
            pub fn expose(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }

        impl $name {
            /// Constant-time equality.
            pub fn ct_eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&other.0).into()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_key!(
    /// A key-encryption key: protects one index's DEK. Never stored by the server.
    Kek
);
secret_key!(
    /// A data-encryption key: the root of everything one index stores.
    Dek
);

impl Kek {
    /// Parse the API's `index_key`: exactly 64 hex characters, either case. The error never
    /// echoes the input.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::BadFormat(
                "it contains non-hexadecimal characters".into(),
            ));
        }
        if text.len() != 2 * KEY_LEN {
            return Err(KeyError::BadFormat(format!(
                "got {} characters ({} bytes)",
                text.len(),
                text.len() / 2
            )));
        }
        let mut k = [0u8; KEY_LEN];
        hex::decode_to_slice(text, &mut k)
            .map_err(|_| KeyError::BadFormat("it is not valid hexadecimal".into()))?;
        Ok(Self(k))
    }
}

fn hkdf(ikm: &[u8], info: &[u8]) -> [u8; KEY_LEN] {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"sealdb-hkdf-salt-v1"), ikm);
    let mut out = [0u8; KEY_LEN];
    hk.expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Seal `plaintext` under `cipher` with associated data `aad`: `nonce || ciphertext || tag`.
pub fn seal_with(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    seal_after(cipher, aad, &[], plaintext)
}

/// `prefix || nonce || ciphertext || tag` in one buffer: the plaintext is copied once, into
/// its place there, and encrypted where it lies.
fn seal_after(cipher: &Aes256Gcm, aad: &[u8], prefix: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let start = prefix.len() + NONCE_LEN;
    let mut out = Vec::with_capacity(start + plaintext.len() + TAG_LEN);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), aad, (&mut out[start..]).into())
        .expect("AES-GCM encryption cannot fail for in-range lengths");
    out.extend_from_slice(&tag);
    out
}

/// Open what [`seal_with`] produced; fails unless key and `aad` match.
pub fn open_with(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(KeyError::Open);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KeyError::Open)?;
    cipher
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map_err(|_| KeyError::Open)
}

fn cipher_for(key: &[u8; KEY_LEN]) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(key).expect("a 32-byte key is valid for AES-256")
}

fn commitment(kek: &Kek, aad: &[u8]) -> [u8; COMMIT_LEN] {
    let mut ck = hkdf(kek.expose(), b"sealdb/v2/kek-commit");
    let mut m =
        <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&ck).expect("HMAC takes any key length");
    ck.zeroize();
    m.update(aad);
    m.finalize().into_bytes().into()
}

fn wrap_cipher(kek: &Kek) -> Aes256Gcm {
    let mut wk = hkdf(kek.expose(), b"sealdb/v2/kek-wrap");
    let c = cipher_for(&wk);
    wk.zeroize();
    c
}

/// Wrap `dek` under `kek`, bound to `aad` (which names the index):
/// `commitment (32) || nonce || ciphertext || tag`.
pub fn wrap_dek(kek: &Kek, dek: &Dek, aad: &[u8]) -> Vec<u8> {
    let mut out = commitment(kek, aad).to_vec();
    out.extend(seal_with(&wrap_cipher(kek), aad, dek.expose()));
    out
}

/// Unwrap a DEK; a wrong KEK (or a wrapped DEK moved to another index) fails with
/// [`KeyError::Open`]. The commitment is checked first, in constant time.
pub fn unwrap_dek(kek: &Kek, wrapped: &[u8], aad: &[u8]) -> Result<Dek, KeyError> {
    if wrapped.len() < COMMIT_LEN {
        return Err(KeyError::Open);
    }
    let (commit, sealed) = wrapped.split_at(COMMIT_LEN);
    if !bool::from(commitment(kek, aad).ct_eq(commit)) {
        return Err(KeyError::Open);
    }
    let mut raw = open_with(&wrap_cipher(kek), aad, sealed)?;
    let out: Result<[u8; KEY_LEN], _> = raw.as_slice().try_into();
    raw.zeroize();
    out.map(Dek::from_bytes).map_err(|_| KeyError::Open)
}

/// The per-index keys derived from a DEK, ready to use.
#[derive(Clone)]
pub struct IndexKeys {
    /// HMAC keyed with the record root `R`; cloned per seal to derive that record's key.
    record_root: Hmac<Sha256>,
    id_mac: Hmac<Sha256>,
    /// HMAC keyed with `K_text`: the store-visible tag of a (field, term) of the text index.
    text_mac: Hmac<Sha256>,
    /// AES-256 keyed with `K_pos`, for position records (encode-then-encipher).
    position: aes::Aes256,
}

impl std::fmt::Debug for IndexKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKeys(<redacted>)")
    }
}

impl IndexKeys {
    /// Derive the record root and the id MAC from `dek`.
    pub fn derive(dek: &Dek) -> Self {
        let mut root = hkdf(dek.expose(), b"sealdb/v2/record-root");
        let mut mac = hkdf(dek.expose(), b"sealdb/v2/id-mac");
        let mut pos = hkdf(dek.expose(), b"sealdb/v2/position");
        let mut text = hkdf(dek.expose(), b"sealdb/v2/text-mac");
        let keys = Self {
            record_root: <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&root)
                .expect("HMAC takes any key length"),
            id_mac: <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&mac)
                .expect("HMAC takes any key length"),
            text_mac: <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&text)
                .expect("HMAC takes any key length"),
            position: <aes::Aes256 as aes::cipher::KeyInit>::new_from_slice(&pos)
                .expect("a 32-byte AES-256 key"),
        };
        text.zeroize();
        root.zeroize();
        mac.zeroize();
        pos.zeroize();
        keys
    }

    /// The AES-256-GCM key of the record sealed with `salt`.
    fn record_cipher(&self, salt: &[u8]) -> Aes256Gcm {
        let mut m = self.record_root.clone();
        m.update(b"sealdb/v2/record");
        m.update(salt);
        m.update(&[1]);
        let mut k: [u8; KEY_LEN] = m.finalize().into_bytes().into();
        let c = cipher_for(&k);
        k.zeroize();
        c
    }

    /// Seal a record whose associated data is `aad`: `salt || nonce || ciphertext || tag`,
    /// under a key of its own (see the module docs).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut salt = [0u8; SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        seal_after(&self.record_cipher(&salt), aad, &salt, plaintext)
    }

    /// Open a record sealed with the same associated data.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(KeyError::Open);
        }
        let (salt, rest) = sealed.split_at(SALT_LEN);
        open_with(&self.record_cipher(salt), aad, rest)
    }

    /// A version-4 position record: `AES-256(K_pos, list || block || gen || locator[0..4])`,
    /// one AES block (docs/FORMAT.md "Position runs", last part). Encode-then-encipher: the
    /// block is a pseudorandom permutation of a plaintext that is unique per item and
    /// generation, and its last 8 bytes are redundancy that [`Self::open_position`] checks, so
    /// any alteration or transplant to another item or generation fails with probability
    /// 1 - 2^-64. Stores no longer write these (positions are runs); only the tests seal them,
    /// to hold the upgrade's reader to the format.
    #[cfg(test)]
    pub fn seal_position(&self, locator: &[u8; 16], gen: u32, list: u32, block: u32) -> [u8; 16] {
        use aes::cipher::BlockCipherEncrypt;
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&list.to_le_bytes());
        b[4..8].copy_from_slice(&block.to_le_bytes());
        b[8..12].copy_from_slice(&gen.to_le_bytes());
        b[12..].copy_from_slice(&locator[..4]);
        let mut blk = aes::Block::from(b);
        self.position.encrypt_block(&mut blk);
        b.zeroize();
        blk.into()
    }

    /// `(list, block)` from a position record of `locator` in generation `gen`.
    pub fn open_position(
        &self,
        locator: &[u8; 16],
        gen: u32,
        sealed: &[u8],
    ) -> Result<(u32, u32), KeyError> {
        use aes::cipher::BlockCipherDecrypt;
        let b: [u8; 16] = sealed.try_into().map_err(|_| KeyError::Open)?;
        let mut blk = aes::Block::from(b);
        self.position.decrypt_block(&mut blk);
        let p: [u8; 16] = blk.into();
        let mut check = [0u8; 8];
        check[..4].copy_from_slice(&gen.to_le_bytes());
        check[4..].copy_from_slice(&locator[..4]);
        if !bool::from(p[8..].ct_eq(&check)) {
            return Err(KeyError::Open);
        }
        let word = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        Ok((word(0), word(4)))
    }

    /// The 16-byte keyed tag of a term of a `full_text` field: the text index's store keys
    /// carry this, never the field or the term (docs/FORMAT.md "Text index").
    pub fn term_tag(&self, field: &str, term: &str) -> [u8; 16] {
        let mut m = self.text_mac.clone();
        m.update(&(field.len() as u32).to_le_bytes());
        m.update(field.as_bytes());
        m.update(term.as_bytes());
        let tag = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag[..16]);
        out
    }

    /// The 16-byte keyed tag of a value of a filterable field (the value index's store keys
    /// carry this; `value` is [`crate::engine::filter::IndexValue`]). Domain-separated from
    /// term tags by a leading `0xff` that no field-name length starts with below 2^24.
    pub fn value_tag(&self, field: &str, value: &[u8]) -> [u8; 16] {
        let mut m = self.text_mac.clone();
        m.update(&[0xff, 0xff, 0xff, 0xff]);
        m.update(&(field.len() as u32).to_le_bytes());
        m.update(field.as_bytes());
        m.update(value);
        let tag = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag[..16]);
        out
    }

    /// The 16-byte keyed locator of an item id: the store sees this, never the id.
    pub fn id_locator(&self, id: &str) -> [u8; 16] {
        let mut m = self.id_mac.clone();
        m.update(id.as_bytes());
        let tag = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag[..16]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_records_open_only_for_their_item_and_generation() {
        let k = IndexKeys::derive(&Dek::random());
        let (a, b) = (k.id_locator("a"), k.id_locator("b"));
        let s = k.seal_position(&a, 3, 7, 9);
        assert_eq!(k.open_position(&a, 3, &s).unwrap(), (7, 9));
        assert_ne!(s, k.seal_position(&b, 3, 7, 9), "same position, other item");
        assert!(
            k.open_position(&b, 3, &s).is_err(),
            "transplanted to another item"
        );
        assert!(k.open_position(&a, 4, &s).is_err(), "another generation");
        for i in 0..16 {
            let mut t = s;
            t[i] ^= 1;
            assert!(k.open_position(&a, 3, &t).is_err(), "flipped byte {i}");
        }
        assert!(k.open_position(&a, 3, &s[..15]).is_err());
        let other = IndexKeys::derive(&Dek::random());
        assert!(
            other.open_position(&a, 3, &s).is_err(),
            "another index's key"
        );
    }

    #[test]
    fn hex_parsing_rejects_bad_keys_without_echoing_them() {
        assert!(Kek::from_hex(&"ab".repeat(32)).is_ok());
        assert!(Kek::from_hex(&"AB".repeat(32)).is_ok());
        let e = Kek::from_hex(&"ab".repeat(16)).unwrap_err();
        assert!(e.to_string().contains("got 32 characters (16 bytes)"));
        let e = Kek::from_hex(&"zz".repeat(32)).unwrap_err();
        assert!(!e.to_string().contains("zz"));
    }

    #[test]
    fn dek_wrap_roundtrip_and_wrong_key() {
        let kek = Kek::random();
        let dek = Dek::random();
        let w = wrap_dek(&kek, &dek, b"idx-a");
        assert_eq!(
            unwrap_dek(&kek, &w, b"idx-a").unwrap().expose(),
            dek.expose()
        );
        assert_eq!(
            unwrap_dek(&Kek::random(), &w, b"idx-a").unwrap_err(),
            KeyError::Open
        );
        // Bound to its index: the same blob does not open for another index.
        assert_eq!(unwrap_dek(&kek, &w, b"idx-b").unwrap_err(), KeyError::Open);
    }

    #[test]
    fn sealed_records_are_bound_to_their_aad_and_randomised() {
        let keys = IndexKeys::derive(&Dek::random());
        let a = keys.seal(b"rec-1", b"hello");
        let b = keys.seal(b"rec-1", b"hello");
        assert_ne!(a, b, "nonces must differ");
        assert_eq!(keys.open(b"rec-1", &a).unwrap(), b"hello");
        assert!(keys.open(b"rec-2", &a).is_err());
        let mut t = a.clone();
        t[SALT_LEN + NONCE_LEN] ^= 1;
        assert!(keys.open(b"rec-1", &t).is_err());
        assert!(keys.open(b"rec-1", &a[..5]).is_err());
    }

    /// The nonce bound of the module docs: no two seals share a derived key (salt), so no
    /// AES-GCM key ever seals more than [`MESSAGES_PER_KEY`] record; a record opened with
    /// another record's salt fails.
    #[test]
    fn every_seal_uses_its_own_key() {
        let keys = IndexKeys::derive(&Dek::random());
        let n = 20_000;
        let mut salts = std::collections::HashSet::new();
        let mut sealed = Vec::new();
        for i in 0..n {
            let s = keys.seal(b"same-aad", format!("record {i}").as_bytes());
            assert!(
                salts.insert(s[..SALT_LEN].to_vec()),
                "a derived key was used twice"
            );
            sealed.push(s);
        }
        assert_eq!(salts.len(), n / MESSAGES_PER_KEY);
        // The salt selects the key: graft record 0's salt onto record 1 and it fails.
        let mut grafted = sealed[1].clone();
        grafted[..SALT_LEN].copy_from_slice(&sealed[0][..SALT_LEN]);
        assert!(keys.open(b"same-aad", &grafted).is_err());
        assert_eq!(keys.open(b"same-aad", &sealed[1]).unwrap(), b"record 1");
    }

    #[test]
    fn wrapped_deks_are_key_committing() {
        let (kek, dek) = (Kek::random(), Dek::random());
        let w = wrap_dek(&kek, &dek, b"ix");
        assert_eq!(w.len(), COMMIT_LEN + NONCE_LEN + KEY_LEN + TAG_LEN);
        // Any change to the commitment refuses the key before decryption.
        let mut t = w.clone();
        t[0] ^= 1;
        assert_eq!(unwrap_dek(&kek, &t, b"ix").unwrap_err(), KeyError::Open);
        assert!(unwrap_dek(&kek, &w[..COMMIT_LEN - 1], b"ix").is_err());
        // The commitment binds the key: a wrong key fails the commitment itself.
        assert_ne!(commitment(&Kek::random(), b"ix"), commitment(&kek, b"ix"));
        assert_ne!(commitment(&kek, b"ix"), commitment(&kek, b"iy"));
    }

    /// The zeroize features of aes-gcm (AES round keys, GHASH key) and of the digests (the
    /// keyed inner and outer SHA-256 states an HMAC holds) are on: this does not compile
    /// without them.
    #[test]
    fn key_schedules_are_wiped_on_drop() {
        fn wiped<T: zeroize::ZeroizeOnDrop>() {}
        wiped::<Aes256Gcm>();
        wiped::<Sha256>();
        wiped::<Kek>();
        wiped::<Dek>();
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let k = Kek::from_bytes([0x41; 32]);
        assert_eq!(format!("{k:?}"), "Kek(<redacted>)");
    }

    #[test]
    fn locators_are_keyed() {
        let a = IndexKeys::derive(&Dek::random());
        let b = IndexKeys::derive(&Dek::random());
        assert_eq!(a.id_locator("x"), a.id_locator("x"));
        assert_ne!(a.id_locator("x"), b.id_locator("x"));
        assert_ne!(a.id_locator("x"), a.id_locator("y"));
    }
}
