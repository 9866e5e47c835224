//! The meta record of an index (`M || name`): its random id, how its KEK is obtained (the
//! client sends it, or a KMS envelope), the DEK wrapped under the KEK, and the sealed config.
//! Byte layout in `docs/FORMAT.md`.

use super::format::{self, IndexId, Reader, Writer};
use super::EngineError;

/// Key-mode byte: the client sends the KEK on every request.
const KEY_MODE_CLIENT: u8 = 0;
/// Key-mode byte: the KEK is wrapped by a KMS slot; the envelope says how.
const KEY_MODE_KMS: u8 = 1;
/// Version byte of an encoded [`Envelope`].
const ENVELOPE_VERSION: u8 = 1;

/// How a KMS-backed index's KEK is stored: everything needed to ask the slot to unwrap it.
/// Holds no plaintext key material (the KEK inside is wrapped by the KMS).
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The `kms.registry` slot that wraps the KEK.
    pub slot: String,
    /// The slot's provider when the wrap was made (`vault`, `aws-kms`, ...).
    pub provider: String,
    /// The provider's key id when the wrap was made.
    pub key_id: String,
    /// The provider's region when the wrap was made (`""` where none applies).
    pub region: String,
    /// The KMS key version that made the wrap (`""` when the KMS does not say).
    pub key_version: String,
    /// The KEK as the KMS wrapped it.
    pub wrapped_kek: Vec<u8>,
    /// Unix seconds of the wrap.
    pub created_at: u64,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("slot", &self.slot)
            .field("provider", &self.provider)
            .field("key_id", &self.key_id)
            .field("region", &self.region)
            .field("key_version", &self.key_version)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl Envelope {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(ENVELOPE_VERSION)
            .bytes(self.provider.as_bytes())
            .bytes(self.key_id.as_bytes())
            .bytes(self.region.as_bytes())
            .bytes(self.key_version.as_bytes())
            .bytes(&self.wrapped_kek)
            .u64(self.created_at);
        w.0
    }

    fn decode(slot: &str, buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "KMS envelope");
        if r.u8()? != ENVELOPE_VERSION {
            return Err(EngineError::Corrupt(
                "KMS envelope has an unknown version".into(),
            ));
        }
        Ok(Self {
            slot: slot.to_owned(),
            provider: r.str()?.to_owned(),
            key_id: r.str()?.to_owned(),
            region: r.str()?.to_owned(),
            key_version: r.str()?.to_owned(),
            wrapped_kek: r.bytes()?.to_vec(),
            created_at: r.u64()?,
        })
    }
}

/// The decoded meta record.
pub(crate) struct MetaRecord {
    pub id: IndexId,
    /// `None`: the client supplies the KEK.
    pub envelope: Option<Envelope>,
    pub wrapped_dek: Vec<u8>,
    pub sealed_config: Vec<u8>,
}

impl MetaRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.raw(format::META_MAGIC)
            .u8(format::FORMAT_VERSION)
            .raw(&self.id);
        match &self.envelope {
            None => w.u8(KEY_MODE_CLIENT).bytes(b"").bytes(b""),
            Some(e) => w
                .u8(KEY_MODE_KMS)
                .bytes(e.slot.as_bytes())
                .bytes(&e.encode()),
        };
        w.bytes(&self.wrapped_dek).bytes(&self.sealed_config);
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "meta record");
        if r.take(4)? != format::META_MAGIC {
            return Err(EngineError::Corrupt("meta record has a bad magic".into()));
        }
        let version = r.u8()?;
        if version != format::FORMAT_VERSION {
            return Err(EngineError::Corrupt(format!(
                "meta record has format version {version}; this server reads version {}",
                format::FORMAT_VERSION
            )));
        }
        let id: IndexId = r
            .take(format::INDEX_ID_LEN)?
            .try_into()
            .map_err(|_| EngineError::Corrupt("meta record is truncated".into()))?;
        let key_mode = r.u8()?;
        let slot = r.str()?;
        let envelope = r.bytes()?;
        let envelope = match key_mode {
            KEY_MODE_CLIENT => None,
            KEY_MODE_KMS => Some(Envelope::decode(slot, envelope)?),
            _ => {
                return Err(EngineError::Corrupt(
                    "meta record has a key mode this server does not know".into(),
                ))
            }
        };
        Ok(Self {
            id,
            envelope,
            wrapped_dek: r.bytes()?.to_vec(),
            sealed_config: r.bytes()?.to_vec(),
        })
    }
}

/// The digest of a meta record as stored, which the index's state record holds: a meta
/// record put back from an earlier version (an older wrap, a revoked KMS envelope) no longer
/// matches it.
pub(crate) fn meta_digest(raw: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"sealdb/v2/meta-digest");
    h.update(raw);
    h.finalize().into()
}

/// Associated data of the wrapped DEK: binds it to the index's name and id.
pub(crate) fn dek_aad(meta_key: &[u8], id: &IndexId) -> Vec<u8> {
    let mut a = format::aad(meta_key);
    a.extend_from_slice(b"/dek/");
    a.extend_from_slice(id);
    a
}

/// Associated data of the sealed config.
pub(crate) fn config_aad(meta_key: &[u8], id: &IndexId) -> Vec<u8> {
    let mut a = format::aad(meta_key);
    a.extend_from_slice(b"/config/");
    a.extend_from_slice(id);
    a
}

/// Decoders of meta records and envelopes, for the fuzz harness (`crate::fuzz`).
#[cfg(test)]
pub(crate) fn fuzz_decoders(buf: &[u8]) {
    let _ = MetaRecord::decode(buf);
    let _ = Envelope::decode("slot", buf);
}

/// Valid encodings to start mutating from.
#[cfg(test)]
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let env = tests::env();
    let m = MetaRecord {
        id: [7; 16],
        envelope: Some(env.clone()),
        wrapped_dek: vec![1; 92],
        sealed_config: vec![2; 60],
    };
    vec![m.encode(), env.encode()]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn env() -> Envelope {
        Envelope {
            slot: "prod".into(),
            provider: "vault".into(),
            key_id: "transit/k".into(),
            region: "".into(),
            key_version: "3".into(),
            wrapped_kek: b"vault:v3:abc".to_vec(),
            created_at: 1_700_000_000,
        }
    }

    #[test]
    fn meta_records_round_trip_in_both_key_modes() {
        for envelope in [None, Some(env())] {
            let m = MetaRecord {
                id: [7; 16],
                envelope: envelope.clone(),
                wrapped_dek: vec![1, 2, 3],
                sealed_config: vec![4, 5],
            };
            let d = MetaRecord::decode(&m.encode()).unwrap();
            assert_eq!(d.id, [7; 16]);
            assert_eq!(d.envelope, envelope);
            assert_eq!(
                (d.wrapped_dek, d.sealed_config),
                (vec![1, 2, 3], vec![4, 5])
            );
        }
    }

    #[test]
    fn damaged_meta_records_are_corrupt_not_panics() {
        let good = MetaRecord {
            id: [7; 16],
            envelope: Some(env()),
            wrapped_dek: vec![1; 60],
            sealed_config: vec![2; 40],
        }
        .encode();
        for cut in 0..good.len() {
            assert!(MetaRecord::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_mode = good.clone();
        bad_mode[4 + 1 + 16] = 9;
        assert!(matches!(
            MetaRecord::decode(&bad_mode),
            Err(EngineError::Corrupt(_))
        ));
    }

    #[test]
    fn envelope_debug_hides_the_wrapped_key() {
        assert!(!format!("{:?}", env()).contains("abc"));
    }
}
