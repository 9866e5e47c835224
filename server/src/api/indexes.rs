//! Index lifecycle: list, create, describe, delete, train, training status.

use std::sync::Arc;

use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};

use super::error::{responses, ApiError};
use super::{blocking, parse_kek, AppState, Credentials, IndexRef, JsonObject, SuccessResponse};
use crate::auth::Action;
use crate::engine::{
    new_index_id, validate_name, CreateSpec, EngineError, IndexConfig, KeySource, Metric,
    Precision, TrainParams,
};

#[derive(Tags)]
enum Tag {
    /// Create, inspect, train and delete encrypted indexes.
    Indexes,
}

/// Names of all indexes.
#[derive(Object, Debug)]
#[oai(rename = "IndexListResponseModel")]
pub struct IndexList {
    pub indexes: Vec<String>,
}

/// How vectors are stored.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename = "StoragePrecision", rename_all = "lowercase")]
pub enum StoragePrecision {
    /// 4 bytes per component (default).
    Float32,
    /// 2 bytes per component: half the storage, slightly lower precision.
    Float16,
    /// 12 bits per component after a fixed rotation (about 2.7x smaller than float32).
    Tq12,
    /// 8 bits per component after a fixed rotation (about 4x smaller).
    Tq8,
    /// 6 bits per component after a fixed rotation (about 5x smaller).
    Tq6,
    /// 4 bits per component after a fixed rotation (about 8x smaller; lossy: reads and
    /// distances use the stored approximation).
    Tq4,
}

/// Create an encrypted DiskIVF index.
#[derive(Object)]
#[oai(rename = "CreateIndexRequest")]
pub struct CreateIndexRequest {
    /// Unique name (1-255 bytes; `default` is reserved).
    pub index_name: String,
    /// Name of a configured KMS slot. Exactly one of `index_key` and `kms_name`.
    pub kms_name: Option<String>,
    /// The index key: 64 hex characters (32 bytes). The server never stores it; send it on
    /// every call for this index.
    pub index_key: Option<String>,
    /// Vector dimension; when absent it is fixed by the first upsert (or the embedding model).
    pub dimension: Option<i64>,
    /// Embedding model name for server-side embedding of `contents`.
    pub embedding_model: Option<String>,
    /// `euclidean` (default), `squared_euclidean` or `cosine`.
    pub metric: Option<String>,
    /// `float32` (default), `float16`, or a quantized `tq12`, `tq8`, `tq6`, `tq4`.
    pub storage_precision: Option<StoragePrecision>,
    /// 0.18: how metadata fields are indexed, `{"field": {"filterable": bool, "pattern":
    /// bool, "full_text": bool}}` (dot paths; fixed at create). `query_metadata` refuses to
    /// filter on `filterable: false` fields and answers `$regex`/`$contains` on `pattern`
    /// fields. `full_text` fields are analysed for BM25 text search (`text` in `query` and
    /// `query_metadata`) and are not filterable.
    pub metadata_schema: Option<JsonObject>,
    /// 0.18 shorthand for marking fields `full_text` in `metadata_schema`.
    pub text_fields: Option<Vec<String>>,
    /// BM25 term-frequency saturation, >= 0 (default 1.2; needs a `full_text` field).
    pub bm25_k1: Option<f64>,
    /// BM25 length normalisation, in [0, 1] (default 0.75; needs a `full_text` field).
    pub bm25_b: Option<f64>,
}

/// Describe's `bm25`: the parameters and analyzer of an index with `full_text` fields.
fn bm25_info(info: &crate::engine::IndexInfo) -> Option<JsonObject> {
    info.metadata_schema
        .iter()
        .any(|(_, f)| f.full_text)
        .then(|| {
            let mut m = serde_json::Map::new();
            m.insert("k1".into(), info.bm25.k1.into());
            m.insert("b".into(), info.bm25.b.into());
            m.insert(
                "analyzer_version".into(),
                crate::engine::text::ANALYZER_VERSION.into(),
            );
            JsonObject(m)
        })
}

/// A validated `metadata_schema`, in the order given.
fn parse_schema(
    obj: Option<&JsonObject>,
) -> Result<Vec<(String, crate::engine::FieldSchema)>, ApiError> {
    let mut out = Vec::new();
    let Some(obj) = obj else { return Ok(out) };
    for (name, v) in &obj.0 {
        if name.is_empty() {
            return Err(ApiError::invalid(
                "metadata_schema field names must be non-empty",
            ));
        }
        let serde_json::Value::Object(opts) = v else {
            return Err(ApiError::invalid(format!(
                "metadata_schema.{name} must be an object of filterable, pattern and full_text"
            )));
        };
        let get = |k: &str| -> Result<Option<bool>, ApiError> {
            match opts.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(ApiError::invalid(format!(
                    "metadata_schema.{name}.{k} must be true or false"
                ))),
            }
        };
        let (filterable, pattern, full_text) =
            (get("filterable")?, get("pattern")?, get("full_text")?);
        if let Some(k) = opts
            .keys()
            .find(|k| !["filterable", "pattern", "full_text"].contains(&k.as_str()))
        {
            return Err(ApiError::invalid(format!(
                "metadata_schema.{name}: unknown setting '{k}' (filterable, pattern, full_text)"
            )));
        }
        let full_text = full_text.unwrap_or(false);
        if full_text && pattern == Some(true) {
            return Err(ApiError::invalid(format!(
                "metadata_schema.{name}: full_text is incompatible with pattern (a field is analysed for full-text search or exact-match indexed, not both)"
            )));
        }
        if full_text && filterable == Some(true) {
            return Err(ApiError::invalid(format!(
                "metadata_schema.{name}: full_text is incompatible with an explicit filterable: true (a full_text field is analysed, so it is not filterable)"
            )));
        }
        out.push((
            name.clone(),
            crate::engine::FieldSchema {
                filterable: filterable.unwrap_or(!full_text),
                pattern: pattern.unwrap_or(false),
                full_text,
            },
        ));
    }
    Ok(out)
}

super::wipe_key_on_drop!(CreateIndexRequest);
super::redacted_debug!(
    CreateIndexRequest,
    [
        index_name,
        kms_name,
        dimension,
        embedding_model,
        metric,
        storage_precision
    ],
    [index_key]
);

/// Names an index and carries its key.
#[derive(Object, Debug)]
#[oai(rename = "IndexOperationRequest")]
pub struct IndexOperationRequest {
    #[oai(flatten)]
    pub index: IndexRef,
}

/// What describe reports.
#[derive(Object, Debug)]
#[oai(rename = "IndexInfoResponseModel")]
pub struct IndexInfo {
    pub index_name: String,
    /// Whether IVF lists have been trained (untrained indexes are searched exhaustively).
    pub is_trained: bool,
    /// Vector dimension (0 until fixed by the first upsert).
    pub dimension: i64,
    /// `euclidean`, `squared_euclidean` or `cosine`.
    pub metric: String,
    /// Number of IVF lists (1 while untrained).
    pub n_lists: i64,
    /// `float32`, `float16`, `tq12`, `tq8`, `tq6` or `tq4`.
    pub storage_precision: String,
    /// Embedding model recorded at create, if any.
    #[oai(skip_serializing_if_is_none)]
    pub embedding_model: Option<String>,
    /// Number of vectors stored.
    pub num_vectors: i64,
    /// The KMS slot that wraps this index's key (absent for client-supplied keys).
    #[oai(skip_serializing_if_is_none)]
    pub kms_name: Option<String>,
    /// That slot's provider (`vault`, `aws-kms`).
    #[oai(skip_serializing_if_is_none)]
    pub kms_provider: Option<String>,
    /// 0.18: every field of the index's `metadata_schema` with all three settings (`{}` when
    /// none was given).
    pub metadata_schema: JsonObject,
    /// 0.18: BM25 parameters of an index with `full_text` fields; absent here (no
    /// full-text search yet).
    #[oai(skip_serializing_if_is_none)]
    pub bm25: Option<JsonObject>,
}

/// Train (or retrain) the IVF lists. All knobs are optional.
#[derive(Object, Debug)]
#[oai(rename = "TrainRequest")]
pub struct TrainRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    /// Number of lists; absent or 0 = a power of two near sqrt(number of vectors).
    pub n_lists: Option<i64>,
    /// Rows per matrix product (and per parallel work unit) in k-means assignment (default 2048).
    pub batch_size: Option<i64>,
    /// Maximum k-means iterations (default 25).
    pub max_iters: Option<i64>,
    /// Stop when the k-means objective improves by less than this fraction (default 1e-6).
    pub tolerance: Option<f64>,
    /// Memory limit for the training sample in MiB (0 or absent = no limit).
    pub max_memory: Option<i64>,
}

/// Re-wrap an index's key: rotate it under its KMS slot's current key version, move it onto
/// another slot, or move a client-key index onto a slot. The data is not re-encrypted: the
/// index's data key is wrapped anew under a fresh KEK, in one atomic write.
#[derive(Object)]
#[oai(rename = "RewrapRequest")]
pub struct RewrapRequest {
    pub index_name: String,
    /// The slot to wrap under; absent = the index's current slot (rotation).
    pub kms_name: Option<String>,
    /// The current key of a client-key index being moved onto `kms_name`.
    pub index_key: Option<String>,
}

super::wipe_key_on_drop!(RewrapRequest);
super::redacted_debug!(RewrapRequest, [index_name, kms_name], [index_key]);

/// Background training queue.
#[derive(Object, Debug)]
#[oai(rename = "IndexTrainingStatusResponseModel")]
pub struct TrainingStatus {
    /// Indexes training now or queued.
    pub training_indexes: Vec<String>,
    /// Number of vectors at which an untrained index starts training in the background.
    pub retrain_threshold: i64,
    /// The index training now, if any.
    #[oai(nullable)]
    pub currently_training: Option<String>,
    /// Indexes waiting for the training worker.
    pub queued_indexes: Vec<String>,
    /// Whether the background worker is alive.
    pub worker_running: bool,
    /// Always 0 (kept for compatibility).
    pub worker_pid: i64,
    /// Always `{}` (kept for compatibility).
    pub global_training: super::JsonObject,
    /// Each training running now: its phase, how far, since when.
    pub progress: Vec<TrainingProgress>,
}

/// How far one training has come.
#[derive(Object, Debug)]
#[oai(rename = "TrainingProgress")]
pub struct TrainingProgress {
    pub index_name: String,
    /// `sampling`, `kmeans`, `assigning`, `writing` or `swapping`.
    pub phase: String,
    /// Within the phase: rows sampled, k-means iteration, blocks assigned, batches written.
    pub step: i64,
    /// Of `steps` (for `kmeans`, the iteration limit; training may converge before it).
    pub steps: i64,
    /// Of the whole training, from 0 to 1.
    pub fraction: f64,
    pub elapsed_seconds: f64,
}

responses!(ListIndexesResponse, IndexList, [401 => Unauthorized]);
responses!(CreateIndexResponse, SuccessResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 409 => Conflict, 422 => Invalid, 502 => KmsFailure]);
responses!(DescribeIndexResponse, IndexInfo, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(DeleteIndexResponse, SuccessResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(TrainIndexResponse, SuccessResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 409 => Conflict, 422 => Invalid, 502 => KmsFailure]);
responses!(TrainingStatusResponse, TrainingStatus, [401 => Unauthorized]);
responses!(RewrapIndexResponse, SuccessResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);

pub struct IndexesApi {
    pub state: Arc<AppState>,
}

fn positive(name: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x < 0 => Err(ApiError::invalid(format!(
            "{name} must not be negative (got {x})"
        ))),
        Some(x) => usize::try_from(x)
            .map(Some)
            .map_err(|_| ApiError::invalid(format!("{name} is too large"))),
    }
}

#[OpenApi]
impl IndexesApi {
    /// List the names of all indexes.
    #[oai(
        path = "/indexes/list",
        method = "get",
        operation_id = "list_indexes_v1_indexes_list_get",
        tag = "Tag::Indexes"
    )]
    async fn list(&self, creds: Credentials) -> ListIndexesResponse {
        let state = self.state.clone();
        blocking(move || {
            let p = state.auth.authenticate(creds.key())?;
            Ok(IndexList {
                indexes: state.auth.visible(&state.engine, &p)?,
            })
        })
        .await
        .into()
    }

    /// Create an encrypted index. Supply `index_key` (and keep it: it is needed on every call
    /// and cannot be recovered) or `kms_name`.
    #[oai(
        path = "/indexes/create",
        method = "post",
        operation_id = "create_index_v1_indexes_create_post",
        tag = "Tag::Indexes"
    )]
    async fn create(
        &self,
        creds: Credentials,
        body: Json<CreateIndexRequest>,
    ) -> CreateIndexResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let p = state.auth.authenticate(creds.key())?;
            state.auth.require(&p, Action::Admin)?;
            if req.index_key.is_some() && req.kms_name.is_some() {
                return Err(ApiError::bad_request(
                    "index_key and kms_name are mutually exclusive: send exactly one",
                ));
            }
            if req.index_key.is_none() && req.kms_name.is_none() {
                return Err(ApiError::bad_request(
                    "send exactly one of index_key (64 hex characters) or kms_name",
                ));
            }
            let client_kek = parse_kek(req.index_key.as_deref())?;
            if let Some(slot) = req.kms_name.as_deref() {
                state.kms.check_slot(slot)?;
            }
            let metric = match req.metric.as_deref() {
                None => Metric::Euclidean,
                Some(m) => Metric::parse(m).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "unknown metric '{m}'; use euclidean, squared_euclidean or cosine"
                    ))
                })?,
            };
            let precision = match req.storage_precision {
                None | Some(StoragePrecision::Float32) => Precision::F32,
                Some(StoragePrecision::Float16) => Precision::F16,
                Some(StoragePrecision::Tq12) => Precision::Tq(12),
                Some(StoragePrecision::Tq8) => Precision::Tq(8),
                Some(StoragePrecision::Tq6) => Precision::Tq(6),
                Some(StoragePrecision::Tq4) => Precision::Tq(4),
            };
            let mut dimension = match req.dimension {
                None => 0,
                Some(d) if d >= 1 => {
                    state.limits.dimension(d as usize)?;
                    d as u32
                }
                Some(d) => {
                    return Err(ApiError::invalid(format!(
                        "dimension must be at least 1 (got {d})"
                    )))
                }
            };
            let mut metadata_schema = parse_schema(req.metadata_schema.as_ref())?;
            for f in req.text_fields.iter().flatten() {
                if f.is_empty() {
                    return Err(ApiError::invalid(
                        "text_fields entries must be non-empty field names",
                    ));
                }
                match metadata_schema.iter_mut().find(|(n, _)| n == f) {
                    Some((_, s)) if s.full_text => {}
                    Some((_, s)) if s.pattern => {
                        return Err(ApiError::bad_request(format!(
                            "text_fields names '{f}', which metadata_schema marks pattern: a field is analysed for full-text search or exact-match indexed, not both"
                        )))
                    }
                    Some(_)
                        if req
                            .metadata_schema
                            .as_ref()
                            .and_then(|m| m.0.get(f))
                            .and_then(|o| o.get("filterable"))
                            .is_some_and(|v| v.as_bool() == Some(true)) =>
                    {
                        return Err(ApiError::bad_request(format!(
                            "text_fields names '{f}', which metadata_schema marks filterable: true; a full_text field is analysed, so it is not filterable"
                        )));
                    }
                    Some((_, s)) => {
                        s.full_text = true;
                        s.filterable = false;
                    }
                    None => metadata_schema.push((
                        f.clone(),
                        crate::engine::FieldSchema {
                            filterable: false,
                            pattern: false,
                            full_text: true,
                        },
                    )),
                }
            }
            let has_text = metadata_schema.iter().any(|(_, f)| f.full_text);
            if !has_text && (req.bm25_k1.is_some() || req.bm25_b.is_some()) {
                return Err(ApiError::bad_request(
                    "bm25_k1/bm25_b are BM25 scoring parameters and need at least one full_text field (mark one in metadata_schema, or pass text_fields)",
                ));
            }
            let mut bm25 = crate::engine::Bm25::default();
            if let Some(k1) = req.bm25_k1 {
                if !(k1.is_finite() && k1 >= 0.0) {
                    return Err(ApiError::bad_request(format!(
                        "bm25_k1 must be a finite number >= 0; got {k1}"
                    )));
                }
                bm25.k1 = k1;
            }
            if let Some(b) = req.bm25_b {
                if !(0.0..=1.0).contains(&b) {
                    return Err(ApiError::bad_request(format!(
                        "bm25_b must be in [0, 1]; got {b}"
                    )));
                }
                bm25.b = b;
            }
            let model = req.embedding_model.clone().filter(|m| !m.is_empty());
            if let Some(m) = &model {
                let info = crate::embed::lookup(m)
                    .ok_or_else(|| crate::embed::EmbedError::Unknown(m.clone()))?;
                let md = info.dimension;
                if dimension != 0 && dimension != md {
                    return Err(ApiError::bad_request(format!(
                        "embedding model '{m}' produces {md}-dimensional vectors but dimension is {dimension}"
                    )));
                }
                dimension = md;
            }
            let name = req.index_name.clone();
            validate_name(&name)?;
            let id = new_index_id();
            let (kek, envelope) = match (client_kek, req.kms_name.as_deref()) {
                (Some(k), _) => (k, None),
                (None, Some(slot)) => {
                    // Refuse a taken name before asking the KMS for anything.
                    if state.engine.exists(&name)? {
                        return Err(EngineError::AlreadyExists(name).into());
                    }
                    let (k, env) = state.kms.new_kek(slot, &id)?;
                    (k, Some(env))
                }
                (None, None) => unreachable!("checked above"),
            };
            let remember = envelope.clone();
            state.engine.create(CreateSpec {
                name: name.clone(),
                id,
                kek: kek.clone(),
                envelope,
                config: IndexConfig {
                    metric,
                    precision,
                    embedding_model: model,
                    declared_dimension: dimension,
                    created_at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    metadata_schema,
                    bm25,
                    value_index: true,
                },
            })?;
            if let Some(env) = &remember {
                state.kms.remember(&id, env, &kek);
                tracing::info!(index = %name, slot = %env.slot, provider = %env.provider, "index created (KMS-backed)");
            } else {
                tracing::info!(index = %name, "index created");
            }
            Ok(SuccessResponse::new(format!("Index '{name}' created successfully")))
        })
        .await
        .into()
    }

    /// Describe an index: dimension, metric, training state. Also verifies the key.
    #[oai(
        path = "/indexes/describe",
        method = "post",
        operation_id = "get_index_info_v1_indexes_describe_post",
        tag = "Tag::Indexes"
    )]
    async fn describe(
        &self,
        creds: Credentials,
        body: Json<IndexOperationRequest>,
    ) -> DescribeIndexResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let p = state.auth.authenticate(creds.key())?;
            let name = &req.index.index_name;
            let kek = state.resolve_kek(&p, name, parse_kek(req.index.index_key.as_deref())?)?;
            let ix = state
                .auth
                .open_index(&state.engine, &p, Action::Read, name, kek.as_ref())?;
            let info = state.engine.describe(&ix);
            let (kms_name, kms_provider) = match state.engine.key_source(name)?.1 {
                KeySource::Client => (None, None),
                KeySource::Kms(env) => (Some(env.slot), Some(env.provider)),
            };
            let bm25 = bm25_info(&info);
            // Fields in name order, as the original lists them.
            let mut schema = info.metadata_schema.clone();
            schema.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(IndexInfo {
                index_name: info.name,
                is_trained: info.is_trained,
                dimension: info.dimension as i64,
                metric: info.metric.as_str().into(),
                n_lists: info.n_lists as i64,
                storage_precision: info.precision.as_str().into(),
                embedding_model: info.embedding_model,
                num_vectors: info.num_vectors as i64,
                kms_name,
                kms_provider,
                metadata_schema: JsonObject(
                    schema
                        .iter()
                        .map(|(n, f)| {
                            (
                                n.clone(),
                                serde_json::json!({"filterable": f.filterable, "pattern": f.pattern, "full_text": f.full_text}),
                            )
                        })
                        .collect(),
                ),
                bm25,
            })
        })
        .await
        .into()
    }

    /// Delete an index and everything in it. Irreversible.
    #[oai(
        path = "/indexes/delete",
        method = "post",
        operation_id = "delete_index_v1_indexes_delete_post",
        tag = "Tag::Indexes"
    )]
    async fn delete(
        &self,
        creds: Credentials,
        body: Json<IndexOperationRequest>,
    ) -> DeleteIndexResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let p = state.auth.authenticate(creds.key())?;
            state.auth.require(&p, Action::Admin)?;
            let name = &req.index.index_name;
            let kek = state.resolve_kek(&p, name, parse_kek(req.index.index_key.as_deref())?)?;
            let id = state.engine.delete(name, kek.as_ref())?;
            state.kms.forget(&id);
            if let Some(users) = state.auth.users() {
                // The index is gone and its grants are useless, but erase them anyway.
                if let Err(e) = users.delete_index(&id) {
                    tracing::warn!(index = %req.index.index_name, error = %e, "could not erase the users of a deleted index");
                }
            }
            tracing::info!(index = %req.index.index_name, "index deleted");
            Ok(SuccessResponse::new(format!(
                "Index '{}' deleted successfully",
                req.index.index_name
            )))
        })
        .await
        .into()
    }

    /// Train the index's IVF lists with k-means; blocks until training is done. Queries keep
    /// working meanwhile.
    #[oai(
        path = "/indexes/train",
        method = "post",
        operation_id = "train_index_v1_indexes_train_post",
        tag = "Tag::Indexes"
    )]
    async fn train(&self, creds: Credentials, body: Json<TrainRequest>) -> TrainIndexResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let p = state.auth.authenticate(creds.key())?;
            state.auth.require(&p, Action::Admin)?;
            let kek = state.resolve_kek(
                &p,
                &req.index.index_name,
                parse_kek(req.index.index_key.as_deref())?,
            )?;
            let params = TrainParams {
                n_lists: positive("n_lists", req.n_lists)?,
                batch_size: positive("batch_size", req.batch_size)?,
                max_iters: positive("max_iters", req.max_iters)?,
                tolerance: match req.tolerance {
                    Some(t) if !(t.is_finite() && t >= 0.0) => {
                        return Err(ApiError::invalid("tolerance must be a finite number >= 0"))
                    }
                    t => t,
                },
                max_memory_mb: positive("max_memory", req.max_memory)?,
                time_limit: state.limits.train_time_limit(),
                coarse_min_bytes: Some(state.limits.coarse_min_bytes()),
            };
            state.limits.train(
                params.max_iters,
                params.n_lists,
                params.batch_size,
                params.max_memory_mb,
            )?;
            let ix = state.engine.open(&req.index.index_name, kek.as_ref())?;
            let started = std::time::Instant::now();
            let k = state.engine.train_now(&ix, &params)?;
            tracing::info!(index = %req.index.index_name, n_lists = k, secs = started.elapsed().as_secs_f32(), "index trained");
            Ok(SuccessResponse::new(format!(
                "Index '{}' trained successfully",
                req.index.index_name
            )))
        })
        .await
        .into()
    }

    /// Which indexes are training or queued for background training.
    #[oai(
        path = "/indexes/training-status",
        method = "get",
        operation_id = "get_training_status_v1_indexes_training_status_get",
        tag = "Tag::Indexes"
    )]
    async fn training_status(&self, creds: Credentials) -> TrainingStatusResponse {
        let state = self.state.clone();
        blocking(move || {
            let p = state.auth.authenticate(creds.key())?;
            let mut st = state.engine.training_status();
            if matches!(p, crate::auth::Principal::User(_)) {
                // A user sees only its own index in the queue.
                let mine = state.auth.visible(&state.engine, &p)?;
                st.currently_training = st.currently_training.filter(|n| mine.contains(n));
                st.queued.retain(|n| mine.contains(n));
                st.explicit.retain(|n| mine.contains(n));
            }
            let mut training: Vec<String> = st.currently_training.iter().cloned().collect();
            for n in st.explicit.iter().chain(&st.queued) {
                if !training.contains(n) {
                    training.push(n.clone());
                }
            }
            let visible = |n: &String| match &p {
                crate::auth::Principal::User(_) => training.contains(n),
                _ => true,
            };
            let progress = state
                .engine
                .training_progress()
                .into_iter()
                .filter(|t| visible(&t.index))
                .map(|t| TrainingProgress {
                    index_name: t.index,
                    phase: t.phase.into(),
                    step: t.step as i64,
                    steps: t.steps as i64,
                    fraction: t.fraction,
                    elapsed_seconds: t.elapsed_seconds,
                })
                .collect();
            Ok(TrainingStatus {
                progress,
                training_indexes: training,
                retrain_threshold: state.engine.config().auto_train_min_vectors as i64,
                currently_training: st.currently_training,
                queued_indexes: st.queued,
                worker_running: st.worker_running,
                worker_pid: 0,
                global_training: Default::default(),
            })
        })
        .await
        .into()
    }

    /// Re-wrap an index's key under a KMS slot: with only `index_name`, under its slot's
    /// current key version (after a rotation in the KMS); with `kms_name`, onto that slot;
    /// with `index_key` and `kms_name`, a client-key index moves onto the slot and is read
    /// without a key from then on. The data is never re-encrypted; on any failure the old
    /// wrap stays. Needs the root key when RBAC is on.
    #[oai(
        path = "/indexes/rewrap",
        method = "post",
        operation_id = "rewrap_index_v1_indexes_rewrap_post",
        tag = "Tag::Indexes"
    )]
    async fn rewrap(&self, creds: Credentials, body: Json<RewrapRequest>) -> RewrapIndexResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let p = state.auth.authenticate(creds.key())?;
            state.auth.require(&p, Action::Admin)?;
            if state.auth.rbac_enabled() && !matches!(p, crate::auth::Principal::Root) {
                return Err(ApiError::forbidden("Re-wrapping keys requires the root API key"));
            }
            let name = req.index_name.clone();
            let (id, source) = state.engine.key_source(&name)?;
            let client_kek = parse_kek(req.index_key.as_deref())?;
            let (old, target) = match (source, req.kms_name.clone(), client_kek) {
                (KeySource::Kms(env), _, Some(_)) => {
                    return Err(ApiError::bad_request(format!(
                        "index '{name}' is KMS-backed (slot '{}'): do not supply index_key",
                        env.slot
                    )))
                }
                (KeySource::Kms(env), target, None) => {
                    let target = target.unwrap_or_else(|| env.slot.clone());
                    state.kms.check_slot(&target)?;
                    (state.kms.kek_for(&id, &env)?, target)
                }
                (KeySource::Client, None, _) => {
                    return Err(ApiError::bad_request(format!(
                        "index '{name}' uses a client-supplied key: send kms_name (and its index_key) to move it onto a KMS slot"
                    )))
                }
                (KeySource::Client, Some(_), None) => {
                    return Err(EngineError::MissingKey(name).into())
                }
                (KeySource::Client, Some(target), Some(old)) => {
                    state.kms.check_slot(&target)?;
                    // Check the key before asking the KMS for anything.
                    drop(state.engine.open(&name, Some(&old))?);
                    (old, target)
                }
            };
            let (kek, env) = state.kms.new_kek(&target, &id)?;
            state.engine.rewrap(&name, &old, &kek, Some(env.clone()))?;
            state.kms.remember(&id, &env, &kek);
            tracing::info!(index = %name, slot = %env.slot, provider = %env.provider, key_version = %env.key_version, "index key re-wrapped");
            Ok(SuccessResponse::new(format!(
                "Index '{name}' re-wrapped under KMS slot '{}' ({}, key version {})",
                env.slot,
                env.provider,
                if env.key_version.is_empty() { "current" } else { &env.key_version }
            )))
        })
        .await
        .into()
    }
}
