//! `GET /v1/health` (liveness, as the original) and `GET /v1/ready` (readiness for
//! orchestrators: the store answers; KMS slots and embedding models reported).

use std::collections::BTreeMap;
use std::sync::Arc;

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use super::AppState;

#[derive(Tags)]
enum Tag {
    /// Service status.
    Health,
}

/// Liveness and version.
#[derive(Object, Debug)]
#[oai(rename = "HealthResponse")]
pub struct Health {
    /// `healthy` when the service answers.
    pub status: String,
    /// REST API version (`v1`).
    pub api_version: String,
    /// Server version.
    pub version: String,
}

/// Whether this server can serve requests, and the state of what some requests need.
#[derive(Object, Debug)]
#[oai(rename = "ReadinessResponse")]
pub struct Readiness {
    /// `ready`, or `degraded` when a KMS slot is unhealthy (its indexes get 502, others are
    /// served).
    pub status: String,
    /// `ok`, or `failed` (details in the server log).
    pub store: String,
    /// Each KMS slot: `ok` or `failed`.
    pub kms: BTreeMap<String, String>,
    /// Embedding models loaded in memory.
    pub models_loaded: Vec<String>,
    /// Embedding models installed (weights found), loaded or not.
    pub models_installed: Vec<String>,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The store answers (status `ready` or `degraded`).
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// The store does not answer.
    #[oai(status = 503)]
    Unavailable(Json<super::error::ErrorBody>),
}

pub struct HealthApi {
    pub state: Arc<AppState>,
}

#[OpenApi]
impl HealthApi {
    /// Health check. Never requires an API key.
    #[oai(
        path = "/health",
        method = "get",
        operation_id = "health_check_v1_health_get",
        tag = "Tag::Health"
    )]
    async fn health(&self) -> Json<Health> {
        Json(Health {
            status: "healthy".into(),
            api_version: "v1".into(),
            version: super::VERSION.into(),
        })
    }

    /// Readiness for orchestrators: 200 while the store answers (with the health of each KMS
    /// slot and the embedding models), 503 when it does not. Never requires an API key and
    /// never shows error details (they are logged).
    #[oai(
        path = "/ready",
        method = "get",
        operation_id = "readiness_v1_ready_get",
        tag = "Tag::Health"
    )]
    async fn ready(&self) -> ReadyResponse {
        let state = self.state.clone();
        let r = tokio::task::spawn_blocking(move || {
            let store_ok = match state.engine.list() {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "readiness: the store does not answer");
                    false
                }
            };
            let mut kms = BTreeMap::new();
            for (slot, h) in state.kms.health() {
                let v = match h {
                    Ok(()) => "ok",
                    Err(e) => {
                        tracing::warn!(%slot, error = %e, "readiness: KMS slot unhealthy");
                        "failed"
                    }
                };
                kms.insert(slot, v.to_owned());
            }
            let degraded = kms.values().any(|v| v != "ok");
            Readiness {
                status: if degraded { "degraded" } else { "ready" }.into(),
                store: if store_ok { "ok" } else { "failed" }.into(),
                kms,
                models_loaded: state.embed.loaded().iter().map(|s| s.to_string()).collect(),
                models_installed: crate::embed::MODELS
                    .iter()
                    .filter(|m| state.embed.find(m).is_some())
                    .map(|m| m.name.to_string())
                    .collect(),
            }
        })
        .await;
        match r {
            Ok(r) if r.store == "ok" => ReadyResponse::Ready(Json(r)),
            _ => ReadyResponse::Unavailable(Json(super::error::ErrorBody {
                status_code: 503,
                detail: "not ready: the store does not answer (see the server log)".into(),
            })),
        }
    }
}
