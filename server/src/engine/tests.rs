use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sealdb_store_memory::MemoryStore;
use serde_json::json;

pub(crate) fn cfg(metric: Metric, precision: Precision, dim: u32) -> IndexConfig {
    IndexConfig {
        metric,
        precision,
        embedding_model: None,
        declared_dimension: dim,
        created_at: 0,
        metadata_schema: Vec::new(),
        bm25: Default::default(),
        value_index: true,
    }
}

/// The redb store as the server opens it (each generation's bulk records in files of
/// their own), in `dir`.
fn redb(dir: &std::path::Path) -> Arc<dyn IndexStore> {
    Arc::new(
        sealdb_store_redb::RedbStore::open_dir_with(
            dir,
            sealdb_store_redb::WalOptions {
                grouping: crate::plugins::redb_grouping(),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn engine(store: Arc<dyn IndexStore>) -> Arc<Engine> {
    engine_with_cache(store, None)
}

fn engine_with_cache(store: Arc<dyn IndexStore>, cache_limit_bytes: Option<usize>) -> Arc<Engine> {
    engine_with(store, cache_limit_bytes, false)
}

pub(crate) fn engine_with(
    store: Arc<dyn IndexStore>,
    cache_limit_bytes: Option<usize>,
    background_merges: bool,
) -> Arc<Engine> {
    Engine::new(
        store,
        EngineConfig {
            auto_train_min_vectors: 1_000_000,
            auto_train: false,
            cache_limit_bytes,
            train_time_limit: None,
            coarse_min_bytes: None,
            background_merges,
        },
    )
}

pub(crate) fn create(e: &Engine, name: &str, kek: &Kek, config: IndexConfig) {
    e.create(CreateSpec {
        name: name.into(),
        id: crate::engine::new_index_id(),
        envelope: None,
        kek: kek.clone(),
        config,
    })
    .unwrap();
}

fn item(id: &str, v: Vec<f32>, meta: serde_json::Value) -> NewItem {
    NewItem {
        id: id.into(),
        vector: v,
        metadata: meta.as_object().cloned(),
        contents: Some(format!("contents of {id}")),
    }
}

/// Items "0", "1", ... with the given vectors and empty metadata.
fn numbered(data: &[Vec<f32>]) -> Vec<NewItem> {
    data.iter()
        .enumerate()
        .map(|(i, v)| item(&i.to_string(), v.clone(), json!({})))
        .collect()
}

/// Train `ix` into `n` lists with every other setting left to the engine.
fn train_lists(e: &Engine, ix: &Arc<Index>, n: usize) {
    e.train_now(
        ix,
        &TrainParams {
            n_lists: Some(n),
            ..Default::default()
        },
    )
    .unwrap();
}

fn params(k: usize) -> SearchParams {
    SearchParams {
        top_k: k,
        n_probes: None,
        greedy: false,
        filter: None,
        include: Include {
            distance: true,
            metadata: true,
            vector: true,
            contents: true,
        },
    }
}

#[test]
fn create_upsert_query_get_delete_reload() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, "a", &kek, cfg(Metric::Euclidean, Precision::F32, 0));
    assert!(matches!(
        e.create(CreateSpec {
            name: "a".into(),
            id: crate::engine::new_index_id(),
            envelope: None,
            kek: kek.clone(),
            config: cfg(Metric::Euclidean, Precision::F32, 0)
        }),
        Err(EngineError::AlreadyExists(_))
    ));
    let ix = e.open("a", Some(&kek)).unwrap();
    assert_eq!(e.describe(&ix).dimension, 0);
    ix.upsert(vec![
        item("x", vec![0.0, 0.0], json!({"k": 1})),
        item("y", vec![3.0, 4.0], json!({"k": 2})),
        item("z", vec![1.0, 0.0], json!({})),
    ])
    .unwrap();
    assert_eq!(e.describe(&ix).dimension, 2);
    // Wrong dimension: rejected, nothing written.
    assert!(matches!(
        ix.upsert(vec![item("w", vec![1.0, 2.0, 3.0], json!({}))]),
        Err(EngineError::Invalid(_))
    ));
    let hits = ix.search(&[vec![0.0, 0.0]], &params(10)).unwrap();
    let ids: Vec<&str> = hits[0].iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["x", "z", "y"]);
    assert_eq!(hits[0][2].distance, 5.0);
    assert_eq!(hits[0][0].contents.as_deref(), Some("contents of x"));
    let mut p = params(10);
    p.filter = filter::Filter::compile(json!({"k": {"$gte": 2}}).as_object().unwrap()).unwrap();
    let hits = ix.search(&[vec![0.0, 0.0]], &p).unwrap();
    assert_eq!(hits[0].len(), 1);
    assert_eq!(hits[0][0].id, "y");
    // Overwrite moves y.
    ix.upsert(vec![item("y", vec![0.5, 0.0], json!({"k": 3}))])
        .unwrap();
    assert_eq!(ix.list_ids().unwrap().len(), 3);
    assert_eq!(ix.delete_ids(&["z".into(), "nope".into()]).unwrap(), 1);
    let got = ix
        .get(&["y".into(), "z".into(), "x".into()], Include::STORED)
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].vector.as_deref(), Some(&[0.5f32, 0.0][..]));
    assert_eq!(got[0].metadata.as_deref(), Some(&json!({"k": 3})));
    // Reload from the store in a fresh engine.
    let e2 = engine(store.clone());
    assert!(matches!(
        e2.open("a", Some(&Kek::random())),
        Err(EngineError::WrongKey(_))
    ));
    assert!(matches!(
        e2.open("a", None),
        Err(EngineError::MissingKey(_))
    ));
    let ix2 = e2.open("a", Some(&kek)).unwrap();
    let mut ids = ix2.list_ids().unwrap();
    ids.sort();
    assert_eq!(ids, ["x", "y"]);
    assert!(matches!(
        e2.open("a", Some(&Kek::random())),
        Err(EngineError::WrongKey(_))
    ));
    e2.delete("a", Some(&kek)).unwrap();
    assert!(matches!(
        e2.open("a", Some(&kek)),
        Err(EngineError::NotFound(_))
    ));
    assert!(
        store.scan_prefix(b"").unwrap().is_empty(),
        "delete leaves nothing behind"
    );
}

fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| rng.random_range(-3.0..3.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            centres[i % clusters]
                .iter()
                .map(|c| c + rng.random_range(-1.0..1.0f32))
                .collect()
        })
        .collect()
}

/// A fresh in-memory store holding index `name` with `n` `dim`-d vectors around `clusters`
/// centres, items "0", "1", ... each with metadata `{"i": i}`.
fn filled_index(
    name: &str,
    metric: Metric,
    precision: Precision,
    dim: usize,
    n: usize,
    clusters: usize,
    seed: u64,
) -> Filled {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, name, &kek, cfg(metric, precision, dim as u32));
    let ix = e.open(name, Some(&kek)).unwrap();
    let data = clustered(n, dim, clusters, seed);
    let items: Vec<NewItem> = data
        .iter()
        .enumerate()
        .map(|(i, v)| item(&i.to_string(), v.clone(), json!({"i": i})))
        .collect();
    ix.upsert(items).unwrap();
    Filled {
        store,
        kek,
        e,
        ix,
        data,
    }
}

/// What [`filled_index`] made.
struct Filled {
    store: Arc<dyn IndexStore>,
    kek: Kek,
    e: Arc<Engine>,
    ix: Lease,
    data: Vec<Vec<f32>>,
}

#[test]
fn training_keeps_every_vector_and_recall() {
    for (metric, precision) in [
        (Metric::Euclidean, Precision::F32),
        (Metric::Cosine, Precision::F16),
    ] {
        let Filled {
            store,
            kek,
            e,
            ix,
            data,
        } = filled_index("t", metric, precision, 16, 3000, 20, 3);
        let exact = ix.search(&data[..50], &params(10)).unwrap();
        let k = e.train_now(&ix, &TrainParams::default()).unwrap();
        assert_eq!(k, 64);
        let info = e.describe(&ix);
        assert!(info.is_trained);
        assert_eq!(info.n_lists, 64);
        assert_eq!(info.num_vectors, 3000);
        let approx = ix.search(&data[..50], &params(10)).unwrap();
        let mut found = 0;
        for (a, b) in approx.iter().zip(&exact) {
            let want: std::collections::HashSet<&str> = b.iter().map(|h| h.id.as_str()).collect();
            found += a.iter().filter(|h| want.contains(h.id.as_str())).count();
        }
        assert!(
            found as f64 / 500.0 >= 0.95,
            "{metric:?} recall {found}/500"
        );
        // Upserts after training land in lists, survive reload, and old generation is gone.
        ix.upsert(vec![item("new", data[0].clone(), json!({}))])
            .unwrap();
        let e2 = engine(store.clone());
        let ix2 = e2.open("t", Some(&kek)).unwrap();
        assert_eq!(e2.describe(&ix2).num_vectors, 3001);
        assert!(e2.describe(&ix2).is_trained);
        let hits = ix2.search(&[data[0].clone()], &params(2)).unwrap();
        let top: Vec<&str> = hits[0].iter().map(|h| h.id.as_str()).collect();
        assert!(top.contains(&"new") && top.contains(&"0"), "{top:?}");
        let gen0 = format::list_gen_prefix(&ix2.id, 0);
        assert!(store.scan_keys(&gen0).unwrap().is_empty());
    }
}

#[test]
fn too_few_vectors_for_requested_lists() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store);
    create(&e, "s", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
    let ix = e.open("s", Some(&kek)).unwrap();
    assert!(matches!(
        e.train_now(&ix, &TrainParams::default()),
        Err(EngineError::Invalid(_))
    ));
    ix.upsert(vec![item("a", vec![1.0, 1.0], json!({}))])
        .unwrap();
    let p = TrainParams {
        n_lists: Some(4),
        ..Default::default()
    };
    assert!(matches!(e.train_now(&ix, &p), Err(EngineError::Invalid(_))));
}

#[test]
fn swapped_blobs_fail_to_open() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, "a", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
    let ix = e.open("a", Some(&kek)).unwrap();
    ix.upsert(vec![
        item("x", vec![0.0, 0.0], json!({})),
        item("y", vec![1.0, 1.0], json!({})),
    ])
    .unwrap();
    // Swap the two item records (contents) in the store.
    let items = store
        .scan_prefix(&format::scoped_prefix(format::kind::ITEM, &ix.id))
        .unwrap();
    assert_eq!(items.len(), 2);
    let mut b = WriteBatch::new();
    b.put(items[0].0.clone(), items[1].1.clone())
        .put(items[1].0.clone(), items[0].1.clone());
    store.write(b).unwrap();
    let inc = Include {
        contents: true,
        ..Default::default()
    };
    assert!(matches!(
        ix.get(&["x".into()], inc),
        Err(EngineError::Integrity { .. })
    ));
}

#[test]
fn auto_n_lists_is_a_power_of_two_near_sqrt() {
    assert_eq!(index::auto_n_lists(20_000), 128);
    assert_eq!(index::auto_n_lists(100_000), 256);
    assert_eq!(index::auto_n_lists(1_000_000), 1024);
    assert_eq!(index::auto_n_lists(2), 1);
}

#[test]
fn names_are_validated() {
    assert!(validate_name("ok-name_1").is_ok());
    assert!(validate_name("").is_err());
    assert!(validate_name("default").is_err());
    assert!(validate_name("a\nb").is_err());
    assert!(validate_name(&"x".repeat(256)).is_err());
}

#[test]
fn cache_budget_zero_keeps_nothing_between_uses() {
    let e = engine_with_cache(Arc::new(MemoryStore::new()), Some(0));
    let kek = Kek::random();
    create(&e, "c", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
    let a = e.open("c", Some(&kek)).unwrap();
    a.upsert(vec![item("x", vec![1.0, 2.0], json!({}))])
        .unwrap();
    let b = e.open("c", Some(&kek)).unwrap();
    assert!(
        Arc::ptr_eq(&a, &b),
        "an index in use is shared, never loaded twice"
    );
    let first = Arc::downgrade(&a);
    drop(a);
    drop(b);
    assert!(first.upgrade().is_none(), "released with budget 0");
    let c = e.open("c", Some(&kek)).unwrap();
    assert_eq!(c.list_ids().unwrap(), ["x"]);
    assert!(matches!(
        e.open("c", Some(&Kek::random())),
        Err(EngineError::WrongKey(_))
    ));
}

#[test]
fn unlimited_cache_keeps_indexes_open() {
    let e = engine(Arc::new(MemoryStore::new()));
    let kek = Kek::random();
    create(&e, "c", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
    let a = e.open("c", Some(&kek)).unwrap();
    let w = Arc::downgrade(&a);
    drop(a);
    assert!(w.upgrade().is_some());
}

/// Batches go through the list-major GEMM path; they must answer like single queries.
#[test]
fn batch_queries_match_single_queries() {
    for (metric, precision, train) in [
        (Metric::Euclidean, Precision::F32, false),
        (Metric::Euclidean, Precision::F32, true),
        (Metric::SquaredEuclidean, Precision::F32, true),
        (Metric::Cosine, Precision::F16, true),
    ] {
        let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
        let kek = Kek::random();
        let e = engine(store);
        create(&e, "b", &kek, cfg(metric, precision, 24));
        let ix = e.open("b", Some(&kek)).unwrap();
        let data = clustered(4000, 24, 30, 11);
        ix.upsert(numbered(&data)).unwrap();
        if train {
            e.train_now(&ix, &TrainParams::default()).unwrap();
            // Clear clusters need few probes, so no list carries 8-bit codes.
            let (quantised, lists, probes) = ix.quant_state();
            assert_eq!(quantised, 0, "{probes} probes of {lists} lists");
        }
        let queries: Vec<Vec<f32>> = clustered(40, 24, 30, 99);
        let mut p = params(10);
        p.include.contents = false;
        let batch = ix.search(&queries, &p).unwrap();
        let (mut same, mut total) = (0, 0);
        for (q, got) in queries.iter().zip(&batch) {
            let single = ix.search(std::slice::from_ref(q), &p).unwrap().remove(0);
            assert_eq!(got.len(), single.len());
            for h in got {
                total += 1;
                if let Some(s) = single.iter().find(|s| s.id == h.id) {
                    same += 1;
                    assert_eq!(h.distance, s.distance, "{metric:?}: exact rescoring");
                    assert_eq!(h.vector, s.vector);
                }
            }
            assert!(got.windows(2).all(|w| w[0].distance <= w[1].distance));
        }
        assert!(
            same * 100 >= total * 99,
            "{metric:?} train={train}: {same}/{total}"
        );
    }
}

/// Data without cluster structure makes the calibrated n_probes large, which turns on the
/// 8-bit first pass. Results must match an exact scan of the same lists.
#[test]
fn quantised_first_pass_matches_exact_scan() {
    for metric in [Metric::Euclidean, Metric::Cosine] {
        let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
        let kek = Kek::random();
        let e = engine(store.clone());
        create(&e, "q", &kek, cfg(metric, Precision::F32, 32));
        let ix = e.open("q", Some(&kek)).unwrap();
        let mut rng = StdRng::seed_from_u64(21);
        let data: Vec<Vec<f32>> = (0..6000)
            .map(|_| (0..32).map(|_| rng.random_range(-1.0..1.0f32)).collect())
            .collect();
        ix.upsert(numbered(&data)).unwrap();
        e.train_now(&ix, &TrainParams::default()).unwrap();
        let (quantised, lists, probes) = ix.quant_state();
        assert_eq!(
            quantised, lists,
            "{metric:?}: {probes} probes of {lists} lists should turn quantisation on"
        );
        // Training warmed the cache with the new blocks; every one carries its codes.
        let (cached, uncoded) = ix.cached_codes();
        assert!(cached > 0, "{metric:?}: training left the cache cold");
        assert_eq!(uncoded, 0, "{metric:?}: cached blocks without 8-bit codes");
        let queries: Vec<Vec<f32>> = (0..60)
            .map(|_| (0..32).map(|_| rng.random_range(-1.0..1.0f32)).collect())
            .collect();
        let mut p = params(10);
        p.include.contents = false;
        // A filter that matches everything takes the exact path over the same lists.
        let mut exact_p = params(10);
        exact_p.include.contents = false;
        exact_p.filter = crate::engine::filter::Filter::compile(
            json!({"absent": {"$exists": false}}).as_object().unwrap(),
        )
        .unwrap();
        assert!(exact_p.filter.is_some());
        let (mut same, mut total) = (0, 0);
        for q in &queries {
            let fast = ix.search(std::slice::from_ref(q), &p).unwrap().remove(0);
            let exact = ix
                .search(std::slice::from_ref(q), &exact_p)
                .unwrap()
                .remove(0);
            assert!(fast.windows(2).all(|w| w[0].distance <= w[1].distance));
            for h in &fast {
                total += 1;
                if let Some(x) = exact.iter().find(|x| x.id == h.id) {
                    same += 1;
                    assert_eq!(h.distance, x.distance, "{metric:?}: rescored exactly");
                }
            }
        }
        assert!(
            same * 100 >= total * 97,
            "{metric:?}: {same}/{total} agree with exact"
        );
        // Writes after training are coded too: a new vector finds itself; deleted, it is gone.
        let v: Vec<f32> = (0..32).map(|i| i as f32 / 40.0 - 0.4).collect();
        ix.upsert(vec![item("new", v.clone(), json!({}))]).unwrap();
        let hits = ix.search(std::slice::from_ref(&v), &p).unwrap().remove(0);
        assert_eq!(hits[0].id, "new");
        assert!(hits[0].distance.abs() < 1e-5);
        ix.delete_ids(&["new".to_string()]).unwrap();
        let hits = ix.search(std::slice::from_ref(&v), &p).unwrap().remove(0);
        assert!(hits.iter().all(|h| h.id != "new"));
        // A reopened index quantises again.
        let e2 = engine(store);
        let ix2 = e2.open("q", Some(&kek)).unwrap();
        let (quantised, lists, _) = ix2.quant_state();
        assert_eq!(quantised, lists);
    }
}

#[test]
fn trained_generation_in_memory_matches_the_store_through_later_edits() {
    // Training moves rows into the new lists in memory and writes them to the store in a
    // separate pass; both must agree block for block, or later edits (which rewrite whole
    // blocks by number) would leave stale or missing rows behind on disk.
    for (metric, precision) in [
        (Metric::Euclidean, Precision::F32),
        (Metric::Cosine, Precision::F16),
    ] {
        // 64 dimensions and 8 lists: every list spans several blocks.
        let Filled {
            store,
            kek,
            e,
            ix,
            data,
        } = filled_index("m", metric, precision, 64, 5000, 12, 9);
        let train = TrainParams {
            n_lists: Some(8),
            ..TrainParams::default()
        };
        e.train_now(&ix, &train).unwrap();
        // Edits after training: overwrite some rows, delete others, add new ones.
        let overwrite: Vec<NewItem> = (0..300)
            .map(|i| item(&(i * 7).to_string(), data[i * 3].clone(), json!({"o": i})))
            .collect();
        ix.upsert(overwrite).unwrap();
        let gone: Vec<String> = (0..200).map(|i| (i * 11 + 1).to_string()).collect();
        ix.delete_ids(&gone).unwrap();
        ix.upsert(vec![item("extra", data[5].clone(), json!({}))])
            .unwrap();
        let all: Vec<String> = (0..5000)
            .map(|i| i.to_string())
            .chain(["extra".to_string()])
            .collect();
        let include = Include {
            vector: true,
            metadata: true,
            ..Include::default()
        };
        let mem = ix.get(&all, include).unwrap();
        // A second engine reads everything back from the store.
        let e2 = engine(store.clone());
        let ix2 = e2.open("m", Some(&kek)).unwrap();
        assert_eq!(e2.describe(&ix2).num_vectors, e.describe(&ix).num_vectors);
        let disk = ix2.get(&all, include).unwrap();
        assert_eq!(mem.len(), disk.len());
        for (a, b) in mem.iter().zip(&disk) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.vector, b.vector, "{}", a.id);
            assert_eq!(a.metadata, b.metadata, "{}", a.id);
        }
        let want = 5000 - gone.len() + 1;
        assert_eq!(mem.len(), want);
        let q: Vec<Vec<f32>> = data[..20].to_vec();
        let h1 = ix.search(&q, &params(10)).unwrap();
        let h2 = ix2.search(&q, &params(10)).unwrap();
        for (a, b) in h1.iter().zip(&h2) {
            let ia: Vec<&str> = a.iter().map(|h| h.id.as_str()).collect();
            let ib: Vec<&str> = b.iter().map(|h| h.id.as_str()).collect();
            assert_eq!(ia, ib);
        }
    }
}

/// Position runs, merged in line and in the background, against a map (`tests/runs.rs`).
mod runs;

/// Hostile-store attacks on redb and the filesystem store (`tests/tamper.rs`).
mod tamper;

/// Indexes larger than the block cache (`tests/bounded.rs`).
mod bounded;

/// The encrypted text index against a BM25 model (`tests/text.rs`).
mod text;

/// The value index against a scan (`tests/values.rs`).
mod values;

/// Storage precisions: float16 rounding, the tq tiers through the engine
/// (`tests/precision.rs`).
mod precision;

/// The 4-bit first pass of large generations (`tests/coarse.rs`).
mod coarse;

#[test]
fn state_record_v5_layout_round_trips() {
    // docs/FORMAT.md "State record" and "Manifest page", byte by byte.
    let st = index::State {
        dimension: 128,
        gen: 3,
        trained: true,
        n_lists: 2,
        default_probes: 1,
        epoch: 9,
        meta_digest: [5; 32],
        pages: vec![(0, 0, 7), (0, 1, 9)],
        runs: vec![(0x0102_0304_0506_0708, 2, 70_000, 35)],
    };
    let raw = st.encode();
    let mut want = vec![5u8];
    want.extend_from_slice(&128u32.to_le_bytes());
    want.extend_from_slice(&3u32.to_le_bytes());
    want.push(1);
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&9u64.to_le_bytes());
    want.extend_from_slice(&[5; 32]);
    want.extend_from_slice(&2u32.to_le_bytes());
    for (lg, bg, e) in [(0u32, 0u32, 7u64), (0, 1, 9)] {
        want.extend_from_slice(&lg.to_le_bytes());
        want.extend_from_slice(&bg.to_le_bytes());
        want.extend_from_slice(&e.to_le_bytes());
    }
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    want.push(2);
    want.extend_from_slice(&70_000u64.to_le_bytes());
    want.extend_from_slice(&35u32.to_le_bytes());
    assert_eq!(raw, want);
    assert_eq!(index::State::decode_for_test(&raw).unwrap(), st);
    for cut in 0..raw.len() {
        assert!(
            index::State::decode_for_test(&raw[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    // A page or run count larger than the record can hold is refused before allocating.
    for at in [58, 58 + 4 + 2 * 16] {
        let mut huge = raw.clone();
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            index::State::decode_for_test(&huge).is_err(),
            "count at {at}"
        );
    }
    // A manifest page: version, count, then (list, block, epoch, rows).
    let entries = [(1u32, 2u32, 7u64, 30u32), (63, 1023, 9, 1)];
    let page = index::state_page_for_test(&entries);
    let mut want = vec![1u8];
    want.extend_from_slice(&2u32.to_le_bytes());
    for (l, b, e, n) in entries {
        want.extend_from_slice(&l.to_le_bytes());
        want.extend_from_slice(&b.to_le_bytes());
        want.extend_from_slice(&e.to_le_bytes());
        want.extend_from_slice(&n.to_le_bytes());
    }
    assert_eq!(page, want);
}

/// Stores written by format 2 (committed bytes) keep opening: key, config, trained lists,
/// metadata, contents. `format-v2.hex` has a v3 state record (before position records) and is
/// upgraded in place on open; `format-v2-state4.hex` has position records (upgraded to runs on
/// open); `format-v2-state5.hex` is the current layout. Regenerate the
/// current one only on a deliberate format change, with
/// `SEALDB_WRITE_FIXTURE=1 cargo test -p sealdb-server format_v2_fixture`.
#[test]
fn format_v2_fixture_still_opens() {
    for file in [
        "format-v2.hex",
        "format-v2-state4.hex",
        "format-v2-state5.hex",
    ] {
        fixture_opens(file);
    }
}

fn fixture_opens(file: &str) {
    const KEK: [u8; 32] = [0x5e; 32];
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let kek = Kek::from_bytes(KEK);
    if std::env::var_os("SEALDB_WRITE_FIXTURE").is_some() && file == "format-v2-state5.hex" {
        let store = Arc::new(MemoryStore::new());
        let e = engine(store.clone());
        create(&e, "fixture", &kek, cfg(Metric::Cosine, Precision::F16, 3));
        let ix = e.open("fixture", Some(&kek)).unwrap();
        let items: Vec<NewItem> = (0..40)
            .map(|i| {
                item(
                    &format!("f{i}"),
                    vec![i as f32, 1.0, -(i as f32) / 2.0],
                    json!({"i": i}),
                )
            })
            .collect();
        ix.upsert(items).unwrap();
        e.train_now(
            &ix,
            &TrainParams {
                n_lists: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        let text: String = store
            .scan_prefix(&[])
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{} {}\n", hex::encode(k), hex::encode(v)))
            .collect();
        std::fs::write(&path, text).unwrap();
    }
    let text = std::fs::read_to_string(&path).expect("the committed format-2 fixture");
    let store = Arc::new(MemoryStore::new());
    let mut b = WriteBatch::new();
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap();
        b.put(hex::decode(k).unwrap(), hex::decode(v).unwrap());
    }
    store.write(b).unwrap();
    let e = engine(store.clone());
    let ix = e.open("fixture", Some(&kek)).unwrap();
    let info = e.describe(&ix);
    assert_eq!(
        (
            info.dimension,
            info.num_vectors,
            info.is_trained,
            info.n_lists
        ),
        (3, 40, true, 2)
    );
    assert_eq!(
        (info.metric, info.precision),
        (Metric::Cosine, Precision::F16)
    );
    let got = ix.get(&["f7".into()], Include::STORED).unwrap();
    assert_eq!(got[0].vector.as_deref(), Some(&[7.0, 1.0, -3.5][..]));
    assert_eq!(got[0].metadata.as_deref(), Some(&json!({"i": 7})));
    assert_eq!(got[0].contents.as_deref(), Some("contents of f7"));
    assert!(matches!(
        e.open("fixture", Some(&Kek::random())),
        Err(EngineError::WrongKey(_))
    ));
    let hits = ix.search(&[vec![7.0, 1.0, -3.5]], &params(3)).unwrap();
    assert_eq!(hits[0][0].id, "f7", "{file}");
    // Opened again (after an upgrade, from what the upgrade wrote): the same answers.
    drop(ix);
    let e = engine(store);
    let ix = e.open("fixture", Some(&kek)).unwrap();
    assert_eq!(e.describe(&ix).num_vectors, 40);
    let got = ix.get(&["f7".into()], Include::STORED).unwrap();
    assert_eq!(got[0].contents.as_deref(), Some("contents of f7"));
    let mut ids = ix.list_ids().unwrap();
    ids.sort();
    assert_eq!(ids.len(), 40);
    assert_eq!(
        ix.search(&[vec![7.0, 1.0, -3.5]], &params(3)).unwrap()[0][0].id,
        "f7"
    );
}

/// A panic inside a background training (here: the store panics on write) is caught: the
/// worker goes on and trains the index once the store works again.
#[test]
fn background_training_survives_a_panic() {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Panicky(MemoryStore, AtomicBool);
    impl IndexStore for Panicky {
        fn backend(&self) -> &str {
            "panicky"
        }
        fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(k)
        }
        fn scan_prefix(&self, p: &[u8]) -> Result<Vec<sealdb_plugin_api::KeyValue>, StoreError> {
            self.0.scan_prefix(p)
        }
        fn write(&self, b: WriteBatch) -> Result<(), StoreError> {
            // Generation-1 blocks are only ever written by a training.
            let training = b.ops().iter().any(|op| match op {
                sealdb_plugin_api::WriteOp::DeletePrefix { prefix } => {
                    prefix.first() == Some(&format::kind::LIST)
                }
                _ => false,
            });
            if training && self.1.load(Ordering::SeqCst) {
                panic!("store failure injected by the test");
            }
            self.0.write(b)
        }
    }
    let store = Arc::new(Panicky(MemoryStore::new(), AtomicBool::new(true)));
    let e = Engine::new(
        store.clone(),
        EngineConfig {
            auto_train_min_vectors: 200,
            auto_train: true,
            cache_limit_bytes: None,
            train_time_limit: None,
            coarse_min_bytes: None,
            background_merges: false,
        },
    );
    let kek = Kek::random();
    create(&e, "p", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
    let ix = e.open("p", Some(&kek)).unwrap();
    let data: Vec<Vec<f32>> = (0..300).map(|i| vec![i as f32, (i % 7) as f32]).collect();
    ix.upsert(numbered(&data)).unwrap();
    let wait_idle = || {
        for _ in 0..400 {
            let st = e.training_status();
            if st.currently_training.is_none() && st.queued.is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("training never finished");
    };
    assert!(
        e.maybe_auto_train(&ix).is_some(),
        "300 vectors over a threshold of 200"
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    wait_idle();
    assert!(
        !e.describe(&ix).is_trained,
        "the panicking training must not have installed anything"
    );
    store.1.store(false, Ordering::SeqCst);
    assert!(
        e.maybe_auto_train(&ix).is_some(),
        "the worker takes new work after the panic"
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    wait_idle();
    assert!(e.describe(&ix).is_trained);
    assert_eq!(e.describe(&ix).num_vectors, 300);
}

#[test]
fn config_versions_decode_with_their_defaults() {
    // docs/FORMAT.md "Meta record": a version-2 config (schema, no BM25 parameters, no
    // flags) decodes with the BM25 defaults and without a value index; version 3 round-trips.
    let mut w = Writer::default();
    w.u8(2).u8(0).u8(1).u32(8).bytes(b"").u64(77).u32(1);
    w.bytes(b"cat").u8(1);
    let c = IndexConfig::decode(&w.0).unwrap();
    assert_eq!(c.metadata_schema[0].0, "cat");
    assert!(c.metadata_schema[0].1.filterable);
    assert_eq!(c.bm25, Bm25::default());
    assert!(
        !c.value_index,
        "an index from before the value index has none"
    );
    let mut c3 = c.clone();
    c3.value_index = true;
    c3.bm25 = Bm25 { k1: 0.5, b: 0.25 };
    c3.precision = Precision::Tq(6);
    assert_eq!(IndexConfig::decode(&c3.encode()).unwrap(), c3);
    assert!(IndexConfig::decode(&c3.encode()[..c3.encode().len() - 1]).is_err());
}
