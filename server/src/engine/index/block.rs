//! Posting-list blocks as decrypted into the block cache, their byte encoding (docs/FORMAT.md
//! "Posting-list block"), the resident directory of a list's blocks, and the 8-bit codes of
//! a list's first pass.

use std::borrow::Cow;

use super::*;
use crate::engine::tq;

/// A query as block scans want it: as given (unit length for angular metrics), and, for
/// `tq` blocks, rotated as the `tq` encoder rotates rows ([`tq::rotate`]), computed once.
pub(crate) struct ScanQuery {
    pub(crate) plain: Vec<f32>,
    rotated: Option<(u8, Vec<f32>)>,
}

impl ScanQuery {
    pub(crate) fn new(q: &[f32], precision: Precision) -> Self {
        Self {
            plain: q.to_vec(),
            rotated: match precision {
                Precision::Tq(bits) => Some((bits, tq::rotate(q, bits))),
                _ => None,
            },
        }
    }

    /// The query for rows held as `held_as`.
    fn for_scan(&self, held_as: Precision) -> &[f32] {
        match (&self.rotated, held_as) {
            (Some((b, r)), Precision::Tq(bits)) if *b == bits => r,
            _ => &self.plain,
        }
    }
}

thread_local! {
    /// Per thread: the rotated rows of the packed block being scanned.
    static ROTATED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A scan thread keeps at most this many floats of [`ROTATED`] between blocks.
const ROTATED_KEEP: usize = 1 << 20;

/// Target plaintext size of one posting-list block.
pub(crate) const BLOCK_BYTES: usize = 56 * 1024;

/// A decrypted posting-list block. Immutable once shared (`Arc`) through the block cache.
///
/// Its vectors are held one of two ways: as floats in `vecs` (float32 and float16 indexes),
/// or, on float16 and `tq` indexes, as stored (`packed`; `vecs` empty), so that the cache
/// holds as many bytes per vector as the store does. Scans decode packed rows a block at a
/// time (`tq` rows into the rotated domain, [`Block::scan`]); a row wanted as floats is
/// decoded on the spot ([`Block::vector`]).
#[derive(Clone, Default)]
pub struct Block {
    pub(crate) ids: Vec<String>,
    pub(crate) vecs: Vec<f32>,
    /// The rows as stored, `held_as.row_bytes(dim)` each (float16 and `tq` blocks).
    pub(crate) packed: Vec<u8>,
    /// How the rows are held: `F32` in `vecs`, anything else in `packed`.
    pub(crate) held_as: Precision,
    pub(crate) inv_norms: Vec<f32>,
    pub(crate) meta: Vec<Option<Arc<Value>>>,
    /// Per row: the write epoch of the item's contents record (0 = it has none).
    pub(crate) cepochs: Vec<u64>,
    /// The write epoch this block was sealed at (what the state record's manifest holds).
    pub(crate) epoch: u64,
    /// 8-bit codes of `vecs` under the list's [`Quant`] (empty when the list has none).
    /// Only [`code_block`] writes them; edits leave them stale until the block is installed.
    pub(crate) codes: Vec<u8>,
    /// Memory held, less the codes; set by [`Block::encode`] and [`Block::decode`].
    pub(crate) held: usize,
}

impl Block {
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// An empty block with room for `rows` vectors, so that filling it never over-allocates.
    pub(crate) fn with_capacity(rows: usize, dim: usize, precision: Precision) -> Self {
        let (vecs, packed) = match precision {
            Precision::F32 => (Vec::with_capacity(rows * dim), Vec::new()),
            _ => (
                Vec::new(),
                Vec::with_capacity(rows * precision.row_bytes(dim)),
            ),
        };
        Self {
            ids: Vec::with_capacity(rows),
            vecs,
            packed,
            held_as: precision,
            inv_norms: Vec::with_capacity(rows),
            meta: Vec::with_capacity(rows),
            cepochs: Vec::with_capacity(rows),
            epoch: 0,
            codes: Vec::new(),
            held: 0,
        }
    }

    /// Memory this block holds, as the block cache weighs it.
    pub fn weight(&self) -> usize {
        self.held + self.codes.len()
    }

    /// Approximate heap and inline bytes: vectors and norms, epochs, ids, and parsed metadata
    /// at about four times its JSON size.
    fn held_bytes(&self, meta_json: usize) -> usize {
        std::mem::size_of::<Self>()
            + self.vecs.len() * 4
            + self.packed.len()
            + self.inv_norms.len() * 4
            + self.cepochs.len() * 8
            + self.ids.iter().map(|i| i.len() + 24).sum::<usize>()
            + self.meta.len() * 8
            + meta_json * 4
    }

    /// Drop spare capacity (a block grown by pushes can hold up to twice its size).
    pub(crate) fn shrink(&mut self) {
        self.ids.shrink_to_fit();
        self.vecs.shrink_to_fit();
        self.packed.shrink_to_fit();
        self.inv_norms.shrink_to_fit();
        self.meta.shrink_to_fit();
        self.cepochs.shrink_to_fit();
    }

    /// A copy with room for `rows` more vectors (a plain clone has no spare capacity, so
    /// filling it would reallocate as it grows).
    pub(crate) fn clone_with_room(&self, rows: usize, dim: usize) -> Self {
        let mut b = Self::with_capacity(self.len() + rows, dim, self.held_as);
        b.ids.extend_from_slice(&self.ids);
        b.vecs.extend_from_slice(&self.vecs);
        b.packed.extend_from_slice(&self.packed);
        b.inv_norms.extend_from_slice(&self.inv_norms);
        b.meta.extend_from_slice(&self.meta);
        b.cepochs.extend_from_slice(&self.cepochs);
        b.codes.extend_from_slice(&self.codes);
        b.epoch = self.epoch;
        b
    }

    pub(crate) fn push(&mut self, id: String, vec: &[f32], meta: Option<Arc<Value>>, cepoch: u64) {
        self.push_row(id, vec, distance::inv_norm(vec), meta, cepoch);
    }

    /// [`Block::push`] with the row's inverse norm already known.
    pub(crate) fn push_row(
        &mut self,
        id: String,
        vec: &[f32],
        inv_norm: f32,
        meta: Option<Arc<Value>>,
        cepoch: u64,
    ) {
        self.ids.push(id);
        if self.is_packed() {
            // The write path rounded `vec` to its stored value, so this encoding is exact.
            self.held_as.encode_into(vec, vec.len(), &mut self.packed);
        } else {
            self.vecs.extend_from_slice(vec);
        }
        self.inv_norms.push(inv_norm);
        self.meta.push(meta);
        self.cepochs.push(cepoch);
    }

    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|x| x == id)
    }

    pub(crate) fn swap_remove(&mut self, pos: usize, dim: usize) {
        let last = self.ids.len() - 1;
        self.ids.swap_remove(pos);
        self.inv_norms.swap_remove(pos);
        self.meta.swap_remove(pos);
        self.cepochs.swap_remove(pos);
        let (rows, w) = if self.is_packed() {
            (&mut self.packed, self.held_as.row_bytes(dim))
        } else {
            let (head, tail) = self.vecs.split_at_mut(last * dim);
            if pos != last {
                head[pos * dim..(pos + 1) * dim].copy_from_slice(&tail[..dim]);
            }
            self.vecs.truncate(last * dim);
            return;
        };
        if pos != last {
            rows.copy_within(last * w..(last + 1) * w, pos * w);
        }
        rows.truncate(last * w);
    }

    /// Row `pos` as floats: borrowed, or decoded from a packed row (exactly what a read of
    /// it returns).
    pub(crate) fn vector(&self, pos: usize, dim: usize) -> Cow<'_, [f32]> {
        if !self.is_packed() {
            return Cow::Borrowed(&self.vecs[pos * dim..(pos + 1) * dim]);
        }
        let w = self.held_as.row_bytes(dim);
        let mut out = vec![0f32; dim];
        if dim > 0 {
            // Packed rows were checked when the block was decoded or encoded them.
            let _ = self
                .held_as
                .decode_row(&self.packed[pos * w..(pos + 1) * w], &mut out);
        }
        Cow::Owned(out)
    }

    /// Every row as floats, row after row (a packed block is decoded: a transient copy).
    pub(crate) fn rows_f32(&self, dim: usize) -> Cow<'_, [f32]> {
        if !self.is_packed() {
            return Cow::Borrowed(&self.vecs);
        }
        let mut out = vec![0f32; self.len() * dim];
        if dim > 0 {
            let w = self.held_as.row_bytes(dim);
            for (row, o) in self.packed.chunks_exact(w).zip(out.chunks_exact_mut(dim)) {
                let _ = self.held_as.decode_row(row, o);
            }
        }
        Cow::Owned(out)
    }

    /// Scores of every row against `q` into `out` (row order), in the metric's units:
    /// exact for float and float16 rows; for `tq` rows, the same distances computed in the
    /// rotated domain, equal up to float rounding (callers rescore their winners with
    /// [`Block::vector`]).
    pub(crate) fn scan(&self, metric: Metric, q: &ScanQuery, dim: usize, out: &mut Vec<f32>) {
        if !self.is_packed() || dim == 0 {
            return distance::scan(metric, &q.plain, &self.vecs, &self.inv_norms, out);
        }
        let w = self.held_as.row_bytes(dim);
        ROTATED.with_borrow_mut(|z| {
            z.clear();
            z.resize(self.len() * dim, 0.0);
            for (row, o) in self.packed.chunks_exact(w).zip(z.chunks_exact_mut(dim)) {
                let _ = self.held_as.decode_row_for_scan(row, o);
            }
            distance::scan(metric, q.for_scan(self.held_as), z, &self.inv_norms, out);
            if z.capacity() > ROTATED_KEEP {
                *z = Vec::new();
            }
        });
    }

    /// Every row as [`Block::scan`] sees it: `tq` rows in the rotated domain of
    /// [`tq::rotate`], others as floats.
    pub(crate) fn scan_rows(&self, dim: usize) -> Cow<'_, [f32]> {
        if !self.is_packed() || dim == 0 {
            return Cow::Borrowed(&self.vecs);
        }
        let w = self.held_as.row_bytes(dim);
        let mut z = vec![0f32; self.len() * dim];
        for (row, o) in self.packed.chunks_exact(w).zip(z.chunks_exact_mut(dim)) {
            let _ = self.held_as.decode_row_for_scan(row, o);
        }
        Cow::Owned(z)
    }

    /// Append row `pos` of `src` (a training moving rows to their new lists): packed rows
    /// are copied as stored, with no decode and encode.
    pub(crate) fn push_from(&mut self, src: &Block, pos: usize, dim: usize) {
        if self.is_packed() && src.held_as == self.held_as {
            let w = self.held_as.row_bytes(dim);
            self.ids.push(src.ids[pos].clone());
            self.packed
                .extend_from_slice(&src.packed[pos * w..(pos + 1) * w]);
            self.inv_norms.push(src.inv_norms[pos]);
            self.meta.push(src.meta[pos].clone());
            self.cepochs.push(src.cepochs[pos]);
        } else {
            self.push_row(
                src.ids[pos].clone(),
                &src.vector(pos, dim),
                src.inv_norms[pos],
                src.meta[pos].clone(),
                src.cepochs[pos],
            );
        }
    }

    /// Whether the rows are held packed (`vecs` is empty).
    pub(crate) fn is_packed(&self) -> bool {
        self.held_as != Precision::F32
    }

    /// Plaintext encoding; see docs/FORMAT.md "Posting-list block". Also records the
    /// block's [`Block::weight`].
    pub(crate) fn encode(&mut self, dim: usize, precision: Precision) -> Vec<u8> {
        let mut w = Writer::with_capacity(10 + self.len() * (32 + dim * 4));
        w.u8(2)
            .u8(precision.code())
            .u32(dim as u32)
            .u32(self.len() as u32);
        let mut meta_json = 0;
        for ((id, meta), &ce) in self.ids.iter().zip(&self.meta).zip(&self.cepochs) {
            w.bytes(id.as_bytes());
            match meta {
                Some(m) => {
                    let j = serde_json::to_vec(m.as_ref()).unwrap_or_default();
                    meta_json += j.len();
                    w.bytes(&j)
                }
                None => w.bytes(b""),
            };
            w.u64(ce);
        }
        if self.is_packed() && precision == self.held_as {
            w.0.extend_from_slice(&self.packed);
        } else {
            precision.encode_into(&self.rows_f32(dim), dim, &mut w.0);
        }
        self.held = self.held_bytes(meta_json);
        w.0
    }

    /// [`Block::decode_as`] keeping the rows packed.
    pub(crate) fn decode(buf: &[u8]) -> Result<(Block, usize), EngineError> {
        Self::decode_as(buf, true)
    }

    /// Decode a block's plaintext. Float16 and `tq` rows stay packed as stored with
    /// `packed`, and are decoded to floats without it (more memory, faster scans: what
    /// the cache holds when the index fits it several times over).
    pub(crate) fn decode_as(buf: &[u8], packed: bool) -> Result<(Block, usize), EngineError> {
        let mut r = Reader::new(buf, "posting-list block");
        if buf.first() == Some(&segments::SPLIT_HEAD) {
            return Err(EngineError::Corrupt(
                "posting-list block head without its rows".into(),
            ));
        }
        let (mut b, precision, dim, n, meta_json) = Self::read_head(&mut r)?;
        if dim
            .checked_mul(n)
            .is_none_or(|_| n.saturating_mul(precision.row_bytes(dim)) != r.remaining())
        {
            return Err(EngineError::Corrupt(
                "posting-list block has the wrong length".into(),
            ));
        }
        if precision != Precision::F32 && packed {
            // Kept packed; every row is decoded once here, to check it and for its norm.
            b.packed = r.rest().to_vec();
            b.held_as = precision;
            let mut row = vec![0f32; dim];
            if dim > 0 {
                for raw in b.packed.chunks_exact(precision.row_bytes(dim)) {
                    precision
                        .decode_row(raw, &mut row)
                        .map_err(|e| EngineError::Corrupt(e.into()))?;
                    b.inv_norms.push(distance::inv_norm(&row));
                }
            }
        } else {
            b.vecs = precision.decode(r.rest(), n, dim)?;
            b.inv_norms = b
                .vecs
                .chunks_exact(dim.max(1))
                .map(distance::inv_norm)
                .collect();
        }
        if dim == 0 {
            b.inv_norms = vec![0.0; n];
        }
        b.held = b.held_bytes(meta_json);
        Ok((b, dim))
    }

    /// The head of a block alone (a split block's record, or a segmented record's first
    /// part): ids, metadata and contents epochs, no rows.
    pub(crate) fn decode_head(buf: &[u8]) -> Result<Block, EngineError> {
        let mut r = Reader::new(buf, "posting-list block head");
        let (b, ..) = Self::read_head(&mut r)?;
        if !r.is_empty() {
            return Err(EngineError::Corrupt(
                "posting-list block head has the wrong length".into(),
            ));
        }
        Ok(b)
    }

    /// `(precision, dim, rows)` of a block's plaintext or head, from its first 10 bytes.
    pub(crate) fn shape(buf: &[u8]) -> Result<(Precision, usize, usize), EngineError> {
        let mut r = Reader::new(buf, "posting-list block");
        let _version = r.u8()?;
        let precision = Precision::from_code(r.u8()?)
            .ok_or_else(|| EngineError::Corrupt("unknown storage precision in block".into()))?;
        Ok((precision, r.u32()? as usize, r.u32()? as usize))
    }

    /// Read a block's head: `(block without rows, precision, dim, rows, metadata bytes)`.
    fn read_head(
        r: &mut Reader<'_>,
    ) -> Result<(Block, Precision, usize, usize, usize), EngineError> {
        if !matches!(r.u8()?, 2 | segments::SPLIT_HEAD) {
            return Err(EngineError::Corrupt(
                "unknown posting-list block version".into(),
            ));
        }
        let precision = Precision::from_code(r.u8()?)
            .ok_or_else(|| EngineError::Corrupt("unknown storage precision in block".into()))?;
        let dim = r.u32()? as usize;
        let n = r.u32()? as usize;
        // Every row takes at least 16 bytes (two lengths and an epoch): a count the record
        // cannot hold is corrupt, and must not size an allocation.
        if n > r.remaining() / 16 {
            return Err(EngineError::Corrupt(
                "posting-list block count is too large".into(),
            ));
        }
        let mut b = Block::default();
        let mut meta_json = 0;
        for _ in 0..n {
            b.ids.push(r.str()?.to_owned());
            let m = r.bytes()?;
            meta_json += m.len();
            b.meta.push(if m.is_empty() {
                None
            } else {
                Some(Arc::new(serde_json::from_slice(m).map_err(|_| {
                    EngineError::Corrupt("bad metadata in posting-list block".into())
                })?))
            });
            b.cepochs.push(r.u64()?);
        }
        Ok((b, precision, dim, n, meta_json))
    }
}

/// Where a block stands in its list's directory: the epoch it was sealed at, its rows, and a
/// weak pointer to the block while the cache holds it. A lookup through the pointer touches
/// memory the scan needs anyway, where a cache lookup costs a few cache misses of its own:
/// on lists of ~4 blocks that was a quarter of a query's time. Queries still touch the cache
/// entry of one hit in [`TOUCH_EVERY`], so that eviction sees which blocks are hot.
#[derive(Debug)]
pub(crate) struct BlockMeta {
    pub(crate) epoch: u64,
    pub(crate) rows: u32,
    hot: parking_lot::Mutex<std::sync::Weak<Block>>,
}

/// One in this many hits through [`BlockMeta`]'s pointer also touches the cache entry.
pub(crate) const TOUCH_EVERY: u32 = 8;

impl BlockMeta {
    pub(crate) fn new(epoch: u64, rows: u32) -> Self {
        Self {
            epoch,
            rows,
            hot: parking_lot::Mutex::new(std::sync::Weak::new()),
        }
    }

    /// The block, if the cache (or a request) still holds it.
    pub(crate) fn hot(&self) -> Option<Arc<Block>> {
        self.hot.lock().upgrade()
    }

    pub(crate) fn set_hot(&self, blk: &Arc<Block>) {
        *self.hot.lock() = Arc::downgrade(blk);
    }
}

impl Clone for BlockMeta {
    fn clone(&self) -> Self {
        Self::new(self.epoch, self.rows)
    }
}

impl PartialEq for BlockMeta {
    fn eq(&self, o: &Self) -> bool {
        (self.epoch, self.rows) == (o.epoch, o.rows)
    }
}

/// The resident part of a posting list: its blocks' epochs and sizes (the blocks themselves
/// are read from the store through the block cache) and its quantiser.
#[derive(Clone, Default)]
pub(crate) struct ListDir {
    pub(crate) blocks: BTreeMap<u32, BlockMeta>,
    /// Set on indexes whose default probe count is large (see [`wants_quant`]).
    pub(crate) quant: Option<Arc<Quant>>,
    /// Set on generations with a 4-bit first pass (see [`super::coarse`]).
    pub(crate) coarse: Option<Arc<Quant>>,
}

impl ListDir {
    pub(crate) fn len(&self) -> usize {
        self.blocks.values().map(|b| b.rows as usize).sum()
    }
}

/// Rows as the quantiser sees them: unit length for angular metrics.
pub(crate) fn quant_rows(blk: &Block, dim: usize, angular: bool) -> Cow<'_, [f32]> {
    if angular {
        blk.rows_f32(dim)
            .chunks_exact(dim)
            .zip(&blk.inv_norms)
            .flat_map(|(r, inv)| r.iter().map(move |x| x * inv))
            .collect()
    } else {
        blk.rows_f32(dim)
    }
}

pub(crate) fn code_block(q: &Quant, blk: &mut Block, dim: usize, angular: bool) {
    blk.codes = q.encode(&quant_rows(blk, dim, angular));
    blk.codes.shrink_to_fit();
}

/// Whether an index's lists get an 8-bit first pass: when its calibrated default probes at
/// least a quarter of the lists, scans dominate query time and are memory bound, so a quarter
/// of the traffic pays for the codes' memory (one byte per dimension and vector). Indexes
/// with well-separated clusters probe few lists and never pay it.
/// `tq` indexes never do: their blocks are scanned packed, already a compact first pass.
pub(crate) fn wants_quant(
    trained: bool,
    default_probes: u32,
    n_lists: usize,
    precision: Precision,
) -> bool {
    !matches!(precision, Precision::Tq(_))
        && trained
        && n_lists > 1
        && default_probes as usize * 4 >= n_lists
}
