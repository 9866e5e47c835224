//! The encrypted secondary indexes (docs/FORMAT.md "Text index" and "Value index"): the
//! inverted index of the `full_text` fields (BM25), and the equality index of the fields
//! `metadata_schema` declares filterable, which answers selective filters without reading
//! every block. Here: the postings changes of a write, BM25 search, value lookups, and
//! folding a tag's deltas into a base.
//!
//! Every write that changes either index gets the next sequence number (kept in the sealed
//! statistics record) and adds, for each `(field, term)` or `(field, value)` whose postings
//! it changes, one small sealed delta under `T|V || index id || tag || seq`: writes never
//! read or rewrite a tag's postings. A reader folds a tag's records in order. Once a tag has
//! more than [`FOLD_AT`] records, the reader folds them into one base record at the newest
//! one's number and deletes the older ones (idempotent: two folds of the same records write
//! the same base).

use super::super::text::{
    self as tx, FieldStats, Posting, PostingList, Postings, TextQuery, TextStats,
};
use super::*;

/// Records of one term beyond which a search folds them into a base.
const FOLD_AT: usize = 16;

/// How an item's metadata changes in a write: its id, metadata before and after (`None` =
/// absent: a new item, or a deleted one).
pub(crate) struct MetaChange {
    pub id: String,
    pub old: Option<Arc<Value>>,
    pub new: Option<Arc<Value>>,
}

impl Index {
    /// The fields of the value index: those `metadata_schema` declares filterable (none
    /// for an index created before the value index existed).
    pub(crate) fn value_fields(&self) -> Vec<&str> {
        if !self.config.value_index {
            return Vec::new();
        }
        self.config
            .metadata_schema
            .iter()
            .filter(|(_, f)| f.filterable && !f.full_text)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Whether writes maintain a secondary index (text or values).
    pub(crate) fn has_secondary(&self) -> bool {
        self.config
            .metadata_schema
            .iter()
            .any(|(_, f)| f.full_text || (f.filterable && self.config.value_index))
    }

    /// Open a sealed record of the secondary indexes (AAD: format version and its key).
    fn open_secondary(
        &self,
        key: &[u8],
        sealed: &[u8],
        what: &str,
    ) -> Result<Vec<u8>, EngineError> {
        self.keys
            .open(&fmt::aad(key), sealed)
            .map_err(|_| EngineError::Integrity {
                index: self.name.clone(),
                what: format!("{what} does not open (altered or moved)"),
            })
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
        let plain = self.open_secondary(&key, &sealed, "the text statistics record")?;
        let mut s = TextStats::decode(&plain)?;
        s.fields.resize(n, FieldStats::default());
        Ok(s)
    }

    /// Add to `batch` the secondary indexes' part of a write: one delta per changed `(field,
    /// term)` and `(field, value)`, and the new statistics. The caller holds the writer lock.
    pub(crate) fn put_secondary(
        &self,
        batch: &mut WriteBatch,
        changes: &[MetaChange],
    ) -> Result<(), EngineError> {
        if changes.is_empty() || !self.has_secondary() {
            return Ok(());
        }
        let fields = self.config.text_fields();
        let value_fields = self.value_fields();
        let mut stats = self.text_stats()?;
        let seq = stats.seq + 1;
        let mut deltas: BTreeMap<[u8; 16], Vec<(String, Posting)>> = BTreeMap::new();
        let mut value_deltas: BTreeMap<[u8; 16], Vec<(String, Posting)>> = BTreeMap::new();
        let mut changed = false;
        for c in changes {
            for field in &value_fields {
                let old = super::super::filter::index_values(c.old.as_deref(), field);
                let new = super::super::filter::index_values(c.new.as_deref(), field);
                if old == new {
                    continue;
                }
                changed = true;
                for v in old.difference(&new) {
                    value_deltas
                        .entry(self.keys.value_tag(field, v))
                        .or_default()
                        .push((c.id.clone(), Posting { tf: 0, len: 0 }));
                }
                for v in new.difference(&old) {
                    value_deltas
                        .entry(self.keys.value_tag(field, v))
                        .or_default()
                        .push((c.id.clone(), Posting { tf: 1, len: 0 }));
                }
            }
        }
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
            .into_iter()
            .map(|(t, e)| (fmt::kind::TERM, t, e))
            .chain(
                value_deltas
                    .into_iter()
                    .map(|(t, e)| (fmt::kind::VALUE, t, e)),
            )
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(kind, tag, mut entries)| {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                let key = fmt::tag_key(kind, &self.id, &tag, seq);
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

    /// The folded postings of `tag` (of record kind `kind`) as of write `upto`, and the keys
    /// of the records it took.
    fn postings_of(
        &self,
        kind: u8,
        tag: &[u8; 16],
        upto: u64,
    ) -> Result<(PostingList, Vec<Vec<u8>>), EngineError> {
        let mut list = PostingList::default();
        let mut keys = Vec::new();
        for (k, sealed) in self
            .store
            .scan_prefix(&fmt::tag_prefix(kind, &self.id, tag))?
        {
            let seq = k
                .get(k.len().saturating_sub(8)..)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            if seq > upto {
                // Written after the statistics this search read: not part of its snapshot.
                continue;
            }
            let plain = self.open_secondary(&k, &sealed, "a postings record")?;
            Postings::decode(&plain)?.apply(&mut list);
            keys.push(k);
        }
        Ok((list, keys))
    }

    /// Every item matching the text query with its BM25 score, best first (ties by id).
    /// Reads each `(term, field)`'s records; folds those past [`FOLD_AT`] afterwards.
    pub fn text_search(&self, q: &TextQuery) -> Result<Vec<(String, f64)>, EngineError> {
        self.snapshot(fmt::kind::TERM, |stats, to_fold| {
            let mut lists = Vec::with_capacity(q.terms.len());
            for term in &q.terms {
                let mut per_field = Vec::with_capacity(q.fields.len());
                for (_, field, _) in &q.fields {
                    let tag = self.keys.term_tag(field, term);
                    per_field.push(self.folded(fmt::kind::TERM, tag, stats.seq, to_fold)?);
                }
                lists.push(per_field);
            }
            Ok(tx::score(&self.config.bm25, q, stats, &lists))
        })
    }

    /// One consistent read of a secondary index (records of `kind`): `read` gets the
    /// statistics (their `seq` bounds the snapshot) and collects the tags worth folding. It
    /// runs again if a writer raced it; afterwards those tags are folded, best effort.
    fn snapshot<T>(
        &self,
        kind: u8,
        read: impl Fn(&TextStats, &mut Vec<[u8; 16]>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut tries = 0;
        loop {
            let s0 = self.write_seq.load(Ordering::SeqCst);
            let stats = self.text_stats()?;
            let mut to_fold = Vec::new();
            let out = read(&stats, &mut to_fold)?;
            if self.raced(s0) && tries < RACE_RETRIES {
                tries += 1;
                self.wait_for_writer();
                continue;
            }
            if !to_fold.is_empty() {
                if let Err(e) = self.fold_tags(kind, &to_fold) {
                    tracing::debug!(index = %self.name, error = %e, "folding postings failed; left for a later read");
                }
            }
            return Ok(out);
        }
    }

    /// [`Self::postings_of`] for a reader: notes the tag in `to_fold` when it has more than
    /// [`FOLD_AT`] records.
    fn folded(
        &self,
        kind: u8,
        tag: [u8; 16],
        upto: u64,
        to_fold: &mut Vec<[u8; 16]>,
    ) -> Result<PostingList, EngineError> {
        let (list, keys) = self.postings_of(kind, &tag, upto)?;
        if keys.len() > FOLD_AT {
            to_fold.push(tag);
        }
        Ok(list)
    }

    /// Fold each tag's records into one base at its newest record's number. Skipped when a
    /// writer holds the index (a later reader does it).
    fn fold_tags(&self, kind: u8, tags: &[[u8; 16]]) -> Result<(), EngineError> {
        let Some(_w) = self.writer.try_lock() else {
            return Ok(());
        };
        self.ensure_live()?;
        let mut batch = WriteBatch::new();
        for tag in tags {
            let (list, keys) = self.postings_of(kind, tag, u64::MAX)?;
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

    /// The items that may match `filter` as far as the value index can tell, `None` when
    /// it cannot narrow the filter down (no indexed equality or `$in` in every branch).
    /// A superset: the caller still applies the whole filter to each candidate.
    pub(crate) fn filter_candidates(
        &self,
        filter: &Filter,
    ) -> Result<Option<Vec<String>>, EngineError> {
        let fields = self.value_fields();
        if fields.is_empty() {
            return Ok(None);
        }
        let got = self.snapshot(fmt::kind::VALUE, |stats, to_fold| {
            self.candidates_of(filter, &fields, stats.seq, to_fold)
        })?;
        Ok(got.map(|set| {
            let mut v: Vec<String> = set.into_iter().collect();
            v.sort_unstable();
            v
        }))
    }

    fn candidates_of(
        &self,
        f: &Filter,
        fields: &[&str],
        upto: u64,
        to_fold: &mut Vec<[u8; 16]>,
    ) -> Result<Option<HashSet<String>>, EngineError> {
        match f {
            Filter::Field { path, cond } if fields.contains(&path.as_str()) => {
                let Some(values) = super::super::filter::indexed_operands(cond) else {
                    return Ok(None);
                };
                let mut out = HashSet::default();
                for v in &values {
                    let tag = self.keys.value_tag(path, v);
                    out.extend(
                        self.folded(fmt::kind::VALUE, tag, upto, to_fold)?
                            .into_keys(),
                    );
                }
                Ok(Some(out))
            }
            Filter::All(fs) => {
                // The narrowest branches decide; every usable one narrows further.
                let mut acc: Option<HashSet<String>> = None;
                for sub in fs {
                    if let Some(set) = self.candidates_of(sub, fields, upto, to_fold)? {
                        acc = Some(match acc {
                            None => set,
                            Some(a) => a.intersection(&set).cloned().collect(),
                        });
                    }
                }
                Ok(acc)
            }
            Filter::Any(fs) => {
                let mut out = HashSet::default();
                for sub in fs {
                    match self.candidates_of(sub, fields, upto, to_fold)? {
                        Some(set) => out.extend(set),
                        None => return Ok(None),
                    }
                }
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }
}
