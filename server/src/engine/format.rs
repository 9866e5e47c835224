//! Store keys and record encodings. `docs/FORMAT.md` describes every byte; keep them in step.
//!
//! Every value except the clear header of a meta record is sealed with AES-256-GCM under a
//! key of its own (derived from the index's DEK and a random salt), with associated data
//! `"SDB2" || store key` and, for records that change over an index's life, the write
//! *epoch* the state record expects them at: a sealed value only opens under the exact key
//! and version it was written at, so a blob swapped, copied, moved or rolled back inside the
//! store fails to open instead of returning another record's (or an older) data.

use super::EngineError;

/// Format version written into meta records and associated data.
pub const FORMAT_VERSION: u8 = 2;
/// Magic at the start of a meta record.
pub const META_MAGIC: &[u8; 4] = b"SDBM";
/// Length of index ids.
pub const INDEX_ID_LEN: usize = 16;

/// Record kinds: the first byte of every store key.
pub mod kind {
    /// `M || index name` -> meta record (clear header, wrapped DEK, sealed config).
    pub const META: u8 = b'M';
    /// `S || index id` -> sealed index state.
    pub const STATE: u8 = b'S';
    /// `C || index id || gen` -> sealed centroids of one training generation.
    pub const CENTROIDS: u8 = b'C';
    /// `L || index id || gen || list || block` -> sealed posting-list block.
    pub const LIST: u8 = b'L';
    /// `I || index id || locator` -> sealed item record (id and contents).
    pub const ITEM: u8 = b'I';
    /// `P || index id || gen || locator` -> position record of a version-4 store (the
    /// `(list, block)` of the item in generation `gen`); read only by the upgrade to runs.
    pub const POS: u8 = b'P';
    /// `Q || index id || gen` -> sealed 8-bit quantisers of the lists of generation `gen`.
    pub const QUANT: u8 = b'Q';
    /// `D || index id || gen || list group || block group` -> sealed manifest page.
    pub const PAGE: u8 = b'D';
    /// `R || index id || gen || run || page` -> sealed page of a position run (page
    /// `0xFFFFFFFF` is the run's header).
    pub const RUN: u8 = b'R';
    /// `U || index id || user id` -> sealed user record (RBAC).
    pub const USER: u8 = b'U';
    /// `T || index id || term tag || seq` -> sealed postings of one term of one
    /// `full_text` field, as changed by text write `seq` (docs/FORMAT.md "Text index").
    pub const TERM: u8 = b'T';
    /// `V || index id || value tag || seq` -> sealed postings of one value of one field the
    /// schema declares filterable, as changed by write `seq` (docs/FORMAT.md "Value index").
    pub const VALUE: u8 = b'V';
    /// `X || index id` -> sealed statistics of the secondary indexes (their write sequence,
    /// documents and total length per `full_text` field).
    pub const TEXT_STATS: u8 = b'X';
    /// `K || index id || gen` -> sealed coarse quantisers of a generation's lists (the
    /// quantiser record's layout); present when the generation has a 4-bit first pass.
    pub const COARSE: u8 = b'K';
    /// `B || index id || gen || list || block` -> sealed 4-bit codes of one block's rows, at
    /// the block's epoch (generations whose coarse record is version 2).
    pub const CODES: u8 = b'B';
    /// `G || index id || gen || list || block || segment` -> sealed rows of one segment of
    /// a split block (generations whose quantiser record is version 3; docs/FORMAT.md
    /// "Split block").
    pub const ROWS: u8 = b'G';
}

pub type IndexId = [u8; INDEX_ID_LEN];

/// The record kinds that belong to one generation and make up nearly all of its bytes
/// (blocks, row records, codes, position runs): each is written in bulk by a training and
/// deleted whole, by one prefix delete of `kind || index id || gen`, when the next one
/// replaces it. A store may keep each such prefix apart (the redb store gives it a file of
/// its own) so that the delete returns the space.
pub const GENERATION_KINDS: &[u8] = &[kind::LIST, kind::ROWS, kind::CODES, kind::RUN];
/// Length of the prefix `kind || index id || gen (u32 BE)` of those kinds' keys.
pub const GENERATION_PREFIX_LEN: usize = 1 + INDEX_ID_LEN + 4;

/// The scope of an index's own records in a shared store ([`IndexStore::version`]): every
/// batch that changes the index names it, so a server sees another's writes and two
/// servers' writes to one index never interleave.
///
/// [`IndexStore::version`]: sealdb_plugin_api::IndexStore::version
pub fn index_scope(id: &IndexId) -> Vec<u8> {
    [&b"I"[..], &id[..]].concat()
}

/// The scope of an index name (its meta record): create, delete and rewrap name it, so two
/// servers never both create one name.
pub fn name_scope(name: &str) -> Vec<u8> {
    [&b"N"[..], name.as_bytes()].concat()
}

pub fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(kind::META);
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn scoped_prefix(kind: u8, id: &IndexId) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + INDEX_ID_LEN + 12);
    k.push(kind);
    k.extend_from_slice(id);
    k
}

pub fn state_key(id: &IndexId) -> Vec<u8> {
    scoped_prefix(kind::STATE, id)
}

pub fn centroids_key(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::CENTROIDS, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn list_gen_prefix(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::LIST, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn block_key(id: &IndexId, gen: u32, list: u32, block: u32) -> Vec<u8> {
    let mut k = list_gen_prefix(id, gen);
    k.extend_from_slice(&list.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// Parse `(list, block)` out of a block key produced by [`block_key`].
pub fn parse_block_key(key: &[u8]) -> Option<(u32, u32)> {
    let tail = key.get(1 + INDEX_ID_LEN + 4..)?;
    if tail.len() != 8 {
        return None;
    }
    Some((
        u32::from_be_bytes(tail[..4].try_into().ok()?),
        u32::from_be_bytes(tail[4..].try_into().ok()?),
    ))
}

pub fn page_gen_prefix(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::PAGE, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn page_key(id: &IndexId, gen: u32, list_group: u32, block_group: u32) -> Vec<u8> {
    let mut k = page_gen_prefix(id, gen);
    k.extend_from_slice(&list_group.to_be_bytes());
    k.extend_from_slice(&block_group.to_be_bytes());
    k
}

pub fn quant_key(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::QUANT, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn coarse_key(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::COARSE, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn codes_gen_prefix(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::CODES, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

/// The key of block `list/block`'s codes record: the block key's layout under kind `B`.
pub fn codes_key(id: &IndexId, gen: u32, list: u32, block: u32) -> Vec<u8> {
    let mut k = codes_gen_prefix(id, gen);
    k.extend_from_slice(&list.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

pub fn rows_gen_prefix(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::ROWS, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

/// The key of row segment `seg` of block `list/block`: the block key's layout under kind
/// `G`, then the segment number.
pub fn rows_key(id: &IndexId, gen: u32, list: u32, block: u32, seg: u32) -> Vec<u8> {
    let mut k = rows_gen_prefix(id, gen);
    k.extend_from_slice(&list.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k.extend_from_slice(&seg.to_be_bytes());
    k
}

pub fn pos_gen_prefix(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::POS, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn run_gen_prefix(id: &IndexId, gen: u32) -> Vec<u8> {
    let mut k = scoped_prefix(kind::RUN, id);
    k.extend_from_slice(&gen.to_be_bytes());
    k
}

pub fn run_prefix(id: &IndexId, gen: u32, run: u64) -> Vec<u8> {
    let mut k = run_gen_prefix(id, gen);
    k.extend_from_slice(&run.to_be_bytes());
    k
}

pub fn run_page_key(id: &IndexId, gen: u32, run: u64, page: u32) -> Vec<u8> {
    let mut k = run_prefix(id, gen, run);
    k.extend_from_slice(&page.to_be_bytes());
    k
}

pub fn item_key(id: &IndexId, locator: &[u8; 16]) -> Vec<u8> {
    let mut k = scoped_prefix(kind::ITEM, id);
    k.extend_from_slice(locator);
    k
}

/// The prefix of every postings record of one tag (`kind` [`kind::TERM`] or
/// [`kind::VALUE`]).
pub fn tag_prefix(kind: u8, id: &IndexId, tag: &[u8; 16]) -> Vec<u8> {
    let mut k = scoped_prefix(kind, id);
    k.extend_from_slice(tag);
    k
}

/// The postings record of `tag` written by write `seq` (big-endian: records sort by it).
pub fn tag_key(kind: u8, id: &IndexId, tag: &[u8; 16], seq: u64) -> Vec<u8> {
    let mut k = tag_prefix(kind, id, tag);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// [`tag_prefix`] of a term.
pub fn term_prefix(id: &IndexId, tag: &[u8; 16]) -> Vec<u8> {
    tag_prefix(kind::TERM, id, tag)
}

pub fn text_stats_key(id: &IndexId) -> Vec<u8> {
    scoped_prefix(kind::TEXT_STATS, id)
}

/// Associated data for the sealed value stored at `store_key`.
pub fn aad(store_key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(4 + store_key.len());
    a.extend_from_slice(b"SDB");
    a.push(b'0' + FORMAT_VERSION);
    a.extend_from_slice(store_key);
    a
}

/// Associated data for a record that must be at write epoch `epoch` (blocks, item records).
pub fn aad_at(store_key: &[u8], epoch: u64) -> Vec<u8> {
    let mut a = aad(store_key);
    a.extend_from_slice(&epoch.to_be_bytes());
    a
}

/// Little-endian byte writer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `u32 length || bytes`.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Little-endian byte reader; every read is bounds-checked and reports corruption.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    fn corrupt(&self) -> EngineError {
        EngineError::Corrupt(format!("truncated {}", self.what))
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if self.buf.len() < n {
            return Err(self.corrupt());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], EngineError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<&'a str, EngineError> {
        let what = self.what;
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| EngineError::Corrupt(format!("invalid UTF-8 in {what}")))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_sort_by_list_then_block_and_parse_back() {
        let id = [7u8; INDEX_ID_LEN];
        let a = block_key(&id, 1, 2, 300);
        let b = block_key(&id, 1, 3, 0);
        assert!(a < b);
        assert!(a.starts_with(&list_gen_prefix(&id, 1)));
        assert_eq!(parse_block_key(&a), Some((2, 300)));
        assert_eq!(parse_block_key(&a[..10]), None);
    }

    #[test]
    fn reader_reports_truncation() {
        let mut w = Writer::default();
        w.u32(7).bytes(b"abc");
        let mut r = Reader::new(&w.0, "test");
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.str().unwrap(), "abc");
        assert!(r.is_empty());
        let mut r = Reader::new(&w.0[..6], "test");
        r.u32().unwrap();
        assert!(matches!(r.bytes(), Err(EngineError::Corrupt(_))));
    }
}
