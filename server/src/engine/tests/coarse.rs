//! The 4-bit first pass (`index/coarse.rs`): a generation trained with it answers the same
//! whatever the cache holds (bounded or not, cold or warm, before and after a restart), its
//! answers are exact distances of the stored vectors and find the true neighbours, and once
//! the codes are cached a query decrypts only its candidates' blocks.

use super::*;

const DIM: usize = 128;
const N: usize = 20_000;

fn redb(dir: &std::path::Path) -> Arc<dyn IndexStore> {
    Arc::new(sealdb_store_redb::RedbStore::open_dir(dir).unwrap())
}

/// Eight well-separated clusters, so that 48 lists split each in six and queries
/// probe few of them (no 8-bit pass).
fn vector(rng: &mut StdRng, cluster: usize) -> Vec<f32> {
    let mut c = StdRng::seed_from_u64(1000 + cluster as u64);
    (0..DIM)
        .map(|_| c.random::<f32>() * 40.0 + rng.random::<f32>() * 2.0)
        .collect()
}

fn items(seed: u64, ids: std::ops::Range<usize>) -> Vec<NewItem> {
    padded(seed, ids, 0)
}

/// [`items`] with `pad` bytes of metadata each (fewer rows per block).
fn padded(seed: u64, ids: std::ops::Range<usize>, pad: usize) -> Vec<NewItem> {
    let mut rng = StdRng::seed_from_u64(seed);
    let text = "x".repeat(pad);
    ids.map(|i| {
        let meta = if pad > 0 {
            json!({"i": i, "pad": text})
        } else {
            json!({"i": i})
        };
        item(&format!("id{i}"), vector(&mut rng, i % 8), meta)
    })
    .collect()
}

fn queries() -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(77);
    (0..16).map(|c| vector(&mut rng, c % 8)).collect()
}

/// A fresh float32 Euclidean index "c" on `e`, holding `rows`, trained (`coarse`: with the
/// 4-bit first pass, or never).
fn filled(e: &Engine, kek: &Kek, rows: Vec<NewItem>, coarse: bool) -> Lease {
    create(
        e,
        "c",
        kek,
        cfg(Metric::Euclidean, Precision::F32, DIM as u32),
    );
    let ix = e.open("c", Some(kek)).unwrap();
    ix.upsert(rows).unwrap();
    train(e, &ix, coarse);
    assert_eq!(
        ix.coarse_lists(),
        if coarse { 48 } else { 0 },
        "{:?}",
        ix.quant_state()
    );
    ix
}

fn train(e: &Engine, ix: &Arc<Index>, coarse: bool) {
    e.train_now(
        ix,
        &TrainParams {
            n_lists: Some(48),
            coarse_min_bytes: Some(if coarse { 1 } else { u64::MAX }),
            ..Default::default()
        },
    )
    .unwrap();
}

/// Single and batched queries (ids, distances, metadata, vectors, contents).
fn answers(ix: &Index) -> String {
    let qs = queries();
    let p = params(10);
    let mut out = String::new();
    for q in &qs {
        out += &format!("{:?}\n", ix.search(std::slice::from_ref(q), &p).unwrap());
    }
    out += &format!("{:?}\n", ix.search(&qs, &p).unwrap());
    out
}

fn check_budget(e: &Engine) {
    let st = e.cache_stats();
    assert!(st.bytes <= st.budget, "{st:?}");
}

#[test]
fn a_coarse_generation_answers_the_same_whatever_is_cached() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, sb) = (redb(da.path()), redb(db.path()));
    let kek = Kek::random();
    let mut small = engine_with_cache(sa.clone(), Some(256 << 10));
    let mut big = engine_with_cache(sb.clone(), None);
    for e in [&small, &big] {
        let ix = filled(e, &kek, items(1, 0..N), true);
        assert_eq!(ix.quant_state().0, 0, "and no 8-bit pass");
    }
    let (a, b) = (
        small.open("c", Some(&kek)).unwrap(),
        big.open("c", Some(&kek)).unwrap(),
    );
    let want = answers(&b);
    assert_eq!(answers(&a), want, "bounded, cold");
    assert_eq!(answers(&a), want, "bounded, warm");
    assert_eq!(answers(&b), want, "unbounded, warm");
    check_budget(&small);
    // Writes after training: new blocks, new epochs, codes made again.
    for (e, ix) in [(&small, &a), (&big, &b)] {
        ix.upsert(items(2, 15_000..21_000)).unwrap();
        let gone: Vec<String> = (0..21_000).step_by(9).map(|i| format!("id{i}")).collect();
        ix.delete_ids(&gone).unwrap();
        check_budget(e);
    }
    assert_eq!(answers(&a), answers(&b), "after writes");
    drop((a, b, small, big));
    small = engine_with_cache(sa, Some(256 << 10));
    big = engine_with_cache(sb, None);
    let (a, b) = (
        small.open("c", Some(&kek)).unwrap(),
        big.open("c", Some(&kek)).unwrap(),
    );
    assert_eq!(a.coarse_lists(), 48, "the coarse quantisers are stored");
    assert_eq!(answers(&a), answers(&b), "after a restart");
    check_budget(&small);
}

#[test]
fn the_coarse_pass_finds_the_true_neighbours_at_their_exact_distances() {
    let e = engine(Arc::new(MemoryStore::new()));
    let all = items(1, 0..N);
    let ix = filled(&e, &Kek::random(), all.clone(), true);
    let mut p = params(10);
    p.n_probes = Some(48);
    let (mut found, mut total) = (0, 0);
    for q in queries() {
        let hits = &ix.search(std::slice::from_ref(&q), &p).unwrap()[0];
        let mut exact: Vec<(f32, &str)> = all
            .iter()
            .map(|it| (distance::l2sq(&q, &it.vector), it.id.as_str()))
            .collect();
        exact.sort_by(|x, y| x.0.total_cmp(&y.0));
        let truth: std::collections::HashSet<&str> = exact[..10].iter().map(|x| x.1).collect();
        found += hits
            .iter()
            .filter(|h| truth.contains(h.id.as_str()))
            .count();
        total += 10;
        for w in hits.windows(2) {
            assert!(w[0].distance <= w[1].distance, "nearest first");
        }
        for h in hits {
            let it = all.iter().find(|it| it.id == h.id).unwrap();
            let d = distance::l2sq(&q, &it.vector).sqrt();
            assert!(
                (h.distance - d).abs() <= 1e-3 * d.max(1.0),
                "{} vs {d}",
                h.distance
            );
        }
    }
    let recall = found as f64 / total as f64;
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn cached_codes_spare_decrypting_the_probed_blocks() {
    // Room for every block's codes, not for the blocks: the exact pass decrypts most probed
    // blocks again on every query, the coarse pass only its candidates' blocks.
    let misses = |coarse: bool| {
        let e = engine_with_cache(Arc::new(MemoryStore::new()), Some(3 << 20));
        let ix = filled(&e, &Kek::random(), padded(1, 0..N, 256), coarse);
        let mut p = params(5);
        p.n_probes = Some(24);
        p.include = Include::default();
        let qs = queries();
        for _ in 0..2 {
            for q in &qs {
                ix.search(std::slice::from_ref(q), &p).unwrap();
            }
        }
        let before = e.cache_stats().misses;
        for q in &qs {
            ix.search(std::slice::from_ref(q), &p).unwrap();
        }
        check_budget(&e);
        e.cache_stats().misses - before
    };
    let (exact, coarse) = (misses(false), misses(true));
    assert!(exact > 0, "the blocks do not fit the budget");
    let per_query = coarse as usize / queries().len();
    assert!(
        per_query <= 37,
        "at most one block per candidate: {per_query}"
    );
    assert!(
        coarse * 3 < exact,
        "coarse pass {coarse} block reads, exact pass {exact}"
    );
    eprintln!("coarse pass {coarse} block reads, exact pass {exact}");
}
