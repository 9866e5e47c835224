//! The BERT encoder's forward pass, written for throughput on the CPU with candle's ops.
//!
//! The mathematics are those of `candle_transformers::models::bert::BertModel` (and Hugging
//! Face's BERT): embeddings and LayerNorm; then per layer self-attention, the output projection
//! with its residual and LayerNorm, and the GELU (erf) feed-forward with its residual and
//! LayerNorm. What differs is the shape of the work: every projection is one 2-D matrix product
//! over all `batch × tokens` rows, Q, K and V are one fused product, weights are transposed once
//! at load, and the feed-forward bias and GELU are one parallel pass (`BiasGelu`). Checked
//! against the library's forward pass (`tests::matches_the_library_forward`, with a model
//! installed) and, end to end, against the published sentence-transformers similarities
//! (tests/test_embeddings.py).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::bert::Config;

/// A linear layer stored as `x · W + b` with `W` already transposed to `(in, out)`.
struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    fn load(vb: &VarBuilder, inp: usize, out: usize) -> Result<Self> {
        let w = vb.get((out, inp), "weight")?.t()?.contiguous()?;
        Ok(Self {
            w,
            b: vb.get(out, "bias")?,
        })
    }
    fn fused(parts: &[Dense]) -> Result<Self> {
        let w: Vec<&Tensor> = parts.iter().map(|d| &d.w).collect();
        let b: Vec<&Tensor> = parts.iter().map(|d| &d.b).collect();
        Ok(Self {
            w: Tensor::cat(&w, 1)?.contiguous()?,
            b: Tensor::cat(&b, 0)?,
        })
    }
    /// `x` is `(rows, in)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.w)?.broadcast_add(&self.b)
    }
}

/// `gelu(x + bias)` in one pass over the rows, in parallel: the feed-forward activation
/// (exact GELU, erf form) fused with the projection's bias add. candle's own `gelu_erf`
/// evaluates `erf` in f64 on one core and the bias add is a separate pass; this is the single
/// largest non-GEMM cost of the forward pass.
struct BiasGelu;

/// `erf` in f32 without a library call, so the loop below vectorises: Abramowitz & Stegun
/// 7.1.28, `1 - (1 + a1 x + ... + a6 x^6)^-16`, absolute error below 3e-7 (x >= 0; odd
/// extension for x < 0).
#[inline(always)]
fn erf(x: f32) -> f32 {
    const A: [f32; 6] = [
        0.070_523_08,
        0.042_282_01,
        0.009_270_527,
        0.000_152_014_3,
        0.000_276_567_2,
        0.000_043_063_8,
    ];
    let z = x.abs().min(6.0);
    let p = 1.0 + z * (A[0] + z * (A[1] + z * (A[2] + z * (A[3] + z * (A[4] + z * A[5])))));
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    let r = 1.0 - 1.0 / (p8 * p8);
    r.copysign(x)
}

impl candle_core::CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (candle_core::CpuStorage::F32(x), candle_core::CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bias-gelu-erf takes f32");
        };
        let (Some((x0, x1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias-gelu-erf takes contiguous tensors");
        };
        let (x, b) = (&x[x0..x1], &b[b0..b1]);
        let cols = b.len();
        if cols == 0 || x.len() % cols != 0 {
            candle_core::bail!("bias-gelu-erf: bias of {cols} does not divide {}", x.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cols * 64)
            .zip(x.par_chunks(cols * 64))
            .for_each(|(o, x)| {
                for (orow, xrow) in o.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
                    for ((o, &x), &b) in orow.iter_mut().zip(xrow).zip(b) {
                        let v = x + b;
                        *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `gelu(x + bias)` over the rows of `x` (the fused kernel; public for the benchmark).
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(bias, &BiasGelu)
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    candle_nn::layer_norm(size, eps, vb)
}

struct Layer {
    qkv: Dense,
    out: Dense,
    ln_attn: LayerNorm,
    inter: Dense,
    down: Dense,
    ln_out: LayerNorm,
}

/// The encoder.
pub struct Encoder {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln_emb: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
}

impl Encoder {
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let q = Dense::load(&a.pp("self.query"), h, h)?;
            let k = Dense::load(&a.pp("self.key"), h, h)?;
            let v = Dense::load(&a.pp("self.value"), h, h)?;
            layers.push(Layer {
                qkv: Dense::fused(&[q, k, v])?,
                out: Dense::load(&a.pp("output.dense"), h, h)?,
                ln_attn: layer_norm(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                inter: Dense::load(&l.pp("intermediate.dense"), h, c.intermediate_size)?,
                down: Dense::load(&l.pp("output.dense"), c.intermediate_size, h)?,
                ln_out: layer_norm(l.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            });
        }
        Ok(Self {
            word: e.get((c.vocab_size, h), "word_embeddings.weight")?,
            position: e.get((c.max_position_embeddings, h), "position_embeddings.weight")?,
            token_type: e.get((c.type_vocab_size, h), "token_type_embeddings.weight")?,
            ln_emb: layer_norm(e.pp("LayerNorm"), h, c.layer_norm_eps)?,
            layers,
            heads: c.num_attention_heads,
            hidden: h,
        })
    }

    /// `ids` and `mask` are `(batch, tokens)` u32; the result is `(batch, tokens, hidden)`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        // Embeddings: word + position + token type 0, as (b*s, h) rows.
        let words = self.word.index_select(&ids.flatten_all()?, 0)?;
        let pos = self.position.narrow(0, 0, s)?;
        let x = words
            .reshape((b, s, h))?
            .broadcast_add(&pos)?
            .broadcast_add(&self.token_type.narrow(0, 0, 1)?)?
            .reshape((b * s, h))?;
        let mut x = self.ln_emb.forward(&x)?;
        // Additive mask over keys: 0 where kept, the most negative float where padding.
        let keep = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, s))?;
        let add_mask = ((keep.ones_like()? - &keep)? * f32::MIN as f64)?;
        let scale = 1.0 / (d as f64).sqrt();
        for l in &self.layers {
            let qkv = l.qkv.forward(&x)?; // (b*s, 3h)
            let split = |i: usize| -> Result<Tensor> {
                qkv.narrow(1, i * h, h)?
                    .reshape((b, s, heads, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&add_mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * s, h))?;
            let attn = l.ln_attn.forward(&(l.out.forward(&ctx)? + &x)?)?;
            let inter = attn
                .matmul(&l.inter.w)?
                .apply_op2_no_bwd(&l.inter.b, &BiasGelu)?;
            x = l.ln_out.forward(&(l.down.forward(&inter)? + &attn)?)?;
        }
        x.reshape((b, s, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn cpu() -> Device {
        Device::Cpu
    }

    /// Our forward pass and candle-transformers' agree on a real model (run where one is
    /// installed: tests/run.sh installs all-MiniLM-L6-v2 and sets SEALDB_MODELS_DIR).
    #[test]
    fn fused_bias_gelu_matches_the_exact_form() {
        let x = Tensor::new(&[[-6.0f32, -2.5, -1.0, -0.1], [0.0, 0.3, 1.7, 8.0]], &cpu()).unwrap();
        let b = Tensor::new(&[0.5f32, -0.25, 0.0, 1.0], &cpu()).unwrap();
        let ours = x.apply_op2_no_bwd(&b, &BiasGelu).unwrap();
        let exact = x.broadcast_add(&b).unwrap().gelu_erf().unwrap();
        let d = (ours - exact)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        let worst = d.max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(worst < 2e-6, "max abs difference {worst}");
    }

    #[test]
    fn matches_the_library_forward() {
        let Some(dir) = std::env::var_os("SEALDB_MODELS_DIR")
            .map(|d| std::path::PathBuf::from(d).join("all-MiniLM-L6-v2"))
            .filter(|d| d.join("model.safetensors").is_file())
        else {
            // CI installs the model; a developer without it is told, not failed.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install the model (tests/run.sh)"
            );
            eprintln!("no model installed (SEALDB_MODELS_DIR): comparison not run");
            return;
        };
        let c: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &cpu()).unwrap();
        let ours = Encoder::load(vb.clone(), &c).unwrap();
        let theirs = candle_transformers::models::bert::BertModel::load(vb, &c).unwrap();
        let ids = Tensor::new(
            &[
                [101u32, 2023, 2003, 1037, 3231, 102, 0, 0],
                [101, 7592, 2088, 102, 0, 0, 0, 0],
            ],
            &cpu(),
        )
        .unwrap();
        let mask = Tensor::new(
            &[[1u32, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]],
            &cpu(),
        )
        .unwrap();
        let a = ours.forward(&ids, &mask).unwrap();
        let b = theirs
            .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(D::Minus1)
            .unwrap();
        let worst = diff
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(worst < 1e-4, "max abs difference {worst}");
    }
}
