//! Settings: command-line flags > environment > YAML file > defaults, validated into one
//! [`Config`]. The environment variables and YAML keys are the original service's, so an
//! operator can switch servers without edits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::kms::SlotConfig;
use crate::plugins::PluginConfig;

/// When the disk backend acknowledges a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// After fdatasync: survives power loss.
    Sync,
    /// In the OS page cache: survives a server crash, not a machine crash.
    Relaxed,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected true or false, got '{other}'")),
    }
}

fn parse_level(s: &str) -> Result<String, String> {
    let l = s.trim().to_ascii_uppercase();
    match l.as_str() {
        "TRACE" | "DEBUG" | "INFO" | "WARNING" | "WARN" | "ERROR" | "CRITICAL" => Ok(l),
        _ => Err(format!("expected DEBUG, INFO, WARNING or ERROR, got '{s}'")),
    }
}

/// SealDB server: an encrypted vector database speaking the CyborgDB REST API.
#[derive(Clone, Parser)]
#[command(name = "sealdb", version, about)]
pub struct Config {
    /// Address to bind.
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// Storage backend: `disk` (embedded redb under --disk-path, durable), `filesystem` (one
    /// file per record under --disk-path), `memory` (lost at exit), or a store a plugin offers.
    #[arg(long, env = "CYBORGDB_DB_TYPE", default_value = "disk")]
    pub db_type: String,

    /// Data directory of the disk backend.
    #[arg(long, env = "CYBORGDB_DISK_PATH", default_value = "./sealdb-data")]
    pub disk_path: PathBuf,

    /// S3 store (`--db-type s3`): the bucket (required).
    #[arg(long, env = "CYBORGDB_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// S3 store: the region (default us-east-1).
    #[arg(long, env = "CYBORGDB_S3_REGION")]
    pub s3_region: Option<String>,

    /// S3 store: a prefix for every object name.
    #[arg(long, env = "CYBORGDB_S3_PREFIX")]
    pub s3_prefix: Option<String>,

    /// S3 store: an S3-compatible endpoint (MinIO, SeaweedFS, R2; `http://` allowed).
    #[arg(long, env = "CYBORGDB_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3 store: access key id (else the standard AWS credential chain).
    #[arg(long, env = "CYBORGDB_S3_ACCESS_KEY", hide_env_values = true)]
    pub s3_access_key: Option<String>,

    /// S3 store: secret access key.
    #[arg(long, env = "CYBORGDB_S3_SECRET_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,

    /// S3 store: session token for temporary credentials.
    #[arg(long, env = "CYBORGDB_S3_SESSION_TOKEN", hide_env_values = true)]
    pub s3_session_token: Option<String>,

    /// S3 store: longest (ms) a request may see the bucket as it was before writes other
    /// servers acknowledged (0 = look at the bucket on every request).
    #[arg(long, env = "SEALDB_S3_REFRESH_MS", default_value_t = 1000)]
    pub s3_refresh_ms: u64,

    /// S3 store: seconds a dead log object or old snapshot is kept before compaction deletes
    /// it (servers whose view is older than this must not still be reading).
    #[arg(long, env = "SEALDB_S3_RETENTION_SECONDS", default_value_t = 600)]
    pub s3_retention_seconds: u64,

    /// S3 store: seconds between compaction passes (snapshots, copying live values out of
    /// mostly dead log objects, deletes); 0 = never.
    #[arg(long, env = "SEALDB_S3_COMPACT_SECONDS", default_value_t = 30)]
    pub s3_compact_seconds: u64,

    /// When a write is acknowledged (disk backend). `sync`: after fdatasync of the write-ahead
    /// log, so it survives power loss. `relaxed`: once in the OS page cache, so it survives a
    /// crash of the server but not of the machine (RocksDB's default class).
    #[arg(
        long,
        env = "SEALDB_DURABILITY",
        value_enum,
        default_value = "sync",
        ignore_case = true
    )]
    pub durability: Durability,

    /// Compact the disk store before serving (redb backend): move every record to the file
    /// the current layout puts it in (a data directory from before per-generation files gets
    /// them), then return the pages that deletes freed inside each file to the file system.
    /// Takes exclusive use of the files: about 20 s for 15 GB on a 2-core VM (README, "Disk
    /// space").
    #[arg(long, env = "SEALDB_COMPACT_ON_START", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub compact_on_start: bool,

    /// Log level: DEBUG, INFO, WARNING or ERROR.
    #[arg(long, env = "CYBORGDB_SERVICE_LOG_LEVEL", default_value = "INFO", value_parser = parse_level)]
    pub log_level: String,

    /// Log format: `text` (human-readable) or `json` (one JSON object per line, with the
    /// request id and operation of request lines).
    #[arg(
        long,
        env = "SEALDB_LOG_FORMAT",
        value_enum,
        default_value = "text",
        ignore_case = true
    )]
    pub log_format: LogFormat,

    /// Vector count at which an untrained index starts training in the background.
    #[arg(long, env = "AUTO_TRAIN_MIN_VECTORS", default_value_t = 65_536)]
    pub auto_train_min_vectors: usize,

    /// Turn background (automatic) training off.
    #[arg(long, env = "AUTO_TRAIN_DISABLED", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub auto_train_disabled: bool,

    /// Budget in MiB for decrypted data of all indexes: the shared cache of decrypted
    /// posting-list blocks holds at most this much, and idle open indexes (centroids, block
    /// directory, keys) beyond it are dropped. 0 = keep nothing between requests (every read
    /// decrypts again; no key material stays in memory). Unset = half of physical memory
    /// (or of the cgroup's memory limit, when lower).
    #[arg(long, env = "SEALDB_INDEX_CACHE_MB")]
    pub index_cache_mb: Option<u64>,

    /// Largest request body accepted, in MiB (1-65536); a larger one is refused with 413
    /// before it is read into memory.
    #[arg(long, env = "SEALDB_MAX_BODY_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub max_body_mb: u64,

    /// Most result rows one query request may ask for: `top_k` times the number of query
    /// vectors (422 beyond).
    #[arg(long, env = "SEALDB_MAX_QUERY_RESULTS", default_value_t = 1_000_000)]
    pub max_query_results: usize,

    /// Most ids in one get or delete request (422 beyond).
    #[arg(long, env = "SEALDB_MAX_IDS_PER_REQUEST", default_value_t = 100_000)]
    pub max_ids_per_request: usize,

    /// Longest item id in bytes (422 beyond).
    #[arg(long, env = "SEALDB_MAX_ID_BYTES", default_value_t = 1024)]
    pub max_id_bytes: usize,

    /// Largest vector dimension (422 beyond).
    #[arg(long, env = "SEALDB_MAX_DIMENSION", default_value_t = 65_536)]
    pub max_dimension: usize,

    /// Deepest nesting of a filter document (422 beyond).
    #[arg(long, env = "SEALDB_MAX_FILTER_DEPTH", default_value_t = 32)]
    pub max_filter_depth: usize,

    /// Most operators and values in one filter document (422 beyond).
    #[arg(long, env = "SEALDB_MAX_FILTER_NODES", default_value_t = 10_000)]
    pub max_filter_nodes: usize,

    /// Largest `max_iters` a train request may ask for (422 beyond).
    #[arg(long, env = "SEALDB_MAX_TRAIN_ITERS", default_value_t = 1000)]
    pub max_train_iters: usize,

    /// Largest `n_lists` a train request may ask for (422 beyond).
    #[arg(long, env = "SEALDB_MAX_N_LISTS", default_value_t = 65_536)]
    pub max_n_lists: usize,

    /// Largest `batch_size` a train request may ask for (422 beyond).
    #[arg(long, env = "SEALDB_MAX_TRAIN_BATCH_SIZE", default_value_t = 65_536)]
    pub max_train_batch_size: usize,

    /// Largest `max_memory` (MiB) a train request may ask for (422 beyond).
    #[arg(long, env = "SEALDB_MAX_TRAIN_MEMORY_MB", default_value_t = 65_536)]
    pub max_train_memory_mb: usize,

    /// Seconds one training (explicit or background) may run before it is stopped; the
    /// index keeps its previous lists. 0 = no limit.
    #[arg(long, env = "SEALDB_MAX_TRAIN_SECONDS", default_value_t = 3600)]
    pub max_train_seconds: u64,

    /// Vector data, in MiB, from which a training gives an index a 4-bit first pass: its
    /// queries scan 4-bit codes of the probed blocks, kept in the block cache (an eighth of
    /// float32's bytes), and rescore their best candidates on the blocks themselves, so an
    /// index many times the cache budget decrypts only the blocks its candidates are in.
    #[arg(long, env = "SEALDB_COARSE_PASS_MIN_MB", default_value_t = 1024)]
    pub coarse_pass_min_mb: u64,

    /// Seconds a shutdown (SIGTERM, SIGINT) waits for requests in flight before it stops
    /// them; trainings are stopped at once. Then the store is flushed and the process exits 0.
    #[arg(long, env = "SEALDB_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_timeout_seconds: u64,

    /// Root API key: when set, every route but /v1/health needs X-API-Key.
    #[arg(long, env = "CYBORGDB_SERVICE_ROOT_KEY", hide_env_values = true)]
    pub root_key: Option<String>,

    /// Legacy single API key: when set (and no root key), it is required on every route but
    /// /v1/health and gives full access except user management.
    #[arg(long, env = "CYBORGDB_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// YAML configuration file (default: ./cyborgdb.yaml if present).
    #[arg(long = "config", env = "CYBORGDB_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Seconds a KEK unwrapped through a KMS slot stays in memory (0 = ask the KMS on every
    /// request). KMS-side revocation takes effect within this time.
    #[arg(long, env = "INDEX_KEK_CACHE_TTL_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub kek_cache_ttl_seconds: u64,

    /// KMS slots from the YAML file's `kms.registry` (YAML only, like the original).
    #[arg(skip)]
    pub kms_slots: Vec<SlotConfig>,

    /// Plugin libraries from the YAML file's `plugins:` list.
    #[arg(skip)]
    pub plugins: Vec<PluginConfig>,

    /// Longest a KMS call or a store-plugin call may take, in seconds, before the request
    /// fails (502 for KMS, 500 for a store).
    #[arg(long, env = "SEALDB_PLUGIN_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub plugin_timeout_seconds: u64,

    /// Where embedding models are looked for (`<dir>/<model>/` or `<dir>/<org>/<model>/`);
    /// `CYBORGDB_EMBED_CACHE` is looked in too. Install one with `scripts/fetch-model.sh`.
    #[arg(long, env = "SEALDB_MODELS_DIR", default_value = "./models")]
    pub models_dir: PathBuf,

    /// The original service's model cache, another place to look for models.
    #[arg(long, env = "CYBORGDB_EMBED_CACHE")]
    pub embed_cache: Option<PathBuf>,

    /// PEM certificate chain: with --ssl-key-path, serve HTTPS (reloaded on SIGHUP).
    #[arg(long, env = "SSL_CERT_PATH")]
    pub ssl_cert_path: Option<PathBuf>,

    /// PEM private key of --ssl-cert-path.
    #[arg(long, env = "SSL_KEY_PATH")]
    pub ssl_key_path: Option<PathBuf>,

    /// Serve GET /metrics without an API key even when authentication is on.
    #[arg(long, env = "SEALDB_METRICS_OPEN", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub metrics_open: bool,

    /// Label per-index metrics with index names (off by default: names can be sensitive).
    #[arg(long, env = "SEALDB_METRICS_INDEX_LABELS", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub metrics_index_labels: bool,

    /// Print the OpenAPI spec (JSON) and exit.
    #[arg(long)]
    pub print_openapi: bool,
}

/// A configuration problem; the text names the setting.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// `(field id, YAML key)` of every setting the YAML file may provide.
const YAML_KEYS: &[(&str, &str)] = &[
    ("host", "host"),
    ("port", "port"),
    ("db_type", "cyborgdb_db_type"),
    ("disk_path", "cyborgdb_disk_path"),
    ("s3_bucket", "cyborgdb_s3_bucket"),
    ("s3_region", "cyborgdb_s3_region"),
    ("s3_prefix", "cyborgdb_s3_prefix"),
    ("s3_endpoint", "cyborgdb_s3_endpoint"),
    ("s3_access_key", "cyborgdb_s3_access_key"),
    ("s3_secret_key", "cyborgdb_s3_secret_key"),
    ("s3_session_token", "cyborgdb_s3_session_token"),
    ("s3_refresh_ms", "sealdb_s3_refresh_ms"),
    ("log_level", "cyborgdb_service_log_level"),
    ("auto_train_min_vectors", "auto_train_min_vectors"),
    ("auto_train_disabled", "auto_train_disabled"),
    ("root_key", "cyborgdb_service_root_key"),
    ("api_key", "cyborgdb_api_key"),
    ("index_cache_mb", "sealdb_index_cache_mb"),
    ("durability", "sealdb_durability"),
    ("compact_on_start", "sealdb_compact_on_start"),
    ("max_body_mb", "sealdb_max_body_mb"),
    ("plugin_timeout_seconds", "sealdb_plugin_timeout_seconds"),
    ("models_dir", "sealdb_models_dir"),
    ("log_format", "sealdb_log_format"),
    ("metrics_open", "sealdb_metrics_open"),
    ("ssl_cert_path", "ssl_cert_path"),
    ("ssl_key_path", "ssl_key_path"),
    ("metrics_index_labels", "sealdb_metrics_index_labels"),
    ("embed_cache", "cyborgdb_embed_cache"),
    ("kek_cache_ttl_seconds", "index_kek_cache_ttl_seconds"),
];

/// Expand `${VAR}` (must be set) and `${VAR:-default}` in a YAML string.
fn expand_env(s: &str, key: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError(format!("{key}: unterminated ${{...}} in YAML")))?;
        let expr = &after[..end];
        let (var, default) = match expr.split_once(":-") {
            Some((v, d)) => (v, Some(d)),
            None => (expr, None),
        };
        match (std::env::var(var).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(ConfigError(format!(
                    "{key}: environment variable {var} is referenced in the YAML file but not set"
                )))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A YAML scalar as text (`None` for null); anything else is an error naming `key`.
fn scalar(v: &serde_yaml_ng::Value, key: &str) -> Result<Option<String>, ConfigError> {
    Ok(match v {
        serde_yaml_ng::Value::String(s) => Some(expand_env(s, key)?),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        serde_yaml_ng::Value::Null => None,
        _ => return Err(ConfigError(format!("{key} must be a scalar"))),
    })
}

/// `kms.registry`: one slot per entry, `provider` required, every other field a string.
fn load_kms(
    doc: &serde_yaml_ng::Value,
    path: &std::path::Path,
) -> Result<Vec<SlotConfig>, ConfigError> {
    let Some(kms) = doc.get("kms") else {
        return Ok(Vec::new());
    };
    let Some(registry) = kms.get("registry") else {
        return Ok(Vec::new());
    };
    if registry.is_null() {
        return Ok(Vec::new());
    }
    let registry = registry.as_mapping().ok_or_else(|| {
        ConfigError(format!(
            "kms.registry in {} must be a mapping of slot names",
            path.display()
        ))
    })?;
    let mut out = Vec::new();
    for (name, slot) in registry {
        let name = name
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ConfigError("kms.registry: slot names must be non-empty strings".into())
            })?
            .to_owned();
        let slot = slot.as_mapping().ok_or_else(|| {
            ConfigError(format!("kms.registry.{name} must be a mapping of fields"))
        })?;
        let mut fields = sealdb_plugin_api::SlotFields::new();
        for (k, v) in slot {
            let k = k
                .as_str()
                .ok_or_else(|| {
                    ConfigError(format!("kms.registry.{name}: field names must be strings"))
                })?
                .to_owned();
            if let Some(v) = scalar(v, &format!("kms.registry.{name}.{k}"))? {
                fields.insert(k, v);
            }
        }
        let provider = fields
            .remove("provider")
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| {
                ConfigError(format!("kms.registry.{name}: field 'provider' is required"))
            })?;
        out.push(SlotConfig {
            name,
            provider: provider.trim().to_owned(),
            fields,
        });
    }
    Ok(out)
}

/// `plugins:`: a list of `{path, sha256?, config?}`. Relative paths are relative to the YAML
/// file's directory.
fn load_plugins(
    doc: &serde_yaml_ng::Value,
    path: &std::path::Path,
) -> Result<Vec<PluginConfig>, ConfigError> {
    let Some(list) = doc.get("plugins") else {
        return Ok(Vec::new());
    };
    if list.is_null() {
        return Ok(Vec::new());
    }
    let list = list
        .as_sequence()
        .ok_or_else(|| ConfigError("plugins must be a list of {path, sha256, config}".into()))?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let mut out = Vec::new();
    for (i, e) in list.iter().enumerate() {
        let at = format!("plugins[{i}]");
        let m = e
            .as_mapping()
            .ok_or_else(|| ConfigError(format!("{at} must be a mapping with a path")))?;
        let mut plugin_path = None;
        let mut sha256 = None;
        let mut config = serde_json::Map::new();
        for (k, v) in m {
            match k.as_str() {
                Some("path") => plugin_path = scalar(v, &format!("{at}.path"))?,
                Some("sha256") => sha256 = scalar(v, &format!("{at}.sha256"))?,
                Some("config") => {
                    let json = serde_json::to_value(v).map_err(|e| {
                        ConfigError(format!("{at}.config cannot be represented as JSON: {e}"))
                    })?;
                    config = match json {
                        serde_json::Value::Object(o) => o,
                        serde_json::Value::Null => serde_json::Map::new(),
                        _ => return Err(ConfigError(format!("{at}.config must be a mapping"))),
                    };
                }
                other => {
                    return Err(ConfigError(format!(
                        "{at}: unknown field {other:?} (expected path, sha256, config)"
                    )))
                }
            }
        }
        let p = plugin_path
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ConfigError(format!("{at}.path is required")))?;
        let p = std::path::PathBuf::from(p);
        out.push(PluginConfig {
            path: if p.is_relative() { base.join(p) } else { p },
            sha256,
            config,
        });
    }
    Ok(out)
}

type Yaml = (HashMap<String, String>, Vec<SlotConfig>, Vec<PluginConfig>);

fn load_yaml(path: &std::path::Path) -> Result<Yaml, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| {
        ConfigError(format!(
            "config file {} is not valid YAML: {e}",
            path.display()
        ))
    })?;
    let mut out = HashMap::new();
    if let Some(service) = doc.get("service").and_then(|s| s.as_mapping()) {
        for (k, v) in service {
            let Some(k) = k.as_str() else { continue };
            let k = k.to_ascii_lowercase();
            if let Some(v) = scalar(v, &format!("service.{k}"))? {
                out.insert(k, v);
            }
        }
    }
    Ok((out, load_kms(&doc, path)?, load_plugins(&doc, path)?))
}

/// The settings that say where the server is; no key, token or slot field value.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db_type", &self.db_type)
            .field("disk_path", &self.disk_path)
            .field("s3_bucket", &self.s3_bucket)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("root_key", &self.root_key.as_ref().map(|_| "<redacted>"))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("kms_slots", &self.kms_slots)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The per-request limits these settings give.
    /// The decrypted-data budget in bytes: `--index-cache-mb`, else half of the memory this
    /// process may use.
    pub fn cache_budget_bytes(&self) -> usize {
        match self.index_cache_mb {
            Some(mb) => (mb as usize).saturating_mul(1 << 20),
            None => usable_memory_bytes() / 2,
        }
    }

    pub fn limits(&self) -> crate::limits::Limits {
        crate::limits::Limits {
            max_query_results: self.max_query_results,
            max_ids_per_request: self.max_ids_per_request,
            max_id_bytes: self.max_id_bytes,
            max_dimension: self.max_dimension,
            max_filter_depth: self.max_filter_depth,
            max_filter_nodes: self.max_filter_nodes,
            max_train_iters: self.max_train_iters,
            max_n_lists: self.max_n_lists,
            max_train_batch_size: self.max_train_batch_size,
            max_train_memory_mb: self.max_train_memory_mb,
            max_train_seconds: self.max_train_seconds,
            coarse_pass_min_mb: self.coarse_pass_min_mb,
        }
    }

    /// Parse flags and environment, then fill still-defaulted settings from the YAML file.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    pub fn load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = match Self::command().try_get_matches_from(args) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) =>
            {
                e.exit()
            }
            Err(e) => return Err(ConfigError(Self::explain(e))),
        };
        let mut cfg = Self::from_arg_matches(&matches).map_err(|e| ConfigError(e.to_string()))?;
        let yaml_path = match &cfg.config_file {
            Some(p) => Some(p.clone()),
            None => ["./cyborgdb.yaml", "./cyborgdb.yml"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists()),
        };
        if let Some(path) = yaml_path {
            let (yaml, slots, plugins) = load_yaml(&path)?;
            cfg.overlay(&matches, &yaml)?;
            cfg.kms_slots = slots;
            cfg.plugins = plugins;
        }
        Ok(cfg)
    }

    /// clap names the flag of a bad value; also name the environment variable when that is
    /// where the value came from, since that is what an operator has to fix.
    fn explain(e: clap::Error) -> String {
        let mut msg = e.to_string().trim_end().to_owned();
        let cmd = Self::command();
        for arg in cmd.get_arguments() {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            if std::env::var_os(env).is_some()
                && (msg.contains(&format!("'--{long} ")) || msg.contains(&format!("'--{long}'")))
            {
                msg.push_str(&format!(
                    "\n(the value comes from environment variable {})",
                    env.to_string_lossy()
                ));
            }
        }
        msg
    }

    fn overlay(
        &mut self,
        m: &ArgMatches,
        yaml: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        for (id, key) in YAML_KEYS {
            let from_user = matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            let Some(v) = yaml.get(*key) else { continue };
            if from_user {
                continue;
            }
            let bad = |e: String| ConfigError(format!("service.{key} in the YAML file: {e}"));
            match *id {
                "host" => self.host = v.parse().map_err(|e| bad(format!("{e}")))?,
                "port" => self.port = v.parse().map_err(|e| bad(format!("{e}")))?,
                "db_type" => self.db_type = v.clone(),
                "disk_path" => self.disk_path = PathBuf::from(v),
                "s3_bucket" => self.s3_bucket = Some(v.clone()),
                "s3_region" => self.s3_region = Some(v.clone()),
                "s3_prefix" => self.s3_prefix = Some(v.clone()),
                "s3_endpoint" => self.s3_endpoint = Some(v.clone()),
                "s3_access_key" => self.s3_access_key = Some(v.clone()),
                "s3_secret_key" => self.s3_secret_key = Some(v.clone()),
                "s3_session_token" => self.s3_session_token = Some(v.clone()),
                "s3_refresh_ms" => {
                    self.s3_refresh_ms = v.parse().map_err(|e| bad(format!("{e}")))?
                }
                "log_level" => self.log_level = parse_level(v).map_err(bad)?,
                "auto_train_min_vectors" => {
                    self.auto_train_min_vectors = v.parse().map_err(|e| bad(format!("{e}")))?
                }
                "auto_train_disabled" => self.auto_train_disabled = parse_bool(v).map_err(bad)?,
                "root_key" => self.root_key = Some(v.clone()),
                "api_key" => self.api_key = Some(v.clone()),
                "index_cache_mb" => {
                    self.index_cache_mb = Some(v.parse().map_err(|e| bad(format!("{e}")))?)
                }
                "models_dir" => self.models_dir = PathBuf::from(v),
                "ssl_cert_path" => self.ssl_cert_path = Some(PathBuf::from(v)),
                "ssl_key_path" => self.ssl_key_path = Some(PathBuf::from(v)),
                "metrics_open" => self.metrics_open = parse_bool(v).map_err(bad)?,
                "compact_on_start" => self.compact_on_start = parse_bool(v).map_err(bad)?,
                "metrics_index_labels" => self.metrics_index_labels = parse_bool(v).map_err(bad)?,
                "log_format" => self.log_format = LogFormat::from_str(v, true).map_err(bad)?,
                "embed_cache" => self.embed_cache = Some(PathBuf::from(v)),
                "plugin_timeout_seconds" => {
                    self.plugin_timeout_seconds = match v.parse::<u64>() {
                        Ok(n) if (1..=3600).contains(&n) => n,
                        _ => {
                            return Err(bad(format!(
                                "'{v}' is not a whole number of seconds from 1 to 3600"
                            )))
                        }
                    }
                }
                "kek_cache_ttl_seconds" => {
                    self.kek_cache_ttl_seconds = match v.parse::<u64>() {
                        Ok(n) if n <= 86_400 => n,
                        _ => {
                            return Err(bad(format!(
                                "'{v}' is not a whole number of seconds from 0 to 86400"
                            )))
                        }
                    }
                }
                "durability" => self.durability = Durability::from_str(v, true).map_err(bad)?,
                "max_body_mb" => {
                    self.max_body_mb = match v.parse::<u64>() {
                        Ok(n) if (1..=65_536).contains(&n) => n,
                        _ => {
                            return Err(bad(format!(
                                "'{v}' is not a whole number of MiB from 1 to 65536"
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The tracing filter for the configured level.
    pub fn tracing_filter(&self) -> &'static str {
        match self.log_level.as_str() {
            "TRACE" => "trace",
            "DEBUG" => "debug",
            "WARNING" | "WARN" => "warn",
            "ERROR" | "CRITICAL" => "error",
            _ => "info",
        }
    }
}

/// Physical memory, or the cgroup (v2, then v1) memory limit when it is lower; 4 GiB when
/// neither can be read.
pub fn usable_memory_bytes() -> usize {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let total = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| read(p).and_then(|v| v.trim().parse::<usize>().ok()));
    match (total, cgroup) {
        (Some(t), Some(c)) => t.min(c),
        (Some(t), None) => t,
        (None, Some(c)) => c,
        (None, None) => 4 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_fills_defaults_but_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "service:\n  port: 9100\n  cyborgdb_db_type: memory\n  AUTO_TRAIN_MIN_VECTORS: ${SEALDB_TEST_UNSET_VAR:-77}\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = Config::load_from(["sealdb", "--config", p]).unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.db_type, "memory");
        assert_eq!(c.auto_train_min_vectors, 77);
        let c = Config::load_from(["sealdb", "--config", p, "--port", "9200"]).unwrap();
        assert_eq!(c.port, 9200);
    }

    #[test]
    fn bad_yaml_value_names_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "service:\n  port: lots\n").unwrap();
        let e = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("service.port"), "{e}");
        for bad in ["0", "65537", "lots"] {
            std::fs::write(&path, format!("service:\n  sealdb_max_body_mb: {bad}\n")).unwrap();
            let e = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap_err();
            assert!(e.to_string().contains("sealdb_max_body_mb"), "{e}");
        }
        std::fs::write(&path, "service:\n  sealdb_max_body_mb: 8\n").unwrap();
        let c = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.max_body_mb, 8);
        let e = Config::load_from(["sealdb", "--config", "/nonexistent/x.yaml"]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.yaml"), "{e}");
    }

    #[test]
    fn kms_registry_is_read_with_env_references() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::env::set_var("SEALDB_TEST_VAULT_TOKEN", "s.tok");
        std::fs::write(
            &path,
            "kms:\n  registry:\n    prod-aws:\n      provider: aws-kms\n      key_id: alias/x\n      region: us-east-1\n    bao:\n      provider: vault\n      address: http://127.0.0.1:8200\n      key_name: k\n      token: ${SEALDB_TEST_VAULT_TOKEN}\n",
        )
        .unwrap();
        let c = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.kms_slots.len(), 2);
        let bao = c.kms_slots.iter().find(|s| s.name == "bao").unwrap();
        assert_eq!(bao.provider, "vault");
        assert_eq!(bao.fields["token"], "s.tok");
        assert!(!bao.fields.contains_key("provider"));
        for (yaml, want) in [
            ("kms:\n  registry:\n    s1:\n      key_id: k\n", "kms.registry.s1: field 'provider'"),
            ("kms:\n  registry:\n    s1:\n      provider: vault\n      token: ${SEALDB_TEST_UNSET_VAR}\n", "kms.registry.s1.token"),
            ("kms:\n  registry:\n    s1:\n      provider: vault\n      address: [1]\n", "kms.registry.s1.address"),
            ("kms:\n  registry: [1]\n", "kms.registry"),
        ] {
            std::fs::write(&path, yaml).unwrap();
            let e = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap_err();
            assert!(e.to_string().contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn plugins_are_listed_with_paths_relative_to_the_yaml_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "plugins:\n  - path: libx.so\n    sha256: abc\n    config: {root: /d, shards: 4}\n  - path: /abs/liby.so\n",
        )
        .unwrap();
        let c = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.plugins.len(), 2);
        assert_eq!(c.plugins[0].path, dir.path().join("libx.so"));
        assert_eq!(c.plugins[0].sha256.as_deref(), Some("abc"));
        assert_eq!(c.plugins[0].config["shards"], 4);
        assert_eq!(c.plugins[1].path, std::path::PathBuf::from("/abs/liby.so"));
        for (yaml, want) in [
            ("plugins:\n  - sha256: x\n", "plugins[0].path is required"),
            (
                "plugins:\n  - path: a\n    pth: b\n",
                "plugins[0]: unknown field",
            ),
            ("plugins: {a: 1}\n", "plugins must be a list"),
        ] {
            std::fs::write(&path, yaml).unwrap();
            let e = Config::load_from(["sealdb", "--config", path.to_str().unwrap()]).unwrap_err();
            assert!(e.to_string().contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn defaults() {
        let c = Config::load_from(["sealdb"]).unwrap();
        assert_eq!(c.host.to_string(), "127.0.0.1");
        assert_eq!(c.db_type, "disk");
        assert!(!c.auto_train_disabled);
        assert_eq!(c.max_body_mb, 256);
    }
}
