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
    let service = api::service(state);
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    Route::new()
        .at("/v1/openapi.json", spec)
        .nest("/v1/docs", docs)
        .nest("/v1", service)
        .catch_all_error(json_error)
        .around(log_request)
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
