//! Engine benchmarks (no HTTP): distance kernels (float32 and the 8-bit first pass), one
//! posting-list probe, and IVF search per query, single-threaded. Prints one JSON line per
//! measurement.
//!
//!     cargo bench -p sealdb-server --bench engine
//!     cargo bench -p sealdb-server --bench engine -- --data DIR --n-lists 256 --n-probes 1,8,32
//!
//! With `--data DIR` it reads `DIR/base.f32` and `DIR/queries.f32` (little-endian float32,
//! row-major) and `DIR/dim`, as written by `tests/bench/faiss_compare.py`, so our engine and
//! FAISS IndexIVFFlat run on the very same vectors.

use std::hint::black_box;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sealdb_server::engine::distance::{self, Metric};
use sealdb_server::engine::tq;
use sealdb_server::engine::{
    CreateSpec, Engine, EngineConfig, Include, IndexConfig, Lease, NewItem, Precision,
    SearchParams, TrainParams,
};
use sealdb_server::keys::Kek;

fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    // SEALDB_BENCH_CENTRE_SCALE=0.5 gives overlapping clusters (as bench.py's hard set).
    let scale: f32 = std::env::var("SEALDB_BENCH_CENTRE_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let centres: Vec<f32> = (0..256 * dim)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = rng.random_range(0..256);
        for j in 0..dim {
            out.push(centres[c * dim + j] + rng.random_range(-1.0..1.0f32));
        }
    }
    out
}

fn per_iter<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f(); // warm
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn kernels() {
    for dim in [128usize, 384] {
        let rows = 2048;
        let data = clustered(rows, dim, 1);
        let q = &data[..dim];
        let inv: Vec<f32> = data.chunks_exact(dim).map(distance::inv_norm).collect();
        let mut out = Vec::new();
        let s = per_iter(2000, || {
            distance::scan(
                Metric::SquaredEuclidean,
                black_box(q),
                black_box(&data),
                &inv,
                &mut out,
            );
            black_box(&out);
        });
        let naive = per_iter(200, || {
            let mut o = Vec::with_capacity(rows);
            for r in data.chunks_exact(dim) {
                o.push(r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>());
            }
            black_box(o);
        });
        println!(
            "{{\"bench\":\"l2_scan_cache_resident\",\"dim\":{dim},\"rows\":{rows},\"ns_per_row\":{:.2},\"naive_ns_per_row\":{:.2},\"speedup\":{:.2}}}",
            s * 1e9 / rows as f64,
            naive * 1e9 / rows as f64,
            naive / s
        );
    }
}

/// One query against 40k rows (20 MB of float32, streamed from DRAM): the exact float32 scan
/// against the 8-bit first pass used on heavily probed indexes, and the 4-bit first pass of
/// large generations (2.5 MB of codes).
fn quant_vs_f32_scan() {
    let dim = 128;
    let rows = 40_000;
    let data = clustered(rows, dim, 3);
    let q = clustered(1, dim, 4);
    let quant = distance::Quant::fit(data.chunks_exact(dim), dim).expect("rows");
    let codes = quant.encode(&data);
    let mut out = Vec::new();
    let f = per_iter(50, || {
        distance::scan(
            Metric::SquaredEuclidean,
            black_box(&q),
            black_box(&data),
            &[],
            &mut out,
        );
        black_box(&out);
    });
    let mut raw = Vec::new();
    let s = per_iter(50, || {
        let qc = quant.prepare(black_box(&q));
        distance::quant_scan(&qc, black_box(&codes), &mut raw);
        black_box(&raw);
    });
    let p = per_iter(50, || {
        let qc = quant.prepare(black_box(&q));
        distance::quant_scan_portable(&qc, black_box(&codes), &mut raw);
        black_box(&raw);
    });
    // The 4-bit first pass (`index/coarse.rs`), a block (~100 rows) at a time: the fused
    // kernel, and unpacking to 8-bit codes then the 8-bit kernel (session 11's form).
    let nibbles = quant.encode_coarse(&data);
    let w = dim.div_ceil(2);
    let c = per_iter(50, || {
        let qc = quant.prepare(black_box(&q));
        for b in black_box(&nibbles).chunks(100 * w) {
            distance::coarse_scan(&qc, b, &mut raw);
            black_box(&raw);
        }
    });
    let mut unpacked = Vec::new();
    let u = per_iter(50, || {
        let qc = quant.prepare(black_box(&q));
        for b in black_box(&nibbles).chunks(100 * w) {
            distance::unpack_coarse(b, dim, &mut unpacked);
            distance::quant_scan(&qc, &unpacked, &mut raw);
            black_box(&raw);
        }
    });
    println!(
        "{{\"bench\":\"scan_40k_rows\",\"dim\":{dim},\"f32_us\":{:.1},\"quant8_us\":{:.1},\"quant8_portable_us\":{:.1},\"speedup\":{:.2},\"coarse4_us\":{:.1},\"coarse4_speedup\":{:.2},\"coarse4_unpack_us\":{:.1}}}",
        f * 1e6,
        s * 1e6,
        p * 1e6,
        f / s,
        c * 1e6,
        f / c,
        u * 1e6
    );
}

/// One query against 40k rows of float16 and each `tq` tier as a packed block scan does it
/// (rows decoded a block at a time, `tq` into the rotated domain, then the float kernel),
/// against the float32 scan of the same rows.
fn tq_vs_f32_scan() {
    let dim = 128;
    let rows = 40_000;
    let block_rows = 224;
    let data = clustered(rows, dim, 3);
    let q = clustered(1, dim, 4);
    let inv: Vec<f32> = vec![1.0; block_rows];
    let mut out = Vec::new();
    let f = per_iter(50, || {
        for b in data.chunks(block_rows * dim) {
            distance::scan(
                Metric::SquaredEuclidean,
                black_box(&q),
                black_box(b),
                &inv[..b.len() / dim],
                &mut out,
            );
            black_box(&out);
        }
    });
    for precision in [
        Precision::F16,
        Precision::Tq(12),
        Precision::Tq(8),
        Precision::Tq(6),
        Precision::Tq(4),
    ] {
        let w = precision.row_bytes(dim);
        let mut packed = Vec::with_capacity(rows * w);
        precision.encode_into(&data, dim, &mut packed);
        let mut z = vec![0f32; block_rows * dim];
        let t = per_iter(50, || {
            let qr = match precision {
                Precision::Tq(bits) => tq::rotate(black_box(&q), bits),
                _ => black_box(&q).clone(),
            };
            for b in packed.chunks(block_rows * w) {
                let n = b.len() / w;
                for (row, o) in b.chunks_exact(w).zip(z.chunks_exact_mut(dim)) {
                    precision.decode_row_for_scan(row, o).expect("row");
                }
                distance::scan(
                    Metric::SquaredEuclidean,
                    &qr,
                    &z[..n * dim],
                    &inv[..n],
                    &mut out,
                );
                black_box(&out);
            }
        });
        println!(
            "{{\"bench\":\"packed_scan_40k_rows\",\"dim\":{dim},\"precision\":\"{}\",\"f32_us\":{:.1},\"packed_us\":{:.1},\"packed_over_f32\":{:.2},\"bytes_per_row\":{w}}}",
            precision.as_str(),
            f * 1e6,
            t * 1e6,
            t / f
        );
    }
}

fn build(data: &[f32], dim: usize, n_lists: usize) -> (std::sync::Arc<Engine>, Lease) {
    build_with(data, dim, n_lists, Precision::F32)
}

fn build_with(
    data: &[f32],
    dim: usize,
    n_lists: usize,
    precision: Precision,
) -> (std::sync::Arc<Engine>, Lease) {
    let store = std::sync::Arc::new(sealdb_store_memory::MemoryStore::new());
    let engine = Engine::new(
        store,
        EngineConfig {
            auto_train_min_vectors: usize::MAX,
            auto_train: false,
            cache_limit_bytes: None,
            train_time_limit: None,
            coarse_min_bytes: None,
            background_merges: true,
        },
    );
    let kek = Kek::random();
    engine
        .create(CreateSpec {
            name: "bench".into(),
            id: sealdb_server::engine::new_index_id(),
            envelope: None,
            kek: kek.clone(),
            config: IndexConfig {
                metric: Metric::Euclidean,
                precision,
                embedding_model: None,
                declared_dimension: dim as u32,
                created_at: 0,
                metadata_schema: Vec::new(),
                bm25: Default::default(),
                value_index: true,
            },
        })
        .expect("create");
    let ix = engine.open("bench", Some(&kek)).expect("open");
    for (b, chunk) in data.chunks(dim * 10_000).enumerate() {
        let items = chunk
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, v)| NewItem {
                id: (b * 10_000 + i).to_string(),
                vector: v.to_vec(),
                metadata: None,
                contents: None,
            })
            .collect();
        ix.upsert(items).expect("upsert");
    }
    let t = Instant::now();
    engine
        .train_now(
            &ix,
            &TrainParams {
                n_lists: Some(n_lists),
                ..Default::default()
            },
        )
        .expect("train");
    eprintln!(
        "trained {n_lists} lists in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    (engine, ix)
}

fn search_times(
    ix: &sealdb_server::engine::Index,
    queries: &[f32],
    dim: usize,
    probes: &[usize],
    label: &str,
) {
    for &p in probes {
        let params = SearchParams {
            top_k: 10,
            n_probes: Some(p),
            greedy: false,
            filter: None,
            include: Include::default(),
        };
        let qs: Vec<Vec<f32>> = queries.chunks_exact(dim).map(<[f32]>::to_vec).collect();
        for q in qs.iter().take(10) {
            black_box(ix.search(std::slice::from_ref(q), &params).expect("search"));
        }
        let t = Instant::now();
        for q in &qs {
            black_box(ix.search(std::slice::from_ref(q), &params).expect("search"));
        }
        let per = t.elapsed().as_secs_f64() / qs.len() as f64;
        println!(
            "{{\"bench\":\"{label}\",\"n_probes\":{p},\"us_per_query\":{:.2}}}",
            per * 1e6
        );
    }
}

/// Sealing with a key per record (format 2) against sealing every record under one key (the
/// format-1 scheme), same data, same run; one small upsert into a 100k index, whose state
/// record (with the block manifest) is re-sealed with every batch; and gets of 100 ids.
fn sealing(ix: &sealdb_server::engine::Index) {
    use aes_gcm::aead::KeyInit;
    let keys = sealdb_server::keys::IndexKeys::derive(&sealdb_server::keys::Dek::random());
    let one = aes_gcm::Aes256Gcm::new_from_slice(&[7u8; 32]).expect("key");
    for (what, len, reps) in [("block_56k", 56 * 1024, 2000), ("item_100b", 100, 200_000)] {
        let pt = vec![0x5au8; len];
        let per_record = per_iter(reps, || {
            black_box(keys.seal(b"aad", &pt));
        });
        let single = per_iter(reps, || {
            black_box(sealdb_server::keys::seal_with(&one, b"aad", &pt));
        });
        let sealed = keys.seal(b"aad", &pt);
        let open = per_iter(reps, || {
            black_box(keys.open(b"aad", &sealed).expect("opens"));
        });
        println!(
            "seal_{what}: per-record key {:.2} us, one key {:.2} us (ratio {:.2}); open {:.2} us",
            per_record * 1e6,
            single * 1e6,
            per_record / single,
            open * 1e6
        );
    }
    let mut i = 0u64;
    let t = per_iter(500, || {
        i += 1;
        let v: Vec<f32> = (0..128).map(|j| ((i + j) % 17) as f32).collect();
        ix.upsert(vec![NewItem {
            id: format!("extra-{}", i % 50),
            vector: v,
            metadata: None,
            contents: Some("c".into()),
        }])
        .expect("upsert");
    });
    println!("upsert_1_item_into_100k_128: {:.1} us per batch", t * 1e6);
    // Id lookups: the position runs (newest first, through the cache), then the blocks.
    let mut k = 0u64;
    let t = per_iter(200, || {
        k += 1;
        let ids: Vec<String> = (0..100)
            .map(|j| ((k * 7919 + j * 104_729) % 100_000).to_string())
            .collect();
        black_box(ix.get(&ids, Include::default()).expect("get"));
    });
    println!("get_100_ids_from_100k_128: {:.1} us per request", t * 1e6);
}

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Sealing and opening a 56 KiB record (a block's size) with a record key of its own, as
/// every block write and read does: microseconds per record and GB/s.
fn seal_open() {
    use sealdb_server::keys::{Dek, IndexKeys};
    let keys = IndexKeys::derive(&Dek::random());
    let plain: Vec<u8> = (0..56 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let aad = b"bench/aad";
    let reps = 4000;
    let t = Instant::now();
    let mut last = Vec::new();
    for _ in 0..reps {
        last = black_box(keys.seal(aad, black_box(&plain)));
    }
    let seal_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        black_box(keys.open(aad, black_box(&last)).expect("opens"));
    }
    let open_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let gbs = |us: f64| plain.len() as f64 / us / 1e3;
    println!(
        "{{\"bench\": \"seal_open_56k\", \"seal_us\": {seal_us:.2}, \"seal_gb_s\": {:.2}, \"open_us\": {open_us:.2}, \"open_gb_s\": {:.2}}}",
        gbs(seal_us),
        gbs(open_us)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let n_lists: usize = arg("--n-lists").map_or(256, |v| v.parse().expect("--n-lists"));
    let probes: Vec<usize> = arg("--n-probes")
        .unwrap_or_else(|| "1,4,16,64".into())
        .split(',')
        .map(|v| v.parse().expect("--n-probes"))
        .collect();
    if let Some(dir) = arg("--data") {
        let dir = std::path::Path::new(&dir);
        let dim: usize = std::fs::read_to_string(dir.join("dim"))
            .expect("dim file")
            .trim()
            .parse()
            .expect("dim");
        let base = read_f32(&dir.join("base.f32"));
        let queries = read_f32(&dir.join("queries.f32"));
        let (_e, ix) = build(&base, dim, n_lists);
        search_times(&ix, &queries, dim, &probes, "sealdb_ivf_search");
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `--seal`: sealing and opening one block record (a write seals every block it touches).
    if args.iter().any(|a| a == "--seal") {
        seal_open();
        return;
    }
    // `--scans`: the scan kernels alone (seconds, where the whole bench takes minutes).
    if args.iter().any(|a| a == "--scans") {
        quant_vs_f32_scan();
        return;
    }
    kernels();
    quant_vs_f32_scan();
    tq_vs_f32_scan();
    let dim = 128;
    let base = clustered(100_000, dim, 2);
    let queries = clustered(200, dim, 3);
    // `--precision tq8` (etc.): the IVF search again on an index of that precision.
    if let Some(pr) = arg("--precision") {
        let precision = Precision::parse(&pr).expect("--precision");
        let (e, ix) = build_with(&base, dim, n_lists, precision);
        search_times(
            &ix,
            &queries,
            dim,
            &probes,
            &format!("ivf_search_100k_128_{pr}"),
        );
        eprintln!("block cache after the searches: {:?}", e.cache_stats());
    }
    let (e, ix) = build(&base, dim, n_lists);
    // One probe of one posting list (~n/n_lists vectors) is the n_probes=1 row.
    search_times(&ix, &queries, dim, &probes, "ivf_search_100k_128");
    eprintln!(
        "block cache after the searches: {:?}; (quantised cached blocks, without codes) = {:?}",
        e.cache_stats(),
        ix.cached_codes()
    );
    sealing(&ix);
}
