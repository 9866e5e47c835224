//! Bounded memory: an index many times the block cache's budget answers exactly what the same
//! operations answer with an unbounded cache (same results, same order) through upserts,
//! deletes, overwrites, training and a restart; the cache never holds more than its budget;
//! and queries running while writers change the index stay correct.

use super::*;
use crate::engine::filter::Filter;

const DIM: usize = 16;
/// Far below the index's decrypted size (checked below).
const BUDGET: usize = 128 << 10;

fn vector(rng: &mut StdRng, cluster: usize) -> Vec<f32> {
    (0..DIM)
        .map(|d| (cluster * 7 + d) as f32 % 5.0 + rng.random::<f32>())
        .collect()
}

fn items(rng: &mut StdRng, ids: std::ops::Range<usize>, version: u32) -> Vec<NewItem> {
    ids.map(|i| {
        let mut v = vector(rng, i % 13);
        v[0] += version as f32 * 10.0;
        let mut it = item(&format!("id{i}"), v, json!({"g": i % 7, "v": version}));
        if i % 3 == 0 {
            it.contents = None;
        }
        it
    })
    .collect()
}

/// Everything the two runs must agree on: single, batched and filtered queries (ids,
/// distances, metadata, vectors, contents), gets, and the set of ids.
fn answers(ix: &Index) -> String {
    let mut rng = StdRng::seed_from_u64(99);
    let queries: Vec<Vec<f32>> = (0..12).map(|c| vector(&mut rng, c)).collect();
    let mut out = String::new();
    let mut p = params(15);
    for q in &queries {
        out += &format!("{:?}\n", ix.search(std::slice::from_ref(q), &p).unwrap());
    }
    out += &format!("{:?}\n", ix.search(&queries, &p).unwrap());
    p.filter = Filter::compile(json!({"g": {"$in": [1, 4]}}).as_object().unwrap()).unwrap();
    for q in &queries[..4] {
        out += &format!("{:?}\n", ix.search(std::slice::from_ref(q), &p).unwrap());
    }
    let ids: Vec<String> = (0..5000).step_by(37).map(|i| format!("id{i}")).collect();
    out += &format!("{:?}\n", ix.get(&ids, Include::STORED).unwrap());
    let mut all = ix.list_ids().unwrap();
    all.sort();
    out += &format!("{all:?}\n");
    out
}

/// One step of the lockstep test, run on both engines.
type Phase = Box<dyn Fn(&Engine, &Arc<Index>)>;

fn check_budget(e: &Engine) {
    let st = e.cache_stats();
    assert!(
        st.bytes <= st.budget,
        "the cache holds {} bytes over a budget of {}",
        st.bytes,
        st.budget
    );
}

#[test]
fn bounded_cache_answers_exactly_as_unbounded() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, sb) = (redb(da.path()), redb(db.path()));
    let kek = Kek::random();
    let mut small = engine_with_cache(sa.clone(), Some(BUDGET));
    let mut big = engine_with_cache(sb.clone(), None);
    for e in [&small, &big] {
        create(
            e,
            "b",
            &kek,
            cfg(Metric::Euclidean, Precision::F32, DIM as u32),
        );
    }
    // The same operations on both, step by step; compare after each phase.
    let phases: Vec<Phase> = vec![
        Box::new(|_, ix| {
            ix.upsert(items(&mut StdRng::seed_from_u64(1), 0..4000, 1))
                .unwrap();
        }),
        Box::new(|_, ix| {
            let gone: Vec<String> = (0..4000).step_by(11).map(|i| format!("id{i}")).collect();
            ix.delete_ids(&gone).unwrap();
            ix.upsert(items(&mut StdRng::seed_from_u64(2), 1000..1600, 2))
                .unwrap();
        }),
        Box::new(|e, ix| {
            let p = TrainParams {
                n_lists: Some(24),
                ..Default::default()
            };
            e.train_now(ix, &p).unwrap();
        }),
        Box::new(|_, ix| {
            ix.upsert(items(&mut StdRng::seed_from_u64(3), 3500..5000, 3))
                .unwrap();
            let gone: Vec<String> = (0..5000).step_by(5).map(|i| format!("id{i}")).collect();
            ix.delete_ids(&gone).unwrap();
            // One at a time too: single-item batches touch one or two blocks each.
            for i in 0..40 {
                ix.upsert(items(
                    &mut StdRng::seed_from_u64(4 + i),
                    (i * 97) as usize..(i * 97 + 1) as usize,
                    4,
                ))
                .unwrap();
            }
        }),
        Box::new(|e, ix| {
            let p = TrainParams {
                n_lists: Some(40),
                ..Default::default()
            };
            e.train_now(ix, &p).unwrap();
        }),
    ];
    for (n, phase) in phases.iter().enumerate() {
        let (a, b) = (
            small.open("b", Some(&kek)).unwrap(),
            big.open("b", Some(&kek)).unwrap(),
        );
        phase(&small, &a);
        phase(&big, &b);
        check_budget(&small);
        assert_eq!(answers(&a), answers(&b), "after phase {n}");
        check_budget(&small);
    }
    // The index is several times the budget, and the bounded run read from the store.
    let held: u64 = {
        let b = big.open("b", Some(&kek)).unwrap();
        let _ = answers(&b);
        big.cache_stats().bytes
    };
    assert!(
        held >= 4 * BUDGET as u64,
        "index is only {held} bytes decrypted"
    );
    assert!(small.cache_stats().misses > 0 && small.cache_stats().hits > 0);
    // Restart both: the same answers from what the stores hold.
    drop((small, big));
    small = engine_with_cache(sa, Some(BUDGET));
    big = engine_with_cache(sb, None);
    let (a, b) = (
        small.open("b", Some(&kek)).unwrap(),
        big.open("b", Some(&kek)).unwrap(),
    );
    assert_eq!(answers(&a), answers(&b), "after restart");
    check_budget(&small);
    // Overwrites after a restart find every existing item (the id filter is rebuilt from
    // the position records): no id gains a second row.
    let n = small.describe(&a).num_vectors;
    for ix in [&a, &b] {
        ix.upsert(items(&mut StdRng::seed_from_u64(9), 0..5000, 5))
            .unwrap();
    }
    assert_eq!(small.describe(&a).num_vectors, 5000);
    assert!(n < 5000);
    let mut ids = a.list_ids().unwrap();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5000);
    assert_eq!(answers(&a), answers(&b), "after overwrites");
}

#[test]
fn zero_budget_keeps_no_block() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine_with_cache(store, Some(0));
    create(
        &e,
        "z",
        &kek,
        cfg(Metric::Cosine, Precision::F16, DIM as u32),
    );
    let ix = e.open("z", Some(&kek)).unwrap();
    ix.upsert(items(&mut StdRng::seed_from_u64(5), 0..500, 1))
        .unwrap();
    let got = ix.search(&[vec![1.0; DIM]], &params(5)).unwrap();
    assert_eq!(got[0].len(), 5);
    assert_eq!(e.cache_stats().bytes, 0);
    assert_eq!(e.cache_stats().blocks, 0);
}

/// Queries on a bounded cache while a writer overwrites, deletes and retrains: no query
/// fails (a reader that meets a batch stored but not yet installed looks again), every hit
/// is an item as some write left it, and the end state answers as an unbounded engine
/// reading the same store.
#[test]
fn concurrent_queries_and_writes_on_a_bounded_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = redb(dir.path());
    let kek = Kek::random();
    let e = engine_with_cache(store.clone(), Some(BUDGET));
    create(
        &e,
        "c",
        &kek,
        cfg(Metric::Euclidean, Precision::F32, DIM as u32),
    );
    let ix = e.open("c", Some(&kek)).unwrap();
    ix.upsert(items(&mut StdRng::seed_from_u64(1), 0..3000, 1))
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (ix, done) = (&ix, &done);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) || n < 20 {
                    let q = vector(&mut rng, n % 13);
                    let hits = ix.search(&[q], &params(10)).unwrap().remove(0);
                    for w in hits.windows(2) {
                        assert!(w[0].distance <= w[1].distance);
                    }
                    for h in &hits {
                        let m = h.metadata.as_deref().unwrap();
                        let v = h.vector.as_ref().unwrap();
                        // The vector carries its version: the item is as one write left it.
                        let version = m["v"].as_u64().unwrap() as f32;
                        assert!(v[0] >= version * 10.0 && v[0] < version * 10.0 + 6.0);
                    }
                    let ids: Vec<String> = (0..30)
                        .map(|i| format!("id{}", (i * 101 + n) % 3000))
                        .collect();
                    for f in ix.get(&ids, Include::STORED).unwrap() {
                        assert!(ids.contains(&f.id));
                    }
                    n += 1;
                }
            });
        }
        for round in 0..12u32 {
            let mut rng = StdRng::seed_from_u64(round as u64);
            let lo = (round as usize * 250) % 3000;
            ix.upsert(items(&mut rng, lo..lo + 250, round + 2)).unwrap();
            let gone: Vec<String> = (lo..lo + 250)
                .step_by(9)
                .map(|i| format!("id{i}"))
                .collect();
            ix.delete_ids(&gone).unwrap();
            if round == 5 {
                let p = TrainParams {
                    n_lists: Some(16),
                    ..Default::default()
                };
                e.train_now(&ix, &p).unwrap();
            }
            check_budget(&e);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    check_budget(&e);
    let fresh = engine_with_cache(store, None);
    let other = fresh.open("c", Some(&kek)).unwrap();
    assert_eq!(answers(&ix), answers(&other));
}

/// A training whose switching batch fails leaves no block of its unswitched generation in
/// the cache (it warms the cache as it writes): the next training, which writes other
/// blocks under the same keys, must not be answered from them.
#[test]
fn a_failed_training_leaves_nothing_of_its_generation_cached() {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct FailSwitch(MemoryStore, AtomicBool);
    impl IndexStore for FailSwitch {
        fn backend(&self) -> &str {
            "fail-switch"
        }
        fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(k)
        }
        fn scan_prefix(&self, p: &[u8]) -> Result<Vec<sealdb_plugin_api::KeyValue>, StoreError> {
            self.0.scan_prefix(p)
        }
        fn write(&self, b: WriteBatch) -> Result<(), StoreError> {
            // The switching batch is the one that writes the centroids.
            let switch = b.ops().iter().any(|op| match op {
                sealdb_plugin_api::WriteOp::Put { key, .. } => {
                    key.first() == Some(&format::kind::CENTROIDS)
                }
                _ => false,
            });
            if switch && self.1.load(Ordering::SeqCst) {
                return Err(StoreError::Io("switch refused by the test".into()));
            }
            self.0.write(b)
        }
    }
    let store = Arc::new(FailSwitch(MemoryStore::new(), AtomicBool::new(true)));
    let kek = Kek::random();
    let filled = |e: &Engine, name: &str| {
        create(
            e,
            name,
            &kek,
            cfg(Metric::Euclidean, Precision::F32, DIM as u32),
        );
        let ix = e.open(name, Some(&kek)).unwrap();
        ix.upsert(items(&mut StdRng::seed_from_u64(1), 0..3000, 1))
            .unwrap();
        ix
    };
    // Room for the blocks beside what the training reserves of the budget.
    let e = engine_with_cache(store.clone(), Some(1 << 30));
    let ix = filled(&e, "f");
    let gen = ix.read().gen;
    let p = |n| TrainParams {
        n_lists: Some(n),
        ..Default::default()
    };
    // A training that succeeds warms the cache with its generation (so that the check
    // below can see blocks of a generation that is not live)...
    {
        let e2 = engine_with_cache(Arc::new(MemoryStore::new()), Some(1 << 30));
        let ix2 = filled(&e2, "g");
        e2.train_now(&ix2, &p(16)).unwrap();
        assert!(e2.blocks.cached_of(&ix2.id, gen + 1) > 0);
    }
    // ...and one whose switch fails leaves none of its blocks behind.
    assert!(matches!(
        e.train_now(&ix, &p(16)),
        Err(EngineError::Store(_))
    ));
    assert_eq!(
        e.blocks.cached_of(&ix.id, gen + 1),
        0,
        "blocks of the failed generation stayed cached"
    );
    assert_eq!(
        e.blocks.reserved(),
        0,
        "the training gave its reservation back"
    );
    store.1.store(false, Ordering::SeqCst);
    e.train_now(&ix, &p(24)).unwrap();
    let fresh = engine_with_cache(store, None);
    let other = fresh.open("f", Some(&kek)).unwrap();
    assert_eq!(answers(&ix), answers(&other));
}
