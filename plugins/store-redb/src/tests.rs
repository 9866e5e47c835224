//! The redb store's tests: batches, the log across crashes and checkpoints, group files,
//! compaction and users.

use super::*;

#[test]
fn compaction_returns_freed_pages_and_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let key = |i: u32| format!("k{i:05}").into_bytes();
    let value = |i: u32| vec![(i % 251) as u8; 16 << 10];
    {
        let s = RedbStore::open_dir(dir.path()).unwrap();
        for chunk in (0..2000u32).collect::<Vec<_>>().chunks(100) {
            let mut b = WriteBatch::new();
            for &i in chunk {
                b.put(key(i), value(i));
            }
            s.write(b).unwrap();
        }
    }
    // Reopening replays the log into redb: the values now have pages in the file, which
    // the deletes then free (deleted in the same replay, they would never get pages).
    let s = RedbStore::open_dir(dir.path()).unwrap();
    let mut b = WriteBatch::new();
    for i in (0..2000u32).filter(|i| i % 10 != 0) {
        b.delete(key(i));
    }
    s.write(b).unwrap();
    drop(s);
    let (before, after) = RedbStore::compact_dir(dir.path(), Grouping::NONE).unwrap();
    assert!(before > 20 << 20, "{before}");
    assert!(after * 3 < before, "{before} -> {after}");
    assert_eq!(
        std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
        after
    );
    let s = RedbStore::open_dir(dir.path()).unwrap();
    let all = s.scan_prefix(b"k").unwrap();
    assert_eq!(all.len(), 200);
    for (k, v) in all {
        let i: u32 = std::str::from_utf8(&k[1..]).unwrap().parse().unwrap();
        assert_eq!(i % 10, 0);
        assert_eq!(v, value(i));
    }
    drop(s);
    // A store open elsewhere is not compacted under it.
    let _open = RedbStore::open_dir(dir.path()).unwrap();
    assert!(RedbStore::compact_dir(dir.path(), Grouping::NONE).is_err());
}

#[test]
fn batch_prefix_scan_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = RedbStore::open_dir(dir.path()).unwrap();
        let mut b = WriteBatch::new();
        b.put(b"a/1".to_vec(), b"one".to_vec())
            .put(b"a/2".to_vec(), b"two".to_vec())
            .put(b"b/1".to_vec(), b"three".to_vec());
        s.write(b).unwrap();
        let mut b = WriteBatch::new();
        b.delete(b"a/1".to_vec());
        s.write(b).unwrap();
    }
    let s = RedbStore::open_dir(dir.path()).unwrap();
    assert_eq!(IndexStore::get(&s, b"a/1").unwrap(), None);
    assert_eq!(IndexStore::get(&s, b"a/2").unwrap(), Some(b"two".to_vec()));
    assert_eq!(s.scan_keys(b"a/").unwrap(), vec![b"a/2".to_vec()]);
    let mut b = WriteBatch::new();
    b.delete_prefix(b"a/".to_vec())
        .put(b"a/9".to_vec(), b"x".to_vec());
    s.write(b).unwrap();
    let all = s.scan_prefix(b"").unwrap();
    assert_eq!(
        all,
        vec![
            (b"a/9".to_vec(), b"x".to_vec()),
            (b"b/1".to_vec(), b"three".to_vec())
        ]
    );
    assert_eq!(
        s.get_many(&[b"b/1".to_vec(), b"zz".to_vec()]).unwrap(),
        vec![Some(b"three".to_vec()), None]
    );
}

fn small_segments(durability: Durability) -> WalOptions {
    WalOptions {
        durability,
        segment_bytes: 300,
        segment_keys: 8,
        grouping: Grouping::NONE,
    }
}

/// Keys `<kind><sub>/<n>`: kinds 0 and 1 grouped by their first two bytes.
const TEST_GROUPS: Grouping = Grouping {
    kinds: b"01",
    prefix_len: 2,
};

fn put(s: &RedbStore, k: &str, v: &str) {
    let mut b = WriteBatch::new();
    b.put(k.as_bytes().to_vec(), v.as_bytes().to_vec());
    s.write(b).unwrap();
}

#[test]
fn crash_before_checkpoint_loses_no_acknowledged_batch() {
    for durability in [Durability::Sync, Durability::Relaxed] {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            durability,
            ..WalOptions::default()
        };
        let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
        for i in 0..50 {
            put(&s, &format!("a/{i:03}"), &format!("v{i}"));
        }
        let mut b = WriteBatch::new();
        b.delete_prefix(b"a/00".to_vec())
            .put(b"a/005".to_vec(), b"again".to_vec())
            .delete(b"a/049".to_vec());
        s.write(b).unwrap();
        // Nothing was checkpointed: everything lives in the log.
        assert_eq!(wal::segment_files(dir.path()).len(), 1);
        s.crash();
        let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
        let keys = s.scan_keys(b"a/").unwrap();
        assert_eq!(keys.len(), 50 - 10 + 1 - 1);
        assert_eq!(
            IndexStore::get(&s, b"a/005").unwrap(),
            Some(b"again".to_vec())
        );
        assert_eq!(IndexStore::get(&s, b"a/007").unwrap(), None);
        assert_eq!(IndexStore::get(&s, b"a/049").unwrap(), None);
        assert_eq!(
            IndexStore::get(&s, b"a/048").unwrap(),
            Some(b"v48".to_vec())
        );
        // A clean close leaves everything in redb: without any log the data is intact.
        drop(s);
        for f in wal::segment_files(dir.path()) {
            std::fs::remove_file(f).unwrap();
        }
        let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
        assert_eq!(s.scan_keys(b"a/").unwrap().len(), 40);
    }
}

#[test]
fn torn_log_tail_is_ignored_and_earlier_batches_survive() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_dir(dir.path()).unwrap();
    put(&s, "k1", "one");
    put(&s, "k2", "two");
    s.crash();
    let log = wal::segment_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&log).unwrap().len();
    // Half of a third record, as if the process died during the append.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3, 4, 0, 0]).unwrap();
    drop(f);
    assert!(std::fs::metadata(&log).unwrap().len() > len);
    let s = RedbStore::open_dir(dir.path()).unwrap();
    assert_eq!(IndexStore::get(&s, b"k1").unwrap(), Some(b"one".to_vec()));
    assert_eq!(IndexStore::get(&s, b"k2").unwrap(), Some(b"two".to_vec()));
    // New writes after the recovered log are not hidden behind the torn record.
    put(&s, "k3", "three");
    s.crash();
    let s = RedbStore::open_dir(dir.path()).unwrap();
    assert_eq!(s.scan_keys(b"k").unwrap().len(), 3);
}

/// Random batches against a BTreeMap model while tiny segments force constant
/// checkpoints in the background; reads must always match the model. Keys fall into
/// groups (kinds 0 and 1) and the main file (2 and 3); prefix deletes cover a kind (many
/// whole groups), one group, or part of one; put back afterwards in the same batch.
#[test]
fn reads_match_a_model_across_checkpoints_and_reopen() {
    for grouping in [Grouping::NONE, TEST_GROUPS] {
        model_run(grouping);
    }
}

fn model_run(grouping: Grouping) {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let opts = WalOptions {
        grouping,
        ..small_segments(Durability::Relaxed)
    };
    let mut s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    let mut drops = 0;
    for round in 0..600 {
        let mut b = WriteBatch::new();
        for _ in 0..rng.random_range(1..6) {
            let k = format!(
                "{}{}/{}",
                rng.random_range(0..4),
                rng.random_range(0..3),
                rng.random_range(0..20)
            )
            .into_bytes();
            match rng.random_range(0..12) {
                0..=1 => {
                    let p = k[..rng.random_range(1..4)].to_vec();
                    drops += usize::from(p.len() <= 2 && k[0] <= b'1');
                    model.retain(|key, _| !key.starts_with(&p));
                    b.delete_prefix(p);
                }
                2..=4 => {
                    model.remove(&k);
                    b.delete(k);
                }
                _ => {
                    let v = format!("v{round}-{}", rng.random_range(0..1000)).into_bytes();
                    model.insert(k.clone(), v.clone());
                    b.put(k, v);
                }
            }
        }
        s.write(b).unwrap();
        let p = format!("{}", rng.random_range(0..4)).into_bytes();
        let p = match rng.random_range(0..3) {
            0 => p,
            1 => [p, format!("{}", rng.random_range(0..3)).into_bytes()].concat(),
            _ => Vec::new(),
        };
        let want: Vec<KeyValue> = model
            .iter()
            .filter(|(k, _)| k.starts_with(&p))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(s.scan_prefix(&p).unwrap(), want, "round {round}");
        let keys: Vec<Vec<u8>> = (0..3)
            .map(|_| {
                format!(
                    "{}{}/{}",
                    rng.random_range(0..4),
                    rng.random_range(0..3),
                    rng.random_range(0..20)
                )
                .into_bytes()
            })
            .collect();
        let want: Vec<Option<Vec<u8>>> = keys.iter().map(|k| model.get(k).cloned()).collect();
        assert_eq!(IndexStore::get(&s, &keys[0]).unwrap(), want[0]);
        assert_eq!(s.get_many(&keys).unwrap(), want);
        if round % 100 == 99 {
            if round % 200 == 199 {
                s.crash();
            } else {
                drop(s);
            }
            s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
            let all: Vec<KeyValue> = model.clone().into_iter().collect();
            assert_eq!(s.scan_prefix(b"").unwrap(), all, "after reopen at {round}");
        }
    }
    drop(s);
    // Group files exist exactly for the groups that hold keys (or held some since their
    // last drop), and never for the main file's kinds.
    let files = files::group_paths(dir.path());
    if grouping == Grouping::NONE {
        assert!(files.is_empty());
    } else {
        assert!(drops > 20, "{drops}");
        let live: std::collections::BTreeSet<Vec<u8>> = model
            .keys()
            .filter(|k| k[0] <= b'1')
            .map(|k| k[..2].to_vec())
            .collect();
        assert!(files.len() >= live.len() && !live.is_empty(), "{files:?}");
    }
}

/// A prefix delete of a whole group deletes its file: the space comes back at once,
/// through the log, a crash before the checkpoint, and the replay.
#[test]
fn dropping_a_group_returns_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        grouping: TEST_GROUPS,
        ..WalOptions::default()
    };
    // 15 KiB: a value and its key fill one 16 KiB redb page.
    let value = |i: u32| vec![(i % 251) as u8; 15 << 10];
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    for chunk in (0..1200u32).collect::<Vec<_>>().chunks(100) {
        let mut b = WriteBatch::new();
        for &i in chunk {
            b.put(format!("0{}/{i:05}", i % 2), value(i));
            b.put(format!("2{}/{i:05}", i % 2), b"small".to_vec());
        }
        s.write(b).unwrap();
    }
    drop(s);
    let groups = files::group_paths(dir.path());
    assert_eq!(groups.len(), 2, "{groups:?}");
    // Bytes the files take on disk (redb grows a file ahead of need, sparsely).
    let group_bytes = |d: &Path| -> u64 {
        use std::os::unix::fs::MetadataExt;
        files::group_paths(d)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
            .sum()
    };
    assert!(group_bytes(dir.path()) > 18 << 20);
    let main_before = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
    // Drop group "00" and put one key back in it in the same batch; crash before any
    // checkpoint, so the replay carries out the drop.
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    let mut b = WriteBatch::new();
    b.delete_prefix(b"00".to_vec())
        .put(b"00/again".to_vec(), b"x".to_vec());
    s.write(b).unwrap();
    assert_eq!(s.scan_keys(b"00").unwrap(), vec![b"00/again".to_vec()]);
    assert_eq!(s.scan_keys(b"01").unwrap().len(), 600);
    s.crash();
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    assert_eq!(s.scan_keys(b"00").unwrap(), vec![b"00/again".to_vec()]);
    assert!(
        group_bytes(dir.path()) < 12 << 20,
        "{}",
        group_bytes(dir.path())
    );
    // Dropping a whole kind removes every group of it; the main file's keys are untouched.
    let mut b = WriteBatch::new();
    b.delete_prefix(b"0".to_vec());
    s.write(b).unwrap();
    assert!(s.scan_keys(b"0").unwrap().is_empty());
    // The files go as soon as the checkpointer gets to the batch, which is handed to it
    // at once, not when its log segment fills up (the wait only bounds a hung test).
    let t = std::time::Instant::now();
    while !files::group_paths(dir.path()).is_empty() {
        assert!(t.elapsed().as_secs() < 60, "the dropped files stay");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(s.scan_keys(b"2").unwrap().len(), 1200);
    drop(s);
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    assert_eq!(s.scan_keys(b"2").unwrap().len(), 1200);
    assert!(std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len() <= main_before);
}

/// Readers racing a writer that drops a group and fills it again in each batch (every
/// batch checkpointed at once, so files are deleted and created under the readers) see
/// each batch whole: the group's ten keys, all from one batch.
#[test]
fn readers_see_whole_batches_while_groups_are_dropped_under_them() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        grouping: TEST_GROUPS,
        durability: Durability::Relaxed,
        ..WalOptions::default()
    };
    let s = std::sync::Arc::new(RedbStore::open_dir_with(dir.path(), opts).unwrap());
    let keys: Vec<Vec<u8>> = (0..10).map(|i| format!("00/{i}").into_bytes()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (s, keys, stop) = (s.clone(), keys.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let values: Vec<Vec<u8>> = if r == 0 {
                        s.scan_prefix(b"00")
                            .unwrap()
                            .into_iter()
                            .map(|(_, v)| v)
                            .collect()
                    } else {
                        s.get_many(&keys).unwrap().into_iter().flatten().collect()
                    };
                    if values.is_empty() {
                        continue;
                    }
                    assert_eq!(values.len(), 10, "reader {r}");
                    assert!(values.iter().all(|v| *v == values[0]), "reader {r}");
                    seen += 1;
                }
                seen
            })
        })
        .collect();
    for round in 0..600u32 {
        let mut b = WriteBatch::new();
        b.delete_prefix(b"00".to_vec());
        for k in &keys {
            b.put(k.clone(), round.to_le_bytes().to_vec());
        }
        s.write(b).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    // Closed (every batch checkpointed): one file, holding the last batch.
    drop(std::sync::Arc::into_inner(s).unwrap());
    assert_eq!(files::group_paths(dir.path()).len(), 1);
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    let last = 599u32.to_le_bytes().to_vec();
    assert_eq!(s.get_many(&keys).unwrap(), vec![Some(last); 10]);
}

/// A compaction that moved some records to their new files and stopped leaves a store
/// that opens with an error naming the way out, and the next compaction finishes the
/// interrupted move (here even when asked for another layout) with every record intact.
#[test]
fn an_interrupted_move_between_files_is_refused_then_finished() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_dir(dir.path()).unwrap();
    for i in 0..200 {
        put(&s, &format!("{}{}/{i:03}", i % 4, i % 3), &format!("{i}"));
    }
    let want = s.scan_prefix(b"").unwrap();
    drop(s);
    {
        // What a compaction to TEST_GROUPS had done when it stopped: the move recorded,
        // group "00" filled, its keys not yet deleted from the main file, and "01"
        // filled with its keys deleted from the main file.
        let db = files::open_db(&dir.path().join(FILE_NAME), CACHE_BYTES, false).unwrap();
        let mut f = files::Files::open(dir.path(), db, Grouping::NONE).unwrap();
        f.start_move_for_test(TEST_GROUPS);
        for (g, delete) in [(b"00", false), (b"01", true)] {
            let kvs: Vec<KeyValue> = want
                .iter()
                .filter(|(k, _)| k.starts_with(g))
                .cloned()
                .collect();
            let target = f.db_for_write(&kvs[0].0).unwrap();
            for (db, remove) in [(target, false), (f.main.clone(), true)] {
                if remove && !delete {
                    continue;
                }
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(RECORDS).unwrap();
                    for (k, v) in &kvs {
                        match remove {
                            true => t.remove(k.as_slice()).map(|_| ()).unwrap(),
                            false => t.insert(k.as_slice(), v.as_slice()).map(|_| ()).unwrap(),
                        }
                    }
                }
                tx.commit().unwrap();
            }
        }
    }
    match RedbStore::open_dir(dir.path()) {
        Err(StoreError::Unavailable(why)) => {
            assert!(why.contains("--compact-on-start"), "{why}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    RedbStore::compact_dir(dir.path(), Grouping::NONE).unwrap();
    assert!(files::group_paths(dir.path()).is_empty());
    let s = RedbStore::open_dir_with(
        dir.path(),
        WalOptions {
            grouping: TEST_GROUPS,
            ..WalOptions::default()
        },
    )
    .unwrap();
    assert_eq!(s.scan_prefix(b"").unwrap(), want);
}

/// A segment that one large batch carried far past its size is cut back to a segment's
/// size (plus 1 MiB) when it is kept as the spare.
#[test]
fn the_spare_segment_is_no_bigger_than_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes: 64 << 10,
        ..WalOptions::default()
    };
    let spare = dir.path().join("wal-spare.log");
    let wait = |done: &dyn Fn() -> bool| {
        let t = std::time::Instant::now();
        while !done() {
            assert!(t.elapsed().as_secs() < 60, "the checkpointer is stuck");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    // A small batch gets a spare made; the next one moves over to it.
    put(&s, "a", &"x".repeat(1000));
    wait(&|| spare.exists());
    put(&s, "b", "y");
    wait(&|| spare.exists() && wal::segment_files(dir.path()).len() == 1);
    // The recycled segment now takes a batch of 3 MiB, then is checkpointed and kept.
    let mut b = WriteBatch::new();
    for i in 0..48 {
        b.put(format!("k{i:02}"), vec![7u8; 64 << 10]);
    }
    s.write(b).unwrap();
    wait(&|| spare.exists() && wal::segment_files(dir.path()).len() == 1);
    let len = std::fs::metadata(&spare).unwrap().len();
    assert!(len <= (64 << 10) + (1 << 20), "{len}");
    assert_eq!(s.scan_keys(b"k").unwrap().len(), 48);
}

/// A store keeps the grouping it was created with: one written without groups is read
/// whole when opened with a grouping, and the other way round, until a compaction moves
/// its records (in many small steps here) to the layout it is asked for.
#[test]
fn a_store_keeps_the_grouping_it_was_created_with() {
    for (first, then) in [(Grouping::NONE, TEST_GROUPS), (TEST_GROUPS, Grouping::NONE)] {
        let dir = tempfile::tempdir().unwrap();
        let with = |grouping| WalOptions {
            grouping,
            ..WalOptions::default()
        };
        let s = RedbStore::open_dir_with(dir.path(), with(first)).unwrap();
        put(&s, "00/a", "1");
        put(&s, "20/b", "2");
        drop(s);
        let grouped = !files::group_paths(dir.path()).is_empty();
        assert_eq!(grouped, first == TEST_GROUPS);
        let s = RedbStore::open_dir_with(dir.path(), with(then)).unwrap();
        put(&s, "01/c", "3");
        let mut b = WriteBatch::new();
        b.delete_prefix(b"00".to_vec());
        s.write(b).unwrap();
        assert_eq!(
            s.scan_keys(b"").unwrap(),
            vec![b"01/c".to_vec(), b"20/b".to_vec()]
        );
        drop(s);
        let s = RedbStore::open_dir_with(dir.path(), with(then)).unwrap();
        assert_eq!(
            s.scan_keys(b"").unwrap(),
            vec![b"01/c".to_vec(), b"20/b".to_vec()]
        );
        assert_eq!(!files::group_paths(dir.path()).is_empty(), grouped);
        // Compaction moves the records to the asked-for layout, which then holds.
        for i in 0..300 {
            put(
                &s,
                &format!("{}{}/{i:03}", i % 4, i % 3),
                &format!("{i:0100}"),
            );
        }
        let want = s.scan_prefix(b"").unwrap();
        drop(s);
        RedbStore::compact_dir(dir.path(), then).unwrap();
        let groups = files::group_paths(dir.path());
        assert_eq!(groups.len(), if then == TEST_GROUPS { 6 } else { 0 });
        let s = RedbStore::open_dir_with(dir.path(), with(first)).unwrap();
        assert_eq!(s.scan_prefix(b"").unwrap(), want);
        let mut b = WriteBatch::new();
        b.delete_prefix(b"0".to_vec());
        s.write(b).unwrap();
        drop(s);
        let groups = files::group_paths(dir.path());
        assert_eq!(groups.len(), if then == TEST_GROUPS { 3 } else { 0 });
        let s = RedbStore::open_dir_with(dir.path(), with(first)).unwrap();
        let left: Vec<KeyValue> = want.into_iter().filter(|(k, _)| k[0] != b'0').collect();
        assert_eq!(s.scan_prefix(b"").unwrap(), left);
    }
}

/// Several writers and readers at once, with segments so small that every few batches
/// rotate and writers regularly wait for the checkpointer (the backpressure path).
#[test]
fn concurrent_writers_and_readers_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        durability: Durability::Relaxed,
        segment_bytes: 2048,
        segment_keys: 16,
        // Writer t's keys are group "wt": every file is written by several checkpoints.
        grouping: Grouping {
            kinds: b"w",
            prefix_len: 2,
        },
    };
    let s = std::sync::Arc::new(RedbStore::open_dir_with(dir.path(), opts).unwrap());
    let writers: Vec<_> = (0..4u32)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for round in 0..150u32 {
                    let mut b = WriteBatch::new();
                    for k in 0..5u32 {
                        b.put(
                            format!("w{t}/{:02}", (round + k) % 20).into_bytes(),
                            format!("{round}").into_bytes(),
                        );
                    }
                    if round % 7 == 0 {
                        b.delete(format!("w{t}/{:02}", round % 20).into_bytes());
                    }
                    s.write(b).unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                for (k, v) in s.scan_prefix(b"w").unwrap() {
                    // Every visible value is a whole number some batch wrote.
                    let v: u32 = String::from_utf8(v).unwrap().parse().unwrap();
                    assert!(v < 150, "{k:?}");
                }
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    // What each key must hold: replay each writer's batches in order.
    let mut want = std::collections::BTreeMap::new();
    for t in 0..4u32 {
        for round in 0..150u32 {
            for k in 0..5u32 {
                want.insert(format!("w{t}/{:02}", (round + k) % 20), format!("{round}"));
            }
            if round % 7 == 0 {
                want.remove(&format!("w{t}/{:02}", round % 20));
            }
        }
    }
    let want: Vec<KeyValue> = want
        .into_iter()
        .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
        .collect();
    assert_eq!(s.scan_prefix(b"w").unwrap(), want);
    let s = std::sync::Arc::into_inner(s).unwrap();
    s.crash();
    let s = RedbStore::open_dir_with(dir.path(), opts).unwrap();
    assert_eq!(s.scan_prefix(b"w").unwrap(), want);
}

#[test]
fn users_roundtrip_and_are_scoped_per_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_dir(dir.path()).unwrap();
    s.put(b"idx1", b"u1", b"r1").unwrap();
    s.put(b"idx1", b"u2", b"r2").unwrap();
    s.put(b"idx10", b"u9", b"r9").unwrap();
    assert_eq!(
        UserStore::get(&s, b"idx1", b"u2").unwrap(),
        Some(b"r2".to_vec())
    );
    let l = s.list(b"idx1").unwrap();
    assert_eq!(
        l,
        vec![
            (b"u1".to_vec(), b"r1".to_vec()),
            (b"u2".to_vec(), b"r2".to_vec())
        ]
    );
    assert!(s.delete(b"idx1", b"u1").unwrap());
    assert!(!s.delete(b"idx1", b"u1").unwrap());
    s.delete_index(b"idx1").unwrap();
    assert!(s.list(b"idx1").unwrap().is_empty());
    assert_eq!(s.list(b"idx10").unwrap().len(), 1);
}

#[test]
fn second_open_of_same_file_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let _s = RedbStore::open_dir(dir.path()).unwrap();
    assert!(matches!(
        RedbStore::open_dir(dir.path()),
        Err(StoreError::Unavailable(_))
    ));
}
