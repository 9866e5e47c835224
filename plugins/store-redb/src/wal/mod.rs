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
//! Keys live in the main redb file or in the file of their group ([`crate::files`]); a
//! prefix delete that covers whole groups is logged as one drop per group, which the
//! checkpointer carries out by deleting the group's file.
//!
//! The segment format is in [`record`]. `seq` counts records across segments. Reading a segment stops at the first record that is
//! short, fails its CRC or breaks the sequence: a torn tail is a record whose append never
//! returned, so it was never acknowledged.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use redb::ReadOnlyTable;
use sealdb_plugin_api::store::prefix_upper_bound;
use sealdb_plugin_api::{StoreError, WriteOp};

use crate::files::{sync_dir, Files, Snapshot};
use crate::{io, Grouping, RECORDS};

mod record;
use record::{decode_segment, emit, Change, Op, Slot, MAGIC};
/// Bytes per redb transaction while checkpointing (bounds redb's in-memory dirty pages).
const CHECKPOINT_TX_BYTES: usize = 32 << 20;
/// The file a key is in: its group's (by prefix), or the main file (`None`).
type Route<'k> = Option<&'k [u8]>;
/// The records table of one file, open for reading.
type Records = ReadOnlyTable<&'static [u8], &'static [u8]>;

/// A key and, when values were asked for, its value.
pub(crate) type ScanEntry = (Vec<u8>, Option<Vec<u8>>);

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
    /// Which keys get a file of their own, for a store created with these options (an
    /// existing store keeps the grouping it was created with; see [`crate::files`]).
    pub grouping: Grouping,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            segment_bytes: 64 << 20,
            segment_keys: 200_000,
            grouping: Grouping::NONE,
        }
    }
}

/// One log segment: its file and the newest slot of every key it wrote.
struct Segment {
    /// Whether the file was a spare (overwritten in place) rather than newly created.
    recycled: bool,
    path: PathBuf,
    file: Arc<File>,
    map: BTreeMap<Vec<u8>, Slot>,
    /// Groups dropped in this segment. A drop removes the group's earlier keys from `map`,
    /// so every key of a dropped group still in `map` was written after the drop.
    dropped: BTreeSet<Vec<u8>>,
}

impl Segment {
    /// What this segment says of `key` (in `group`): its newest slot, gone when its group
    /// was dropped here, or nothing (look further back).
    fn find(&self, key: &[u8], group: Option<&[u8]>) -> Option<Slot> {
        if let Some(slot) = self.map.get(key) {
            return Some(*slot);
        }
        group
            .filter(|g| self.dropped.contains(*g))
            .map(|_| Slot::Gone)
    }

    /// Replay a record's changes into the overlay, in order.
    fn apply(&mut self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Key(key, slot) => {
                    self.map.insert(key, slot);
                }
                Change::Drop(group) => {
                    let stale: Vec<Vec<u8>> = self
                        .map
                        .range(group.clone()..)
                        .take_while(|(k, _)| k.starts_with(&group))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in stale {
                        self.map.remove(&k);
                    }
                    self.dropped.insert(group);
                }
            }
        }
    }

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
    files: Arc<Files>,
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

impl Wal {
    /// Replay leftover segments into the files, then start a fresh segment.
    pub(crate) fn open(
        files: Arc<Files>,
        dir: &Path,
        opts: WalOptions,
    ) -> Result<Self, StoreError> {
        let next_seq = recover(&files, dir)?;
        let active = new_segment(dir, next_seq)?;
        Ok(Self {
            files,
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
        let group = self.files.layout.group_of(key);
        let (hit, tx) = {
            let v = self.view.read().map_err(poisoned)?;
            let hit = std::iter::once(&v.active)
                .chain(v.frozen.iter().rev().map(|s| s.as_ref()))
                .find_map(|s| s.find(key, group).map(|slot| (s.file.clone(), slot)));
            // A redb snapshot taken while the view is locked holds nothing newer than the
            // view (segments leave the view only after their checkpoint committed).
            let tx = match (&hit, self.files.db_for(key)?) {
                (None, Some(db)) => Some(Snapshot::of(db)?),
                _ => None,
            };
            (hit, tx)
        };
        match (hit, tx) {
            (Some((file, slot)), _) => read_slot(&file, slot),
            (None, Some(tx)) => {
                let t = tx.records()?;
                Ok(t.get(key).map_err(io)?.map(|v| v.value().to_vec()))
            }
            (None, None) => Ok(None),
        }
    }

    /// Newest values of `keys`: one look at the overlay and one redb read transaction per
    /// file for all of them (a transaction per key costs more than the lookup itself).
    pub(crate) fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        type Hit = Option<(Arc<File>, Slot)>;
        let layout = &self.files.layout;
        let (hits, txs) = {
            let v = self.view.read().map_err(poisoned)?;
            let hits: Vec<Hit> = keys
                .iter()
                .map(|key| {
                    let group = layout.group_of(key);
                    std::iter::once(&v.active)
                        .chain(v.frozen.iter().rev().map(|s| s.as_ref()))
                        .find_map(|s| s.find(key, group).map(|slot| (s.file.clone(), slot)))
                })
                .collect();
            let mut txs = BTreeMap::new();
            for (key, _) in keys.iter().zip(&hits).filter(|(_, h)| h.is_none()) {
                let route = layout.group_of(key);
                if let std::collections::btree_map::Entry::Vacant(e) = txs.entry(route) {
                    e.insert(match self.files.db_for(key)? {
                        Some(db) => Some(Snapshot::of(db)?),
                        None => None,
                    });
                }
            }
            (hits, txs)
        };
        let mut tables: BTreeMap<Route<'_>, Records> = BTreeMap::new();
        for (route, tx) in &txs {
            if let Some(tx) = tx {
                tables.insert(*route, tx.records()?);
            }
        }
        keys.iter()
            .zip(hits)
            .map(|(key, hit)| match hit {
                Some((file, slot)) => read_slot(&file, slot),
                None => match tables.get(&layout.group_of(key)) {
                    Some(t) => Ok(t
                        .get(key.as_slice())
                        .map_err(io)?
                        .map(|v| v.value().to_vec())),
                    None => Ok(None),
                },
            })
            .collect()
    }

    /// Every live key under `prefix` with its value (when `values`), ascending.
    pub(crate) fn scan(&self, prefix: &[u8], values: bool) -> Result<Vec<ScanEntry>, StoreError> {
        self.scan_except(prefix, values, None)
    }

    /// [`scan`](Self::scan), leaving out every group whose prefix starts with `skip`.
    fn scan_except(
        &self,
        prefix: &[u8],
        values: bool,
        skip: Option<&[u8]>,
    ) -> Result<Vec<ScanEntry>, StoreError> {
        let layout = &self.files.layout;
        let upper = prefix_upper_bound(prefix);
        let in_range = |k: &Vec<u8>| upper.as_ref().is_none_or(|u| k < u);
        let skipped =
            |g: Option<&[u8]>| matches!((g, skip), (Some(g), Some(s)) if g.starts_with(s));
        let meets = |g: &Vec<u8>| g.starts_with(prefix) || prefix.starts_with(g);
        // Layers oldest first, so that newer ones overwrite.
        type Layer = (Arc<File>, Vec<Vec<u8>>, Vec<(Vec<u8>, Slot)>);
        let (layers, txs) = {
            let v = self.view.read().map_err(poisoned)?;
            let mut layers: Vec<Layer> = Vec::with_capacity(v.frozen.len() + 1);
            for s in v.frozen.iter().map(|s| s.as_ref()).chain([&v.active]) {
                let entries: Vec<(Vec<u8>, Slot)> = s
                    .map
                    .range(prefix.to_vec()..)
                    .take_while(|(k, _)| in_range(k))
                    .filter(|(k, _)| !skipped(layout.group_of(k)))
                    .map(|(k, slot)| (k.clone(), *slot))
                    .collect();
                let drops: Vec<Vec<u8>> = s
                    .dropped
                    .iter()
                    .filter(|g| meets(g) && !skipped(Some(g)))
                    .cloned()
                    .collect();
                if !entries.is_empty() || !drops.is_empty() {
                    layers.push((s.file.clone(), drops, entries));
                }
            }
            let mut txs = vec![Snapshot::of(self.files.main.clone())?];
            for (g, db) in self.files.groups_under(prefix)? {
                if !skipped(Some(&g)) {
                    txs.push(Snapshot::of(db)?);
                }
            }
            (layers, txs)
        };
        let mut out: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for tx in txs {
            let t = tx.records()?;
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
        for (file, drops, entries) in layers {
            for g in drops {
                let gone: Vec<Vec<u8>> = out
                    .range(g.clone()..)
                    .take_while(|(k, _)| k.starts_with(&g))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in gone {
                    out.remove(&k);
                }
            }
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
        let (record_len, changes) = match appended {
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
            // A batch that drops groups hands its segment to the checkpointer at once: the
            // space of the dropped files comes back now, not once the segment fills up.
            let drops = changes.iter().any(|c| matches!(c, Change::Drop(_)));
            v.active.apply(changes);
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
            full || early || drops
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

    /// `DeletePrefix` becomes one drop per group it covers whole, and one delete per other
    /// key it covers at this point of the batch, so that the log and the overlay only know
    /// puts, deletes and drops. Runs under the tail lock: no other writer can add keys
    /// meanwhile.
    fn expand_prefix_deletes(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOp>, StoreError> {
        if !ops
            .iter()
            .any(|o| matches!(o, WriteOp::DeletePrefix { .. }))
        {
            return Ok(ops);
        }
        let layout = &self.files.layout;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let WriteOp::DeletePrefix { prefix } = op else {
                out.push(op);
                continue;
            };
            let whole = layout.covers_groups(&prefix);
            let skip = whole.then_some(prefix.as_slice());
            let in_whole_group = |k: &[u8]| whole && layout.group_of(k).is_some();
            let mut keys: Vec<Vec<u8>> = self
                .scan_except(&prefix, false, skip)?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            // Keys put earlier in this same batch.
            keys.extend(out.iter().filter_map(|o| match o {
                WriteOp::Put { key, .. } if key.starts_with(&prefix) && !in_whole_group(key) => {
                    Some(key.clone())
                }
                _ => None,
            }));
            keys.sort();
            keys.dedup();
            let groups = if whole {
                self.groups_under(&prefix, &out)?
            } else {
                BTreeSet::new()
            };
            out.extend(keys.into_iter().map(|key| WriteOp::Delete { key }));
            out.extend(
                groups
                    .into_iter()
                    .map(|prefix| WriteOp::DeletePrefix { prefix }),
            );
        }
        Ok(out)
    }

    /// Every group under `prefix` that may hold a key: those with a file, those the log
    /// wrote to, and those that `batch` (the ops before this point) puts to.
    fn groups_under(
        &self,
        prefix: &[u8],
        batch: &[WriteOp],
    ) -> Result<BTreeSet<Vec<u8>>, StoreError> {
        let layout = &self.files.layout;
        let mut groups: BTreeSet<Vec<u8>> = self
            .files
            .groups_under(prefix)?
            .into_iter()
            .map(|(g, _)| g)
            .filter(|g| g.starts_with(prefix))
            .collect();
        let v = self.view.read().map_err(poisoned)?;
        for s in std::iter::once(&v.active).chain(v.frozen.iter().map(|s| s.as_ref())) {
            // One step per group, not per key: after a group's first key, jump past it.
            let mut from = prefix.to_vec();
            while let Some((k, _)) = s.map.range(from.clone()..).next() {
                if !k.starts_with(prefix) {
                    break;
                }
                match layout.group_of(k) {
                    Some(g) => {
                        groups.insert(g.to_vec());
                        match prefix_upper_bound(g) {
                            Some(next) => from = next,
                            None => break,
                        }
                    }
                    None => {
                        from = k.clone();
                        from.push(0);
                    }
                }
            }
        }
        for op in batch {
            if let WriteOp::Put { key, .. } = op {
                if let Some(g) = layout.group_of(key).filter(|g| g.starts_with(prefix)) {
                    groups.insert(g.to_vec());
                }
            }
        }
        Ok(groups)
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
        let idle = {
            let v = self.view.read().map_err(poisoned)?;
            v.active.map.is_empty() && v.active.dropped.is_empty()
        };
        if idle {
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
                    // A segment that one large batch carried past its size is cut back first: a
                    // spare bigger than a segment only holds disk space (10M x 128: 140 MB
                    // after a training, 2.7% of the raw vectors).
                    let in_use = Arc::strong_count(&seg.file) > 1;
                    let spare_len = self.opts.segment_bytes + (1 << 20);
                    if in_use
                        || self.dir.join(SPARE).exists()
                        || seg.file.metadata().is_ok_and(|m| m.len() > spare_len)
                            && seg.file.set_len(spare_len).is_err()
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

    /// Copy a segment into redb: first delete the files of the groups it dropped, then
    /// write its keys, file by file. redb holds a transaction's pages in memory until a
    /// durable commit, so each file's share is split into durable commits of about
    /// [`CHECKPOINT_TX_BYTES`]. A crash in between leaves part of the segment in redb; the
    /// segment is still on disk and is replayed whole, which is harmless.
    fn checkpoint(&self, seg: &Segment) -> Result<(), StoreError> {
        for g in &seg.dropped {
            self.files.drop_group(g)?;
        }
        let mut routes: BTreeMap<Route<'_>, Vec<(&Vec<u8>, Slot)>> = BTreeMap::new();
        for (key, slot) in &seg.map {
            routes
                .entry(self.files.layout.group_of(key))
                .or_default()
                .push((key, *slot));
        }
        for entries in routes.values() {
            let any_put = entries.iter().any(|(_, s)| matches!(s, Slot::Value { .. }));
            let db = match any_put {
                true => self.files.db_for_write(entries[0].0)?,
                // Only deletes, into a group without a file: nothing to delete.
                false => match self.files.db_for(entries[0].0)? {
                    Some(db) => db,
                    None => continue,
                },
            };
            let mut entries = entries.iter().peekable();
            while entries.peek().is_some() {
                let tx = db.begin_write().map_err(io)?;
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
        dropped: BTreeSet::new(),
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

/// Replay every segment in `dir` into the files (per file one durable transaction per
/// segment) and delete it. Returns the sequence number for the next record.
fn recover(files: &Files, dir: &Path) -> Result<u64, StoreError> {
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
        // The ops of each file in order; a group's drop discards its ops before it (they
        // touch only the group) and is carried out first.
        let mut routes: BTreeMap<Option<&[u8]>, (bool, Vec<&Op<'_>>)> = BTreeMap::new();
        for op in records.iter().flatten() {
            match op {
                Op::Put(key, _) | Op::Delete(key) => routes
                    .entry(files.layout.group_of(key))
                    .or_default()
                    .1
                    .push(op),
                Op::Drop(g) => {
                    routes.insert(Some(*g), (true, Vec::new()));
                }
            }
        }
        for (route, (dropped, ops)) in routes {
            if let (Some(g), true) = (route, dropped) {
                files.drop_group(g)?;
            }
            let Some(first) = ops.iter().find_map(|op| match op {
                Op::Put(k, _) => Some(*k),
                _ => None,
            }) else {
                // Deletes alone: only into a file that exists.
                let db = match ops.first() {
                    Some(Op::Delete(k)) => files.db_for(k)?,
                    _ => None,
                };
                if let Some(db) = db {
                    apply_ops(&db, &ops)?;
                }
                continue;
            };
            let db = files.db_for_write(first)?;
            apply_ops(&db, &ops)?;
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

/// Puts and deletes into one file, in one durable transaction.
fn apply_ops(db: &redb::Database, ops: &[&Op<'_>]) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(io)?;
    {
        let mut t = tx.open_table(RECORDS).map_err(io)?;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    t.insert(*k, *v).map_err(io)?;
                }
                Op::Delete(k) => {
                    t.remove(*k).map_err(io)?;
                }
                Op::Drop(_) => {}
            }
        }
    }
    tx.commit().map_err(io)
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
