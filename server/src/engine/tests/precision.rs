//! Storage precisions through the engine: what a write stores is exactly what reads
//! return, before and after blocks are re-sealed, for float16 and the tq tiers.

use super::*;

#[test]
fn float16_rounds_like_per_value_conversion_and_rejects_overflow() {
    use half::f16;
    // Awkward values: ties, subnormals, the largest finite float16, both signs, zeros.
    let mut v: Vec<f32> = (0..2000)
        .map(|i| ((i as f32) * 0.618).sin() * 10f32.powi(i % 11 - 6))
        .collect();
    v.extend([
        0.0,
        -0.0,
        65504.0,
        -65504.0,
        65519.0,
        1.0e-8,
        5.96e-8,
        2.0f32.powi(-14),
        1.0 + 2.0f32.powi(-11),
        1.0 + 3.0 * 2.0f32.powi(-11),
    ]);
    let want: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    let mut got = v.clone();
    Precision::F16.round_in_place(&mut got);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.to_bits(), w.to_bits());
    }
    // Encoding and decoding keep exactly the rounded values.
    let mut bytes = Vec::new();
    Precision::F16.encode_into(&got, got.len(), &mut bytes);
    assert_eq!(Precision::F16.decode(&bytes, 1, got.len()).unwrap(), got);
    let mut f32s = v.clone();
    Precision::F32.round_in_place(&mut f32s);
    assert_eq!(f32s, v);

    // Through the engine: what is stored is what a read returns; a component beyond
    // float16's range is refused and nothing of the batch is written.
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store);
    create(&e, "h", &kek, cfg(Metric::Euclidean, Precision::F16, 3));
    let ix = e.open("h", Some(&kek)).unwrap();
    ix.upsert(vec![item("a", vec![0.1, 1.0e-6, 3.3], json!({}))])
        .unwrap();
    let include = Include {
        vector: true,
        ..Include::default()
    };
    let got = ix.get(&["a".to_string()], include).unwrap();
    let mut want = vec![0.1, 1.0e-6, 3.3];
    Precision::F16.round_in_place(&mut want);
    assert_eq!(got[0].vector.as_deref(), Some(&want[..]));
    let err = ix
        .upsert(vec![
            item("b", vec![1.0, 2.0, 3.0], json!({})),
            item("c", vec![1.0, 70000.0, 3.0], json!({})),
        ])
        .unwrap_err();
    assert!(matches!(&err, EngineError::Invalid(m) if m.contains("'c'") && m.contains("float16")));
    assert_eq!(e.describe(&ix).num_vectors, 1);
    assert!(ix.get(&["b".to_string()], include).unwrap().is_empty());
}

#[test]
fn quantized_precisions_store_what_reads_return_through_edits_training_and_reopen() {
    // tq12/tq8/tq6/tq4: a read returns the decoded vector, exactly, before and after the
    // blocks are re-sealed by later writes and a training and the index is reopened; the
    // stored blocks shrink with the bits; search ranks by the decoded vectors.
    let data = clustered(600, 64, 6, 21);
    let mut sizes = Vec::new();
    for precision in [
        Precision::F32,
        Precision::Tq(12),
        Precision::Tq(8),
        Precision::Tq(6),
        Precision::Tq(4),
    ] {
        let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
        let kek = Kek::random();
        let e = engine(store.clone());
        create(&e, "q", &kek, cfg(Metric::Euclidean, precision, 64));
        let ix = e.open("q", Some(&kek)).unwrap();
        ix.upsert(numbered(&data)).unwrap();
        let want: Vec<Vec<f32>> = data
            .iter()
            .map(|v| {
                let mut v = v.clone();
                precision.round_in_place(&mut v);
                v
            })
            .collect();
        let ids: Vec<String> = (0..data.len()).map(|i| i.to_string()).collect();
        let include = Include {
            vector: true,
            ..Include::default()
        };
        let check = |ix: &Index, what: &str| {
            let got = ix.get(&ids, include).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(
                    g.vector.as_deref(),
                    Some(&w[..]),
                    "{} {what}",
                    precision.as_str()
                );
            }
        };
        check(&ix, "after upsert");
        // Rewrites of the same blocks (an overwrite of one row each) and a training re-seal
        // every stored row.
        ix.upsert(vec![item("0", data[0].clone(), json!({"x": 1}))])
            .unwrap();
        train_lists(&e, &ix, 4);
        check(&ix, "after training");
        let hits = ix.search(&[want[5].clone()], &params(1)).unwrap();
        assert_eq!(hits[0][0].id, "5");
        assert_eq!(
            hits[0][0].distance, 0.0,
            "distance to the stored vector itself"
        );
        let bytes: usize = store
            .scan_prefix(&format::scoped_prefix(format::kind::LIST, &ix.id))
            .unwrap()
            .iter()
            .map(|(_, v)| v.len())
            .sum();
        sizes.push((precision.as_str(), bytes));
        drop(ix);
        let e2 = engine(store.clone());
        check(&e2.open("q", Some(&kek)).unwrap(), "after reopen");
    }
    // Stored blocks shrink with the bits (ids and metadata are the same in each).
    assert!(sizes.windows(2).all(|w| w[1].1 < w[0].1), "{sizes:?}");
    assert!(
        sizes[4].1 * 4 < sizes[0].1,
        "tq4 blocks are far smaller than float32: {sizes:?}"
    );
}

#[test]
fn quantized_blocks_are_cached_packed_and_search_as_their_decoded_vectors() {
    // A float16 or tq index keeps its blocks packed in a cache it would crowd (tq scanned
    // in the rotated domain), decoded in one with room to spare; what it answers must be what an exact scan of the decoded vectors answers:
    // the same ids in the same order with the same distances, for single, batched and
    // filtered queries. The cache holds fewer bytes the fewer bits a tier keeps.
    let dim = 64;
    let mut rng = StdRng::seed_from_u64(8);
    // No cluster structure: the calibrated n_probes is large, as for the 8-bit first pass.
    let data: Vec<Vec<f32>> = (0..2500)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0f32)).collect())
        .collect();
    let queries: Vec<Vec<f32>> = (0..12)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0f32)).collect())
        .collect();
    let (mut cached, mut roomy) = (Vec::new(), Vec::new());
    for metric in [Metric::Euclidean, Metric::Cosine] {
        for precision in [
            Precision::F32,
            Precision::F16,
            Precision::Tq(12),
            Precision::Tq(8),
            Precision::Tq(6),
            Precision::Tq(4),
        ] {
            let what = format!("{metric:?} {}", precision.as_str());
            let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
            let kek = Kek::random();
            let e = engine(store.clone());
            create(&e, "p", &kek, cfg(metric, precision, dim as u32));
            let ix = e.open("p", Some(&kek)).unwrap();
            ix.upsert(numbered(&data)).unwrap();
            train_lists(&e, &ix, 8);
            if matches!(precision, Precision::Tq(_)) {
                assert_eq!(ix.quant_state().0, 0, "{what}: no 8-bit codes on top of tq");
            }
            drop(ix);
            // A fresh engine: its cache holds only what the queries below read. Under a
            // budget the decoded index would fill more than half of, blocks stay packed;
            // with room to spare they are held decoded. The answers are the same.
            for budget in [Some(1_200_000), None] {
                let e = engine_with_cache(store.clone(), budget);
                let ix = e.open("p", Some(&kek)).unwrap();
                let decoded: Vec<Vec<f32>> = data
                    .iter()
                    .map(|v| {
                        let mut v = v.clone();
                        precision.round_in_place(&mut v);
                        v
                    })
                    .collect();
                let mut p = params(10);
                p.include.contents = false;
                p.n_probes = Some(8);
                let model = |q: &[f32]| -> Vec<(String, f32)> {
                    let qn = distance::normalized(q);
                    let mut all: Vec<(f32, usize)> = decoded
                        .iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let s = if metric.is_angular() {
                                1.0 - distance::dot(&qn, x) * distance::inv_norm(x)
                            } else {
                                distance::l2sq(q, x)
                            };
                            (s, i)
                        })
                        .collect();
                    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    all.iter()
                        .take(10)
                        .map(|&(s, i)| (i.to_string(), metric.finish(s)))
                        .collect()
                };
                let as_pairs = |hits: &[Hit]| -> Vec<(String, f32)> {
                    hits.iter().map(|h| (h.id.clone(), h.distance)).collect()
                };
                let batch = ix.search(&queries, &p).unwrap();
                let mut filtered = p.clone();
                filtered.filter = crate::engine::filter::Filter::compile(
                    json!({"absent": {"$exists": false}}).as_object().unwrap(),
                )
                .unwrap();
                for (q, b) in queries.iter().zip(&batch) {
                    let want = model(q);
                    let one = ix.search(std::slice::from_ref(q), &p).unwrap().remove(0);
                    assert_eq!(as_pairs(&one), want, "{what}: a single query");
                    assert_eq!(as_pairs(b), want, "{what}: a batched query");
                    let f = ix
                        .search(std::slice::from_ref(q), &filtered)
                        .unwrap()
                        .remove(0);
                    assert_eq!(as_pairs(&f), want, "{what}: a filtered query");
                    let v = one[0].vector.as_deref().unwrap();
                    assert_eq!(v, &decoded[one[0].id.parse::<usize>().unwrap()][..]);
                }
                if metric == Metric::Euclidean {
                    let bytes = e.cache_stats().bytes;
                    match budget {
                        Some(_) => cached.push((precision.as_str(), bytes)),
                        None => roomy.push((precision.as_str(), bytes)),
                    }
                }
            }
        }
    }
    // With room to spare, every tier's blocks are held as floats (float32's bytes, give or
    // take the 8-bit codes that only float32 and float16 lists carry).
    assert!(
        roomy.iter().all(|r| r.1 * 10 >= roomy[0].1 * 6),
        "held decoded: {roomy:?}"
    );
    // Every block was read, so the cache holds the whole index; fewer bits, fewer bytes.
    assert!(cached.windows(2).all(|w| w[1].1 < w[0].1), "{cached:?}");
    assert!(
        cached[5].1 * 3 < cached[0].1,
        "tq4 against float32: {cached:?}"
    );
    eprintln!("block cache bytes holding the whole index: {cached:?}");
}
