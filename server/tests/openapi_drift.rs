//! The committed spec (`openapi/openapi.json`) must equal what the code generates.
//! Regenerate with: `UPDATE_OPENAPI=1 cargo test -p sealdb-server --test openapi_drift`.

use std::path::PathBuf;

use sealdb_server::{api, app, config::Config};

#[test]
fn committed_spec_matches_code() {
    let cfg = Config::load_from(["sealdb"]).expect("default config");
    let state = app::state(
        &cfg,
        app::Stores::memory(),
        std::sync::Arc::new(sealdb_server::kms::Kms::empty()),
    )
    .expect("state");
    let generated = api::spec_json(state) + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("writing openapi/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.json is out of date with the code; regenerate it with \
         `UPDATE_OPENAPI=1 cargo test -p sealdb-server --test openapi_drift` and commit it"
    );
}
