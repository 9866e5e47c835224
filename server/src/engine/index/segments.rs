//! Split blocks: a posting-list block stored as its head (ids, metadata, contents epochs)
//! in the block record and its rows in *row records* of [`segment_rows`] rows each, every
//! record sealed on its own (docs/FORMAT.md "Split block").
//!
//! Generations large enough for the 4-bit first pass are written this way (their quantiser
//! record, version 3, says so): a query rescoring a few dozen candidates then reads and
//! decrypts one row record per candidate and one head per hit, not whole blocks. Sizes are
//! chosen for the store's pages: a row record fills about 16 KiB (redb rounds every large
//! value up to a power of two), a block holds a whole number of row records.
//!
//! Also here: reading the segmented records (one value, magic `SDB3`) that generations
//! trained by the previous format wrote; nothing writes them any more.

use super::*;

/// Version byte of a split block's head (a whole block's plaintext starts with 2).
pub(crate) const SPLIT_HEAD: u8 = 3;

/// Bytes of a store page a row record leaves to its seal, key and the store's own entry
/// header (44 + 37 + 12, with room to spare).
const SLACK: usize = 256;

/// Page sizes a row record may fill, smallest first.
const PAGES: [usize; 3] = [16 << 10, 32 << 10, 64 << 10];

/// Rows per row record for rows of `row_bytes` bytes: as many as fill the smallest page of
/// [`PAGES`] that they leave at most 1/16 empty (at least one row).
pub(crate) fn segment_rows(row_bytes: usize) -> usize {
    let rb = row_bytes.max(1);
    for p in PAGES {
        let r = (p - SLACK) / rb;
        if r >= 1 && (p - r * rb) * 16 <= p {
            return r;
        }
    }
    ((PAGES[2] - SLACK) / rb).max(1)
}

/// Row records of a split block of `rows` rows.
pub(crate) fn segments_of(rows: usize, row_bytes: usize) -> usize {
    rows.div_ceil(segment_rows(row_bytes))
}

/// Rows per split block: a whole number of row records holding about [`BLOCK_BYTES`] of
/// rows, at least 16 rows and at most 4,096 (or one record).
pub(crate) fn block_cap(row_bytes: usize) -> usize {
    let per = segment_rows(row_bytes);
    let segs = ((BLOCK_BYTES as f64) / ((per * row_bytes.max(1)) as f64)).round() as usize;
    // At most 4,096 rows (as whole blocks), in whole records.
    let most = (4096 / per).max(1);
    per * segs.max(16usize.div_ceil(per)).clamp(1, most)
}

/// The records of a split block at `epoch`: the block record (`plain`'s head, [`Block::encode`],
/// the first `head_len` bytes, with version byte [`SPLIT_HEAD`]), then one row record per
/// [`segment_rows`] rows of `row_bytes` each. Each is sealed with the AAD of its own key
/// and `epoch`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn seal_split(
    keys: &IndexKeys,
    id: &fmt::IndexId,
    (gen, list, block): (u32, u32, u32),
    epoch: u64,
    plain: &[u8],
    head_len: usize,
    row_bytes: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let (head, rows) = plain.split_at(head_len.min(plain.len()));
    let mut head = head.to_vec();
    if let Some(v) = head.first_mut() {
        *v = SPLIT_HEAD;
    }
    let hk = fmt::block_key(id, gen, list, block);
    let mut out = Vec::with_capacity(1 + rows.len() / SEGMENT_MIN);
    let hv = keys.seal(&fmt::aad_at(&hk, epoch), &head);
    out.push((hk, hv));
    let seg = segment_rows(row_bytes) * row_bytes.max(1);
    for (s, chunk) in rows.chunks(seg).enumerate() {
        let k = fmt::rows_key(id, gen, list, block, s as u32);
        let v = keys.seal(&fmt::aad_at(&k, epoch), chunk);
        out.push((k, v));
    }
    out
}

/// A lower bound of a row record's size, to size vectors.
const SEGMENT_MIN: usize = 8 << 10;

/// Whether a block record's plaintext is a split block's head.
pub(crate) fn is_split(plain: &[u8]) -> bool {
    plain.first() == Some(&SPLIT_HEAD)
}

/// The keys of the row records of a split block of `rows` rows.
pub(crate) fn row_keys(
    id: &fmt::IndexId,
    (gen, list, block): (u32, u32, u32),
    rows: usize,
    row_bytes: usize,
) -> Vec<Vec<u8>> {
    (0..segments_of(rows, row_bytes) as u32)
        .map(|s| fmt::rows_key(id, gen, list, block, s))
        .collect()
}

/// The rows `seg` of a split block of `rows` rows should hold.
pub(crate) fn rows_in(seg: usize, rows: usize, row_bytes: usize) -> usize {
    let per = segment_rows(row_bytes);
    per.min(rows.saturating_sub(seg * per))
}

/// Open row record `key` (sealed at `epoch`) of a block of `rows` rows, checking its length.
pub(crate) fn open_rows(
    keys: &IndexKeys,
    key: &[u8],
    epoch: u64,
    sealed: &[u8],
    (seg, rows, row_bytes): (usize, usize, usize),
) -> Result<Vec<u8>, String> {
    let plain = keys
        .open(&fmt::aad_at(key, epoch), sealed)
        .map_err(|_| format!("row record {seg} failed authentication at epoch {epoch}"))?;
    if plain.len() != rows_in(seg, rows, row_bytes) * row_bytes {
        return Err(format!("row record {seg} has the wrong length"));
    }
    Ok(plain)
}

/// A whole block's plaintext from a split head and its opened row records, in order.
pub(crate) fn join(mut head: Vec<u8>, rows: Vec<Vec<u8>>) -> Vec<u8> {
    if let Some(v) = head.first_mut() {
        *v = 2;
    }
    head.reserve(rows.iter().map(Vec::len).sum());
    for r in rows {
        head.extend_from_slice(&r);
    }
    head
}

/// Magic at the start of a segmented record of the previous format.
const MAGIC: &[u8; 4] = b"SDB3";

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

/// The associated data of part `i` of `n` of a segmented record.
fn part_aad(key: &[u8], epoch: u64, i: u32, n: u32) -> Vec<u8> {
    let mut a = fmt::aad_at(key, epoch);
    a.extend_from_slice(b"/part/");
    a.extend_from_slice(&i.to_be_bytes());
    a.extend_from_slice(&n.to_be_bytes());
    a
}

/// The plaintext of a block record sealed whole or segmented (the previous format): a
/// segmented record's parts opened and joined, else the record opened whole. A split
/// block's record opens to its head alone ([`is_split`]).
pub(crate) fn open_block(
    keys: &IndexKeys,
    key: &[u8],
    epoch: u64,
    v: &[u8],
) -> Result<Vec<u8>, keys::KeyError> {
    if let Some(parts) = parts(v) {
        let n = parts.len() as u32;
        let mut plain = Vec::with_capacity(v.len());
        let opened = parts.iter().enumerate().try_for_each(|(i, p)| {
            plain.extend_from_slice(&keys.open(&part_aad(key, epoch, i as u32, n), p)?);
            Ok::<(), keys::KeyError>(())
        });
        if opened.is_ok() {
            return Ok(plain);
        }
        // A version 2 record whose random salt happens to start like a frame (2^-32).
    }
    keys.open(&fmt::aad_at(key, epoch), v)
}

#[cfg(test)]
mod sizes {
    use super::*;

    #[test]
    fn row_records_fill_their_pages_and_blocks_hold_whole_records() {
        // float32 x 128: 31 rows (15,872 bytes) per 16 KiB page, 4 records per block.
        assert_eq!(segment_rows(512), 31);
        assert_eq!(block_cap(512), 124);
        // float16 x 128: 63 rows.
        assert_eq!(segment_rows(256), 63);
        assert_eq!(block_cap(256), 252);
        // float32 x 1536 (6 KiB rows): two rows would leave a 16 KiB page 1/4 empty; five
        // fill 32 KiB.
        assert_eq!(segment_rows(6144), 5);
        for rb in [4, 100, 512, 1000, 3072, 6144, 20_000, 70_000, 1 << 20] {
            let per = segment_rows(rb);
            assert!(per >= 1);
            let cap = block_cap(rb);
            assert_eq!(cap % per, 0, "row bytes {rb}");
            assert!(cap >= 16.min(per * 16), "row bytes {rb}");
            if rb <= PAGES[2] - SLACK {
                assert!(per * rb + SLACK <= 64 << 10, "row bytes {rb}");
            }
        }
        assert_eq!(segments_of(124, 512), 4);
        assert_eq!(segments_of(125, 512), 5);
        assert_eq!(rows_in(4, 125, 512), 1);
        assert_eq!(rows_in(3, 124, 512), 31);
        assert_eq!(rows_in(5, 124, 512), 0);
    }
}
