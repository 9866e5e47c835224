//! The 4-bit first pass (`index/coarse.rs`): a generation trained with it answers the same
//! whatever the cache holds (bounded or not, cold or warm, before and after a restart), its
//! answers are exact distances of the stored vectors and find the true neighbours, and once
//! the codes are cached a query decrypts only its candidates' blocks.

use super::*;

const DIM: usize = 128;
const N: usize = 20_000;

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

/// Index "c" of [`filled`] with the 4-bit pass, over a fresh in-memory store.
fn in_memory() -> (Arc<dyn IndexStore>, Kek, Arc<Engine>, Lease) {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let e = engine(store.clone());
    let ix = filled(&e, &kek, items(1, 0..N), true);
    (store, kek, e, ix)
}

/// A fresh engine over `store` answers `want` for index "c", reading rows alone (a cache
/// too small for the generation) and reading whole blocks (room for all of it).
fn same_from_fresh_engines(store: &Arc<dyn IndexStore>, kek: &Kek, want: &str) {
    for cache in [Some(256 << 10), None] {
        let e = engine_with_cache(store.clone(), cache);
        assert_eq!(answers(&e.open("c", Some(kek)).unwrap()), want, "{cache:?}");
    }
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

/// A store (redb on disk) that counts the block, codes and row records read.
struct Counting {
    inner: Arc<dyn IndexStore>,
    blocks: std::sync::atomic::AtomicUsize,
    codes: std::sync::atomic::AtomicUsize,
    rows: std::sync::atomic::AtomicUsize,
}

impl Counting {
    fn over(inner: Arc<dyn IndexStore>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            blocks: Default::default(),
            codes: Default::default(),
            rows: Default::default(),
        })
    }
    fn tally(&self, k: &[u8]) {
        use std::sync::atomic::Ordering::SeqCst;
        match k.first() {
            Some(&format::kind::LIST) => self.blocks.fetch_add(1, SeqCst),
            Some(&format::kind::CODES) => self.codes.fetch_add(1, SeqCst),
            Some(&format::kind::ROWS) => self.rows.fetch_add(1, SeqCst),
            _ => 0,
        };
    }
    fn reads(&self) -> (usize, usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (
            self.blocks.load(SeqCst),
            self.codes.load(SeqCst),
            self.rows.load(SeqCst),
        )
    }
}

impl IndexStore for Counting {
    fn backend(&self) -> &str {
        "counting"
    }
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.tally(k);
        self.inner.get(k)
    }
    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        for k in keys {
            self.tally(k);
        }
        self.inner.get_many(keys)
    }
    fn scan_prefix(&self, p: &[u8]) -> Result<Vec<sealdb_plugin_api::KeyValue>, StoreError> {
        self.inner.scan_prefix(p)
    }
    fn write(&self, b: WriteBatch) -> Result<(), StoreError> {
        self.inner.write(b)
    }
}

/// The codes records of index "c" in `store`, key order.
fn codes_records(store: &dyn IndexStore) -> Vec<sealdb_plugin_api::KeyValue> {
    store.scan_prefix(&[format::kind::CODES]).unwrap()
}

#[test]
fn a_coarse_generation_stores_each_blocks_codes_and_a_cold_query_reads_codes_not_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = redb(dir.path());
    let kek = Kek::random();
    {
        let e = engine(store.clone());
        let ix = filled(&e, &kek, items(1, 0..N), true);
        let n = ix.check_codes_records().unwrap();
        assert!(n > 48, "every block of the 48 lists: {n}");
        assert_eq!(codes_records(&*store).len(), n, "one record per block");
        // Writes re-seal the codes of the blocks they touch; emptied blocks lose theirs.
        ix.upsert(items(2, 15_000..21_000)).unwrap();
        let gone: Vec<String> = (0..21_000).step_by(3).map(|i| format!("id{i}")).collect();
        ix.delete_ids(&gone).unwrap();
        let n = ix.check_codes_records().unwrap();
        assert_eq!(codes_records(&*store).len(), n, "none left over");
    }
    // Cold: a fresh engine and process-wide cache, the store counting what it is asked for.
    let counting = Counting::over(store.clone());
    // (A cache of 4 MiB holds the codes, 1.3 MB, but not the 10 MB of vectors: candidates'
    // rows are read alone.)
    let e = engine_with_cache(counting.clone(), Some(4 << 20));
    let ix = e.open("c", Some(&kek)).unwrap();
    let mut p = params(10);
    p.n_probes = Some(12);
    let before = counting.reads();
    let cold = ix.search(&queries()[..1], &p).unwrap();
    let now = counting.reads();
    let (blocks, codes, rows) = (now.0 - before.0, now.1 - before.1, now.2 - before.2);
    assert!(codes > 12, "the probed blocks' codes: {codes}");
    // Split blocks: one row record per candidate at most, one head per hit at most.
    assert!(
        (1..=42).contains(&rows),
        "at most one row record per candidate: {rows}"
    );
    assert!(
        (1..=10).contains(&blocks),
        "at most one head per hit: {blocks}"
    );
    // Warm: the codes are cached; the answer is what an unbounded exact reading gives.
    let before = counting.reads();
    let warm = ix.search(&queries()[..1], &p).unwrap();
    assert_eq!(format!("{warm:?}"), format!("{cold:?}"));
    let now = counting.reads();
    assert_eq!(now.1, before.1, "codes come from the cache");
    // So do the candidates' row records and the hits' heads, read once by the cold query.
    assert_eq!(
        (now.0, now.2),
        (before.0, before.2),
        "rows and heads are cached"
    );
    // Retrained without the pass: the codes records go with the old generation.
    train(&e, &ix, false);
    assert!(codes_records(&*store).is_empty());
    ix.upsert(items(3, 0..100)).unwrap();
    train(&e, &ix, true);
    assert!(ix.check_codes_records().unwrap() > 48);
    drop(ix);
    e.delete("c", Some(&kek)).unwrap();
    assert!(
        store.scan_prefix(b"").unwrap().is_empty(),
        "deleting the index deletes its codes and coarse records"
    );
}

#[test]
fn a_training_too_large_for_the_cache_leaves_it_holding_codes_not_whole_blocks() {
    // 4 MiB holds the new generation's codes (1.3 MB) but not its 10 MB of vectors: training
    // passes its blocks through the cache, and what stays is what queries scan.
    let dir = tempfile::tempdir().unwrap();
    let counting = Counting::over(redb(dir.path()));
    let e = engine_with_cache(counting.clone(), Some(4 << 20));
    let kek = Kek::random();
    let ix = filled(&e, &kek, items(1, 0..N), true);
    let gen = ix.read().gen;
    let blocks = ix.check_codes_records().unwrap();
    let (whole, codes) = e.blocks.cached_kinds_of(&ix.id, gen);
    assert_eq!(whole, 0, "whole blocks left in the cache");
    assert_eq!(codes, blocks, "every block's codes cached");
    check_budget(&e);
    // So the first query after training reads no codes record, as a warm one.
    let mut p = params(10);
    p.n_probes = Some(12);
    let before = counting.reads();
    let first = ix.search(&queries()[..1], &p).unwrap();
    assert_eq!(counting.reads().1, before.1, "codes read from the store");
    // And answers what an unbounded cache answers.
    drop(ix);
    let unbounded = engine_with_cache(counting.clone(), None);
    let ix = unbounded.open("c", Some(&kek)).unwrap();
    assert_eq!(
        format!("{:?}", ix.search(&queries()[..1], &p).unwrap()),
        format!("{first:?}")
    );
    // A generation that fits the budget keeps its whole blocks (queries read them whole).
    drop(ix);
    e.delete("c", Some(&kek)).unwrap();
    let roomy = engine_with_cache(counting.clone(), Some(1 << 30));
    let ix = filled(&roomy, &kek, items(1, 0..N), true);
    let (whole, _) = roomy.blocks.cached_kinds_of(&ix.id, ix.read().gen);
    assert!(whole > 0, "a generation that fits keeps its blocks cached");
}

#[test]
fn codes_records_that_are_altered_swapped_dropped_or_rolled_back_fail_the_query() {
    let (store, kek, _e, ix) = in_memory();
    let mut p = params(10);
    p.n_probes = Some(48);
    let want = ix.search(&queries()[..1], &p).unwrap();
    let before = codes_records(&*store);
    // Overwrite every item: every block and its codes are sealed again at a later epoch.
    ix.upsert(items(1, 0..N)).unwrap();
    drop(ix);
    let after = codes_records(&*store);
    // A block that exists before and after, whose earlier codes record is put back.
    let (k0, v0) = before
        .into_iter()
        .find(|(k, v)| after.iter().any(|(k2, v2)| k2 == k && v2 != v))
        .expect("a block rewritten in place");
    let k1 = after.iter().find(|(k, _)| *k != k0).unwrap().0.clone();
    let attacks: Vec<(&str, WriteBatch)> = vec![
        ("dropped", {
            let mut b = WriteBatch::new();
            b.delete(k0.clone());
            b
        }),
        ("swapped", {
            let mut b = WriteBatch::new();
            let now = |k: &Vec<u8>| store.get(k).unwrap().unwrap();
            let (a, c) = (now(&k0), now(&k1));
            b.put(k0.clone(), c);
            b.put(k1.clone(), a);
            b
        }),
        ("rolled back", {
            let mut b = WriteBatch::new();
            b.put(k0.clone(), v0);
            b
        }),
        ("altered", {
            let mut b = WriteBatch::new();
            let mut v = store.get(&k1).unwrap().unwrap();
            let at = v.len() / 2;
            v[at] ^= 1;
            b.put(k1.clone(), v);
            b
        }),
    ];
    for (what, attack) in attacks {
        // Keep the true records to put back after each attack.
        let keep: Vec<(Vec<u8>, Vec<u8>)> = [&k0, &k1]
            .iter()
            .map(|k| ((*k).clone(), store.get(k).unwrap().unwrap()))
            .collect();
        store.write(attack).unwrap();
        let e = engine(store.clone());
        let ix = e.open("c", Some(&kek)).unwrap();
        let got = ix.search(&queries()[..1], &p);
        assert!(
            matches!(got, Err(EngineError::Integrity { .. })),
            "{what}: {got:?}"
        );
        drop(ix);
        let mut b = WriteBatch::new();
        for (k, v) in keep {
            b.put(k, v);
        }
        store.write(b).unwrap();
        let e = engine(store.clone());
        let ix = e.open("c", Some(&kek)).unwrap();
        assert_eq!(
            ix.search(&queries()[..1], &p).unwrap().len(),
            want.len(),
            "{what}: restored"
        );
    }
}

#[test]
fn split_blocks_answer_as_whole_ones_and_fail_when_their_records_are_tampered_with() {
    let store: Arc<dyn IndexStore> = Arc::new(MemoryStore::new());
    let kek = Kek::random();
    let want = {
        let e = engine(store.clone());
        let ix = filled(&e, &kek, items(1, 0..N), true);
        answers(&ix)
    };
    let heads = store.scan_prefix(&[format::kind::LIST]).unwrap();
    let rows = store.scan_prefix(&[format::kind::ROWS]).unwrap();
    let per = 31; // float32 x 128 (segments::segment_rows)
    let full = rows
        .iter()
        .filter(|(_, v)| v.len() == per * DIM * 4 + 44)
        .count();
    assert!(
        full >= N / per - 2 * 48,
        "{full} full row records of {}",
        rows.len()
    );
    assert!(
        rows.iter().all(|(_, v)| v.len() <= per * DIM * 4 + 44),
        "no row record holds more than 31 rows"
    );
    assert!(
        heads.iter().all(|(_, v)| v.len() < 124 * 64),
        "heads hold no rows"
    );
    // Rows read alone (a cache too small to keep the generation) and whole blocks (room for
    // all of it) give the answers the training's own engine gave.
    same_from_fresh_engines(&store, &kek, &want);
    // Each attack on every record of a kind, then everything put back.
    type Attack = fn(&[(Vec<u8>, Vec<u8>)], usize) -> Option<Vec<u8>>;
    let attacks: [(&str, u8, Attack); 6] = [
        ("row records swapped", format::kind::ROWS, |r, i| {
            Some(r[(i + 1) % r.len()].1.clone())
        }),
        ("row records dropped", format::kind::ROWS, |_, _| None),
        ("row records altered", format::kind::ROWS, |r, i| {
            let mut v = r[i].1.clone();
            v[60] ^= 1;
            Some(v)
        }),
        ("heads swapped", format::kind::LIST, |r, i| {
            Some(r[(i + 1) % r.len()].1.clone())
        }),
        ("heads altered", format::kind::LIST, |r, i| {
            let mut v = r[i].1.clone();
            v[30] ^= 1;
            Some(v)
        }),
        ("heads dropped", format::kind::LIST, |_, _| None),
    ];
    for (what, kind, attack) in attacks {
        let recs = if kind == format::kind::ROWS {
            &rows
        } else {
            &heads
        };
        let mut b = WriteBatch::new();
        for (i, (k, _)) in recs.iter().enumerate() {
            match attack(recs, i) {
                Some(v) => b.put(k.clone(), v),
                None => b.delete(k.clone()),
            };
        }
        store.write(b).unwrap();
        for cache in [Some(256 << 10), None] {
            let e = engine_with_cache(store.clone(), cache);
            let got = e
                .open("c", Some(&kek))
                .and_then(|ix| ix.search(&queries()[..4], &params(10)));
            assert!(
                matches!(got, Err(EngineError::Integrity { .. })),
                "{what}, cache {cache:?}: {got:?}"
            );
        }
        let mut b = WriteBatch::new();
        for (k, v) in recs {
            b.put(k.clone(), v.clone());
        }
        store.write(b).unwrap();
    }
    let e = engine_with_cache(store.clone(), Some(256 << 10));
    assert_eq!(answers(&e.open("c", Some(&kek)).unwrap()), want, "restored");
}

#[test]
fn writes_to_a_split_generation_keep_one_row_record_per_31_rows_and_drop_the_rest() {
    let (store, kek, _e, ix) = in_memory();
    // Grow blocks, then shrink some to nothing and others by a few rows.
    ix.upsert(items(5, N..N + 3_000)).unwrap();
    let gone: Vec<String> = (0..N + 3_000)
        .filter(|i| i % 2 == 0 || (5_000..9_000).contains(i))
        .map(|i| format!("id{i}"))
        .collect();
    ix.delete_ids(&gone).unwrap();
    let want = answers(&ix);
    // One row record per started 31 rows of every block, none other.
    let rows = ix.block_rows();
    assert!(rows.iter().any(|&r| r > 124 - 31), "full blocks");
    assert!(
        rows.iter().all(|&r| r <= 124),
        "at most four records per block"
    );
    let expect: usize = rows.iter().map(|&r| (r as usize).div_ceil(31)).sum();
    assert_eq!(
        store.scan_keys(&[format::kind::ROWS]).unwrap().len(),
        expect
    );
    drop(ix);
    // The same answers from a fresh engine reading rows alone, and reading whole blocks.
    same_from_fresh_engines(&store, &kek, &want);
}

/// The generations that have files in the redb store at `dir`: `(kind, gen)` of each.
fn generation_files(dir: &std::path::Path) -> std::collections::BTreeSet<(u8, u32)> {
    std::fs::read_dir(dir.join(sealdb_store_redb::files::GROUPS_DIR))
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|n| n.strip_suffix(".redb").map(str::to_owned))
        .map(|hex| {
            let b: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            assert_eq!(b.len(), format::GENERATION_PREFIX_LEN);
            (b[0], u32::from_be_bytes(b[17..21].try_into().unwrap()))
        })
        .collect()
}

/// Bytes the files under `dir` take on disk.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| match p.is_dir() {
            true => disk_bytes(&p),
            false => std::fs::metadata(&p).unwrap().blocks() * 512,
        })
        .sum()
}

/// On the redb store each generation's blocks, row records, codes and runs have files of
/// their own, so the final batch of a training, which deletes the old generation, deletes
/// its files: the data directory does not keep two generations' worth of pages after a
/// retraining, and deleting the index leaves no generation file behind.
#[test]
fn a_training_deletes_the_old_generations_files() {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::random();
    let want = answers(&in_memory().3);
    let kinds = |g: u32| -> std::collections::BTreeSet<(u8, u32)> {
        format::GENERATION_KINDS.iter().map(|&k| (k, g)).collect()
    };
    // Stores are dropped before each look: their checkpointer has then carried out every
    // batch (the deletes of files included).
    let first = {
        let e = engine(redb(dir.path()));
        let ix = filled(&e, &kek, items(1, 0..N), true);
        assert_eq!(answers(&ix), want);
        let gen = ix.read().gen;
        gen
    };
    assert_eq!(generation_files(dir.path()), kinds(first));
    let trained_once = disk_bytes(dir.path());
    let second = {
        let e = engine(redb(dir.path()));
        let ix = e.open("c", Some(&kek)).unwrap();
        train(&e, &ix, true);
        assert_eq!(answers(&ix), want);
        let gen = ix.read().gen;
        gen
    };
    assert!(second > first);
    assert_eq!(generation_files(dir.path()), kinds(second));
    let trained_twice = disk_bytes(dir.path());
    // One generation on disk, not two (a file per store kept both: about 2x).
    assert!(
        trained_twice * 10 < trained_once * 12,
        "{trained_once} -> {trained_twice}"
    );
    {
        let e = engine(redb(dir.path()));
        assert_eq!(answers(&e.open("c", Some(&kek)).unwrap()), want);
        e.delete("c", Some(&kek)).unwrap();
    }
    assert!(generation_files(dir.path()).is_empty());
    assert!(redb(dir.path()).scan_prefix(b"").unwrap().is_empty());
}
