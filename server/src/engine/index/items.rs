//! Items by id: rows through position records, contents, get, list_ids.

use super::*;

impl Index {
    /// Rows of `ids` as the view `d` has them: `(block, position)` per id, `None` for ids
    /// not in the index.
    pub(super) fn rows_of(
        &self,
        d: &Data,
        ids: &[&str],
        keep: bool,
    ) -> Result<Vec<Row>, EngineError> {
        let at = self.positions(d, &self.locators(ids))?;
        let refs: Vec<(u32, u32)> = at.iter().flatten().copied().collect();
        let have = self.fetch(d, &refs, keep)?;
        ids.iter()
            .zip(at)
            .map(|(id, at)| {
                let Some(lb) = at else { return Ok(None) };
                let blk = have.get(&lb).ok_or_else(|| self.misplaced(id))?;
                let pos = blk.position(id).ok_or_else(|| self.misplaced(id))?;
                Ok(Some((blk.clone(), pos)))
            })
            .collect()
    }

    /// Read the contents of items (empty string when none was stored) whose rows gave
    /// `epochs`. Each item record must be at the epoch its row records; a writer may have
    /// replaced it since the rows were read, so a mismatch is looked at again after the
    /// writer lets go before it counts as an integrity failure.
    pub(super) fn contents_of(
        &self,
        ids: &[&str],
        epochs: &[u64],
    ) -> Result<Vec<String>, EngineError> {
        let keys: Vec<Vec<u8>> = self
            .locators(ids)
            .iter()
            .map(|l| fmt::item_key(&self.id, l))
            .collect();
        let read = |epochs: &[u64], which: &[usize]| -> Result<Vec<Option<String>>, EngineError> {
            let wanted: Vec<Vec<u8>> = which
                .iter()
                .filter(|&&i| epochs[i] != 0)
                .map(|&i| keys[i].clone())
                .collect();
            let mut values = self.store.get_many(&wanted)?.into_iter();
            which
                .iter()
                .map(|&i| {
                    if epochs[i] == 0 {
                        return Ok(Some(String::new()));
                    }
                    let Some(sealed) = values.next().flatten() else {
                        return Ok(None);
                    };
                    let Ok(plain) = self.keys.open(&fmt::aad_at(&keys[i], epochs[i]), &sealed)
                    else {
                        return Ok(None);
                    };
                    let mut r = Reader::new(&plain, "item record");
                    r.u8()?;
                    r.bytes()?;
                    Ok(Some(r.str()?.to_owned()))
                })
                .collect()
        };
        let all: Vec<usize> = (0..ids.len()).collect();
        let first = read(epochs, &all)?;
        let mut retry: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| first[i].is_none())
            .collect();
        let mut out: Vec<Option<String>> = first;
        // The rows' epochs were read before this call: a mismatch may be a write that landed
        // since. Read those items' rows again, then their records; from then on a mismatch
        // counts only if no write was in flight meanwhile.
        let mut tries = 0;
        while !retry.is_empty() {
            let s0 = self.write_seq.load(Ordering::SeqCst);
            let again: Vec<&str> = retry.iter().map(|&i| ids[i]).collect();
            let rows = self.consistent(|d| self.rows_of(d, &again, true))?;
            let mut now = vec![0u64; ids.len()];
            for (&i, row) in retry.iter().zip(&rows) {
                now[i] = row.as_ref().map_or(0, |(b, p)| b.cepochs[*p]);
            }
            let second = read(&now, &retry)?;
            let mut still = Vec::new();
            for (&i, v) in retry.iter().zip(second) {
                match v {
                    Some(v) => out[i] = Some(v),
                    None => still.push(i),
                }
            }
            if let Some(&i) = still.first() {
                if tries >= RACE_RETRIES || !self.raced(s0) {
                    return Err(EngineError::Integrity {
                        index: self.name.clone(),
                        what: format!(
                            "the contents record of item '{}' is missing or not at its epoch (deleted, altered or rolled back)",
                            ids[i]
                        ),
                    });
                }
                tries += 1;
                self.wait_for_writer();
            }
            retry = still;
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Fetch items by id, in request order; unknown ids are omitted.
    pub fn get(&self, ids: &[String], include: Include) -> Result<Vec<Fetched>, EngineError> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        // A chunk of ids at a time, so a large get holds a bounded number of blocks.
        let mut out = self.consistent(|d| {
            let dim = d.dimension as usize;
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(READ_CHUNK_BLOCKS) {
                let rows = self.rows_of(d, chunk, true)?;
                out.extend(chunk.iter().zip(rows).filter_map(|(id, row)| {
                    let (blk, pos) = row?;
                    Some(Fetched {
                        id: (*id).to_owned(),
                        metadata: include.metadata.then(|| {
                            blk.meta[pos]
                                .clone()
                                .unwrap_or_else(|| Arc::new(Value::Object(Default::default())))
                        }),
                        vector: include.vector.then(|| blk.vector(pos, dim).into_owned()),
                        contents: None,
                        cepoch: blk.cepochs[pos],
                    })
                }));
            }
            Ok(out)
        })?;
        if include.contents && !out.is_empty() {
            let ids: Vec<&str> = out.iter().map(|f| f.id.as_str()).collect();
            let epochs: Vec<u64> = out.iter().map(|f| f.cepoch).collect();
            let contents = self.contents_of(&ids, &epochs)?;
            for (f, c) in out.iter_mut().zip(contents) {
                f.contents = Some(c);
            }
        }
        Ok(out)
    }

    /// Every id. Reads every block (through the cache, without filling it).
    pub fn list_ids(&self) -> Result<Vec<String>, EngineError> {
        self.consistent(|d| {
            let mut ids = Vec::with_capacity(d.count());
            let all: Vec<usize> = (0..d.lists.len()).collect();
            self.for_chunks(d, &Self::list_refs(d, &all), false, |runs| {
                for (_, run) in runs {
                    for (_, blk) in run {
                        ids.extend(blk.ids.iter().cloned());
                    }
                }
                Ok(())
            })?;
            Ok(ids)
        })
    }

    /// A metadata-only query (no vector): the ids of the items `filter` matches, at most
    /// `top_k` (`None` = all, refused past `max_results`). With `order`, `(field,
    /// descending)`, they are sorted by that field's value: numbers before strings, items
    /// without a scalar value there last in either direction, ties by id (as the original
    /// orders them); without, in storage order (candidate order when the value index
    /// answers). When the value index can narrow the filter down (an indexed `$eq` or `$in`),
    /// only the candidates' blocks are read; otherwise every block once, through bounded
    /// read chunks that do not fill the cache.
    pub fn query_metadata(
        &self,
        filter: Option<&Filter>,
        order: Option<(&str, bool)>,
        top_k: Option<usize>,
        max_results: usize,
    ) -> Result<Vec<String>, EngineError> {
        #[derive(PartialEq, PartialOrd)]
        enum Key {
            Num(f64),
            Str(String),
        }
        let too_many = || {
            EngineError::Invalid(format!(
                "more than {max_results} items match; give top_k (or raise --max-query-results)"
            ))
        };
        let descending = order.is_some_and(|o| o.1);
        let cmp = |(ka, ia): &(Option<Key>, String), (kb, ib): &(Option<Key>, String)| {
            use std::cmp::Ordering;
            let by_key = match (ka, kb) {
                (Some(a), Some(b)) => {
                    let o = a.partial_cmp(b).unwrap_or(Ordering::Equal);
                    if descending {
                        o.reverse()
                    } else {
                        o
                    }
                }
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            by_key.then_with(|| ia.cmp(ib))
        };
        let candidates = match filter {
            Some(f) => self.filter_candidates(f)?,
            None => None,
        };
        self.consistent(|d| {
            let mut hits: Vec<(Option<Key>, String)> = Vec::new();
            let early = order.is_none().then_some(top_k).flatten();
            // One item: keep it if it matches; `Ok(true)` when no more are wanted.
            let mut consider = |id: &str, meta: Option<&Value>| -> Result<bool, EngineError> {
                if filter.is_some_and(|f| !f.matches(meta)) {
                    return Ok(false);
                }
                let key = order.and_then(|(field, _)| {
                    match super::super::filter::value_at(meta, field)? {
                        Value::Number(n) => n.as_f64().map(Key::Num),
                        Value::String(s) => Some(Key::Str(s.clone())),
                        _ => None,
                    }
                });
                hits.push((key, id.to_owned()));
                if early.is_some_and(|k| hits.len() >= k) {
                    return Ok(true);
                }
                match (top_k, order) {
                    (None, _) if hits.len() > max_results => return Err(too_many()),
                    // Ordered with a cap: keep the best `k` once twice as many are held, so
                    // memory stays O(k).
                    (Some(k), Some(_)) if hits.len() >= (2 * k).max(1024) => {
                        hits.select_nth_unstable_by(k, &cmp);
                        hits.truncate(k);
                    }
                    _ => {}
                }
                Ok(false)
            };
            if let Some(ids) = &candidates {
                'chunks: for chunk in ids.chunks(READ_CHUNK_BLOCKS) {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    for (id, row) in refs.iter().zip(self.rows_of(d, &refs, false)?) {
                        let Some((blk, pos)) = row else { continue };
                        if consider(id, blk.meta[pos].as_deref())? {
                            break 'chunks;
                        }
                    }
                }
            } else {
                let all: Vec<usize> = (0..d.lists.len()).collect();
                let full = std::cell::Cell::new(false);
                self.for_chunks(d, &Self::list_refs(d, &all), false, |runs| {
                    if full.get() {
                        return Ok(());
                    }
                    for (_, run) in runs {
                        for (_, blk) in run {
                            for (pos, id) in blk.ids.iter().enumerate() {
                                if consider(id, blk.meta[pos].as_deref())? {
                                    full.set(true);
                                    return Ok(());
                                }
                            }
                        }
                    }
                    Ok(())
                })?;
            }
            if order.is_some() {
                hits.sort_by(&cmp);
            }
            if let Some(k) = top_k {
                hits.truncate(k);
            }
            Ok(hits.into_iter().map(|(_, id)| id).collect())
        })
    }
}
