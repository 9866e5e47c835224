//! Wiring: store + engine + API routes, and the server loop.

use std::sync::Arc;

use poem::http::StatusCode;
use poem::listener::TcpListener;
use poem::{EndpointExt, IntoResponse, Response, Route};
use sealdb_plugin_api::{IndexStore, UserStore};

use crate::api::{self, error::ApiError, AppState};
use crate::auth::Auth;
use crate::config::{Config, DbType, Durability};
use crate::engine::{Engine, EngineConfig};

/// The configured stores: indexes and users (one backend serves both).
pub struct Stores {
    pub index: Arc<dyn IndexStore>,
    pub users: Arc<dyn UserStore>,
}

impl Stores {
    /// Both stores in one throwaway in-memory backend.
    pub fn memory() -> Self {
        let m = Arc::new(sealdb_store_memory::MemoryStore::new());
        Self {
            index: m.clone(),
            users: m,
        }
    }
}

/// Open the configured store.
pub fn open_store(cfg: &Config) -> Result<Stores, String> {
    Ok(match cfg.db_type {
        DbType::Memory => Stores::memory(),
        DbType::Disk => {
            let r = Arc::new(
                sealdb_store_redb::RedbStore::open_dir_with(
                    &cfg.disk_path,
                    sealdb_store_redb::WalOptions {
                        durability: match cfg.durability {
                            Durability::Sync => sealdb_store_redb::Durability::Sync,
                            Durability::Relaxed => sealdb_store_redb::Durability::Relaxed,
                        },
                        ..Default::default()
                    },
                )
                .map_err(|e| format!("CYBORGDB_DISK_PATH={}: {e}", cfg.disk_path.display()))?,
            );
            Stores {
                index: r.clone(),
                users: r,
            }
        }
    })
}

/// Build the shared state.
pub fn state(cfg: &Config, stores: Stores) -> Arc<AppState> {
    let store = stores.index;
    let engine = Engine::new(
        store,
        EngineConfig {
            auto_train_min_vectors: cfg.auto_train_min_vectors,
            auto_train: !cfg.auto_train_disabled,
            cache_limit_bytes: cfg
                .index_cache_mb
                .map(|mb| (mb as usize).saturating_mul(1 << 20)),
        },
    );
    Arc::new(AppState {
        engine,
        auth: Auth::new(cfg.root_key.clone(), cfg.api_key.clone(), stores.users),
        max_body_bytes: (cfg.max_body_mb as usize).saturating_mul(1 << 20),
    })
}

/// Errors raised outside the operations (unknown route, wrong method) as JSON error bodies.
async fn json_error(err: poem::Error) -> Response {
    let status = err.status();
    let detail = match status {
        StatusCode::NOT_FOUND => {
            "Not Found: no such route (the API lives under /v1; see /v1/docs)".to_owned()
        }
        StatusCode::METHOD_NOT_ALLOWED => "Method Not Allowed for this route".to_owned(),
        _ => err.to_string(),
    };
    let e = ApiError::new(status.as_u16(), detail);
    poem::web::Json(serde_json::json!({"status_code": e.status, "detail": e.detail}))
        .with_status(status)
        .into_response()
}

/// The whole HTTP application.
pub fn routes(state: Arc<AppState>) -> impl poem::Endpoint {
    let limit = state.max_body_bytes;
    let service = api::service(state);
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    Route::new()
        .at("/v1/openapi.json", spec)
        .nest("/v1/docs", docs)
        .nest("/v1", service)
        .catch_all_error(json_error)
        .around(move |ep, req| limit_body(ep, req, limit))
        .around(log_request)
}

/// Refuse a request body larger than `limit` bytes with 413 before it is read: by its
/// `Content-Length`, or, for a body sent without one (chunked), by reading at most `limit`
/// bytes of it first. GET and HEAD bodies are never read by any route, so they pass.
async fn limit_body<E: poem::Endpoint>(
    ep: std::sync::Arc<E>,
    mut req: poem::Request,
    limit: usize,
) -> poem::Result<Response> {
    let too_large = || {
        let e = ApiError::new(
            413,
            format!(
                "the request body is larger than this server accepts ({} MiB; see --max-body-mb)",
                limit >> 20
            ),
        );
        Ok(
            poem::web::Json(serde_json::json!({"status_code": e.status, "detail": e.detail}))
                .with_status(StatusCode::PAYLOAD_TOO_LARGE)
                .into_response(),
        )
    };
    if matches!(
        *req.method(),
        poem::http::Method::GET | poem::http::Method::HEAD
    ) {
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    match declared {
        Some(Some(n)) if n > limit as u64 => return too_large(),
        Some(_) => {}
        None if req
            .headers()
            .contains_key(poem::http::header::TRANSFER_ENCODING) =>
        {
            match req.take_body().into_bytes_limit(limit).await {
                Ok(bytes) => req.set_body(bytes),
                Err(poem::error::ReadBodyError::PayloadTooLarge) => return too_large(),
                Err(e) => return Err(e.into()),
            }
        }
        None => {}
    }
    ep.call(req).await.map(IntoResponse::into_response)
}

/// One log line per request: method, path, status, latency. Never the query string, headers
/// or body, which can carry keys (`?index_key=` on the user routes, `X-API-Key`, `index_key`).
async fn log_request<E: poem::Endpoint>(
    ep: std::sync::Arc<E>,
    req: poem::Request,
) -> poem::Result<Response> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    let resp = ep.call(req).await.map(IntoResponse::into_response);
    let status = match &resp {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    tracing::info!(%method, %path, status = status.as_u16(), ms = started.elapsed().as_secs_f64() * 1e3, "request");
    resp
}

/// Run until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), String> {
    let stores = open_store(&cfg)?;
    tracing::info!(backend = stores.index.backend(), path = %cfg.disk_path.display(), "store opened");
    let state = state(&cfg, stores);
    if !state.auth.enabled() {
        tracing::warn!("CYBORGDB_SERVICE_ROOT_KEY is not set: authentication is DISABLED and every route is open");
    } else if !state.auth.rbac_enabled() {
        tracing::warn!("legacy single-key mode (CYBORGDB_API_KEY): user management is unavailable");
    }
    let addr = format!("{}:{}", cfg.host, cfg.port);
    tracing::info!(%addr, "SealDB listening (docs at /v1/docs)");
    poem::Server::new(TcpListener::bind(addr.clone()))
        .run_with_graceful_shutdown(
            routes(state),
            shutdown_signal(),
            Some(std::time::Duration::from_secs(10)),
        )
        .await
        .map_err(|e| format!("server on {addr} failed: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
