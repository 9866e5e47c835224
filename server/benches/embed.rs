//! Embedding benchmark (run in release: `cargo bench -p sealdb-server --bench embed`):
//! embeddings per second for single texts and for batches of 64, the forward pass's achieved
//! GFLOP/s, and, in the same run, this machine's single-precision matrix-multiply peak through
//! the same GEMM (candle's CPU backend), which bounds what the forward pass can reach.
//! Needs all-MiniLM-L6-v2 under SEALDB_MODELS_DIR (scripts/fetch-model.sh).

use std::time::Instant;

use candle_core::{Device, Tensor};
use sealdb_server::embed::Embedders;

fn texts(n: usize) -> Vec<String> {
    let words = [
        "encrypted",
        "vector",
        "search",
        "weather",
        "stadium",
        "river",
        "compiler",
        "garden",
        "market",
        "music",
        "orbit",
        "harbour",
        "winter",
        "library",
        "engine",
        "forest",
    ];
    (0..n)
        .map(|i| {
            (0..(8 + i % 9))
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn matmul_peak() -> f64 {
    let dev = Device::Cpu;
    let mut best: f64 = 0.0;
    for (m, k, n) in [(1024, 1024, 1024), (2048, 384, 1536), (2048, 1536, 384)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
        let _ = a.matmul(&b).unwrap();
        let reps = 10;
        let t = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b).unwrap();
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        best = best.max(2.0 * (m * k * n) as f64 / secs / 1e9);
    }
    best
}

fn main() {
    let dir = std::env::var_os("SEALDB_MODELS_DIR").unwrap_or_else(|| "./models".into());
    let e = Embedders::new(vec![dir.into()]);
    let model = e
        .get("all-MiniLM-L6-v2")
        .expect("install the model: scripts/fetch-model.sh");
    let all = texts(64 * 8);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();

    let _ = model.embed(&refs[..4]).unwrap();
    let t = Instant::now();
    for s in &refs[..64] {
        model.embed(&[s]).unwrap();
    }
    let single = 64.0 / t.elapsed().as_secs_f64();

    let _ = model.embed(&refs[..64]).unwrap();
    let (mut secs, mut flops) = (0.0, 0.0);
    for batch in refs.chunks(64) {
        let len = model.padded_len(batch);
        let t = Instant::now();
        model.embed(batch).unwrap();
        secs += t.elapsed().as_secs_f64();
        flops += model.flops(batch.len(), len);
    }
    let batched = refs.len() as f64 / secs;
    let gflops = flops / secs / 1e9;
    let peak = matmul_peak();
    println!("embed single texts:  {single:.0} texts/s");
    println!("embed batches of 64: {batched:.0} texts/s");
    println!("forward pass:        {gflops:.1} GFLOP/s");
    println!("matmul peak (same run, same GEMM): {peak:.1} GFLOP/s");
    println!("forward / peak:      {:.2}", gflops / peak);
    println!(
        "{{\"bench\":\"embed\",\"single_per_s\":{single:.1},\"batch64_per_s\":{batched:.1},\"forward_gflops\":{gflops:.2},\"matmul_peak_gflops\":{peak:.2}}}"
    );
}
