//! Writes: upsert and delete, each one atomic store batch, then installed in the
//! directory and the cache.

use super::*;

impl Index {
    /// Insert or overwrite items. All items are validated first; on any error nothing is
    /// written. Returns the number of vectors the index now holds.
    pub fn upsert(&self, items: Vec<NewItem>) -> Result<usize, EngineError> {
        self.merge_backpressure()?;
        self.retrying(items, |i| i.clone(), |i| self.upsert_once(i))
    }

    fn upsert_once(&self, mut items: Vec<NewItem>) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        if let Some(it) = items.iter().find(|it| has_non_finite(&it.vector)) {
            return Err(EngineError::Invalid(format!(
                "item '{}' has a NaN or infinite component",
                it.id
            )));
        }
        // Stored precision next (in place, across cores): from here on every vector is
        // exactly what a later read will return.
        let precision = self.config.precision;
        if precision != Precision::F32 {
            if let Some(it) = items
                .par_iter_mut()
                .with_min_len(64)
                .map(|it| {
                    precision.round_in_place(&mut it.vector);
                    it
                })
                .find_first(|it| has_non_finite(&it.vector))
            {
                return Err(EngineError::Invalid(match precision {
                    Precision::F16 => format!(
                        "item '{}' has a component beyond float16's range (+-65504)",
                        it.id
                    ),
                    p => format!(
                        "item '{}' cannot be stored at {}: its components are too large",
                        it.id,
                        p.as_str()
                    ),
                }));
            }
        }
        // Later duplicates of an id win, as if the items were upserted one by one.
        let items: Vec<NewItem> = {
            let mut last: HashMap<&str, usize> =
                HashMap::with_capacity_and_hasher(items.len(), Default::default());
            for (i, it) in items.iter().enumerate() {
                last.insert(it.id.as_str(), i);
            }
            let keep: Vec<bool> = items
                .iter()
                .enumerate()
                .map(|(i, it)| last[it.id.as_str()] == i)
                .collect();
            items
                .into_iter()
                .zip(keep)
                .filter_map(|(it, k)| k.then_some(it))
                .collect()
        };
        let plan;
        let mut batch = WriteBatch::new();
        {
            let d = self.data.read();
            let mut dimension = d.dimension;
            for it in &items {
                if it.id.is_empty() {
                    return Err(EngineError::Invalid("item ids must not be empty".into()));
                }
                if dimension == 0 {
                    dimension = it.vector.len() as u32;
                    if dimension == 0 {
                        return Err(EngineError::Invalid(format!(
                            "item '{}' has an empty vector",
                            it.id
                        )));
                    }
                }
                if it.vector.len() != dimension as usize {
                    return Err(EngineError::Invalid(format!(
                        "item '{}' has {} dimensions but index '{}' has {}; nothing was written",
                        it.id,
                        it.vector.len(),
                        self.name,
                        dimension
                    )));
                }
            }
            let dim = dimension as usize;
            let cap = self.cap_of(&d, dim);
            // New blocks are held as reads would hold them (`hold_packed`).
            let held = if self.hold_packed(&d) {
                precision
            } else {
                Precision::F32
            };
            let epoch = d.epoch + 1;
            let ids: Vec<&str> = items.iter().map(|it| it.id.as_str()).collect();
            let locators = self.locators(&ids);
            // Position records are read only for ids the filter cannot rule out.
            let old = {
                let mut filter = self.id_filter.lock();
                if !filter.as_ref().is_some_and(|f| f.has_room(items.len())) {
                    *filter = Some(self.build_filters(&d, d.count() + items.len())?);
                }
                let f = filter.as_ref().expect("built above");
                let maybe: Vec<usize> = (0..locators.len())
                    .filter(|&i| f.may_contain(&locators[i]))
                    .collect();
                let probe: Vec<[u8; 16]> = maybe.iter().map(|&i| locators[i]).collect();
                let found = self.positions(&d, &probe)?;
                let mut old = vec![None; locators.len()];
                for (i, at) in maybe.into_iter().zip(found) {
                    old[i] = at;
                }
                old
            };
            let lists: Vec<u32> = if dimension == d.dimension {
                items
                    .par_iter()
                    .with_min_len(64)
                    .map(|it| self.assign_list(&d, &it.vector))
                    .collect()
            } else {
                vec![0; items.len()]
            };
            // The blocks this batch changes: the old homes of overwritten items, and the last
            // block of every list that receives items.
            let last_block = |l: u32| {
                d.lists
                    .get(l as usize)
                    .and_then(|pl| pl.blocks.keys().next_back().copied())
            };
            let mut needed: Vec<(u32, u32)> = old.iter().flatten().copied().collect();
            let mut seen_lists: HashSet<u32> = HashSet::default();
            for &l in &lists {
                if seen_lists.insert(l) {
                    if let Some(b) = last_block(l) {
                        needed.push((l, b));
                    }
                }
            }
            let have = self.fetch(&d, &needed, true)?;
            let copy = |l: u32, b: u32| {
                have.get(&(l, b))
                    .map(|x| x.clone_with_room(cap.saturating_sub(x.len()), dim))
            };
            let mut touched: HashMap<(u32, u32), Block> = HashMap::default();
            let mut tails: HashMap<u32, u32> = HashMap::default();
            // Item records are sealed across cores after the placement loop.
            let mut contents: Vec<Option<(String, String)>> = Vec::new();
            let mut moved: Vec<runs::PosEntry> = Vec::new();
            let text = self.has_secondary();
            let mut text_changes: Vec<MetaChange> = Vec::new();
            for (i, it) in items.into_iter().enumerate() {
                let mut old_meta = None;
                if let Some((l, b)) = old[i] {
                    let blk = touched
                        .entry((l, b))
                        .or_insert_with(|| copy(l, b).unwrap_or_default());
                    let pos = blk.position(&it.id).ok_or_else(|| self.misplaced(&it.id))?;
                    if text {
                        old_meta = blk.meta[pos].clone();
                    }
                    blk.swap_remove(pos, dim);
                }
                let list = lists[i];
                let tail = *tails
                    .entry(list)
                    .or_insert_with(|| last_block(list).unwrap_or(0));
                let mut bno = tail;
                let full = touched
                    .entry((list, bno))
                    .or_insert_with(|| {
                        copy(list, bno).unwrap_or_else(|| Block::with_capacity(cap, dim, held))
                    })
                    .len()
                    >= cap;
                if full {
                    bno = tail + 1;
                    tails.insert(list, bno);
                }
                let meta = it.metadata.map(|m| Arc::new(Value::Object(m)));
                if text {
                    text_changes.push(MetaChange {
                        id: it.id.clone(),
                        old: old_meta,
                        new: meta.clone(),
                    });
                }
                let has_contents = it.contents.as_deref().is_some_and(|c| !c.is_empty());
                touched
                    .entry((list, bno))
                    .or_insert_with(|| Block::with_capacity(cap, dim, held))
                    .push(
                        it.id.clone(),
                        &it.vector,
                        meta,
                        if has_contents { epoch } else { 0 },
                    );
                match it.contents {
                    Some(c) if !c.is_empty() => {
                        contents.resize(i, None);
                        contents.push(Some((it.id, c)));
                    }
                    // An overwrite without contents drops the old contents; a new item has
                    // no item record to drop.
                    _ if old[i].is_some() => {
                        batch.delete(fmt::item_key(&self.id, &locators[i]));
                    }
                    _ => {}
                }
                if old[i] != Some((list, bno)) {
                    moved.push((locators[i], list, bno));
                }
            }
            let records: Vec<(Vec<u8>, Vec<u8>)> = contents
                .par_iter()
                .enumerate()
                .with_min_len(64)
                .filter_map(|(i, c)| {
                    let (id, c) = c.as_ref()?;
                    let ik = fmt::item_key(&self.id, &locators[i]);
                    let mut w = Writer::with_capacity(8 + id.len() + c.len());
                    w.u8(1).bytes(id.as_bytes()).bytes(c.as_bytes());
                    let sealed = self.keys.seal(&fmt::aad_at(&ik, epoch), &w.0);
                    Some((ik, sealed))
                })
                .collect();
            drop(contents);
            for (k, v) in records {
                batch.put(k, v);
            }
            self.put_secondary(&mut batch, &text_changes)?;
            drop(text_changes);
            let gen = d.gen;
            let sealed: Vec<((u32, u32), Sealed)> = touched
                .par_iter_mut()
                .map(|(&(l, b), blk)| ((l, b), self.seal_touched(&d, l, b, blk, dim, epoch)))
                .collect();
            let mut made = MadeCodes::default();
            for (at, (records, codes)) in sealed {
                for (k, v) in records {
                    match v {
                        Some(v) => batch.put(k, v),
                        None => batch.delete(k),
                    };
                }
                if let Some(c) = codes {
                    made.insert(at, c);
                }
            }
            let run = self.put_run(&mut batch, gen, moved);
            let runs = runs::apply_runs(&d.runs, &run);
            let pages = self.put_state_after(
                &mut batch,
                &d,
                dimension,
                epoch,
                &touched,
                d.meta_digest,
                &runs,
            );
            plan = UpsertPlan {
                touched,
                codes: made,
                pages,
                runs,
                added: locators
                    .iter()
                    .zip(&old)
                    .filter(|(_, o)| o.is_none())
                    .map(|(l, _)| *l)
                    .collect(),
                dimension,
                epoch,
            };
        }
        let _window = self.write_window();
        self.commit(batch)?;
        let mut d = self.data.write();
        d.dimension = plan.dimension;
        d.epoch = plan.epoch;
        d.count += plan.added.len();
        if let Some(f) = self.id_filter.lock().as_mut() {
            for l in &plan.added {
                f.insert(l);
            }
        }
        apply_pages(&mut d.pages, &plan.pages);
        d.runs = plan.runs;
        self.install(&mut d, plan.touched, plan.epoch, plan.codes);
        let count = d.count();
        drop(d);
        drop(_window);
        self.merge_due()?;
        Ok(count)
    }

    /// Record in the directory (and the cache) the blocks a stored batch rewrote.
    /// Install the blocks a stored batch wrote at `epoch` (with the 4-bit codes it made for
    /// them, `made`; others are made here) in the directory and the cache.
    pub(super) fn install(
        &self,
        d: &mut Data,
        touched: HashMap<(u32, u32), Block>,
        epoch: u64,
        mut made: MadeCodes,
    ) {
        let dim = d.dimension as usize;
        let angular = self.config.metric.is_angular();
        let gen = d.gen;
        for ((l, b), blk) in touched {
            if d.lists.len() <= l as usize {
                d.lists.resize(l as usize + 1, ListDir::default());
            }
            let pl = &mut d.lists[l as usize];
            if blk.len() == 0 {
                pl.blocks.remove(&b);
            } else {
                let mut blk = blk;
                blk.epoch = epoch;
                match &pl.quant {
                    Some(q) => code_block(q, &mut blk, dim, angular),
                    None => blk.codes = Vec::new(),
                }
                blk.shrink();
                let meta = BlockMeta::new(epoch, blk.len() as u32);
                let key = BlockKey {
                    index: self.id,
                    gen,
                    list: l,
                    block: b,
                    epoch,
                };
                let blk = Arc::new(blk);
                meta.set_hot(&blk);
                pl.blocks.insert(b, meta);
                if let Some(q) = &pl.coarse {
                    let codes = made
                        .remove(&(l, b))
                        .unwrap_or_else(|| Arc::new(Codes::of(q, &blk, dim, angular)));
                    self.cache.insert_codes(key, codes);
                }
                self.cache.insert(key, blk);
            }
        }
    }

    /// Delete items by id; unknown ids are skipped. Returns how many were deleted.
    pub fn delete_ids(&self, ids: &[String]) -> Result<usize, EngineError> {
        self.merge_backpressure()?;
        self.retrying((), |_| (), |_| self.delete_once(ids))
    }

    fn delete_once(&self, ids: &[String]) -> Result<usize, EngineError> {
        let _w = self.writer.lock();
        self.ensure_live()?;
        let mut batch = WriteBatch::new();
        let mut made = MadeCodes::default();
        let (touched, pages, runs, epoch, removed) = {
            let d = self.data.read();
            let dim = d.dimension as usize;
            let epoch = d.epoch + 1;
            let mut seen = HashSet::default();
            let ids: Vec<&str> = ids
                .iter()
                .map(String::as_str)
                .filter(|id| seen.insert(*id))
                .collect();
            let locators = self.locators(&ids);
            let at = self.positions(&d, &locators)?;
            let mut gone: Vec<runs::PosEntry> = Vec::new();
            let refs: Vec<(u32, u32)> = at.iter().flatten().copied().collect();
            let have = self.fetch(&d, &refs, true)?;
            let mut touched: HashMap<(u32, u32), Block> = HashMap::default();
            let mut removed = 0usize;
            let text = self.has_secondary();
            let mut text_changes: Vec<MetaChange> = Vec::new();
            for ((id, loc), at) in ids.iter().zip(&locators).zip(&at) {
                let Some((l, b)) = *at else { continue };
                let blk = touched.entry((l, b)).or_insert_with(|| {
                    have.get(&(l, b)).map(|x| (**x).clone()).unwrap_or_default()
                });
                let pos = blk.position(id).ok_or_else(|| self.misplaced(id))?;
                if text {
                    text_changes.push(MetaChange {
                        id: (*id).to_owned(),
                        old: blk.meta[pos].clone(),
                        new: None,
                    });
                }
                blk.swap_remove(pos, dim);
                batch.delete(fmt::item_key(&self.id, loc));
                gone.push((*loc, u32::MAX, u32::MAX));
                removed += 1;
            }
            for (&(l, b), blk) in touched.iter_mut() {
                let (records, codes) = self.seal_touched(&d, l, b, blk, dim, epoch);
                for (k, v) in records {
                    match v {
                        Some(v) => batch.put(k, v),
                        None => batch.delete(k),
                    };
                }
                if let Some(c) = codes {
                    made.insert((l, b), c);
                }
            }
            self.put_secondary(&mut batch, &text_changes)?;
            let run = self.put_run(&mut batch, d.gen, gone);
            let runs = runs::apply_runs(&d.runs, &run);
            let pages = self.put_state_after(
                &mut batch,
                &d,
                d.dimension,
                epoch,
                &touched,
                d.meta_digest,
                &runs,
            );
            (touched, pages, runs, epoch, removed)
        };
        if removed == 0 {
            return Ok(0);
        }
        {
            let _window = self.write_window();
            self.commit(batch)?;
            let mut d = self.data.write();
            d.epoch = epoch;
            d.count -= removed;
            apply_pages(&mut d.pages, &pages);
            d.runs = runs;
            self.install(&mut d, touched, epoch, made);
        }
        self.merge_due()?;
        Ok(removed)
    }
}

/// Records a write batch puts (`Some`) or deletes (`None`) for one touched block, and the
/// block's 4-bit codes when its codes record is among them.
type Sealed = (Vec<(Vec<u8>, Option<Vec<u8>>)>, Option<Arc<Codes>>);

/// The 4-bit codes a write batch made for the blocks it sealed, by `(list, block)`.
type MadeCodes = HashMap<(u32, u32), Arc<Codes>>;

impl Index {
    /// The records of block `l/b` after a write at `epoch`: the block sealed again (or
    /// deleted when it has no rows left) and, in a generation that stores codes, its codes
    /// record with it.
    fn seal_touched(
        &self,
        d: &Data,
        l: u32,
        b: u32,
        blk: &mut Block,
        dim: usize,
        epoch: u64,
    ) -> Sealed {
        let mut out = Vec::with_capacity(2);
        let mut made = None;
        // A split block's row records beyond what it holds now are deleted with it.
        let split = self.split(d);
        let rb = self.config.precision.row_bytes(dim);
        let old_rows = d
            .lists
            .get(l as usize)
            .and_then(|pl| pl.blocks.get(&b))
            .map_or(0, |m| m.rows as usize);
        let stale = |from: usize| {
            let to = if split {
                segments::segments_of(old_rows, rb)
            } else {
                0
            };
            (from..to).map(move |s| (fmt::rows_key(&self.id, d.gen, l, b, s as u32), None))
        };
        if blk.len() == 0 {
            out.push((fmt::block_key(&self.id, d.gen, l, b), None));
            if d.codes_stored {
                out.push((fmt::codes_key(&self.id, d.gen, l, b), None));
            }
            out.extend(stale(0));
        } else {
            for (k, v) in self.seal_block(d.gen, l, b, blk, dim, epoch, split) {
                out.push((k, Some(v)));
            }
            out.extend(stale(segments::segments_of(blk.len(), rb)));
            if let Some(((k, v), codes)) = self.codes_record(d, l, b, blk, epoch) {
                out.push((k, Some(v)));
                made = Some(codes);
            }
        }
        (out, made)
    }
}

/// Whether `v` holds a NaN or an infinity (no early exit, so the loop vectorises).
pub(super) fn has_non_finite(v: &[f32]) -> bool {
    v.iter().fold(false, |bad, x| bad | !x.is_finite())
}

pub(super) struct UpsertPlan {
    touched: HashMap<(u32, u32), Block>,
    /// The 4-bit codes made for the blocks sealed (generations that store codes).
    codes: MadeCodes,
    pages: PageChanges,
    /// The run list after the batch.
    runs: Vec<Arc<runs::Run>>,
    /// Locators of the items the batch adds.
    added: Vec<[u8; 16]>,
    dimension: u32,
    epoch: u64,
}
