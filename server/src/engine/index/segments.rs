//! Segmented block records: a posting-list block sealed as a head (ids, metadata, contents
//! epochs) and its rows in segments of about [`SEGMENT_BYTES`], each part sealed on its own,
//! so that a reader that needs one row decrypts one segment, not the whole block
//! (docs/FORMAT.md "Segmented block record").
//!
//! Generations with the 4-bit first pass are written this way: their queries rescore a few
//! dozen candidates in as many blocks. Everything else stays one sealed record (format
//! version 2); readers take either.

use super::*;

/// Magic at the start of a segmented record (in the clear: the frame is not secret).
const MAGIC: &[u8; 4] = b"SDB3";

/// Bytes of rows per segment (the last segment of a block may hold fewer rows).
pub(crate) const SEGMENT_BYTES: usize = 8192;

/// Rows per segment for rows of `row_bytes` bytes.
pub(crate) fn segment_rows(row_bytes: usize) -> usize {
    (SEGMENT_BYTES / row_bytes.max(1)).max(1)
}

/// The associated data of part `i` of `n`: the block's own AAD (key and epoch), the part's
/// place and the part count, so parts cannot be moved, dropped or mixed across records.
fn part_aad(key: &[u8], epoch: u64, i: u32, n: u32) -> Vec<u8> {
    let mut a = fmt::aad_at(key, epoch);
    a.extend_from_slice(b"/part/");
    a.extend_from_slice(&i.to_be_bytes());
    a.extend_from_slice(&n.to_be_bytes());
    a
}

/// Seal a block's plaintext (`plain`, [`Block::encode`]: a head of `head_len` bytes, then
/// its rows of `row_bytes` each) as a segmented record under `key` at `epoch`.
pub(crate) fn seal(
    keys: &IndexKeys,
    key: &[u8],
    epoch: u64,
    plain: &[u8],
    head_len: usize,
    row_bytes: usize,
) -> Vec<u8> {
    let (head, rows) = plain.split_at(head_len.min(plain.len()));
    let seg = segment_rows(row_bytes) * row_bytes.max(1);
    let parts: Vec<&[u8]> = std::iter::once(head).chain(rows.chunks(seg)).collect();
    let n = parts.len() as u32;
    let sealed: Vec<Vec<u8>> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| keys.seal(&part_aad(key, epoch, i as u32, n), p))
        .collect();
    let total: usize = sealed.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(8 + 4 * sealed.len() + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&n.to_le_bytes());
    for s in &sealed {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    for s in sealed {
        out.extend_from_slice(&s);
    }
    out
}

/// The sealed parts of a segmented record, or `None` when `v` is not one (a version 2
/// record, whose first bytes are a random salt, or a frame that does not add up).
pub(crate) fn parts(v: &[u8]) -> Option<Vec<&[u8]>> {
    let rest = v.strip_prefix(MAGIC)?;
    let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let rest = &rest[4..];
    // Each part is at least one seal's overhead: a count the record cannot hold is no frame.
    if n == 0 || n > rest.len() / (4 + keys::SEAL_OVERHEAD) {
        return None;
    }
    let (lens, mut body) = rest.split_at(4 * n);
    let mut out = Vec::with_capacity(n);
    for l in lens.chunks_exact(4) {
        let l = u32::from_le_bytes(l.try_into().ok()?) as usize;
        if l > body.len() {
            return None;
        }
        let (p, tail) = body.split_at(l);
        out.push(p);
        body = tail;
    }
    body.is_empty().then_some(out)
}

/// Open part `i` of a segmented record's `parts`.
pub(crate) fn open_part(
    keys: &IndexKeys,
    key: &[u8],
    epoch: u64,
    parts: &[&[u8]],
    i: usize,
) -> Result<Vec<u8>, keys::KeyError> {
    let p = parts.get(i).ok_or(keys::KeyError::Open)?;
    keys.open(&part_aad(key, epoch, i as u32, parts.len() as u32), p)
}

/// The plaintext of a block record of either form ([`Block::decode_as`] reads it): a
/// segmented record's parts opened and joined, else the record opened whole.
pub(crate) fn open_block(
    keys: &IndexKeys,
    key: &[u8],
    epoch: u64,
    v: &[u8],
) -> Result<Vec<u8>, keys::KeyError> {
    if let Some(parts) = parts(v) {
        let mut plain = Vec::with_capacity(v.len());
        let opened: Result<(), keys::KeyError> = (0..parts.len()).try_for_each(|i| {
            plain.extend_from_slice(&open_part(keys, key, epoch, &parts, i)?);
            Ok(())
        });
        if opened.is_ok() {
            return Ok(plain);
        }
        // A version 2 record whose random salt happens to start like a frame (2^-32).
    }
    keys.open(&fmt::aad_at(key, epoch), v)
}

/// Rows of one block read for a rescoring, without decrypting the rest of it.
pub(crate) struct Rows {
    /// The record as stored (its head is opened only if a row makes the answer).
    record: Vec<u8>,
    key: Vec<u8>,
    epoch: u64,
    /// Row position -> (vector, inverse norm).
    rows: HashMap<u32, (Vec<f32>, f32)>,
}

impl Rows {
    /// The rows `want` of the segmented block record `record` (stored under `key` at
    /// `epoch`, holding `count` rows of `precision` and `dim`): only their segments are
    /// opened. `Ok(None)`: the record is not segmented (read it whole).
    pub(crate) fn read(
        keys: &IndexKeys,
        key: Vec<u8>,
        epoch: u64,
        record: Vec<u8>,
        want: &[u32],
        (count, dim, precision): (usize, usize, Precision),
    ) -> Result<Option<Self>, String> {
        let rb = precision.row_bytes(dim);
        let per = segment_rows(rb);
        let rows = {
            let Some(parts) = parts(&record) else {
                return Ok(None);
            };
            if parts.len() != 1 + count.div_ceil(per) {
                return Err(format!(
                    "{} parts where {count} rows take {}",
                    parts.len(),
                    1 + count.div_ceil(per)
                ));
            }
            if let Some(p) = want.iter().find(|&&p| p as usize >= count) {
                return Err(format!("has no row {p} (it holds {count})"));
            }
            let mut rows = HashMap::default();
            let mut segs: Vec<u32> = want.iter().map(|&p| p / per as u32).collect();
            segs.sort_unstable();
            segs.dedup();
            for s in segs {
                let plain = open_part(keys, &key, epoch, &parts, 1 + s as usize)
                    .map_err(|_| "a segment failed authentication".to_owned())?;
                let first = s as usize * per;
                let n = per.min(count.saturating_sub(first));
                if plain.len() != n * rb {
                    return Err("a segment has the wrong length".into());
                }
                for &p in want.iter().filter(|&&p| p as usize / per == s as usize) {
                    let at = (p as usize - first) * rb;
                    let v = precision
                        .decode(&plain[at..at + rb], 1, dim)
                        .map_err(|e| e.to_string())?;
                    let inv = distance::inv_norm(&v);
                    rows.insert(p, (v, inv));
                }
            }
            rows
        };
        Ok(Some(Self {
            record,
            key,
            epoch,
            rows,
        }))
    }

    /// The vector and inverse norm of row `pos`, if it was read.
    pub(crate) fn row(&self, pos: u32) -> Option<&(Vec<f32>, f32)> {
        self.rows.get(&pos)
    }

    /// The head (ids, metadata, contents epochs) of the block, opened now.
    pub(crate) fn head(&self, keys: &IndexKeys) -> Result<Block, String> {
        let parts = parts(&self.record).ok_or("not a segmented record")?;
        let plain = open_part(keys, &self.key, self.epoch, &parts, 0)
            .map_err(|_| "the head failed authentication".to_owned())?;
        Block::decode_head(&plain).map_err(|e| e.to_string())
    }
}
