//! A bounded random-input harness (stable Rust: cargo-fuzz needs a nightly toolchain this
//! project cannot assume). Each target starts from valid inputs and applies random mutations
//! (bit flips, byte changes, inserts, deletes, truncation, spliced ranges, extreme length
//! fields); the target must return, never panic. Iterations per target:
//! `SEALDB_FUZZ_ITERS` (default 20,000; CI sets more), seed: `SEALDB_FUZZ_SEED`.
//!
//! Targets: the stored-record decoders (posting-list block, state record, meta record, KMS
//! envelope, user record, roster), the filter compiler, and the upsert / binary upsert /
//! query body parsers with the query options resolver.

use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iters() -> usize {
    std::env::var("SEALDB_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn rng() -> Rng {
    let seed = std::env::var("SEALDB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x005e_a1db);
    Rng(seed | 1)
}

const INTERESTING: [u32; 8] = [0, 1, 2, 0x7f, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000];

fn mutate(r: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + r.below(4) {
        let n = input.len();
        match r.below(8) {
            0 if n > 0 => {
                let i = r.below(n);
                input[i] ^= 1 << r.below(8);
            }
            1 if n > 0 => {
                let i = r.below(n);
                input[i] = r.next() as u8;
            }
            2 => {
                let i = r.below(n + 1);
                input.insert(i, r.next() as u8);
            }
            3 if n > 0 => {
                let i = r.below(n);
                let j = (i + 1 + r.below(16)).min(n);
                input.drain(i..j);
            }
            4 => input.truncate(r.below(n + 1)),
            5 if n >= 4 => {
                let i = r.below(n - 3);
                let v = INTERESTING[r.below(INTERESTING.len())];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            6 => {
                let other = &corpus[r.below(corpus.len())];
                if !other.is_empty() {
                    let a = r.below(other.len());
                    let b = (a + 1 + r.below(64)).min(other.len());
                    let at = r.below(input.len() + 1);
                    input.splice(at..at, other[a..b].iter().copied());
                }
            }
            _ => {}
        }
    }
}

/// Feed `target` the seeds, then `iters()` mutations of them.
fn run(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    let mut r = rng();
    for s in &seeds {
        target(s);
    }
    for i in 0..iters() {
        let mut input = seeds[r.below(seeds.len())].clone();
        mutate(&mut r, &mut input, &seeds);
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        assert!(
            res.is_ok(),
            "{name}: panic on iteration {i}, input {}",
            hex::encode(&input)
        );
    }
}

#[test]
fn stored_record_decoders_never_panic() {
    run(
        "index records",
        crate::engine::index::fuzz_seeds(),
        crate::engine::index::fuzz_decoders,
    );
    run(
        "meta records",
        crate::engine::meta::fuzz_seeds(),
        crate::engine::meta::fuzz_decoders,
    );
    run(
        "user records",
        crate::users::fuzz_seeds(),
        crate::users::fuzz_decoders,
    );
}

fn filter_target(buf: &[u8]) {
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(buf) {
        let limits = crate::limits::Limits::default();
        if limits.filter(&m).is_ok() {
            if let Ok(Some(f)) = crate::engine::filter::Filter::compile(&m) {
                // A compiled filter must evaluate on any metadata without panicking.
                for meta in [
                    json!({}),
                    json!({"a": 1, "b": "x", "tags": ["x", 2], "n": {"m": null}}),
                ] {
                    let _ = f.matches(Some(&meta));
                }
            }
        }
    }
}

/// A random JSON tree made of filter operators, field names and awkward values.
fn gen_value(r: &mut Rng, depth: usize) -> Value {
    const KEYS: [&str; 24] = [
        "a",
        "b",
        "tags",
        "n.m",
        "",
        "$and",
        "$or",
        "$not",
        "$nor",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$eq",
        "$ne",
        "$exists",
        "$regex",
        "$type",
        "$size",
        "$all",
        "$elemMatch",
        "$mod",
    ];
    let leaf = |r: &mut Rng| match r.below(9) {
        0 => Value::Null,
        1 => json!(r.below(2) == 0),
        2 => json!(r.next() as i64),
        3 => json!(f64::from_bits(r.next()).clamp(-1e300, 1e300)),
        4 => json!(["", "x", "string", "number", "(a|b)*c", "[", "\\", "é"][r.below(8)]),
        5 => json!(r.below(5) as i64 - 2),
        6 => json!(u64::MAX),
        7 => json!(["array", "object", "bool", "null", "int"][r.below(5)]),
        _ => json!(0.5),
    };
    if depth == 0 || r.below(3) == 0 {
        return leaf(r);
    }
    if r.below(3) == 0 {
        return Value::Array((0..r.below(4)).map(|_| gen_value(r, depth - 1)).collect());
    }
    let mut m = serde_json::Map::new();
    for _ in 0..1 + r.below(3) {
        m.insert(
            KEYS[r.below(KEYS.len())].to_string(),
            gen_value(r, depth - 1),
        );
    }
    Value::Object(m)
}

#[test]
fn generated_filters_never_panic() {
    let mut r = rng();
    for i in 0..iters() {
        let v = gen_value(&mut r, 6);
        let bytes = serde_json::to_vec(&v).unwrap();
        let res = std::panic::catch_unwind(|| filter_target(&bytes));
        assert!(res.is_ok(), "filters: panic on generated filter {i}: {v}");
    }
}

#[test]
fn filter_compiler_never_panics() {
    let seeds: Vec<Vec<u8>> = [
        json!({"a": 1}),
        json!({"a": {"$gt": 1, "$lte": 9.5}, "b": {"$in": ["x", "y"]}}),
        json!({"$and": [{"a": {"$exists": true}}, {"$or": [{"b": {"$ne": "x"}}, {"tags": {"$nin": [2]}}]}]}),
        json!({"$not": {"a": {"$eq": null}}, "n.m": {"$regex": "^a.*"}}),
        json!({"b": {"$type": "string"}, "a": {"$all": [1, 2]}, "tags": {"$size": 2}}),
        json!({"tags": {"$elemMatch": {"$gte": 1}}, "a": {"$mod": [2, 0]}}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect();
    run("filters", seeds, filter_target);
}

fn body_target(buf: &[u8]) {
    use crate::api::fast_json::FromJsonBytes;
    use crate::api::vectors::{BinaryUpsertRequest, UpsertRequest};
    use poem_openapi::types::ParseFromJSON;
    let _ = UpsertRequest::from_json_bytes(buf);
    let _ = BinaryUpsertRequest::from_json_bytes(buf);
    if let Ok(v) = serde_json::from_slice::<Value>(buf) {
        if let Ok(q) = crate::api::vectors::QueryBody::parse_from_json(Some(v.clone())) {
            let _ = crate::api::vectors::resolve_for_fuzz(q, &crate::limits::Limits::default());
        }
        let _ = crate::api::vectors::BinaryQueryRequest::parse_from_json(Some(v));
    }
}

#[test]
fn request_body_parsers_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        json!({"index_name": "i", "index_key": "00", "items": [{"id": "a", "vector": [1, 2.5], "contents": "t", "metadata": {"k": [1]}}]}),
        json!({"index_name": "i", "batch": {"ids": ["a", "b"], "dimension": 2, "vectors_b64": "AACAPwAAAEAAAEBAAACAQA==", "metadata": [null, {"k": 1}], "contents": ["x", null]}}),
        json!({"index_name": "i", "query_vectors": [0.1, 0.2], "top_k": 5, "n_probes": 2, "filters": {"k": {"$gt": 1}}, "include": ["distance", "metadata"]}),
        json!({"index_name": "i", "query_vectors": [[0.1], [0.2]], "top_k": 0, "greedy": true, "include": ["vector"]}),
        json!({"index_name": "i", "query_contents": ["hello", "world"], "top_k": -1}),
        json!({"index_name": "i", "batch": {"dimension": 1, "vectors_b64": "AACAPw=="}, "top_k": 9223372036854775807_i64}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect();
    run("request bodies", seeds, body_target);
}
