//! Opening an index: the state record, the manifest pages, the run headers, centroids and
//! quantisers (no block is read), and the in-place upgrades of indexes written in older
//! layouts (v3: no manifest pages; v3 and v4: a position record per item instead of runs).

use super::*;

impl Index {
    /// Load the resident part of an index (state record, centroids, quantisers): no block
    /// is read. The meta record must be the one the state record vouches for; every block is
    /// checked against the manifest's epoch when it is read.
    pub(crate) fn load_data(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        angular: bool,
        precision: Precision,
        meta_digest: [u8; 32],
    ) -> Result<Data, EngineError> {
        let integrity = |what: String| EngineError::Integrity {
            index: name.to_owned(),
            what,
        };
        let sk = fmt::state_key(id);
        let sealed = store
            .get(&sk)?
            .ok_or_else(|| integrity("the state record is missing".into()))?;
        let decoded = State::decode(
            &keys
                .open(&fmt::aad(&sk), &sealed)
                .map_err(|_| integrity("the state record failed authentication".into()))?,
        )?;
        let mut st = decoded.state;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &st.meta_digest[..],
            &meta_digest[..],
        )) {
            return Err(integrity(
                "the meta record is not the one the state record vouches for (replaced or rolled back)".into(),
            ));
        }
        if decoded.legacy_positions && decoded.legacy_manifest.is_none() {
            st = Self::upgrade_v4(store, name, id, keys, st)?;
        }
        let manifest: Vec<state::Entry> = match decoded.legacy_manifest {
            Some(legacy) => {
                let (upgraded, manifest) =
                    Self::upgrade_v3(store, name, id, keys, angular, st, &legacy)?;
                st = upgraded;
                manifest
            }
            None => {
                let pkeys: Vec<Vec<u8>> = st
                    .pages
                    .iter()
                    .map(|&(lg, bg, _)| fmt::page_key(id, st.gen, lg, bg))
                    .collect();
                let values = store.get_many(&pkeys)?;
                let mut all = Vec::new();
                for ((&(lg, bg, e), k), v) in st.pages.iter().zip(&pkeys).zip(values) {
                    let v =
                        v.ok_or_else(|| integrity(format!("manifest page {lg}/{bg} is missing")))?;
                    let plain = keys.open(&fmt::aad_at(k, e), &v).map_err(|_| {
                        integrity(format!(
                            "manifest page {lg}/{bg} failed authentication at epoch {e} (altered, swapped or rolled back)"
                        ))
                    })?;
                    all.extend(state::decode_page(&plain, (lg, bg))?);
                }
                all
            }
        };
        let n_lists = st.n_lists.max(1) as usize;
        let mut data = Data {
            dimension: st.dimension,
            gen: st.gen,
            trained: st.trained,
            default_probes: st.default_probes,
            epoch: st.epoch,
            meta_digest,
            lists: vec![ListDir::default(); n_lists],
            ..Data::default()
        };
        let dim = st.dimension as usize;
        // A record of one generation, sealed under its own key.
        let open = |key: Vec<u8>, what: &str| -> Result<Vec<u8>, EngineError> {
            let sealed = store
                .get(&key)?
                .ok_or_else(|| integrity(format!("the {what} record is missing")))?;
            keys.open(&fmt::aad(&key), &sealed)
                .map_err(|_| integrity(format!("the {what} record failed authentication")))
        };
        if st.trained {
            let raw = open(fmt::centroids_key(id, st.gen), "centroids")?;
            data.centroids = Precision::F32.decode(&raw, n_lists, dim)?;
            if wants_quant(true, st.default_probes, n_lists, precision) {
                let raw = open(fmt::quant_key(id, st.gen), "quantiser")?;
                let (quants, version) = decode_quants(&raw, n_lists, dim)?;
                for (l, q) in quants.into_iter().enumerate() {
                    data.lists[l].quant = q.map(Arc::new);
                }
                // Version 3: the generation's blocks were written split.
                data.split_rows = version == QUANTS_SPLIT;
            } else if let Some(sealed) = store.get(&fmt::coarse_key(id, st.gen))? {
                // A generation trained with the 4-bit first pass (see `coarse`).
                let raw = keys
                    .open(&fmt::aad(&fmt::coarse_key(id, st.gen)), &sealed)
                    .map_err(|_| {
                        integrity("the coarse quantiser record failed authentication".into())
                    })?;
                let (quants, version) = decode_quants(&raw, n_lists, dim)?;
                for (l, q) in quants.into_iter().enumerate() {
                    data.lists[l].coarse = q.map(Arc::new);
                }
                // Version 2: every block of the generation has a codes record; 3: and the
                // blocks were written split.
                data.codes_stored = version >= QUANTS_WITH_CODES;
                data.split_rows = version == QUANTS_SPLIT;
            }
        }
        data.pages = st.pages.iter().map(|&(lg, bg, e)| ((lg, bg), e)).collect();
        data.runs = Self::load_runs(store, name, id, keys, st.gen, &st.runs)?;
        for &(l, b, epoch, rows) in &manifest {
            let pl = data.lists.get_mut(l as usize).ok_or_else(|| {
                EngineError::Corrupt("manifest names a list that does not exist".into())
            })?;
            if rows == 0 || pl.blocks.insert(b, BlockMeta::new(epoch, rows)).is_some() {
                return Err(EngineError::Corrupt(format!(
                    "manifest entry {l}/{b} is empty or repeated"
                )));
            }
            data.count += rows as usize;
        }
        Ok(data)
    }

    /// Upgrade an index written before manifest pages (state record v3): read every block
    /// once (each checked at its manifest epoch), write the position runs of its items in
    /// bounded batches, then the manifest pages and the state record v5. A crash in between
    /// leaves the v3 state in charge, and the next open starts over.
    pub(super) fn upgrade_v3(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        angular: bool,
        mut st: State,
        legacy: &[(u32, u32, u64)],
    ) -> Result<(State, Vec<state::Entry>), EngineError> {
        let n_lists = st.n_lists.max(1) as usize;
        let dim = st.dimension as usize;
        // (State v3 predates the tq precisions.)
        let quant = wants_quant(st.trained, st.default_probes, n_lists, Precision::F32);
        let mut bounds = vec![distance::QuantBounds::new(dim); if quant { n_lists } else { 0 }];
        tracing::info!(index = %name, blocks = legacy.len(), "upgrading the index to position records and manifest pages");
        let per_read = (64usize << 20) / BLOCK_BYTES;
        let mut manifest = Vec::with_capacity(legacy.len());
        let mut bulk =
            runs::BulkRuns::new(*id, keys, Sink::Store(store), st.gen, UPGRADE_RUN_ENTRIES);
        store.write({
            let mut b = WriteBatch::new();
            b.delete_prefix(fmt::run_gen_prefix(id, st.gen));
            b
        })?;
        for chunk in legacy.chunks(per_read) {
            let bkeys: Vec<Vec<u8>> = chunk
                .iter()
                .map(|&(l, b, _)| fmt::block_key(id, st.gen, l, b))
                .collect();
            let values = store.get_many(&bkeys)?;
            type Done = ((u32, u32, u64, u32), Vec<runs::PosEntry>, Block);
            let done: Vec<Done> = chunk
                .par_iter()
                .zip(bkeys.par_iter().zip(values.into_par_iter()))
                .map(|(&(l, b, e), (k, v))| {
                    let fail = |what: &str| EngineError::Integrity {
                        index: name.to_owned(),
                        what: format!("block {l}/{b} {what}"),
                    };
                    let v = v.ok_or_else(|| fail("is missing"))?;
                    let plain = super::segments::open_block(keys, k, e, &v)
                        .map_err(|_| fail("failed authentication"))?;
                    let (blk, _) = Block::decode(&plain)?;
                    let pos = blk
                        .ids
                        .iter()
                        .map(|item| (keys.id_locator(item), l, b))
                        .collect();
                    Ok(((l, b, e, blk.len() as u32), pos, blk))
                })
                .collect::<Result<_, EngineError>>()?;
            for (entry, pos, blk) in done {
                if let Some(qb) = bounds.get_mut(entry.0 as usize) {
                    for row in block::quant_rows(&blk, dim, angular).chunks_exact(dim.max(1)) {
                        qb.add(row);
                    }
                }
                if entry.3 > 0 {
                    manifest.push(entry);
                }
                for e in pos {
                    bulk.push(e)?;
                }
            }
        }
        let sk = fmt::state_key(id);
        let (new_runs, mut batch) = bulk.finish()?;
        st.runs = state::run_list(&new_runs);
        st.pages = state::put_all_pages(id, keys, st.gen, st.epoch, &manifest, &mut batch);
        if quant {
            let qs: Vec<Option<Quant>> = bounds
                .into_iter()
                .map(distance::QuantBounds::finish)
                .collect();
            let qk = fmt::quant_key(id, st.gen);
            batch.put(
                qk.clone(),
                keys.seal(&fmt::aad(&qk), &encode_quants(&qs, dim, 1)),
            );
        }
        batch.put(sk.clone(), keys.seal(&fmt::aad(&sk), &st.encode()));
        store.write(batch)?;
        Ok((st, manifest))
    }

    /// Upgrade an index that keeps a position record per item (state record v4): read the
    /// records in key order (1/256 of the key space per scan, each record checked), write
    /// them as one run, then the state record v5 that lists it and drops the records. A
    /// crash in between leaves the v4 state in charge, and the next open starts over.
    pub(super) fn upgrade_v4(
        store: &dyn IndexStore,
        name: &str,
        id: &IndexId,
        keys: &IndexKeys,
        mut st: State,
    ) -> Result<State, EngineError> {
        tracing::info!(index = %name, "upgrading the index's position records to position runs");
        let prefix = fmt::pos_gen_prefix(id, st.gen);
        store.write({
            let mut b = WriteBatch::new();
            b.delete_prefix(fmt::run_gen_prefix(id, st.gen));
            b
        })?;
        // Count the records first (keys only, 1/256 at a time), to size the run's filter.
        let mut expected = 0usize;
        for byte in 0..=255u8 {
            let mut p = prefix.clone();
            p.push(byte);
            expected += store.scan_keys(&p)?.len();
        }
        let mut w = runs::RunWriter::new(*id, keys, st.gen, expected);
        for byte in 0..=255u8 {
            let mut p = prefix.clone();
            p.push(byte);
            for (k, v) in store.scan_prefix(&p)? {
                let loc: [u8; 16] = k
                    .get(prefix.len()..)
                    .and_then(|l| l.try_into().ok())
                    .ok_or_else(|| {
                        EngineError::Corrupt("a position record key is malformed".into())
                    })?;
                let (l, b) =
                    keys.open_position(&loc, st.gen, &v)
                        .map_err(|_| EngineError::Integrity {
                            index: name.to_owned(),
                            what: "a position record failed authentication".into(),
                        })?;
                w.push((loc, l, b));
                if let Some(batch) = w.take_full() {
                    store.write(batch)?;
                }
            }
        }
        let level = runs::level_for(w.len());
        let (run, mut batch) = w.finish(level);
        st.runs = run
            .as_deref()
            .map_or_else(Vec::new, |r| vec![(r.id, r.level, r.entries, r.pages())]);
        batch.delete_prefix(prefix);
        let sk = fmt::state_key(id);
        batch.put(sk.clone(), keys.seal(&fmt::aad(&sk), &st.encode()));
        store.write(batch)?;
        Ok(st)
    }
}

/// Positions sorted in memory per run while an upgrade rewrites them (24 MiB).
const UPGRADE_RUN_ENTRIES: usize = 1 << 20;

/// Plaintext of the quantiser record: per list, a flag, then (when set) the step and the
/// per-dimension minimum (docs/FORMAT.md "Quantiser record").
/// The version of a coarse quantiser record whose generation stores every block's codes
/// (docs/FORMAT.md "Codes record"); version 1 records say nothing of codes.
pub(crate) const QUANTS_WITH_CODES: u8 = 2;

/// The version of a quantiser or coarse quantiser record whose generation was written as
/// split blocks (docs/FORMAT.md "Split block"); a coarse record of this version also says
/// that every block has a codes record.
pub(crate) const QUANTS_SPLIT: u8 = 3;

/// A quantiser record: `version` 1 (or [`QUANTS_SPLIT`]), or [`QUANTS_WITH_CODES`] (or
/// [`QUANTS_SPLIT`]) for a coarse record.
pub(crate) fn encode_quants(lists: &[Option<Quant>], dim: usize, version: u8) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + lists.len() * (5 + dim * 4));
    w.u8(version).u32(lists.len() as u32);
    for q in lists {
        match q {
            None => {
                w.u8(0);
            }
            Some(q) => {
                let (min, step) = q.params();
                w.u8(1).raw(&step.to_le_bytes());
                for x in min {
                    w.raw(&x.to_le_bytes());
                }
            }
        }
    }
    w.0
}

pub(super) fn decode_quants(
    buf: &[u8],
    n_lists: usize,
    dim: usize,
) -> Result<(Vec<Option<Quant>>, u8), EngineError> {
    let bad = || EngineError::Corrupt("bad quantiser record".into());
    let mut r = Reader::new(buf, "quantiser record");
    let version = r.u8()?;
    if !(1..=QUANTS_SPLIT).contains(&version) || r.u32()? as usize != n_lists {
        return Err(bad());
    }
    let f32_at = |r: &mut Reader<'_>| -> Result<f32, EngineError> {
        Ok(f32::from_le_bytes(
            r.take(4)?.try_into().map_err(|_| bad())?,
        ))
    };
    let quants = (0..n_lists)
        .map(|_| match r.u8()? {
            0 => Ok(None),
            1 => {
                let step = f32_at(&mut r)?;
                let min = (0..dim).map(|_| f32_at(&mut r)).collect::<Result<_, _>>()?;
                Quant::from_params(min, step).map(Some).ok_or_else(bad)
            }
            _ => Err(bad()),
        })
        .collect::<Result<_, _>>()?;
    Ok((quants, version))
}
