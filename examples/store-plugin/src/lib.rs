//! `example-fs`: SealDB's filesystem store built as a plugin library, selected with
//! `--db-type example-fs` once listed under `plugins:`. Its configuration is the plugin
//! entry's `config` plus `disk_path` (the server's `CYBORGDB_DISK_PATH` unless `config` sets
//! one); records go to `<disk_path>/<subdir>` (`subdir` defaults to `records-plugin`).

use sealdb_plugin_api::abi::flat_json;
use sealdb_plugin_api::StoreError;
use sealdb_store_fs::FsStore;

/// Open the store from the JSON configuration the server passes.
pub fn open(config: &str) -> Result<FsStore, StoreError> {
    let c = flat_json::decode(config)
        .map_err(|e| StoreError::Unavailable(format!("bad configuration: {e}")))?;
    let root = c
        .get("disk_path")
        .ok_or_else(|| StoreError::Unavailable("configuration has no disk_path".into()))?;
    let sub = c.get("subdir").map_or("records-plugin", String::as_str);
    sealdb_plugin_api::export::log_info(&format!("example-fs store at {root}/{sub}"));
    FsStore::open(&std::path::Path::new(root).join(sub))
}

sealdb_plugin_api::declare_plugin! {
    name: "sealdb-example-store-plugin",
    version: env!("CARGO_PKG_VERSION"),
    store: { name: "example-fs", instance: FsStore, open: open },
}
