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

fn probe_ops() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1280, 1536), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1536, 384), &dev).unwrap();
    let time = |name: &str, f: &dyn Fn()| {
        f();
        let t = Instant::now();
        for _ in 0..10 {
            f();
        }
        println!("  op {name}: {:.2} ms", t.elapsed().as_secs_f64() * 100.0);
    };
    time("matmul 1280x1536x384", &|| drop(x.matmul(&w).unwrap()));
    time("gelu_erf 1280x1536", &|| drop(x.gelu_erf().unwrap()));
    let b = Tensor::zeros(1536, candle_core::DType::F32, &dev).unwrap();
    time("bias + gelu_erf (candle, two passes)", &|| {
        drop(x.broadcast_add(&b).unwrap().gelu_erf().unwrap())
    });
    time("bias + gelu_erf (fused, ours)", &|| {
        drop(sealdb_server::embed::encoder::bias_gelu(&x, &b).unwrap())
    });
    let s = Tensor::randn(0f32, 1.0, (64, 12, 20, 20), &dev).unwrap();
    time("softmax 64x12x20x20", &|| {
        drop(candle_nn::ops::softmax_last_dim(&s).unwrap())
    });
    let y = Tensor::randn(0f32, 1.0, (1280, 384), &dev).unwrap();
    let ln = candle_nn::LayerNorm::new(
        Tensor::ones(384, candle_core::DType::F32, &dev).unwrap(),
        Tensor::zeros(384, candle_core::DType::F32, &dev).unwrap(),
        1e-12,
    );
    time("layernorm 1280x384", &|| {
        drop(candle_core::Module::forward(&ln, &y).unwrap())
    });
    let q = Tensor::randn(0f32, 1.0, (64, 12, 20, 32), &dev).unwrap();
    time("attn scores 64x12 (20x32x20)", &|| {
        drop(q.matmul(&q.t().unwrap()).unwrap())
    });
    time("transpose+contiguous 64x20x12x32", &|| {
        drop(q.transpose(1, 2).unwrap().contiguous().unwrap())
    });
}

fn main() {
    if std::env::var_os("SEALDB_EMBED_PROBE").is_some() {
        probe_ops();
    }
    let dir = std::env::var_os("SEALDB_MODELS_DIR").unwrap_or_else(|| "./models".into());
    let e = Embedders::new(vec![dir.into()]);
    let model = e
        .get("all-MiniLM-L6-v2")
        .expect("install the model: scripts/fetch-model.sh");
    let all = texts(64 * 32);
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
    if std::env::var_os("SEALDB_EMBED_PROBE").is_some() {
        let t = Instant::now();
        for batch in refs.chunks(64) {
            model.padded_len(batch);
        }
        println!(
            "  tokenising a batch of 64: {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / refs.chunks(64).count() as f64
        );
    }
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
