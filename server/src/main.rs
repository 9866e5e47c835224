//! `sealdb`: start the server (see `--help`).

use sealdb_server::config::{Config, LogFormat};
use sealdb_server::{api, app};

/// mimalloc instead of glibc's malloc: decrypted blocks are allocated on the blocking pool's
/// and rayon's threads and freed wherever the cache evicts them, and glibc's per-thread
/// arenas kept such memory (resident memory grew past the block cache's budget by hundreds of
/// megabytes over a 1M-vector run).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cfg = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sealdb: {e}");
            std::process::exit(2);
        }
    };
    if cfg.print_openapi {
        println!(
            "{}",
            api::spec_json(
                app::state(
                    &cfg,
                    app::Stores::memory(),
                    std::sync::Arc::new(sealdb_server::kms::Kms::empty())
                )
                .expect("an in-memory state always builds")
            )
        );
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEALDB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cfg.tracing_filter()));
    match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = rt.block_on(app::run(cfg));
    // A blocking call that never returns (a hung plugin or KMS call) must not keep the
    // process alive after a shutdown: stop waiting for the blocking pool after a while.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Err(e) = result {
        tracing::error!("{e}");
        eprintln!("sealdb: {e}");
        std::process::exit(1);
    }
}
