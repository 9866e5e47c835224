//! The id -> position index (position runs) against a plain map of the writes: merges in
//! line (level by level, newest entry winning, tombstones dropped at the bottom) and in the
//! background (writers on several threads, a training among them), before and after a
//! reopen, on redb.

use super::*;

/// Position runs merge as batches accumulate (level by level, newest entry winning,
/// tombstones dropped at the bottom), and every id lookup (get, overwrite, delete) answers
/// as a plain map of the writes would, before and after a reopen, on redb.
#[test]
fn position_runs_merge_and_answer_as_a_map() {
    let dir = tempfile::tempdir().unwrap();
    let store = redb(dir.path());
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, "r", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
    let ix = e.open("r", Some(&kek)).unwrap();
    let mut model: std::collections::BTreeMap<String, f32> = Default::default();
    let mut rng = StdRng::seed_from_u64(11);
    for round in 0..150u32 {
        if round % 7 == 6 {
            let ids: Vec<String> = (0..5)
                .map(|_| rng.random_range(0..400u32).to_string())
                .collect();
            let want = ids
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .iter()
                .filter(|id| model.remove(id.as_str()).is_some())
                .count();
            assert_eq!(ix.delete_ids(&ids).unwrap(), want, "round {round}");
        } else {
            let items: Vec<NewItem> = (0..6)
                .map(|j| {
                    let id = rng.random_range(0..400u32).to_string();
                    let x = (round * 10 + j) as f32;
                    model.insert(id.clone(), x);
                    item(&id, vec![x, 1.0], json!({}))
                })
                .collect();
            ix.upsert(items).unwrap();
        }
        if round == 75 {
            train_lists(&e, &ix, 4);
        }
    }
    let levels = ix.run_levels();
    assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
    assert!(levels.iter().any(|&l| l > 0), "merges happened: {levels:?}");
    for level in 0..=*levels.iter().max().unwrap() {
        // Eight runs of a level are merged (runs::FANOUT).
        assert!(levels.iter().filter(|&&l| l == level).count() < 8);
    }
    type Model = std::collections::BTreeMap<String, f32>;
    let check = |ix: &Index, model: &Model| {
        let ids: Vec<String> = (0..400u32).map(|i| i.to_string()).collect();
        let got = ix.get(&ids, Include::STORED).unwrap();
        let have: std::collections::BTreeMap<String, f32> = got
            .iter()
            .map(|f| (f.id.clone(), f.vector.as_ref().unwrap()[0]))
            .collect();
        assert_eq!(&have, model);
        let mut listed = ix.list_ids().unwrap();
        listed.sort();
        assert_eq!(listed, model.keys().cloned().collect::<Vec<_>>());
    };
    check(&ix, &model);
    drop(ix);
    let e2 = engine(store.clone());
    let ix2 = e2.open("r", Some(&kek)).unwrap();
    check(&ix2, &model);
    // Overwrites after the reopen find the old rows through the runs (no second row).
    let some: Vec<String> = model.keys().take(3).cloned().collect();
    ix2.upsert(
        some.iter()
            .map(|id| item(id, vec![-1.0, 1.0], json!({})))
            .collect(),
    )
    .unwrap();
    for id in &some {
        model.insert(id.clone(), -1.0);
    }
    check(&ix2, &model);
}

/// Position runs merged in the background (as the server runs): writers on four threads,
/// readers beside them, a training in the middle and a bounded cache. Once the mergers
/// settle, the levels are what in-line merges leave (fewer than `FANOUT` runs a level) and
/// every lookup answers as a plain map of the writes does, before and after a reopen; a
/// deleted index leaves no run behind.
#[test]
fn background_merges_answer_as_a_map() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let store = redb(dir.path());
    let kek = Kek::random();
    let e = engine_with(store.clone(), Some(4 << 20), true);
    create(&e, "bg", &kek, cfg(Metric::Euclidean, Precision::F32, 4));
    let ix = e.open("bg", Some(&kek)).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let models: Vec<BTreeMap<String, f32>> = std::thread::scope(|sc| {
        let writers: Vec<_> = (0..4u32)
            .map(|t| {
                let ix = &ix;
                let e = &e;
                sc.spawn(move || {
                    let mut model = BTreeMap::new();
                    let mut rng = StdRng::seed_from_u64(100 + t as u64);
                    for round in 0..90u32 {
                        let id = |rng: &mut StdRng| format!("{t}-{}", rng.random_range(0..600u32));
                        if round % 9 == 8 {
                            let ids: Vec<String> = (0..20).map(|_| id(&mut rng)).collect();
                            let want = ids
                                .iter()
                                .collect::<std::collections::BTreeSet<_>>()
                                .iter()
                                .filter(|i| model.remove(i.as_str()).is_some())
                                .count();
                            assert_eq!(ix.delete_ids(&ids).unwrap(), want, "{t}/{round}");
                        } else {
                            let items: Vec<NewItem> = (0..40)
                                .map(|j| {
                                    let i = id(&mut rng);
                                    let x = (round * 100 + j) as f32;
                                    model.insert(i.clone(), x);
                                    item(&i, vec![x, t as f32, 1.0, -1.0], json!({}))
                                })
                                .collect();
                            ix.upsert(items).unwrap();
                        }
                        if t == 0 && round == 45 {
                            train_lists(e, ix, 8);
                        }
                    }
                    model
                })
            })
            .collect();
        let ix = &ix;
        let done = &done;
        sc.spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let ids: Vec<String> = (0..50).map(|i| format!("1-{i}")).collect();
                for f in ix.get(&ids, Include::STORED).unwrap() {
                    assert!(f.id.starts_with("1-"));
                }
                ix.search(&[vec![1.0, 1.0, 1.0, -1.0]], &params(5)).unwrap();
            }
        });
        let models = writers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Release);
        models
    });
    let model: BTreeMap<String, f32> = models.into_iter().flatten().collect();
    ix.settle_merges();
    let levels = ix.run_levels();
    assert!(levels.iter().any(|&l| l > 0), "merges happened: {levels:?}");
    assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
    for level in 0..=*levels.iter().max().unwrap() {
        assert!(
            levels.iter().filter(|&&l| l == level).count() < 8,
            "{levels:?}"
        );
    }
    let check = |ix: &Index| {
        let ids: Vec<String> = (0..4)
            .flat_map(|t| (0..600).map(move |i| format!("{t}-{i}")))
            .collect();
        let have: BTreeMap<String, f32> = ix
            .get(&ids, Include::STORED)
            .unwrap()
            .iter()
            .map(|f| (f.id.clone(), f.vector.as_ref().unwrap()[0]))
            .collect();
        assert_eq!(have, model);
        let mut listed = ix.list_ids().unwrap();
        listed.sort();
        assert_eq!(listed, model.keys().cloned().collect::<Vec<_>>());
    };
    check(&ix);
    let id = ix.id;
    drop(ix);
    drop(e);
    let e2 = engine_with(store.clone(), Some(4 << 20), true);
    let ix2 = e2.open("bg", Some(&kek)).unwrap();
    check(&ix2);
    // Writes that leave merges due, then the index deleted at once: whatever the mergers
    // had under way is dropped, and nothing of the index stays in the store.
    for round in 0..12u32 {
        let items: Vec<NewItem> = (0..300)
            .map(|j| {
                item(
                    &format!("x{round}-{j}"),
                    vec![j as f32, 0.0, 0.0, 0.0],
                    json!({}),
                )
            })
            .collect();
        ix2.upsert(items).unwrap();
    }
    drop(ix2);
    e2.delete("bg", Some(&kek)).unwrap();
    e2.settle_merges();
    let left = store
        .scan_keys(&format::scoped_prefix(format::kind::RUN, &id))
        .unwrap();
    assert!(left.is_empty(), "{} run records left", left.len());
}
