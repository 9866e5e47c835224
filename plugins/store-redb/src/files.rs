//! Which redb file holds a key: the main file, or the file of the key's *group*.
//!
//! A [`Grouping`] names key families that are written together and deleted together by one
//! `DeletePrefix` (the server's per-generation records): every key whose first byte is one of
//! [`Grouping::kinds`] and that is at least [`Grouping::prefix_len`] bytes long belongs to the
//! group named by its first `prefix_len` bytes, and lives in a redb file of its own,
//! `groups/<hex of the group prefix>.redb`. Everything else lives in the main file.
//!
//! A group file exists so that dropping the group gives its space back at once: a prefix
//! delete that covers a whole group unlinks the file instead of deleting its keys one by one
//! into free pages that redb keeps but never returns (a training would otherwise leave the
//! file holding two generations' worth of pages).
//!
//! The grouping a store was created with is kept in the main file (table `layout`), so keys
//! are always looked for where they were written; a store opened with another grouping keeps
//! its own until [`crate::RedbStore::compact_dir`] moves the records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sealdb_plugin_api::StoreError;

use crate::{io, RECORDS};

const LAYOUT: TableDefinition<&str, &[u8]> = TableDefinition::new("layout");
const LAYOUT_KEY: &str = "grouping";
/// The grouping a compaction is moving the records to; present only while it runs.
const NEXT_KEY: &str = "grouping-next";
/// redb page cache of each group file (the main file has [`crate::CACHE_BYTES`]).
pub const GROUP_CACHE_BYTES: usize = 2 << 20;
/// Directory of the group files, inside the data directory.
pub const GROUPS_DIR: &str = "groups";

/// Which keys get a file of their own (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    /// First bytes of the grouped key families; empty: no grouping.
    pub kinds: &'static [u8],
    /// Length of a group's prefix (the first byte included).
    pub prefix_len: usize,
}

impl Grouping {
    /// Every key in the main file.
    pub const NONE: Grouping = Grouping {
        kinds: &[],
        prefix_len: 0,
    };
}

/// A grouping as stored: owned, since the one on disk need not be the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    kinds: Vec<u8>,
    prefix_len: usize,
}

impl Layout {
    fn of(g: Grouping) -> Self {
        Self {
            kinds: g.kinds.to_vec(),
            prefix_len: g.prefix_len,
        }
    }

    /// `u8 version (1) || u32 LE prefix_len || kinds`.
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![1u8];
        v.extend_from_slice(&(self.prefix_len as u32).to_le_bytes());
        v.extend_from_slice(&self.kinds);
        v
    }

    fn decode(v: &[u8]) -> Result<Self, StoreError> {
        match v {
            [1, a, b, c, d, kinds @ ..] => Ok(Self {
                kinds: kinds.to_vec(),
                prefix_len: u32::from_le_bytes([*a, *b, *c, *d]) as usize,
            }),
            _ => Err(StoreError::Corrupt(
                "the store's layout record is not one this version reads".into(),
            )),
        }
    }

    /// The group `key` belongs to: its first `prefix_len` bytes, or `None` (main file).
    pub(crate) fn group_of<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        match key.first() {
            Some(k) if self.prefix_len > 0 && key.len() >= self.prefix_len => {
                self.kinds.contains(k).then(|| &key[..self.prefix_len])
            }
            _ => None,
        }
    }

    /// Whether every key under `prefix` is grouped, in a group whose prefix starts with
    /// `prefix`: a prefix delete of it can drop those groups' files whole.
    pub(crate) fn covers_groups(&self, prefix: &[u8]) -> bool {
        match prefix.first() {
            Some(k) => self.kinds.contains(k) && prefix.len() <= self.prefix_len,
            None => false,
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Open (creating if asked) a redb file with `cache` bytes of page cache.
pub(crate) fn open_db(path: &Path, cache: usize, create: bool) -> Result<Database, StoreError> {
    let mut b = redb::Builder::new();
    b.set_cache_size(cache);
    let r = if create { b.create(path) } else { b.open(path) };
    let db = r.map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
            "{} is already open in another process",
            path.display()
        )),
        other => StoreError::Io(format!("cannot open {}: {other}", path.display())),
    })?;
    Ok(db)
}

/// A read transaction on one file that holds the file open. redb closes a database when its
/// last handle is dropped and fails the transactions still reading it; a group's handle
/// leaves the registry when the group is dropped, so every reader keeps its own.
pub(crate) struct Snapshot {
    // Declared first, so dropped before the handle.
    tx: redb::ReadTransaction,
    _db: Arc<Database>,
}

impl Snapshot {
    pub(crate) fn of(db: Arc<Database>) -> Result<Self, StoreError> {
        Ok(Self {
            tx: db.begin_read().map_err(io)?,
            _db: db,
        })
    }

    /// The file's records table.
    pub(crate) fn records(
        &self,
    ) -> Result<redb::ReadOnlyTable<&'static [u8], &'static [u8]>, StoreError> {
        self.tx.open_table(RECORDS).map_err(io)
    }
}

/// A group's prefix and its file.
pub(crate) type GroupFile = (Vec<u8>, Arc<Database>);

/// The main file and every group file, open.
pub(crate) struct Files {
    pub(crate) main: Arc<Database>,
    pub(crate) layout: Layout,
    dir: PathBuf,
    groups: RwLock<BTreeMap<Vec<u8>, Arc<Database>>>,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("a store thread panicked".into())
}

impl Files {
    /// Open the main file `main` (its tables created) and every group file under `dir`.
    /// A new store takes `asked` as its grouping; an existing one keeps the grouping on
    /// record (a store written before groups existed has none). A store whose records a
    /// compaction was moving when it stopped is refused: until that compaction is finished
    /// (`regroup`), some keys are not where either layout says.
    pub(crate) fn open(dir: &Path, main: Database, asked: Grouping) -> Result<Self, StoreError> {
        let files = Self::open_any(dir, main, asked)?;
        if files.next()?.is_some() {
            return Err(StoreError::Unavailable(
                "a compaction that moves records between the store's files was interrupted; \
                 start the server with --compact-on-start to finish it"
                    .into(),
            ));
        }
        Ok(files)
    }

    /// The layout a compaction is moving the records to, if one was interrupted.
    fn next(&self) -> Result<Option<Layout>, StoreError> {
        let tx = self.main.begin_read().map_err(io)?;
        let t = tx.open_table(LAYOUT).map_err(io)?;
        let v = t.get(NEXT_KEY).map_err(io)?;
        v.map(|v| Layout::decode(v.value())).transpose()
    }

    /// [`open`](Self::open), also when a compaction's move was interrupted.
    pub(crate) fn open_any(
        dir: &Path,
        main: Database,
        asked: Grouping,
    ) -> Result<Self, StoreError> {
        let layout = {
            let tx = main.begin_write().map_err(io)?;
            let layout = {
                let mut t = tx.open_table(LAYOUT).map_err(io)?;
                let stored = t.get(LAYOUT_KEY).map_err(io)?.map(|v| v.value().to_vec());
                match stored {
                    Some(v) => Layout::decode(&v)?,
                    None => {
                        let fresh = tx.open_table(RECORDS).map_err(io)?.is_empty().map_err(io)?;
                        let l = if fresh {
                            Layout::of(asked)
                        } else {
                            Layout::of(Grouping::NONE)
                        };
                        t.insert(LAYOUT_KEY, l.encode().as_slice()).map_err(io)?;
                        l
                    }
                }
            };
            tx.commit().map_err(io)?;
            layout
        };
        let files = Self {
            main: Arc::new(main),
            layout,
            dir: dir.join(GROUPS_DIR),
            groups: RwLock::new(BTreeMap::new()),
        };
        files.open_groups()?;
        Ok(files)
    }

    fn open_groups(&self) -> Result<(), StoreError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let mut groups = self.groups.write().map_err(poisoned)?;
        for entry in rd {
            let path = entry.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(prefix) = name.strip_suffix(".redb").and_then(unhex) else {
                // Temporary files of an interrupted creation, or nothing of ours.
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            };
            let db = open_db(&path, GROUP_CACHE_BYTES, false)?;
            groups.insert(prefix, Arc::new(db));
        }
        Ok(())
    }

    fn path_of(&self, group: &[u8]) -> PathBuf {
        self.dir.join(format!("{}.redb", hex(group)))
    }

    /// The file that holds `key`, when it exists (a group nobody wrote to has none).
    pub(crate) fn db_for(&self, key: &[u8]) -> Result<Option<Arc<Database>>, StoreError> {
        match self.layout.group_of(key) {
            None => Ok(Some(self.main.clone())),
            Some(g) => Ok(self.groups.read().map_err(poisoned)?.get(g).cloned()),
        }
    }

    /// The file that holds `key`, created if needed (checkpointer and recovery only).
    pub(crate) fn db_for_write(&self, key: &[u8]) -> Result<Arc<Database>, StoreError> {
        self.route_for_write(self.layout.group_of(key))
    }

    /// The main file (`None`) or the file of group `g`, created if needed.
    fn route_for_write(&self, g: Option<&[u8]>) -> Result<Arc<Database>, StoreError> {
        let Some(g) = g else {
            return Ok(self.main.clone());
        };
        if let Some(db) = self.groups.read().map_err(poisoned)?.get(g) {
            return Ok(db.clone());
        }
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        // Created under a temporary name and renamed, so that a file named as a group always
        // has redb's header and tables (a crash between leaves a `.tmp` that open removes).
        let path = self.path_of(g);
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let db = open_db(&tmp, GROUP_CACHE_BYTES, true)?;
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(RECORDS).map_err(io)?;
        tx.commit().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        sync_dir(&self.dir)?;
        let db = Arc::new(db);
        self.groups
            .write()
            .map_err(poisoned)?
            .insert(g.to_vec(), db.clone());
        Ok(db)
    }

    /// Every group that intersects the keys under `prefix`, with its file.
    pub(crate) fn groups_under(&self, prefix: &[u8]) -> Result<Vec<GroupFile>, StoreError> {
        let groups = self.groups.read().map_err(poisoned)?;
        Ok(groups
            .range(prefix.to_vec()..)
            .take_while(|(g, _)| g.starts_with(prefix))
            .chain(
                // A group longer than `prefix` was found above; one that `prefix` lies inside
                // sorts before it.
                groups
                    .range(..prefix.to_vec())
                    .next_back()
                    .filter(|(g, _)| prefix.starts_with(g)),
            )
            .map(|(g, db)| (g.clone(), db.clone()))
            .collect())
    }

    /// Delete a group's file. Readers that opened it earlier keep reading their snapshot
    /// (the file lives on while they hold it); nobody finds it afterwards.
    pub(crate) fn drop_group(&self, group: &[u8]) -> Result<(), StoreError> {
        let gone = self.groups.write().map_err(poisoned)?.remove(group);
        if gone.is_some() {
            drop(gone);
            match std::fs::remove_file(self.path_of(group)) {
                Ok(()) => sync_dir(&self.dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
    }
}

/// Bytes of records moved per transaction by [`regroup`] (tests: small, so that a move
/// takes many steps).
const REGROUP_TX_BYTES: usize = if cfg!(test) { 1 << 10 } else { 32 << 20 };

/// Lay the store in `dir` (which no process has open, its log replayed) out by `target`:
/// move every record that is not in the file `target` puts it in, then record `target` and
/// delete the group files left empty. The move is recorded first (`grouping-next`), and
/// [`Files::open`] refuses a store while that record is there; each step copies up to
/// [`REGROUP_TX_BYTES`] into their new files, commits, then deletes them from the old one,
/// so a key is always in one of its two places and a call after a crash finishes the move
/// (asked for another layout, it first finishes the interrupted one).
pub(crate) fn regroup(dir: &Path, main: Database, target: Grouping) -> Result<(), StoreError> {
    let mut files = Files::open_any(dir, main, target)?;
    let target = Layout::of(target);
    for goal in [files.next()?, Some(target)].into_iter().flatten() {
        if files.layout == goal && files.next()?.is_none() {
            continue;
        }
        let tx = files.main.begin_write().map_err(io)?;
        tx.open_table(LAYOUT)
            .map_err(io)?
            .insert(NEXT_KEY, goal.encode().as_slice())
            .map_err(io)?;
        tx.commit().map_err(io)?;
        files.layout = goal;
        files.move_misplaced()?;
        let tx = files.main.begin_write().map_err(io)?;
        {
            let mut t = tx.open_table(LAYOUT).map_err(io)?;
            t.insert(LAYOUT_KEY, files.layout.encode().as_slice())
                .map_err(io)?;
            t.remove(NEXT_KEY).map_err(io)?;
        }
        tx.commit().map_err(io)?;
    }
    Ok(())
}

impl Files {
    /// Record a move to `g` as a compaction does before it starts, and route by `g` (tests
    /// of an interrupted move).
    #[cfg(test)]
    pub(crate) fn start_move_for_test(&mut self, g: Grouping) {
        let tx = self.main.begin_write().unwrap();
        tx.open_table(LAYOUT)
            .unwrap()
            .insert(NEXT_KEY, Layout::of(g).encode().as_slice())
            .unwrap();
        tx.commit().unwrap();
        self.layout = Layout::of(g);
    }

    /// Move every record that is not in the file `self.layout` puts it in, then delete the
    /// group files that are left empty and that the layout would not name.
    fn move_misplaced(&self) -> Result<(), StoreError> {
        let mut sources: Vec<(Option<Vec<u8>>, Arc<Database>)> = vec![(None, self.main.clone())];
        sources.extend(
            self.groups
                .read()
                .map_err(poisoned)?
                .iter()
                .map(|(g, db)| (Some(g.clone()), db.clone())),
        );
        for (here, src) in &sources {
            let mut from: Vec<u8> = Vec::new();
            loop {
                // New file (`None`: main) -> the records going there.
                type Moves = BTreeMap<Option<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>>;
                let mut moving = Moves::new();
                let mut bytes = 0usize;
                let mut done = true;
                {
                    let tx = src.begin_read().map_err(io)?;
                    let t = tx.open_table(RECORDS).map_err(io)?;
                    for e in t.range::<&[u8]>(from.as_slice()..).map_err(io)? {
                        let (k, v) = e.map_err(io)?;
                        let k = k.value();
                        let there = self.layout.group_of(k);
                        if there == here.as_deref() {
                            continue;
                        }
                        bytes += k.len() + v.value().len();
                        moving
                            .entry(there.map(<[u8]>::to_vec))
                            .or_default()
                            .push((k.to_vec(), v.value().to_vec()));
                        if bytes >= REGROUP_TX_BYTES {
                            from = [k, &[0]].concat();
                            done = false;
                            break;
                        }
                    }
                }
                for (there, kvs) in &moving {
                    let db = self.route_for_write(there.as_deref())?;
                    let tx = db.begin_write().map_err(io)?;
                    {
                        let mut t = tx.open_table(RECORDS).map_err(io)?;
                        for (k, v) in kvs {
                            t.insert(k.as_slice(), v.as_slice()).map_err(io)?;
                        }
                    }
                    tx.commit().map_err(io)?;
                }
                let tx = src.begin_write().map_err(io)?;
                {
                    let mut t = tx.open_table(RECORDS).map_err(io)?;
                    for (k, _) in moving.values().flatten() {
                        t.remove(k.as_slice()).map_err(io)?;
                    }
                }
                tx.commit().map_err(io)?;
                if done {
                    break;
                }
            }
        }
        for (here, db) in sources {
            let Some(g) = here else { continue };
            let empty = {
                let tx = db.begin_read().map_err(io)?;
                let t = tx.open_table(RECORDS).map_err(io)?;
                t.is_empty().map_err(io)?
            };
            if empty && self.layout.group_of(&g) != Some(g.as_slice()) {
                drop(db);
                self.drop_group(&g)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Paths of the group files under data directory `dir`.
pub(crate) fn group_paths(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join(GROUPS_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "redb"))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Layout {
        Layout::of(Grouping {
            kinds: b"LR",
            prefix_len: 3,
        })
    }

    #[test]
    fn keys_route_by_kind_and_length() {
        let g = g();
        assert_eq!(g.group_of(b"Lab1"), Some(&b"Lab"[..]));
        assert_eq!(g.group_of(b"Lab"), Some(&b"Lab"[..]));
        assert_eq!(g.group_of(b"La"), None);
        assert_eq!(g.group_of(b"Mab1"), None);
        assert_eq!(Layout::of(Grouping::NONE).group_of(b"Lab1"), None);
        assert!(g.covers_groups(b"L"));
        assert!(g.covers_groups(b"Lab"));
        assert!(!g.covers_groups(b"Lab1"));
        assert!(!g.covers_groups(b"M"));
        assert!(!g.covers_groups(b""));
        assert_eq!(Layout::decode(&g.encode()).unwrap(), g);
        assert!(Layout::decode(&[2, 0]).is_err());
        assert_eq!(unhex(&hex(b"\x00\xffL")), Some(b"\x00\xffL".to_vec()));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
