//! Reading blocks: the cache first, one batched store read for the misses, bounded read
//! chunks; position records; the reader's consistency protocol with writers (`write_seq`).

use super::*;

/// Fewest keys per share of a parallel store read ([`Index::get_many_par`]).
const PAR_READ_MIN_KEYS: usize = 8;

/// Store reads in flight at once for one batched read ([`Index::get_many_par`]).
const READ_THREADS: usize = 8;

/// The threads batched store reads run on: more than the cores, since a read that misses
/// the OS page cache waits for the disk, and the disk serves several reads at once.
static READ_POOL: std::sync::LazyLock<Option<rayon::ThreadPool>> = std::sync::LazyLock::new(|| {
    rayon::ThreadPoolBuilder::new()
        .num_threads(READ_THREADS)
        .thread_name(|i| format!("sealdb-read-{i}"))
        .build()
        .ok()
});

impl Index {
    /// The cache key of block `list/block` of generation `gen` at `epoch`.
    pub(super) fn key_at(&self, gen: u32, list: usize, block: u32, epoch: u64) -> BlockKey {
        BlockKey {
            index: self.id,
            gen,
            list: list as u32,
            block,
            epoch,
        }
    }

    /// Read blocks at the epochs `want` gives, from the cache or else the store (one batched
    /// read for all misses, decrypted across cores). With `keep`, blocks read from the store
    /// enter the cache (bulk readers such as training and `list_ids` pass `false`).
    pub(super) fn read_blocks(
        &self,
        gen: u32,
        want: &[(u32, u32, u64)],
        quant: &(dyn Fn(u32) -> Option<Arc<Quant>> + Sync),
        keep: bool,
        packed: bool,
    ) -> Result<Vec<Arc<Block>>, EngineError> {
        let key_of = |&(list, block, epoch): &(u32, u32, u64)| BlockKey {
            index: self.id,
            gen,
            list,
            block,
            epoch,
        };
        let mut out: Vec<Option<Arc<Block>>> =
            want.iter().map(|w| self.cache.get(&key_of(w))).collect();
        let missing: Vec<usize> = (0..want.len()).filter(|&i| out[i].is_none()).collect();
        self.cache.count(want.len() - missing.len(), missing.len());
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let keys: Vec<Vec<u8>> = missing
            .iter()
            .map(|&i| fmt::block_key(&self.id, gen, want[i].0, want[i].1))
            .collect();
        let values = self.get_many_par(&keys)?;
        let angular = self.config.metric.is_angular();
        let plains: Vec<Vec<u8>> = missing
            .par_iter()
            .zip(keys.par_iter().zip(values.into_par_iter()))
            .map(|(&i, (k, v))| {
                let (l, b, epoch) = want[i];
                let v = v.ok_or_else(|| EngineError::Integrity {
                    index: self.name.clone(),
                    what: format!("block {l}/{b} is missing"),
                })?;
                segments::open_block(&self.keys, k, epoch, &v).map_err(|_| {
                    EngineError::Integrity {
                        index: self.name.clone(),
                        what: format!(
                            "block {l}/{b} failed authentication at epoch {epoch} (altered, swapped or rolled back)"
                        ),
                    }
                })
            })
            .collect::<Result<_, EngineError>>()?;
        let at: Vec<(u32, u32, u64)> = missing.iter().map(|&i| want[i]).collect();
        let plains = self.join_split(gen, &at, plains)?;
        let read: Vec<Arc<Block>> = missing
            .par_iter()
            .zip(plains.into_par_iter())
            .map(|(&i, plain)| {
                let (l, _, epoch) = want[i];
                let (mut blk, dim) = Block::decode_as(&plain, packed)?;
                blk.epoch = epoch;
                if let Some(q) = quant(l) {
                    code_block(&q, &mut blk, dim, angular);
                }
                let blk = Arc::new(blk);
                if keep {
                    self.cache.insert(key_of(&want[i]), blk.clone());
                }
                Ok(blk)
            })
            .collect::<Result<_, EngineError>>()?;
        for (&i, blk) in missing.iter().zip(read) {
            out[i] = Some(blk);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// The whole plaintexts of blocks `at` (`(list, block, epoch)` of generation `gen`)
    /// from their opened block records `plains`: split heads get their row records, read in
    /// one batch, checked and joined; other plaintexts are whole already.
    pub(super) fn join_split(
        &self,
        gen: u32,
        at: &[(u32, u32, u64)],
        mut plains: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        // Per split head: (its place, its first row key, rows, row bytes).
        let mut heads: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for (i, p) in plains.iter().enumerate() {
            if !segments::is_split(p) {
                continue;
            }
            let (precision, dim, rows) = Block::shape(p)?;
            let rb = precision.row_bytes(dim);
            heads.push((i, keys.len(), rows, rb));
            let (l, b, _) = at[i];
            keys.extend(segments::row_keys(&self.id, (gen, l, b), rows, rb));
        }
        if heads.is_empty() {
            return Ok(plains);
        }
        let values = self.get_many_par(&keys)?;
        // The block each row key belongs to, to open it at that block's epoch.
        let mut owner = vec![0usize; keys.len()];
        for (h, &(_, first, rows, rb)) in heads.iter().enumerate() {
            let n = segments::segments_of(rows, rb);
            owner[first..first + n].fill(h);
        }
        let opened: Vec<Vec<u8>> = keys
            .par_iter()
            .zip(values.into_par_iter())
            .enumerate()
            .map(|(j, (k, v))| {
                let (i, first, rows, rb) = heads[owner[j]];
                let (l, b, epoch) = at[i];
                let bad = |what: String| EngineError::Integrity {
                    index: self.name.clone(),
                    what: format!("block {l}/{b}: {what}"),
                };
                let v = v.ok_or_else(|| bad(format!("row record {} is missing", j - first)))?;
                segments::open_rows(&self.keys, k, epoch, &v, (j - first, rows, rb)).map_err(bad)
            })
            .collect::<Result<_, EngineError>>()?;
        let mut opened = opened.into_iter();
        for &(i, _, rows, rb) in &heads {
            let n = segments::segments_of(rows, rb);
            let parts: Vec<Vec<u8>> = opened.by_ref().take(n).collect();
            plains[i] = segments::join(std::mem::take(&mut plains[i]), parts);
        }
        Ok(plains)
    }

    /// [`IndexStore::get_many`] of `keys` in up to one call per core at once, each on its
    /// own share (a query's few dozen candidates' records, or its codes records: reading and
    /// copying them out of the store is a good part of the query). Values come back in the
    /// order of `keys`. Each call is its own read of the store; a view that straddles a
    /// write is caught like any other (`consistent`).
    pub(super) fn get_many_par(
        &self,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let parts = READ_THREADS.min(keys.len() / PAR_READ_MIN_KEYS);
        let Some(pool) = READ_POOL.as_ref().filter(|_| parts > 1) else {
            return Ok(self.store.get_many(keys)?);
        };
        let got: Vec<Vec<Option<Vec<u8>>>> = pool.install(|| {
            keys.par_chunks(keys.len().div_ceil(parts))
                .map(|part| self.store.get_many(part))
                .collect::<Result<_, _>>()
        })?;
        Ok(got.into_iter().flatten().collect())
    }

    /// Whether blocks read now keep float16 and `tq` rows packed: unless the whole index,
    /// decoded to float32, would take at most half of what the cache may hold (then scans
    /// run on floats, as fast as float32's; packed, the cache holds 2 to 7.6 times more
    /// vectors per byte). Results are the same either way.
    pub(super) fn hold_packed(&self, d: &Data) -> bool {
        self.config.precision != Precision::F32
            && Self::decoded_bytes(d).saturating_mul(2) > self.cache.capacity()
    }

    /// The index's vectors as float32: what its blocks hold decoded, less ids and metadata.
    pub(super) fn decoded_bytes(d: &Data) -> u64 {
        (d.count() as u64)
            .saturating_mul(d.dimension as u64)
            .saturating_mul(4)
    }

    /// Read the blocks `(list, block)` at the epochs the directory `d` holds.
    pub(super) fn fetch(
        &self,
        d: &Data,
        refs: &[(u32, u32)],
        keep: bool,
    ) -> Result<Blocks, EngineError> {
        // The same path as scans (directory pointers, then the cache, then one batched read).
        let mut refs: Vec<(usize, u32)> = refs.iter().map(|&(l, b)| (l as usize, b)).collect();
        refs.sort_unstable();
        refs.dedup();
        let blocks = self.fetch_refs(d, &refs, keep)?;
        Ok(refs
            .into_iter()
            .map(|(l, b)| (l as u32, b))
            .zip(blocks)
            .collect())
    }

    /// The blocks `refs` (`(list, block)`, any order; each must be in the directory) in
    /// that order: one cache lookup per block, one batched store read for all the misses.
    pub(super) fn fetch_refs(
        &self,
        d: &Data,
        refs: &[(usize, u32)],
        keep: bool,
    ) -> Result<Vec<Arc<Block>>, EngineError> {
        let mut out: Vec<Option<Arc<Block>>> = Vec::with_capacity(refs.len());
        let mut missing: Vec<(usize, &BlockMeta)> = Vec::new();
        let mut want: Vec<(u32, u32, u64)> = Vec::new();
        for (i, &(li, b)) in refs.iter().enumerate() {
            let m = self.manifest_entry(d, li as u32, b)?;
            let key = BlockKey {
                index: self.id,
                gen: d.gen,
                list: li as u32,
                block: b,
                epoch: m.epoch,
            };
            let got = match m.hot() {
                Some(blk) => {
                    if TOUCHES.with(|t| {
                        let n = t.get().wrapping_add(1);
                        t.set(n);
                        n % block::TOUCH_EVERY == 0
                    }) {
                        self.cache.get(&key);
                    }
                    Some(blk)
                }
                None => {
                    let got = self.cache.get(&key);
                    if let Some(blk) = &got {
                        m.set_hot(blk);
                    }
                    got
                }
            };
            if got.is_none() {
                missing.push((i, m));
                want.push((li as u32, b, m.epoch));
            }
            out.push(got);
        }
        self.cache.count(refs.len() - missing.len(), 0);
        if !want.is_empty() {
            let quant = |l: u32| d.lists.get(l as usize).and_then(|pl| pl.quant.clone());
            // read_blocks counts the misses (it finds them missing again).
            let read = self.read_blocks(d.gen, &want, &quant, keep, self.hold_packed(d))?;
            for ((i, m), blk) in missing.into_iter().zip(read) {
                if keep {
                    m.set_hot(&blk);
                }
                out[i] = Some(blk);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// `(list, block)` of every block of `lists`, list by list in block order.
    pub(super) fn list_refs(d: &Data, lists: &[usize]) -> Vec<(usize, u32)> {
        lists
            .iter()
            .flat_map(|&li| {
                d.lists
                    .get(li)
                    .into_iter()
                    .flat_map(move |pl| pl.blocks.keys().map(move |&b| (li, b)))
            })
            .collect()
    }

    /// Read `refs` a chunk of at most [`READ_CHUNK_BLOCKS`] at a time, handing each chunk to
    /// `f` as runs of consecutive blocks of one list; a chunk's blocks are dropped (unless
    /// the cache keeps them) before the next is read, so a scan of any size holds one chunk.
    pub(super) fn for_chunks(
        &self,
        d: &Data,
        refs: &[(usize, u32)],
        keep: bool,
        mut f: impl FnMut(Vec<(usize, ListRead)>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        for chunk in refs.chunks(READ_CHUNK_BLOCKS) {
            let blocks = self.fetch_refs(d, chunk, keep)?;
            let mut runs: Vec<(usize, ListRead)> = Vec::new();
            for (&(li, b), blk) in chunk.iter().zip(blocks) {
                match runs.last_mut() {
                    Some((l, run)) if *l == li => run.push((b, blk)),
                    _ => runs.push((li, vec![(b, blk)])),
                }
            }
            f(runs)?;
        }
        Ok(())
    }

    /// Run a reader on a consistent view. A writer stores its batch before it installs it in
    /// memory, so a reader can meet a record newer than the directory it holds; such a
    /// mismatch is an integrity error only if it persists after the writer finished.
    ///
    /// `write_seq` tells the two apart: a writer makes it odd before its store write and even
    /// again after it installed the batch, so a reader whose view could have met a newer
    /// record saw it odd, or saw it change, while it read. Such a reader waits for the
    /// writer and reads again (every retry means another write landed meanwhile); a mismatch
    /// with no write in flight is reported at once.
    pub(super) fn consistent<T>(
        &self,
        f: impl Fn(&Data) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut tries = 0;
        loop {
            let s0 = self.write_seq.load(Ordering::SeqCst);
            let r = f(&self.data.read());
            match r {
                Err(EngineError::Integrity { .. }) if tries < RACE_RETRIES && self.raced(s0) => {
                    tries += 1;
                    self.wait_for_writer();
                }
                // Shared stores: the store moved on past this process's copy of the index
                // (another server wrote it); load it again and read again.
                Err(EngineError::Integrity { .. }) if tries < RACE_RETRIES && self.stale() => {
                    tries += 1;
                    self.refresh(false)?;
                }
                r => return r,
            }
        }
    }

    /// Whether a write was in flight at some point since `write_seq` read `s0`.
    pub(super) fn raced(&self, s0: u64) -> bool {
        s0 % 2 == 1 || self.write_seq.load(Ordering::SeqCst) != s0
    }

    /// Wait (briefly) until no write is between its store write and its install.
    pub(super) fn wait_for_writer(&self) {
        let until = std::time::Instant::now() + WRITER_WAIT;
        while self.write_seq.load(Ordering::SeqCst) % 2 == 1 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Mark a write in flight from now until the returned guard drops (after the install).
    pub(crate) fn write_window(&self) -> WriteWindow<'_> {
        self.write_seq.fetch_add(1, Ordering::SeqCst);
        WriteWindow(&self.write_seq)
    }

    pub(super) fn locators(&self, ids: &[&str]) -> Vec<[u8; 16]> {
        ids.par_iter()
            .with_min_len(256)
            .map(|id| self.keys.id_locator(id))
            .collect()
    }

    /// The manifest entry of block `b` of list `l` in `d`: a block a reference names but the
    /// directory does not hold is an integrity error.
    pub(super) fn manifest_entry<'d>(
        &self,
        d: &'d Data,
        l: u32,
        b: u32,
    ) -> Result<&'d BlockMeta, EngineError> {
        d.lists
            .get(l as usize)
            .and_then(|pl| pl.blocks.get(&b))
            .ok_or_else(|| EngineError::Integrity {
                index: self.name.clone(),
                what: format!("block {l}/{b} is not in the manifest"),
            })
    }

    /// An item that a position record puts in a block without it: the record or the block
    /// was tampered with.
    pub(super) fn misplaced(&self, id: &str) -> EngineError {
        EngineError::Integrity {
            index: self.name.clone(),
            what: format!("item '{id}' is not in the block its position record names"),
        }
    }
}
