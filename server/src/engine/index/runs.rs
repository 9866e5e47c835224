//! The id -> position index: where each item of a generation sits (`(list, block)`), as a
//! log-structured merge of sealed, sorted, immutable *runs* (docs/FORMAT.md "Position runs").
//!
//! An item's key is its locator (a keyed hash of its id), so the positions of a batch land
//! all over the key space. One record per item in the store's B-tree made every batch of
//! 1,000 new items rewrite ~1,000 B-tree pages (measured: 8x write amplification and upserts
//! falling from 140k to 37k vectors/s as a 10M index grew). Runs are written sequentially
//! instead: each write batch adds one small run of its changes (level 0), and once
//! [`FANOUT`] runs share a level they are merged into one run of the next level, so every
//! position is rewritten about once per level (log8 of the index size).
//!
//! A run is pages of up to [`PAGE_ENTRIES`] entries `(locator, list, block)` in locator
//! order, plus a header with the first locator of every page (the fences). A lookup goes
//! through the runs newest first; the first run holding the locator answers (a tombstone
//! means deleted). Resident per run: its fences and, once built, a Bloom filter of its
//! locators; one more filter over all runs lets an upsert skip every lookup of a new id.
//! Pages are read through the shared block cache. Runs are written once under a random id
//! and never changed, so a page can only be dropped (the state record lists every live run
//! with its page and entry counts) or replaced by garbage (it then fails to open).

use super::idfilter::IdFilter;
use super::*;

/// Entries per run page: 24 bytes each, so that a page, sealed and keyed, fills one 64 KiB
/// store page (64,805 bytes of plaintext; redb rounds every large value up to a power of
/// two, and 2,048 entries left a quarter of it empty). Runs written with 2,048 read the same.
pub(crate) const PAGE_ENTRIES: usize = 2700;

/// Runs of one level merged into one run of the next.
pub(crate) const FANOUT: usize = 8;

/// The `(list, block)` of a deleted item's tombstone.
const TOMB: (u32, u32) = (u32::MAX, u32::MAX);

/// Bytes of run pages per store batch while a merge or a training writes a big run.
const WRITE_CHUNK_BYTES: usize = 4 << 20;

/// One position: `(locator, list, block)`; `(u32::MAX, u32::MAX)` is a tombstone.
pub(crate) type PosEntry = ([u8; 16], u32, u32);

/// A decrypted run page (immutable once shared through the cache).
pub struct RunPage {
    pub(crate) entries: Vec<PosEntry>,
}

impl RunPage {
    pub(crate) fn weight(&self) -> usize {
        self.entries.len() * 24 + 64
    }

    fn find(&self, loc: &[u8; 16]) -> Option<(u32, u32)> {
        self.entries
            .binary_search_by(|e| e.0.cmp(loc))
            .ok()
            .map(|i| (self.entries[i].1, self.entries[i].2))
    }
}

/// A live run as the state record lists it, with its fences.
pub(crate) struct Run {
    pub id: u64,
    pub level: u8,
    pub entries: u64,
    /// First locator of every page.
    pub fences: Vec<[u8; 16]>,
    /// Built on first need (from the pages) or when the run is written.
    filter: Mutex<Option<Arc<IdFilter>>>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Run({:016x}, L{}, {})",
            self.id, self.level, self.entries
        )
    }
}

impl Run {
    pub(crate) fn pages(&self) -> u32 {
        self.fences.len() as u32
    }

    /// The page that would hold `loc`, if any.
    fn page_of(&self, loc: &[u8; 16]) -> Option<u32> {
        let p = self.fences.partition_point(|f| f <= loc);
        (p > 0).then(|| (p - 1) as u32)
    }

    fn filter(&self) -> Option<Arc<IdFilter>> {
        self.filter.lock().clone()
    }

    pub(crate) fn resident_bytes(&self) -> usize {
        self.fences.len() * 16 + self.filter().map_or(0, |f| f.bytes()) + 64
    }
}

/// The level of a run of `n` entries written at once (training, upgrade): the level that
/// merging level-0 runs of about a thousand entries would have reached.
pub(crate) fn level_for(n: u64) -> u8 {
    let mut level = 0u8;
    let mut cap = 1024u64;
    while n > cap && level < 30 {
        cap = cap.saturating_mul(FANOUT as u64);
        level += 1;
    }
    level
}

/// Plaintext of a run page: `u8 1 || u32 n || n × (locator[16] || u32 list || u32 block)`.
fn encode_page(entries: &[PosEntry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(5 + entries.len() * 24);
    w.u8(1).u32(entries.len() as u32);
    for (loc, l, b) in entries {
        w.raw(loc).u32(*l).u32(*b);
    }
    w.0
}

fn decode_page(buf: &[u8]) -> Result<RunPage, EngineError> {
    let mut r = Reader::new(buf, "position run page");
    if r.u8()? != 1 {
        return Err(EngineError::Corrupt("unknown run page version".into()));
    }
    let n = r.u32()? as usize;
    if n == 0 || n > PAGE_ENTRIES || n.checked_mul(24) != Some(r.remaining()) {
        return Err(EngineError::Corrupt("run page has the wrong length".into()));
    }
    let mut entries: Vec<PosEntry> = Vec::with_capacity(n);
    for _ in 0..n {
        let loc: [u8; 16] = r
            .take(16)?
            .try_into()
            .map_err(|_| EngineError::Corrupt("run page is truncated".into()))?;
        let e = (loc, r.u32()?, r.u32()?);
        if entries.last().is_some_and(|p| p.0 >= e.0) {
            return Err(EngineError::Corrupt("run page is not in order".into()));
        }
        entries.push(e);
    }
    Ok(RunPage { entries })
}

/// Plaintext of a run header: `u8 1 || u64 entries || u32 pages || pages × locator[16]`.
fn encode_header(entries: u64, fences: &[[u8; 16]]) -> Vec<u8> {
    let mut w = Writer::with_capacity(13 + fences.len() * 16);
    w.u8(1).u64(entries).u32(fences.len() as u32);
    for f in fences {
        w.raw(f);
    }
    w.0
}

fn decode_header(buf: &[u8]) -> Result<(u64, Vec<[u8; 16]>), EngineError> {
    let mut r = Reader::new(buf, "position run header");
    if r.u8()? != 1 {
        return Err(EngineError::Corrupt("unknown run header version".into()));
    }
    let entries = r.u64()?;
    let n = r.u32()? as usize;
    if n.checked_mul(16) != Some(r.remaining()) {
        return Err(EngineError::Corrupt(
            "run header has the wrong length".into(),
        ));
    }
    let mut fences = Vec::with_capacity(n);
    for _ in 0..n {
        let f: [u8; 16] = r
            .take(16)?
            .try_into()
            .map_err(|_| EngineError::Corrupt("run header is truncated".into()))?;
        if fences.last().is_some_and(|p: &[u8; 16]| *p >= f) {
            return Err(EngineError::Corrupt("run header is not in order".into()));
        }
        fences.push(f);
    }
    Ok((entries, fences))
}

/// Writes one run, page by page, in locator order. Pages go into `batch`; once it holds
/// [`WRITE_CHUNK_BYTES`] the caller may store it (`take_full`), since nothing refers to the
/// run until a state record lists it.
pub(crate) struct RunWriter<'a> {
    index: IndexId,
    keys: &'a IndexKeys,
    gen: u32,
    id: u64,
    page: Vec<PosEntry>,
    fences: Vec<[u8; 16]>,
    entries: u64,
    /// The run's filter, filled as entries are pushed (sized for the entries expected).
    filter: IdFilter,
    pub(crate) batch: WriteBatch,
    bytes: usize,
}

impl<'a> RunWriter<'a> {
    /// A writer for a run of about `expected` entries (what its filter is sized for: more
    /// only raise its false-positive rate).
    pub(crate) fn new(index: IndexId, keys: &'a IndexKeys, gen: u32, expected: usize) -> Self {
        Self {
            index,
            keys,
            gen,
            id: rand::random::<u64>(),
            page: Vec::with_capacity(PAGE_ENTRIES),
            fences: Vec::new(),
            entries: 0,
            filter: IdFilter::with_capacity(expected),
            batch: WriteBatch::new(),
            bytes: 0,
        }
    }

    /// Entries pushed so far.
    pub(crate) fn len(&self) -> u64 {
        self.entries
    }

    /// Append an entry (locators strictly increasing across calls).
    pub(crate) fn push(&mut self, e: PosEntry) {
        if self.page.is_empty() {
            self.fences.push(e.0);
        }
        self.filter.insert(&e.0);
        self.page.push(e);
        self.entries += 1;
        if self.page.len() == PAGE_ENTRIES {
            self.seal_page();
        }
    }

    fn seal_page(&mut self) {
        if self.page.is_empty() {
            return;
        }
        let pno = self.fences.len() as u32 - 1;
        let key = fmt::run_page_key(&self.index, self.gen, self.id, pno);
        let sealed = self.keys.seal(&fmt::aad(&key), &encode_page(&self.page));
        self.bytes += sealed.len();
        self.batch.put(key, sealed);
        self.page.clear();
    }

    /// The batch of pages so far, once it is big enough to store on its own.
    pub(crate) fn take_full(&mut self) -> Option<WriteBatch> {
        (self.bytes >= WRITE_CHUNK_BYTES).then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.batch)
        })
    }

    /// Seal the last page and the header into the batch; returns the run (`None` if it is
    /// empty: nothing was written) and the batch still to store.
    pub(crate) fn finish(self, level: u8) -> (Option<Arc<Run>>, WriteBatch) {
        let (run, batch, _) = self.finish_sized(level);
        (run, batch)
    }

    /// [`Self::finish`], with the bytes of sealed pages the returned batch holds.
    fn finish_sized(mut self, level: u8) -> (Option<Arc<Run>>, WriteBatch, usize) {
        self.seal_page();
        if self.entries == 0 {
            return (None, self.batch, self.bytes);
        }
        let key = fmt::run_page_key(&self.index, self.gen, self.id, u32::MAX);
        self.batch.put(
            key.clone(),
            self.keys
                .seal(&fmt::aad(&key), &encode_header(self.entries, &self.fences)),
        );
        let run = Run {
            id: self.id,
            level,
            entries: self.entries,
            fences: self.fences,
            filter: Mutex::new(Some(Arc::new(self.filter))),
        };
        (Some(Arc::new(run)), self.batch, self.bytes)
    }
}

/// What a batch did to the run list, to install once it is stored.
pub(crate) struct RunChange {
    /// Runs that replace `removed` (newest first), placed where the newest of them was.
    pub added: Vec<Arc<Run>>,
    pub removed: Vec<u64>,
}

/// The run list after `change` (levels stay in ascending order, newest first).
pub(crate) fn apply_runs(runs: &[Arc<Run>], change: &RunChange) -> Vec<Arc<Run>> {
    let at = runs
        .iter()
        .position(|r| change.removed.contains(&r.id))
        .unwrap_or(0);
    let mut out: Vec<Arc<Run>> = runs[..at]
        .iter()
        .filter(|r| !change.removed.contains(&r.id))
        .cloned()
        .collect();
    out.extend(change.added.iter().cloned());
    out.extend(
        runs[at..]
            .iter()
            .filter(|r| !change.removed.contains(&r.id))
            .cloned(),
    );
    out
}

impl Index {
    /// Read the headers of the runs a state record lists.
    pub(super) fn load_runs(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        gen: u32,
        listed: &[(u64, u8, u64, u32)],
    ) -> Result<Vec<Arc<Run>>, EngineError> {
        let hkeys: Vec<Vec<u8>> = listed
            .iter()
            .map(|&(run, ..)| fmt::run_page_key(id, gen, run, u32::MAX))
            .collect();
        let values = store.get_many(&hkeys)?;
        listed
            .iter()
            .zip(hkeys.iter().zip(values))
            .map(|(&(run, level, entries, pages), (k, v))| {
                let fail = |what: &str| EngineError::Integrity {
                    index: name.to_owned(),
                    what: format!("position run {run:016x} {what}"),
                };
                let v = v.ok_or_else(|| fail("is missing its header"))?;
                let plain = keys
                    .open(&fmt::aad(k), &v)
                    .map_err(|_| fail("header failed authentication"))?;
                let (n, fences) = decode_header(&plain)?;
                if n != entries || fences.len() as u32 != pages {
                    return Err(fail("header disagrees with the state record"));
                }
                Ok(Arc::new(Run {
                    id: run,
                    level,
                    entries,
                    fences,
                    filter: Mutex::new(None),
                }))
            })
            .collect()
    }

    /// Pages `pnos` of `run` (decrypted, through the cache when `keep`).
    fn run_pages(
        &self,
        gen: u32,
        run: &Run,
        pnos: &[u32],
        keep: bool,
    ) -> Result<Vec<Arc<RunPage>>, EngineError> {
        let mut out: Vec<Option<Arc<RunPage>>> = pnos
            .iter()
            .map(|&p| self.cache.get_run(&self.run_key(gen, run.id, p)))
            .collect();
        let missing: Vec<usize> = (0..pnos.len()).filter(|&i| out[i].is_none()).collect();
        self.cache.count(pnos.len() - missing.len(), missing.len());
        if !missing.is_empty() {
            let keys: Vec<Vec<u8>> = missing
                .iter()
                .map(|&i| fmt::run_page_key(&self.id, gen, run.id, pnos[i]))
                .collect();
            let values = self.store.get_many(&keys)?;
            let opened: Vec<Arc<RunPage>> = keys
                .par_iter()
                .zip(values.into_par_iter())
                .map(|(k, v)| {
                    let fail = |what: &str| EngineError::Integrity {
                        index: self.name.clone(),
                        what: format!("a page of position run {:016x} {what}", run.id),
                    };
                    let v = v.ok_or_else(|| fail("is missing"))?;
                    let plain = self
                        .keys
                        .open(&fmt::aad(k), &v)
                        .map_err(|_| fail("failed authentication"))?;
                    Ok(Arc::new(decode_page(&plain)?))
                })
                .collect::<Result<_, EngineError>>()?;
            for (&i, page) in missing.iter().zip(opened) {
                if keep {
                    self.cache
                        .insert_run(self.run_key(gen, run.id, pnos[i]), page.clone());
                }
                out[i] = Some(page);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn run_key(&self, gen: u32, run: u64, page: u32) -> super::super::cache::RunKey {
        super::super::cache::RunKey {
            index: self.id,
            gen,
            run,
            page,
        }
    }

    /// Where each item sits in the view `d` (`None` = not in the index).
    pub(super) fn positions(
        &self,
        d: &Data,
        locators: &[[u8; 16]],
    ) -> Result<Vec<Option<(u32, u32)>>, EngineError> {
        let mut out = vec![None; locators.len()];
        let mut open: Vec<usize> = (0..locators.len()).collect();
        for run in &d.runs {
            if open.is_empty() {
                break;
            }
            let filter = run.filter();
            let mut by_page: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for &i in &open {
                if filter
                    .as_ref()
                    .is_some_and(|f| !f.may_contain(&locators[i]))
                {
                    continue;
                }
                if let Some(p) = run.page_of(&locators[i]) {
                    by_page.entry(p).or_default().push(i);
                }
            }
            if by_page.is_empty() {
                continue;
            }
            let pnos: Vec<u32> = by_page.keys().copied().collect();
            let pages = self.run_pages(d.gen, run, &pnos, true)?;
            let mut found = HashSet::default();
            for (page, idxs) in pages.iter().zip(by_page.values()) {
                for &i in idxs {
                    if let Some(at) = page.find(&locators[i]) {
                        out[i] = (at != TOMB).then_some(at);
                        found.insert(i);
                    }
                }
            }
            open.retain(|i| !found.contains(i));
        }
        Ok(out)
    }

    /// Build the Bloom filters the view's runs lack, and a filter over all of them (sized for
    /// twice `count`), reading each such run once.
    pub(super) fn build_filters(&self, d: &Data, count: usize) -> Result<IdFilter, EngineError> {
        let mut all = IdFilter::with_capacity(count.saturating_mul(2));
        for run in &d.runs {
            // Built without holding the run's lock, so lookups are not kept waiting.
            let mut f = run
                .filter()
                .is_none()
                .then(|| IdFilter::with_capacity(run.entries as usize));
            let pnos: Vec<u32> = (0..run.pages()).collect();
            for chunk in pnos.chunks(256) {
                for page in self.run_pages(d.gen, run, chunk, false)? {
                    for (loc, ..) in &page.entries {
                        all.insert(loc);
                        if let Some(f) = f.as_mut() {
                            f.insert(loc);
                        }
                    }
                }
            }
            if let Some(f) = f {
                run.filter.lock().get_or_insert_with(|| Arc::new(f));
            }
        }
        Ok(all)
    }

    /// A level-0 run of a batch's position changes (`TOMB` for deletions), into `batch`.
    /// Returns the change to the run list, to put in the state record and install.
    pub(super) fn put_run(
        &self,
        batch: &mut WriteBatch,
        gen: u32,
        mut changes: Vec<PosEntry>,
    ) -> RunChange {
        changes.sort_unstable_by_key(|e| e.0);
        changes.dedup_by(|a, b| a.0 == b.0);
        let mut w = RunWriter::new(self.id, &self.keys, gen, changes.len());
        for e in changes {
            w.push(e);
        }
        let (run, pages) = w.finish(0);
        batch.extend(pages);
        RunChange {
            added: run.into_iter().collect(),
            removed: Vec::new(),
        }
    }

    /// Merge runs while some level of `lane` (`None`: every level) holds [`FANOUT`] of them.
    /// Each merge stores its run's pages in bounded batches, then one batch with the state
    /// record that swaps the merged runs for it and deletes them.
    ///
    /// `locked`: the caller holds the writer lock (a shared store's writes, which merge in
    /// line). Otherwise (the background merger, see `merge`) the merge reads and seals
    /// without it and takes it only to store each batch, after checking that the index is
    /// still live, still at the generation the merge read, and, for the last batch, still
    /// lists every run merged; if not, it drops what it wrote and stops (`Ok(())`).
    pub(super) fn compact_runs(&self, lane: Option<Lane>, locked: bool) -> Result<(), EngineError> {
        loop {
            let (gen, inputs, oldest) = {
                let d = self.data.read();
                let Some((i, j)) = pick(&d.runs, lane) else {
                    return Ok(());
                };
                (d.gen, d.runs[i..j].to_vec(), j == d.runs.len())
            };
            match self.merge_group(gen, &inputs, oldest, locked) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                // A training or a delete removed the runs the merge was reading.
                Err(e) if !locked && self.moved_past(gen) => {
                    tracing::debug!(index = %self.name, error = %e, "position-run merge dropped: the index changed under it");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Merge `inputs` (consecutive runs of generation `gen`; `oldest`: nothing older exists)
    /// into one run of the next level. `Ok(false)`: the index moved on and nothing was kept.
    fn merge_group(
        &self,
        gen: u32,
        inputs: &[Arc<Run>],
        oldest: bool,
        locked: bool,
    ) -> Result<bool, EngineError> {
        let level = inputs[0].level.saturating_add(1);
        let t = std::time::Instant::now();
        let expected: u64 = inputs.iter().map(|r| r.entries).sum();
        // A big merge's working set (its run's filter, a write batch being filled and one
        // being stored) is lent from the cache budget, as a training's is; small merges
        // (levels 0-1: under a megabyte) are not worth resizing the cache for.
        let working = IdFilter::bytes_for(expected as usize) + 2 * WRITE_CHUNK_BYTES;
        let _lent = (expected >= 1 << 16).then(|| self.cache.reserve(working as u64));
        let mut w = RunWriter::new(self.id, &self.keys, gen, expected as usize);
        let new_id = w.id;
        // Whether the index is still where the merge found it, checked under the writer
        // lock (the caller's, or taken here); `last` also needs every input still listed.
        let current = |last: bool| -> bool {
            !self.moved_past(gen)
                && (locked || !self.shutdown.load(Ordering::Acquire))
                && (!last || {
                    let d = self.data.read();
                    inputs.iter().all(|r| d.runs.iter().any(|x| x.id == r.id))
                })
        };
        let mut stored_any = false;
        let mut cursors: Vec<Cursor> = inputs.iter().map(|r| Cursor::new(r.clone())).collect();
        loop {
            // The smallest locator among the cursors; the newest run holding it wins.
            let mut best: Option<(usize, [u8; 16])> = None;
            for (ci, c) in cursors.iter_mut().enumerate() {
                if let Some(loc) = c.peek(self, gen)? {
                    if best.is_none_or(|(_, b)| loc < b) {
                        best = Some((ci, loc));
                    }
                }
            }
            let Some((ci, loc)) = best else { break };
            let e = cursors[ci].take();
            for c in cursors.iter_mut().skip(ci + 1) {
                if c.peek(self, gen)? == Some(loc) {
                    c.take();
                }
            }
            // Nothing older than the oldest run: its tombstones have nothing to hide.
            if !(oldest && (e.1, e.2) == TOMB) {
                w.push(e);
            }
            if let Some(b) = w.take_full() {
                let _w = (!locked).then(|| self.writer.lock());
                if !current(false) {
                    return self.drop_merged(gen, new_id, stored_any);
                }
                self.commit(b)?;
                stored_any = true;
            }
        }
        let (run, mut batch) = w.finish(level);
        let change = RunChange {
            added: run.into_iter().collect(),
            removed: inputs.iter().map(|r| r.id).collect(),
        };
        for r in inputs {
            batch.delete_prefix(fmt::run_prefix(&self.id, gen, r.id));
        }
        let _w = (!locked).then(|| self.writer.lock());
        if !current(true) {
            return self.drop_merged(gen, new_id, stored_any);
        }
        let (epoch, runs) = {
            let d = self.data.read();
            let epoch = d.epoch + 1;
            let runs = apply_runs(&d.runs, &change);
            let st = State::of(&d, d.dimension, epoch, d.meta_digest, &d.pages, &runs);
            self.put_state(&mut batch, &st);
            (epoch, runs)
        };
        let _window = self.write_window();
        self.commit(batch)?;
        {
            let mut d = self.data.write();
            d.epoch = epoch;
            d.runs = runs;
        }
        tracing::debug!(index = %self.name, level, runs = inputs.len(), secs = t.elapsed().as_secs_f32(), "position runs merged");
        Ok(true)
    }

    /// Whether generation `gen` of the index is gone (retrained or deleted).
    fn moved_past(&self, gen: u32) -> bool {
        self.deleted.load(Ordering::Acquire) || self.data.read().gen != gen
    }

    /// A merge the index moved past: delete the pages it stored (nothing lists them), if
    /// the index still exists to hold them. Call with the writer lock held. Always
    /// `Ok(false)`.
    fn drop_merged(&self, gen: u32, run: u64, stored_any: bool) -> Result<bool, EngineError> {
        if stored_any && !self.deleted.load(Ordering::Acquire) {
            let mut b = WriteBatch::new();
            b.delete_prefix(fmt::run_prefix(&self.id, gen, run));
            self.commit(b)?;
        }
        tracing::debug!(index = %self.name, "position-run merge dropped: the index changed under it");
        Ok(false)
    }
}

/// Which merges a merger takes. Small ones (inputs at levels 0 and 1: at most tens of
/// thousands of entries, milliseconds) are kept apart from big ones (level 2 and up: up to
/// millions of entries, seconds at 10M), so that a big merge in the background never holds
/// back the small merges that every few write batches ask for. The two never share an
/// input, and each puts its run where its inputs were, so they may run at once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Lane {
    Small = 0,
    Big = 1,
}

impl Lane {
    pub(crate) const BOTH: [Lane; 2] = [Lane::Small, Lane::Big];

    fn takes(self, level: u8) -> bool {
        (level >= 2) == (self == Lane::Big)
    }

    /// How many runs one level of this lane may pile up to while its merger is behind,
    /// before writers wait for it (see `merge`): what bounds the runs a lookup goes through.
    fn backlog(self) -> usize {
        match self {
            Lane::Small => 4 * FANOUT,
            Lane::Big => 3 * FANOUT,
        }
    }
}

/// The first group of consecutive runs at one level (of `lane`'s levels; `None`: any) that
/// holds at least [`FANOUT`] runs, as a range of `runs`.
pub(crate) fn pick(runs: &[Arc<Run>], lane: Option<Lane>) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < runs.len() {
        let level = runs[i].level;
        let j = i + runs[i..].iter().take_while(|r| r.level == level).count();
        if j - i >= FANOUT && lane.is_none_or(|l| l.takes(level)) {
            return Some((i, j));
        }
        i = j;
    }
    None
}

/// Whether some level of `lane` holds more runs than its backlog allows.
pub(crate) fn crowded(runs: &[Arc<Run>], lane: Lane) -> bool {
    let mut per_level = [0usize; 32];
    for r in runs {
        if lane.takes(r.level) {
            per_level[(r.level as usize).min(31)] += 1;
        }
    }
    per_level.iter().any(|&n| n > lane.backlog())
}

/// A merge's read position in one input run.
struct Cursor {
    run: Arc<Run>,
    next_page: u32,
    page: Option<Arc<RunPage>>,
    at: usize,
}

impl Cursor {
    fn new(run: Arc<Run>) -> Self {
        Self {
            run,
            next_page: 0,
            page: None,
            at: 0,
        }
    }

    fn peek(&mut self, ix: &Index, gen: u32) -> Result<Option<[u8; 16]>, EngineError> {
        loop {
            if let Some(p) = &self.page {
                if let Some(e) = p.entries.get(self.at) {
                    return Ok(Some(e.0));
                }
            }
            if self.next_page >= self.run.pages() {
                return Ok(None);
            }
            let p = ix.run_pages(gen, &self.run, &[self.next_page], false)?;
            self.page = p.into_iter().next();
            self.next_page += 1;
            self.at = 0;
        }
    }

    /// The entry `peek` saw.
    fn take(&mut self) -> PosEntry {
        let e = self
            .page
            .as_ref()
            .and_then(|p| p.entries.get(self.at).copied())
            .unwrap_or(([0; 16], TOMB.0, TOMB.1));
        self.at += 1;
        e
    }
}

/// Write `entries` (any order, one per locator) as runs of at most `per_run` entries each
/// (training and upgrades): sorted in memory one run at a time, pages stored in bounded
/// batches. Returns the runs in state-record order; their headers are in the last batch
/// returned, which the caller stores with the state record that lists them.
pub(crate) struct BulkRuns<'a> {
    index: IndexId,
    keys: &'a IndexKeys,
    sink: Sink<'a>,
    gen: u32,
    buf: Vec<PosEntry>,
    per_run: usize,
    runs: Vec<Arc<Run>>,
    tail: WriteBatch,
    tail_bytes: usize,
}

impl<'a> BulkRuns<'a> {
    pub(crate) fn new(
        index: IndexId,
        keys: &'a IndexKeys,
        sink: Sink<'a>,
        gen: u32,
        per_run: usize,
    ) -> Self {
        Self {
            index,
            keys,
            sink,
            gen,
            buf: Vec::new(),
            per_run: per_run.max(1),
            runs: Vec::new(),
            tail: WriteBatch::new(),
            tail_bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, e: PosEntry) -> Result<(), EngineError> {
        self.buf.push(e);
        if self.buf.len() >= self.per_run {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.par_sort_unstable_by_key(|e| e.0);
        buf.dedup_by(|a, b| a.0 == b.0);
        let level = level_for(buf.len() as u64);
        let mut w = RunWriter::new(self.index, self.keys, self.gen, buf.len());
        for e in buf {
            w.push(e);
            if let Some(b) = w.take_full() {
                self.sink.write(b)?;
            }
        }
        let (run, batch, bytes) = w.finish_sized(level);
        self.tail.extend(batch);
        self.tail_bytes += bytes;
        if self.tail_bytes >= WRITE_CHUNK_BYTES {
            // Headers of runs no state lists yet: as harmless to store now as their pages.
            self.sink.write(std::mem::take(&mut self.tail))?;
            self.tail_bytes = 0;
        }
        self.runs.extend(run);
        Ok(())
    }

    /// Flush the last run; the runs in state-record order (level ascending).
    pub(crate) fn finish(mut self) -> Result<(Vec<Arc<Run>>, WriteBatch), EngineError> {
        self.flush()?;
        let mut runs = std::mem::take(&mut self.runs);
        runs.sort_by_key(|r| r.level);
        Ok((runs, std::mem::take(&mut self.tail)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_headers_roundtrip_and_reject_disorder() {
        let e = |b: u8, l: u32| ([b; 16], l, l + 1);
        let entries = vec![e(1, 0), e(2, 5), e(9, u32::MAX - 1)];
        let p = decode_page(&encode_page(&entries)).unwrap();
        assert_eq!(p.entries, entries);
        assert_eq!(p.find(&[2; 16]), Some((5, 6)));
        assert_eq!(p.find(&[3; 16]), None);
        assert!(decode_page(&encode_page(&[e(2, 0), e(1, 0)])).is_err());
        assert!(decode_page(&encode_page(&[])).is_err());
        let mut bad = encode_page(&entries);
        bad.pop();
        assert!(decode_page(&bad).is_err());
        let (n, f) = decode_header(&encode_header(7, &[[1; 16], [4; 16]])).unwrap();
        assert_eq!((n, f), (7, vec![[1; 16], [4; 16]]));
        assert!(decode_header(&encode_header(7, &[[4; 16], [1; 16]])).is_err());
    }

    #[test]
    fn levels_grow_by_the_fanout() {
        assert_eq!(level_for(1), 0);
        assert_eq!(level_for(1024), 0);
        assert_eq!(level_for(1025), 1);
        assert_eq!(level_for(8192), 1);
        assert_eq!(level_for(8193), 2);
        assert_eq!(level_for(10_000_000), 5);
    }

    #[test]
    fn run_list_changes_keep_their_place() {
        let run = |id: u64, level: u8| {
            Arc::new(Run {
                id,
                level,
                entries: 1,
                fences: vec![[0; 16]],
                filter: Mutex::new(None),
            })
        };
        let runs = vec![run(1, 0), run(2, 0), run(3, 1), run(4, 2)];
        let merged = apply_runs(
            &runs,
            &RunChange {
                added: vec![run(9, 1)],
                removed: vec![1, 2],
            },
        );
        let ids: Vec<u64> = merged.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![9, 3, 4]);
        let added = apply_runs(
            &runs,
            &RunChange {
                added: vec![run(7, 0)],
                removed: vec![],
            },
        );
        assert_eq!(added[0].id, 7);
        assert_eq!(added.len(), 5);
    }
}
