//! Vector operations: upsert, query, get, delete, list ids, count.

use std::sync::Arc;

use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags, Union};
use serde_json::Value;

use super::error::{responses, ApiError};
use super::fast_json::{FastJson, FromJsonBytes};
use super::{blocking, parse_kek, AppState, Credentials, IndexRef, JsonObject};
use crate::auth::Action;
use crate::engine::filter::Filter;
use crate::engine::{Fetched, Hit, Include, Index, Lease, NewItem, SearchParams};

#[derive(Tags)]
pub(super) enum Tag {
    /// Add, search, fetch and remove vectors.
    Vectors,
}

/// One item to insert or overwrite.
#[derive(Object, Debug)]
#[oai(rename = "VectorItem")]
pub struct VectorItem {
    /// Item id; an existing item with this id is overwritten.
    pub id: String,
    /// The vector. Required unless the index embeds `contents` itself.
    pub vector: Option<Vec<f32>>,
    /// Opaque text, stored encrypted and returned verbatim by `get`.
    pub contents: Option<String>,
    /// Free-form JSON object, filterable in queries.
    pub metadata: Option<JsonObject>,
}

#[derive(Object, Debug)]
#[oai(rename = "UpsertRequest")]
pub struct UpsertRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    pub items: Vec<VectorItem>,
}

/// Vectors as base64 of little-endian float32, row-major, with parallel ids.
#[derive(Object, Debug)]
#[oai(rename = "BinaryVectorBatch")]
pub struct BinaryVectorBatch {
    pub ids: Vec<String>,
    /// Standard base64 of `len(ids) * dimension` little-endian float32 values.
    pub vectors_b64: String,
    pub dimension: i64,
    /// One metadata object (or null) per id.
    pub metadata: Option<Vec<Option<JsonObject>>>,
    /// One contents string (or null) per id.
    pub contents: Option<Vec<Option<String>>>,
}

#[derive(Object, Debug)]
#[oai(rename = "BinaryUpsertRequest")]
pub struct BinaryUpsertRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    pub batch: BinaryVectorBatch,
}

/// Serde mirrors of the upsert requests, for [`FastJson`]. Field names, optionality and
/// element types are those of the `Object` types above (the drift test pins the schema, the
/// black-box tests the parsing).
mod wire {
    use serde::Deserialize;
    use serde_json::{Map, Value};

    thread_local! {
        /// Length of the last vector parsed on this thread: the next one is most likely as
        /// long, so its buffer starts at that size instead of growing by doubling.
        static LAST_LEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A JSON array of numbers as `Vec<f32>`, allocated once at the expected length.
    pub struct Floats(pub Vec<f32>);

    impl<'de> Deserialize<'de> for Floats {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Vec<f32>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a sequence")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Vec<f32>, A::Error> {
                    let hint = LAST_LEN.with(|l| l.get()).min(65_536);
                    let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).max(hint));
                    while let Some(x) = seq.next_element::<f32>()? {
                        v.push(x);
                    }
                    LAST_LEN.with(|l| l.set(v.len()));
                    Ok(v)
                }
            }
            d.deserialize_seq(V).map(Floats)
        }
    }

    #[derive(Deserialize)]
    pub struct Item {
        pub id: String,
        pub vector: Option<Floats>,
        pub contents: Option<String>,
        pub metadata: Option<Map<String, Value>>,
    }

    #[derive(Deserialize)]
    pub struct Upsert {
        pub index_name: String,
        pub index_key: Option<String>,
        pub items: Vec<Item>,
    }

    #[derive(Deserialize)]
    pub struct Batch {
        pub ids: Vec<String>,
        pub vectors_b64: String,
        pub dimension: i64,
        pub metadata: Option<Vec<Option<Map<String, Value>>>>,
        pub contents: Option<Vec<Option<String>>>,
    }

    #[derive(Deserialize)]
    pub struct BinaryUpsert {
        pub index_name: String,
        pub index_key: Option<String>,
        pub batch: Batch,
    }
}

impl FromJsonBytes for UpsertRequest {
    fn from_json_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let w: wire::Upsert = serde_json::from_slice(bytes)?;
        Ok(Self {
            index: IndexRef {
                index_name: w.index_name,
                index_key: w.index_key,
            },
            items: w
                .items
                .into_iter()
                .map(|i| VectorItem {
                    id: i.id,
                    vector: i.vector.map(|v| v.0),
                    contents: i.contents,
                    metadata: i.metadata.map(JsonObject),
                })
                .collect(),
        })
    }
}

impl FromJsonBytes for BinaryUpsertRequest {
    fn from_json_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let w: wire::BinaryUpsert = serde_json::from_slice(bytes)?;
        let b = w.batch;
        Ok(Self {
            index: IndexRef {
                index_name: w.index_name,
                index_key: w.index_key,
            },
            batch: BinaryVectorBatch {
                ids: b.ids,
                vectors_b64: b.vectors_b64,
                dimension: b.dimension,
                metadata: b
                    .metadata
                    .map(|m| m.into_iter().map(|o| o.map(JsonObject)).collect()),
                contents: b.contents,
            },
        })
    }
}

/// Upsert and delete results.
#[derive(Object, Debug)]
#[oai(rename = "VectorsSuccessResponseModel")]
pub struct UpsertResult {
    /// Always `success`.
    pub status: String,
    /// What was done.
    pub message: String,
    /// Present (true) when this upsert queued background training.
    #[oai(skip_serializing_if_is_none)]
    pub training_triggered: Option<bool>,
    /// Describes the queued training.
    #[oai(skip_serializing_if_is_none)]
    pub training_message: Option<String>,
}

/// One query vector (or text, for indexes with an embedding model).
#[derive(Object, Debug)]
#[oai(rename = "QueryRequest")]
pub struct QueryRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    /// One query vector.
    pub query_vectors: Option<Vec<f32>>,
    /// Text to embed and search with (indexes with an embedding model only).
    pub query_contents: Option<String>,
    #[oai(flatten)]
    pub options: QueryOptions,
}

/// Knobs shared by every query shape.
#[derive(Object, Debug)]
#[oai(rename = "QueryOptions")]
pub struct QueryOptions {
    /// Results per query (default 100).
    pub top_k: Option<i64>,
    /// Lists to probe (absent or 0 = chosen automatically).
    pub n_probes: Option<i64>,
    /// Accepted for compatibility; search is exact within the probed lists.
    pub rerank_mult: Option<i64>,
    /// Probe twice as many lists as `n_probes` for higher recall.
    pub greedy: Option<bool>,
    /// Mongo-style metadata filter.
    pub filters: Option<JsonObject>,
    /// Extra fields per result: `distance`, `metadata`, `vector`, `contents`. Default: ids only.
    pub include: Option<Vec<String>>,
    /// Hybrid search (0.18): BM25 query text over the index's `full_text` fields, fused
    /// with the vector results by weighted reciprocal rank fusion; results then carry
    /// `score` instead of `distance`. Omitted or empty: a plain vector query.
    pub text: Option<String>,
    /// `full_text` fields the text leg searches (default: all of them).
    pub text_fields: Option<Vec<String>>,
    /// Weights of the searched fields' BM25 scores, parallel to `text_fields` (omitted:
    /// to the `full_text` fields in name order); default 1 each.
    pub text_field_weights: Option<Vec<f64>>,
    /// Match only items holding every query term (default: any).
    pub require_all_terms: Option<bool>,
    /// Blend in [0, 1]: 0 = BM25 only, 1 = vector only (default 0.5).
    pub alpha: Option<f64>,
    /// Rank smoothing of the fusion, > 0 (default 60).
    pub rrf_k: Option<f64>,
    /// Each leg's candidates as a multiple of `top_k`, >= 1 (default 3).
    pub window_mult: Option<i64>,
}

/// Several query vectors at once.
#[derive(Object, Debug)]
#[oai(rename = "BatchQueryRequest")]
pub struct BatchQueryRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    /// Query vectors, one per row.
    pub query_vectors: Option<Vec<Vec<f32>>>,
    /// Texts to embed and search with, one query each (indexes with an embedding model).
    pub query_contents: Option<Vec<String>>,
    #[oai(flatten)]
    pub options: QueryOptions,
}

/// A single or a batch query.
#[derive(Union, Debug)]
#[oai(one_of = false)]
pub enum QueryBody {
    Single(QueryRequest),
    Batch(BatchQueryRequest),
}

/// Query vectors as base64 of little-endian float32, row-major.
#[derive(Object, Debug)]
#[oai(rename = "BinaryQueryBatch")]
pub struct BinaryQueryBatch {
    pub vectors_b64: String,
    pub dimension: i64,
}

#[derive(Object, Debug)]
#[oai(rename = "BinaryQueryRequest")]
pub struct BinaryQueryRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    pub batch: BinaryQueryBatch,
    #[oai(flatten)]
    pub options: QueryOptions,
}

/// One search hit. Fields other than `id` appear when requested with `include`.
#[derive(Object, Debug)]
#[oai(rename = "QueryResultItem")]
pub struct QueryResultItem {
    pub id: String,
    /// Distance to the query (smaller is closer); plain vector queries.
    #[oai(skip_serializing_if_is_none)]
    pub distance: Option<f64>,
    /// Fused rank score (hybrid queries; larger is better), instead of `distance`.
    #[oai(skip_serializing_if_is_none)]
    pub score: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub metadata: Option<JsonObject>,
    /// The stored vector (at the index's storage precision).
    #[oai(skip_serializing_if_is_none)]
    pub vector: Option<Vec<f64>>,
    #[oai(skip_serializing_if_is_none)]
    pub contents: Option<String>,
}

/// Flat for a single query, one list per query for batches and binary queries.
#[derive(Union, Debug)]
#[oai(one_of = false)]
pub enum QueryResults {
    Single(Vec<QueryResultItem>),
    Batch(Vec<Vec<QueryResultItem>>),
}

#[derive(Object, Debug)]
#[oai(rename = "QueryResponse")]
pub struct QueryResponse {
    pub results: QueryResults,
}

#[derive(Object, Debug)]
#[oai(rename = "GetRequest")]
pub struct GetRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    pub ids: Vec<String>,
    /// Fields to return: `vector`, `contents`, `metadata` (default: all three).
    pub include: Option<Vec<String>>,
}

#[derive(Object, Debug)]
#[oai(rename = "GetResultItemModel")]
pub struct GetResultItem {
    pub id: String,
    #[oai(skip_serializing_if_is_none)]
    pub metadata: Option<JsonObject>,
    #[oai(skip_serializing_if_is_none)]
    pub contents: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub vector: Option<Vec<f64>>,
}

#[derive(Object, Debug)]
#[oai(rename = "GetResponseModel")]
pub struct GetResponse {
    /// Found items in request order; unknown ids are omitted.
    pub results: Vec<GetResultItem>,
}

#[derive(Object, Debug)]
#[oai(rename = "DeleteRequest")]
pub struct DeleteRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    pub ids: Vec<String>,
}

#[derive(Object, Debug)]
#[oai(rename = "ListIDsRequest")]
pub struct ListIdsRequest {
    #[oai(flatten)]
    pub index: IndexRef,
}

#[derive(Object, Debug)]
#[oai(rename = "ListIDsResponse")]
pub struct ListIdsResponse {
    pub ids: Vec<String>,
    pub count: i64,
}

/// The vector count, as `result` and (for older clients) as text in `message`.
#[derive(Object, Debug)]
#[oai(rename = "NumVectorsResponse")]
pub struct NumVectors {
    pub status: String,
    pub message: String,
    pub result: i64,
}

responses!(UpsertResponse, UpsertResult, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(QueryVectorsResponse, QueryResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(GetVectorsResponse, GetResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(DeleteVectorsResponse, UpsertResult, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(ListIdsResponseEnum, ListIdsResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(NumVectorsResponse, NumVectors, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);

pub struct VectorsApi {
    pub state: Arc<AppState>,
}

/// Authorise, parse the key and open the index.
pub(super) fn open(
    state: &AppState,
    creds: &Credentials,
    action: Action,
    index: &IndexRef,
) -> Result<Lease, ApiError> {
    let (name, key) = (index.index_name.as_str(), index.index_key.as_deref());
    let principal = state.auth.authenticate(creds.key())?;
    let kek = state.resolve_kek(&principal, name, parse_kek(key)?)?;
    Ok(state
        .auth
        .open_index(&state.engine, &principal, action, name, kek.as_ref())?)
}

/// Decode `vectors_b64` (little-endian float32, `dimension` per row) into one vector per row.
fn decode_rows(
    limits: &crate::limits::Limits,
    b64: &str,
    dimension: i64,
    what: &str,
) -> Result<Vec<Vec<f32>>, ApiError> {
    if dimension < 1 {
        return Err(ApiError::invalid(format!(
            "{what}.dimension must be at least 1 (got {dimension})"
        )));
    }
    limits.dimension(dimension as usize)?;
    let text = b64.trim().as_bytes();
    let invalid = |e: &dyn std::fmt::Display| {
        ApiError::invalid(format!("{what}.vectors_b64 is not valid base64: {e}"))
    };
    let len = base64_simd::STANDARD
        .decoded_length(text)
        .map_err(|e| invalid(&e))?;
    let row = dimension as usize * 4;
    if len % row != 0 {
        return Err(ApiError::invalid(format!(
            "{what}.vectors_b64 holds {len} bytes, not a whole number of {dimension}-dimensional float32 vectors"
        )));
    }
    // SIMD decode into an uninitialised buffer, then one copy per row into its own vector
    // (a plain copy on little-endian hosts; the compiler turns the loop into one).
    let bytes = base64_simd::STANDARD
        .decode_to_vec(text)
        .map_err(|e| invalid(&e))?;
    Ok(bytes
        .chunks_exact(row)
        .map(|r| {
            r.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect())
}

/// Embed `texts` with the index's model; an index without one needs vectors (422).
fn embed_texts(
    state: &AppState,
    ix: &Index,
    what: &str,
    texts: &[&str],
) -> Result<Vec<Vec<f32>>, ApiError> {
    match &ix.config.embedding_model {
        Some(m) => Ok(state.embed.embed(m, texts)?),
        None => Err(ApiError::invalid(format!(
            "{what}: index '{}' has no embedding_model, so a vector is required",
            ix.name
        ))),
    }
}

fn upsert_items(
    state: &AppState,
    ix: &Arc<Index>,
    items: Vec<NewItem>,
) -> Result<UpsertResult, ApiError> {
    let n = items.len();
    state
        .limits
        .id_lengths(items.iter().map(|it| it.id.as_str()))?;
    if let Some(it) = items.first() {
        state.limits.dimension(it.vector.len())?;
    }
    ix.upsert(items)?;
    let triggered = state.engine.maybe_auto_train(ix);
    Ok(UpsertResult {
        status: "success".into(),
        message: format!("Upserted {n} vectors"),
        training_triggered: triggered.as_ref().map(|_| true),
        training_message: triggered,
    })
}

impl QueryOptions {
    fn resolve(self, limits: &crate::limits::Limits) -> Result<SearchParams, ApiError> {
        let top_k = match self.top_k {
            None => 100,
            Some(k) if (1..=100_000).contains(&k) => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(format!(
                    "top_k must be between 1 and 100000 (got {k})"
                )))
            }
        };
        let n_probes = match self.n_probes {
            None | Some(0) => None,
            Some(p) if p > 0 => Some(p as usize),
            Some(p) => {
                return Err(ApiError::invalid(format!(
                    "n_probes must not be negative (got {p})"
                )))
            }
        };
        let filter = match &self.filters {
            None => None,
            Some(f) => {
                limits.filter(&f.0)?;
                Filter::compile(&f.0).map_err(|e| ApiError::invalid(e.to_string()))?
            }
        };
        let mut include = Include::default();
        for field in self.include.unwrap_or_default() {
            match field.as_str() {
                "distance" => include.distance = true,
                "metadata" => include.metadata = true,
                "vector" => include.vector = true,
                "contents" => include.contents = true,
                "id" => {}
                other => {
                    return Err(ApiError::invalid(format!(
                    "unknown include field '{other}'; use distance, metadata, vector or contents"
                )))
                }
            }
        }
        Ok(SearchParams {
            top_k,
            n_probes,
            greedy: self.greedy.unwrap_or(false),
            filter,
            include,
        })
    }
}

/// What the query handlers do with a parsed body before touching an index, for the fuzz
/// harness (`crate::fuzz`).
#[cfg(test)]
pub(crate) fn resolve_for_fuzz(
    q: QueryBody,
    limits: &crate::limits::Limits,
) -> Result<(), ApiError> {
    let opts = match q {
        QueryBody::Single(q) => q.options,
        QueryBody::Batch(q) => q.options,
    };
    if let Some(f) = &opts.filters {
        limits.filter(&f.0)?;
    }
    opts.resolve(limits).map(|_| ())
}

/// The f64 whose shortest decimal form is the f32's shortest form, so a stored `0.1f32`
/// is written as `0.1`, not `0.10000000149011612`.
fn f32_for_json(x: f32) -> f64 {
    // `Display` for f32 prints the shortest string that round-trips to the same f32.
    format!("{x}").parse().unwrap_or(x as f64)
}

/// A score as the original reports it: rounded to float32, written in its shortest form.
pub(super) fn score_for_json(x: f64) -> f64 {
    f32_for_json(x as f32)
}

pub(super) fn vec_for_json(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f32_for_json).collect()
}

pub(super) fn hit_dto(h: Hit, include: Include) -> QueryResultItem {
    QueryResultItem {
        id: h.id,
        distance: include.distance.then(|| f32_for_json(h.distance)),
        score: None,
        metadata: h.metadata.map(|m| JsonObject(object_of(&m))),
        vector: h.vector.map(vec_for_json),
        contents: h.contents,
    }
}

pub(super) fn object_of(v: &Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m.clone(),
        _ => Default::default(),
    }
}

fn fetched_dto(f: Fetched) -> GetResultItem {
    GetResultItem {
        id: f.id,
        metadata: f.metadata.map(|m| JsonObject(object_of(&m))),
        contents: f.contents,
        vector: f.vector.map(vec_for_json),
    }
}

fn run_query(
    limits: &crate::limits::Limits,
    ix: &Index,
    queries: Vec<Vec<f32>>,
    mut opts: QueryOptions,
) -> Result<Vec<Vec<QueryResultItem>>, ApiError> {
    let text = super::metadata::text_query(
        ix,
        "hybrid query",
        opts.text.take(),
        opts.text_fields.take(),
        opts.text_field_weights.take(),
        opts.require_all_terms.take(),
    )?;
    let hybrid = match text {
        Some(q) => Some(super::hybrid::Hybrid::resolve(&opts, q)?),
        None => None,
    };
    let params = opts.resolve(limits)?;
    limits.query(queries.len(), params.top_k)?;
    let include = params.include;
    let Some(h) = hybrid else {
        let results = ix.search(&queries, &params)?;
        return Ok(results
            .into_iter()
            .map(|hits| hits.into_iter().map(|h| hit_dto(h, include)).collect())
            .collect());
    };
    super::hybrid::run(limits, ix, &queries, params, h)
}

#[OpenApi]
impl VectorsApi {
    /// Insert or overwrite items (JSON vectors). All-or-nothing: if any item is invalid,
    /// nothing is written.
    #[oai(
        path = "/vectors/upsert",
        method = "post",
        operation_id = "upsert_vectors_v1_vectors_upsert_post",
        tag = "Tag::Vectors"
    )]
    async fn upsert(&self, creds: Credentials, body: FastJson<UpsertRequest>) -> UpsertResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Write, &req.index)?;
            // Items without a vector get their contents embedded, all in one go.
            let mut missing = Vec::new();
            for (i, it) in req.items.iter().enumerate() {
                if it.vector.is_none() {
                    match it.contents.as_deref() {
                        Some(c) if !c.is_empty() => missing.push((i, c)),
                        _ => {
                            return Err(ApiError::invalid(format!(
                                "items[{i}] (id '{}') has neither a vector nor contents to embed",
                                it.id
                            )))
                        }
                    }
                }
            }
            let mut embedded = if missing.is_empty() {
                Vec::new()
            } else {
                let texts: Vec<&str> = missing.iter().map(|(_, c)| *c).collect();
                let what = format!(
                    "items[{}] (id '{}') has no vector",
                    missing[0].0, req.items[missing[0].0].id
                );
                embed_texts(&state, &ix, &what, &texts)?
            }
            .into_iter();
            let mut items = Vec::with_capacity(req.items.len());
            for it in req.items {
                let vector = match it.vector {
                    Some(v) => v,
                    None => embedded
                        .next()
                        .ok_or_else(|| ApiError::internal("embedding returned too few vectors"))?,
                };
                items.push(NewItem {
                    id: it.id,
                    vector,
                    metadata: it.metadata.map(|m| m.0),
                    contents: it.contents,
                });
            }
            upsert_items(&state, &ix, items)
        })
        .await
        .into()
    }

    /// Insert or overwrite items given as base64 little-endian float32.
    #[oai(
        path = "/vectors/upsert_binary",
        method = "post",
        operation_id = "upsert_vectors_binary_v1_vectors_upsert_binary_post",
        tag = "Tag::Vectors"
    )]
    async fn upsert_binary(
        &self,
        creds: Credentials,
        body: FastJson<BinaryUpsertRequest>,
    ) -> UpsertResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Write, &req.index)?;
            let b = req.batch;
            let rows = decode_rows(&state.limits, &b.vectors_b64, b.dimension, "batch")?;
            let n = rows.len();
            if n != b.ids.len() {
                return Err(ApiError::invalid(format!(
                    "batch holds {n} vectors but {} ids",
                    b.ids.len()
                )));
            }
            let mut metadata = b.metadata.unwrap_or_else(|| vec![None; n]);
            let mut contents = b.contents.unwrap_or_else(|| vec![None; n]);
            if metadata.len() != n || contents.len() != n {
                return Err(ApiError::invalid(format!(
                    "batch.metadata and batch.contents must have one entry per id ({n}); got {} and {}",
                    metadata.len(),
                    contents.len()
                )));
            }
            let items = b
                .ids
                .into_iter()
                .zip(rows)
                .zip(metadata.iter_mut().zip(contents.iter_mut()))
                .map(|((id, vector), (m, c))| NewItem {
                    id,
                    vector,
                    metadata: m.take().map(|m| m.0),
                    contents: c.take(),
                })
                .collect();
            upsert_items(&state, &ix, items)
        })
        .await
        .into()
    }

    /// Nearest neighbours of one vector (flat result list) or several (one list per query).
    #[oai(
        path = "/vectors/query",
        method = "post",
        operation_id = "query_vectors_v1_vectors_query_post",
        tag = "Tag::Vectors"
    )]
    async fn query(&self, creds: Credentials, body: Json<QueryBody>) -> QueryVectorsResponse {
        let state = self.state.clone();
        blocking(move || match body.0 {
            QueryBody::Single(q) => {
                let ix = open(&state, &creds, Action::Read, &q.index)?;
                let vector =
                    match (q.query_vectors, q.query_contents) {
                        (Some(v), _) => v,
                        (None, Some(text)) => embed_texts(&state, &ix, "query_contents", &[&text])?
                            .pop()
                            .ok_or_else(|| ApiError::internal("embedding returned no vector"))?,
                        (None, None) => return Err(ApiError::invalid(
                            "send query_vectors (a vector or a list of vectors) or query_contents",
                        )),
                    };
                let mut r = run_query(&state.limits, &ix, vec![vector], q.options)?;
                Ok(QueryResponse {
                    results: QueryResults::Single(r.pop().unwrap_or_default()),
                })
            }
            QueryBody::Batch(q) => {
                let ix = open(&state, &creds, Action::Read, &q.index)?;
                // Refuse an oversized batch before embedding any of it.
                let n = q
                    .query_vectors
                    .as_ref()
                    .map(Vec::len)
                    .or(q.query_contents.as_ref().map(Vec::len))
                    .unwrap_or(0);
                state.limits.query(n, q.options.top_k.unwrap_or(1).max(1) as usize)?;
                let queries = match (q.query_vectors, q.query_contents) {
                    (Some(v), _) => v,
                    (None, Some(texts)) => {
                        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                        embed_texts(&state, &ix, "query_contents", &refs)?
                    }
                    (None, None) => {
                        return Err(ApiError::invalid(
                            "send query_vectors (a list of vectors) or query_contents (a list of texts)",
                        ))
                    }
                };
                if queries.is_empty() {
                    return Err(ApiError::invalid("the batch holds no queries"));
                }
                Ok(QueryResponse {
                    results: QueryResults::Batch(run_query(&state.limits, &ix, queries, q.options)?),
                })
            }
        })
        .await
        .into()
    }

    /// Nearest neighbours of query vectors given as base64 little-endian float32; always one
    /// result list per query.
    #[oai(
        path = "/vectors/query_binary",
        method = "post",
        operation_id = "query_vectors_binary_v1_vectors_query_binary_post",
        tag = "Tag::Vectors"
    )]
    async fn query_binary(
        &self,
        creds: Credentials,
        body: Json<BinaryQueryRequest>,
    ) -> QueryVectorsResponse {
        let state = self.state.clone();
        blocking(move || {
            let q = body.0;
            let ix = open(&state, &creds, Action::Read, &q.index)?;
            let queries = decode_rows(
                &state.limits,
                &q.batch.vectors_b64,
                q.batch.dimension,
                "batch",
            )?;
            if queries.is_empty() {
                return Err(ApiError::invalid("batch.vectors_b64 holds no vectors"));
            }
            Ok(QueryResponse {
                results: QueryResults::Batch(run_query(&state.limits, &ix, queries, q.options)?),
            })
        })
        .await
        .into()
    }

    /// Fetch items by id. Unknown ids are left out. Items stored without metadata or contents
    /// return `{}` and `""`.
    #[oai(
        path = "/vectors/get",
        method = "post",
        operation_id = "get_vectors_v1_vectors_get_post",
        tag = "Tag::Vectors"
    )]
    async fn get(&self, creds: Credentials, body: Json<GetRequest>) -> GetVectorsResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Read, &req.index)?;
            let include = match req.include {
                None => Include::STORED,
                Some(fields) => {
                    let mut inc = Include::default();
                    for f in fields {
                        match f.as_str() {
                            "vector" => inc.vector = true,
                            "contents" => inc.contents = true,
                            "metadata" => inc.metadata = true,
                            "id" => {}
                            other => {
                                return Err(ApiError::invalid(format!(
                                "unknown include field '{other}'; use vector, contents or metadata"
                            )))
                            }
                        }
                    }
                    inc
                }
            };
            state.limits.ids(&req.ids)?;
            let found = ix.get(&req.ids, include)?;
            Ok(GetResponse {
                results: found.into_iter().map(fetched_dto).collect(),
            })
        })
        .await
        .into()
    }

    /// Delete items by id; unknown ids are skipped.
    #[oai(
        path = "/vectors/delete",
        method = "post",
        operation_id = "delete_vectors_v1_vectors_delete_post",
        tag = "Tag::Vectors"
    )]
    async fn delete(&self, creds: Credentials, body: Json<DeleteRequest>) -> DeleteVectorsResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Write, &req.index)?;
            state.limits.ids(&req.ids)?;
            let n = ix.delete_ids(&req.ids)?;
            Ok(UpsertResult {
                status: "success".into(),
                message: format!("Deleted {n} vectors"),
                training_triggered: None,
                training_message: None,
            })
        })
        .await
        .into()
    }

    /// Every id in the index, with the count.
    #[oai(
        path = "/vectors/list_ids",
        method = "post",
        operation_id = "list_ids_v1_vectors_list_ids_post",
        tag = "Tag::Vectors"
    )]
    async fn list_ids(
        &self,
        creds: Credentials,
        body: Json<ListIdsRequest>,
    ) -> ListIdsResponseEnum {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Read, &req.index)?;
            let ids = ix.list_ids()?;
            Ok(ListIdsResponse {
                count: ids.len() as i64,
                ids,
            })
        })
        .await
        .into()
    }

    /// Number of vectors in the index.
    #[oai(
        path = "/vectors/num_vectors",
        method = "post",
        operation_id = "get_index_size_v1_vectors_num_vectors_post",
        tag = "Tag::Vectors"
    )]
    async fn num_vectors(
        &self,
        creds: Credentials,
        body: Json<super::indexes::IndexOperationRequest>,
    ) -> NumVectorsResponse {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Read, &req.index)?;
            let n = state.engine.describe(&ix).num_vectors;
            Ok(NumVectors {
                status: "success".into(),
                message: n.to_string(),
                result: n as i64,
            })
        })
        .await
        .into()
    }
}
