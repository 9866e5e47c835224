//! The value index (fields `metadata_schema` declares filterable) against a scan: random
//! upserts, overwrites and deletes, a training and a reopen, and every indexed filter gives
//! exactly what filtering every item gives, for `query_metadata` and for vector queries
//! (which then score the few candidates exactly); and a selective filter reads only the
//! blocks of its matches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::engine::filter::Filter;

/// A memory store that counts the posting-list blocks read.
struct Counting(MemoryStore, AtomicUsize);

impl IndexStore for Counting {
    fn backend(&self) -> &str {
        "counting"
    }
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if k.first() == Some(&format::kind::LIST) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        self.0.get(k)
    }
    fn scan_prefix(&self, p: &[u8]) -> Result<Vec<sealdb_plugin_api::KeyValue>, StoreError> {
        let out = self.0.scan_prefix(p)?;
        let blocks = out
            .iter()
            .filter(|(k, _)| k.first() == Some(&format::kind::LIST))
            .count();
        self.1.fetch_add(blocks, Ordering::SeqCst);
        Ok(out)
    }
    fn write(&self, b: WriteBatch) -> Result<(), StoreError> {
        self.0.write(b)
    }
}

fn schema() -> IndexConfig {
    let mut c = cfg(Metric::Euclidean, Precision::F32, 4);
    let f = |filterable| FieldSchema {
        filterable,
        pattern: false,
        full_text: false,
    };
    c.metadata_schema = vec![
        ("cat".into(), f(true)),
        ("o.tag".into(), f(true)),
        ("free".into(), f(false)),
    ];
    c
}

fn meta(rng: &mut StdRng) -> serde_json::Value {
    let cat = match rng.random_range(0..6) {
        0 => json!(rng.random_range(0..5)),
        1 => json!(rng.random_range(0..5) as f64),
        2 => json!(format!("s{}", rng.random_range(0..4))),
        3 => json!([rng.random_range(0..5), "s1", null]),
        4 => json!(null),
        _ => json!(rng.random_bool(0.5)),
    };
    let mut m = json!({"cat": cat, "n": rng.random_range(0..10), "free": rng.random_range(0..3)});
    if rng.random_bool(0.6) {
        m["o"] = json!({"tag": format!("t{}", rng.random_range(0..3))});
    }
    if rng.random_bool(0.1) {
        m = json!({});
    }
    m
}

fn filters() -> Vec<serde_json::Value> {
    vec![
        json!({"cat": 3}),
        json!({"cat": 3.0}),
        json!({"cat": "s1"}),
        json!({"cat": true}),
        json!({"cat": {"$in": [0, "s2", false, null]}}),
        json!({"cat": {"$eq": 1, "$ne": "x"}}),
        json!({"cat": null}),
        json!({"cat": 2, "n": {"$gt": 4}}),
        json!({"$or": [{"cat": 4}, {"o.tag": "t2"}]}),
        json!({"$and": [{"o.tag": "t1"}, {"cat": {"$in": [1, 2, 3]}}]}),
        json!({"$or": [{"cat": 4}, {"n": 1}]}),
        json!({"free": 1}),
    ]
}

#[test]
fn value_index_answers_as_a_scan_through_writes_training_and_reopen() {
    let store = Arc::new(Counting(MemoryStore::new(), AtomicUsize::new(0)));
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, "v", &kek, schema());
    let ix = e.open("v", Some(&kek)).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut model: BTreeMap<String, (Vec<f32>, serde_json::Value)> = BTreeMap::new();
    let check =
        |ix: &Index, model: &BTreeMap<String, (Vec<f32>, serde_json::Value)>, what: &str| {
            for fj in filters() {
                let f = Filter::compile(fj.as_object().unwrap()).unwrap().unwrap();
                let want: Vec<String> = model
                    .iter()
                    .filter(|(_, (_, m))| f.matches(Some(m)))
                    .map(|(id, _)| id.clone())
                    .collect();
                let mut got = ix.query_metadata(Some(&f), None, None, 1 << 20).unwrap();
                got.sort();
                assert_eq!(got, want, "{what}: query_metadata {fj}");
                let q = vec![0.5f32, 0.5, 0.5, 0.5];
                let mut exact: Vec<(f32, String)> = want
                    .iter()
                    .map(|id| (distance::l2sq(&q, &model[id].0), id.clone()))
                    .collect();
                exact.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let mut p = params(5);
                p.filter = Some(f.clone());
                let hits = ix.search(std::slice::from_ref(&q), &p).unwrap();
                let got: Vec<&str> = hits[0].iter().map(|h| h.id.as_str()).collect();
                let want: Vec<&str> = exact.iter().take(5).map(|x| x.1.as_str()).collect();
                assert_eq!(got, want, "{what}: filtered search {fj}");
            }
        };
    for round in 0..30 {
        let mut batch = Vec::new();
        for _ in 0..rng.random_range(1..20) {
            let id = format!("i{}", rng.random_range(0..120));
            let v: Vec<f32> = (0..4).map(|_| rng.random()).collect();
            let m = meta(&mut rng);
            model.insert(id.clone(), (v.clone(), m.clone()));
            batch.push(item(&id, v, m));
        }
        ix.upsert(batch).unwrap();
        if round % 4 == 3 {
            let gone: Vec<String> = (0..4)
                .map(|_| format!("i{}", rng.random_range(0..120)))
                .collect();
            for g in &gone {
                model.remove(g);
            }
            ix.delete_ids(&gone).unwrap();
        }
        if round % 5 == 0 {
            check(&ix, &model, &format!("round {round}"));
        }
    }
    check(&ix, &model, "after writes");
    train_lists(&e, &ix, 3);
    check(&ix, &model, "after training");
    drop(ix);
    let e2 = engine(store.clone());
    let ix2 = e2.open("v", Some(&kek)).unwrap();
    check(&ix2, &model, "after reopen");
    e2.delete("v", Some(&kek)).unwrap();
    assert!(
        store.0.scan_prefix(b"").unwrap().is_empty(),
        "delete leaves no index records behind"
    );
}

#[test]
fn a_selective_indexed_filter_reads_only_its_matches_blocks() {
    let store = Arc::new(Counting(MemoryStore::new(), AtomicUsize::new(0)));
    let kek = Kek::random();
    // A cache that keeps nothing: every block a query needs is read from the store.
    let e = engine_with_cache(store.clone(), Some(0));
    let mut c = schema();
    c.declared_dimension = 128;
    create(&e, "sel", &kek, c);
    let ix = e.open("sel", Some(&kek)).unwrap();
    let n = 20_000;
    let mut rng = StdRng::seed_from_u64(5);
    for start in (0..n).step_by(5_000) {
        let batch: Vec<NewItem> = (start..start + 5_000)
            .map(|i| {
                let v: Vec<f32> = (0..128).map(|_| rng.random()).collect();
                // 0.1% of the items have cat 7.
                item(
                    &format!("i{i}"),
                    v,
                    json!({"cat": if i % 1000 == 0 { 7 } else { i % 5 }}),
                )
            })
            .collect();
        ix.upsert(batch).unwrap();
    }
    let blocks = store.0.scan_keys(&[format::kind::LIST]).unwrap().len();
    let f = Filter::compile(json!({"cat": 7}).as_object().unwrap())
        .unwrap()
        .unwrap();
    store.1.store(0, Ordering::SeqCst);
    let mut got = ix.query_metadata(Some(&f), None, None, 1 << 20).unwrap();
    got.sort();
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..n).step_by(1000).map(|i| format!("i{i}")).collect();
        w.sort();
        w
    };
    assert_eq!(got, want);
    let read = store.1.load(Ordering::SeqCst);
    assert!(
        read <= want.len(),
        "read {read} of {blocks} blocks for {} matches",
        want.len()
    );
    store.1.store(0, Ordering::SeqCst);
    let mut p = params(3);
    p.filter = Some(f);
    assert_eq!(ix.search(&[vec![0.5; 128]], &p).unwrap()[0].len(), 3);
    let read = store.1.load(Ordering::SeqCst);
    assert!(
        read <= want.len(),
        "a filtered search read {read} of {blocks} blocks"
    );
    assert!(blocks > 100, "the index spans many blocks ({blocks})");
}
