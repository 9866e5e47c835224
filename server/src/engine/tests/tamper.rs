//! Tamper tests: a hostile store that flips a byte, swaps two blobs, duplicates one, deletes
//! one or restores an older version of one is caught with an integrity error, on the redb
//! store and on the filesystem store. Each attack runs on a fresh store, then a fresh engine
//! (nothing cached) opens the index: attacks on the state and meta records fail the open,
//! attacks on blocks fail the first read of the block, attacks on position and item records
//! fail the read of that item.

use super::*;

type Snapshot = Vec<(Vec<u8>, Vec<u8>)>;
type OpenStore = fn(&std::path::Path) -> Arc<dyn IndexStore>;
type Attack = (&'static str, fn(&Setup));
type Locate<'a> = &'a dyn Fn(&Setup, &str) -> Vec<u8>;
type ItemAttack = (&'static str, fn(&Setup, Locate<'_>));

struct Setup {
    store: Arc<dyn IndexStore>,
    kek: Kek,
    id: IndexId,
    /// Everything as it was before the last upsert and the rewrap.
    before: Snapshot,
    _dir: tempfile::TempDir,
}

fn stores() -> Vec<(&'static str, OpenStore)> {
    vec![
        ("redb", redb as OpenStore),
        ("filesystem", |p| {
            Arc::new(sealdb_store_fs::FsStore::open(p).unwrap()) as Arc<dyn IndexStore>
        }),
    ]
}

fn setup(open: OpenStore) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, "t", &kek, cfg(Metric::Euclidean, Precision::F32, 4));
    let ix = e.open("t", Some(&kek)).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let data: Vec<Vec<f32>> = (0..400)
        .map(|_| (0..4).map(|_| rng.random::<f32>()).collect())
        .collect();
    ix.upsert(numbered(&data)).unwrap();
    train_lists(&e, &ix, 4);
    let before = store.scan_prefix(&[]).unwrap();
    // Change some blocks, their items' contents, the state, and (by a rewrap) the meta.
    let changed: Vec<NewItem> = (0..40)
        .map(|i| {
            let mut it = item(&i.to_string(), vec![0.5; 4], json!({"v": 2}));
            it.contents = Some(format!("new contents {i}"));
            it
        })
        .collect();
    ix.upsert(changed).unwrap();
    let id = ix.id;
    drop(ix);
    e.rewrap("t", &kek, &kek, None).unwrap();
    Setup {
        store,
        kek,
        id,
        before,
        _dir: dir,
    }
}

fn of_kind(s: &Setup, kind: u8) -> Snapshot {
    s.store
        .scan_prefix(&format::scoped_prefix(kind, &s.id))
        .unwrap()
}

fn older(s: &Setup, key: &[u8]) -> Option<Vec<u8>> {
    s.before
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

fn put(s: &Setup, k: &[u8], v: &[u8]) {
    let mut b = WriteBatch::new();
    b.put(k.to_vec(), v.to_vec());
    s.store.write(b).unwrap();
}

fn del(s: &Setup, k: &[u8]) {
    let mut b = WriteBatch::new();
    b.delete(k.to_vec());
    s.store.write(b).unwrap();
}

fn flip(v: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    let i = v.len() / 2;
    v[i] ^= 0x20;
    v
}

/// Open with a fresh engine; the attack must surface as an integrity error.
fn open_fails(s: &Setup, store_name: &str, attack: &str) {
    let e = engine(s.store.clone());
    match e.open("t", Some(&s.kek)) {
        Err(EngineError::Integrity { .. }) => {}
        Err(other) => panic!("{store_name}/{attack}: expected an integrity error, got {other}"),
        Ok(_) => panic!("{store_name}/{attack}: the tampered index opened"),
    }
}

/// Each attack on a fresh setup; opening must then fail with an integrity error.
fn run_open_attacks(name: &str, open: OpenStore, attacks: &[Attack]) {
    for (what, attack) in attacks {
        let s = setup(open);
        attack(&s);
        open_fails(&s, name, what);
    }
}

/// Open works (blocks are read on demand); reading every block fails.
fn reads_fail(s: &Setup, store_name: &str, attack: &str) {
    let e = engine(s.store.clone());
    let ix = e.open("t", Some(&s.kek)).unwrap();
    match ix.list_ids() {
        Err(EngineError::Integrity { .. }) => {}
        other => panic!(
            "{store_name}/{attack}: expected an integrity error, got {other:?}",
            other = other.map(|v| v.len())
        ),
    }
    let p = SearchParams {
        top_k: 400,
        n_probes: Some(4),
        greedy: false,
        filter: None,
        include: Include::default(),
    };
    assert!(
        matches!(
            ix.search(&[vec![0.5; 4]], &p),
            Err(EngineError::Integrity { .. })
        ),
        "{store_name}/{attack}: a query over every list must fail"
    );
}

/// Open works (the attack is on item contents), reading the contents fails.
fn contents_fail(s: &Setup, store_name: &str, attack: &str, id: &str) {
    let e = engine(s.store.clone());
    let ix = e.open("t", Some(&s.kek)).unwrap();
    let inc = Include {
        contents: true,
        ..Default::default()
    };
    match ix.get(&[id.to_string()], inc) {
        Err(EngineError::Integrity { .. }) => {}
        other => panic!(
            "{store_name}/{attack}: expected an integrity error, got {other:?}",
            other = other.map(|v| v.len())
        ),
    }
    // Without contents the item is still served.
    assert_eq!(
        ix.get(&[id.to_string()], Include::default()).unwrap().len(),
        1
    );
}

#[test]
fn untampered_index_opens_and_serves_new_contents() {
    for (name, open) in stores() {
        let s = setup(open);
        let e = engine(s.store.clone());
        let ix = e.open("t", Some(&s.kek)).unwrap();
        let inc = Include {
            contents: true,
            ..Default::default()
        };
        let got = ix.get(&["3".into(), "300".into()], inc).unwrap();
        assert_eq!(got[0].contents.as_deref(), Some("new contents 3"), "{name}");
        assert_eq!(
            got[1].contents.as_deref(),
            Some("contents of 300"),
            "{name}"
        );
    }
}

#[test]
fn block_attacks() {
    for (name, open) in stores() {
        let attacks: [Attack; 5] = [
            ("flip a byte", |s| {
                let (k, v) = &of_kind(s, format::kind::LIST)[0];
                put(s, k, &flip(v));
            }),
            ("swap two blocks", |s| {
                let b = of_kind(s, format::kind::LIST);
                put(s, &b[0].0, &b[1].1);
                put(s, &b[1].0, &b[0].1);
            }),
            ("duplicate a block onto another's key", |s| {
                let b = of_kind(s, format::kind::LIST);
                put(s, &b[1].0, &b[0].1);
            }),
            ("delete a block", |s| {
                let (k, _) = &of_kind(s, format::kind::LIST)[0];
                del(s, k);
            }),
            ("restore an older block", |s| {
                let rolled = of_kind(s, format::kind::LIST)
                    .into_iter()
                    .find_map(|(k, v)| older(s, &k).filter(|o| *o != v).map(|o| (k, o)))
                    .expect("the last upsert changed a block");
                put(s, &rolled.0, &rolled.1);
            }),
        ];
        for (what, attack) in attacks {
            let s = setup(open);
            attack(&s);
            reads_fail(&s, name, what);
        }
        // A block under a key the manifest does not name is never read: the index answers
        // exactly as before.
        let s = setup(open);
        let (k, v) = of_kind(&s, format::kind::LIST)[0].clone();
        let mut k2 = k.clone();
        let n = k2.len();
        k2[n - 1] = k2[n - 1].wrapping_add(9);
        let ids_before = {
            let e = engine(s.store.clone());
            let ix = e.open("t", Some(&s.kek)).unwrap();
            let mut ids = ix.list_ids().unwrap();
            ids.sort();
            ids
        };
        put(&s, &k2, &v);
        let e = engine(s.store.clone());
        let ix = e.open("t", Some(&s.kek)).unwrap();
        let mut ids = ix.list_ids().unwrap();
        ids.sort();
        assert_eq!(
            ids, ids_before,
            "{name}: an unreferenced block changed the index"
        );
    }
}

/// Position runs: a page altered, deleted or taken from another run fails the lookups that
/// read it; a run header that is altered, missing or another run's fails the open.
#[test]
fn position_run_attacks() {
    type RunAttack = (&'static str, fn(&Setup, u32, &[(u64, u64)]));
    for (name, open) in stores() {
        let runs_of = |s: &Setup| {
            let e = engine(s.store.clone());
            let ix = e.open("t", Some(&s.kek)).unwrap();
            let gen = ix.read().gen;
            (gen, ix.run_ids())
        };
        // The oldest run is training's (all 400 items); the newest holds those of the 40
        // overwritten items that moved.
        let page_attacks: [RunAttack; 3] = [
            ("flip a byte of a run page", |s, gen, runs| {
                let k = format::run_page_key(&s.id, gen, runs[runs.len() - 1].0, 0);
                let v = s.store.get(&k).unwrap().unwrap();
                put(s, &k, &flip(&v));
            }),
            ("delete a run page", |s, gen, runs| {
                del(
                    s,
                    &format::run_page_key(&s.id, gen, runs[runs.len() - 1].0, 0),
                );
            }),
            ("put another run's page in its place", |s, gen, runs| {
                let from = format::run_page_key(&s.id, gen, runs[0].0, 0);
                let v = s.store.get(&from).unwrap().unwrap();
                put(
                    s,
                    &format::run_page_key(&s.id, gen, runs[runs.len() - 1].0, 0),
                    &v,
                );
            }),
        ];
        for (what, attack) in page_attacks {
            let s = setup(open);
            let (gen, runs) = runs_of(&s);
            assert_eq!(runs.len(), 2, "{name}: training's run and the upsert's");
            assert!(
                runs[0].1 > 0 && runs[0].1 <= 40 && runs[1].1 == 400,
                "{runs:?}"
            );
            attack(&s, gen, &runs);
            let e = engine(s.store.clone());
            let ix = e.open("t", Some(&s.kek)).unwrap();
            for res in [
                ix.get(&["300".into()], Include::default()).map(|v| v.len()),
                ix.delete_ids(&["300".into()]),
                ix.upsert(vec![item("300", vec![0.1; 4], json!({}))]),
            ] {
                assert!(
                    matches!(res, Err(EngineError::Integrity { .. })),
                    "{name}/{what}: expected an integrity error, got {res:?}"
                );
            }
        }
        let header_attacks: [RunAttack; 3] = [
            ("flip a byte of a run header", |s, gen, runs| {
                let k = format::run_page_key(&s.id, gen, runs[0].0, u32::MAX);
                let v = s.store.get(&k).unwrap().unwrap();
                put(s, &k, &flip(&v));
            }),
            ("delete a run header", |s, gen, runs| {
                del(s, &format::run_page_key(&s.id, gen, runs[0].0, u32::MAX));
            }),
            ("put another run's header in its place", |s, gen, runs| {
                let from = format::run_page_key(&s.id, gen, runs[1].0, u32::MAX);
                let v = s.store.get(&from).unwrap().unwrap();
                put(
                    s,
                    &format::run_page_key(&s.id, gen, runs[0].0, u32::MAX),
                    &v,
                );
            }),
        ];
        for (what, attack) in header_attacks {
            let s = setup(open);
            let (gen, runs) = runs_of(&s);
            attack(&s, gen, &runs);
            let res = engine(s.store.clone()).open("t", Some(&s.kek)).map(|_| ());
            assert!(
                matches!(res, Err(EngineError::Integrity { .. })),
                "{name}/{what}: expected an integrity error at open, got {res:?}"
            );
        }
    }
}

/// The state record, the manifest pages and the meta record are checked when the index
/// opens.
#[test]
fn state_and_meta_attacks() {
    for (name, open) in stores() {
        let attacks: [Attack; 7] = [
            ("flip a byte of a manifest page", |s| {
                let (k, v) = &of_kind(s, format::kind::PAGE)[0];
                put(s, k, &flip(v));
            }),
            ("delete a manifest page", |s| {
                let (k, _) = &of_kind(s, format::kind::PAGE)[0];
                del(s, k);
            }),
            ("restore an older manifest page", |s| {
                let rolled = of_kind(s, format::kind::PAGE)
                    .into_iter()
                    .find_map(|(k, v)| older(s, &k).filter(|o| *o != v).map(|o| (k, o)))
                    .expect("the last upsert changed a manifest page");
                put(s, &rolled.0, &rolled.1);
            }),
            ("flip a byte of the state", |s| {
                let k = format::state_key(&s.id);
                let v = s.store.get(&k).unwrap().unwrap();
                put(s, &k, &flip(&v));
            }),
            ("delete the state", |s| del(s, &format::state_key(&s.id))),
            ("restore an older state", |s| {
                let k = format::state_key(&s.id);
                put(s, &k, &older(s, &k).unwrap());
            }),
            ("restore an older meta record", |s| {
                let k = format::meta_key("t");
                let old = older(s, &k).unwrap();
                assert_ne!(Some(old.clone()), s.store.get(&k).unwrap());
                put(s, &k, &old);
            }),
        ];
        run_open_attacks(name, open, &attacks);
    }
}

#[test]
fn item_record_attacks() {
    for (name, open) in stores() {
        // Item "3" was rewritten by the last upsert; "300" was not.
        let loc = |s: &Setup, id: &str| {
            let e = engine(s.store.clone());
            let ix = e.open("t", Some(&s.kek)).unwrap();
            format::item_key(&s.id, &ix.keys.id_locator(id))
        };
        let attacks: [ItemAttack; 4] = [
            ("flip a byte", |s, loc| {
                let k = loc(s, "3");
                let v = s.store.get(&k).unwrap().unwrap();
                put(s, &k, &flip(&v));
            }),
            ("swap two item records", |s, loc| {
                let (a, b) = (loc(s, "3"), loc(s, "300"));
                let (va, vb) = (
                    s.store.get(&a).unwrap().unwrap(),
                    s.store.get(&b).unwrap().unwrap(),
                );
                put(s, &a, &vb);
                put(s, &b, &va);
            }),
            ("delete an item record", |s, loc| del(s, &loc(s, "3"))),
            ("restore an older item record", |s, loc| {
                let k = loc(s, "3");
                put(s, &k, &older(s, &k).unwrap());
            }),
        ];
        for (what, attack) in attacks {
            let s = setup(open);
            attack(&s, &loc);
            contents_fail(&s, name, what, "3");
        }
        // Duplicating one item's record onto another's locator: that one fails.
        let s = setup(open);
        let (a, b) = (loc(&s, "3"), loc(&s, "300"));
        put(&s, &b, &s.store.get(&a).unwrap().unwrap());
        contents_fail(&s, name, "duplicate an item record", "300");
    }
}
