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
    fn the_fused_coarse_scan_sums_what_unpacking_then_scanning_sums() {
        for dim in [1usize, 2, 7, 15, 16, 17, 31, 32, 33, 128, 385] {
            let rows: Vec<f32> = (0..dim * 11)
                .map(|i| (i as f32 * 0.73).sin() * 3.0)
                .collect();
            let q = Quant::fit(rows.chunks_exact(dim), dim).unwrap();
            let nibbles = q.encode_coarse(&rows);
            let query: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.29).cos() * 5.0).collect();
            let qc = q.prepare(&query);
            let (mut fused, mut reference) = (Vec::new(), Vec::new());
            coarse_scan(&qc, &nibbles, &mut fused);
            coarse_scan_portable(&qc, &nibbles, &mut reference);
            assert_eq!(fused.len(), 11, "dim {dim}");
            assert_eq!(fused, reference, "dim {dim}");
            let mut unpacked = Vec::new();
            unpack_coarse(&nibbles, dim, &mut unpacked);
            for (r, (&got, codes)) in fused.iter().zip(unpacked.chunks_exact(dim)).enumerate() {
                let want: i64 = qc
                    .iter()
                    .zip(codes)
                    .map(|(&a, &b)| (a as i64 - b as i64).pow(2))
                    .sum();
                assert_eq!(got as i64, want, "dim {dim} row {r}");
            }
        }
    }

    #[test]
    fn quantised_scan_matches_integer_sums_and_approximates_l2() {
        for dim in [1usize, 7, 31, 32, 33, 128, 385] {
            let rows: Vec<f32> = (0..dim * 9)
                .map(|i| (i as f32 * 0.73).sin() * 3.0)
                .collect();
            let q = Quant::fit(rows.chunks_exact(dim), dim).unwrap();
            let codes = q.encode(&rows);
            // A query partly outside the fitted range exercises the clamping.
            let query: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.29).cos() * 5.0).collect();
            let qc = q.prepare(&query);
            let mut out = Vec::new();
            quant_scan(&qc, &codes, &mut out);
            let mut portable = Vec::new();
            quant_scan_portable(&qc, &codes, &mut portable);
            assert_eq!(out, portable, "dim {dim}");
            for (r, (&got, row_codes)) in out.iter().zip(codes.chunks_exact(dim)).enumerate() {
                let want: i64 = qc
                    .iter()
                    .zip(row_codes)
                    .map(|(&a, &b)| (a as i64 - b as i64).pow(2))
                    .sum();
                assert_eq!(got as i64, want, "dim {dim} row {r}");
            }
            // Inside the range, code-space distance times step^2 tracks the real one.
            let inside = &rows[..dim];
            let qc = q.prepare(inside);
            quant_scan(&qc, &codes, &mut out);
            for (row, &c) in rows.chunks_exact(dim).zip(&out) {
                let real = l2sq(inside, row);
                let approx = c as f32 * q.step() * q.step();
                assert!((approx - real).abs() <= 0.05 * real + dim as f32 * q.step() * q.step());
            }
        }
    }

    #[test]
    fn coarse_codes_stand_for_the_nearest_of_every_17th_8_bit_code() {
        for dim in [1usize, 2, 7, 32, 33, 128] {
            let rows: Vec<f32> = (0..dim * 11)
                .map(|i| (i as f32 * 0.41).sin() * 2.0 + (i % 3) as f32)
                .collect();
            let q = Quant::fit(rows.chunks_exact(dim), dim).unwrap();
            let fine = q.encode(&rows);
            let coarse = q.encode_coarse(&rows);
            assert_eq!(coarse.len(), 11 * dim.div_ceil(2), "dim {dim}");
            let mut unpacked = Vec::new();
            unpack_coarse(&coarse, dim, &mut unpacked);
            assert_eq!(unpacked.len(), fine.len(), "dim {dim}");
            for (&c, &f) in unpacked.iter().zip(&fine) {
                assert_eq!(c % 17, 0);
                assert!((c as i32 - f as i32).abs() <= 9, "dim {dim}: {c} for {f}");
            }
            // Out-of-range values clamp to the end codes.
            let far: Vec<f32> = vec![1e6; dim];
            let mut u = Vec::new();
            unpack_coarse(&q.encode_coarse(&far), dim, &mut u);
            assert!(u.iter().all(|&c| c == 255), "dim {dim}");
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

/// 8-bit scalar quantisation of one posting list, for a cheap first pass over lists that
/// queries probe in large numbers: `x_d ≈ min_d + code_d * step` (one step for all dimensions,
/// so that distances stay integer sums). A quarter of float32's memory traffic; candidates
/// are rescored exactly afterwards.
#[derive(Clone, Debug)]
pub struct Quant {
    min: Vec<f32>,
    step: f32,
}

impl Quant {
    /// Fit to `rows` (each `dim` wide). `None` without rows.
    pub fn fit<'a>(rows: impl Iterator<Item = &'a [f32]>, dim: usize) -> Option<Self> {
        let mut b = QuantBounds::new(dim);
        for r in rows {
            b.add(r);
        }
        b.finish()
    }

    /// The per-dimension minimum and the step (for the quantiser record).
    pub fn params(&self) -> (&[f32], f32) {
        (&self.min, self.step)
    }

    /// A quantiser from stored [`Quant::params`]; `None` when they cannot be one.
    pub fn from_params(min: Vec<f32>, step: f32) -> Option<Self> {
        (step.is_finite() && step > 0.0 && min.iter().all(|x| x.is_finite()))
            .then_some(Self { min, step })
    }

    /// Size of one code step.
    pub fn step(&self) -> f32 {
        self.step
    }

    /// One unit of a raw code distance ([`quant_scan`]) in the metric's units: squared L2,
    /// or `|a-b|^2 / 2 = 1 - cos` for the unit rows of angular metrics.
    pub fn unit(&self, angular: bool) -> f32 {
        self.step * self.step * if angular { 0.5 } else { 1.0 }
    }

    /// Codes of `rows` (clamped to 0..=255).
    pub fn encode(&self, rows: &[f32]) -> Vec<u8> {
        let dim = self.min.len();
        let inv = 1.0 / self.step;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.chunks_exact(dim) {
            out.extend(
                r.iter()
                    .zip(&self.min)
                    .map(|(x, m)| code_of((x - m) * inv, 255.0)),
            );
        }
        out
    }

    /// 4-bit codes of `rows`, two per byte (low nibble first; an odd dimension count
    /// leaves the last high nibble 0): `round((x - min) / (17 * step))`, clamped to 0..=15,
    /// so that a code `c` stands for the 8-bit code `17 * c` ([`unpack_coarse`]).
    pub fn encode_coarse(&self, rows: &[f32]) -> Vec<u8> {
        let dim = self.min.len();
        if dim == 0 {
            return Vec::new();
        }
        let inv = 1.0 / (self.step * COARSE_SPAN);
        let w = dim.div_ceil(2);
        let mut out = vec![0u8; rows.len() / dim * w];
        for (r, o) in rows.chunks_exact(dim).zip(out.chunks_exact_mut(w)) {
            for (d, (x, m)) in r.iter().zip(&self.min).enumerate() {
                let c = code_of((x - m) * inv, 15.0);
                o[d / 2] |= c << ((d % 2) * 4);
            }
        }
        out
    }

    /// The query in code units, rounded and clamped to one range beyond the list's on
    /// either side (so sums cannot overflow; a list that far away ranks last anyway).
    pub fn prepare(&self, q: &[f32]) -> Vec<i16> {
        let inv = 1.0 / self.step;
        q.iter()
            .zip(&self.min)
            .map(|(x, m)| ((x - m) * inv).round().clamp(-255.0, 510.0) as i16)
            .collect()
    }
}

/// `v` rounded to the nearest code in `0..=top` (halves up): a clamp and a truncating
/// conversion, which vectorise where `f32::round` is a library call per value.
#[inline(always)]
fn code_of(v: f32, top: f32) -> u8 {
    (v + 0.5).clamp(0.0, top) as u8
}

/// 8-bit code steps per 4-bit code step (255 / 15).
const COARSE_SPAN: f32 = 17.0;

/// 4-bit codes ([`Quant::encode_coarse`]) of `rows` rows as the 8-bit codes they stand for,
/// into `out` (`rows * dim` bytes), for [`quant_scan`].
pub fn unpack_coarse(nibbles: &[u8], dim: usize, out: &mut Vec<u8>) {
    out.clear();
    let w = dim.div_ceil(2);
    if w == 0 {
        return;
    }
    let rows = nibbles.len() / w;
    out.resize(rows * dim, 0);
    if dim.is_multiple_of(2) {
        // Rows are back to back in both forms: one byte to two codes, straight through
        // (a loop LLVM vectorises).
        for (o, &b) in out.chunks_exact_mut(2).zip(&nibbles[..rows * w]) {
            o[0] = (b & 15) * 17;
            o[1] = (b >> 4) * 17;
        }
    } else {
        for (o, row) in out.chunks_exact_mut(dim).zip(nibbles.chunks_exact(w)) {
            for (d, x) in o.iter_mut().enumerate() {
                *x = ((row[d / 2] >> ((d % 2) * 4)) & 15) * 17;
            }
        }
    }
}

/// Running per-dimension bounds of the rows a [`Quant`] is fitted to (streamed by training).
#[derive(Clone)]
pub struct QuantBounds {
    lo: Vec<f32>,
    hi: Vec<f32>,
    any: bool,
}

impl QuantBounds {
    pub fn new(dim: usize) -> Self {
        Self {
            lo: vec![f32::INFINITY; dim],
            hi: vec![f32::NEG_INFINITY; dim],
            any: false,
        }
    }

    pub fn add(&mut self, row: &[f32]) {
        self.any = true;
        for ((l, h), &x) in self.lo.iter_mut().zip(self.hi.iter_mut()).zip(row) {
            *l = l.min(x);
            *h = h.max(x);
        }
    }

    /// The quantiser for the rows seen; `None` without rows.
    pub fn finish(self) -> Option<Quant> {
        if !self.any {
            return None;
        }
        let range = self
            .lo
            .iter()
            .zip(&self.hi)
            .map(|(l, h)| h - l)
            .fold(0f32, f32::max);
        let step = if range > 0.0 && range.is_finite() {
            range / 255.0
        } else {
            1.0
        };
        Some(Quant { min: self.lo, step })
    }
}

struct QuantScan<'a> {
    q: &'a [i16],
    codes: &'a [u8],
    out: &'a mut Vec<u32>,
}

impl WithSimd for QuantScan<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        // Plain lane-array loops: inside pulp's dispatch they are compiled for the CPU's
        // vector unit, and independent accumulators let LLVM vectorise them.
        const L: usize = 32;
        let dim = self.q.len();
        self.out.clear();
        if dim == 0 {
            return;
        }
        let head = dim / L * L;
        for row in self.codes.chunks_exact(dim) {
            // |t| <= 510, so t*t < 2^18 and a row of up to 65536 dimensions sums below 2^31.
            let mut acc = [0i32; L];
            for (c, q) in row[..head]
                .chunks_exact(L)
                .zip(self.q[..head].chunks_exact(L))
            {
                for l in 0..L {
                    let t = q[l] - c[l] as i16;
                    acc[l] += t as i32 * t as i32;
                }
            }
            let mut s: i32 = acc.iter().sum();
            for (&q, &c) in self.q[head..].iter().zip(&row[head..]) {
                let t = q - c as i16;
                s += t as i32 * t as i32;
            }
            self.out.push(s as u32);
        }
    }
}

/// Squared L2, in code units, of a prepared query against every coded row.
pub fn quant_scan(q: &[i16], codes: &[u8], out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return Simd::vectorize(
            simd,
            avx2::QuantScan {
                simd,
                q,
                codes,
                out,
            },
        );
    }
    quant_scan_portable(q, codes, out);
}

/// The code distances of a block's 4-bit codes (`nibbles`, [`Quant::encode_coarse`]) to
/// `q` (in 8-bit code units), as [`quant_scan`] gives them for the codes [`unpack_coarse`]
/// makes: on AVX2 in one pass (16 dimensions from 8 bytes: mask and shift the nibbles,
/// interleave, widen, times 17), with no unpacked copy.
pub fn coarse_scan(q: &[i16], nibbles: &[u8], out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return Simd::vectorize(
            simd,
            avx2::CoarseScan {
                simd,
                q,
                nibbles,
                out,
            },
        );
    }
    coarse_scan_portable(q, nibbles, out);
}

/// [`coarse_scan`] by unpacking first (CPUs without AVX2; the tests' reference).
pub fn coarse_scan_portable(q: &[i16], nibbles: &[u8], out: &mut Vec<u32>) {
    let mut unpacked = Vec::new();
    unpack_coarse(nibbles, q.len(), &mut unpacked);
    quant_scan_portable(q, &unpacked, out);
}

/// [`quant_scan`] without the hand-written AVX2 form: what CPUs without AVX2 run. Public for
/// the benchmark and the tests, which hold both forms to the same sums.
pub fn quant_scan_portable(q: &[i16], codes: &[u8], out: &mut Vec<u32>) {
    Arch::new().dispatch(QuantScan { q, codes, out });
}

/// The 8-bit scan written out for AVX2, where it carries most of a heavily probed query:
/// 16 dimensions per step (widen the codes to i16, subtract, `vpmaddwd` the difference with
/// itself into i32 pairs), four rows at a time so that the query chunk is loaded once and
/// four accumulator chains run in parallel. About 2x the auto-vectorised form
/// (`cargo bench --bench engine`, `scan_40k_rows`). Everything is pulp's safe wrappers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::{__m128i, __m256i};
    use pulp::x86::V3;
    use pulp::{Simd, WithSimd};

    pub(super) struct QuantScan<'a> {
        pub simd: V3,
        pub q: &'a [i16],
        pub codes: &'a [u8],
        pub out: &'a mut Vec<u32>,
    }

    impl WithSimd for QuantScan<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let Self {
                simd,
                q,
                codes,
                out,
            } = self;
            let dim = q.len();
            out.clear();
            if dim == 0 {
                return;
            }
            let head = dim / 16 * 16;
            let qv: &[[i16; 16]] = pulp::as_arrays::<16, _>(&q[..head]).0;
            let tail = |row: &[u8]| -> u32 {
                q[head..]
                    .iter()
                    .zip(&row[head..])
                    .map(|(&a, &c)| {
                        let t = (a - c as i16) as i32;
                        (t * t) as u32
                    })
                    .sum()
            };
            let a2 = simd.avx2;
            let load = |b: &[u8]| -> __m256i {
                let x: __m128i = bytemuck::pod_read_unaligned(&b[..16]);
                a2._mm256_cvtepu8_epi16(x)
            };
            // |q - c| <= 765 fits i16, and one vpmaddwd pair sums below 2^21.
            let step = |acc: __m256i, qc: __m256i, x: __m256i| -> __m256i {
                let d = a2._mm256_sub_epi16(qc, x);
                a2._mm256_add_epi32(acc, a2._mm256_madd_epi16(d, d))
            };
            let qv: Vec<__m256i> = qv.iter().map(|qa| bytemuck::cast(*qa)).collect();
            rows_by_four(
                simd,
                codes,
                dim,
                |c, row, i| step(c, qv[i], load(&row[i * 16..])),
                qv.len(),
                tail,
                out,
            );
        }
    }

    /// The driver of both scans: the sums of every row of `rows` (`stride` bytes each), four
    /// rows at a time so that each query chunk is loaded once and four accumulator chains
    /// run in parallel. `acc(c, row, i)` adds step `i` of `row` to `c` (`steps` of them),
    /// `tail(row)` the dimensions the steps leave.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows_by_four(
        simd: V3,
        rows: &[u8],
        stride: usize,
        acc: impl Fn(__m256i, &[u8], usize) -> __m256i,
        steps: usize,
        tail: impl Fn(&[u8]) -> u32,
        out: &mut Vec<u32>,
    ) {
        let (a2, a, s2) = (simd.avx2, simd.avx, simd.sse2);
        let mut quads = rows.chunks_exact(4 * stride);
        for quad in &mut quads {
            let (r0, rest) = quad.split_at(stride);
            let (r1, rest) = rest.split_at(stride);
            let (r2, r3) = rest.split_at(stride);
            let z = a._mm256_setzero_si256();
            let (mut c0, mut c1, mut c2, mut c3) = (z, z, z, z);
            for i in 0..steps {
                c0 = acc(c0, r0, i);
                c1 = acc(c1, r1, i);
                c2 = acc(c2, r2, i);
                c3 = acc(c3, r3, i);
            }
            // Horizontal sums of the four accumulators in one vector.
            let h =
                a2._mm256_hadd_epi32(a2._mm256_hadd_epi32(c0, c1), a2._mm256_hadd_epi32(c2, c3));
            let sum = s2._mm_add_epi32(
                a._mm256_castsi256_si128(h),
                a2._mm256_extracti128_si256::<1>(h),
            );
            let s: [u32; 4] = bytemuck::cast(sum);
            out.extend([
                s[0] + tail(r0),
                s[1] + tail(r1),
                s[2] + tail(r2),
                s[3] + tail(r3),
            ]);
        }
        for row in quads.remainder().chunks_exact(stride) {
            let mut c = a._mm256_setzero_si256();
            for i in 0..steps {
                c = acc(c, row, i);
            }
            let s: [u32; 8] = bytemuck::cast(c);
            out.push(s.iter().sum::<u32>() + tail(row));
        }
    }

    pub(super) struct CoarseScan<'a> {
        pub simd: V3,
        pub q: &'a [i16],
        pub nibbles: &'a [u8],
        pub out: &'a mut Vec<u32>,
    }

    impl WithSimd for CoarseScan<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let Self {
                simd,
                q,
                nibbles,
                out,
            } = self;
            let dim = q.len();
            out.clear();
            let w = dim.div_ceil(2);
            if dim == 0 {
                return;
            }
            // 32 dimensions (16 bytes of nibbles) per step; the rest one by one.
            let head = dim / 32 * 32;
            let qv: Vec<(__m256i, __m256i)> = pulp::as_arrays::<16, _>(&q[..head])
                .0
                .chunks_exact(2)
                .map(|p| (bytemuck::cast(p[0]), bytemuck::cast(p[1])))
                .collect();
            let tail = |row: &[u8]| -> u32 {
                (head..dim)
                    .map(|d| {
                        let c = ((row[d / 2] >> ((d % 2) * 4)) & 15) as i16 * 17;
                        let t = (q[d] - c) as i32;
                        (t * t) as u32
                    })
                    .sum()
            };
            let (a2, s2) = (simd.avx2, simd.sse2);
            let low = s2._mm_set1_epi8(0x0f);
            let high = s2._mm_set1_epi8(0xf0u8 as i8);
            // 16 bytes of nibbles: 32 codes as 8-bit units in dimension order. For c < 16,
            // 17c = c | c << 4 stays in its byte, so no lane ever carries into the next.
            let load = |b: &[u8]| -> (__m256i, __m256i) {
                let x: __m128i = bytemuck::pod_read_unaligned(&b[..16]);
                let l = s2._mm_and_si128(x, low);
                let l = s2._mm_or_si128(l, s2._mm_slli_epi16::<4>(l));
                let h = s2._mm_and_si128(x, high);
                let h = s2._mm_or_si128(h, s2._mm_srli_epi16::<4>(h));
                (
                    a2._mm256_cvtepu8_epi16(s2._mm_unpacklo_epi8(l, h)),
                    a2._mm256_cvtepu8_epi16(s2._mm_unpackhi_epi8(l, h)),
                )
            };
            let step = |acc: __m256i, qc: &(__m256i, __m256i), x: (__m256i, __m256i)| -> __m256i {
                let (q0, q1) = *qc;
                let d0 = a2._mm256_sub_epi16(q0, x.0);
                let d1 = a2._mm256_sub_epi16(q1, x.1);
                let acc = a2._mm256_add_epi32(acc, a2._mm256_madd_epi16(d0, d0));
                a2._mm256_add_epi32(acc, a2._mm256_madd_epi16(d1, d1))
            };
            let rows = nibbles.len() / w;
            rows_by_four(
                simd,
                &nibbles[..rows * w],
                w,
                |c, row, i| step(c, &qv[i], load(&row[i * 16..])),
                qv.len(),
                tail,
                out,
            );
        }
    }
}
