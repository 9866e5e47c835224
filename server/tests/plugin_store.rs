//! The example store plugin, loaded as a library through the server's registry, passes the
//! store conformance suite; the loader refuses damaged libraries with a reason.
//!
//! The plugin libraries are built by `cargo build --workspace` (tests/run.sh does that first).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sealdb_server::plugins::{loader, Durability, PluginConfig, Registry, StoreSettings};

fn lib(name: &str) -> PathBuf {
    let dir = std::env::var_os("SEALDB_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let p = dir.join(format!("lib{name}.so"));
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

fn registry(path: PathBuf) -> Registry {
    let mut r = Registry::builtin();
    r.load(
        &[PluginConfig {
            path,
            sha256: None,
            config: Default::default(),
        }],
        Duration::from_secs(10),
    )
    .unwrap();
    r
}

#[test]
fn the_store_plugin_passes_the_conformance_suite() {
    let r = Arc::new(registry(lib("sealdb_example_store_plugin")));
    assert!(r.store_names().contains(&"example-fs".to_string()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let open = move || {
        r.open_store(
            "example-fs",
            &StoreSettings {
                disk_path: &path,
                durability: Durability::Sync,
                compact: false,
                plugin_timeout: Duration::from_secs(10),
                s3: Default::default(),
                s3_options: Default::default(),
            },
        )
        .unwrap()
        .index
    };
    sealdb_plugin_api::conformance::run_all(&open);
    // The records really are files under <disk_path>/records-plugin.
    assert!(dir.path().join("records-plugin/LOCK").is_file());
}

fn patched(src: &Path, dst: &Path, find: &[u8], replace: &[u8]) {
    let mut bytes = std::fs::read(src).unwrap();
    let mut n = 0;
    let mut i = 0;
    while let Some(off) = bytes[i..].windows(find.len()).position(|w| w == find) {
        let at = i + off;
        bytes[at..at + replace.len()].copy_from_slice(replace);
        i = at + find.len();
        n += 1;
    }
    assert!(n > 0, "pattern not found in {}", src.display());
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn damaged_or_foreign_libraries_are_refused_with_a_reason() {
    let good = lib("sealdb_test_faulty_plugin");
    let dir = tempfile::tempdir().unwrap();
    let head = |major: u16| {
        let mut h = sealdb_plugin_api::abi::MAGIC.to_le_bytes().to_vec();
        h.extend_from_slice(&major.to_le_bytes());
        h.extend_from_slice(&sealdb_plugin_api::abi::ABI_MINOR.to_le_bytes());
        h
    };
    // The descriptor's head is the magic followed by the ABI version: patch copies of a good
    // library to claim ABI 7.0, or to carry another magic.
    let wrong_major = dir.path().join("libwrong-major.so");
    patched(&good, &wrong_major, &head(1), &head(7));
    let e = loader::load(&wrong_major, None).unwrap_err();
    assert!(e.contains("ABI version 7.0 is not supported"), "{e}");
    let wrong_magic = dir.path().join("libwrong-magic.so");
    patched(&good, &wrong_magic, &head(1), &[0u8; 8]);
    let e = loader::load(&wrong_magic, None).unwrap_err();
    assert!(e.contains("wrong magic"), "{e}");

    let e = loader::load(&dir.path().join("missing.so"), None).unwrap_err();
    assert_eq!(e, "no such file");
    let text = dir.path().join("text.so");
    std::fs::write(&text, "not a library").unwrap();
    let e = loader::load(&text, None).unwrap_err();
    assert!(e.starts_with("not a loadable library"), "{e}");
    // A real shared library that is not a plugin: the C library this test runs on.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let libc = maps
        .split_whitespace()
        .find(|w| w.starts_with('/') && w.contains("libc.so"))
        .expect("libc in /proc/self/maps");
    let e = loader::load(Path::new(libc), None).unwrap_err();
    assert_eq!(
        e,
        "not a SealDB plugin: it does not export sealdb_plugin_entry_v1"
    );
    let e = loader::load(&good, Some(&"0".repeat(64))).unwrap_err();
    assert!(e.starts_with("sha256 mismatch: the file has "), "{e}");
    let sum = loader::sha256_file(&good).unwrap();
    assert!(loader::load(&good, Some(&sum.to_uppercase())).is_ok());
}
