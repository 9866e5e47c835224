//! The HTTP API (poem-openapi): DTOs and handlers only. A handler parses, authorises, calls
//! the engine on the blocking pool and maps the result; it never touches a store.
//!
//! Invariant: engine types never appear in the spec, and DTOs never reach the engine.

pub mod embeddings;
pub mod error;
pub mod fast_json;
pub mod health;
mod hybrid;
pub mod indexes;
pub mod metadata;
pub mod users;
pub mod vectors;

use std::borrow::Cow;
use std::sync::Arc;

use poem_openapi::auth::ApiKey;
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{Object, OpenApiService, SecurityScheme};
use serde_json::{Map, Value};

use crate::engine::{Engine, KeySource};
use crate::keys::Kek;
use error::ApiError;

/// Version reported by `/v1/health` and in the spec.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared state of all handlers.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: crate::auth::Auth,
    /// KMS slots and the KEK cache.
    pub kms: Arc<crate::kms::Kms>,
    /// Embedding models, loaded on first use.
    pub embed: Arc<crate::embed::Embedders>,
    /// The disk store's directory (for the write-ahead-log size metric), when it is redb.
    pub wal_dir: Option<std::path::PathBuf>,
    /// Serve /metrics without a key.
    pub metrics_open: bool,
    /// Largest request body accepted (`--max-body-mb`).
    pub max_body_bytes: usize,
    /// Per-request bounds on work (`crate::limits`).
    pub limits: crate::limits::Limits,
}

/// `X-API-Key` header. Optional in the spec: with no root key configured the server is open.
#[derive(SecurityScheme)]
#[oai(
    rename = "APIKeyHeader",
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header"
)]
pub struct ApiKeyHeader(ApiKey);

/// The caller's credentials, if any.
#[derive(SecurityScheme)]
pub enum Credentials {
    Key(ApiKeyHeader),
    #[oai(fallback)]
    Anonymous,
}

impl Credentials {
    /// The presented API key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Credentials::Key(k) => Some(k.0.key.as_str()),
            Credentials::Anonymous => None,
        }
    }
}

/// A free-form JSON object (`metadata`, `filters`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonObject(pub Map<String, Value>);

impl Type for JsonObject {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "object".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            additional_properties: Some(Box::new(MetaSchemaRef::Inline(Box::new(MetaSchema::ANY)))),
            ..MetaSchema::new("object")
        }))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromJSON for JsonObject {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::Object(m)) => Ok(Self(m)),
            Some(other) => Err(ParseError::custom(format!(
                "expected a JSON object, found {}",
                match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ))),
            None => Err(ParseError::expected_input()),
        }
    }
}

impl ToJSON for JsonObject {
    fn to_json(&self) -> Option<Value> {
        Some(Value::Object(self.0.clone()))
    }
}

/// The two fields every index-scoped request starts with (flattened into each request).
#[derive(Object)]
#[oai(rename = "IndexRef")]
pub struct IndexRef {
    pub index_name: String,
    /// The index key, 64 hex characters; required for indexes created with `index_key`,
    /// omitted with a `cdbk_` user key.
    pub index_key: Option<String>,
}

/// `Debug` for a DTO that carries a secret: the listed fields print, the secret ones print
/// only whether they were given. A key can therefore never reach a log through `{:?}`.
macro_rules! redacted_debug {
    ($ty:ty, [$($shown:ident),*], [$($secret:ident),*]) => {
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct(stringify!($ty));
                $(d.field(stringify!($shown), &self.$shown);)*
                $(d.field(stringify!($secret), &crate::api::Redacted(&self.$secret));)*
                d.finish()
            }
        }
    };
}
pub(crate) use redacted_debug;

/// Prints `<redacted>` for anything given, `None` for an absent option.
pub(crate) struct Redacted<'a, T>(pub &'a T);

impl<T: RedactShape> std::fmt::Debug for Redacted<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_present() {
            "<redacted>"
        } else {
            "None"
        })
    }
}

/// Whether a secret field holds a value.
pub(crate) trait RedactShape {
    fn is_present(&self) -> bool;
}
impl RedactShape for String {
    fn is_present(&self) -> bool {
        true
    }
}
impl RedactShape for Option<String> {
    fn is_present(&self) -> bool {
        self.is_some()
    }
}

redacted_debug!(IndexRef, [index_name], [index_key]);

/// Wipe key text carried in a request when the request is dropped. The parsed [`Kek`] wipes
/// itself; this covers the hex copy in the DTO.
macro_rules! wipe_key_on_drop {
    ($($ty:ty),*) => {$(
        impl Drop for $ty {
            fn drop(&mut self) {
                crate::api::wipe(&mut self.index_key);
            }
        }
    )*};
}
pub(crate) use wipe_key_on_drop;

/// Overwrite key text with zeros (and empty it).
pub(crate) fn wipe(key: &mut Option<String>) {
    if let Some(k) = key.as_mut() {
        zeroize::Zeroize::zeroize(k);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_text_is_wiped() {
        let mut k = Some("ab".repeat(32));
        super::wipe(&mut k);
        assert_eq!(k.as_deref(), Some(""));
        let mut none: Option<String> = None;
        super::wipe(&mut none);
        assert!(none.is_none());
    }

    #[test]
    fn key_carrying_types_print_no_key() {
        let key = "ab".repeat(32);
        let r = super::IndexRef {
            index_name: "docs".into(),
            index_key: Some(key.clone()),
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("docs") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains(&key));
        let u = super::users::CreateUserResponse {
            user_id: "u1".into(),
            api_key: "cdbk_1_secret".into(),
        };
        assert!(!format!("{u:?}").contains("cdbk_1_secret"));
        let cfg =
            crate::config::Config::load_from(["sealdb", "--root-key", "root-secret-1"]).unwrap();
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("root-secret-1") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}

wipe_key_on_drop!(IndexRef);

/// `{"status": "success", "message": ...}`.
#[derive(Object, Debug)]
#[oai(rename = "SuccessResponseModel")]
pub struct SuccessResponse {
    /// Always `success`.
    #[oai(default = "success_status")]
    pub status: String,
    /// What was done.
    pub message: String,
}

fn success_status() -> String {
    "success".into()
}

impl SuccessResponse {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            status: success_status(),
            message: message.into(),
        }
    }
}

impl AppState {
    /// The KEK to open index `name` with. A client-key index takes the caller's `index_key`
    /// as sent; a KMS-backed one takes none (sending one is 400) and gets its KEK from its
    /// slot. User keys open indexes through their grants and need neither.
    pub fn resolve_kek(
        &self,
        principal: &crate::auth::Principal,
        name: &str,
        kek: Option<Kek>,
    ) -> Result<Option<Kek>, ApiError> {
        if matches!(principal, crate::auth::Principal::User(_)) {
            return Ok(kek);
        }
        match self.engine.key_source(name)? {
            (_, KeySource::Client) => Ok(kek),
            (_, KeySource::Kms(env)) if kek.is_some() => Err(ApiError::bad_request(format!(
                "index '{name}' is KMS-backed (slot '{}'): do not supply index_key; omit it from the request",
                env.slot
            ))),
            (id, KeySource::Kms(env)) => Ok(Some(self.kms.kek_for(&id, &env)?)),
        }
    }
}

/// Parse an optional `index_key`.
pub fn parse_kek(key: Option<&str>) -> Result<Option<Kek>, ApiError> {
    key.map(Kek::from_hex).transpose().map_err(ApiError::from)
}

/// Run engine work on the blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    // The request's span (its id) follows the work onto the blocking pool.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError::internal(format!("Internal server error: worker failed: {e}")))?
}

/// Every API, as one poem-openapi service with the given server URL.
pub type Apis = (
    health::HealthApi,
    embeddings::EmbeddingsApi,
    indexes::IndexesApi,
    vectors::VectorsApi,
    metadata::MetadataApi,
    users::UsersApi,
);

pub fn service(state: Arc<AppState>) -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            health::HealthApi {
                state: state.clone(),
            },
            embeddings::EmbeddingsApi {
                state: state.clone(),
            },
            indexes::IndexesApi {
                state: state.clone(),
            },
            vectors::VectorsApi {
                state: state.clone(),
            },
            metadata::MetadataApi {
                state: state.clone(),
            },
            users::UsersApi { state },
        ),
        "SealDB",
        VERSION,
    )
    .description(
        "Encrypted vector database speaking the CyborgDB REST API (v0.17 and the 0.18 additions). \
         Every record is sealed with AES-256-GCM under a per-index key hierarchy.",
    )
    .url_prefix("/v1")
}

/// The spec as JSON, without starting a server (used by `--print-openapi` and the drift test).
pub fn spec_json(state: Arc<AppState>) -> String {
    patch_spec(&service(state).spec())
}

/// poem-openapi gives a `Union` of arrays `"type": "object"` next to its `anyOf`, which
/// makes every array answer (and request) invalid against the schema. Drop that `type`
/// wherever an `anyOf`/`oneOf` has no object variant.
pub fn patch_spec(spec: &str) -> String {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(spec) else {
        return spec.to_owned();
    };
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                let variants = o
                    .get("anyOf")
                    .or_else(|| o.get("oneOf"))
                    .and_then(|x| x.as_array())
                    .cloned();
                if let Some(vs) = variants {
                    let object_variant = vs.iter().any(|x| {
                        x.get("type").and_then(|t| t.as_str()) == Some("object")
                            || x.get("$ref").is_some()
                    });
                    if !object_variant && o.get("type").and_then(|t| t.as_str()) == Some("object") {
                        o.remove("type");
                    }
                }
                o.values_mut().for_each(walk);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_owned())
}
