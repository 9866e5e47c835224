//! One BERT-family sentence-transformers model, run in-process with candle on the CPU:
//! tokenise (padding to the batch's longest text, truncation at the model's
//! `max_seq_length`), forward pass, the model's pooling (mean over the attention mask, or the
//! CLS token), then L2 normalisation when the model has a `Normalize` module.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;

use super::encoder::Encoder;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::EmbedError;

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps.
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
}

/// A loaded model.
pub struct Bert {
    model: Encoder,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    pub dimension: usize,
    pub max_seq_length: usize,
    layers: usize,
    intermediate: usize,
}

fn load_err(dir: &Path, what: &str, e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Load(format!("{} ({what}): {e}", dir.display()))
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl Bert {
    /// Load `config.json`, `tokenizer.json` and `model.safetensors` from `dir`, with the
    /// sentence-transformers pooling/normalize/max-length configs when present.
    pub fn load(dir: &Path, default_max_len: usize) -> Result<Self, EmbedError> {
        let config_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| load_err(dir, "config.json", e))?;
        let config: Config =
            serde_json::from_str(&config_text).map_err(|e| load_err(dir, "config.json", e))?;
        let max_seq_length = read_json(&dir.join("sentence_bert_config.json"))
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .map(|n| n as usize)
            .unwrap_or(default_max_len)
            .min(config.max_position_embeddings);
        let pooling = match read_json(&dir.join("1_Pooling/config.json")) {
            Some(p) if p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()) == Some(true) => {
                Pooling::Cls
            }
            _ => Pooling::Mean,
        };
        let normalize = match std::fs::read_to_string(dir.join("modules.json")) {
            Ok(m) => m.contains("sentence_transformers.models.Normalize"),
            Err(_) => true,
        };
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_err(dir, "tokenizer.json", e))?;
        // The shipped tokenizer may pad every text to a fixed length: pad to the batch's
        // longest instead (the attention mask excludes padding from the pooling either way).
        let mut padding = tokenizer
            .get_padding()
            .cloned()
            .unwrap_or(PaddingParams::default());
        padding.strategy = PaddingStrategy::BatchLongest;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| load_err(dir, "truncation", e))?;
        let weights = dir.join("model.safetensors");
        let vb = load_weights(&weights).map_err(|e| load_err(dir, "model.safetensors", e))?;
        let model = Encoder::load(vb, &config).map_err(|e| load_err(dir, "weights", e))?;
        Ok(Self {
            model,
            tokenizer,
            pooling,
            normalize,
            dimension: config.hidden_size,
            max_seq_length,
            layers: config.num_hidden_layers,
            intermediate: config.intermediate_size,
        })
    }

    /// Embed a batch of texts: one vector of `dimension` per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let run = |e: &dyn std::fmt::Display| EmbedError::Run(e.to_string());
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| run(&e))?;
        let (n, len) = (enc.len(), enc[0].get_ids().len());
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in &enc {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(ids, (n, len), &dev).map_err(|e| run(&e))?;
        let mask = Tensor::from_vec(mask, (n, len), &dev).map_err(|e| run(&e))?;
        let hidden = self.model.forward(&ids, &mask).map_err(|e| run(&e))?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1).and_then(|t| t.squeeze(1)),
            Pooling::Mean => (|| {
                let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
                sum.broadcast_div(&count)
            })(),
        }
        .map_err(|e| run(&e))?;
        let pooled = if self.normalize {
            (|| {
                let norm = pooled
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12f32, f32::MAX)?;
                pooled.broadcast_div(&norm)
            })()
            .map_err(|e| run(&e))?
        } else {
            pooled
        };
        pooled.to_vec2::<f32>().map_err(|e| run(&e))
    }

    /// Tokens per text after padding a batch (for the benchmark's FLOP count).
    pub fn padded_len(&self, texts: &[&str]) -> usize {
        self.tokenizer
            .encode_batch(texts.to_vec(), true)
            .ok()
            .and_then(|e| e.first().map(|e| e.get_ids().len()))
            .unwrap_or(0)
    }

    /// Forward-pass FLOPs of a batch of `n` texts padded to `len` tokens, matrix products
    /// only (Q, K, V, output and the two feed-forward projections, plus attention scores and
    /// their weighted sum), for the benchmark's GFLOP/s figure.
    pub fn flops(&self, n: usize, len: usize) -> f64 {
        let (h, t) = (self.dimension as f64, (n * len) as f64);
        let projections = 2.0 * t * (4.0 * h * h + 2.0 * h * self.intermediate as f64);
        let attention = 2.0 * 2.0 * n as f64 * (len * len) as f64 * h;
        (projections + attention) * self.layers as f64
    }
}

fn load_weights(path: &Path) -> candle_core::Result<VarBuilder<'static>> {
    // Read the file rather than memory-map it: no `unsafe` outside the plugin ABI, and the
    // weights stay resident either way (they are read on every forward pass).
    let bytes = std::fs::read(path)?;
    VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)
}
