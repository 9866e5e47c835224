//! Wiring: store + engine + API routes, and the server loop.

use std::sync::Arc;

use poem::http::StatusCode;
use poem::listener::TcpListener;
use poem::{EndpointExt, IntoResponse, Response, Route};

use crate::api::{self, error::ApiError, AppState};
use crate::auth::Auth;
use crate::config::{Config, Durability};
use crate::engine::{Engine, EngineConfig};
use crate::kms::{Kms, KmsFailure};
pub use crate::plugins::Stores;
use crate::plugins::{Registry, StoreSettings};

/// Build the shared state.
pub fn state(cfg: &Config, stores: Stores, kms: Arc<Kms>) -> Arc<AppState> {
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
        kms,
        embed: Arc::new(crate::embed::Embedders::new(
            std::iter::once(cfg.models_dir.clone())
                .chain(cfg.embed_cache.clone())
                .collect(),
        )),
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

/// At start: a KMS-backed index whose slot now names another key id or region (or provider)
/// than its envelope recorded is re-keyed onto the slot's current key (the old key must still
/// be reachable). Failures are logged and leave the index as it was; it is tried again at the
/// next start.
fn sync_kms_drift(state: &AppState) {
    let indexes = match state.engine.kms_indexes() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "could not list KMS-backed indexes for the drift check");
            return;
        }
    };
    for (name, id, env) in indexes {
        let moved = (|| -> Result<bool, String> {
            match state.kms.drifted(&env) {
                Ok(false) => return Ok(false),
                Ok(true) => {}
                Err(KmsFailure::UnknownSlot(..)) => {
                    return Err(format!(
                        "slot '{}' is no longer configured; requests for this index will fail until it is",
                        env.slot
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
            let old = state.kms.kek_for(&id, &env).map_err(|e| e.to_string())?;
            let (kek, new_env) = state
                .kms
                .new_kek(&env.slot, &id)
                .map_err(|e| e.to_string())?;
            state
                .engine
                .rewrap(&name, &old, &kek, Some(new_env.clone()))
                .map_err(|e| e.to_string())?;
            state.kms.remember(&id, &new_env, &kek);
            Ok(true)
        })();
        match moved {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(index = %name, slot = %env.slot, "KMS slot settings changed: index key re-wrapped under the slot's current key")
            }
            Err(e) => {
                tracing::warn!(index = %name, slot = %env.slot, error = %e, "KMS drift check: index left as it was")
            }
        }
    }
}

/// Run until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), String> {
    let timeout = std::time::Duration::from_secs(cfg.plugin_timeout_seconds);
    let mut registry = Registry::builtin();
    registry.load(&cfg.plugins, timeout)?;
    let stores = registry.open_store(
        &cfg.db_type,
        &StoreSettings {
            disk_path: &cfg.disk_path,
            durability: match cfg.durability {
                Durability::Sync => crate::plugins::Durability::Sync,
                Durability::Relaxed => crate::plugins::Durability::Relaxed,
            },
            plugin_timeout: timeout,
        },
    )?;
    tracing::info!(backend = stores.index.backend(), path = %cfg.disk_path.display(), "store opened");
    let kms = Kms::build(
        &cfg.kms_slots,
        registry.kms_factories(),
        std::time::Duration::from_secs(cfg.kek_cache_ttl_seconds),
        timeout,
    )
    .await?;
    tracing::info!(slots = ?kms.names(), "KMS registry loaded ({} slots)", kms.names().len());
    let state = state(&cfg, stores, Arc::new(kms));
    {
        let st = state.clone();
        tokio::task::spawn_blocking(move || sync_kms_drift(&st))
            .await
            .map_err(|e| format!("KMS drift check failed: {e}"))?;
    }
    {
        // Tell the operator early about a slot that cannot serve, without delaying the start.
        let kms = state.kms.clone();
        tokio::task::spawn_blocking(move || {
            for (slot, health) in kms.health() {
                match health {
                    Ok(()) => tracing::info!(%slot, "KMS slot healthy"),
                    Err(e) => {
                        tracing::warn!(%slot, error = %e, "KMS slot is not healthy; its indexes fail with 502 until it is")
                    }
                }
            }
        });
    }
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
