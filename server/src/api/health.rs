//! `GET /v1/health`.

use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

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

pub struct HealthApi;

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
}
