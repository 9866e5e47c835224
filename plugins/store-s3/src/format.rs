//! The bucket's objects, byte by byte (docs/FORMAT.md "S3 store").
//!
//! * `log/<seq>`: one committed batch, created with `If-None-Match: *` at the next sequence
//!   number (20 decimal digits, so that names sort as numbers).
//! * `snap/<seq>`: the key directory as of `seq` (where every live value sits), so that a
//!   server starting cold reads one snapshot and the log after it.
//!
//! Integers are big-endian. Every object ends with a CRC-32 of all the bytes before it; the
//! values themselves are sealed records of the server and are never looked into.

use sealdb_plugin_api::{StoreError, WriteOp};

pub(crate) const LOG_MAGIC: &[u8; 8] = b"SDBLOG\x00\x01";
pub(crate) const SNAP_MAGIC: &[u8; 8] = b"SDBSNP\x00\x01";

const PUT: u8 = 1;
const DELETE: u8 = 2;
const DELETE_PREFIX: u8 = 3;
const MOVE: u8 = 4;

/// Where a value sits: bytes `off .. off + len` of log object `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seq: u64,
    pub off: u32,
    pub len: u32,
}

/// One operation of a log entry, with its value's place in the entry's object.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Put {
        key: Vec<u8>,
        at: Loc,
    },
    Delete {
        key: Vec<u8>,
    },
    DeletePrefix {
        prefix: Vec<u8>,
    },
    /// Compaction: the value of `key` copied into this entry; applies only while the key
    /// still sits at `from` (a later write wins over the copy).
    Move {
        key: Vec<u8>,
        from: Loc,
        at: Loc,
    },
}

/// A decoded log entry (values stay in the object; `Op`s point into it).
#[derive(Debug)]
pub(crate) struct Entry {
    pub seq: u64,
    pub scopes: Vec<Vec<u8>>,
    pub ops: Vec<Op>,
}

/// What a log entry carries besides plain batch operations.
pub(crate) enum Payload<'a> {
    Batch(&'a [WriteOp]),
    /// Compaction copies: `(key, from, value)`.
    Moves(&'a [(Vec<u8>, Loc, Vec<u8>)]),
}

pub(crate) fn log_name(prefix: &str, seq: u64) -> String {
    format!("{prefix}log/{seq:020}")
}

pub(crate) fn snap_name(prefix: &str, seq: u64) -> String {
    format!("{prefix}snap/{seq:020}")
}

/// The sequence number in a `log/` or `snap/` object name, if it is one.
pub(crate) fn seq_of(name: &str, dir: &str) -> Option<u64> {
    let tail = name.rsplit_once(dir)?.1;
    (tail.len() == 20 && tail.bytes().all(|b| b.is_ascii_digit()))
        .then(|| tail.parse().ok())
        .flatten()
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("S3 store: {what}"))
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), StoreError> {
        let n = u32::try_from(b.len()).map_err(|_| corrupt("a key or value over 4 GiB"))?;
        self.u32(n);
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.0);
        self.u32(crc);
        self.0
    }
}

struct R<'a> {
    buf: &'a [u8],
    pos: usize,
}
impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("object is truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A value's length prefix and its place in the object.
    fn value_loc(&mut self, seq: u64) -> Result<Loc, StoreError> {
        let n = self.u32()?;
        let off = self.pos;
        self.take(n as usize)?;
        Ok(Loc {
            seq,
            off: u32::try_from(off).map_err(|_| corrupt("log object over 4 GiB"))?,
            len: n,
        })
    }
}

/// Check the trailing CRC; the body without it.
fn checked<'a>(buf: &'a [u8], magic: &[u8; 8], what: &str) -> Result<&'a [u8], StoreError> {
    if buf.len() < 12 || &buf[..8] != magic {
        return Err(corrupt(&format!("{what} has no valid header")));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(corrupt(&format!("{what} fails its checksum")));
    }
    Ok(body)
}

/// Encode a log entry.
///
/// ```text
/// "SDBLOG\0\1" || u64 seq || writer[16] || batch id[16]
/// u32 n_scopes || n × (u32 len || scope)
/// u32 n_ops || n × op || u32 crc32
/// op: u8 1 (put)    || u32 klen || key || u32 vlen || value
///     u8 2 (delete) || u32 klen || key
///     u8 3 (delete prefix) || u32 plen || prefix
///     u8 4 (move)   || u32 klen || key || u64 from seq || u32 from off || u32 from len
///                   || u32 vlen || value
/// ```
pub(crate) fn encode_entry(
    seq: u64,
    writer: [u8; 16],
    batch_id: [u8; 16],
    scopes: &[&[u8]],
    payload: &Payload<'_>,
) -> Result<Vec<u8>, StoreError> {
    let size: usize = match payload {
        Payload::Batch(ops) => ops
            .iter()
            .map(|o| match o {
                WriteOp::Put { key, value } => 9 + key.len() + value.len(),
                WriteOp::Delete { key } => 5 + key.len(),
                WriteOp::DeletePrefix { prefix } => 5 + prefix.len(),
            })
            .sum(),
        Payload::Moves(m) => m.iter().map(|(k, _, v)| 25 + k.len() + v.len()).sum(),
    };
    let mut w = W(Vec::with_capacity(64 + size));
    w.0.extend_from_slice(LOG_MAGIC);
    w.u64(seq);
    w.0.extend_from_slice(&writer);
    w.0.extend_from_slice(&batch_id);
    w.u32(scopes.len() as u32);
    for s in scopes {
        w.bytes(s)?;
    }
    match payload {
        Payload::Batch(ops) => {
            w.u32(ops.len() as u32);
            for o in *ops {
                match o {
                    WriteOp::Put { key, value } => {
                        w.u8(PUT);
                        w.bytes(key)?;
                        w.bytes(value)?;
                    }
                    WriteOp::Delete { key } => {
                        w.u8(DELETE);
                        w.bytes(key)?;
                    }
                    WriteOp::DeletePrefix { prefix } => {
                        w.u8(DELETE_PREFIX);
                        w.bytes(prefix)?;
                    }
                }
            }
        }
        Payload::Moves(moves) => {
            w.u32(moves.len() as u32);
            for (key, from, value) in *moves {
                w.u8(MOVE);
                w.bytes(key)?;
                w.u64(from.seq);
                w.u32(from.off);
                w.u32(from.len);
                w.bytes(value)?;
            }
        }
    }
    if w.0.len() > u32::MAX as usize {
        return Err(corrupt("a batch over 4 GiB"));
    }
    Ok(w.finish())
}

/// Decode a log entry; `seq` is the number in its object's name, which must match.
pub(crate) fn decode_entry(buf: &[u8], seq: u64) -> Result<Entry, StoreError> {
    let body = checked(buf, LOG_MAGIC, &format!("log entry {seq}"))?;
    let mut r = R { buf: body, pos: 8 };
    let inner = r.u64()?;
    if inner != seq {
        return Err(corrupt(&format!(
            "log object {seq} holds entry {inner} (renamed or copied)"
        )));
    }
    // The writer and batch ids only tell a writer its own entry (`commit` compares bytes).
    r.take(32)?;
    let n = r.u32()? as usize;
    let mut scopes = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        scopes.push(r.bytes()?.to_vec());
    }
    let n = r.u32()? as usize;
    let mut ops = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let op = match r.u8()? {
            PUT => {
                let key = r.bytes()?.to_vec();
                Op::Put {
                    key,
                    at: r.value_loc(seq)?,
                }
            }
            DELETE => Op::Delete {
                key: r.bytes()?.to_vec(),
            },
            DELETE_PREFIX => Op::DeletePrefix {
                prefix: r.bytes()?.to_vec(),
            },
            MOVE => {
                let key = r.bytes()?.to_vec();
                let from = Loc {
                    seq: r.u64()?,
                    off: r.u32()?,
                    len: r.u32()?,
                };
                Op::Move {
                    key,
                    from,
                    at: r.value_loc(seq)?,
                }
            }
            _ => return Err(corrupt("unknown operation in a log entry")),
        };
        ops.push(op);
    }
    if r.pos != body.len() {
        return Err(corrupt("trailing bytes in a log entry"));
    }
    Ok(Entry { seq, scopes, ops })
}

/// A snapshot: the directory as of `seq`.
pub(crate) struct Snapshot {
    pub seq: u64,
    pub scopes: Vec<(Vec<u8>, u64)>,
    pub keys: Vec<(Vec<u8>, Loc)>,
}

/// ```text
/// "SDBSNP\0\1" || u64 seq
/// u32 n_scopes || n × (u32 len || scope || u64 version)
/// u64 n_keys   || n × (u32 klen || key || u64 seq || u32 off || u32 len)   keys ascending
/// u32 crc32
/// ```
pub(crate) fn encode_snapshot<'a>(
    seq: u64,
    scopes: impl ExactSizeIterator<Item = (&'a [u8], u64)>,
    keys: impl ExactSizeIterator<Item = (&'a [u8], Loc)>,
) -> Result<Vec<u8>, StoreError> {
    let mut w = W(Vec::with_capacity(64 + keys.len() * 48));
    w.0.extend_from_slice(SNAP_MAGIC);
    w.u64(seq);
    w.u32(scopes.len() as u32);
    for (s, v) in scopes {
        w.bytes(s)?;
        w.u64(v);
    }
    w.u64(keys.len() as u64);
    for (k, at) in keys {
        w.bytes(k)?;
        w.u64(at.seq);
        w.u32(at.off);
        w.u32(at.len);
    }
    Ok(w.finish())
}

pub(crate) fn decode_snapshot(buf: &[u8], seq: u64) -> Result<Snapshot, StoreError> {
    let body = checked(buf, SNAP_MAGIC, &format!("snapshot {seq}"))?;
    let mut r = R { buf: body, pos: 8 };
    if r.u64()? != seq {
        return Err(corrupt(&format!(
            "snapshot {seq} holds another sequence number"
        )));
    }
    let n = r.u32()? as usize;
    let mut scopes = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let s = r.bytes()?.to_vec();
        scopes.push((s, r.u64()?));
    }
    let n = r.u64()? as usize;
    // Every key takes at least 20 bytes: a count the object cannot hold is corrupt.
    if n > body.len() / 20 {
        return Err(corrupt("snapshot key count is too large"));
    }
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        let k = r.bytes()?.to_vec();
        let at = Loc {
            seq: r.u64()?,
            off: r.u32()?,
            len: r.u32()?,
        };
        if at.seq > seq {
            return Err(corrupt("snapshot points past itself"));
        }
        keys.push((k, at));
    }
    if r.pos != body.len() {
        return Err(corrupt("trailing bytes in a snapshot"));
    }
    Ok(Snapshot { seq, scopes, keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_point_at_their_values() {
        let ops = vec![
            WriteOp::Put {
                key: b"k1".to_vec(),
                value: b"value one".to_vec(),
            },
            WriteOp::Delete {
                key: b"k2".to_vec(),
            },
            WriteOp::DeletePrefix {
                prefix: b"p".to_vec(),
            },
            WriteOp::Put {
                key: b"k3".to_vec(),
                value: Vec::new(),
            },
        ];
        let buf = encode_entry(7, [1; 16], [2; 16], &[b"s1"], &Payload::Batch(&ops)).unwrap();
        let e = decode_entry(&buf, 7).unwrap();
        assert_eq!(e.seq, 7);
        assert_eq!(&buf[16..48], &[[1u8; 16], [2u8; 16]].concat()[..]);
        assert_eq!(e.scopes, vec![b"s1".to_vec()]);
        let Op::Put { at, .. } = &e.ops[0] else {
            panic!("put first")
        };
        assert_eq!(&buf[at.off as usize..][..at.len as usize], b"value one");
        assert_eq!(
            e.ops[1],
            Op::Delete {
                key: b"k2".to_vec()
            }
        );
        // A flipped byte, a wrong name and a truncation are all refused.
        let mut bad = buf.clone();
        bad[30] ^= 1;
        assert!(decode_entry(&bad, 7).is_err());
        assert!(decode_entry(&buf, 8).is_err());
        assert!(decode_entry(&buf[..buf.len() - 1], 7).is_err());
        let from = Loc {
            seq: 3,
            off: 10,
            len: 4,
        };
        let moves = vec![(b"k".to_vec(), from, b"abcd".to_vec())];
        let buf = encode_entry(9, [0; 16], [0; 16], &[], &Payload::Moves(&moves)).unwrap();
        let e = decode_entry(&buf, 9).unwrap();
        let Op::Move { from: f, at, .. } = &e.ops[0] else {
            panic!("move")
        };
        assert_eq!(*f, from);
        assert_eq!(&buf[at.off as usize..][..4], b"abcd");
    }

    #[test]
    fn snapshots_round_trip_and_names_sort_as_numbers() {
        let at = Loc {
            seq: 4,
            off: 1,
            len: 2,
        };
        let scopes = [(&b"a"[..], 3u64)];
        let keys = [(&b"k"[..], at)];
        let buf = encode_snapshot(5, scopes.into_iter(), keys.into_iter()).unwrap();
        let s = decode_snapshot(&buf, 5).unwrap();
        assert_eq!(s.scopes, vec![(b"a".to_vec(), 3)]);
        assert_eq!(s.keys, vec![(b"k".to_vec(), at)]);
        assert!(decode_snapshot(&buf, 6).is_err());
        assert!(log_name("p/", 9) < log_name("p/", 10));
        assert_eq!(seq_of(&log_name("p/", 42), "log/"), Some(42));
        assert_eq!(seq_of("p/log/12", "log/"), None);
    }
}
