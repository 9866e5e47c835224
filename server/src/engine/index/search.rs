//! Search: probe order, exact and 8-bit scans of posting lists, batched queries answered
//! list by list with matrix products, and the bounded top-k heap.

use super::*;

impl Index {
    /// Search: one result list per query, nearest first.
    pub fn search(
        &self,
        queries: &[Vec<f32>],
        p: &SearchParams,
    ) -> Result<Vec<Vec<Hit>>, EngineError> {
        // A selective filter on indexed fields: score its few matches exactly instead of
        // probing lists until enough of them turn up.
        let candidates = match &p.filter {
            Some(f) => self
                .filter_candidates(f)?
                .filter(|c| c.len() <= CANDIDATE_SEARCH_MAX),
            None => None,
        };
        let mut results = self.consistent(|d| {
            let dim = d.dimension as usize;
            for q in queries {
                if dim != 0 && q.len() != dim {
                    return Err(EngineError::Invalid(format!(
                        "query vector has {} dimensions but index '{}' has {}",
                        q.len(),
                        self.name,
                        dim
                    )));
                }
                if q.iter().any(|x| !x.is_finite()) {
                    return Err(EngineError::Invalid(
                        "query vector has a NaN or infinite component".into(),
                    ));
                }
            }
            if d.count() == 0 {
                return Ok(queries.iter().map(|_| Vec::new()).collect());
            }
            if let Some(ids) = &candidates {
                return self.search_candidates(d, queries, p, ids);
            }
            if queries.len() == 1 {
                // No fork/join for one query: rayon's wake-up costs more than a small probe.
                Ok(vec![self.search_one(d, &queries[0], p)?])
            } else if queries.len() >= BATCH_GEMM_MIN
                && p.filter.is_none()
                && !d.lists.iter().any(|pl| pl.coarse.is_some())
            {
                // (A generation with the 4-bit first pass answers a batch query by query,
                // so that a batch reads the blocks of its candidates only, as single
                // queries do, and ranks as they do.)
                self.search_batch(d, queries, p)
            } else {
                queries
                    .par_iter()
                    .map(|q| self.search_one(d, q, p))
                    .collect::<Result<Vec<_>, _>>()
            }
        })?;
        if p.include.contents {
            for hits in &mut results {
                let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
                let epochs: Vec<u64> = hits.iter().map(|h| h.cepoch).collect();
                let contents = self.contents_of(&ids, &epochs)?;
                for (h, c) in hits.iter_mut().zip(contents) {
                    h.contents = Some(c);
                }
            }
        }
        Ok(results)
    }

    /// The probe budget and the lists in the order to probe them. Without a filter only the
    /// first `probes` lists are returned (and put in order); a filter may need to go further.
    fn probe_order(&self, d: &Data, q: &[f32], p: &SearchParams) -> (usize, Vec<usize>) {
        let ivf = d.trained && d.lists.len() > 1;
        let mut probes = if ivf {
            p.n_probes.filter(|&n| n > 0).unwrap_or_else(|| {
                if d.default_probes > 0 {
                    d.default_probes as usize
                } else {
                    auto_n_probes(d.lists.len())
                }
            })
        } else {
            d.lists.len()
        };
        if p.greedy {
            probes = probes.saturating_mul(2);
        }
        let probes = probes.min(d.lists.len());
        // All centroid distances in one kernel call, then only the first `probes` are sorted.
        let order: Vec<usize> = if ivf {
            let mut dists = Vec::with_capacity(d.lists.len());
            distance::scan(Metric::SquaredEuclidean, q, &d.centroids, &[], &mut dists);
            let mut cd: Vec<(f32, usize)> = dists.into_iter().zip(0..).collect();
            let by_dist = |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0);
            if p.filter.is_none() && probes < cd.len() {
                cd.select_nth_unstable_by(probes, by_dist);
                cd.truncate(probes);
            }
            cd.sort_unstable_by(by_dist);
            cd.into_iter().map(|(_, i)| i).collect()
        } else {
            (0..d.lists.len()).collect()
        };
        (probes, order)
    }

    fn query_view<'q>(&self, q: &'q [f32], buf: &'q mut Vec<f32>) -> &'q [f32] {
        if self.config.metric.is_angular() {
            *buf = distance::normalized(q);
            buf
        } else {
            q
        }
    }

    fn search_one(&self, d: &Data, q: &[f32], p: &SearchParams) -> Result<Vec<Hit>, EngineError> {
        let metric = self.config.metric;
        let dim = d.dimension as usize;
        let mut qn = Vec::new();
        let q = self.query_view(q, &mut qn);
        let (probes, order) = self.probe_order(d, q, p);
        let probed = &order[..probes.min(order.len())];
        if p.filter.is_none() && Self::coarse_pass(d, probed) {
            return self.search_one_coarse(d, q, probed, p);
        }
        let sq = block::ScanQuery::new(q, self.config.precision);
        // Quantised lists: a first pass over the 8-bit codes keeps RERANK times more
        // candidates, which are then rescored exactly. So does a scan of packed (`tq`)
        // blocks, whose rotated-domain scores are exact only up to float rounding.
        let quant = p.filter.is_none() && probed.iter().any(|&li| d.lists[li].quant.is_some());
        let packed = matches!(self.config.precision, Precision::Tq(_));
        let rescored = quant || packed;
        let k = if rescored {
            p.top_k.saturating_mul(RERANK).max(p.top_k + 32)
        } else {
            p.top_k
        };
        let scan = |top: &mut TopK, li: usize, bl: &[(u32, Arc<Block>)]| {
            if quant {
                top.scan_list_quant(metric, &sq, li, d.lists[li].quant.as_deref(), bl, dim);
            } else {
                top.scan_list(metric, &sq, li, bl, None, dim);
            }
        };
        // Blocks the heap's candidates point into, for rescoring and the hits.
        let mut blocks = ListBlocks::default();
        let mut top = TopK::new(k);
        if p.filter.is_none() {
            let refs = Self::list_refs(d, probed);
            let one_chunk = refs.len() <= READ_CHUNK_BLOCKS;
            let volume: usize = probed.iter().map(|&li| d.lists[li].len()).sum();
            let workers = 2 * rayon::current_num_threads();
            self.for_chunks(d, &refs, true, |runs| {
                if volume >= PARALLEL_SCAN_MIN {
                    // A large scan: split the chunk across cores, merge the partial top-k.
                    // Two pieces per worker: each fills its own heap from empty, so more and
                    // smaller pieces would cost heap work without balancing load better.
                    let blocks_in: usize = runs.iter().map(|(_, r)| r.len()).sum();
                    let per = blocks_in.div_ceil(workers).max(1);
                    let pieces: Vec<(usize, &[BlockAt])> = runs
                        .iter()
                        .flat_map(|(li, r)| r.chunks(per).map(move |c| (*li, c)))
                        .collect();
                    let part = pieces
                        .par_chunks(pieces.len().div_ceil(workers).max(1))
                        .map(|ps| {
                            let mut t = TopK::new(k);
                            for (li, bl) in ps {
                                scan(&mut t, *li, bl);
                            }
                            t
                        })
                        .reduce(|| TopK::new(k), TopK::merge);
                    top = std::mem::replace(&mut top, TopK::new(0)).merge(part);
                } else {
                    for (li, bl) in &runs {
                        scan(&mut top, *li, bl);
                    }
                }
                if one_chunk {
                    for (li, bl) in runs {
                        blocks.insert(li as u32, bl);
                    }
                } else {
                    blocks.keep_referenced(&top, runs);
                }
                Ok(())
            })?;
        } else {
            // A filtered query keeps probing, a list at a time, until it has k matches.
            for (n, &li) in order.iter().enumerate() {
                if n >= probes && top.heap.len() >= p.top_k {
                    break;
                }
                let refs = Self::list_refs(d, &[li]);
                self.for_chunks(d, &refs, true, |runs| {
                    for (li, bl) in &runs {
                        top.scan_list(metric, &sq, *li, bl, p.filter.as_ref(), dim);
                    }
                    blocks.keep_referenced(&top, runs);
                    Ok(())
                })?;
            }
        }
        let heap = top.heap;
        let mut cands = heap.into_vec();
        if rescored {
            self.rescore(&blocks, q, dim, &mut cands);
            cands.sort_unstable_by(|a, b| a.score.total_cmp(&b.score));
            cands.truncate(p.top_k);
        }
        Ok(self.hits(&blocks, dim, cands, p))
    }

    /// Unfiltered batches: each posting list is read once for all the queries that probe it,
    /// and their distances come from one matrix product per block
    /// (`|q-x|^2 = |q|^2 + |x|^2 - 2 q.x`, or `1 - q.x/|x|` for cosine) instead of one scan per
    /// query. The k winners of each query are then rescored with the exact kernel, so the
    /// distances reported are the same as for a single query. Lists are read one at a time per
    /// worker, so a batch never holds more than a few lists beyond what the cache keeps.
    fn search_batch(
        &self,
        d: &Data,
        queries: &[Vec<f32>],
        p: &SearchParams,
    ) -> Result<Vec<Vec<Hit>>, EngineError> {
        let metric = self.config.metric;
        let dim = d.dimension as usize;
        let nq = queries.len();
        let k = p.top_k;
        let mut qm: Vec<f32> = Vec::with_capacity(nq * dim);
        // The queries as the blocks' products see them: rotated for packed (`tq`) blocks,
        // whose rows are multiplied in the rotated domain.
        let tq_bits = match self.config.precision {
            Precision::Tq(bits) => Some(bits),
            _ => None,
        };
        let mut qr: Vec<f32> = Vec::with_capacity(if tq_bits.is_some() { nq * dim } else { 0 });
        let mut by_list: Vec<Vec<u32>> = vec![Vec::new(); d.lists.len()];
        for (qi, q) in queries.iter().enumerate() {
            let mut qn = Vec::new();
            let q = self.query_view(q, &mut qn);
            qm.extend_from_slice(q);
            if let Some(bits) = tq_bits {
                qr.extend_from_slice(&crate::engine::tq::rotate(q, bits));
            }
            let (probes, order) = self.probe_order(d, q, p);
            for &li in &order[..probes.min(order.len())] {
                by_list[li].push(qi as u32);
            }
        }
        let norms = |m: &[f32]| -> Vec<f32> {
            m.chunks_exact(dim.max(1))
                .map(|q| distance::dot(q, q))
                .collect()
        };
        let (qm_norms, qr_norms) = (norms(&qm), norms(&qr));
        let work: Vec<(usize, &Vec<u32>)> = by_list
            .iter()
            .enumerate()
            .filter(|(li, qs)| !qs.is_empty() && d.lists[*li].len() > 0)
            .collect();
        let fresh = || (0..nq).map(|_| TopK::new(k)).collect::<Vec<_>>();
        let tops = work
            .par_iter()
            .try_fold(fresh, |mut tops, &(li, qs)| {
                let pick = |m: &[f32]| {
                    let mut sub = Vec::with_capacity(qs.len() * dim);
                    for &qi in qs {
                        sub.extend_from_slice(&m[qi as usize * dim..][..dim]);
                    }
                    ndarray::Array2::from_shape_vec((qs.len(), dim), sub).ok()
                };
                let Some(sub_plain) = pick(&qm) else {
                    return Ok(tops);
                };
                // Packed `tq` blocks multiply in the rotated domain (blocks read while the
                // index fitted the cache hold floats, and take the plain queries).
                let sub_rot = if tq_bits.is_some() { pick(&qr) } else { None };
                let refs = Self::list_refs(d, &[li]);
                self.for_chunks(d, &refs, true, |runs| {
                    for (bno, blk) in runs.iter().flat_map(|(_, r)| r.iter()) {
                        let n = blk.len();
                        let rows = blk.scan_rows(dim);
                        let Ok(x) = ndarray::ArrayView2::from_shape((n, dim), &rows[..n * dim])
                        else {
                            continue;
                        };
                        let rotated = matches!(blk.held_as, Precision::Tq(_));
                        let (sub, q_norms) = match &sub_rot {
                            Some(r) if rotated => (r, &qr_norms),
                            _ => (&sub_plain, &qm_norms),
                        };
                        let dots = sub.dot(&x.t());
                        let x_norms: Vec<f32> = if metric.is_angular() {
                            Vec::new()
                        } else {
                            rows.chunks_exact(dim)
                                .map(|r| distance::dot(r, r))
                                .collect()
                        };
                        for (row, &qi) in dots.rows().into_iter().zip(qs) {
                            let top = &mut tops[qi as usize];
                            let qn = q_norms[qi as usize];
                            for (pos, &dt) in row.iter().enumerate() {
                                let s = if metric.is_angular() {
                                    1.0 - dt * blk.inv_norms[pos]
                                } else {
                                    (qn + x_norms[pos] - 2.0 * dt).max(0.0)
                                };
                                if !top.beats_worst(s) {
                                    continue;
                                }
                                top.push(Cand {
                                    score: s,
                                    list: li as u32,
                                    block: *bno,
                                    pos: pos as u32,
                                });
                            }
                        }
                    }
                    Ok(())
                })?;
                Ok::<_, EngineError>(tops)
            })
            .try_reduce(
                || (0..nq).map(|_| TopK::new(k)).collect::<Vec<_>>(),
                |a, b| Ok(a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect()),
            )?;
        let cands: Vec<Vec<Cand>> = tops.into_iter().map(|t| t.heap.into_vec()).collect();
        let refs: Vec<(u32, u32)> = cands.iter().flatten().map(|c| (c.list, c.block)).collect();
        let fetched = self.fetch(d, &refs, true)?;
        let mut blocks = ListBlocks::default();
        let mut by_list: HashMap<u32, Vec<(u32, Arc<Block>)>> = HashMap::default();
        for ((l, b), blk) in fetched {
            by_list.entry(l).or_default().push((b, blk));
        }
        for (l, mut v) in by_list {
            v.sort_unstable_by_key(|x| x.0);
            blocks.insert(l, v);
        }
        Ok(cands
            .into_par_iter()
            .enumerate()
            .map(|(qi, mut cands)| {
                self.rescore(&blocks, &qm[qi * dim..][..dim], dim, &mut cands);
                self.hits(&blocks, dim, cands, p)
            })
            .collect())
    }

    /// Exact search over the items the value index named: their rows are read (one
    /// batched read), those the filter accepts scored with the exact kernels.
    fn search_candidates(
        &self,
        d: &Data,
        queries: &[Vec<f32>],
        p: &SearchParams,
        ids: &[String],
    ) -> Result<Vec<Vec<Hit>>, EngineError> {
        let dim = d.dimension as usize;
        let metric = self.config.metric;
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let rows: Vec<(Arc<Block>, usize)> = self
            .rows_of(d, &refs, true)?
            .into_iter()
            .flatten()
            .filter(|(blk, pos)| {
                p.filter
                    .as_ref()
                    .is_none_or(|f| f.matches(blk.meta[*pos].as_deref()))
            })
            .collect();
        Ok(queries
            .iter()
            .map(|q| {
                let mut qn = Vec::new();
                let q = self.query_view(q, &mut qn);
                let mut scored: Vec<(f32, usize)> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, (blk, pos))| {
                        let row = blk.vector(*pos, dim);
                        let s = if metric.is_angular() {
                            1.0 - distance::dot(q, &row) * blk.inv_norms[*pos]
                        } else {
                            distance::l2sq(q, &row)
                        };
                        (s, i)
                    })
                    .collect();
                scored.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                scored.truncate(p.top_k);
                scored
                    .into_iter()
                    .map(|(s, i)| {
                        let (blk, pos) = &rows[i];
                        Hit {
                            id: blk.ids[*pos].clone(),
                            distance: metric.finish(s),
                            metadata: p.include.metadata.then(|| {
                                blk.meta[*pos]
                                    .clone()
                                    .unwrap_or_else(|| Arc::new(Value::Object(Default::default())))
                            }),
                            vector: p.include.vector.then(|| blk.vector(*pos, dim).into_owned()),
                            contents: None,
                            cepoch: blk.cepochs[*pos],
                        }
                    })
                    .collect()
            })
            .collect())
    }

    /// Replace candidate scores with exact ones (the same kernels as a single scan).
    pub(super) fn rescore(&self, blocks: &ListBlocks, q: &[f32], dim: usize, cands: &mut [Cand]) {
        let angular = self.config.metric.is_angular();
        for c in cands {
            if let Some(blk) = blocks.get(c.list, c.block) {
                let row = blk.vector(c.pos as usize, dim);
                c.score = exact_score(angular, q, &row, blk.inv_norms[c.pos as usize]);
            }
        }
    }

    /// Candidates to hits, nearest first.
    pub(super) fn hits(
        &self,
        blocks: &ListBlocks,
        dim: usize,
        mut cands: Vec<Cand>,
        p: &SearchParams,
    ) -> Vec<Hit> {
        cands.sort_unstable_by(|a, b| a.score.total_cmp(&b.score));
        cands
            .into_iter()
            .filter_map(|c| {
                let blk = blocks.get(c.list, c.block)?;
                let pos = c.pos as usize;
                Some(self.hit_of(blk, pos, c.score, p, || blk.vector(pos, dim).into_owned()))
            })
            .collect()
    }

    /// The hit of row `pos` of `blk` (whose ids, metadata and contents epochs it reads) at
    /// `score`; `vector` gives the row's vector when the request includes it.
    pub(super) fn hit_of(
        &self,
        blk: &Block,
        pos: usize,
        score: f32,
        p: &SearchParams,
        vector: impl FnOnce() -> Vec<f32>,
    ) -> Hit {
        Hit {
            id: blk.ids[pos].clone(),
            distance: self.config.metric.finish(score),
            metadata: p.include.metadata.then(|| {
                blk.meta[pos]
                    .clone()
                    .unwrap_or_else(|| Arc::new(Value::Object(Default::default())))
            }),
            vector: p.include.vector.then(vector),
            contents: None,
            cepoch: blk.cepochs[pos],
        }
    }
}

/// The exact score of a stored row (`inv`: its inverse norm) for `q` (unit length for
/// angular metrics), in the units candidates are ranked by.
pub(super) fn exact_score(angular: bool, q: &[f32], row: &[f32], inv: f32) -> f32 {
    if angular {
        1.0 - distance::dot(q, row) * inv
    } else {
        distance::l2sq(q, row)
    }
}

/// Unfiltered queries that scan at least this many vectors use all cores.
pub(super) const PARALLEL_SCAN_MIN: usize = 8_192;

/// A filtered query whose indexed conditions leave at most this many candidates scores
/// them exactly (reading their blocks) instead of probing lists.
const CANDIDATE_SEARCH_MAX: usize = 2_048;

/// Candidates kept per result by the first pass over quantised lists.
const RERANK: usize = 4;

/// Unfiltered batches of at least this many queries are answered list by list with matrix
/// products (see `search_batch`).
const BATCH_GEMM_MIN: usize = 8;

/// A bounded max-heap of the best `k` candidates seen so far.
pub(crate) struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<Cand>,
    scores: Vec<f32>,
    /// Scratch of the code scans: raw code distances.
    raw: Vec<u32>,
}

impl TopK {
    pub(super) fn new(k: usize) -> Self {
        Self {
            k,
            heap: std::collections::BinaryHeap::with_capacity(k + 1),
            scores: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The candidates held, in no order.
    pub(super) fn into_cands(self) -> Vec<Cand> {
        self.heap.into_vec()
    }

    /// First pass over one block's 4-bit codes ([`super::coarse`]): `qc` is the query in
    /// the list's 8-bit code units, `unit` one code unit squared in the metric's units.
    pub(super) fn scan_codes(
        &mut self,
        li: usize,
        bno: u32,
        codes: &super::Codes,
        qc: &[i16],
        unit: f32,
        dim: usize,
    ) {
        let mut raw = std::mem::take(&mut self.raw);
        debug_assert_eq!(qc.len(), dim);
        distance::coarse_scan(qc, &codes.nibbles, &mut raw);
        self.offer_raw(&raw, unit, li, bno);
        self.raw = raw;
    }

    /// Offer one block's raw code distances (row order) to the heap.
    fn offer_raw(&mut self, raw: &[u32], unit: f32, li: usize, bno: u32) {
        // Compare in code units first: most rows fail one integer comparison.
        let mut limit = self.raw_limit(unit);
        for (pos, &r) in raw.iter().enumerate() {
            if r > limit {
                continue;
            }
            let s = r as f32 * unit;
            if self.beats_worst(s) {
                self.push(Cand {
                    score: s,
                    list: li as u32,
                    block: bno,
                    pos: pos as u32,
                });
                limit = self.raw_limit(unit);
            }
        }
    }

    pub(super) fn scan_list(
        &mut self,
        metric: Metric,
        q: &block::ScanQuery,
        li: usize,
        blocks: &[(u32, Arc<Block>)],
        filter: Option<&Filter>,
        dim: usize,
    ) {
        let mut scores = std::mem::take(&mut self.scores);
        for (bno, blk) in blocks {
            let bno = *bno;
            blk.scan(metric, q, dim, &mut scores);
            self.offer_block(&scores, li, bno, blk, filter);
        }
        self.scores = scores;
    }

    /// Offer one block's scores (row order) to the heap, skipping rows the filter rejects.
    fn offer_block(
        &mut self,
        scores: &[f32],
        li: usize,
        bno: u32,
        blk: &Block,
        filter: Option<&Filter>,
    ) {
        for (pos, &s) in scores.iter().enumerate() {
            if !self.beats_worst(s) {
                continue;
            }
            if let Some(f) = filter {
                if !f.matches(blk.meta[pos].as_deref()) {
                    continue;
                }
            }
            self.push(Cand {
                score: s,
                list: li as u32,
                block: bno,
                pos: pos as u32,
            });
        }
    }

    /// Whether a candidate with score `s` would enter the heap.
    fn beats_worst(&self, s: f32) -> bool {
        self.heap.len() < self.k || s < self.heap.peek().map_or(f32::INFINITY, |c| c.score)
    }

    /// First pass over a quantised list: approximate scores in the metric's units
    /// (squared L2, or `|a-b|^2 / 2 = 1 - cos` for unit vectors). Blocks whose codes are
    /// missing are scanned exactly.
    fn scan_list_quant(
        &mut self,
        metric: Metric,
        q: &block::ScanQuery,
        li: usize,
        quant: Option<&Quant>,
        blocks: &[(u32, Arc<Block>)],
        dim: usize,
    ) {
        let Some(quant) = quant else {
            return self.scan_list(metric, q, li, blocks, None, dim);
        };
        let qc = quant.prepare(&q.plain);
        let unit = quant.unit(metric.is_angular());
        let mut raw = std::mem::take(&mut self.raw);
        let mut scores = std::mem::take(&mut self.scores);
        for (bno, blk) in blocks {
            let bno = *bno;
            if blk.codes.len() == blk.len() * dim {
                distance::quant_scan(&qc, &blk.codes, &mut raw);
                self.offer_raw(&raw, unit, li, bno);
            } else {
                blk.scan(metric, q, dim, &mut scores);
                self.offer_block(&scores, li, bno, blk, None);
            }
        }
        self.scores = scores;
        self.raw = raw;
    }

    /// The largest raw code distance that could still enter the heap, for a list whose code
    /// unit is `unit` (a superset bound: `beats_worst` decides).
    fn raw_limit(&self, unit: f32) -> u32 {
        if self.heap.len() < self.k {
            return u32::MAX;
        }
        let w = self.heap.peek().map_or(f32::INFINITY, |c| c.score) / unit;
        if w.is_nan() || w >= u32::MAX as f32 {
            u32::MAX
        } else {
            w.max(0.0) as u32
        }
    }

    fn push(&mut self, c: Cand) {
        self.heap.push(c);
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }

    /// `(list, block)` of every candidate held.
    pub(crate) fn referenced(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.heap.iter().map(|c| (c.list, c.block))
    }

    pub(super) fn merge(mut self, other: TopK) -> TopK {
        for c in other.heap {
            self.push(c);
        }
        self
    }
}

#[derive(PartialEq)]
pub(super) struct Cand {
    pub(super) score: f32,
    pub(super) list: u32,
    pub(super) block: u32,
    pos: u32,
}
impl Cand {
    /// The candidate's row in its block.
    pub(super) fn pos(&self) -> usize {
        self.pos as usize
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score)
    }
}
