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

use super::search::{TopK, PARALLEL_SCAN_MIN};
use super::*;

/// Vector data (rows × stored bytes per row) from which a training gives its generation the
/// 4-bit first pass, by default (`--coarse-pass-min-mb`).
pub(crate) const COARSE_MIN_BYTES: u64 = 1 << 30;

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
}

/// One probed block in the first pass: its codes, and the block when this query has it.
struct Piece {
    list: usize,
    block: u32,
    codes: Option<Arc<Codes>>,
    blk: Option<Arc<Block>>,
}

impl Index {
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
        // The blocks of the candidates found by their codes alone: one batched read.
        let missing: Vec<(u32, u32)> = cands
            .iter()
            .map(|c| (c.list, c.block))
            .filter(|&(l, b)| blocks.get(l, b).is_none())
            .collect();
        if !missing.is_empty() {
            for ((l, b), blk) in self.fetch(d, &missing, keep)? {
                blocks.add(l, b, blk);
            }
        }
        self.rescore(&blocks, q, dim, &mut cands);
        cands.sort_unstable_by(|a, b| a.score.total_cmp(&b.score));
        cands.truncate(p.top_k);
        Ok(self.hits(&blocks, dim, cands, p))
    }
}
