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
use crate::engine::text::TextQuery;
use crate::engine::Index;

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
    /// BM25 text query over the index's `full_text` fields; results then come best first
    /// with their `score`. Omitted or empty: a filter-only query.
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
            let text = text_query(
                &ix,
                "text query",
                req.text,
                req.text_fields,
                req.text_field_weights,
                req.require_all_terms,
            )?;
            if text.is_some() && req.order_by.as_ref().is_some_and(|o| !o.is_null()) {
                return Err(ApiError::bad_request(
                    "order_by cannot be combined with text: text results are ranked by BM25 score (drop order_by, or query without text)",
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
            if let Some(q) = text {
                let hits = ix.text_top(&q, filter.as_ref(), top_k)?;
                if top_k.is_none() && hits.len() > max {
                    return Err(ApiError::invalid(format!(
                        "more than {max} items match; give top_k (or raise --max-query-results)"
                    )));
                }
                return Ok(QueryMetadataResponse {
                    count: hits.len() as i64,
                    ids: hits.iter().map(|(id, _)| id.clone()).collect(),
                    results: hits
                        .into_iter()
                        .map(|(id, score)| MetadataResult {
                            id,
                            score: Some(super::vectors::score_for_json(score)),
                        })
                        .collect(),
                });
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

/// The text part of a query, checked against the index's `full_text` fields: `None` when
/// `text` is omitted or empty. `what` names the query in errors ("text query", "hybrid
/// query"). Every refusal is a 400, as the original's.
pub(super) fn text_query(
    ix: &Index,
    what: &str,
    text: Option<String>,
    fields: Option<Vec<String>>,
    weights: Option<Vec<f64>>,
    require_all: Option<bool>,
) -> Result<Option<TextQuery>, ApiError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let all = ix.config.text_fields();
    if all.is_empty() {
        return Err(ApiError::bad_request(format!(
            "a {what} needs an index with at least one full_text field; this index has none (full_text fields are fixed at creation: metadata_schema or text_fields)"
        )));
    }
    let searched: Vec<(usize, String)> = match fields.filter(|f| !f.is_empty()) {
        // All of them, in name order (as the original: weights are parallel to that order).
        None => {
            let mut v: Vec<(usize, String)> = all
                .iter()
                .enumerate()
                .map(|(i, f)| (i, (*f).to_owned()))
                .collect();
            v.sort_by(|a, b| a.1.cmp(&b.1));
            v
        }
        Some(names) => {
            let mut out: Vec<(usize, String)> = Vec::with_capacity(names.len());
            for n in names {
                let Some(i) = all.iter().position(|f| *f == n) else {
                    return Err(ApiError::bad_request(format!(
                        "text_fields names '{n}', which is not a full_text field of this index (full_text fields: {})",
                        all.join(", ")
                    )));
                };
                if !out.iter().any(|(j, _)| *j == i) {
                    out.push((i, n));
                }
            }
            out
        }
    };
    let weights = match weights {
        None => vec![1.0; searched.len()],
        Some(w) if w.len() != searched.len() => {
            return Err(ApiError::bad_request(format!(
                "text_field_weights has {} entries but the query searches {} field(s); give one weight per searched field (all full_text fields when text_fields is omitted)",
                w.len(),
                searched.len()
            )))
        }
        Some(w) => {
            if let Some((i, x)) = w.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x >= 0.0)) {
                return Err(ApiError::bad_request(format!(
                    "text_field_weights[{i}] (field '{}') must be a finite number >= 0; got {x}",
                    searched[i].1
                )));
            }
            w
        }
    };
    let max_terms = 256;
    let terms = crate::engine::text::query_terms(&text);
    if terms.len() > max_terms {
        return Err(ApiError::invalid(format!(
            "the query text has {} distinct terms; at most {max_terms} are searched at once",
            terms.len()
        )));
    }
    Ok(Some(TextQuery {
        terms,
        fields: searched
            .into_iter()
            .zip(weights)
            .map(|((i, n), w)| (i, n, w))
            .collect(),
        require_all: require_all.unwrap_or(false),
    }))
}
