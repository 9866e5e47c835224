//! Wiring: store + engine + API routes, and the server loop.

use std::sync::Arc;

use poem::http::StatusCode;
use poem::listener::{Listener, TcpListener};
use poem::{EndpointExt, IntoResponse, Response, Route};

use crate::api::{self, error::ApiError, AppState};
use crate::auth::Auth;
use crate::config::{Config, Durability};
use crate::engine::{Engine, EngineConfig};
use crate::kms::{Kms, KmsFailure};
pub use crate::plugins::Stores;
use crate::plugins::{Registry, StoreSettings};

/// Build the shared state.
pub fn state(cfg: &Config, stores: Stores, kms: Arc<Kms>) -> Result<Arc<AppState>, String> {
    let store: Arc<dyn sealdb_plugin_api::IndexStore> =
        Arc::new(crate::metrics::MeteredStore(stores.index));
    let engine = Engine::new(
        store,
        EngineConfig {
            auto_train_min_vectors: cfg.auto_train_min_vectors,
            auto_train: !cfg.auto_train_disabled,
            cache_limit_bytes: Some(cfg.cache_budget_bytes()),
            train_time_limit: cfg.limits().train_time_limit(),
            coarse_min_bytes: Some(cfg.limits().coarse_min_bytes()),
            background_merges: true,
        },
    );
    Ok(Arc::new(AppState {
        engine,
        auth: Auth::new(cfg.root_key.clone(), cfg.api_key.clone(), stores.users)?,
        kms,
        wal_dir: (cfg.db_type.eq_ignore_ascii_case("disk")).then(|| cfg.disk_path.clone()),
        metrics_open: cfg.metrics_open,
        embed: Arc::new(crate::embed::Embedders::new(
            std::iter::once(cfg.models_dir.clone())
                .chain(cfg.embed_cache.clone())
                .collect(),
        )),
        max_body_bytes: (cfg.max_body_mb as usize).saturating_mul(1 << 20),
        limits: cfg.limits(),
    }))
}

/// `GET /metrics`: Prometheus text format. Needs the root key when authentication is on,
/// unless `--metrics-open`.
#[poem::handler]
async fn metrics_endpoint(req: &poem::Request, state: poem::web::Data<&Arc<AppState>>) -> Response {
    let state: Arc<AppState> = state.0.clone();
    if state.auth.enabled() && !state.metrics_open {
        let key = req.headers().get("x-api-key").and_then(|v| v.to_str().ok());
        match state.auth.authenticate(key) {
            Ok(crate::auth::Principal::Root) | Ok(crate::auth::Principal::Open) => {}
            _ => {
                let e = ApiError::unauthorized(
                    "GET /metrics needs the root API key in X-API-Key (or start with --metrics-open)",
                );
                return poem::web::Json(
                    serde_json::json!({"status_code": e.status, "detail": e.detail}),
                )
                .with_status(StatusCode::UNAUTHORIZED)
                .into_response();
            }
        }
    }
    let body = tokio::task::spawn_blocking(move || {
        let (open, bytes, vectors) = state.engine.open_stats();
        crate::metrics::render(crate::metrics::Snapshot {
            open_indexes: open,
            cached_bytes: bytes,
            blocks: state.engine.cache_stats(),
            vectors,
            wal_dir: state.wal_dir.clone(),
        })
    })
    .await
    .unwrap_or_default();
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
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
    let metrics_state = state.clone();
    let service = api::service(state);
    let docs = service.swagger_ui();
    let spec = Arc::new(api::patch_spec(&service.spec()));
    Route::new()
        .at("/metrics", poem::get(metrics_endpoint).data(metrics_state))
        .at(
            "/v1/openapi.json",
            poem::get(poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type("application/json; charset=utf-8")
                    .body(spec.as_str().to_owned())
            })),
        )
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

/// The operation a request is for, by route (a bounded set: never an index name or an id).
pub fn operation_of(method: &poem::http::Method, path: &str) -> &'static str {
    use poem::http::Method as M;
    let path = path.trim_end_matches('/');
    match (method, path) {
        (_, "/v1/health") => "health",
        (_, "/v1/ready") => "ready",
        (_, "/metrics") => "metrics",
        (_, "/v1/openapi.json") => "openapi",
        (_, p) if p.starts_with("/v1/docs") => "docs",
        (_, "/v1/embedding-models") => "list_embedding_models",
        (_, "/v1/indexes/list") => "list_indexes",
        (_, "/v1/indexes/create") => "create_index",
        (_, "/v1/indexes/describe") => "describe_index",
        (_, "/v1/indexes/delete") => "delete_index",
        (_, "/v1/indexes/train") => "train_index",
        (_, "/v1/indexes/rewrap") => "rewrap_index",
        (_, "/v1/indexes/training-status") => "training_status",
        (_, "/v1/vectors/upsert") => "upsert",
        (_, "/v1/vectors/upsert_binary") => "upsert_binary",
        (_, "/v1/vectors/query") => "query",
        (_, "/v1/vectors/query_binary") => "query_binary",
        (_, "/v1/vectors/get") => "get",
        (_, "/v1/vectors/delete") => "delete",
        (_, "/v1/vectors/list_ids") => "list_ids",
        (_, "/v1/vectors/num_vectors") => "num_vectors",
        (m, p) if p.starts_with("/v1/indexes/") && p.contains("/users") => match *m {
            M::POST => "create_user",
            M::DELETE => "delete_user",
            _ => "list_users",
        },
        _ => "other",
    }
}

/// A client's `X-Request-Id` is kept when it is 1-128 characters of `[A-Za-z0-9._:-]`.
fn sane_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Every request: an id (the client's `X-Request-Id` when sane, else a new one) returned in
/// `X-Request-Id` and carried by every log line of the request (a tracing span, entered on the
/// blocking pool too); one log line at the end (method, path, operation, status, latency), at
/// WARN for 4xx and ERROR for 5xx; request metrics. Never the query string, headers or body,
/// which can carry keys (`?index_key=` on the user routes, `X-API-Key`, `index_key`).
async fn log_request<E: poem::Endpoint>(
    ep: std::sync::Arc<E>,
    req: poem::Request,
) -> poem::Result<Response> {
    use tracing::Instrument;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let mut b = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
            hex::encode(b)
        });
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let op = operation_of(&method, &path);
    let span = tracing::info_span!("request", request_id = %id, op);
    let started = std::time::Instant::now();
    let resp = ep
        .call(req)
        .instrument(span.clone())
        .await
        .map(IntoResponse::into_response);
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = resp.status().as_u16();
    let secs = started.elapsed().as_secs_f64();
    crate::metrics::request(op, status, secs);
    let _g = span.enter();
    let ms = secs * 1e3;
    match status {
        500.. => tracing::error!(%method, %path, status, ms, "request failed"),
        400..=499 => tracing::warn!(%method, %path, status, ms, "request refused"),
        _ => tracing::info!(%method, %path, status, ms, "request"),
    }
    if let Ok(v) = poem::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
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
    crate::metrics::install(cfg.metrics_index_labels)?;
    let tls = match (&cfg.ssl_cert_path, &cfg.ssl_key_path) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((c.clone(), k.clone(), crate::tls::load(c, k)?)),
        (Some(_), None) => {
            return Err("SSL_CERT_PATH is set but SSL_KEY_PATH is not: set both for HTTPS".into())
        }
        (None, Some(_)) => {
            return Err("SSL_KEY_PATH is set but SSL_CERT_PATH is not: set both for HTTPS".into())
        }
    };
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
            compact: cfg.compact_on_start,
            s3: sealdb_store_s3::S3Settings {
                bucket: cfg.s3_bucket.clone().unwrap_or_default(),
                region: cfg.s3_region.clone(),
                prefix: cfg.s3_prefix.clone(),
                endpoint: cfg.s3_endpoint.clone(),
                access_key: cfg.s3_access_key.clone(),
                secret_key: cfg.s3_secret_key.clone(),
                session_token: cfg.s3_session_token.clone(),
            },
            s3_options: sealdb_store_s3::S3Options {
                refresh: std::time::Duration::from_millis(cfg.s3_refresh_ms),
                retention: std::time::Duration::from_secs(cfg.s3_retention_seconds),
                compact_interval: std::time::Duration::from_secs(cfg.s3_compact_seconds),
                ..Default::default()
            },
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
    let state = state(&cfg, stores, Arc::new(kms))?;
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
    let listener = match tls {
        None => {
            tracing::info!(%addr, "SealDB listening on HTTP (docs at /v1/docs)");
            TcpListener::bind(addr.clone()).boxed()
        }
        Some((cert, key, first)) => {
            tracing::info!(%addr, cert = %cert.display(), "SealDB listening on HTTPS (docs at /v1/docs; SIGHUP reloads the certificate)");
            TcpListener::bind(addr.clone())
                .rustls(crate::tls::reloading(cert, key, first))
                .boxed()
        }
    };
    let engine = state.engine.clone();
    let settle = state.engine.clone();
    let grace = std::time::Duration::from_secs(cfg.shutdown_timeout_seconds);
    let served = poem::Server::new(listener)
        .run_with_graceful_shutdown(
            routes(state),
            async move {
                shutdown_signal().await;
                // Trainings stop at their next check (within about a second); requests in
                // flight get `grace` to finish.
                engine.begin_shutdown();
            },
            Some(grace),
        )
        .await
        .map_err(|e| format!("server on {addr} failed: {e}"));
    // Background merges stop at their next batch once shutdown began; let them end before
    // the store closes.
    let _ = tokio::task::spawn_blocking(move || settle.settle_merges()).await;
    tracing::info!("requests drained; store closing");
    served
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
