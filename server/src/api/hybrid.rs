//! Hybrid search (0.18): a vector query with `text` runs a BM25 leg beside the vector leg
//! and fuses their rankings by weighted reciprocal rank fusion (`engine::text::fuse`).
//! Part of the vectors resource; the knobs are in [`QueryOptions`].

use super::error::ApiError;
use super::vectors::{
    hit_dto, object_of, score_for_json, vec_for_json, QueryOptions, QueryResultItem,
};
use super::JsonObject;
use crate::engine::text::TextQuery;
use crate::engine::{Fetched, Hit, Include, Index, SearchParams};

/// Fuse each query vector's results with the text leg `h`: `params` as resolved for the
/// request (its `top_k`, filter and `include`).
pub(super) fn run(
    limits: &crate::limits::Limits,
    ix: &Index,
    queries: &[Vec<f32>],
    mut params: SearchParams,
    h: Hybrid,
) -> Result<Vec<Vec<QueryResultItem>>, ApiError> {
    let include = params.include;
    let top_k = params.top_k;
    let window = top_k
        .saturating_mul(h.window_mult)
        .min(limits.max_query_results.max(top_k));
    // The text leg is the same for every query vector: run it once. An exact endpoint of
    // alpha skips the leg it silences.
    let text_ids: Vec<String> = if h.alpha < 1.0 {
        ix.text_top(&h.text, params.filter.as_ref(), Some(window))?
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    } else {
        Vec::new()
    };
    let vector_hits: Vec<Vec<Hit>> = if h.alpha > 0.0 {
        params.top_k = window;
        params.include.distance = false;
        ix.search(queries, &params)?
    } else {
        queries.iter().map(|_| Vec::new()).collect()
    };
    let mut out = Vec::with_capacity(queries.len());
    for hits in vector_hits {
        let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
        let mut fused = crate::engine::text::fuse(&ids, &text_ids, h.alpha, h.rrf_k);
        fused.truncate(top_k);
        let mut by_id: std::collections::HashMap<String, Hit> =
            hits.into_iter().map(|h| (h.id.clone(), h)).collect();
        // Results found by the text leg alone: their fields come from a get.
        let missing: Vec<String> = fused
            .iter()
            .filter(|(id, _)| !by_id.contains_key(id))
            .map(|(id, _)| id.clone())
            .collect();
        let wants = include.metadata || include.vector || include.contents;
        let mut fetched: std::collections::HashMap<String, Fetched> =
            if wants && !missing.is_empty() {
                ix.get(&missing, include)?
                    .into_iter()
                    .map(|f| (f.id.clone(), f))
                    .collect()
            } else {
                Default::default()
            };
        let items = fused
            .into_iter()
            .map(|(id, score)| {
                let score = Some(score_for_json(score));
                if let Some(hit) = by_id.remove(&id) {
                    QueryResultItem {
                        score,
                        ..hit_dto(
                            hit,
                            Include {
                                distance: false,
                                ..include
                            },
                        )
                    }
                } else {
                    let f = fetched.remove(&id);
                    QueryResultItem {
                        id,
                        distance: None,
                        score,
                        metadata: f
                            .as_ref()
                            .and_then(|f| f.metadata.as_ref())
                            .map(|m| JsonObject(object_of(m))),
                        vector: f.as_ref().and_then(|f| f.vector.clone()).map(vec_for_json),
                        contents: f.and_then(|f| f.contents),
                    }
                }
            })
            .collect();
        out.push(items);
    }
    Ok(out)
}

/// The fusion knobs of a hybrid query, checked.
pub(super) struct Hybrid {
    text: TextQuery,
    alpha: f64,
    rrf_k: f64,
    window_mult: usize,
}

impl Hybrid {
    pub(super) fn resolve(o: &QueryOptions, text: TextQuery) -> Result<Self, ApiError> {
        let alpha = o.alpha.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&alpha) {
            return Err(ApiError::bad_request(format!(
                "alpha must be in [0, 1] (0 = BM25 only, 1 = vector only); got {alpha}"
            )));
        }
        let rrf_k = o.rrf_k.unwrap_or(60.0);
        if !(rrf_k.is_finite() && rrf_k > 0.0) {
            return Err(ApiError::bad_request(format!(
                "rrf_k must be a number > 0 (omit it for 60); got {rrf_k}"
            )));
        }
        let window_mult = match o.window_mult {
            None => 3,
            Some(w) if (1..=1000).contains(&w) => w as usize,
            Some(w) => {
                return Err(ApiError::bad_request(format!(
                    "window_mult must be between 1 and 1000: it multiplies top_k into each leg's candidate count (omit it for 3); got {w}"
                )))
            }
        };
        Ok(Self {
            text,
            alpha,
            rrf_k,
            window_mult,
        })
    }
}
