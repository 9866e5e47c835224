//! The write-ahead log in front of redb.
//!
//! A committed batch is one record appended to the active log segment (and, in
//! [`Durability::Sync`], made durable with `fdatasync`). Its keys then point into that
//! segment from an in-memory overlay, so readers see the batch at once. A background
//! checkpointer moves whole segments into redb in one durable transaction each and then
//! deletes them. redb's own commit cost (copy-on-write pages, checksums, its fsync) is thus
//! paid off the request path, once per segment instead of once per batch.
//!
//! On open, any segment left by a crash is replayed into redb before the store serves
//! requests. Replaying a segment that was already checkpointed is harmless: the records are
//! replayed in order, so every key ends with the value it had after the segment's last record.
//!
//! # Segment format (all integers little-endian)
//! ```text
//! file    := magic "SDBWAL1\n" (8 bytes) || record*
//! record  := len u32 || crc32 u32 (of payload) || payload (len bytes)
//! payload := seq u64 || n_ops u32 || op*
//! op      := 0x01 || key_len u32 || key || value_len u32 || value    (put)
//!          | 0x02 || key_len u32 || key                              (delete)
//! ```
//! `seq` counts records across segments. Reading a segment stops at the first record that is
//! short, fails its CRC or breaks the sequence: a torn tail is a record whose append never
//! returned, so it was never acknowledged.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use redb::{Database, ReadableDatabase};
use sealdb_plugin_api::store::prefix_upper_bound;
use sealdb_plugin_api::{StoreError, WriteOp};

use crate::{io, RECORDS};

const MAGIC: &[u8; 8] = b"SDBWAL1\n";
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
/// Bytes per redb transaction while checkpointing (bounds redb's in-memory dirty pages).
const CHECKPOINT_TX_BYTES: usize = 32 << 20;
/// Frozen segments waiting for the checkpointer before writers wait for it.
const MAX_FROZEN: usize = 2;

/// When an acknowledged write is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` before `write` returns: the batch survives power loss.
    Sync,
    /// The batch is in the operating system's page cache when `write` returns: it survives
    /// a crash of the server process, but power loss or a kernel crash may lose the last
    /// seconds of writes (the class of RocksDB's default, which the original service uses).
    Relaxed,
}

/// Tuning of the log.
#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    pub durability: Durability,
    /// A segment is handed to the checkpointer once it holds this many bytes...
    pub segment_bytes: u64,
    /// ...or this many distinct keys (bounds the overlay's memory).
    pub segment_keys: usize,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            segment_bytes: 64 << 20,
            segment_keys: 200_000,
        }
    }
}

/// Where the newest value of a key lives inside a segment file.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Value { off: u64, len: u32 },
    Gone,
}

/// One log segment: its file and the newest slot of every key it wrote.
struct Segment {
    /// Whether the file was a spare (overwritten in place) rather than newly created.
    recycled: bool,
    path: PathBuf,
    file: Arc<File>,
    map: BTreeMap<Vec<u8>, Slot>,
}

impl Segment {
    fn read(&self, slot: Slot) -> Result<Option<Vec<u8>>, StoreError> {
        read_slot(&self.file, slot)
    }
}

fn read_slot(file: &File, slot: Slot) -> Result<Option<Vec<u8>>, StoreError> {
    match slot {
        Slot::Gone => Ok(None),
        Slot::Value { off, len } => {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, off).map_err(io)?;
            Ok(Some(buf))
        }
    }
}

/// What readers consult before redb: the active segment, then frozen ones newest first.
struct View {
    active: Segment,
    /// Oldest first; the checkpointer drains from the front.
    frozen: VecDeque<Arc<Segment>>,
}

/// Writer-side state of the active segment.
struct Tail {
    /// Bytes written to the active segment.
    len: u64,
    next_seq: u64,
    /// Set when a failed append could not be rolled back: the log may hold a partial record,
    /// so no later record may be appended behind it.
    poisoned: Option<String>,
}

struct Checkpoint {
    shutdown: bool,
    /// Stop at once, leaving pending segments on disk (tests simulate a crash with it).
    halt: bool,
    /// The last checkpoint failure, cleared by the next success.
    error: Option<String>,
}

pub(crate) struct Wal {
    db: Arc<Database>,
    dir: PathBuf,
    opts: WalOptions,
    tail: Mutex<Tail>,
    view: RwLock<View>,
    ckpt: Mutex<Checkpoint>,
    cv: Condvar,
    /// Set by a writer whose active segment is being appended to (not recycled): the
    /// checkpointer then prepares a spare, and the writer switches to it early.
    spare_wanted: AtomicBool,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("a store thread panicked".into())
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016x}.log"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

impl Wal {
    /// Replay leftover segments into `db`, then start a fresh segment.
    pub(crate) fn open(
        db: Arc<Database>,
        dir: &Path,
        opts: WalOptions,
    ) -> Result<Self, StoreError> {
        let next_seq = recover(&db, dir)?;
        let active = new_segment(dir, next_seq)?;
        Ok(Self {
            db,
            dir: dir.to_owned(),
            opts,
            tail: Mutex::new(Tail {
                len: MAGIC.len() as u64,
                next_seq,
                poisoned: None,
            }),
            view: RwLock::new(View {
                active,
                frozen: VecDeque::new(),
            }),
            ckpt: Mutex::new(Checkpoint {
                shutdown: false,
                halt: false,
                error: None,
            }),
            cv: Condvar::new(),
            spare_wanted: AtomicBool::new(false),
        })
    }

    /// Newest value of `key`: the overlay if it knows the key, redb otherwise.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let (hit, tx) = {
            let v = self.view.read().map_err(poisoned)?;
            let hit = std::iter::once(&v.active)
                .chain(v.frozen.iter().rev().map(|s| s.as_ref()))
                .find_map(|s| s.map.get(key).map(|slot| (s.file.clone(), *slot)));
            // A redb snapshot taken while the view is locked holds nothing newer than the
            // view (segments leave the view only after their checkpoint committed).
            let tx = match hit {
                Some(_) => None,
                None => Some(self.db.begin_read().map_err(io)?),
            };
            (hit, tx)
        };
        match (hit, tx) {
            (Some((file, slot)), _) => read_slot(&file, slot),
            (None, Some(tx)) => {
                let t = tx.open_table(RECORDS).map_err(io)?;
                Ok(t.get(key).map_err(io)?.map(|v| v.value().to_vec()))
            }
            (None, None) => Ok(None),
        }
    }

    /// Newest values of `keys`: one look at the overlay and one redb read transaction for all
    /// of them (a transaction per key costs more than the lookup itself).
    pub(crate) fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        type Hit = Option<(Arc<File>, Slot)>;
        let (hits, tx) = {
            let v = self.view.read().map_err(poisoned)?;
            let hits: Vec<Hit> = keys
                .iter()
                .map(|key| {
                    std::iter::once(&v.active)
                        .chain(v.frozen.iter().rev().map(|s| s.as_ref()))
                        .find_map(|s| s.map.get(key).map(|slot| (s.file.clone(), *slot)))
                })
                .collect();
            let tx = if hits.iter().any(Option::is_none) {
                Some(self.db.begin_read().map_err(io)?)
            } else {
                None
            };
            (hits, tx)
        };
        let table = match &tx {
            Some(tx) => Some(tx.open_table(RECORDS).map_err(io)?),
            None => None,
        };
        keys.iter()
            .zip(hits)
            .map(|(key, hit)| match (hit, &table) {
                (Some((file, slot)), _) => read_slot(&file, slot),
                (None, Some(t)) => Ok(t
                    .get(key.as_slice())
                    .map_err(io)?
                    .map(|v| v.value().to_vec())),
                (None, None) => Ok(None),
            })
            .collect()
    }

    /// Every live key under `prefix` with its value (when `values`), ascending.
    pub(crate) fn scan(&self, prefix: &[u8], values: bool) -> Result<Vec<ScanEntry>, StoreError> {
        let upper = prefix_upper_bound(prefix);
        let in_range = |k: &Vec<u8>| upper.as_ref().is_none_or(|u| k < u);
        // Layers oldest first, so that newer ones overwrite.
        let (layers, tx) = {
            let v = self.view.read().map_err(poisoned)?;
            let mut layers = Vec::with_capacity(v.frozen.len() + 1);
            for s in v.frozen.iter().map(|s| s.as_ref()).chain([&v.active]) {
                let entries: Vec<(Vec<u8>, Slot)> = s
                    .map
                    .range(prefix.to_vec()..)
                    .take_while(|(k, _)| in_range(k))
                    .map(|(k, slot)| (k.clone(), *slot))
                    .collect();
                if !entries.is_empty() {
                    layers.push((s.file.clone(), entries));
                }
            }
            (layers, self.db.begin_read().map_err(io)?)
        };
        let mut out: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        {
            let t = tx.open_table(RECORDS).map_err(io)?;
            let iter = match &upper {
                Some(end) => t.range::<&[u8]>(prefix..end.as_slice()),
                None => t.range::<&[u8]>(prefix..),
            }
            .map_err(io)?;
            for e in iter {
                let (k, v) = e.map_err(io)?;
                out.insert(k.value().to_vec(), values.then(|| v.value().to_vec()));
            }
        }
        for (file, entries) in layers {
            for (k, slot) in entries {
                match slot {
                    Slot::Gone => {
                        out.remove(&k);
                    }
                    Slot::Value { .. } if !values => {
                        out.insert(k, None);
                    }
                    Slot::Value { .. } => {
                        out.insert(k, read_slot(&file, slot)?);
                    }
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Append `ops` as one record, then publish them to readers.
    pub(crate) fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let mut tail = self.tail.lock().map_err(poisoned)?;
        if let Some(why) = &tail.poisoned {
            return Err(StoreError::Unavailable(why.clone()));
        }
        let ops = self.expand_prefix_deletes(ops)?;
        let seq = tail.next_seq;
        let start = tail.len;
        let file = self.view.read().map_err(poisoned)?.active.file.clone();
        let appended = emit(seq, &ops, start, |off, b| file.write_all_at(b, off)).and_then(|r| {
            if self.opts.durability == Durability::Sync {
                file.sync_data()?;
            }
            Ok(r)
        });
        let (record_len, slots) = match appended {
            Ok(r) => r,
            Err(e) => {
                // Cut the log back so that no later record lands behind a partial one.
                if let Err(e2) = file.set_len(start) {
                    tail.poisoned = Some(format!(
                        "write-ahead log append failed ({e}) and could not be rolled back ({e2}); restart the server"
                    ));
                }
                return Err(io(e));
            }
        };
        tail.len += record_len;
        tail.next_seq += 1;
        let mut want_spare = false;
        let rotate = {
            let mut v = self.view.write().map_err(poisoned)?;
            for (key, slot) in slots {
                v.active.map.insert(key, slot);
            }
            let full =
                tail.len >= self.opts.segment_bytes || v.active.map.len() >= self.opts.segment_keys;
            // A store appending to a new file: once it holds more than a trickle (1/256 of a
            // segment), get a preallocated file ready and move over to it. Tiny stores never
            // pay for a spare; a real load waits for it for a few batches at most.
            let early = !v.active.recycled && tail.len >= self.opts.segment_bytes / 256 && {
                if self.dir.join(SPARE).exists() {
                    true
                } else {
                    want_spare = !self.spare_wanted.swap(true, Ordering::AcqRel);
                    false
                }
            };
            full || early
        };
        // Lock order is checkpoint state, then view: wake only after the view lock is gone.
        if want_spare {
            self.wake();
        }
        if rotate {
            // The batch is already durable and visible: a failed rotation must not fail it.
            // The active segment simply keeps growing and the next write tries again.
            let _ = self.rotate(&mut tail);
        }
        Ok(())
    }

    /// `DeletePrefix` becomes one delete per key it covers at this point of the batch, so
    /// that the log and the overlay only know puts and deletes. Runs under the tail lock: no
    /// other writer can add keys meanwhile.
    fn expand_prefix_deletes(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOp>, StoreError> {
        if !ops
            .iter()
            .any(|o| matches!(o, WriteOp::DeletePrefix { .. }))
        {
            return Ok(ops);
        }
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                WriteOp::DeletePrefix { prefix } => {
                    let mut keys: Vec<Vec<u8>> = self
                        .scan(&prefix, false)?
                        .into_iter()
                        .map(|(k, _)| k)
                        .collect();
                    // Keys put earlier in this same batch.
                    keys.extend(out.iter().filter_map(|o| match o {
                        WriteOp::Put { key, .. } if key.starts_with(&prefix) => Some(key.clone()),
                        _ => None,
                    }));
                    keys.sort();
                    keys.dedup();
                    out.extend(keys.into_iter().map(|key| WriteOp::Delete { key }));
                }
                other => out.push(other),
            }
        }
        Ok(out)
    }

    /// Freeze the active segment, start a new one and wake the checkpointer. Waits while
    /// too many frozen segments are pending, which bounds the log's size on disk.
    fn rotate(&self, tail: &mut Tail) -> Result<(), StoreError> {
        {
            let mut c = self.ckpt.lock().map_err(poisoned)?;
            loop {
                let pending = self.view.read().map_err(poisoned)?.frozen.len();
                if pending < MAX_FROZEN || c.shutdown {
                    break;
                }
                if let Some(e) = &c.error {
                    return Err(StoreError::Unavailable(format!(
                        "checkpointing into redb is failing: {e}"
                    )));
                }
                c = self.cv.wait(c).map_err(poisoned)?;
            }
        }
        let fresh = new_segment(&self.dir, tail.next_seq)?;
        if self.opts.durability == Durability::Sync {
            sync_dir(&self.dir)?;
        }
        {
            let mut v = self.view.write().map_err(poisoned)?;
            let old = std::mem::replace(&mut v.active, fresh);
            v.frozen.push_back(Arc::new(old));
        }
        tail.len = MAGIC.len() as u64;
        self.wake();
        Ok(())
    }

    /// Wake the checkpointer. Taking its lock first means it is either before its check for
    /// work (and will see ours) or already waiting (and gets this notification): no lost wakeup.
    fn wake(&self) {
        drop(self.ckpt.lock());
        self.cv.notify_all();
    }

    /// Freeze whatever the active segment holds (used at shutdown).
    pub(crate) fn freeze_active(&self) -> Result<(), StoreError> {
        let mut tail = self.tail.lock().map_err(poisoned)?;
        if self.view.read().map_err(poisoned)?.active.map.is_empty() {
            return Ok(());
        }
        self.rotate(&mut tail)
    }

    /// The checkpointer's loop: move frozen segments into redb, oldest first. Returns when
    /// shut down and nothing is pending (or the pending work keeps failing at shutdown; the
    /// log then stays on disk and the next open replays it).
    pub(crate) fn run_checkpointer(&self) {
        loop {
            let next = {
                let Ok(mut c) = self.ckpt.lock() else { return };
                loop {
                    if c.halt {
                        return;
                    }
                    let front = match self.view.read() {
                        Ok(v) => v.frozen.front().cloned(),
                        Err(_) => return,
                    };
                    if front.is_some() || c.shutdown {
                        break front;
                    }
                    if self.spare_wanted.swap(false, Ordering::AcqRel) {
                        drop(c);
                        // Best effort: without a spare the next segment is simply appended.
                        let _ = prepare_spare(&self.dir, self.opts.segment_bytes + (1 << 20));
                        c = match self.ckpt.lock() {
                            Ok(c) => c,
                            Err(_) => return,
                        };
                        continue;
                    }
                    c = match self.cv.wait(c) {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                }
            };
            let Some(seg) = next else { return };
            match self.checkpoint(&seg) {
                Ok(()) => {
                    if let Ok(mut v) = self.view.write() {
                        v.frozen.pop_front();
                    }
                    // The data is in redb: keep the file as the spare, or drop it. A reader
                    // that found a value here before the segment left the view may still be
                    // reading it through its own handle: then the file must not be reused
                    // (unlinking keeps its bytes for that reader; overwriting would not).
                    // No new reader can get a handle now that the view no longer lists it.
                    let in_use = Arc::strong_count(&seg.file) > 1;
                    if in_use
                        || self.dir.join(SPARE).exists()
                        || std::fs::rename(&seg.path, self.dir.join(SPARE)).is_err()
                    {
                        let _ = std::fs::remove_file(&seg.path);
                    }
                    if let Ok(mut c) = self.ckpt.lock() {
                        c.error = None;
                    }
                    self.cv.notify_all();
                }
                Err(e) => {
                    let shutdown = match self.ckpt.lock() {
                        Ok(mut c) => {
                            c.error = Some(e.to_string());
                            c.shutdown
                        }
                        Err(_) => return,
                    };
                    self.cv.notify_all();
                    if shutdown {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
    }

    /// Copy a segment into redb. redb holds a transaction's pages in memory until a durable
    /// commit, so the copy is split into durable commits of about [`CHECKPOINT_TX_BYTES`]. A
    /// crash in between leaves part of the segment in redb; the segment is still on disk and
    /// is replayed whole, which is harmless.
    fn checkpoint(&self, seg: &Segment) -> Result<(), StoreError> {
        let mut entries = seg.map.iter().peekable();
        while entries.peek().is_some() {
            let tx = self.db.begin_write().map_err(io)?;
            let mut bytes = 0usize;
            {
                let mut t = tx.open_table(RECORDS).map_err(io)?;
                while bytes < CHECKPOINT_TX_BYTES {
                    let Some((key, slot)) = entries.next() else {
                        break;
                    };
                    match seg.read(*slot)? {
                        Some(v) => {
                            bytes += key.len() + v.len();
                            t.insert(key.as_slice(), v.as_slice()).map_err(io)?;
                        }
                        None => {
                            bytes += key.len();
                            t.remove(key.as_slice()).map_err(io)?;
                        }
                    }
                }
            }
            tx.commit().map_err(io)?;
        }
        Ok(())
    }

    /// Ask the checkpointer to finish; with `halt` it stops without draining.
    pub(crate) fn shutdown(&self, halt: bool) {
        if let Ok(mut c) = self.ckpt.lock() {
            c.shutdown = true;
            c.halt = halt;
        }
        self.cv.notify_all();
    }
}

/// A checkpointed segment kept for reuse, or a zero-filled one made ahead of need.
/// Overwriting allocated blocks lets `fdatasync` skip the file-system metadata that an append
/// must flush (about half its cost here). Old records in it never replay: their sequence
/// numbers do not continue the new segment's.
const SPARE: &str = "wal-spare.log";
const SPARE_TMP: &str = "wal-spare.tmp";

fn new_segment(dir: &Path, seq: u64) -> Result<Segment, StoreError> {
    let path = segment_path(dir, seq);
    let recycled = std::fs::rename(dir.join(SPARE), &path).is_ok();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(!recycled)
        .open(&path)
        .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", path.display())))?;
    file.write_all_at(MAGIC, 0).map_err(io)?;
    Ok(Segment {
        recycled,
        path,
        file: Arc::new(file),
        map: BTreeMap::new(),
    })
}

/// Make a zero-filled spare segment if there is none.
fn prepare_spare(dir: &Path, bytes: u64) -> Result<(), StoreError> {
    if dir.join(SPARE).exists() {
        return Ok(());
    }
    let tmp = dir.join(SPARE_TMP);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < bytes {
        let n = zeros.len().min((bytes - off) as usize);
        file.write_all_at(&zeros[..n], off).map_err(io)?;
        off += n as u64;
    }
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(SPARE)).map_err(io)
}

/// A key and where its newest value lives.
type KeySlot = (Vec<u8>, Slot);

/// Write one record through `sink(offset, bytes)`, the record starting at `start`: the
/// payload first (small pieces gathered in a staging buffer, large values passed through
/// without a copy), then the header with the payload's length and CRC. Returns where each
/// key's newest value sits in the file.
fn emit(
    seq: u64,
    ops: &[WriteOp],
    start: u64,
    mut sink: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<(u64, Vec<KeySlot>)> {
    const STAGE: usize = 256 << 10;
    struct Out<F> {
        sink: F,
        stage: Vec<u8>,
        stage_at: u64,
        pos: u64,
        crc: crc32fast::Hasher,
    }
    impl<F: FnMut(u64, &[u8]) -> std::io::Result<()>> Out<F> {
        fn flush(&mut self) -> std::io::Result<()> {
            if !self.stage.is_empty() {
                (self.sink)(self.stage_at, &self.stage)?;
                self.stage.clear();
            }
            self.stage_at = self.pos;
            Ok(())
        }
        fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
            self.crc.update(b);
            if b.len() >= STAGE / 4 {
                self.flush()?;
                (self.sink)(self.pos, b)?;
                self.pos += b.len() as u64;
                self.stage_at = self.pos;
                return Ok(());
            }
            self.stage.extend_from_slice(b);
            self.pos += b.len() as u64;
            if self.stage.len() >= STAGE {
                self.flush()?;
            }
            Ok(())
        }
    }
    let mut out = Out {
        sink: &mut sink,
        stage: Vec::with_capacity(STAGE),
        stage_at: start + 8,
        pos: start + 8,
        crc: crc32fast::Hasher::new(),
    };
    out.put(&seq.to_le_bytes())?;
    out.put(&(ops.len() as u32).to_le_bytes())?;
    let mut slots = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            WriteOp::Put { key, value } => {
                out.put(&[OP_PUT])?;
                out.put(&(key.len() as u32).to_le_bytes())?;
                out.put(key)?;
                out.put(&(value.len() as u32).to_le_bytes())?;
                let off = out.pos;
                out.put(value)?;
                let len = value.len() as u32;
                slots.push((key.clone(), Slot::Value { off, len }));
            }
            WriteOp::Delete { key } => {
                out.put(&[OP_DELETE])?;
                out.put(&(key.len() as u32).to_le_bytes())?;
                out.put(key)?;
                slots.push((key.clone(), Slot::Gone));
            }
            // Expanded by the writer before encoding.
            WriteOp::DeletePrefix { .. } => {}
        }
    }
    out.flush()?;
    let end = out.pos;
    let mut header = [0u8; 8];
    header[0..4].copy_from_slice(&((end - start - 8) as u32).to_le_bytes());
    header[4..8].copy_from_slice(&out.crc.finalize().to_le_bytes());
    sink(start, &header)?;
    Ok((end - start, slots))
}

/// The whole record as bytes (tests).
#[cfg(test)]
fn encode(seq: u64, ops: &[WriteOp], start: u64) -> (Vec<u8>, Vec<KeySlot>) {
    let mut buf = Vec::new();
    let (_, slots) = emit(seq, ops, start, |off, b| {
        let at = (off - start) as usize;
        if buf.len() < at + b.len() {
            buf.resize(at + b.len(), 0);
        }
        buf[at..at + b.len()].copy_from_slice(b);
        Ok(())
    })
    .expect("writing to memory cannot fail");
    (buf, slots)
}

/// A key and, when values were asked for, its value.
pub(crate) type ScanEntry = (Vec<u8>, Option<Vec<u8>>);

/// One decoded op: put (`Some(value)`) or delete (`None`).
type Op<'a> = (&'a [u8], Option<&'a [u8]>);

/// Decode the records of one segment, stopping at a torn or foreign tail. Returns the ops
/// of each record in order and the sequence number after the last record.
fn decode_segment(buf: &[u8], mut seq: Option<u64>) -> (Vec<Vec<Op<'_>>>, Option<u64>) {
    let mut records = Vec::new();
    if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
        return (records, seq);
    }
    let mut pos = MAGIC.len();
    while let Some(header) = buf.get(pos..pos + 8) {
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
        let Some(payload) = buf.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some((rec_seq, ops)) = decode_payload(payload) else {
            break;
        };
        if seq.is_some_and(|s| s != rec_seq) {
            break;
        }
        seq = Some(rec_seq + 1);
        records.push(ops);
        pos += 8 + len;
    }
    (records, seq)
}

fn decode_payload(p: &[u8]) -> Option<(u64, Vec<Op<'_>>)> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = p.get(pos..pos + n)?;
        pos += n;
        Some(s)
    };
    let seq = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut ops = Vec::with_capacity(n.min(p.len() / 5));
    for _ in 0..n {
        let tag = take(1)?[0];
        let klen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let key = take(klen)?;
        match tag {
            OP_PUT => {
                let vlen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                ops.push((key, Some(take(vlen)?)));
            }
            OP_DELETE => ops.push((key, None)),
            _ => return None,
        }
    }
    Some((seq, ops))
}

/// Replay every segment in `dir` into `db` (one durable transaction per segment) and delete
/// it. Returns the sequence number for the next record.
fn recover(db: &Database, dir: &Path) -> Result<u64, StoreError> {
    let mut segs: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(hex) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        {
            if let Ok(seq) = u64::from_str_radix(hex, 16) {
                segs.push((seq, path));
            }
        }
    }
    segs.sort();
    let _ = std::fs::remove_file(dir.join(SPARE_TMP));
    let mut next: Option<u64> = None;
    for (name_seq, path) in &segs {
        let buf = std::fs::read(path).map_err(io)?;
        let (records, after) = decode_segment(&buf, next.or(Some(*name_seq)));
        if !records.is_empty() {
            let tx = db.begin_write().map_err(io)?;
            {
                let mut t = tx.open_table(RECORDS).map_err(io)?;
                for ops in &records {
                    for (key, value) in ops {
                        match value {
                            Some(v) => {
                                t.insert(*key, *v).map_err(io)?;
                            }
                            None => {
                                t.remove(*key).map_err(io)?;
                            }
                        }
                    }
                }
            }
            tx.commit().map_err(io)?;
        }
        next = after.or(next);
    }
    for (_, path) in &segs {
        std::fs::remove_file(path).map_err(io)?;
    }
    if !segs.is_empty() {
        sync_dir(dir)?;
    }
    Ok(next.unwrap_or(0))
}

#[cfg(test)]
pub(crate) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("wal-") && n.ends_with(".log") && n != SPARE
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_stop_at_a_torn_tail() {
        let ops = vec![
            WriteOp::Put {
                key: b"k1".to_vec(),
                value: b"v1".to_vec(),
            },
            WriteOp::Delete {
                key: b"k2".to_vec(),
            },
        ];
        let mut file = MAGIC.to_vec();
        let (r1, slots) = encode(7, &ops, file.len() as u64);
        match slots[0].1 {
            Slot::Value { off, len } => {
                assert_eq!(&r1[(off as usize - 8)..][..len as usize], b"v1");
            }
            Slot::Gone => panic!("put decoded as delete"),
        }
        file.extend_from_slice(&r1);
        let (r2, _) = encode(8, &ops[..1], file.len() as u64);
        file.extend_from_slice(&r2);
        let (recs, next) = decode_segment(&file, Some(7));
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0],
            vec![(&b"k1"[..], Some(&b"v1"[..])), (&b"k2"[..], None)]
        );
        assert_eq!(next, Some(9));
        // Cut inside the second record: only the first survives.
        let (recs, next) = decode_segment(&file[..file.len() - 3], Some(7));
        assert_eq!((recs.len(), next), (1, Some(8)));
        // A flipped payload bit fails the CRC.
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode_segment(&bad, Some(7)).0.len(), 1);
        // A record from another sequence (a stale file) is not replayed.
        assert_eq!(decode_segment(&file, Some(3)).0.len(), 0);
    }
}
