//! The state record and the manifest pages: the index's mutable facts and the manifest every
//! block of the index is checked against (docs/FORMAT.md "State record", "Manifest page").
//!
//! The manifest is two-level so that a write batch re-seals only what it changes: the state
//! record lists the manifest pages with their epochs, and each page lists the blocks of up to
//! 64 lists × 1024 block numbers with their epochs and row counts.

use super::*;

/// A manifest page covers lists `lg << PAGE_LISTS_SHIFT ..` and block numbers
/// `bg << PAGE_BLOCKS_SHIFT ..`.
pub(crate) const PAGE_LISTS_SHIFT: u32 = 6;
pub(crate) const PAGE_BLOCKS_SHIFT: u32 = 10;

/// `(list group, block group)` of a manifest page.
pub(crate) type PageId = (u32, u32);

/// One manifest entry: `(list, block, epoch, rows)`.
pub(crate) type Entry = (u32, u32, u64, u32);

pub(crate) fn page_of(list: u32, block: u32) -> PageId {
    (list >> PAGE_LISTS_SHIFT, block >> PAGE_BLOCKS_SHIFT)
}

/// The persisted, mutable facts about an index (the sealed state record), including the
/// list of manifest pages every block is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State {
    pub dimension: u32,
    pub gen: u32,
    pub trained: bool,
    pub n_lists: u32,
    /// Default `n_probes` calibrated at training (0 = not calibrated).
    pub default_probes: u32,
    /// Bumped by every write batch of the index.
    pub epoch: u64,
    /// [`super::super::meta::meta_digest`] of the index's meta record.
    pub meta_digest: [u8; 32],
    /// `(list group, block group, epoch)` of every manifest page of generation `gen`, sorted.
    pub pages: Vec<(u32, u32, u64)>,
    /// `(run id, level, entries, pages)` of every live position run of generation `gen`,
    /// newest first.
    pub runs: Vec<(u64, u8, u64, u32)>,
}

/// A decoded state record. Version 3 records carry their one-level manifest (no row
/// counts), which `Index::upgrade_v3` turns into pages; versions 3 and 4 kept positions in
/// one record per item, which the upgrades turn into runs.
pub(crate) struct Decoded {
    pub state: State,
    pub legacy_manifest: Option<Vec<(u32, u32, u64)>>,
    /// Version 4: positions are in per-item records (see `Index::upgrade_v4`).
    pub legacy_positions: bool,
}

impl State {
    /// Plaintext of the sealed state record; see docs/FORMAT.md "State record".
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(68 + self.pages.len() * 16 + self.runs.len() * 21);
        w.u8(5)
            .u32(self.dimension)
            .u32(self.gen)
            .u8(self.trained as u8)
            .u32(self.n_lists)
            .u32(self.default_probes)
            .u64(self.epoch)
            .raw(&self.meta_digest)
            .u32(self.pages.len() as u32);
        for &(lg, bg, e) in &self.pages {
            w.u32(lg).u32(bg).u64(e);
        }
        w.u32(self.runs.len() as u32);
        for &(id, level, entries, pages) in &self.runs {
            w.u64(id).u8(level).u64(entries).u32(pages);
        }
        w.0
    }

    pub(super) fn decode(buf: &[u8]) -> Result<Decoded, EngineError> {
        let mut r = Reader::new(buf, "state record");
        let version = r.u8()?;
        if !(3..=5).contains(&version) {
            return Err(EngineError::Corrupt("unknown state record version".into()));
        }
        let mut st = Self {
            dimension: r.u32()?,
            gen: r.u32()?,
            trained: r.u8()? != 0,
            n_lists: r.u32()?,
            default_probes: r.u32()?,
            epoch: r.u64()?,
            meta_digest: r
                .take(32)?
                .try_into()
                .map_err(|_| EngineError::Corrupt("state record is truncated".into()))?,
            pages: Vec::new(),
            runs: Vec::new(),
        };
        let n = r.u32()? as usize;
        if n > r.remaining() / 16 {
            return Err(EngineError::Corrupt(
                "state record manifest is truncated".into(),
            ));
        }
        let mut triples = Vec::with_capacity(n);
        for _ in 0..n {
            triples.push((r.u32()?, r.u32()?, r.u64()?));
        }
        if version == 3 {
            return Ok(Decoded {
                state: st,
                legacy_manifest: Some(triples),
                legacy_positions: true,
            });
        }
        st.pages = triples;
        if version == 5 {
            let n = r.u32()? as usize;
            if n > r.remaining() / 21 {
                return Err(EngineError::Corrupt(
                    "state record run list is truncated".into(),
                ));
            }
            for _ in 0..n {
                st.runs.push((r.u64()?, r.u8()?, r.u64()?, r.u32()?));
            }
        }
        Ok(Decoded {
            state: st,
            legacy_manifest: None,
            legacy_positions: version == 4,
        })
    }

    #[cfg(test)]
    pub(crate) fn decode_for_test(buf: &[u8]) -> Result<Self, EngineError> {
        Self::decode(buf).map(|d| d.state)
    }

    pub(crate) fn fresh(dimension: u32, meta_digest: [u8; 32]) -> Self {
        Self {
            dimension,
            gen: 0,
            trained: false,
            n_lists: 1,
            default_probes: 0,
            epoch: 0,
            meta_digest,
            pages: Vec::new(),
            runs: Vec::new(),
        }
    }
}

/// Plaintext of a manifest page: `u8 1 || u32 n || n × (u32 list, u32 block, u64 epoch,
/// u32 rows)`, sorted.
pub(crate) fn encode_page(entries: &[Entry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(5 + entries.len() * 20);
    w.u8(1).u32(entries.len() as u32);
    for &(l, b, e, n) in entries {
        w.u32(l).u32(b).u64(e).u32(n);
    }
    w.0
}

pub(crate) fn decode_page(buf: &[u8], page: PageId) -> Result<Vec<Entry>, EngineError> {
    let mut r = Reader::new(buf, "manifest page");
    if r.u8()? != 1 {
        return Err(EngineError::Corrupt("unknown manifest page version".into()));
    }
    let n = r.u32()? as usize;
    if n.checked_mul(20) != Some(r.remaining()) {
        return Err(EngineError::Corrupt(
            "manifest page has the wrong length".into(),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let e = (r.u32()?, r.u32()?, r.u64()?, r.u32()?);
        if page_of(e.0, e.1) != page || e.3 == 0 {
            return Err(EngineError::Corrupt(
                "manifest page holds an entry of another page or an empty block".into(),
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// Manifest pages a batch rewrote (`None` = the page is now empty and deleted), to record in
/// [`Data::pages`] once the batch is stored.
pub(super) type PageChanges = Vec<(PageId, Option<u64>)>;

impl Index {
    /// Put into `batch` the state record of a batch at `epoch` that rewrote the blocks
    /// `touched` (an empty block = deleted), and the manifest pages those blocks fall in;
    /// `runs` is the run list after the batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_state_after(
        &self,
        batch: &mut WriteBatch,
        d: &Data,
        dimension: u32,
        epoch: u64,
        touched: &HashMap<(u32, u32), Block>,
        meta_digest: [u8; 32],
        runs: &[Arc<runs::Run>],
    ) -> PageChanges {
        let pages: std::collections::BTreeSet<PageId> =
            touched.keys().map(|&(l, b)| page_of(l, b)).collect();
        let mut changes = Vec::with_capacity(pages.len());
        for pid in pages {
            let (l0, b0) = (pid.0 << PAGE_LISTS_SHIFT, pid.1 << PAGE_BLOCKS_SHIFT);
            let b1 = b0.saturating_add(1 << PAGE_BLOCKS_SHIFT);
            let mut entries: Vec<Entry> = Vec::new();
            for l in l0..l0.saturating_add(1 << PAGE_LISTS_SHIFT) {
                let Some(pl) = d.lists.get(l as usize) else {
                    break;
                };
                entries.extend(
                    pl.blocks
                        .range(b0..b1)
                        .filter(|(&b, _)| !touched.contains_key(&(l, b)))
                        .map(|(&b, m)| (l, b, m.epoch, m.rows)),
                );
            }
            entries.extend(
                touched
                    .iter()
                    .filter(|(&(l, b), blk)| page_of(l, b) == pid && blk.len() > 0)
                    .map(|(&(l, b), blk)| (l, b, epoch, blk.len() as u32)),
            );
            entries.sort_unstable();
            let key = fmt::page_key(&self.id, d.gen, pid.0, pid.1);
            if entries.is_empty() {
                batch.delete(key);
                changes.push((pid, None));
            } else {
                let sealed = self
                    .keys
                    .seal(&fmt::aad_at(&key, epoch), &encode_page(&entries));
                batch.put(key, sealed);
                changes.push((pid, Some(epoch)));
            }
        }
        let mut pages = d.pages.clone();
        apply_pages(&mut pages, &changes);
        self.put_state(
            batch,
            &State::of(d, dimension, epoch, meta_digest, &pages, runs),
        );
        changes
    }
}

impl State {
    /// The state record of the view `d` at `epoch`, with `dimension`, `meta_digest`, the
    /// page table `pages` and the run list `runs`.
    pub(super) fn of(
        d: &Data,
        dimension: u32,
        epoch: u64,
        meta_digest: [u8; 32],
        pages: &BTreeMap<PageId, u64>,
        runs: &[Arc<runs::Run>],
    ) -> Self {
        Self {
            dimension,
            gen: d.gen,
            trained: d.trained,
            n_lists: d.n_lists() as u32,
            default_probes: d.default_probes,
            epoch,
            meta_digest,
            pages: pages.iter().map(|(&(lg, bg), &e)| (lg, bg, e)).collect(),
            runs: run_list(runs),
        }
    }
}

/// The state record's form of a run list.
pub(super) fn run_list(runs: &[Arc<runs::Run>]) -> Vec<(u64, u8, u64, u32)> {
    runs.iter()
        .map(|r| (r.id, r.level, r.entries, r.pages()))
        .collect()
}

/// Record stored page changes in a page table.
pub(super) fn apply_pages(pages: &mut BTreeMap<PageId, u64>, changes: &[(PageId, Option<u64>)]) {
    for &(pid, e) in changes {
        match e {
            Some(e) => pages.insert(pid, e),
            None => pages.remove(&pid),
        };
    }
}

/// Seal every page of a full manifest (training, upgrade) at `epoch` into `batch`; returns the
/// state record's page list.
pub(super) fn put_all_pages(
    ix_id: &IndexId,
    keys: &IndexKeys,
    gen: u32,
    epoch: u64,
    manifest: &[Entry],
    batch: &mut WriteBatch,
) -> Vec<(u32, u32, u64)> {
    let mut by_page: BTreeMap<PageId, Vec<Entry>> = BTreeMap::new();
    for &e in manifest {
        by_page.entry(page_of(e.0, e.1)).or_default().push(e);
    }
    by_page
        .into_iter()
        .map(|(pid, mut entries)| {
            entries.sort_unstable();
            let key = fmt::page_key(ix_id, gen, pid.0, pid.1);
            batch.put(
                key.clone(),
                keys.seal(&fmt::aad_at(&key, epoch), &encode_page(&entries)),
            );
            (pid.0, pid.1, epoch)
        })
        .collect()
}
