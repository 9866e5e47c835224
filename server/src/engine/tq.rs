//! The quantized storage precisions `tq12`, `tq8`, `tq6` and `tq4` (0.18): each vector is
//! stored as `bits` bits per dimension after a fixed random rotation, in the manner of
//! TurboQuant (rotate so that every coordinate is about equally distributed, then quantize
//! each coordinate with one scale). What a read returns is the decoded vector; searches and
//! distances use exactly that, as the original does (a stored vector's distance to itself
//! is then not 0). docs/FORMAT.md "Quantized vectors" writes the layout down.
//!
//! The rotation is a randomized Walsh-Hadamard transform, applied in chunks of power-of-two
//! length (the binary decomposition of the dimension, largest first, at most
//! [`max_chunk`] long), each coordinate's sign flipped by a fixed pseudo-random pattern
//! first. It is left unnormalised (`H·H = n·I`), so decoding divides by a power of two.
//! Each chunk is quantized uniformly with `L = 2^bits` levels at the odd multiples
//! `v·u` of a step `u` (`v` odd, `|v| <= L-1`), the step taken from a grid of three
//! mantissa bits (`u = g·2^e`, `8 <= g <= 15`): the smallest grid step at which at most
//! `m` coordinates lie beyond the top level (they saturate there; `m` is the share of a
//! Gaussian's tail that an optimal uniform quantizer clips).
//!
//! Exactness: decoding computes integers times powers of two, in `f64` and then `f32`,
//! with no rounding (chunks are short enough that every integer fits the `f32` mantissa),
//! and encoding a decoded vector gives back the same step and codes (the encoder only
//! settles on a step that the decoded chunk would choose again, see [`encode_chunk`]). So
//! `decode(encode(x))` is a projection: a block re-sealed by a later write or a training
//! holds exactly the vectors it held.

/// Longest chunk for `bits`: `n · (L-1) · 15` must stay below 2^24 (the integers a decoded
/// chunk holds), and no chunk is longer than 4,096.
fn max_chunk(bits: u8) -> usize {
    (1usize << (20u32.saturating_sub(bits as u32))).clamp(1, 4096)
}

/// The chunk lengths of a dimension: its binary decomposition, largest first, no chunk
/// above [`max_chunk`].
fn chunks(dim: usize, bits: u8) -> impl Iterator<Item = usize> {
    let cap = max_chunk(bits);
    let mut left = dim;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let c = if left >= cap {
            cap
        } else {
            1 << (usize::BITS - 1 - left.leading_zeros())
        };
        left -= c;
        Some(c)
    })
}

/// Bytes of a chunk's step: `i16` exponent, `u8` mantissa.
const STEP_BYTES: usize = 3;

/// Bytes of one stored vector: a step per chunk, then the packed codes.
pub fn row_bytes(dim: usize, bits: u8) -> usize {
    chunks(dim, bits).count() * STEP_BYTES + (dim * bits as usize).div_ceil(8)
}

/// The fixed sign of coordinate `i` (a splitmix64 bit: the same on every machine).
fn negated(i: usize) -> bool {
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 1
}

/// In-place unnormalised fast Walsh-Hadamard transform of a power-of-two-long slice.
fn fwht(v: &mut [f64]) {
    let n = v.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// The top level's multiplier: `L - 1`.
fn top(bits: u8) -> f64 {
    ((1u32 << bits) - 1) as f64
}

/// Coordinates of an `n`-long chunk allowed beyond the top level (the clipped Gaussian
/// tail of an optimal uniform quantizer with this many levels).
fn clipped(n: usize, bits: u8) -> usize {
    match bits {
        4 => n / 128,
        6 => n / 1024,
        8 => n / 8192,
        _ => 0,
    }
}

/// A step of the grid: `g · 2^e`, `8 <= g <= 15` (`g == 0`: the zero step of an all-zero
/// chunk).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Step {
    g: u8,
    e: i16,
}

impl Step {
    const ZERO: Step = Step { g: 0, e: 0 };
    fn value(self) -> f64 {
        self.g as f64 * 2f64.powi(self.e as i32)
    }
    fn up(self) -> Step {
        if self.g == 15 {
            Step {
                g: 8,
                e: self.e.saturating_add(1),
            }
        } else {
            Step {
                g: self.g + 1,
                e: self.e,
            }
        }
    }
    fn down(self) -> Step {
        if self.g == 8 {
            Step {
                g: 15,
                e: self.e.saturating_sub(1),
            }
        } else {
            Step {
                g: self.g - 1,
                e: self.e,
            }
        }
    }
}

/// The smallest grid step at which at most `m` of the chunk's magnitudes exceed the top
/// level (`top · u`). Every comparison is exact: on a decoded chunk, magnitude and level
/// are small integers times powers of two.
fn smallest_step(y: &[f64], bits: u8) -> Step {
    let m = clipped(y.len(), bits);
    let mut mags: Vec<f64> = y.iter().map(|x| x.abs()).collect();
    let at = mags.len() - 1 - m.min(mags.len() - 1);
    let t = *mags.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1;
    if t.is_nan() || t <= 0.0 || !t.is_finite() {
        return Step::ZERO;
    }
    let w = t / top(bits);
    let e = (w.log2().floor() as i32 - 3).clamp(i16::MIN as i32 + 1, i16::MAX as i32 - 1);
    let mut s = Step { g: 8, e: e as i16 };
    while top(bits) * s.value() < t && s.e < i16::MAX - 1 {
        s = s.up();
    }
    while top(bits) * s.down().value() >= t && s.e > i16::MIN + 1 {
        s = s.down();
    }
    s
}

/// Quantize a rotated chunk: its step and its codes (`(v + L - 1) / 2` for the odd level
/// `v`). The step is the first, going down from [`smallest_step`], that the decoded chunk
/// chooses again (a coarser step could decode to values that want a finer one; the search
/// ends at the latest when `m + 1` coordinates saturate).
fn encode_chunk(y: &[f64], bits: u8, codes: &mut Vec<u32>) -> Step {
    let v_top = top(bits);
    let mut step = smallest_step(y, bits);
    let quantize = |u: f64, x: f64| -> f64 {
        if u == 0.0 {
            return 0.0;
        }
        (2.0 * (x / (2.0 * u)).floor() + 1.0).clamp(-v_top, v_top)
    };
    if step != Step::ZERO {
        let mut decoded = vec![0f64; y.len()];
        for _ in 0..64 {
            let u = step.value();
            for (d, x) in decoded.iter_mut().zip(y) {
                *d = quantize(u, *x) * u;
            }
            if smallest_step(&decoded, bits) == step {
                break;
            }
            step = step.down();
        }
    }
    let u = step.value();
    codes.extend(y.iter().map(|x| {
        let v = if u == 0.0 { -v_top } else { quantize(u, *x) };
        ((v + v_top) / 2.0) as u32
    }));
    step
}

/// `H·D` of one chunk (`x`, starting at dimension `start` of its row) into `buf`: the fixed
/// sign flips, then the unnormalised Walsh-Hadamard transform.
fn transform_chunk(x: &[f32], start: usize, buf: &mut Vec<f64>) {
    buf.clear();
    buf.extend(x.iter().enumerate().map(|(j, &v)| {
        if negated(start + j) {
            -(v as f64)
        } else {
            v as f64
        }
    }));
    fwht(buf);
}

/// Append the encoding of `x` (`row_bytes(x.len(), bits)` bytes).
pub fn encode(x: &[f32], bits: u8, out: &mut Vec<u8>) {
    let mut codes: Vec<u32> = Vec::with_capacity(x.len());
    let mut start = 0;
    let mut buf = Vec::new();
    for n in chunks(x.len(), bits) {
        transform_chunk(&x[start..start + n], start, &mut buf);
        let step = encode_chunk(&buf, bits, &mut codes);
        out.extend_from_slice(&step.e.to_le_bytes());
        out.push(step.g);
        start += n;
    }
    pack(&codes, bits, out);
}

/// Decode one stored vector into `out` (`out.len()` is the dimension).
pub fn decode(raw: &[u8], bits: u8, out: &mut [f32]) -> Result<(), &'static str> {
    let dim = out.len();
    if raw.len() != row_bytes(dim, bits) {
        return Err("quantized vector has the wrong length");
    }
    let n_chunks = chunks(dim, bits).count();
    let (steps, packed) = raw.split_at(n_chunks * STEP_BYTES);
    let v_top = top(bits);
    let codes = unpack(packed, bits, dim);
    let mut start = 0;
    let mut buf = Vec::new();
    for (c, n) in chunks(dim, bits).enumerate() {
        let st = &steps[c * STEP_BYTES..(c + 1) * STEP_BYTES];
        let step = Step {
            e: i16::from_le_bytes([st[0], st[1]]),
            g: st[2],
        };
        if step.g != 0 && !(8..=15).contains(&step.g) {
            return Err("quantized step out of range");
        }
        let u = step.value();
        buf.clear();
        // The odd levels as integers; the step comes after the transform, with the 1/n.
        buf.extend(
            codes[start..start + n]
                .iter()
                .map(|&q| 2.0 * q as f64 - v_top),
        );
        fwht(&mut buf);
        let scale = u / n as f64;
        for (j, y) in buf.iter().enumerate() {
            let i = start + j;
            let v = (y * scale) as f32;
            // `0.0 - v`, not `-v`: a zero stays +0.
            out[i] = if negated(i) { 0.0 - v } else { v + 0.0 };
        }
        start += n;
    }
    Ok(())
}

/// The query side of a scan in the rotated domain: `q` under the orthogonal map
/// `Q = H·D / √n` of each chunk (the rotation the encoder applies, normalised), so that for
/// every stored row `x̂` and its [`decode_rotated`] form `z`, `|x̂ - q| = |z - w|` and
/// `x̂·q = z·w` (up to float rounding: the scan that uses them is a first pass, whose winners
/// are rescored on the decoded rows).
pub fn rotate(q: &[f32], bits: u8) -> Vec<f32> {
    let mut out = Vec::with_capacity(q.len());
    let mut start = 0;
    let mut buf = Vec::new();
    for n in chunks(q.len(), bits) {
        transform_chunk(&q[start..start + n], start, &mut buf);
        let s = 1.0 / (n as f64).sqrt();
        out.extend(buf.iter().map(|y| (y * s) as f32));
        start += n;
    }
    out
}

/// One stored row in the rotated domain (see [`rotate`]): each chunk's odd levels times its
/// step over `√n`. No transform runs, so this costs about what reading the codes costs.
/// `out.len()` is the dimension; `raw` must be `row_bytes(out.len(), bits)` long.
pub fn decode_rotated(raw: &[u8], bits: u8, out: &mut [f32]) -> Result<(), &'static str> {
    let dim = out.len();
    if raw.len() != row_bytes(dim, bits) {
        return Err("quantized vector has the wrong length");
    }
    let n_chunks = chunks(dim, bits).count();
    let (steps, packed) = raw.split_at(n_chunks * STEP_BYTES);
    levels_into(packed, bits, out);
    let mut start = 0;
    for (c, n) in chunks(dim, bits).enumerate() {
        let st = &steps[c * STEP_BYTES..(c + 1) * STEP_BYTES];
        let step = Step {
            e: i16::from_le_bytes([st[0], st[1]]),
            g: st[2],
        };
        if step.g != 0 && !(8..=15).contains(&step.g) {
            return Err("quantized step out of range");
        }
        let s = (step.value() / (n as f64).sqrt()) as f32;
        out[start..start + n].iter_mut().for_each(|v| *v *= s);
        start += n;
    }
    Ok(())
}

/// The odd levels `2c - (L-1)` of `out.len()` packed codes, as floats. The common widths
/// go a whole group of bytes at a time (loops the compiler vectorises); a tail, or another
/// width, goes through [`unpack`].
fn levels_into(packed: &[u8], bits: u8, out: &mut [f32]) {
    let v_top = top(bits) as f32;
    let lv = |c: u32| 2.0 * c as f32 - v_top;
    let n = out.len();
    let done = match bits {
        8 => {
            for (o, &b) in out.iter_mut().zip(packed) {
                *o = lv(b as u32);
            }
            n.min(packed.len())
        }
        4 => {
            let pairs = n / 2;
            for (o, &b) in out.chunks_exact_mut(2).zip(&packed[..pairs]) {
                o[0] = lv((b & 15) as u32);
                o[1] = lv((b >> 4) as u32);
            }
            pairs * 2
        }
        6 => {
            let groups = n / 4;
            for (o, g) in out
                .chunks_exact_mut(4)
                .zip(packed.chunks_exact(3))
                .take(groups)
            {
                let w = g[0] as u32 | (g[1] as u32) << 8 | (g[2] as u32) << 16;
                o[0] = lv(w & 63);
                o[1] = lv((w >> 6) & 63);
                o[2] = lv((w >> 12) & 63);
                o[3] = lv(w >> 18);
            }
            groups * 4
        }
        12 => {
            let groups = n / 2;
            for (o, g) in out
                .chunks_exact_mut(2)
                .zip(packed.chunks_exact(3))
                .take(groups)
            {
                let w = g[0] as u32 | (g[1] as u32) << 8 | (g[2] as u32) << 16;
                o[0] = lv(w & 4095);
                o[1] = lv(w >> 12);
            }
            groups * 2
        }
        _ => 0,
    };
    if done < n {
        // Whole groups end on a byte boundary, so the tail starts on one.
        let from = done * bits as usize / 8;
        for (o, c) in
            out[done..]
                .iter_mut()
                .zip(unpack(packed.get(from..).unwrap_or(&[]), bits, n - done))
        {
            *o = lv(c);
        }
    }
}

/// Give `x` the value it has after a store/load round trip.
pub fn round_in_place(x: &mut [f32], bits: u8) {
    let mut raw = Vec::with_capacity(row_bytes(x.len(), bits));
    encode(x, bits, &mut raw);
    decode(&raw, bits, x).expect("a fresh encoding decodes");
}

/// `bits`-bit values, least significant bit first.
fn pack(codes: &[u32], bits: u8, out: &mut Vec<u8>) {
    let mut acc: u64 = 0;
    let mut have = 0u32;
    for &c in codes {
        acc |= (c as u64) << have;
        have += bits as u32;
        while have >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            have -= 8;
        }
    }
    if have > 0 {
        out.push(acc as u8);
    }
}

fn unpack(raw: &[u8], bits: u8, n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n);
    let mut acc: u64 = 0;
    let mut have = 0u32;
    let mask = (1u64 << bits) - 1;
    let mut bytes = raw.iter();
    while out.len() < n {
        while have < bits as u32 {
            acc |= (*bytes.next().unwrap_or(&0) as u64) << have;
            have += 8;
        }
        out.push((acc & mask) as u32);
        acc >>= bits;
        have -= bits as u32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn chunks_decompose_the_dimension() {
        assert_eq!(chunks(384, 8).collect::<Vec<_>>(), [256, 128]);
        assert_eq!(chunks(384, 12).collect::<Vec<_>>(), [256, 128]);
        assert_eq!(chunks(1536, 12).collect::<Vec<_>>(), [256; 6]);
        assert_eq!(chunks(7, 4).collect::<Vec<_>>(), [4, 2, 1]);
        assert_eq!(
            chunks(9000, 4).collect::<Vec<_>>(),
            [4096, 4096, 512, 256, 32, 8]
        );
        assert_eq!(row_bytes(128, 4), 3 + 64);
        assert_eq!(row_bytes(384, 12), 6 + 576);
    }

    #[test]
    fn decoding_is_a_projection_and_error_shrinks_with_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for dim in [1usize, 2, 3, 8, 100, 128, 384, 1000] {
            let mut last_err = f64::INFINITY;
            for bits in [4u8, 6, 8, 12] {
                let mut err = 0.0;
                let mut energy = 0.0;
                for _ in 0..20 {
                    let x = gaussian(&mut rng, dim);
                    let mut y = x.clone();
                    round_in_place(&mut y, bits);
                    let mut z = y.clone();
                    round_in_place(&mut z, bits);
                    assert_eq!(
                        y, z,
                        "dim {dim} bits {bits}: a decoded vector re-encodes to itself"
                    );
                    err += x
                        .iter()
                        .zip(&y)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum::<f64>();
                    energy += x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
                }
                let rel = (err / energy).sqrt();
                assert!(
                    rel < last_err || rel < 1e-6,
                    "dim {dim}: {bits} bits no better ({rel} vs {last_err})"
                );
                if dim >= 100 {
                    // The original's tq tiers on the same kind of data measure 0.095, 0.026,
                    // 0.0065 and 0.0004 (tests/bench/tq.py).
                    let bound = match bits {
                        4 => 0.125,
                        6 => 0.033,
                        8 => 0.0085,
                        _ => 0.0006,
                    };
                    assert!(rel < bound, "dim {dim} bits {bits}: relative error {rel}");
                }
                eprintln!("dim {dim} bits {bits}: relative error {rel:.5}");
                last_err = rel;
            }
        }
    }

    #[test]
    fn the_rotated_domain_keeps_distances_and_dots() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for dim in [1usize, 3, 7, 64, 100, 128, 384, 1000] {
            for bits in [4u8, 6, 8, 12] {
                let q = gaussian(&mut rng, dim);
                let w = rotate(&q, bits);
                for _ in 0..5 {
                    let x = gaussian(&mut rng, dim);
                    let mut raw = Vec::new();
                    encode(&x, bits, &mut raw);
                    let mut xd = vec![0f32; dim];
                    decode(&raw, bits, &mut xd).unwrap();
                    let mut z = vec![0f32; dim];
                    decode_rotated(&raw, bits, &mut z).unwrap();
                    let l2 = |a: &[f32], b: &[f32]| {
                        a.iter()
                            .zip(b)
                            .map(|(x, y)| ((x - y) as f64).powi(2))
                            .sum::<f64>()
                    };
                    let dot = |a: &[f32], b: &[f32]| {
                        a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>()
                    };
                    let scale = dot(&q, &q) + dot(&xd, &xd);
                    let tol = 1e-5 * scale.max(1.0);
                    assert!(
                        (l2(&xd, &q) - l2(&z, &w)).abs() < tol,
                        "dim {dim} bits {bits}"
                    );
                    assert!(
                        (dot(&xd, &q) - dot(&z, &w)).abs() < tol,
                        "dim {dim} bits {bits}"
                    );
                    assert!((dot(&xd, &xd) - dot(&z, &z)).abs() < tol);
                }
            }
        }
        let mut raw = Vec::new();
        encode(&[1.0, 2.0], 6, &mut raw);
        assert!(decode_rotated(&raw[..raw.len() - 1], 6, &mut [0.0; 2]).is_err());
    }

    #[test]
    fn extreme_and_zero_vectors_survive() {
        for bits in [4u8, 6, 8, 12] {
            for x in [
                vec![0.0f32; 16],
                vec![1e-30; 16],
                vec![1e30, -1e30, 1.0, 0.0],
                vec![65504.0; 5],
            ] {
                let mut y = x.clone();
                round_in_place(&mut y, bits);
                assert!(y.iter().all(|v| v.is_finite()), "{x:?} -> {y:?}");
                let mut z = y.clone();
                round_in_place(&mut z, bits);
                assert_eq!(y, z);
            }
        }
        let mut raw = Vec::new();
        encode(&[1.0, 2.0], 4, &mut raw);
        assert!(decode(&raw[..raw.len() - 1], 4, &mut [0.0; 2]).is_err());
    }
}
