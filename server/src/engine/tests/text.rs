//! The encrypted text index against a model: after random upserts, overwrites and deletes
//! (enough writes to one term that searches fold its records), across a training and a
//! reopen, every search ranks exactly as BM25 computed from scratch over the items held.

use std::collections::BTreeMap;

use super::*;
use crate::engine::text::{self as tx, FieldStats, Posting, TextQuery, TextStats};

const WORDS: [&str; 12] = [
    "fox", "foxes", "dog", "running", "runner", "red", "the", "quick", "lazy", "bird", "jumps",
    "over",
];

fn schema() -> IndexConfig {
    let mut c = cfg(Metric::Euclidean, Precision::F32, 2);
    let ft = FieldSchema {
        filterable: false,
        pattern: false,
        full_text: true,
    };
    c.metadata_schema = vec![("title".into(), ft), ("info.body".into(), ft)];
    c.bm25 = Bm25 { k1: 1.5, b: 0.6 };
    c
}

fn random_text(rng: &mut StdRng) -> serde_json::Value {
    let n = rng.random_range(0..6);
    let words: Vec<&str> = (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    json!(words.join(" "))
}

fn random_meta(rng: &mut StdRng) -> serde_json::Value {
    match rng.random_range(0..5) {
        0 => json!({}),
        1 => json!({"title": random_text(rng)}),
        2 => json!({"title": 7, "info": {"body": random_text(rng)}}),
        _ => {
            json!({"title": random_text(rng), "info": {"body": random_text(rng)}, "k": rng.random_range(0..3)})
        }
    }
}

/// BM25 from scratch over `items` (id -> metadata), as the engine should rank.
fn model(
    items: &BTreeMap<String, serde_json::Value>,
    c: &IndexConfig,
    q: &TextQuery,
) -> Vec<(String, f64)> {
    let fields = c.text_fields();
    let mut stats = TextStats {
        seq: 0,
        fields: vec![FieldStats::default(); fields.len()],
    };
    let mut lists: Vec<Vec<tx::PostingList>> =
        vec![vec![Default::default(); q.fields.len()]; q.terms.len()];
    for (id, m) in items {
        for (fi, f) in fields.iter().enumerate() {
            let ft = tx::field_terms(Some(m), f);
            if ft.len > 0 {
                stats.fields[fi].docs += 1;
                stats.fields[fi].total_len += u64::from(ft.len);
            }
            for (ti, t) in q.terms.iter().enumerate() {
                for (qi, (qf, _, _)) in q.fields.iter().enumerate() {
                    if *qf == fi {
                        if let Some(&tf) = ft.tf.get(t) {
                            lists[ti][qi].insert(id.clone(), Posting { tf, len: ft.len });
                        }
                    }
                }
            }
        }
    }
    tx::score(&c.bm25, q, &stats, &lists)
}

fn queries() -> Vec<TextQuery> {
    let mk = |text: &str, fields: Vec<(usize, &str, f64)>, all: bool| TextQuery {
        terms: tx::query_terms(text),
        fields: fields
            .into_iter()
            .map(|(i, n, w)| (i, n.to_owned(), w))
            .collect(),
        require_all: all,
    };
    let both = || vec![(0, "title", 1.0), (1, "info.body", 1.0)];
    vec![
        mk("fox", both(), false),
        mk("quick running dog", both(), false),
        mk("quick running dog", both(), true),
        mk("red bird", vec![(1, "info.body", 2.5)], false),
        mk(
            "FOXES jumps",
            vec![(0, "title", 0.5), (1, "info.body", 2.0)],
            false,
        ),
        mk("the", both(), false),
    ]
}

fn assert_same(got: &[(String, f64)], want: &[(String, f64)], what: &str) {
    let ids = |v: &[(String, f64)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.1 - w.1).abs() < 1e-9,
            "{what}: {} {} vs {}",
            g.0,
            g.1,
            w.1
        );
    }
}

#[test]
fn text_index_ranks_as_bm25_from_scratch_through_writes_training_and_reopen() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store.clone());
    let c = schema();
    create(&e, "t", &kek, c.clone());
    let ix = e.open("t", Some(&kek)).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut items: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for round in 0..40 {
        let mut batch = Vec::new();
        for _ in 0..rng.random_range(1..12) {
            let id = format!("i{}", rng.random_range(0..60));
            let m = random_meta(&mut rng);
            items.insert(id.clone(), m.clone());
            batch.push(item(&id, vec![rng.random(), rng.random()], m));
        }
        ix.upsert(batch).unwrap();
        if round % 3 == 2 {
            let gone: Vec<String> = (0..3)
                .map(|_| format!("i{}", rng.random_range(0..60)))
                .collect();
            for g in &gone {
                items.remove(g);
            }
            ix.delete_ids(&gone).unwrap();
        }
        // Every round writes "fox" somewhere often enough that its records get folded.
        for q in queries() {
            assert_same(
                &ix.text_search(&q).unwrap(),
                &model(&items, &c, &q),
                &format!("round {round}"),
            );
        }
    }
    let fox = tx::query_terms("fox");
    let tag = ix.keys.term_tag("title", &fox[0]);
    let records = store
        .scan_keys(&format::term_prefix(&ix.id, &tag))
        .unwrap()
        .len();
    assert!(
        records <= 17,
        "searches fold a term's records ({records} left)"
    );
    train_lists(&e, &ix, 2);
    for q in queries() {
        assert_same(
            &ix.text_search(&q).unwrap(),
            &model(&items, &c, &q),
            "after training",
        );
    }
    drop(ix);
    let e2 = engine(store.clone());
    let ix2 = e2.open("t", Some(&kek)).unwrap();
    for q in queries() {
        assert_same(
            &ix2.text_search(&q).unwrap(),
            &model(&items, &c, &q),
            "after reopen",
        );
    }
    // A filter narrows the ranking without reordering it.
    let f = filter::Filter::compile(json!({"k": 1}).as_object().unwrap())
        .unwrap()
        .unwrap();
    let q = &queries()[0];
    let want: Vec<(String, f64)> = model(&items, &c, q)
        .into_iter()
        .filter(|(id, _)| items[id].get("k") == Some(&json!(1)))
        .take(3)
        .collect();
    assert_same(
        &ix2.text_top(q, Some(&f), Some(3)).unwrap(),
        &want,
        "filtered",
    );
    e2.delete("t", Some(&kek)).unwrap();
    assert!(
        store.scan_prefix(b"").unwrap().is_empty(),
        "delete leaves no text records behind"
    );
}

#[test]
fn text_records_reveal_no_term_and_do_not_open_elsewhere() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store.clone());
    create(&e, "t", &kek, schema());
    let ix = e.open("t", Some(&kek)).unwrap();
    ix.upsert(vec![
        item("a", vec![0.0, 1.0], json!({"title": "zebracorn gallops"})),
        item("b", vec![1.0, 0.0], json!({"title": "zebracorn sleeps"})),
    ])
    .unwrap();
    for (k, v) in store.scan_prefix(b"").unwrap() {
        for needle in [
            &b"zebracorn"[..],
            b"zebracorn".to_ascii_uppercase().as_slice(),
            b"gallop",
            b"title",
        ] {
            assert!(
                !k.windows(needle.len()).any(|w| w == needle),
                "a key names a term"
            );
            assert!(
                !v.windows(needle.len()).any(|w| w == needle),
                "a value holds a term"
            );
        }
    }
    // Move one term's postings under another term's key: the search fails closed.
    let tag = |t: &str| ix.keys.term_tag("title", &tx::query_terms(t)[0]);
    let from = store
        .scan_prefix(&format::term_prefix(&ix.id, &tag("gallops")))
        .unwrap();
    let to = store
        .scan_keys(&format::term_prefix(&ix.id, &tag("sleeps")))
        .unwrap();
    let mut b = WriteBatch::new();
    b.put(to[0].clone(), from[0].1.clone());
    store.write(b).unwrap();
    let q = TextQuery {
        terms: tx::query_terms("sleeps"),
        fields: vec![(0, "title".into(), 1.0)],
        require_all: false,
    };
    assert!(matches!(
        ix.text_search(&q),
        Err(EngineError::Integrity { .. })
    ));
}
