//! Training: sample, k-means, then one streaming pass over the stored blocks that assigns
//! every row to its new list and writes the new generation (blocks and position records) in
//! bounded batches before one batch switches to it; the default `n_probes` is calibrated in
//! the same pass. Memory stays bounded whatever the index's size: one read chunk of old
//! blocks, the new lists' unfinished blocks (capped), one write batch.

use super::*;

/// k-means iterations when the request does not say: the objective rarely improves after
/// this many (FAISS uses the same default); `max_iters` in the request overrides it.
const DEFAULT_MAX_ITERS: usize = 25;

/// k-means sample size per list (FAISS warns below 39; more costs time, not quality, and the
/// calibrated n_probes absorbs what little list quality is lost).
const TRAIN_SAMPLE_PER_LIST: usize = 128;

/// Default bound of the k-means sample (`max_memory` replaces it), unless that leaves fewer
/// than [`TRAIN_SAMPLE_MIN_PER_LIST`] points per list: 128 MiB is 128 points per list up to
/// 2,048 lists of 128 dimensions, and 64 per list at 4,096 (10M vectors).
const TRAIN_SAMPLE_BYTES: usize = 128 << 20;

/// Fewest sample points per list the default bound leaves (FAISS warns below 39).
const TRAIN_SAMPLE_MIN_PER_LIST: usize = 64;

/// k-means sample rows for `k` lists of `dim` dimensions.
fn sample_cap(k: usize, dim: usize, max_memory_mb: Option<usize>) -> usize {
    let cap = (k * TRAIN_SAMPLE_PER_LIST).max(k);
    let row = dim.max(1) * 4;
    match max_memory_mb.filter(|&m| m > 0) {
        Some(mb) => cap.min(((mb << 20) / row).max(k)),
        None => cap.min((TRAIN_SAMPLE_BYTES / row).max(k * TRAIN_SAMPLE_MIN_PER_LIST)),
    }
}

/// Memory a training of `n` rows holds outside the block cache, at most: its k-means sample
/// and assignment matrices, one read chunk (sealed and opened), the unfinished blocks of
/// the new lists, one write batch (blocks and their sealed copies), the positions sorted
/// per run, and the filter of every id. Reserved from the cache budget while it runs.
fn working_set(sample_rows: usize, dim: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    sample_rows * dim * 4
        + threads * (32 << 20)
        + 2 * TRAIN_READ_CHUNK_BYTES
        + TRAIN_OPEN_BLOCKS_BYTES
        + 2 * TRAIN_WRITE_CHUNK_BYTES
        + 2 * train_run_entries(n) * 24
        + n * 4
}

/// Positions sorted in memory per run while a training of `n` items writes a generation:
/// [`TRAIN_RUN_ENTRIES`], or more, up to [`TRAIN_RUN_ENTRIES_MAX`], so that the new
/// generation has fewer runs than a level holds before it is merged. A training then leaves
/// no merge behind, and the new generation's runs are written once: a merge right after
/// would write every position a second time, into pages the old runs then leave free in the
/// store (10M items: 245 MB of a redb file).
/// A power of two, as the sort buffer grows by doubling.
fn train_run_entries(n: usize) -> usize {
    n.div_ceil(runs::FANOUT - 1)
        .next_power_of_two()
        .clamp(TRAIN_RUN_ENTRIES, TRAIN_RUN_ENTRIES_MAX)
}

/// Default early stop for k-means: fewer than this fraction of sample points changed list in
/// the last iteration.
const SETTLE_FRACTION: f64 = 0.01;

/// Training writes the new generation in store batches of about this size (each batch is
/// built, sealed and dropped, next to the old generation).
const TRAIN_WRITE_CHUNK_BYTES: usize = 4 << 20;

/// Old blocks read (and decrypted) at a time by training's passes.
const TRAIN_READ_CHUNK_BYTES: usize = 32 << 20;

/// The new lists' unfinished blocks may hold this much before the fullest are written out
/// as they are (a list then has a block below the usual size).
const TRAIN_OPEN_BLOCKS_BYTES: usize = 128 << 20;

/// Positions sorted in memory per run while training writes a generation, at least (24 MiB).
const TRAIN_RUN_ENTRIES: usize = 1 << 20;
/// ... and at most (96 MiB): trainings of more than `7 × 2^22` items merge their runs.
const TRAIN_RUN_ENTRIES_MAX: usize = 4 << 20;

/// Queries (stored rows) the `n_probes` calibration measures recall with.
const CALIBRATION_QUERIES: usize = 200;

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
        // The training's buffers come out of the cache budget while it runs.
        let _reserved = {
            let d = self.data.read();
            let n = d.count();
            let k = p
                .n_lists
                .filter(|&k| k > 0)
                .unwrap_or_else(|| auto_n_lists(n));
            let dim = d.dimension as usize;
            let cap = sample_cap(k, dim, p.max_memory_mb).min(n);
            self.cache.reserve(working_set(cap, dim, n) as u64)
        };
        let (sample, calib, dim, k, seed) = self.consistent(|d| {
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
            // max_memory (or TRAIN_SAMPLE_BYTES) allows, evenly spaced over the rows in
            // directory order.
            let cap = sample_cap(k, dim, p.max_memory_mb);
            let stride = (n as f64 / cap.min(n) as f64).max(1.0);
            // Which rows of which blocks are picked.
            let mut picks: Vec<((u32, u32, u64), Vec<u32>)> = Vec::new();
            let mut next = 0f64;
            let mut i = 0usize;
            for (l, pl) in d.lists.iter().enumerate() {
                for (&b, m) in &pl.blocks {
                    let mut rows = Vec::new();
                    for pos in 0..m.rows {
                        if i as f64 >= next {
                            rows.push(pos);
                            next += stride;
                        }
                        i += 1;
                    }
                    if !rows.is_empty() {
                        picks.push(((l as u32, b, m.epoch), rows));
                    }
                }
            }
            let total: usize = picks.iter().map(|(_, r)| r.len()).sum();
            let calib_every = (total / CALIBRATION_QUERIES.min(total / 4).max(1)).max(1);
            let mut sample = Vec::with_capacity(total * dim);
            let mut calib: Vec<(String, Vec<f32>)> = Vec::new();
            let per_read = (TRAIN_READ_CHUNK_BYTES / BLOCK_BYTES).max(1);
            let mut taken = 0usize;
            let no_quant = |_l: u32| None;
            for (ci, chunk) in picks.chunks(per_read).enumerate() {
                stop.check()?;
                progress.set(Phase::Sampling, ci * per_read, picks.len());
                let want: Vec<(u32, u32, u64)> = chunk.iter().map(|(w, _)| *w).collect();
                let blocks = self.read_blocks(d.gen, &want, &no_quant, false, true)?;
                for (blk, (_, rows)) in blocks.iter().zip(chunk) {
                    for &pos in rows {
                        let pos = pos as usize;
                        if pos >= blk.len() {
                            return Err(EngineError::Integrity {
                                index: self.name.clone(),
                                what: "a block holds fewer rows than the manifest says".into(),
                            });
                        }
                        let v = blk.vector(pos, dim);
                        let row = if self.config.metric.is_angular() {
                            distance::normalized(&v)
                        } else {
                            v.into_owned()
                        };
                        if taken % calib_every == calib_every / 2
                            && calib.len() < CALIBRATION_QUERIES
                            && total >= 50
                        {
                            calib.push((blk.ids[pos].clone(), row.clone()));
                        }
                        sample.extend_from_slice(&row);
                        taken += 1;
                    }
                }
            }
            Ok((sample, calib, dim, k, n as u64 ^ d.gen as u64))
        })?;
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
        self.install_training(
            centroids,
            k,
            dim,
            params.batch_size,
            p.coarse_min_bytes.unwrap_or(coarse::COARSE_MIN_BYTES),
            calib,
            &progress,
            &stop,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn install_training(
        &self,
        centroids: Vec<f32>,
        k: usize,
        dim: usize,
        batch: usize,
        coarse_min_bytes: u64,
        calib: Vec<(String, Vec<f32>)>,
        progress: &Progress,
        stop: &Stopper<'_>,
    ) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        stop.check()?;
        let stopped = || stop.stopped();
        let angular = self.config.metric.is_angular();
        // Only writers change the directory, and this one holds the writer lock: a copy of
        // it stays true for the whole pass while queries keep using the index.
        let (old_dir, old_gen, count, epoch, meta_digest, held) = {
            let d = self.data.read();
            let held = if self.hold_packed(&d) {
                self.config.precision
            } else {
                Precision::F32
            };
            let dir: Vec<(u32, u32, u64)> = d
                .lists
                .iter()
                .enumerate()
                .flat_map(|(l, pl)| pl.blocks.iter().map(move |(&b, m)| (l as u32, b, m.epoch)))
                .collect();
            (dir, d.gen, d.count(), d.epoch + 1, d.meta_digest, held)
        };
        let gen = old_gen + 1;
        // Blocks of `gen` enter the cache as they are written; if this training does not
        // switch to them, a later attempt may write other blocks under the same keys, so
        // they must leave the cache again.
        struct Unswitched<'a>(&'a Index, u32, bool);
        impl Drop for Unswitched<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.cache.forget(&self.0.id, Some(self.1));
                }
            }
        }
        let mut unswitched = Unswitched(self, gen, false);
        // Generations large enough for the 4-bit pass are written as split blocks (decided
        // before training knows whether the 8-bit pass wins: either reads them).
        let segmented =
            coarse::wants_coarse(false, count, dim, self.config.precision, coarse_min_bytes);
        let cap = if segmented {
            segments::block_cap(self.config.precision.row_bytes(dim))
        } else {
            Self::block_cap(dim, self.config.precision)
        };
        let mut out = NewGeneration {
            ix: self,
            gen,
            epoch,
            dim,
            cap,
            held,
            segmented,
            open: (0..k).map(|_| Block::default()).collect(),
            open_rows: 0,
            next_bno: vec![0; k],
            bounds: (0..k).map(|_| distance::QuantBounds::new(dim)).collect(),
            pending: Vec::new(),
            pending_bytes: 0,
            manifest: Vec::new(),
            first: true,
            runs: runs::BulkRuns::new(
                self.id,
                &self.keys,
                Sink::Index(self),
                gen,
                train_run_entries(count),
            ),
            all: idfilter::IdFilter::with_capacity(count.saturating_mul(2)),
        };
        let mut calib = Calibration::new(calib, dim);
        // 1. One pass over the old generation, a read chunk at a time: assign every row,
        // measure the calibration queries' true neighbours, append rows to the new lists.
        let t_write = std::time::Instant::now();
        let no_quant = |_l: u32| None;
        let per_read = (TRAIN_READ_CHUNK_BYTES / BLOCK_BYTES).max(1);
        let mut seen = 0usize;
        for (ci, chunk) in old_dir.chunks(per_read).enumerate() {
            stop.check()?;
            progress.set(Phase::Assigning, ci * per_read, old_dir.len());
            let blocks = self.read_blocks(old_gen, chunk, &no_quant, false, true)?;
            // Per block: the rows' new lists, and the rows as k-means sees them (unit length
            // for angular metrics; the block's own vectors otherwise).
            let rows: Vec<(Vec<u32>, Option<Vec<f32>>)> = blocks
                .par_iter()
                .map(|b| {
                    // (Packed rows are decoded: a transient copy of the block's vectors.)
                    let normed: Option<Vec<f32>> = if angular {
                        Some(
                            b.rows_f32(dim)
                                .chunks_exact(dim)
                                .flat_map(distance::normalized)
                                .collect(),
                        )
                    } else {
                        b.is_packed().then(|| b.rows_f32(dim).into_owned())
                    };
                    let view = normed.as_deref().unwrap_or(&b.vecs);
                    kmeans::assign_stoppable(view, dim, &centroids, batch, &stopped)
                        .map(|(labels, _)| (labels, normed))
                })
                .collect::<Option<_>>()
                .ok_or_else(|| stop.cancelled())?;
            calib.observe(&blocks, &rows);
            for (blk, (labels, normed)) in blocks.iter().zip(&rows) {
                seen += blk.len();
                let view = normed.as_deref().unwrap_or(&blk.vecs);
                for (pos, &l) in labels.iter().enumerate() {
                    out.push(l as usize, blk, pos, &view[pos * dim..(pos + 1) * dim]);
                }
            }
            drop(blocks);
            out.flush_open(TRAIN_OPEN_BLOCKS_BYTES);
            if out.pending_bytes >= TRAIN_WRITE_CHUNK_BYTES {
                stop.check()?;
                out.write()?;
            }
        }
        if seen != count {
            return Err(EngineError::Integrity {
                index: self.name.clone(),
                what: format!("the blocks hold {seen} rows where the manifest says {count}"),
            });
        }
        out.flush_open(0);
        stop.check()?;
        progress.set(Phase::Writing, 0, 1);
        out.write()?;
        let t_cal = std::time::Instant::now();
        let probes = calib.probes(&centroids, k);
        tracing::debug!(index = %self.name, probes, secs = t_cal.elapsed().as_secs_f32(), "n_probes calibrated");
        // The first pass: 8-bit codes in the blocks when queries probe many lists, else
        // 4-bit codes beside them when the generation is large (see `coarse`).
        let eight = wants_quant(true, probes as u32, k, self.config.precision);
        let four = coarse::wants_coarse(eight, count, dim, self.config.precision, coarse_min_bytes);
        let quants: Option<Vec<Option<Quant>>> = (eight || four).then(|| {
            out.bounds
                .drain(..)
                .map(distance::QuantBounds::finish)
                .collect()
        });
        let mut manifest = std::mem::take(&mut out.manifest);
        manifest.sort_unstable();
        // A generation with the 4-bit pass stores every block's codes beside it, so that a
        // query reads codes, not blocks, for the lists it probes (see `coarse`).
        if let (true, Some(q)) = (four, &quants) {
            self.write_codes(gen, &manifest, q, dim, progress, stop)?;
        }
        // The last moment to stop: after the next write the new generation is the index.
        stop.check()?;
        let all_ids = std::mem::replace(&mut out.all, idfilter::IdFilter::with_capacity(0));
        let (new_runs, mut batch) = std::mem::replace(
            &mut out.runs,
            runs::BulkRuns::new(
                self.id,
                &self.keys,
                Sink::Index(self),
                gen,
                TRAIN_RUN_ENTRIES,
            ),
        )
        .finish()?;
        batch.delete_prefix(fmt::list_gen_prefix(&self.id, old_gen));
        batch.delete_prefix(fmt::pos_gen_prefix(&self.id, old_gen));
        batch.delete_prefix(fmt::run_gen_prefix(&self.id, old_gen));
        batch.delete_prefix(fmt::page_gen_prefix(&self.id, old_gen));
        let pages = state::put_all_pages(&self.id, &self.keys, gen, epoch, &manifest, &mut batch);
        batch.delete(fmt::centroids_key(&self.id, old_gen));
        batch.delete(fmt::quant_key(&self.id, old_gen));
        batch.delete(fmt::coarse_key(&self.id, old_gen));
        batch.delete_prefix(fmt::codes_gen_prefix(&self.id, old_gen));
        batch.delete_prefix(fmt::rows_gen_prefix(&self.id, old_gen));
        let ck = fmt::centroids_key(&self.id, gen);
        let mut raw = Vec::with_capacity(centroids.len() * 4);
        Precision::F32.encode_into(&centroids, dim, &mut raw);
        batch.put(ck.clone(), self.keys.seal(&fmt::aad(&ck), &raw));
        // The record of the split form (version 3): a split generation always has a first
        // pass (an 8-bit one or, failing that, the 4-bit one it was split for).
        let quants_written = quants.is_some();
        if let Some(q) = &quants {
            let qk = if eight {
                fmt::quant_key(&self.id, gen)
            } else {
                fmt::coarse_key(&self.id, gen)
            };
            batch.put(
                qk.clone(),
                self.keys.seal(
                    &fmt::aad(&qk),
                    &super::load::encode_quants(
                        q,
                        dim,
                        match (out.segmented, eight) {
                            (true, _) => super::load::QUANTS_SPLIT,
                            (false, true) => 1,
                            (false, false) => super::load::QUANTS_WITH_CODES,
                        },
                    ),
                ),
            );
        }
        let st = State {
            dimension: dim as u32,
            gen,
            trained: true,
            n_lists: k as u32,
            default_probes: probes as u32,
            epoch,
            meta_digest,
            pages,
            runs: state::run_list(&new_runs),
        };
        self.put_state(&mut batch, &st);
        let window = self.write_window();
        self.commit(batch)?;
        unswitched.2 = true;
        tracing::debug!(index = %self.name, secs = t_write.elapsed().as_secs_f32(), "new generation written");
        // 2. The store has switched; now memory does (the directory only: blocks are read
        // on demand, and the old generation's cached blocks are dropped).
        progress.set(Phase::Swapping, 0, 1);
        let mut lists: Vec<ListDir> = vec![ListDir::default(); k];
        for &(l, b, e, rows) in &manifest {
            lists[l as usize].blocks.insert(b, BlockMeta::new(e, rows));
        }
        if let Some(q) = quants {
            for (pl, q) in lists.iter_mut().zip(q) {
                if eight {
                    pl.quant = q.map(Arc::new);
                } else {
                    pl.coarse = q.map(Arc::new);
                }
            }
        }
        {
            let mut d = self.data.write();
            d.gen = gen;
            d.epoch = epoch;
            d.trained = true;
            d.default_probes = probes as u32;
            d.centroids = centroids;
            d.lists = lists;
            d.count = count;
            d.pages = st.pages.iter().map(|&(lg, bg, e)| ((lg, bg), e)).collect();
            d.runs = new_runs;
            d.codes_stored = four && !eight;
            d.split_rows = out.segmented && quants_written;
        }
        drop(window);
        *self.id_filter.lock() = Some(all_ids);
        self.cache.forget(&self.id, Some(old_gen));
        self.code_cached();
        // Any merge the new generation's runs leave due (only above 7 x 2^22 items, see
        // `train_run_entries`) runs before the training returns, under its writer lock: a
        // training ends with the index settled, not with a merge of millions of positions
        // competing with the first queries.
        self.compact_runs(None, true)?;
        Ok(k)
    }

    /// Write the codes record of every block of the new generation `gen` (`manifest`:
    /// `(list, block, epoch, rows)`), a read chunk of blocks at a time (from the cache, where
    /// training left them, or the store), in batches of about [`TRAIN_WRITE_CHUNK_BYTES`].
    /// Nothing refers to them before the switch. The codes enter the cache as well; unless
    /// the generation will be read whole (it fits the budget: `coarse`'s `keep`), the whole
    /// blocks training left there leave it, so that the codes queries scan are what the
    /// cache holds once training ends, not blocks that queries would never ask for.
    fn write_codes(
        &self,
        gen: u32,
        manifest: &[(u32, u32, u64, u32)],
        quants: &[Option<Quant>],
        dim: usize,
        progress: &Progress,
        stop: &Stopper<'_>,
    ) -> Result<(), EngineError> {
        let angular = self.config.metric.is_angular();
        let packed = self.config.precision != Precision::F32;
        let no_quant = |_l: u32| None;
        let want: Vec<(u32, u32, u64)> = manifest
            .iter()
            .filter(|m| quants.get(m.0 as usize).is_some_and(Option::is_some))
            .map(|&(l, b, e, _)| (l, b, e))
            .collect();
        let rows: u64 = manifest.iter().map(|m| m.3 as u64).sum();
        let kept = rows.saturating_mul(dim as u64 * 4).saturating_mul(3) / 2 <= self.cache.budget();
        let per_read = (TRAIN_READ_CHUNK_BYTES / BLOCK_BYTES).max(1);
        let mut batch = WriteBatch::new();
        let mut bytes = 0usize;
        for (ci, chunk) in want.chunks(per_read).enumerate() {
            stop.check()?;
            progress.set(Phase::Writing, ci * per_read, want.len());
            let blocks = self.read_blocks(gen, chunk, &no_quant, false, packed)?;
            let sealed: Vec<(Vec<u8>, Vec<u8>)> = chunk
                .par_iter()
                .zip(blocks.par_iter())
                .filter_map(|(&(l, b, e), blk)| {
                    let q = quants.get(l as usize)?.as_ref()?;
                    let codes = coarse::Codes::of(q, blk, dim, angular);
                    let kv = self.seal_codes(gen, l, b, &codes, dim, e);
                    let key = self.key_at(gen, l as usize, b, e);
                    if !kept {
                        self.cache.remove(&key);
                    }
                    self.cache.insert_codes(key, Arc::new(codes));
                    Some(kv)
                })
                .collect();
            drop(blocks);
            for (k, v) in sealed {
                bytes += k.len() + v.len();
                batch.put(k, v);
            }
            if bytes >= TRAIN_WRITE_CHUNK_BYTES {
                self.commit(std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.commit(batch)?;
        }
        Ok(())
    }

    /// Give the cached blocks of lists with a quantiser their 8-bit codes, or their 4-bit
    /// codes beside them (blocks that training put into the cache before the quantisers
    /// were known).
    fn code_cached(&self) {
        let d = self.data.read();
        let dim = d.dimension as usize;
        let angular = self.config.metric.is_angular();
        d.lists.par_iter().enumerate().for_each(|(l, pl)| {
            if let Some(q) = &pl.coarse {
                for (&b, m) in &pl.blocks {
                    let key = self.key_at(d.gen, l, b, m.epoch);
                    if let Some(blk) = self.cache.get(&key) {
                        let codes = coarse::Codes::of(q, &blk, dim, angular);
                        self.cache.insert_codes(key, Arc::new(codes));
                    }
                }
            }
            let Some(q) = &pl.quant else { return };
            for (&b, m) in &pl.blocks {
                let key = self.key_at(d.gen, l, b, m.epoch);
                if let Some(blk) = self.cache.get(&key) {
                    if blk.codes.len() != blk.len() * dim {
                        let mut coded = (*blk).clone();
                        drop(blk);
                        code_block(q, &mut coded, dim, angular);
                        self.cache.insert(key, Arc::new(coded));
                    }
                }
            }
        });
    }
}

/// The new generation as training builds it: one unfinished block per list, finished blocks
/// waiting to be written, and what the state record will list.
struct NewGeneration<'a> {
    ix: &'a Index,
    gen: u32,
    epoch: u64,
    dim: usize,
    cap: usize,
    /// How the new blocks hold their rows (`Index::hold_packed`).
    held: Precision,
    /// Whether the new blocks are sealed segmented: a generation large enough for the
    /// 4-bit pass (decided before the pass knows whether the 8-bit one wins instead).
    segmented: bool,
    open: Vec<Block>,
    open_rows: usize,
    next_bno: Vec<u32>,
    /// Per list: the bounds of its rows (as the quantiser sees them), for its quantiser.
    bounds: Vec<distance::QuantBounds>,
    pending: Vec<(u32, u32, Block)>,
    pending_bytes: usize,
    manifest: Vec<(u32, u32, u64, u32)>,
    first: bool,
    /// The new generation's positions, written as sorted runs.
    runs: runs::BulkRuns<'a>,
    /// Every item's locator (the index-wide filter once the generation is live).
    all: idfilter::IdFilter,
}

impl NewGeneration<'_> {
    fn push(&mut self, l: usize, src: &Block, pos: usize, qrow: &[f32]) {
        if self.open[l].len() == 0 {
            self.open[l] = Block::with_capacity(self.cap, self.dim, self.held);
        }
        self.open[l].push_from(src, pos, self.dim);
        self.bounds[l].add(qrow);
        self.open_rows += 1;
        if self.open[l].len() >= self.cap {
            self.finish(l);
        }
    }

    fn finish(&mut self, l: usize) {
        let blk = std::mem::take(&mut self.open[l]);
        if blk.len() == 0 {
            return;
        }
        self.open_rows -= blk.len();
        let b = self.next_bno[l];
        self.next_bno[l] += 1;
        self.pending_bytes += blk.len() * (self.dim * 4 + 64);
        self.pending.push((l as u32, b, blk));
    }

    /// Finish the fullest unfinished blocks until they hold at most `limit` bytes.
    fn flush_open(&mut self, limit: usize) {
        let row = self.dim * 4 + 64;
        if self.open_rows * row <= limit {
            return;
        }
        let mut by_size: Vec<(usize, usize)> = self
            .open
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() > 0)
            .map(|(l, b)| (b.len(), l))
            .collect();
        by_size.sort_unstable_by(|a, b| b.cmp(a));
        for (_, l) in by_size {
            if self.open_rows * row <= limit / 2 {
                break;
            }
            self.finish(l);
        }
    }

    /// Seal and store the finished blocks, and hand their rows' positions to the runs.
    /// Nothing refers to them until the final batch switches generations; the first write
    /// also drops what an earlier, interrupted attempt left of this generation.
    fn write(&mut self) -> Result<(), EngineError> {
        let ix = self.ix;
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let mut batch = WriteBatch::new();
        if std::mem::take(&mut self.first) {
            batch.delete_prefix(fmt::list_gen_prefix(&ix.id, self.gen));
            batch.delete_prefix(fmt::pos_gen_prefix(&ix.id, self.gen));
            batch.delete_prefix(fmt::run_gen_prefix(&ix.id, self.gen));
            batch.delete_prefix(fmt::page_gen_prefix(&ix.id, self.gen));
            batch.delete_prefix(fmt::codes_gen_prefix(&ix.id, self.gen));
            batch.delete_prefix(fmt::rows_gen_prefix(&ix.id, self.gen));
        }
        if pending.is_empty() && batch.is_empty() {
            return Ok(());
        }
        let (gen, epoch, dim) = (self.gen, self.epoch, self.dim);
        type Sealed = (u32, u32, Vec<(Vec<u8>, Vec<u8>)>, u32, Vec<runs::PosEntry>);
        let sealed: Vec<Sealed> = pending
            .into_par_iter()
            .map(|(l, b, mut blk)| {
                let kvs = ix.seal_block(gen, l, b, &mut blk, dim, epoch, self.segmented);
                let pos: Vec<runs::PosEntry> = blk
                    .ids
                    .iter()
                    .map(|id| (ix.keys.id_locator(id), l, b))
                    .collect();
                let rows = blk.len() as u32;
                // Warm the cache with the new generation (its quantisers, if any, are known
                // only at the end: see `Index::code_cached`).
                blk.epoch = epoch;
                blk.shrink();
                ix.cache.insert(
                    BlockKey {
                        index: ix.id,
                        gen,
                        list: l,
                        block: b,
                        epoch,
                    },
                    Arc::new(blk),
                );
                (l, b, kvs, rows, pos)
            })
            .collect();
        let mut positions = Vec::new();
        for (l, b, kvs, rows, pos) in sealed {
            self.manifest.push((l, b, epoch, rows));
            for (k, v) in kvs {
                batch.put(k, v);
            }
            positions.push(pos);
        }
        ix.commit(batch)?;
        // After the batch that dropped an interrupted attempt's runs: runs may store pages.
        for e in positions.into_iter().flatten() {
            self.all.insert(&e.0);
            self.runs.push(e)?;
        }
        Ok(())
    }
}

/// The `n_probes` calibration: stored rows as queries, their ten true nearest neighbours
/// (found during the assignment pass, excluding the query's own row) and those neighbours'
/// new lists.
struct Calibration {
    ids: HashMap<String, usize>,
    queries: Vec<f32>,
    q_norms: Vec<f32>,
    dim: usize,
    /// Per query: up to ten `(squared distance, new list)`, nearest first.
    best: Vec<Vec<(f32, u32)>>,
}

impl Calibration {
    fn new(calib: Vec<(String, Vec<f32>)>, dim: usize) -> Self {
        let mut ids = HashMap::default();
        let mut queries = Vec::with_capacity(calib.len() * dim);
        for (i, (id, row)) in calib.into_iter().enumerate() {
            ids.insert(id, i);
            queries.extend_from_slice(&row);
        }
        let q_norms = queries
            .chunks_exact(dim.max(1))
            .map(|q| distance::dot(q, q))
            .collect();
        let n = ids.len();
        Self {
            ids,
            queries,
            q_norms,
            dim,
            best: vec![Vec::new(); n],
        }
    }

    /// Offer one read chunk: blocks with their rows' new lists and query-space rows.
    fn observe(&mut self, blocks: &[Arc<Block>], rows: &[(Vec<u32>, Option<Vec<f32>>)]) {
        let nq = self.best.len();
        if nq == 0 {
            return;
        }
        let dim = self.dim;
        let Ok(qv) = ndarray::ArrayView2::from_shape((nq, dim), &self.queries[..]) else {
            return;
        };
        let ids = &self.ids;
        let q_norms = &self.q_norms;
        let found: Vec<Vec<Vec<(f32, u32)>>> = blocks
            .par_iter()
            .zip(rows)
            .map(|(blk, (labels, normed))| {
                let normed = normed.as_deref().unwrap_or(&blk.vecs);
                let m = labels.len();
                let mut best = vec![Vec::new(); nq];
                let Ok(x) = ndarray::ArrayView2::from_shape((m, dim), &normed[..m * dim]) else {
                    return best;
                };
                let x_norms: Vec<f32> = normed
                    .chunks_exact(dim)
                    .map(|r| distance::dot(r, r))
                    .collect();
                let own: Vec<Option<usize>> =
                    blk.ids.iter().map(|id| ids.get(id).copied()).collect();
                let dots = qv.dot(&x.t());
                for (qi, b) in best.iter_mut().enumerate() {
                    for (j, (&dt, &xn)) in dots.row(qi).iter().zip(&x_norms).enumerate() {
                        if own[j] != Some(qi) {
                            keep_best(b, q_norms[qi] + xn - 2.0 * dt, labels[j]);
                        }
                    }
                }
                best
            })
            .collect();
        for per_block in found {
            for (b, f) in self.best.iter_mut().zip(per_block) {
                for (dist, l) in f {
                    keep_best(b, dist, l);
                }
            }
        }
    }

    /// The fewest lists that give recall@10 >= 0.99 on the calibration queries: for each
    /// query, lists are ranked by centroid distance and each true neighbour's list rank is
    /// noted; recall at `p` probes is the share of neighbours whose list rank is below `p`.
    fn probes(&self, centroids: &[f32], k: usize) -> usize {
        let dim = self.dim;
        if k <= 1 || self.best.is_empty() {
            return k.max(1);
        }
        let hist: Vec<usize> = self
            .queries
            .par_chunks(dim)
            .zip(&self.best)
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
                for &(_, l) in nbrs {
                    h[rank[l as usize]] += 1;
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
}

/// Keep the ten nearest `(distance, list)` in `best`, nearest first.
fn keep_best(best: &mut Vec<(f32, u32)>, dist: f32, list: u32) {
    const K: usize = 10;
    if best.len() < K || dist < best[best.len() - 1].0 {
        let pos = best.partition_point(|b| b.0 <= dist);
        best.insert(pos, (dist, list));
        best.truncate(K);
    }
}

/// Recall@10 the default `n_probes` must reach on the calibration sample.
const CALIBRATION_RECALL: f64 = 0.99;

#[cfg(test)]
mod run_size_tests {
    use super::*;

    /// Up to 7 x 2^22 items a training writes fewer runs than a level holds, so none is
    /// merged (and rewritten) right after; below 2^20 per run it never goes.
    #[test]
    fn a_training_leaves_no_merge_due_up_to_its_largest_runs() {
        for n in [0, 1, 1000, 1 << 20, 7 << 20, 10_000_000, 7 << 21, 7 << 22] {
            let per = train_run_entries(n);
            assert!(
                per.is_power_of_two() && per >= TRAIN_RUN_ENTRIES,
                "{n}: {per}"
            );
            assert!(n.div_ceil(per) < runs::FANOUT, "{n}: {per}");
        }
        assert_eq!(train_run_entries(10_000_000), 1 << 21);
        assert_eq!(train_run_entries(100_000_000), TRAIN_RUN_ENTRIES_MAX);
    }
}
