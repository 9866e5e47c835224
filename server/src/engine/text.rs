//! BM25 full-text search over an index's `full_text` metadata fields: the analyzer, the
//! record encodings of the encrypted inverted index (docs/FORMAT.md "Text index") and the
//! scoring. Store access lives in `index/text.rs`; this module is pure.
//!
//! The analyzer follows the original service's so that the same data ranks the same way
//! (probed on cyborgdb-service 0.18.0): split on every ASCII character that is not a letter
//! or digit (non-ASCII characters belong to words: "straße", "δέλτα" and "日本語" are one
//! term each), lowercase ASCII letters only ("ÉCLAIR" becomes "Éclair", not "éclair"), drop
//! the 33 English stopwords below, stem with Porter2 (Snowball English). Only string values are analysed;
//! numbers, lists and objects in a `full_text` field contribute nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use serde_json::Value;

use super::format::{Reader, Writer};
use super::{Bm25, EngineError};

/// What describe reports as `bm25.analyzer_version`: analyzer generation, stopword list,
/// stemmer. Changes whenever a token could come out differently.
pub const ANALYZER_VERSION: &str = "en/1;sw=english-33;porter2-rust-stemmers-1.2";

/// English stopwords (sorted for the binary search): the classic 33-word list that the
/// original service drops too.
const STOPWORDS: [&str; 33] = [
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
];

/// Longest term kept, in bytes: a longer run of letters is cut there (bounds the work and
/// the record size one pathological value can cause).
pub const MAX_TERM_BYTES: usize = 64;

static STEMMER: LazyLock<rust_stemmers::Stemmer> =
    LazyLock::new(|| rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English));

/// The terms of `text`, in order, repeats kept.
pub fn analyze(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for raw in text.split(|c: char| c.is_ascii() && !c.is_ascii_alphanumeric()) {
        if raw.is_empty() {
            continue;
        }
        let lower = raw.to_ascii_lowercase();
        if STOPWORDS.binary_search(&lower.as_str()).is_ok() {
            continue;
        }
        let mut term = STEMMER.stem(&lower).into_owned();
        if term.len() > MAX_TERM_BYTES {
            let mut cut = MAX_TERM_BYTES;
            while !term.is_char_boundary(cut) {
                cut -= 1;
            }
            term.truncate(cut);
        }
        out.push(term);
    }
    out
}

/// The distinct terms of a query text, in first-seen order.
pub fn query_terms(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    analyze(text)
        .into_iter()
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// One document's view of one field: its length in terms and each term's frequency.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldTerms {
    pub len: u32,
    pub tf: BTreeMap<String, u32>,
}

/// Analyse the value at `field` (a dot path) of `meta`; only a string has terms.
pub fn field_terms(meta: Option<&Value>, field: &str) -> FieldTerms {
    let mut ft = FieldTerms::default();
    if let Some(Value::String(s)) = super::filter::value_at(meta, field) {
        for t in analyze(s) {
            ft.len = ft.len.saturating_add(1);
            *ft.tf.entry(t).or_insert(0) += 1;
        }
    }
    ft
}

/// Documents and total length of one field, over the documents with at least one term
/// there (BM25's N and the numerator of its average length).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FieldStats {
    pub docs: u64,
    pub total_len: u64,
}

/// The text statistics record: the last text write's number and each `full_text` field's
/// statistics, in schema order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TextStats {
    pub seq: u64,
    pub fields: Vec<FieldStats>,
}

impl TextStats {
    /// docs/FORMAT.md "Text index": `u8 1 || u64 seq || u32 n || n x (u64 docs, u64 total)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(13 + 16 * self.fields.len());
        w.u8(1).u64(self.seq).u32(self.fields.len() as u32);
        for f in &self.fields {
            w.u64(f.docs).u64(f.total_len);
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "text statistics");
        if r.u8()? != 1 {
            return Err(EngineError::Corrupt(
                "unknown text statistics version".into(),
            ));
        }
        let seq = r.u64()?;
        let n = r.u32()? as usize;
        if n > r.remaining() / 16 {
            return Err(EngineError::Corrupt(
                "text statistics field count is too large".into(),
            ));
        }
        let fields = (0..n)
            .map(|_| {
                Ok(FieldStats {
                    docs: r.u64()?,
                    total_len: r.u64()?,
                })
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(Self { seq, fields })
    }
}

/// A term's postings in one field, by item id.
pub type PostingList = HashMap<String, Posting, foldhash::fast::RandomState>;

/// One posting: the item's frequency of the term and its length in the field; `tf == 0`
/// in a delta removes the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posting {
    pub tf: u32,
    pub len: u32,
}

/// A postings record: a delta (changes by one text write) or a base (the whole list as of
/// its write; everything older is superseded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Postings {
    pub base: bool,
    /// Sorted by id.
    pub entries: Vec<(String, Posting)>,
}

impl Postings {
    /// docs/FORMAT.md "Text index": `u8 1 || u8 kind || u32 n || n x (bytes id, u32 tf,
    /// u32 len)`.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.entries.iter().map(|(id, _)| 12 + id.len()).sum();
        let mut w = Writer::with_capacity(6 + size);
        w.u8(1)
            .u8(u8::from(self.base))
            .u32(self.entries.len() as u32);
        for (id, p) in &self.entries {
            w.bytes(id.as_bytes()).u32(p.tf).u32(p.len);
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "postings record");
        if r.u8()? != 1 {
            return Err(EngineError::Corrupt("unknown postings version".into()));
        }
        let base = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(EngineError::Corrupt("unknown postings kind".into())),
        };
        let n = r.u32()? as usize;
        if n > r.remaining() / 12 {
            return Err(EngineError::Corrupt("postings count is too large".into()));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.str()?.to_owned();
            entries.push((
                id,
                Posting {
                    tf: r.u32()?,
                    len: r.u32()?,
                },
            ));
        }
        Ok(Self { base, entries })
    }

    /// Apply this record over the list folded so far (records in write order).
    pub fn apply(self, list: &mut PostingList) {
        if self.base {
            list.clear();
        }
        for (id, p) in self.entries {
            if p.tf == 0 {
                list.remove(&id);
            } else {
                list.insert(id, p);
            }
        }
    }
}

/// How the text part of a query searches: its distinct terms, the fields (their number in
/// the statistics, name and weight), and whether a match needs every term.
#[derive(Debug, Clone)]
pub struct TextQuery {
    pub terms: Vec<String>,
    pub fields: Vec<(usize, String, f64)>,
    pub require_all: bool,
}

/// BM25 (the Lucene form of idf, which is never negative) of one field:
/// `idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))`.
pub fn bm25_term(p: &Bm25, stats: FieldStats, df: usize, post: Posting) -> f64 {
    let n = stats.docs as f64;
    let df = df as f64;
    let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
    let avg = if stats.docs == 0 {
        1.0
    } else {
        stats.total_len as f64 / n
    };
    let tf = post.tf as f64;
    let norm = if avg > 0.0 {
        1.0 - p.b + p.b * post.len as f64 / avg
    } else {
        1.0
    };
    idf * tf * (p.k1 + 1.0) / (tf + p.k1 * norm)
}

/// Scores of the documents matching `q`, given each `(term, field)`'s folded postings
/// (`lists[term][field]`, parallel to `q.terms` and `q.fields`): best first, ties by id.
pub fn score(
    p: &Bm25,
    q: &TextQuery,
    stats: &TextStats,
    lists: &[Vec<PostingList>],
) -> Vec<(String, f64)> {
    // Per item: score so far, how many distinct terms matched, the last term that did.
    let mut acc: HashMap<&str, (f64, usize, usize)> = HashMap::new();
    for (ti, per_field) in lists.iter().enumerate() {
        for ((fi, _, w), list) in q.fields.iter().zip(per_field) {
            let fs = stats.fields.get(*fi).copied().unwrap_or_default();
            let df = list.len();
            for (id, post) in list {
                let s = w * bm25_term(p, fs, df, *post);
                let e = acc.entry(id.as_str()).or_insert((0.0, 0, usize::MAX));
                e.0 += s;
                if e.2 != ti {
                    e.1 += 1;
                    e.2 = ti;
                }
            }
        }
    }
    let need = q.terms.len();
    let mut out: Vec<(String, f64)> = acc
        .into_iter()
        .filter(|(_, (_, matched, _))| !q.require_all || *matched == need)
        .map(|(id, (s, _, _))| (id.to_owned(), s))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// Weighted reciprocal rank fusion of a vector ranking and a text ranking (best first
/// each): `alpha / (k + vector rank) + (1 - alpha) / (k + text rank)`, ranks from 1, an
/// item absent from a ranking contributing nothing there; items scoring 0 are dropped.
/// Ties keep the vector ranking's order, then the text ranking's.
pub fn fuse(vector: &[String], text: &[String], alpha: f64, k: f64) -> Vec<(String, f64)> {
    let mut order: Vec<String> = Vec::with_capacity(vector.len() + text.len());
    let mut score: HashMap<&str, f64> = HashMap::new();
    for (list, w) in [(vector, alpha), (text, 1.0 - alpha)] {
        for (r, id) in list.iter().enumerate() {
            let e = score.entry(id.as_str()).or_insert_with(|| {
                order.push(id.clone());
                0.0
            });
            *e += w / (k + (r + 1) as f64);
        }
    }
    let mut out: Vec<(String, f64)> = order
        .iter()
        .map(|id| (id.clone(), score[id.as_str()]))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    // A stable sort: ties stay in first-seen order.
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopwords_are_sorted_for_the_binary_search() {
        assert!(STOPWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn analyzer_lowercases_splits_drops_stopwords_and_stems() {
        assert_eq!(
            analyze("The QUICK brown-fox's running, with 2 Foxes!"),
            ["quick", "brown", "fox", "s", "run", "2", "fox"]
        );
        assert!(analyze("the a of this with no not").is_empty());
        assert_eq!(
            analyze("runner_up ÉCLAIR straße 日本語"),
            ["runner", "up", "Éclair", "straße", "日本語"]
        );
        assert_eq!(query_terms("fox foxes Fox"), ["fox"]);
        let long = "x".repeat(300);
        assert_eq!(analyze(&long)[0].len(), MAX_TERM_BYTES);
    }

    #[test]
    fn only_strings_have_terms() {
        let m = serde_json::json!({"t": "red fox", "n": 5, "l": ["fox"], "o": {"t": "fox"}});
        assert_eq!(field_terms(Some(&m), "t").len, 2);
        assert_eq!(field_terms(Some(&m), "n"), FieldTerms::default());
        assert_eq!(field_terms(Some(&m), "l"), FieldTerms::default());
        assert_eq!(field_terms(Some(&m), "o.t").tf["fox"], 1);
        assert_eq!(field_terms(None, "t"), FieldTerms::default());
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let s = TextStats {
            seq: 9,
            fields: vec![FieldStats {
                docs: 3,
                total_len: 7,
            }],
        };
        assert_eq!(TextStats::decode(&s.encode()).unwrap(), s);
        let p = Postings {
            base: true,
            entries: vec![("a".into(), Posting { tf: 2, len: 5 })],
        };
        assert_eq!(Postings::decode(&p.encode()).unwrap(), p);
        assert!(Postings::decode(&[1, 0, 255, 255, 255, 255]).is_err());
        assert!(Postings::decode(&[1, 7, 0, 0, 0, 0]).is_err());
        assert!(TextStats::decode(&[2]).is_err());
    }

    #[test]
    fn a_base_supersedes_what_came_before_and_tf_zero_removes() {
        let mut list = PostingList::default();
        let one = Posting { tf: 1, len: 1 };
        Postings {
            base: false,
            entries: vec![("a".into(), one), ("b".into(), one)],
        }
        .apply(&mut list);
        Postings {
            base: false,
            entries: vec![("a".into(), Posting { tf: 0, len: 0 })],
        }
        .apply(&mut list);
        assert_eq!(list.keys().collect::<Vec<_>>(), ["b"]);
        Postings {
            base: true,
            entries: vec![("c".into(), one)],
        }
        .apply(&mut list);
        assert_eq!(list.keys().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn bm25_matches_hand_computed_values() {
        // The original's score for a 2-term title "fox fox" among two titled documents of
        // total length 3 (probed on cyborgdb-service 0.18.0): 0.8713850.
        let s = bm25_term(
            &Bm25::default(),
            FieldStats {
                docs: 2,
                total_len: 3,
            },
            1,
            Posting { tf: 2, len: 2 },
        );
        assert!((s - 0.871_385_0).abs() < 1e-6, "{s}");
    }

    #[test]
    fn fusion_weights_ranks_and_drops_zero_scores() {
        let v: Vec<String> = ["a", "z", "b"].map(String::from).to_vec();
        let t: Vec<String> = ["a", "c"].map(String::from).to_vec();
        let f = fuse(&v, &t, 0.5, 60.0);
        assert_eq!(f[0].0, "a");
        assert!((f[0].1 - 1.0 / 61.0).abs() < 1e-12);
        // z (vector rank 2) and c (text rank 2) tie: the vector ranking's comes first.
        assert_eq!(f[1].0, "z");
        assert_eq!(f[2].0, "c");
        let only_text = fuse(&v, &t, 0.0, 60.0);
        assert_eq!(
            only_text.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
    }
}
