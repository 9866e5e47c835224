//! Per-request bounds on work and memory. Every limit has a flag (and environment variable)
//! that raises or lowers it; a request over a limit is refused with 422 naming the limit and
//! the flag, before any work is done.
//!
//! | limit | default | flag |
//! |---|---|---|
//! | result rows of one query request (`top_k` × query vectors) | 1,000,000 | `--max-query-results` |
//! | ids in one get or delete request | 100,000 | `--max-ids-per-request` |
//! | bytes of one item id | 1,024 | `--max-id-bytes` |
//! | vector dimension | 65,536 | `--max-dimension` |
//! | filter nesting depth / operators and values in one filter | 32 / 10,000 | `--max-filter-depth` / `--max-filter-nodes` |
//! | training `max_iters` / `n_lists` / `batch_size` / `max_memory` (MiB) | 1,000 / 65,536 / 65,536 / 65,536 | `--max-train-iters` / `--max-n-lists` / `--max-train-batch-size` / `--max-train-memory-mb` |
//! | wall time of one training | 3,600 s | `--max-train-seconds` (0 = none) |
//!
//! Request bodies are bounded separately by `--max-body-mb` (413).

use serde_json::Value;

/// The configured limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_query_results: usize,
    pub max_ids_per_request: usize,
    pub max_id_bytes: usize,
    pub max_dimension: usize,
    pub max_filter_depth: usize,
    pub max_filter_nodes: usize,
    pub max_train_iters: usize,
    pub max_n_lists: usize,
    pub max_train_batch_size: usize,
    pub max_train_memory_mb: usize,
    /// Seconds; 0 = no limit.
    pub max_train_seconds: u64,
    /// Vector MiB from which a training gives a generation the 4-bit first pass.
    pub coarse_pass_min_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_query_results: 1_000_000,
            max_ids_per_request: 100_000,
            max_id_bytes: 1024,
            max_dimension: 65_536,
            max_filter_depth: 32,
            max_filter_nodes: 10_000,
            max_train_iters: 1000,
            max_n_lists: 65_536,
            max_train_batch_size: 65_536,
            max_train_memory_mb: 65_536,
            max_train_seconds: 3600,
            coarse_pass_min_mb: 1024,
        }
    }
}

/// A request over a limit; the message names the limit and the flag that changes it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{what} is {got}, over the limit of {limit} (raise it with --{flag} / SEALDB_{env})")]
pub struct OverLimit {
    pub what: String,
    pub got: usize,
    pub limit: usize,
    pub flag: &'static str,
    pub env: String,
}

fn check(
    what: impl Into<String>,
    got: usize,
    limit: usize,
    flag: &'static str,
) -> Result<(), OverLimit> {
    if got <= limit {
        return Ok(());
    }
    Err(OverLimit {
        what: what.into(),
        got,
        limit,
        flag,
        env: flag.replace('-', "_").to_ascii_uppercase(),
    })
}

impl Limits {
    /// `n_queries` query vectors asking `top_k` results each.
    pub fn query(&self, n_queries: usize, top_k: usize) -> Result<(), OverLimit> {
        check(
            format!("top_k ({top_k}) x query vectors ({n_queries})"),
            n_queries.saturating_mul(top_k),
            self.max_query_results,
            "max-query-results",
        )
    }

    /// The ids of a get or delete request.
    pub fn ids(&self, ids: &[String]) -> Result<(), OverLimit> {
        check(
            "the number of ids",
            ids.len(),
            self.max_ids_per_request,
            "max-ids-per-request",
        )?;
        self.id_lengths(ids.iter().map(String::as_str))
    }

    /// Item ids (upsert, get, delete).
    pub fn id_lengths<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Result<(), OverLimit> {
        let longest = ids.into_iter().map(str::len).max().unwrap_or(0);
        check(
            "the longest item id (bytes)",
            longest,
            self.max_id_bytes,
            "max-id-bytes",
        )
    }

    pub fn dimension(&self, dim: usize) -> Result<(), OverLimit> {
        check(
            "the vector dimension",
            dim,
            self.max_dimension,
            "max-dimension",
        )
    }

    /// The shape of a filter document: nesting depth and the number of operators and values.
    pub fn filter(&self, f: &serde_json::Map<String, Value>) -> Result<(), OverLimit> {
        let (depth, nodes) = f
            .values()
            .map(shape)
            .fold((1, 1), |(d, n), (d2, n2)| (d.max(d2 + 1), n + n2));
        check(
            "the filter's nesting depth",
            depth,
            self.max_filter_depth,
            "max-filter-depth",
        )?;
        check(
            "the filter's size (operators and values)",
            nodes,
            self.max_filter_nodes,
            "max-filter-nodes",
        )
    }

    /// Training knobs as the request gives them.
    pub fn train(
        &self,
        max_iters: Option<usize>,
        n_lists: Option<usize>,
        batch_size: Option<usize>,
        max_memory_mb: Option<usize>,
    ) -> Result<(), OverLimit> {
        check(
            "max_iters",
            max_iters.unwrap_or(0),
            self.max_train_iters,
            "max-train-iters",
        )?;
        check(
            "n_lists",
            n_lists.unwrap_or(0),
            self.max_n_lists,
            "max-n-lists",
        )?;
        check(
            "batch_size",
            batch_size.unwrap_or(0),
            self.max_train_batch_size,
            "max-train-batch-size",
        )?;
        check(
            "max_memory (MiB)",
            max_memory_mb.unwrap_or(0),
            self.max_train_memory_mb,
            "max-train-memory-mb",
        )
    }

    /// [`Limits::coarse_pass_min_mb`] in bytes.
    pub fn coarse_min_bytes(&self) -> u64 {
        self.coarse_pass_min_mb.saturating_mul(1 << 20)
    }

    /// How long one training may run.
    pub fn train_time_limit(&self) -> Option<std::time::Duration> {
        (self.max_train_seconds > 0).then(|| std::time::Duration::from_secs(self.max_train_seconds))
    }
}

/// `(depth, nodes)` of a JSON value, without recursion (a hostile document cannot exhaust the
/// stack; serde_json already refuses nesting beyond 128 while parsing).
fn shape(v: &Value) -> (usize, usize) {
    let mut stack = vec![(v, 1usize)];
    let (mut depth, mut nodes) = (0, 0);
    while let Some((v, d)) = stack.pop() {
        nodes += 1;
        depth = depth.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    (depth, nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_name_the_limit_and_the_flag() {
        let l = Limits::default();
        assert!(l.query(1000, 1000).is_ok());
        let e = l.query(20_000, 1000).unwrap_err().to_string();
        assert!(e.contains("20000000"), "{e}");
        assert!(e.contains("--max-query-results"), "{e}");
        assert!(e.contains("SEALDB_MAX_QUERY_RESULTS"), "{e}");
        let e = l
            .train(Some(9_223_372_036_854_775_806), None, None, None)
            .unwrap_err();
        assert_eq!(e.flag, "max-train-iters");
        assert!(l
            .train(Some(1000), Some(65_536), Some(2048), Some(1024))
            .is_ok());
        assert!(l.ids(&["x".repeat(1025)]).is_err());
        assert!(l.ids(&["x".repeat(1024)]).is_ok());
        assert!(l.ids(&vec![String::new(); 100_001]).is_err());
    }

    #[test]
    fn filter_shape_counts_depth_and_nodes() {
        assert_eq!(shape(&json!({"a": 1})), (2, 2));
        assert_eq!(
            shape(&json!({"$and": [{"a": {"$gt": 1}}, {"b": 2}]})),
            (5, 7)
        );
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!({ "$not": deep });
        }
        let l = Limits::default();
        let obj = |v: Value| v.as_object().cloned().unwrap();
        assert!(l.filter(&obj(json!({"a": {"$gt": 1}}))).is_ok());
        assert_eq!(l.filter(&obj(deep)).unwrap_err().flag, "max-filter-depth");
        let wide = json!({"a": {"$in": (0..20_000).collect::<Vec<_>>()}});
        assert_eq!(l.filter(&obj(wide)).unwrap_err().flag, "max-filter-nodes");
    }
}
