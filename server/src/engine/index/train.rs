//! Training: sample, k-means, then install a new generation of posting lists (written to
//! the store in bounded batches before one batch switches to it, then moved into memory), and
//! the calibration of the default `n_probes`.

use super::*;

/// k-means iterations when the request does not say: the objective rarely improves after
/// this many (FAISS uses the same default); `max_iters` in the request overrides it.
const DEFAULT_MAX_ITERS: usize = 25;

/// k-means sample size per list (FAISS warns below 39; more costs time, not quality, and the
/// calibrated n_probes absorbs what little list quality is lost).
const TRAIN_SAMPLE_PER_LIST: usize = 128;

/// Default early stop for k-means: fewer than this fraction of sample points changed list in
/// the last iteration.
const SETTLE_FRACTION: f64 = 0.01;

/// Training writes the new generation in store batches of about this size (each batch is
/// built, sealed and dropped, next to the old generation).
const TRAIN_WRITE_CHUNK_BYTES: usize = 4 << 20;

/// What a running training checks between steps of bounded work.
struct Stopper<'a> {
    ix: &'a Index,
    epoch: u64,
    deadline: Option<(std::time::Instant, std::time::Duration)>,
}

impl Stopper<'_> {
    fn reason(&self) -> Option<CancelReason> {
        if self.ix.deleted.load(Ordering::Acquire) {
            Some(CancelReason::Deleted)
        } else if self.ix.shutdown.load(Ordering::Acquire) {
            Some(CancelReason::Shutdown)
        } else if self.ix.train_epoch.load(Ordering::Acquire) != self.epoch {
            // Delete bumps the epoch before it can set `deleted`.
            Some(CancelReason::Superseded)
        } else {
            match self.deadline {
                Some((at, limit)) if std::time::Instant::now() >= at => {
                    Some(CancelReason::TimeLimit(limit))
                }
                _ => None,
            }
        }
    }
    fn stopped(&self) -> bool {
        self.reason().is_some()
    }
    /// The error for a step that saw [`Self::stopped`] (reasons never revert).
    fn cancelled(&self) -> EngineError {
        EngineError::Cancelled(self.reason().unwrap_or(CancelReason::Superseded))
    }
    fn check(&self) -> Result<(), EngineError> {
        match self.reason() {
            Some(r) => Err(EngineError::Cancelled(r)),
            None => Ok(()),
        }
    }
}

impl Index {
    /// Train (or retrain) the IVF lists. Blocks until done; queries keep working meanwhile.
    /// A running training of the same index is superseded (it stops within about a second
    /// and fails with [`CancelReason::Superseded`]). Returns the number of lists.
    pub fn train(&self, p: &TrainParams) -> Result<usize, EngineError> {
        let epoch = self.train_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let _t = self.training.lock();
        self.train_locked(p, epoch)
    }

    /// Background training: never supersedes a running one (fails with
    /// [`CancelReason::Busy`] instead); any explicit train request supersedes it.
    pub fn train_background(&self, p: &TrainParams) -> Result<usize, EngineError> {
        let Some(_t) = self.training.try_lock() else {
            return Err(EngineError::Cancelled(CancelReason::Busy));
        };
        let epoch = self.train_epoch.load(Ordering::Acquire);
        self.train_locked(p, epoch)
    }

    fn train_locked(&self, p: &TrainParams, epoch: u64) -> Result<usize, EngineError> {
        let stop = Stopper {
            ix: self,
            epoch,
            deadline: p.time_limit.map(|d| (std::time::Instant::now() + d, d)),
        };
        stop.check()?;
        self.ensure_live()?;
        let progress = Arc::new(Progress::new(&self.name));
        *self.progress.lock() = Some(progress.clone());
        struct Clear<'a>(&'a Mutex<Option<Arc<Progress>>>);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                *self.0.lock() = None;
            }
        }
        let _clear = Clear(&self.progress);
        let (sample, dim, k, seed) = {
            let d = self.data.read();
            let n = d.count();
            let dim = d.dimension as usize;
            if n == 0 {
                return Err(EngineError::Invalid(format!(
                    "index '{}' has no vectors to train on",
                    self.name
                )));
            }
            let k = match p.n_lists.filter(|&k| k > 0) {
                Some(k) => {
                    if n < 2 * k {
                        return Err(EngineError::Invalid(format!(
                            "training {k} lists needs at least {} vectors; index '{}' has {n}",
                            2 * k,
                            self.name
                        )));
                    }
                    k
                }
                None => auto_n_lists(n),
            };
            // Sample at most TRAIN_SAMPLE_PER_LIST points per list, and no more than
            // max_memory allows.
            let mut cap = (k * TRAIN_SAMPLE_PER_LIST).max(k);
            if let Some(mb) = p.max_memory_mb.filter(|&m| m > 0) {
                cap = cap.min(((mb << 20) / (dim * 4)).max(k));
            }
            let stride = (n as f64 / cap.min(n) as f64).max(1.0);
            let mut sample = Vec::with_capacity(cap.min(n) * dim);
            let mut next = 0f64;
            let mut i = 0usize;
            for pl in &d.lists {
                stop.check()?;
                for blk in pl.blocks.values() {
                    progress.set(Phase::Sampling, i, n);
                    for pos in 0..blk.len() {
                        if i as f64 >= next {
                            let v = blk.vector(pos, dim);
                            if self.config.metric.is_angular() {
                                sample.extend(distance::normalized(v));
                            } else {
                                sample.extend_from_slice(v);
                            }
                            next += stride;
                        }
                        i += 1;
                    }
                }
            }
            (sample, dim, k, n as u64 ^ d.gen as u64)
        };
        let params = KMeansParams {
            k,
            max_iters: p.max_iters.filter(|&x| x > 0).unwrap_or(DEFAULT_MAX_ITERS),
            tolerance: p.tolerance.filter(|t| *t >= 0.0).unwrap_or(1e-6),
            // Without explicit convergence settings, stop once fewer than SETTLE_FRACTION of
            // the sample changes list; explicit max_iters or tolerance are followed as given.
            settle: if p.max_iters.is_none() && p.tolerance.is_none() {
                SETTLE_FRACTION
            } else {
                0.0
            },
            batch_size: p.batch_size.filter(|&x| x > 0).unwrap_or(2048),
            seed,
        };
        let t_kmeans = std::time::Instant::now();
        progress.set(Phase::KMeans, 0, params.max_iters);
        let stopped = || stop.stopped();
        let (centroids, passes) = kmeans::train_observed(
            &sample,
            dim,
            &params,
            &mut |pass| progress.set(Phase::KMeans, pass, params.max_iters),
            &stopped,
        )
        .ok_or_else(|| stop.cancelled())?;
        tracing::debug!(index = %self.name, rows = sample.len() / dim, passes, secs = t_kmeans.elapsed().as_secs_f32(), "k-means done");
        drop(sample);
        let k = centroids.len() / dim;
        self.install_training(centroids, k, dim, params.batch_size, &progress, &stop)
    }

    fn install_training(
        &self,
        centroids: Vec<f32>,
        k: usize,
        dim: usize,
        batch: usize,
        progress: &Progress,
        stop: &Stopper<'_>,
    ) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        stop.check()?;
        let stopped = || stop.stopped();
        let cap = Self::block_cap(dim, self.config.precision);
        let angular = self.config.metric.is_angular();
        // 1. Queries keep running: label every row, calibrate n_probes, plan where rows go.
        let (blocks, labels, gen, old_gen, probes, count, epoch, meta_digest) = {
            let d = self.data.read();
            // Every existing block is already a contiguous matrix: assign it in place.
            let blocks: Vec<Arc<Block>> = d
                .lists
                .iter()
                .flat_map(|pl| pl.blocks.values().cloned())
                .collect();
            progress.set(Phase::Assigning, 0, blocks.len());
            let labels: Vec<Vec<u32>> = blocks
                .par_iter()
                .map(|b| {
                    progress.step();
                    let r = if angular {
                        let normed: Vec<f32> = b
                            .vecs
                            .chunks_exact(dim)
                            .flat_map(distance::normalized)
                            .collect();
                        kmeans::assign_stoppable(&normed, dim, &centroids, batch, &stopped)
                    } else {
                        kmeans::assign_stoppable(&b.vecs, dim, &centroids, batch, &stopped)
                    };
                    r.map(|(labels, _)| labels)
                })
                .collect::<Option<_>>()
                .ok_or_else(|| stop.cancelled())?;
            let chunks: Vec<&[f32]> = blocks.iter().map(|b| b.vecs.as_slice()).collect();
            let flat_labels: Vec<u32> = labels.iter().flatten().copied().collect();
            let t_cal = std::time::Instant::now();
            let probes = calibrate_probes(&chunks, dim, angular, &flat_labels, &centroids);
            tracing::debug!(index = %self.name, probes, secs = t_cal.elapsed().as_secs_f32(), "n_probes calibrated");
            (
                blocks,
                labels,
                d.gen + 1,
                d.gen,
                probes,
                d.count(),
                d.epoch + 1,
                d.meta_digest,
            )
        };
        // Each list takes its rows in the order of the old blocks, `cap` rows per block. The
        // store copy below and the in-memory move in step 3 both follow this one order.
        let mut rows_of: Vec<Vec<(u32, u32)>> = vec![Vec::new(); k];
        for (bi, labs) in labels.iter().enumerate() {
            for (pos, &l) in labs.iter().enumerate() {
                rows_of[l as usize].push((bi as u32, pos as u32));
            }
        }
        let mut locate = HashMap::with_capacity_and_hasher(count, Default::default());
        for (l, rows) in rows_of.iter().enumerate() {
            for (i, &(bi, pos)) in rows.iter().enumerate() {
                let id = blocks[bi as usize].ids[pos as usize].clone();
                locate.insert(id, (l as u32, (i / cap) as u32));
            }
        }
        // 2. Write the new generation in bounded chunks, built a few lists at a time and
        // dropped once sealed, so memory never holds a second full copy. Nothing refers to it
        // until the state record is switched in the final batch below, so a crash in between
        // leaves only unreferenced blocks; the first chunk deletes leftovers of any earlier
        // attempt.
        let t_write = std::time::Instant::now();
        let build = |l: usize, b: usize| {
            let rows = &rows_of[l][b * cap..((b + 1) * cap).min(rows_of[l].len())];
            let mut blk = Block::with_capacity(rows.len(), dim);
            for &(bi, pos) in rows {
                let src = &blocks[bi as usize];
                let pos = pos as usize;
                blk.push_row(
                    src.ids[pos].clone(),
                    src.vector(pos, dim),
                    src.inv_norms[pos],
                    src.meta[pos].clone(),
                    src.cepochs[pos],
                );
            }
            blk
        };
        let jobs: Vec<(usize, usize)> = (0..k)
            .flat_map(|l| (0..rows_of[l].len().div_ceil(cap)).map(move |b| (l, b)))
            .collect();
        let per_chunk = (TRAIN_WRITE_CHUNK_BYTES / BLOCK_BYTES).max(1);
        let mut first = true;
        let n_chunks = jobs.len().div_ceil(per_chunk);
        for (ci, chunk) in jobs.chunks(per_chunk).enumerate() {
            stop.check()?;
            progress.set(Phase::Writing, ci, n_chunks);
            let mut batch = WriteBatch::new();
            if std::mem::take(&mut first) {
                batch.delete_prefix(fmt::list_gen_prefix(&self.id, gen));
            }
            let sealed: Vec<(Vec<u8>, Vec<u8>)> = chunk
                .par_iter()
                .map(|&(l, b)| self.seal_block(gen, l as u32, b as u32, &build(l, b), dim, epoch))
                .collect();
            for (k, v) in sealed {
                batch.put(k, v);
            }
            self.store.write(batch)?;
        }
        // The last moment to stop: after the next write the new generation is the index.
        stop.check()?;
        let per_list: Vec<usize> = rows_of.iter().map(Vec::len).collect();
        let manifest: Vec<(u32, u32, u64)> = jobs
            .iter()
            .map(|&(l, b)| (l as u32, b as u32, epoch))
            .collect();
        drop(rows_of);
        drop(blocks);
        let mut batch = WriteBatch::new();
        batch.delete_prefix(fmt::list_gen_prefix(&self.id, old_gen));
        batch.delete(fmt::centroids_key(&self.id, old_gen));
        let ck = fmt::centroids_key(&self.id, gen);
        let mut raw = Vec::with_capacity(centroids.len() * 4);
        Precision::F32.encode_into(&centroids, &mut raw);
        batch.put(ck.clone(), self.keys.seal(&fmt::aad(&ck), &raw));
        let st = State {
            dimension: dim as u32,
            gen,
            trained: true,
            n_lists: k as u32,
            default_probes: probes as u32,
            epoch,
            meta_digest,
            manifest,
        };
        self.put_state(&mut batch, &st);
        self.store.write(batch)?;
        tracing::debug!(index = %self.name, secs = t_write.elapsed().as_secs_f32(), "new generation written");
        // 3. The store has switched; now memory does. Rows move from the old blocks into the
        // new ones in the same order as above, each old block freed once emptied, so the
        // process never holds both generations. Queries wait for this step (a copy of the
        // vectors, plus 8-bit codes where used: 40-60 ms per 100k 128-d vectors here).
        let t_swap = std::time::Instant::now();
        progress.set(Phase::Swapping, 0, 1);
        let mut d = self.data.write();
        let old = std::mem::take(&mut d.lists);
        let mut lists = vec![PostingList::default(); k];
        let mut placed = vec![0usize; k];
        let room = |l: usize, placed: usize| (per_list[l] - placed).min(cap);
        let mut fill: Vec<Block> = (0..k)
            .map(|l| Block::with_capacity(room(l, 0), dim))
            .collect();
        let old_blocks = old.into_iter().flat_map(|pl| pl.blocks.into_values());
        for (blk, labs) in old_blocks.zip(&labels) {
            let Block {
                ids,
                vecs,
                inv_norms,
                meta,
                cepochs,
                ..
            } = Arc::try_unwrap(blk).unwrap_or_else(|shared| (*shared).clone());
            for (pos, ((id, m), &l)) in ids.into_iter().zip(meta).zip(labs).enumerate() {
                let l = l as usize;
                fill[l].push_row(
                    id,
                    &vecs[pos * dim..(pos + 1) * dim],
                    inv_norms[pos],
                    m,
                    cepochs[pos],
                );
                placed[l] += 1;
                if fill[l].len() == cap || placed[l] == per_list[l] {
                    let next = Block::with_capacity(room(l, placed[l]), dim);
                    let mut full = std::mem::replace(&mut fill[l], next);
                    full.epoch = epoch;
                    let bno = lists[l].blocks.len() as u32;
                    lists[l].blocks.insert(bno, Arc::new(full));
                }
            }
        }
        if wants_quant(true, probes as u32, lists.len()) {
            lists
                .par_iter_mut()
                .for_each(|pl| quantize_list(pl, dim, angular));
        }
        d.gen = gen;
        d.epoch = epoch;
        d.trained = true;
        d.default_probes = probes as u32;
        d.centroids = centroids;
        d.lists = lists;
        d.locate = locate;
        tracing::debug!(index = %self.name, secs = t_swap.elapsed().as_secs_f32(), "generation swapped in memory");
        Ok(k)
    }
}

/// Recall@10 the default `n_probes` must reach on the calibration sample.
const CALIBRATION_RECALL: f64 = 0.99;

/// Choose the default `n_probes`: the fewest lists that give recall@10 >= 0.99 when stored
/// vectors themselves are the queries (their own entry excluded). For each sampled point we
/// rank lists by centroid distance and note the rank of each true neighbour's list; recall at
/// `p` probes is the share of neighbours whose list rank is below `p`.
fn calibrate_probes(
    chunks: &[&[f32]],
    dim: usize,
    angular: bool,
    labels: &[u32],
    centroids: &[f32],
) -> usize {
    let n = labels.len();
    let k = centroids.len() / dim;
    if k <= 1 || n < 50 {
        return k.max(1);
    }
    let nq = 200.min(n / 4);
    let step = n / nq;
    let picks: Vec<usize> = (0..nq).map(|i| i * step + step / 2).collect();
    // Row i of the concatenated chunks.
    let starts = kmeans::row_starts(chunks, dim);
    let row = |i: usize| {
        let c = starts.partition_point(|&s| s <= i) - 1;
        let off = i - starts[c];
        &chunks[c][off * dim..(off + 1) * dim]
    };
    let queries: Vec<f32> = picks
        .iter()
        .flat_map(|&i| {
            if angular {
                distance::normalized(row(i))
            } else {
                row(i).to_vec()
            }
        })
        .collect();
    let truth = kmeans::exact_neighbours(chunks, dim, angular, &queries, &picks, 10);
    // hist[r] = number of true neighbours whose list has rank r for their query.
    let hist: Vec<usize> = queries
        .par_chunks(dim)
        .zip(&truth)
        .map(|(q, nbrs)| {
            let mut cd: Vec<(f32, u32)> = centroids
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, c)| (distance::l2sq(q, c), i as u32))
                .collect();
            cd.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            let mut rank = vec![0usize; k];
            for (r, (_, c)) in cd.iter().enumerate() {
                rank[*c as usize] = r;
            }
            let mut h = vec![0usize; k];
            for &j in nbrs {
                h[rank[labels[j] as usize]] += 1;
            }
            h
        })
        .reduce(
            || vec![0usize; k],
            |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        );
    let total: usize = hist.iter().sum();
    let mut covered = 0usize;
    for (r, h) in hist.iter().enumerate() {
        covered += h;
        if covered as f64 >= CALIBRATION_RECALL * total as f64 {
            // One extra list of headroom for queries that are not stored points.
            return (r + 2).min(k);
        }
    }
    k
}
