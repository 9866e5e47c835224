//! The encrypted inverted index of the `full_text` fields (docs/FORMAT.md "Text index"):
//! the postings changes of a write, BM25 search, and folding a term's deltas into a base.
//!
//! Every text write gets the next sequence number (kept in the sealed statistics record)
//! and adds, for each `(field, term)` whose postings it changes, one small sealed delta under
//! `T || index id || tag || seq`: writes never read or rewrite a term's postings. A search
//! folds a term's records in order. Once a term has more than [`FOLD_AT`] records, the search
//! that read them folds them into one base record at the newest one's number and deletes the
//! older ones (idempotent: two folds of the same records write the same base).

use super::super::text::{
    self as tx, FieldStats, Posting, PostingList, Postings, TextQuery, TextStats,
};
use super::*;

/// Records of one term beyond which a search folds them into a base.
const FOLD_AT: usize = 16;

/// How an item's text changes in a write: its id, metadata before and after (`None` =
/// absent: a new item, or a deleted one).
pub(crate) struct TextChange {
    pub id: String,
    pub old: Option<Arc<Value>>,
    pub new: Option<Arc<Value>>,
}

impl Index {
    /// Whether the index has `full_text` fields (writes then maintain the text index).
    pub(crate) fn has_text(&self) -> bool {
        self.config.metadata_schema.iter().any(|(_, f)| f.full_text)
    }

    /// The text statistics as stored (all zero before the first text write).
    pub(crate) fn text_stats(&self) -> Result<TextStats, EngineError> {
        let key = fmt::text_stats_key(&self.id);
        let n = self.config.text_fields().len();
        let Some(sealed) = self.store.get(&key)? else {
            return Ok(TextStats {
                seq: 0,
                fields: vec![FieldStats::default(); n],
            });
        };
        let plain =
            self.keys
                .open(&fmt::aad(&key), &sealed)
                .map_err(|_| EngineError::Integrity {
                    index: self.name.clone(),
                    what: "the text statistics record does not open (altered or moved)".into(),
                })?;
        let mut s = TextStats::decode(&plain)?;
        s.fields.resize(n, FieldStats::default());
        Ok(s)
    }

    /// Add to `batch` the text index's part of a write: one delta per changed `(field,
    /// term)` and the new statistics. The caller holds the writer lock.
    pub(crate) fn put_text(
        &self,
        batch: &mut WriteBatch,
        changes: &[TextChange],
    ) -> Result<(), EngineError> {
        if changes.is_empty() || !self.has_text() {
            return Ok(());
        }
        let fields = self.config.text_fields();
        let mut stats = self.text_stats()?;
        let seq = stats.seq + 1;
        let mut deltas: BTreeMap<[u8; 16], Vec<(String, Posting)>> = BTreeMap::new();
        let mut changed = false;
        for c in changes {
            for (fi, field) in fields.iter().enumerate() {
                let old = tx::field_terms(c.old.as_deref(), field);
                let new = tx::field_terms(c.new.as_deref(), field);
                if old == new {
                    continue;
                }
                changed = true;
                let fs = &mut stats.fields[fi];
                if old.len > 0 {
                    fs.docs = fs.docs.saturating_sub(1);
                    fs.total_len = fs.total_len.saturating_sub(u64::from(old.len));
                }
                if new.len > 0 {
                    fs.docs += 1;
                    fs.total_len += u64::from(new.len);
                }
                for term in old.tf.keys().filter(|t| !new.tf.contains_key(*t)) {
                    deltas
                        .entry(self.keys.term_tag(field, term))
                        .or_default()
                        .push((c.id.clone(), Posting { tf: 0, len: 0 }));
                }
                for (term, &tf) in &new.tf {
                    deltas
                        .entry(self.keys.term_tag(field, term))
                        .or_default()
                        .push((c.id.clone(), Posting { tf, len: new.len }));
                }
            }
        }
        if !changed {
            return Ok(());
        }
        stats.seq = seq;
        let sealed: Vec<(Vec<u8>, Vec<u8>)> = deltas
            .into_par_iter()
            .map(|(tag, mut entries)| {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let key = fmt::term_key(&self.id, &tag, seq);
                let plain = Postings {
                    base: false,
                    entries,
                }
                .encode();
                let v = self.keys.seal(&fmt::aad(&key), &plain);
                (key, v)
            })
            .collect();
        for (k, v) in sealed {
            batch.put(k, v);
        }
        let key = fmt::text_stats_key(&self.id);
        let v = self.keys.seal(&fmt::aad(&key), &stats.encode());
        batch.put(key, v);
        Ok(())
    }

    /// The folded postings of `tag` as of text write `upto`, and how many records it took.
    fn postings_of(
        &self,
        tag: &[u8; 16],
        upto: u64,
    ) -> Result<(PostingList, Vec<Vec<u8>>), EngineError> {
        let mut list = PostingList::default();
        let mut keys = Vec::new();
        for (k, sealed) in self.store.scan_prefix(&fmt::term_prefix(&self.id, tag))? {
            let seq = k
                .get(k.len().saturating_sub(8)..)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            if seq > upto {
                // Written after the statistics this search read: not part of its snapshot.
                continue;
            }
            let plain =
                self.keys
                    .open(&fmt::aad(&k), &sealed)
                    .map_err(|_| EngineError::Integrity {
                        index: self.name.clone(),
                        what: "a postings record does not open (altered or moved)".into(),
                    })?;
            Postings::decode(&plain)?.apply(&mut list);
            keys.push(k);
        }
        Ok((list, keys))
    }

    /// Every item matching the text query with its BM25 score, best first (ties by id).
    /// Reads each `(term, field)`'s records; folds those past [`FOLD_AT`] afterwards.
    pub fn text_search(&self, q: &TextQuery) -> Result<Vec<(String, f64)>, EngineError> {
        let mut tries = 0;
        loop {
            let s0 = self.write_seq.load(Ordering::SeqCst);
            let stats = self.text_stats()?;
            let mut lists = Vec::with_capacity(q.terms.len());
            let mut to_fold = Vec::new();
            for term in &q.terms {
                let mut per_field = Vec::with_capacity(q.fields.len());
                for (_, field, _) in &q.fields {
                    let tag = self.keys.term_tag(field, term);
                    let (list, keys) = self.postings_of(&tag, stats.seq)?;
                    if keys.len() > FOLD_AT {
                        to_fold.push(tag);
                    }
                    per_field.push(list);
                }
                lists.push(per_field);
            }
            if self.raced(s0) && tries < RACE_RETRIES {
                tries += 1;
                self.wait_for_writer();
                continue;
            }
            let out = tx::score(&self.config.bm25, q, &stats, &lists);
            if !to_fold.is_empty() {
                if let Err(e) = self.fold_terms(&to_fold) {
                    tracing::debug!(index = %self.name, error = %e, "folding postings failed; left for a later search");
                }
            }
            return Ok(out);
        }
    }

    /// Fold each term's records into one base at its newest record's number. Skipped when a
    /// writer holds the index (a later search does it).
    fn fold_terms(&self, tags: &[[u8; 16]]) -> Result<(), EngineError> {
        let Some(_w) = self.writer.try_lock() else {
            return Ok(());
        };
        self.ensure_live()?;
        let mut batch = WriteBatch::new();
        for tag in tags {
            let (list, keys) = self.postings_of(tag, u64::MAX)?;
            let Some(newest) = keys.last().cloned() else {
                continue;
            };
            for k in &keys[..keys.len() - 1] {
                batch.delete(k.clone());
            }
            if list.is_empty() {
                batch.delete(newest);
                continue;
            }
            let mut entries: Vec<(String, Posting)> = list.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let plain = Postings {
                base: true,
                entries,
            }
            .encode();
            let v = self.keys.seal(&fmt::aad(&newest), &plain);
            batch.put(newest, v);
        }
        let _window = self.write_window();
        self.commit(batch)
    }

    /// [`Index::text_search`] narrowed by `filter` and cut at `limit`: candidates are read a
    /// chunk at a time in score order (their metadata is in their blocks) until `limit`
    /// match.
    pub fn text_top(
        &self,
        q: &TextQuery,
        filter: Option<&Filter>,
        limit: Option<usize>,
    ) -> Result<Vec<(String, f64)>, EngineError> {
        let mut all = self.text_search(q)?;
        let Some(f) = filter else {
            if let Some(k) = limit {
                all.truncate(k);
            }
            return Ok(all);
        };
        let mut out = Vec::new();
        for chunk in all.chunks(READ_CHUNK_BLOCKS) {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let rows = self.consistent(|d| self.rows_of(d, &ids, false))?;
            for ((id, score), row) in chunk.iter().zip(rows) {
                let Some((blk, pos)) = row else { continue };
                if f.matches(blk.meta[pos].as_deref()) {
                    out.push((id.clone(), *score));
                    if limit.is_some_and(|k| out.len() >= k) {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }
}
