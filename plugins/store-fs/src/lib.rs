//! The filesystem store: every record is one file, so an operator can back up, copy or
//! inspect a data directory with ordinary file tools. Same contract as the redb store (atomic,
//! durable batches; ordered prefix scans; readers never see part of a batch).
//!
//! # Layout (under the data directory)
//! ```text
//! LOCK                      held (exclusive file lock) while a server has the store open
//! journal/<seq>.log         a committed batch not yet fully applied (replayed at open)
//! journal/<seq>.tmp         a batch being written (not committed: removed at open)
//! records/s<H>/…/k<T>       one record: H = hex of the key's first 17 bytes (fewer if the key
//!                           is shorter), T = hex of the rest, split into 200-character path
//!                           components (all but the last are directories `d<chunk>`)
//! ```
//! Hex keeps the byte order of keys in file names, and 17 bytes is a record kind plus an index
//! id, so one index's records of one kind share a directory.
//!
//! # Batches
//! A batch is first written to `journal/<seq>.tmp`, fsynced, and renamed to `<seq>.log` (the
//! commit point; the directory is fsynced too). Then, under the write lock that readers take
//! shared, its operations are applied in order: a put writes `…/t<T>`, fsyncs it and renames it
//! over the record; deletes unlink. The touched directories are fsynced, and only then is the
//! journal removed (and its directory fsynced, so an old journal can never be replayed over
//! newer data). A crash before the commit point loses the batch whole; after it, opening the
//! store applies the journal again (puts and deletes are idempotent).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};
use sealdb_plugin_api::abi::codec;
use sealdb_plugin_api::{IndexStore, KeyValue, StoreError, WriteBatch, WriteOp};

/// Key bytes that name the shard directory.
const SHARD_BYTES: usize = 17;
/// Hex characters per path component of the rest of the key.
const CHUNK: usize = 200;

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

/// The filesystem store.
pub struct FsStore {
    records: PathBuf,
    journal: PathBuf,
    /// Readers shared, batch application exclusive.
    view: RwLock<()>,
    /// One batch at a time (journal sequence order = apply order).
    writer: Mutex<u64>,
    _lock: File,
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync", dir, e))
}

fn record_path(records: &Path, key: &[u8]) -> PathBuf {
    let split = key.len().min(SHARD_BYTES);
    let mut p = records.join(format!("s{}", hex::encode(&key[..split])));
    let rest = hex::encode(&key[split..]);
    let chunks: Vec<&str> = if rest.is_empty() {
        vec![""]
    } else {
        rest.as_bytes()
            .chunks(CHUNK)
            .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
            .collect()
    };
    for c in &chunks[..chunks.len() - 1] {
        p.push(format!("d{c}"));
    }
    p.push(format!("k{}", chunks[chunks.len() - 1]));
    p
}

impl FsStore {
    /// Open (or create) the store in `dir`, replaying any committed batch left by a crash.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let records = dir.join("records");
        let journal = dir.join("journal");
        for d in [dir, &records, &journal] {
            fs::create_dir_all(d).map_err(|e| io("create", d, e))?;
        }
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("open", &lock_path, e))?;
        lock.try_lock().map_err(|_| {
            StoreError::Unavailable(format!("{} is in use by another process", dir.display()))
        })?;
        let store = Self {
            records,
            journal,
            view: RwLock::new(()),
            writer: Mutex::new(0),
            _lock: lock,
        };
        let next = store.recover()?;
        *store.writer.lock() = next;
        Ok(store)
    }

    /// Remove uncommitted journals, apply committed ones in order; the next sequence number.
    fn recover(&self) -> Result<u64, StoreError> {
        let mut committed = Vec::new();
        let entries = fs::read_dir(&self.journal).map_err(|e| io("list", &self.journal, e))?;
        for e in entries {
            let e = e.map_err(|e| io("list", &self.journal, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(seq) = name
                .strip_suffix(".log")
                .and_then(|s| s.parse::<u64>().ok())
            {
                committed.push(seq);
            } else {
                fs::remove_file(e.path()).map_err(|err| io("remove", &e.path(), err))?;
            }
        }
        committed.sort_unstable();
        for seq in &committed {
            let path = self.journal.join(format!("{seq:020}.log"));
            let bytes = fs::read(&path).map_err(|e| io("read", &path, e))?;
            let batch = codec::decode_batch(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("journal {}: {e}", path.display())))?;
            self.apply(batch)?;
            fs::remove_file(&path).map_err(|e| io("remove", &path, e))?;
            sync_dir(&self.journal)?;
        }
        Ok(committed.last().map_or(0, |s| s + 1))
    }

    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let p = record_path(&self.records, key);
        match fs::read(&p) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &p, e)),
        }
    }

    /// Every key starting with `prefix`, sorted, with its file.
    fn list(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, PathBuf)>, StoreError> {
        let hp = hex::encode(prefix);
        let mut out = Vec::new();
        let shards = match fs::read_dir(&self.records) {
            Ok(s) => s,
            Err(e) => return Err(io("list", &self.records, e)),
        };
        for shard in shards {
            let shard = shard.map_err(|e| io("list", &self.records, e))?;
            let name = shard.file_name().to_string_lossy().into_owned();
            let Some(sh) = name.strip_prefix('s') else {
                continue;
            };
            if !(sh.starts_with(&hp) || hp.starts_with(sh)) {
                continue;
            }
            walk(&shard.path(), sh.to_owned(), &hp, &mut out)?;
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter()
            .map(|(h, p)| {
                hex::decode(&h)
                    .map(|k| (k, p))
                    .map_err(|_| StoreError::Corrupt(format!("bad record name {h}")))
            })
            .collect()
    }

    fn put_file(
        &self,
        key: &[u8],
        value: &[u8],
        dirs: &mut BTreeSet<PathBuf>,
    ) -> Result<(), StoreError> {
        let p = record_path(&self.records, key);
        let parent = p.parent().expect("records/… has a parent").to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| io("create", &parent, e))?;
        let name = p.file_name().expect("file name").to_string_lossy();
        let tmp = parent.join(format!("t{}", &name[1..]));
        let mut f = File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
        f.write_all(value).map_err(|e| io("write", &tmp, e))?;
        f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
        fs::rename(&tmp, &p).map_err(|e| io("rename", &p, e))?;
        let mut d = parent;
        while d != self.records {
            dirs.insert(d.clone());
            if !d.pop() {
                break;
            }
        }
        Ok(())
    }

    fn remove_file(&self, p: &Path, dirs: &mut BTreeSet<PathBuf>) -> Result<(), StoreError> {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("remove", p, e)),
        }
        if let Some(parent) = p.parent() {
            dirs.insert(parent.to_path_buf());
        }
        Ok(())
    }

    /// Apply a batch's operations in order (the caller holds the write lock, or is `open`).
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut dirs = BTreeSet::new();
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { key, value } => self.put_file(&key, &value, &mut dirs)?,
                WriteOp::Delete { key } => {
                    self.remove_file(&record_path(&self.records, &key), &mut dirs)?
                }
                WriteOp::DeletePrefix { prefix } => {
                    for (_, p) in self.list(&prefix)? {
                        self.remove_file(&p, &mut dirs)?;
                    }
                }
            }
        }
        // Deepest first: prune directories left empty, then make every change durable.
        for d in dirs.iter().rev() {
            if fs::remove_dir(d).is_ok() {
                continue; // was empty; its parent is in the set too
            }
            if d.exists() {
                sync_dir(d)?;
            }
        }
        sync_dir(&self.records)
    }
}

fn walk(
    dir: &Path,
    hex_so_far: String,
    hp: &str,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        // Removed by a prune between listing and walking: nothing there.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("list", dir, e)),
    };
    for e in entries {
        let e = e.map_err(|e| io("list", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(chunk) = name.strip_prefix('k') {
            let full = format!("{hex_so_far}{chunk}");
            if full.starts_with(hp) {
                out.push((full, e.path()));
            }
        } else if let Some(chunk) = name.strip_prefix('d') {
            let full = format!("{hex_so_far}{chunk}");
            if full.starts_with(hp) || hp.starts_with(&full) {
                walk(&e.path(), full, hp, out)?;
            }
        }
    }
    Ok(())
}

impl IndexStore for FsStore {
    fn backend(&self) -> &str {
        "filesystem"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let _r = self.view.read();
        self.read(key)
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let _r = self.view.read();
        keys.iter().map(|k| self.read(k)).collect()
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let _r = self.view.read();
        self.list(prefix)?
            .into_iter()
            .map(|(k, p)| {
                let v = fs::read(&p).map_err(|e| io("read", &p, e))?;
                Ok((k, v))
            })
            .collect()
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let _r = self.view.read();
        Ok(self.list(prefix)?.into_iter().map(|(k, _)| k).collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut seq = self.writer.lock();
        let tmp = self.journal.join(format!("{:020}.tmp", *seq));
        let log = self.journal.join(format!("{:020}.log", *seq));
        {
            let mut f = File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
            f.write_all(&codec::encode_batch(&batch))
                .map_err(|e| io("write", &tmp, e))?;
            f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
        }
        fs::rename(&tmp, &log).map_err(|e| io("rename", &log, e))?;
        sync_dir(&self.journal)?;
        *seq += 1;
        // Committed: from here the batch survives a crash (replayed at open).
        {
            let _w = self.view.write();
            self.apply(batch)?;
        }
        fs::remove_file(&log).map_err(|e| io("remove", &log, e))?;
        sync_dir(&self.journal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealdb_plugin_api::conformance;
    use std::sync::Arc;

    #[test]
    fn conforms_to_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        conformance::run_all(&move || Arc::new(FsStore::open(&p).unwrap()));
    }

    #[test]
    fn long_keys_nest_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).unwrap();
        let mut keys: Vec<Vec<u8>> = (0..6)
            .map(|i| {
                let mut k = vec![b'M'];
                k.extend(std::iter::repeat_n(b'x', 100 * i + 50));
                k
            })
            .collect();
        keys.push(vec![b'M', b'x']);
        let mut b = WriteBatch::new();
        for k in &keys {
            b.put(k.clone(), k.len().to_le_bytes().to_vec());
        }
        s.write(b).unwrap();
        keys.sort();
        assert_eq!(s.scan_keys(b"M").unwrap(), keys);
        assert_eq!(
            s.get(&keys[5]).unwrap(),
            Some(keys[5].len().to_le_bytes().to_vec())
        );
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = FsStore::open(dir.path()).unwrap();
        assert!(matches!(
            FsStore::open(dir.path()),
            Err(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn a_committed_journal_is_applied_at_open_and_a_torn_one_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FsStore::open(dir.path()).unwrap();
            let mut b = WriteBatch::new();
            b.put("a", "old").put("b", "gone");
            s.write(b).unwrap();
        }
        // A batch that was committed but not applied (a crash right after the rename), and
        // one that never reached its commit point.
        let mut b = WriteBatch::new();
        b.put("a", "new").delete("b").put("c", "3");
        fs::write(
            dir.path().join("journal/00000000000000000007.log"),
            codec::encode_batch(&b),
        )
        .unwrap();
        let mut t = WriteBatch::new();
        t.put("torn", "x");
        let enc = codec::encode_batch(&t);
        fs::write(
            dir.path().join("journal/00000000000000000008.tmp"),
            &enc[..enc.len() / 2],
        )
        .unwrap();
        let s = FsStore::open(dir.path()).unwrap();
        assert_eq!(
            s.scan_prefix(b"").unwrap(),
            vec![
                (b"a".to_vec(), b"new".to_vec()),
                (b"c".to_vec(), b"3".to_vec())
            ]
        );
        assert_eq!(fs::read_dir(dir.path().join("journal")).unwrap().count(), 0);
        // The next batch gets a later sequence number than the replayed one.
        assert_eq!(*s.writer.lock(), 8);
    }

    /// Crash consistency with a real kill: a child process (this test binary again) writes
    /// batches until it is SIGKILLed; every acknowledged batch must be whole after reopen.
    #[test]
    fn kill_during_writes_loses_nothing_acknowledged() {
        if let Ok(dir) = std::env::var("SEALDB_FS_CRASH_CHILD") {
            let s = FsStore::open(Path::new(&dir)).unwrap();
            conformance::crash_writer(&s);
        }
        let dir = tempfile::tempdir().unwrap();
        for round in 0..3 {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "tests::kill_during_writes_loses_nothing_acknowledged",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("SEALDB_FS_CRASH_CHILD", dir.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300 + 150 * round));
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            let acked = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("acked ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
                .max();
            let s = FsStore::open(dir.path()).unwrap();
            conformance::crash_verify(&s, acked);
        }
    }
}
