//! Distance kernels. The hot loops run inside one `pulp` dispatch per call so that the SIMD
//! level (AVX2+FMA here, AVX-512 or NEON elsewhere) is chosen once, not per row.

use pulp::{Arch, Simd, WithSimd};

/// How distance between two vectors is measured. Smaller is closer for all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `sqrt(sum (a-b)^2)`.
    Euclidean,
    /// `sum (a-b)^2`.
    SquaredEuclidean,
    /// `1 - cos(a, b)`; zero vectors are at distance 1 from everything.
    Cosine,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Euclidean => "euclidean",
            Metric::SquaredEuclidean => "squared_euclidean",
            Metric::Cosine => "cosine",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "euclidean" | "l2" => Some(Metric::Euclidean),
            "squared_euclidean" | "sqeuclidean" => Some(Metric::SquaredEuclidean),
            "cosine" => Some(Metric::Cosine),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Metric::Euclidean => 0,
            Metric::SquaredEuclidean => 1,
            Metric::Cosine => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        [Metric::Euclidean, Metric::SquaredEuclidean, Metric::Cosine]
            .into_iter()
            .find(|m| m.code() == c)
    }

    /// Turn an internal score (what [`scan`] produces) into the distance users see.
    #[inline]
    pub fn finish(self, score: f32) -> f32 {
        match self {
            Metric::Euclidean => score.max(0.0).sqrt(),
            Metric::SquaredEuclidean => score.max(0.0),
            Metric::Cosine => score,
        }
    }

    /// Whether vectors are compared by direction (query and stored vectors normalised).
    pub fn is_angular(self) -> bool {
        self == Metric::Cosine
    }
}

#[inline(always)]
fn l2sq_simd<S: Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut acc0 = simd.splat_f32s(0.0);
    let mut acc1 = simd.splat_f32s(0.0);
    let mut pairs = ah.chunks_exact(2).zip(bh.chunks_exact(2));
    for (x, y) in &mut pairs {
        let d0 = simd.sub_f32s(x[0], y[0]);
        let d1 = simd.sub_f32s(x[1], y[1]);
        acc0 = simd.mul_add_e_f32s(d0, d0, acc0);
        acc1 = simd.mul_add_e_f32s(d1, d1, acc1);
    }
    if ah.len() % 2 == 1 {
        let d = simd.sub_f32s(ah[ah.len() - 1], bh[bh.len() - 1]);
        acc0 = simd.mul_add_e_f32s(d, d, acc0);
    }
    let mut s = simd.reduce_sum_f32s(simd.add_f32s(acc0, acc1));
    for (x, y) in at.iter().zip(bt) {
        let d = x - y;
        s += d * d;
    }
    s
}

#[inline(always)]
fn dot_simd<S: Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut acc0 = simd.splat_f32s(0.0);
    let mut acc1 = simd.splat_f32s(0.0);
    let mut pairs = ah.chunks_exact(2).zip(bh.chunks_exact(2));
    for (x, y) in &mut pairs {
        acc0 = simd.mul_add_e_f32s(x[0], y[0], acc0);
        acc1 = simd.mul_add_e_f32s(x[1], y[1], acc1);
    }
    if ah.len() % 2 == 1 {
        acc0 = simd.mul_add_e_f32s(ah[ah.len() - 1], bh[bh.len() - 1], acc0);
    }
    let mut s = simd.reduce_sum_f32s(simd.add_f32s(acc0, acc1));
    for (x, y) in at.iter().zip(bt) {
        s += x * y;
    }
    s
}

struct Scan<'a> {
    metric: Metric,
    query: &'a [f32],
    rows: &'a [f32],
    inv_norms: &'a [f32],
    out: &'a mut Vec<f32>,
}

impl WithSimd for Scan<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let dim = self.query.len();
        self.out.clear();
        if dim == 0 {
            return;
        }
        match self.metric {
            Metric::Euclidean | Metric::SquaredEuclidean => {
                for row in self.rows.chunks_exact(dim) {
                    self.out.push(l2sq_simd(simd, self.query, row));
                }
            }
            Metric::Cosine => {
                for (row, inv) in self.rows.chunks_exact(dim).zip(self.inv_norms) {
                    self.out.push(1.0 - dot_simd(simd, self.query, row) * inv);
                }
            }
        }
    }
}

/// Internal scores of `query` against every row of `rows` (row-major, `query.len()` wide),
/// written to `out`. For cosine, `query` must be unit length (see [`normalized`]) and
/// `inv_norms[i]` is `1/|row i|` (0 for a zero row). Use [`Metric::finish`] for user distances.
pub fn scan(metric: Metric, query: &[f32], rows: &[f32], inv_norms: &[f32], out: &mut Vec<f32>) {
    Arch::new().dispatch(Scan {
        metric,
        query,
        rows,
        inv_norms,
        out,
    });
}

struct Pair<'a> {
    a: &'a [f32],
    b: &'a [f32],
    dot: bool,
}

impl WithSimd for Pair<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        if self.dot {
            dot_simd(simd, self.a, self.b)
        } else {
            l2sq_simd(simd, self.a, self.b)
        }
    }
}

/// Squared L2 distance.
pub fn l2sq(a: &[f32], b: &[f32]) -> f32 {
    Arch::new().dispatch(Pair { a, b, dot: false })
}

/// Dot product.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    Arch::new().dispatch(Pair { a, b, dot: true })
}

/// `1/|v|`, or 0 for a zero (or non-finite) vector.
pub fn inv_norm(v: &[f32]) -> f32 {
    let n = dot(v, v).sqrt();
    if n > 0.0 && n.is_finite() {
        1.0 / n
    } else {
        0.0
    }
}

/// `v` scaled to unit length (a zero vector stays zero).
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let inv = inv_norm(v);
    v.iter().map(|x| x * inv).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_l2sq(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }

    #[test]
    fn kernels_match_naive_for_awkward_lengths() {
        for dim in [1usize, 3, 7, 8, 9, 16, 17, 33, 128, 385] {
            let a: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = naive_l2sq(&a, &b);
            assert!(
                (l2sq(&a, &b) - want).abs() <= 1e-4 * want.max(1.0),
                "dim {dim}"
            );
            let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - d).abs() <= 1e-4 * d.abs().max(1.0),
                "dim {dim}"
            );
        }
    }

    #[test]
    fn scan_gives_metric_distances() {
        let q = [1.0f32, 0.0];
        let rows = [1.0f32, 0.0, 0.0, 2.0, -3.0, 0.0, 0.0, 0.0];
        let inv: Vec<f32> = rows.chunks(2).map(inv_norm).collect();
        let mut out = Vec::new();
        scan(Metric::Euclidean, &q, &rows, &inv, &mut out);
        let d: Vec<f32> = out.iter().map(|s| Metric::Euclidean.finish(*s)).collect();
        assert_eq!(d, vec![0.0, 5f32.sqrt(), 4.0, 1.0]);
        scan(Metric::SquaredEuclidean, &q, &rows, &inv, &mut out);
        assert_eq!(out, vec![0.0, 5.0, 16.0, 1.0]);
        scan(Metric::Cosine, &normalized(&q), &rows, &inv, &mut out);
        assert_eq!(out, vec![0.0, 1.0, 2.0, 1.0]);
    }

    #[test]
    fn metric_names_roundtrip() {
        for m in [Metric::Euclidean, Metric::SquaredEuclidean, Metric::Cosine] {
            assert_eq!(Metric::parse(m.as_str()), Some(m));
            assert_eq!(Metric::from_code(m.code()), Some(m));
        }
        assert_eq!(Metric::parse("manhattan"), None);
    }
}
