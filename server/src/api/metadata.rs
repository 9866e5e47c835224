//! Metadata-only queries (0.18 `POST /v1/vectors/query_metadata`): no vector, a filter, an
//! optional order. Part of the vectors resource (same tag), kept apart from vector search.

use std::sync::Arc;

use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use serde_json::Value;

use super::error::{responses, ApiError};
use super::vectors::{open, Tag};
use super::{blocking, AppState, Credentials, IndexRef, JsonObject};
use crate::auth::Action;
use crate::engine::filter::Filter;

/// A metadata-only query (0.18): no vector, a filter, optionally an order.
#[derive(Object, Debug)]
#[oai(rename = "QueryMetadataRequest")]
pub struct QueryMetadataRequest {
    #[oai(flatten)]
    pub index: IndexRef,
    /// Metadata filters (the `query` operators but `$type`, `$regex` and `$contains`); empty
    /// or omitted matches every item.
    pub filters: Option<JsonObject>,
    /// At most this many ids (after sorting); omitted or 0 returns every match.
    pub top_k: Option<i64>,
    /// Sort by one metadata field: its name, or `{"field": 1}` / `{"field": -1}`. Numbers come
    /// before strings; items without a number or string there come last.
    pub order_by: Option<Value>,
    /// With `order_by` as a name: ascending (the default) or descending.
    pub ascending: Option<bool>,
    /// BM25 text query over `full_text` fields (an index needs such fields; this server does
    /// not offer them yet, so a non-empty `text` is 400).
    pub text: Option<String>,
    /// `full_text` fields the text query searches.
    pub text_fields: Option<Vec<String>>,
    /// Weights per searched field.
    pub text_field_weights: Option<Vec<f64>>,
    /// Require every term of `text`.
    pub require_all_terms: Option<bool>,
}

/// One item of a metadata query.
#[derive(Object, Debug)]
#[oai(rename = "MetadataResult")]
pub struct MetadataResult {
    pub id: String,
    /// BM25 score (text queries only).
    #[oai(skip_serializing_if_is_none)]
    pub score: Option<f64>,
}

/// The items a metadata query matched, as rows and as bare ids.
#[derive(Object, Debug)]
#[oai(rename = "QueryMetadataResponse")]
pub struct QueryMetadataResponse {
    pub results: Vec<MetadataResult>,
    pub ids: Vec<String>,
    pub count: i64,
}

responses!(QueryMetadataResponseEnum, QueryMetadataResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);

pub struct MetadataApi {
    pub state: Arc<AppState>,
}

#[OpenApi]
impl MetadataApi {
    /// Find items by metadata alone (0.18): the ids the filter matches, optionally sorted by
    /// a field and capped by `top_k`. Works on untrained indexes.
    #[oai(
        path = "/vectors/query_metadata",
        method = "post",
        operation_id = "query_metadata_v1_vectors_query_metadata_post",
        tag = "Tag::Vectors"
    )]
    async fn query_metadata(
        &self,
        creds: Credentials,
        body: Json<QueryMetadataRequest>,
    ) -> QueryMetadataResponseEnum {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            let ix = open(&state, &creds, Action::Read, &req.index)?;
            if req.text.as_deref().is_some_and(|t| !t.trim().is_empty()) {
                return Err(ApiError::bad_request(
                    "a text query needs an index with at least one full_text field; this index has none (full_text fields are declared in metadata_schema at creation, which this server does not offer yet)",
                ));
            }
            let max = state.limits.max_query_results;
            let top_k = match req.top_k {
                None | Some(0) => None,
                Some(k) if k > 0 && k as u64 <= max as u64 => Some(k as usize),
                Some(k) => {
                    return Err(ApiError::invalid(format!(
                        "top_k must be between 0 (every match) and {max} (got {k})"
                    )))
                }
            };
            let order: Option<(String, bool)> = match &req.order_by {
                None | Some(Value::Null) => None,
                Some(Value::String(f)) if !f.is_empty() => {
                    Some((f.clone(), !req.ascending.unwrap_or(true)))
                }
                Some(Value::Object(m)) if m.len() == 1 => {
                    let (f, dir) = m.iter().next().expect("one entry");
                    match dir.as_f64() {
                        Some(d) if d != 0.0 && !f.is_empty() => Some((f.clone(), d < 0.0)),
                        _ => {
                            return Err(ApiError::invalid(format!(
                                "order_by {{\"{f}\": …}} takes 1 (ascending) or -1 (descending)"
                            )))
                        }
                    }
                }
                Some(Value::Object(m)) => {
                    return Err(ApiError::bad_request(format!(
                        "order_by must name exactly one field, got {}",
                        m.len()
                    )))
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        "order_by takes a field name or {\"field\": 1 | -1}",
                    ))
                }
            };
            let filter = match &req.filters {
                None => None,
                Some(f) => {
                    state.limits.filter(&f.0)?;
                    Filter::compile(&f.0).map_err(|e| ApiError::invalid(e.to_string()))?
                }
            };
            let schema = |path: &str| ix.config.field_schema(path);
            if let Some(why) = filter.as_ref().and_then(|f| f.metadata_only_refusal(&schema)) {
                return Err(ApiError::bad_request(why));
            }
            let ids = ix.query_metadata(
                filter.as_ref(),
                order.as_ref().map(|(f, d)| (f.as_str(), *d)),
                top_k,
                max,
            )?;
            Ok(QueryMetadataResponse {
                results: ids
                    .iter()
                    .map(|id| MetadataResult {
                        id: id.clone(),
                        score: None,
                    })
                    .collect(),
                count: ids.len() as i64,
                ids,
            })
        })
        .await
        .into()
    }
}
