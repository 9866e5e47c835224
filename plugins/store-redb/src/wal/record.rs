//! Log records: encoding as they are appended, decoding as segments are replayed.
//!
//! ```text
//! file    := magic "SDBWAL1\n" (8 bytes) || record*
//! record  := len u32 || crc32 u32 (of payload) || payload (len bytes)
//! payload := seq u64 || n_ops u32 || op*
//! op      := 0x01 || key_len u32 || key || value_len u32 || value    (put)
//!          | 0x02 || key_len u32 || key                              (delete)
//!          | 0x03 || len u32 || group prefix                         (drop a group)
//! ```
//! All integers little-endian. A drop removes every key of one group (see
//! [`crate::files`]); the ops of a record apply in order.

use sealdb_plugin_api::WriteOp;

pub(crate) const MAGIC: &[u8; 8] = b"SDBWAL1\n";
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_DROP: u8 = 3;

/// Where the newest value of a key lives inside a segment file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    Value { off: u64, len: u32 },
    Gone,
}

/// What one op did, in the order of the record: readers' overlays replay these.
#[derive(Debug)]
pub(crate) enum Change {
    /// The key's newest value (or its deletion).
    Key(Vec<u8>, Slot),
    /// Every key of this group is gone (those written after it in the log live again).
    Drop(Vec<u8>),
}

/// Write one record through `sink(offset, bytes)`, the record starting at `start`: the
/// payload first (small pieces gathered in a staging buffer, large values passed through
/// without a copy), then the header with the payload's length and CRC. Returns the changes
/// of the ops in order. `ops` hold puts, deletes, and, standing for a group's drop,
/// `DeletePrefix` of exactly that group's prefix (the writer expands any other).
pub(crate) fn emit(
    seq: u64,
    ops: &[WriteOp],
    start: u64,
    mut sink: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<(u64, Vec<Change>)> {
    const STAGE: usize = 256 << 10;
    struct Out<F> {
        sink: F,
        stage: Vec<u8>,
        stage_at: u64,
        pos: u64,
        crc: crc32fast::Hasher,
    }
    impl<F: FnMut(u64, &[u8]) -> std::io::Result<()>> Out<F> {
        fn flush(&mut self) -> std::io::Result<()> {
            if !self.stage.is_empty() {
                (self.sink)(self.stage_at, &self.stage)?;
                self.stage.clear();
            }
            self.stage_at = self.pos;
            Ok(())
        }
        fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
            self.crc.update(b);
            if b.len() >= STAGE / 4 {
                self.flush()?;
                (self.sink)(self.pos, b)?;
                self.pos += b.len() as u64;
                self.stage_at = self.pos;
                return Ok(());
            }
            self.stage.extend_from_slice(b);
            self.pos += b.len() as u64;
            if self.stage.len() >= STAGE {
                self.flush()?;
            }
            Ok(())
        }
        fn tagged(&mut self, tag: u8, key: &[u8]) -> std::io::Result<()> {
            self.put(&[tag])?;
            self.put(&(key.len() as u32).to_le_bytes())?;
            self.put(key)
        }
    }
    let mut out = Out {
        sink: &mut sink,
        stage: Vec::with_capacity(STAGE),
        stage_at: start + 8,
        pos: start + 8,
        crc: crc32fast::Hasher::new(),
    };
    out.put(&seq.to_le_bytes())?;
    out.put(&(ops.len() as u32).to_le_bytes())?;
    let mut changes = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            WriteOp::Put { key, value } => {
                out.tagged(OP_PUT, key)?;
                out.put(&(value.len() as u32).to_le_bytes())?;
                let off = out.pos;
                out.put(value)?;
                let len = value.len() as u32;
                changes.push(Change::Key(key.clone(), Slot::Value { off, len }));
            }
            WriteOp::Delete { key } => {
                out.tagged(OP_DELETE, key)?;
                changes.push(Change::Key(key.clone(), Slot::Gone));
            }
            WriteOp::DeletePrefix { prefix } => {
                out.tagged(OP_DROP, prefix)?;
                changes.push(Change::Drop(prefix.clone()));
            }
        }
    }
    out.flush()?;
    let end = out.pos;
    let mut header = [0u8; 8];
    header[0..4].copy_from_slice(&((end - start - 8) as u32).to_le_bytes());
    header[4..8].copy_from_slice(&out.crc.finalize().to_le_bytes());
    sink(start, &header)?;
    Ok((end - start, changes))
}

/// The whole record as bytes (tests).
#[cfg(test)]
pub(crate) fn encode(seq: u64, ops: &[WriteOp], start: u64) -> (Vec<u8>, Vec<Change>) {
    let mut buf = Vec::new();
    let (_, changes) = emit(seq, ops, start, |off, b| {
        let at = (off - start) as usize;
        if buf.len() < at + b.len() {
            buf.resize(at + b.len(), 0);
        }
        buf[at..at + b.len()].copy_from_slice(b);
        Ok(())
    })
    .expect("writing to memory cannot fail");
    (buf, changes)
}

/// One decoded op.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Put(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
    Drop(&'a [u8]),
}

/// Decode the records of one segment, stopping at a torn or foreign tail. Returns the ops
/// of each record in order and the sequence number after the last record.
pub(crate) fn decode_segment(buf: &[u8], mut seq: Option<u64>) -> (Vec<Vec<Op<'_>>>, Option<u64>) {
    let mut records = Vec::new();
    if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
        return (records, seq);
    }
    let mut pos = MAGIC.len();
    while let Some(header) = buf.get(pos..pos + 8) {
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
        let Some(payload) = buf.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some((rec_seq, ops)) = decode_payload(payload) else {
            break;
        };
        if seq.is_some_and(|s| s != rec_seq) {
            break;
        }
        seq = Some(rec_seq + 1);
        records.push(ops);
        pos += 8 + len;
    }
    (records, seq)
}

fn decode_payload(p: &[u8]) -> Option<(u64, Vec<Op<'_>>)> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = p.get(pos..pos + n)?;
        pos += n;
        Some(s)
    };
    let seq = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut ops = Vec::with_capacity(n.min(p.len() / 5));
    for _ in 0..n {
        let tag = take(1)?[0];
        let klen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let key = take(klen)?;
        match tag {
            OP_PUT => {
                let vlen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                ops.push(Op::Put(key, take(vlen)?));
            }
            OP_DELETE => ops.push(Op::Delete(key)),
            OP_DROP => ops.push(Op::Drop(key)),
            _ => return None,
        }
    }
    Some((seq, ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_stop_at_a_torn_tail() {
        let ops = vec![
            WriteOp::Put {
                key: b"k1".to_vec(),
                value: b"v1".to_vec(),
            },
            WriteOp::Delete {
                key: b"k2".to_vec(),
            },
            WriteOp::DeletePrefix {
                prefix: b"g".to_vec(),
            },
        ];
        let mut file = MAGIC.to_vec();
        let (r1, changes) = encode(7, &ops, file.len() as u64);
        match changes[0] {
            Change::Key(_, Slot::Value { off, len }) => {
                assert_eq!(&r1[(off as usize - 8)..][..len as usize], b"v1");
            }
            _ => panic!("put decoded as something else"),
        }
        assert!(matches!(&changes[2], Change::Drop(g) if g == b"g"));
        file.extend_from_slice(&r1);
        let (r2, _) = encode(8, &ops[..1], file.len() as u64);
        file.extend_from_slice(&r2);
        let (recs, next) = decode_segment(&file, Some(7));
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0],
            vec![
                Op::Put(&b"k1"[..], &b"v1"[..]),
                Op::Delete(&b"k2"[..]),
                Op::Drop(&b"g"[..])
            ]
        );
        assert_eq!(next, Some(9));
        // Cut inside the second record: only the first survives.
        let (recs, next) = decode_segment(&file[..file.len() - 3], Some(7));
        assert_eq!((recs.len(), next), (1, Some(8)));
        // A flipped payload bit fails the CRC.
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode_segment(&bad, Some(7)).0.len(), 1);
        // A record from another sequence (a stale file) is not replayed.
        assert_eq!(decode_segment(&file, Some(3)).0.len(), 0);
    }
}
