//! Lloyd's k-means for IVF training, parallel over points with rayon.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::distance::l2sq;

/// Training knobs (the API's `train` fields, resolved to concrete values).
#[derive(Debug, Clone)]
pub struct KMeansParams {
    /// Number of clusters (posting lists).
    pub k: usize,
    /// Upper bound on Lloyd iterations.
    pub max_iters: usize,
    /// Stop when the objective improves by less than this fraction.
    pub tolerance: f64,
    /// Also stop when fewer than this fraction of points changed cluster in an iteration
    /// (0 turns the test off). Past that point Lloyd's steps move the lists too little to
    /// change which lists a query probes.
    pub settle: f64,
    /// Points per parallel work unit during assignment.
    pub batch_size: usize,
    /// RNG seed (initial centroids, empty-cluster repair).
    pub seed: u64,
}

/// Largest distance matrix one assignment chunk may hold (rows x centroids x 4 bytes): it
/// bounds the memory of a chunk whatever `batch_size` and `n_lists` a request asks for, and
/// so also how long one chunk runs between two checks of the stop flag.
const CHUNK_MATRIX_BYTES: usize = 32 << 20;

/// Never stop.
pub fn never() -> bool {
    false
}

/// Index of the nearest centroid to every row of `data`, and the summed squared distance.
///
/// Distances come from one matrix product per chunk of `batch` rows:
/// `|x - c|^2 = |x|^2 - 2 x.c + |c|^2`, which runs at GEMM speed instead of one kernel call
/// per (point, centroid) pair. Chunks run in parallel.
pub fn assign(data: &[f32], dim: usize, centroids: &[f32], batch: usize) -> (Vec<u32>, f64) {
    assign_stoppable(data, dim, centroids, batch, &never)
        .expect("never() does not stop an assignment")
}

/// [`assign`] that checks `stop` before every chunk and gives up (`None`) once it says so.
pub fn assign_stoppable(
    data: &[f32],
    dim: usize,
    centroids: &[f32],
    batch: usize,
    stop: &(dyn Fn() -> bool + Sync),
) -> Option<(Vec<u32>, f64)> {
    let k = centroids.len() / dim.max(1);
    let batch = batch.clamp(1, (CHUNK_MATRIX_BYTES / (4 * k.max(1))).max(1));
    let cview = ndarray::ArrayView2::from_shape((k, dim), centroids).expect("k x dim centroids");
    let c_norms: Vec<f32> = centroids
        .chunks_exact(dim)
        .map(|c| super::distance::dot(c, c))
        .collect();
    let parts: Vec<Option<(Vec<u32>, f64)>> = data
        .par_chunks(batch * dim)
        .map(|chunk| {
            if stop() {
                return None;
            }
            let m = chunk.len() / dim;
            let x = ndarray::ArrayView2::from_shape((m, dim), chunk).expect("m x dim points");
            let dots = x.dot(&cview.t());
            let mut labels = Vec::with_capacity(m);
            let mut obj = 0f64;
            let mut scores = vec![0f32; k];
            for (row, drow) in chunk.chunks_exact(dim).zip(dots.rows()) {
                let x_norm = super::distance::dot(row, row);
                let (c, v) = match drow.as_slice() {
                    Some(d) => nearest_score(d, &c_norms, &mut scores),
                    None => {
                        let d: Vec<f32> = drow.iter().copied().collect();
                        nearest_score(&d, &c_norms, &mut scores)
                    }
                };
                labels.push(c as u32);
                obj += (v + x_norm).max(0.0) as f64;
            }
            Some((labels, obj))
        })
        .collect();
    let mut all = Vec::with_capacity(data.len() / dim.max(1));
    let mut obj = 0f64;
    for part in parts {
        let (p, o) = part?;
        all.extend(p);
        obj += o;
    }
    Some((all, obj))
}

/// The centroid minimising `|c|^2 - 2 x.c` given the dot products `dots` and the norms
/// `c_norms`, and that minimum (the first such centroid on ties, as a plain scan finds). The
/// scores go to `buf` and their minimum is taken eight lanes at a time, which vectorises; the
/// index is then found by one more pass that stops at the minimum. (The branchy single pass
/// it replaces was about a third of training's 4,096-list assignment in a profile; its own
/// gain is not measured apart from the smaller sample that came with it.)
fn nearest_score(dots: &[f32], c_norms: &[f32], buf: &mut [f32]) -> (usize, f32) {
    let n = dots.len().min(c_norms.len()).min(buf.len());
    let buf = &mut buf[..n];
    for ((b, &d), &cn) in buf.iter_mut().zip(&dots[..n]).zip(&c_norms[..n]) {
        *b = cn - 2.0 * d;
    }
    let mut lanes = [f32::INFINITY; 8];
    let mut chunks = buf.chunks_exact(8);
    for ch in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(ch) {
            *m = if v < *m { v } else { *m };
        }
    }
    let mut min = f32::INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v < min {
            min = v;
        }
    }
    // NaN scores never win (as in a plain `<` scan); nothing below infinity gives 0.
    if min == f32::INFINITY {
        return (0, f32::INFINITY);
    }
    (buf.iter().position(|&v| v == min).unwrap_or(0), min)
}

/// The global number of the first row of each chunk when `chunks` are taken in order.
pub fn row_starts(chunks: &[&[f32]], dim: usize) -> Vec<usize> {
    let mut acc = 0usize;
    chunks
        .iter()
        .map(|c| {
            let start = acc;
            acc += c.len() / dim;
            start
        })
        .collect()
}

/// The `k` nearest rows to each row of `queries` (squared L2) among the rows of `chunks` taken
/// in order (row numbers run across chunks), excluding row `exclude[q]` for query `q`. With
/// `angular`, rows are normalised first. One GEMM per chunk; memory stays bounded.
pub fn exact_neighbours(
    chunks: &[&[f32]],
    dim: usize,
    angular: bool,
    queries: &[f32],
    exclude: &[usize],
    k: usize,
) -> Vec<Vec<usize>> {
    let nq = queries.len() / dim;
    let qview = ndarray::ArrayView2::from_shape((nq, dim), queries).expect("nq x dim queries");
    let q_norms: Vec<f32> = queries
        .chunks_exact(dim)
        .map(|q| super::distance::dot(q, q))
        .collect();
    let starts = row_starts(chunks, dim);
    // One running top-k per query and worker (folded, then merged), not one per chunk: with
    // ~1000 chunks the per-chunk lists alone took ~30 MB during training.
    let insert = |best: &mut Vec<(f32, usize)>, dist: f32, idx: usize| {
        if best.len() < k || dist < best[best.len() - 1].0 {
            let pos = best.partition_point(|b| b.0 <= dist);
            best.insert(pos, (dist, idx));
            best.truncate(k);
        }
    };
    let best: Vec<Vec<(f32, usize)>> = chunks
        .par_iter()
        .zip(&starts)
        .fold(
            || vec![Vec::with_capacity(k + 1); nq],
            |mut best, (chunk, &start)| {
                let normed: Vec<f32>;
                let chunk: &[f32] = if angular {
                    normed = chunk
                        .chunks_exact(dim)
                        .flat_map(super::distance::normalized)
                        .collect();
                    &normed
                } else {
                    chunk
                };
                let m = chunk.len() / dim;
                let x = ndarray::ArrayView2::from_shape((m, dim), chunk).expect("m x dim");
                let x_norms: Vec<f32> = chunk
                    .chunks_exact(dim)
                    .map(|r| super::distance::dot(r, r))
                    .collect();
                let dots = qview.dot(&x.t());
                for (qi, b) in best.iter_mut().enumerate() {
                    for (j, (&d, &xn)) in dots.row(qi).iter().zip(&x_norms).enumerate() {
                        let idx = start + j;
                        if idx != exclude[qi] {
                            insert(b, q_norms[qi] + xn - 2.0 * d, idx);
                        }
                    }
                }
                best
            },
        )
        .reduce(
            || vec![Vec::new(); nq],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    for (dist, idx) in y {
                        insert(x, dist, idx);
                    }
                }
                a
            },
        );
    best.into_iter()
        .map(|b| b.into_iter().map(|(_, i)| i).collect())
        .collect()
}

/// Nearest centroid (index, squared distance).
pub fn nearest(row: &[f32], centroids: &[f32], dim: usize) -> (usize, f32) {
    let mut best = (0usize, f32::INFINITY);
    for (c, cen) in centroids.chunks_exact(dim).enumerate() {
        let d = l2sq(row, cen);
        if d < best.1 {
            best = (c, d);
        }
    }
    best
}

/// Largest k-means++ seeding cost (`k x subsample x dim` multiply-adds, about 20 s on one
/// core); beyond it seeds are distinct random rows, as FAISS does for every k.
const PLUS_PLUS_MAX_WORK: usize = 1 << 36;

/// k-means++ seeding on a subsample of at most `16 k` rows: far-apart seeds avoid the local
/// minima plain random seeding falls into, at a cost of `O(16 k^2 d)`. Very large `k` (where
/// that cost explodes) gets random distinct rows instead. `None` when `stop` said so.
fn init_plus_plus(
    data: &[f32],
    dim: usize,
    k: usize,
    rng: &mut StdRng,
    stop: &(dyn Fn() -> bool + Sync),
) -> Option<Vec<f32>> {
    let n = data.len() / dim;
    let m = n.min(16 * k).max(k);
    if k.saturating_mul(m).saturating_mul(dim) > PLUS_PLUS_MAX_WORK {
        let rows = sample(rng, n, k).into_vec();
        return Some(
            rows.iter()
                .flat_map(|&r| data[r * dim..(r + 1) * dim].iter().copied())
                .collect(),
        );
    }
    let rows: Vec<usize> = sample(rng, n, m).into_vec();
    let mut centroids = Vec::with_capacity(k * dim);
    let row = |i: usize| &data[rows[i] * dim..(rows[i] + 1) * dim];
    centroids.extend_from_slice(row(rng.random_range(0..m)));
    let mut best: Vec<f32> = (0..m).map(|i| l2sq(row(i), &centroids[..dim])).collect();
    while centroids.len() < k * dim {
        if stop() {
            return None;
        }
        let total: f64 = best.iter().map(|&d| d as f64).sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut chosen = m - 1;
            for (i, &d) in best.iter().enumerate() {
                target -= d as f64;
                if target <= 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            rng.random_range(0..m)
        };
        let start = centroids.len();
        centroids.extend_from_slice(row(pick));
        let c = centroids[start..].to_vec();
        best.par_iter_mut().enumerate().for_each(|(i, b)| {
            let d = l2sq(row(i), &c);
            if d < *b {
                *b = d;
            }
        });
    }
    Some(centroids)
}

/// Cluster the rows of `data` (row-major, `dim` wide) into `p.k` centroids; also returns the
/// number of assignment passes run. Requires at least `p.k` rows.
pub fn train(data: &[f32], dim: usize, p: &KMeansParams) -> (Vec<f32>, usize) {
    train_observed(data, dim, p, &mut |_| {}, &never).expect("never() does not stop training")
}

/// [`train`], calling `on_pass(passes so far)` after each assignment pass, and giving up
/// (`None`) within one assignment chunk of `stop` turning true.
pub fn train_observed(
    data: &[f32],
    dim: usize,
    p: &KMeansParams,
    on_pass: &mut dyn FnMut(usize),
    stop: &(dyn Fn() -> bool + Sync),
) -> Option<(Vec<f32>, usize)> {
    let n = data.len() / dim;
    let k = p.k.clamp(1, n.max(1));
    let mut rng = StdRng::seed_from_u64(p.seed);
    let mut centroids = init_plus_plus(data, dim, k, &mut rng, stop)?;
    let mut prev_obj = f64::INFINITY;
    let mut prev_labels: Vec<u32> = Vec::new();
    let mut passes = 0;
    for _ in 0..p.max_iters.max(1) {
        let (labels, obj) = assign_stoppable(data, dim, &centroids, p.batch_size, stop)?;
        passes += 1;
        on_pass(passes);
        if p.settle > 0.0 && !prev_labels.is_empty() {
            let moved = labels
                .iter()
                .zip(&prev_labels)
                .filter(|(a, b)| a != b)
                .count();
            if (moved as f64) < p.settle * labels.len() as f64 {
                // The centroids are the means of `prev_labels`; one more update would
                // move them by the few points that changed.
                break;
            }
        }
        // Recompute means.
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (row, &l) in data.chunks_exact(dim).zip(&labels) {
            let l = l as usize;
            counts[l] += 1;
            for (s, x) in sums[l * dim..(l + 1) * dim].iter_mut().zip(row) {
                *s += *x as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                let inv = 1.0 / counts[c] as f64;
                for (dst, s) in centroids[c * dim..(c + 1) * dim]
                    .iter_mut()
                    .zip(&sums[c * dim..(c + 1) * dim])
                {
                    *dst = (*s * inv) as f32;
                }
            }
        }
        // Repair empty clusters by splitting the largest one (as FAISS does).
        for c in 0..k {
            if counts[c] > 0 {
                continue;
            }
            let big = (0..k).max_by_key(|&j| counts[j]).unwrap_or(0);
            if counts[big] < 2 {
                break;
            }
            for j in 0..dim {
                let v = centroids[big * dim + j];
                let eps = if v == 0.0 { 1e-4 } else { v.abs() * 1e-4 };
                let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                centroids[c * dim + j] = v + sign * eps;
                centroids[big * dim + j] = v - sign * eps;
            }
            counts[c] = counts[big] / 2;
            counts[big] -= counts[c];
        }
        let improved = (prev_obj - obj) / prev_obj.max(f64::MIN_POSITIVE);
        prev_obj = obj;
        prev_labels = labels;
        if improved.is_finite() && improved >= 0.0 && improved < p.tolerance {
            break;
        }
    }
    Some((centroids, passes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_score_matches_a_plain_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for n in [0usize, 1, 7, 8, 9, 64, 4096, 4099] {
            for _ in 0..20 {
                // Few distinct values, so ties are common.
                let dots: Vec<f32> = (0..n).map(|_| rng.random_range(0..6) as f32).collect();
                let norms: Vec<f32> = (0..n).map(|_| rng.random_range(0..6) as f32).collect();
                let mut best = (0usize, f32::INFINITY);
                for (c, (&d, &cn)) in dots.iter().zip(&norms).enumerate() {
                    let v = cn - 2.0 * d;
                    if v < best.1 {
                        best = (c, v);
                    }
                }
                let mut buf = vec![0f32; n];
                assert_eq!(
                    super::nearest_score(&dots, &norms, &mut buf),
                    best,
                    "n = {n}"
                );
            }
        }
        let mut buf = vec![0f32; 3];
        let nan = [f32::NAN, 1.0, f32::NAN];
        assert_eq!(super::nearest_score(&nan, &[0.0; 3], &mut buf), (1, -2.0));
        assert_eq!(
            super::nearest_score(&[f32::NAN; 3], &[0.0; 3], &mut buf),
            (0, f32::INFINITY)
        );
    }

    use super::*;

    #[test]
    fn finds_separated_clusters() {
        // Four tight clusters around the corners of a square.
        let corners = [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0), (10.0, 10.0)];
        let mut rng = StdRng::seed_from_u64(1);
        let mut data = Vec::new();
        for i in 0..400 {
            let (x, y) = corners[i % 4];
            data.push(x + rng.random_range(-0.5..0.5));
            data.push(y + rng.random_range(-0.5..0.5));
        }
        let p = KMeansParams {
            k: 4,
            max_iters: 50,
            tolerance: 1e-6,
            settle: 0.0,
            batch_size: 64,
            seed: 7,
        };
        let (c, _) = train(&data, 2, &p);
        for (x, y) in corners {
            let (_, d) = nearest(&[x, y], &c, 2);
            assert!(d < 0.5, "no centroid near ({x},{y}): {c:?}");
        }
        let (labels, _) = assign(&data, 2, &c, 10);
        // Points of the same corner share a label.
        for i in 4..400 {
            assert_eq!(labels[i], labels[i % 4]);
        }
    }

    #[test]
    fn settle_stops_once_few_points_move() {
        let mut rng = StdRng::seed_from_u64(3);
        let data: Vec<f32> = (0..4000 * 8)
            .map(|_| rng.random_range(-1.0..1.0f32))
            .collect();
        let run = |settle: f64| {
            let p = KMeansParams {
                k: 32,
                max_iters: 40,
                tolerance: 0.0,
                settle,
                batch_size: 256,
                seed: 5,
            };
            train(&data, 8, &p)
        };
        // Tolerance 0 alone never stops early on uniform data.
        let (full, n_full) = run(0.0);
        assert_eq!(n_full, 40);
        let (early, n_early) = run(0.01);
        assert!(n_early < n_full, "{n_early} passes");
        // The early result is nearly as tight: within 2% of the full run's objective.
        let (_, obj_full) = assign(&data, 8, &full, 256);
        let (_, obj_early) = assign(&data, 8, &early, 256);
        assert!(obj_early <= obj_full * 1.02, "{obj_early} vs {obj_full}");
    }

    #[test]
    fn a_stop_flag_ends_training_between_chunks() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut rng = StdRng::seed_from_u64(1);
        let data: Vec<f32> = (0..20_000 * 4).map(|_| rng.random::<f32>()).collect();
        let p = KMeansParams {
            k: 64,
            max_iters: 1000,
            tolerance: 0.0,
            settle: 0.0,
            batch_size: 256,
            seed: 1,
        };
        let calls = AtomicUsize::new(0);
        // Stop after a few checks: training gives up instead of running 1000 passes.
        let stop = || calls.fetch_add(1, Ordering::SeqCst) > 200;
        let mut passes = 0;
        assert!(train_observed(&data, 4, &p, &mut |n| passes = n, &stop).is_none());
        assert!(passes < 1000, "{passes} passes");
        // Never stopping, the same call finishes.
        let short = KMeansParams { max_iters: 3, ..p };
        assert!(train_observed(&data, 4, &short, &mut |_| {}, &never).is_some());
    }
}
