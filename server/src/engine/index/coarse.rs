//! The 4-bit first pass of large generations.
//!
//! A generation whose vector data is at least [`COARSE_MIN_BYTES`] (and which has no 8-bit
//! pass, see [`super::block::wants_quant`]) is trained with a coarse quantiser per list: the
//! list's 8-bit quantiser with 17 of its steps to one code, 16 codes per dimension. Per
//! block, the 4-bit codes of its rows are made from the decrypted block and kept in the block
//! cache as an entry of their own ([`Codes`]: 64 bytes per 128-d row where the block holds
//! 512 for float32 alone). An unfiltered query scans the codes of every probed block, keeps
//! [`COARSE_RERANK`] times `top_k` candidates, and rescores them on their blocks; once the
//! codes of the lists it probes are cached, it decrypts only the blocks its candidates are
//! in, not every probed block.
//!
//! The pass is a property of the generation (the coarse record, docs/FORMAT.md), never of
//! what the cache holds: a query's answer is the same whatever is cached, and codes are made
//! the same way from a block whether it came from the cache or the store.

use super::search::{exact_score, Cand, TopK, PARALLEL_SCAN_MIN};
use super::*;

/// Vector data (rows × stored bytes per row) from which a training gives its generation the
/// 4-bit first pass, by default (`--coarse-pass-min-mb`).
pub(crate) const COARSE_MIN_BYTES: u64 = 1 << 30;

/// A store key and its sealed value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// Candidates kept per result by the 4-bit first pass, then rescored exactly.
const COARSE_RERANK: usize = 4;

/// Whether a generation of `rows` rows gets the 4-bit first pass.
pub(crate) fn wants_coarse(
    eight_bit: bool,
    rows: usize,
    dim: usize,
    precision: Precision,
    min_bytes: u64,
) -> bool {
    !eight_bit
        && matches!(precision, Precision::F32 | Precision::F16)
        && dim > 0
        && (rows as u64).saturating_mul(precision.row_bytes(dim) as u64) >= min_bytes
}

/// The 4-bit codes of one block's rows ([`Quant::encode_coarse`]), as the block cache holds
/// them beside (or without) the block.
pub struct Codes {
    pub(crate) nibbles: Vec<u8>,
}

impl Codes {
    /// The codes of `blk`'s rows under its list's coarse quantiser.
    pub(crate) fn of(q: &Quant, blk: &Block, dim: usize, angular: bool) -> Self {
        let mut nibbles = q.encode_coarse(&block::quant_rows(blk, dim, angular));
        nibbles.shrink_to_fit();
        Self { nibbles }
    }

    /// Memory held, as the block cache weighs it (the codes and the entry itself).
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Self>() + self.nibbles.len() + 64
    }

    /// The plaintext of a codes record (docs/FORMAT.md "Codes record"):
    /// `u8 version (1) || u32 rows || u32 dim || rows × ceil(dim / 2) bytes`.
    pub(crate) fn encode(&self, dim: usize) -> Vec<u8> {
        let rows = self.nibbles.len() / dim.div_ceil(2).max(1);
        let mut w = Writer::with_capacity(9 + self.nibbles.len());
        w.u8(1).u32(rows as u32).u32(dim as u32).raw(&self.nibbles);
        w.0
    }

    /// A codes record's plaintext, which must hold `rows` rows of `dim` codes.
    pub(crate) fn decode(buf: &[u8], rows: u32, dim: usize) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "codes record");
        let (version, n, d) = (r.u8()?, r.u32()?, r.u32()? as usize);
        let nibbles = r.rest();
        let len = (rows as usize).saturating_mul(dim.div_ceil(2));
        if version != 1 || n != rows || d != dim || nibbles.len() != len {
            return Err(EngineError::Corrupt(format!(
                "codes record of {n} rows x {d} (version {version}, {} bytes) where the \
                 block holds {rows} x {dim}",
                nibbles.len()
            )));
        }
        Ok(Self {
            nibbles: nibbles.to_vec(),
        })
    }
}

/// One probed block in the first pass: its codes, and the block when this query has it.
struct Piece {
    list: usize,
    block: u32,
    codes: Option<Arc<Codes>>,
    blk: Option<Arc<Block>>,
}

impl Index {
    /// The sealed codes record of block `l/b` as written at `epoch`, and the codes, when the
    /// generation stores codes and the list has a coarse quantiser (`blk` holds its rows).
    pub(super) fn codes_record(
        &self,
        d: &Data,
        l: u32,
        b: u32,
        blk: &Block,
        epoch: u64,
    ) -> Option<(KeyValue, Arc<Codes>)> {
        if !d.codes_stored {
            return None;
        }
        let q = d.lists.get(l as usize)?.coarse.as_ref()?;
        let dim = d.dimension as usize;
        let codes = Codes::of(q, blk, dim, self.config.metric.is_angular());
        Some((
            self.seal_codes(d.gen, l, b, &codes, dim, epoch),
            Arc::new(codes),
        ))
    }

    /// `(key, sealed value)` of a codes record (AAD: the key and the block's epoch).
    pub(super) fn seal_codes(
        &self,
        gen: u32,
        l: u32,
        b: u32,
        codes: &Codes,
        dim: usize,
        epoch: u64,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = fmt::codes_key(&self.id, gen, l, b);
        let sealed = self
            .keys
            .seal(&fmt::aad_at(&key, epoch), &codes.encode(dim));
        (key, sealed)
    }

    /// The codes of blocks `need` (`(list, block)`, each in the directory) from their codes
    /// records: one batched read, opened at the blocks' epochs, checked against their row
    /// counts, and cached. No block is read.
    fn read_codes(&self, d: &Data, need: &[(usize, u32)]) -> Result<Vec<Arc<Codes>>, EngineError> {
        let dim = d.dimension as usize;
        let metas: Vec<&BlockMeta> = need
            .iter()
            .map(|&(li, b)| self.manifest_entry(d, li as u32, b))
            .collect::<Result<_, _>>()?;
        let keys: Vec<Vec<u8>> = need
            .iter()
            .map(|&(li, b)| fmt::codes_key(&self.id, d.gen, li as u32, b))
            .collect();
        let values = self.get_many_par(&keys)?;
        self.cache.count(0, need.len());
        need.par_iter()
            .zip(metas.par_iter())
            .zip(keys.par_iter().zip(values.into_par_iter()))
            .map(|((&(li, b), m), (k, v))| {
                let bad = |what: String| EngineError::Integrity {
                    index: self.name.clone(),
                    what,
                };
                let v = v.ok_or_else(|| bad(format!("the codes of block {li}/{b} are missing")))?;
                let plain = self.keys.open(&fmt::aad_at(k, m.epoch), &v).map_err(|_| {
                    bad(format!(
                        "the codes of block {li}/{b} failed authentication at epoch {} \
                         (altered, swapped or rolled back)",
                        m.epoch
                    ))
                })?;
                let codes = Codes::decode(&plain, m.rows, dim)
                    .map_err(|e| bad(format!("block {li}/{b}: {e}")))?;
                let codes = Arc::new(codes);
                self.cache
                    .insert_codes(self.key_at(d.gen, li, b, m.epoch), codes.clone());
                Ok(codes)
            })
            .collect()
    }

    /// Test support: check that every block of a generation that stores codes has a codes
    /// record holding exactly the codes made from the block; returns how many were checked.
    #[cfg(test)]
    pub(crate) fn check_codes_records(&self) -> Result<usize, EngineError> {
        let d = self.data.read();
        let dim = d.dimension as usize;
        let angular = self.config.metric.is_angular();
        let refs: Vec<(usize, u32)> = Self::list_refs(&d, &(0..d.lists.len()).collect::<Vec<_>>())
            .into_iter()
            .filter(|&(li, _)| d.lists[li].coarse.is_some())
            .collect();
        if !d.codes_stored {
            return Ok(0);
        }
        let stored = self.read_codes(&d, &refs)?;
        let blocks = self.fetch_refs(&d, &refs, false)?;
        for ((&(li, b), c), blk) in refs.iter().zip(&stored).zip(&blocks) {
            let q = d.lists[li].coarse.as_ref().expect("filtered");
            let made = Codes::of(q, blk, dim, angular);
            if made.nibbles != c.nibbles {
                return Err(EngineError::Corrupt(format!(
                    "codes of {li}/{b} differ: stored {} made {} rows {}",
                    c.nibbles.len(),
                    made.nibbles.len(),
                    blk.len()
                )));
            }
        }
        Ok(refs.len())
    }

    /// Whether an unfiltered query probing `probed` takes the 4-bit first pass.
    pub(super) fn coarse_pass(d: &Data, probed: &[usize]) -> bool {
        probed.iter().any(|&li| d.lists[li].coarse.is_some())
    }

    /// An unfiltered query on a generation with the 4-bit first pass (`q` as the metric
    /// wants it: unit length for angular metrics).
    pub(super) fn search_one_coarse(
        &self,
        d: &Data,
        q: &[f32],
        probed: &[usize],
        p: &SearchParams,
    ) -> Result<Vec<Hit>, EngineError> {
        let metric = self.config.metric;
        let angular = metric.is_angular();
        let dim = d.dimension as usize;
        let k = p.top_k.saturating_mul(COARSE_RERANK).max(p.top_k + 32);
        let sq = block::ScanQuery::new(q, self.config.precision);
        // Per probed list with a coarse quantiser: the query in its code units, and the
        // size of one code unit squared in the metric's units.
        let preps: HashMap<usize, (Vec<i16>, f32)> = probed
            .iter()
            .filter_map(|&li| {
                let c = d.lists[li].coarse.as_ref()?;
                Some((li, (c.prepare(q), c.unit(angular))))
            })
            .collect();
        // Blocks read from the store enter the cache only when the whole generation could
        // stay there; otherwise they would only push out the codes, which every query
        // probing their lists needs (a candidate's block is needed by few).
        let keep = Self::decoded_bytes(d).saturating_mul(3) / 2 <= self.cache.capacity();
        let refs = Self::list_refs(d, probed);
        let volume: usize = probed.iter().map(|&li| d.lists[li].len()).sum();
        let workers = 2 * rayon::current_num_threads();
        let mut top = TopK::new(k);
        let mut blocks = ListBlocks::default();
        for chunk in refs.chunks(READ_CHUNK_BLOCKS) {
            // Every probed block's codes: cached, or else made from the block (from the
            // cache or the store) and cached.
            let mut pieces: Vec<Piece> = Vec::with_capacity(chunk.len());
            let mut need: Vec<(usize, u32)> = Vec::new();
            for &(li, b) in chunk {
                let cached = match (preps.contains_key(&li), d.lists[li].blocks.get(&b)) {
                    (true, Some(m)) => self.cache.get_codes(&self.key_at(d.gen, li, b, m.epoch)),
                    _ => None,
                };
                match cached {
                    Some(c) => pieces.push(Piece {
                        list: li,
                        block: b,
                        codes: Some(c),
                        blk: None,
                    }),
                    None => need.push((li, b)),
                }
            }
            self.cache.count(pieces.len(), 0);
            // Generations that store codes: read those, not the blocks.
            type Refs = Vec<(usize, u32)>;
            let (stored, need): (Refs, Refs) = need
                .into_iter()
                .partition(|(li, _)| d.codes_stored && preps.contains_key(li));
            if !stored.is_empty() {
                let codes = self.read_codes(d, &stored)?;
                pieces.extend(stored.iter().zip(codes).map(|(&(li, b), c)| Piece {
                    list: li,
                    block: b,
                    codes: Some(c),
                    blk: None,
                }));
            }
            if !need.is_empty() {
                let read = self.fetch_refs(d, &need, keep)?;
                let made: Vec<Piece> = need
                    .par_iter()
                    .zip(read.into_par_iter())
                    .map(|(&(li, b), blk)| {
                        let codes = d.lists[li].coarse.as_ref().map(|c| {
                            let codes = Arc::new(Codes::of(c, &blk, dim, angular));
                            if let Some(m) = d.lists[li].blocks.get(&b) {
                                self.cache.insert_codes(
                                    self.key_at(d.gen, li, b, m.epoch),
                                    codes.clone(),
                                );
                            }
                            codes
                        });
                        Piece {
                            list: li,
                            block: b,
                            codes,
                            blk: Some(blk),
                        }
                    })
                    .collect();
                pieces.extend(made);
            }
            let scan = |t: &mut TopK, pc: &Piece| match (&pc.codes, &pc.blk) {
                (Some(codes), _) => {
                    if let Some((qc, unit)) = preps.get(&pc.list) {
                        t.scan_codes(pc.list, pc.block, codes, qc, *unit, dim);
                    }
                }
                // A list without a coarse quantiser (empty when trained): scanned exactly.
                (None, Some(blk)) => t.scan_list(
                    metric,
                    &sq,
                    pc.list,
                    std::slice::from_ref(&(pc.block, blk.clone())),
                    None,
                    dim,
                ),
                (None, None) => {}
            };
            if volume >= PARALLEL_SCAN_MIN && pieces.len() > 1 {
                let part = pieces
                    .par_chunks(pieces.len().div_ceil(workers).max(1))
                    .map(|ps| {
                        let mut t = TopK::new(k);
                        for pc in ps {
                            scan(&mut t, pc);
                        }
                        t
                    })
                    .reduce(|| TopK::new(k), TopK::merge);
                top = std::mem::replace(&mut top, TopK::new(0)).merge(part);
            } else {
                for pc in &pieces {
                    scan(&mut top, pc);
                }
            }
            // Keep the blocks in hand that candidates point into (list and block order).
            pieces.sort_unstable_by_key(|pc| (pc.list, pc.block));
            let mut runs: Vec<(usize, ListRead)> = Vec::new();
            for pc in pieces {
                let Some(blk) = pc.blk else { continue };
                match runs.last_mut() {
                    Some((l, run)) if *l == pc.list => run.push((pc.block, blk)),
                    _ => runs.push((pc.list, vec![(pc.block, blk)])),
                }
            }
            blocks.keep_referenced(&top, runs);
        }
        let mut cands = top.into_cands();
        // The blocks of the candidates found by their codes alone. Unless the generation
        // fits the cache (then whole blocks are read, and kept), a split generation gives up
        // only the candidates' row records: one batched read.
        let mut missing: Vec<(u32, u32)> = cands
            .iter()
            .map(|c| (c.list, c.block))
            .filter(|&(l, b)| blocks.get(l, b).is_none())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let mut rows: RowsRead = HashMap::default();
        if !missing.is_empty() && !keep && d.split_rows {
            rows = self.read_rows(d, &cands, &missing)?;
            missing.clear();
        }
        if !missing.is_empty() {
            for ((l, b), blk) in self.fetch(d, &missing, keep)? {
                blocks.add(l, b, blk);
            }
        }
        // A candidate's row comes from codes made for the block's manifest row count; a
        // block that holds fewer rows disagrees with its manifest entry.
        let short = |c: &Cand| match blocks.get(c.list, c.block) {
            Some(blk) => c.pos() >= blk.len(),
            None => !rows.contains_key(&(c.list, c.block, c.pos() as u32)),
        };
        if let Some(c) = cands.iter().find(|c| short(c)) {
            return Err(self.short_block(c.list, c.block));
        }
        self.rescore(&blocks, q, dim, &mut cands);
        for c in cands.iter_mut() {
            if let Some((v, inv)) = rows.get(&(c.list, c.block, c.pos() as u32)) {
                c.score = exact_score(angular, q, v, *inv);
            }
        }
        cands.sort_unstable_by(|a, b| a.score.total_cmp(&b.score));
        cands.truncate(p.top_k);
        if rows.is_empty() {
            return Ok(self.hits(&blocks, dim, cands, p));
        }
        // Hits from row records: their blocks' heads (ids, metadata), read now.
        let mut need: Vec<(u32, u32)> = cands
            .iter()
            .map(|c| (c.list, c.block))
            .filter(|&(l, b)| blocks.get(l, b).is_none())
            .collect();
        need.sort_unstable();
        need.dedup();
        let heads = self.read_heads(d, &need)?;
        let mut out = Vec::with_capacity(cands.len());
        for c in cands {
            let pos = c.pos();
            if let Some(blk) = blocks.get(c.list, c.block) {
                out.push(self.hit_of(blk, pos, c.score, p, || blk.vector(pos, dim).into_owned()));
                continue;
            }
            let (Some(head), Some((v, _))) = (
                heads.get(&(c.list, c.block)),
                rows.get(&(c.list, c.block, pos as u32)),
            ) else {
                continue;
            };
            out.push(self.hit_of(head, pos, c.score, p, || v.clone()));
        }
        Ok(out)
    }

    fn short_block(&self, l: u32, b: u32) -> EngineError {
        EngineError::Integrity {
            index: self.name.clone(),
            what: format!("block {l}/{b} holds fewer rows than its manifest entry"),
        }
    }

    /// The rows of `cands` in the split blocks `missing` (sorted): the row records they
    /// are in, from the cache or else read in one batch and opened at their blocks' epochs
    /// (and then cached: a row record is 16 KiB, a block 56 KiB).
    fn read_rows(
        &self,
        d: &Data,
        cands: &[Cand],
        missing: &[(u32, u32)],
    ) -> Result<RowsRead, EngineError> {
        let dim = d.dimension as usize;
        let precision = self.config.precision;
        let rb = precision.row_bytes(dim);
        let per = segments::segment_rows(rb) as u32;
        // Per row record: the candidates' rows in it.
        let mut want: BTreeMap<(u32, u32, u32), Vec<u32>> = BTreeMap::new();
        for c in cands {
            let (l, b) = (c.list, c.block);
            if missing.binary_search(&(l, b)).is_ok() {
                let pos = c.pos() as u32;
                want.entry((l, b, pos / per)).or_default().push(pos);
            }
        }
        let segs: Vec<((u32, u32, u32), Vec<u32>)> = want.into_iter().collect();
        let bad = |l: u32, b: u32, what: String| EngineError::Integrity {
            index: self.name.clone(),
            what: format!("block {l}/{b}: {what}"),
        };
        // Each record's block identity (its manifest epoch) and row count.
        let at: Vec<(BlockKey, usize)> = segs
            .iter()
            .map(|&((l, b, _), ref pos)| {
                let m = self.manifest_entry(d, l, b)?;
                let rows = m.rows as usize;
                if pos.iter().any(|&p| p as usize >= rows) {
                    return Err(self.short_block(l, b));
                }
                Ok((self.key_at(d.gen, l as usize, b, m.epoch), rows))
            })
            .collect::<Result<_, EngineError>>()?;
        let mut plains: Vec<Option<Arc<Vec<u8>>>> = segs
            .iter()
            .zip(&at)
            .map(|(&((_, _, s), _), (k, _))| self.cache.get_rows(k, s))
            .collect();
        let miss: Vec<usize> = (0..segs.len()).filter(|&i| plains[i].is_none()).collect();
        let keys: Vec<Vec<u8>> = miss
            .iter()
            .map(|&i| {
                let (l, b, s) = segs[i].0;
                fmt::rows_key(&self.id, d.gen, l, b, s)
            })
            .collect();
        let values = self.get_many_par(&keys)?;
        self.cache.count(segs.len() - miss.len(), miss.len());
        let opened: Vec<Arc<Vec<u8>>> = miss
            .par_iter()
            .zip(keys.par_iter().zip(values.into_par_iter()))
            .map(|(&i, (k, v))| {
                let (l, b, s) = segs[i].0;
                let (bk, rows) = &at[i];
                let v = v.ok_or_else(|| bad(l, b, format!("row record {s} is missing")))?;
                segments::open_rows(&self.keys, k, bk.epoch, &v, (s as usize, *rows, rb))
                    .map(Arc::new)
                    .map_err(|e| bad(l, b, e))
            })
            .collect::<Result<_, EngineError>>()?;
        for (&i, plain) in miss.iter().zip(opened) {
            self.cache.insert_rows(at[i].0, segs[i].0 .2, plain.clone());
            plains[i] = Some(plain);
        }
        let got: Vec<Vec<RowRead>> = segs
            .par_iter()
            .zip(plains.into_par_iter())
            .map(|(((l, b, s), pos), plain)| {
                let (l, b, s) = (*l, *b, *s);
                let plain = plain.unwrap_or_default();
                pos.iter()
                    .map(|&p| {
                        let at = (p - s * per) as usize * rb;
                        let row = plain
                            .get(at..at + rb)
                            .ok_or_else(|| bad(l, b, format!("row record {s} is short")))?;
                        let v = precision
                            .decode(row, 1, dim)
                            .map_err(|e| bad(l, b, e.to_string()))?;
                        let inv = distance::inv_norm(&v);
                        Ok(((l, b, p), (v, inv)))
                    })
                    .collect()
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(got.into_iter().flatten().collect())
    }

    /// The heads of the split blocks `at` (ids, metadata, contents epochs), from the cache
    /// or else read in one batch, each checked against its manifest entry (and then cached).
    fn read_heads(
        &self,
        d: &Data,
        at: &[(u32, u32)],
    ) -> Result<HashMap<(u32, u32), Arc<Block>>, EngineError> {
        // Each head's manifest entry: its epoch (the cache key, the AAD) and row count.
        let metas: Vec<&BlockMeta> = at
            .iter()
            .map(|&(l, b)| self.manifest_entry(d, l, b))
            .collect::<Result<_, EngineError>>()?;
        let bkeys: Vec<BlockKey> = at
            .iter()
            .zip(&metas)
            .map(|(&(l, b), m)| self.key_at(d.gen, l as usize, b, m.epoch))
            .collect();
        let mut out: HashMap<(u32, u32), Arc<Block>> = HashMap::default();
        let mut miss: Vec<usize> = Vec::new();
        for (i, k) in bkeys.iter().enumerate() {
            match self.cache.get_head(k) {
                Some(h) => {
                    out.insert(at[i], h);
                }
                None => miss.push(i),
            }
        }
        let keys: Vec<Vec<u8>> = miss
            .iter()
            .map(|&i| fmt::block_key(&self.id, d.gen, at[i].0, at[i].1))
            .collect();
        let values = self.get_many_par(&keys)?;
        let read: Vec<(usize, Arc<Block>)> = miss
            .par_iter()
            .zip(keys.par_iter().zip(values.into_par_iter()))
            .map(|(&i, (k, v))| {
                let (l, b) = at[i];
                let bad = |what: String| EngineError::Integrity {
                    index: self.name.clone(),
                    what: format!("block {l}/{b} {what}"),
                };
                let m = metas[i];
                let v = v.ok_or_else(|| bad("is missing".into()))?;
                let plain = self.keys.open(&fmt::aad_at(k, m.epoch), &v).map_err(|_| {
                    bad(format!(
                        "failed authentication at epoch {} (altered, swapped or rolled back)",
                        m.epoch
                    ))
                })?;
                if !segments::is_split(&plain) {
                    return Err(bad("is not a split block's head".into()));
                }
                let head = Block::decode_head(&plain).map_err(|e| bad(e.to_string()))?;
                if head.len() != m.rows as usize {
                    return Err(self.short_block(l, b));
                }
                Ok((i, Arc::new(head)))
            })
            .collect::<Result<_, EngineError>>()?;
        for (i, head) in read {
            self.cache.insert_head(bkeys[i], head.clone());
            out.insert(at[i], head);
        }
        Ok(out)
    }
}

/// A row read for a rescoring: `(list, block, position)` and `(vector, inverse norm)`.
type RowRead = ((u32, u32, u32), (Vec<f32>, f32));

/// Rows read for a rescoring, by `(list, block, position)`.
type RowsRead = HashMap<(u32, u32, u32), (Vec<f32>, f32)>;
