//! A conformance suite any [`IndexStore`] can run (feature `conformance`): ordering, prefix
//! scans, batch semantics, atomicity and isolation under concurrent readers and writers,
//! reopen, and crash consistency.
//!
//! ```ignore
//! #[test]
//! fn conforms() {
//!     let dir = tempfile::tempdir().unwrap();
//!     sealdb_plugin_api::conformance::run_all(&|| Arc::new(MyStore::open(dir.path()).unwrap()));
//! }
//! ```
//! `open` must return the store over the same data each time it is called (after the previous
//! handle was dropped); the suite clears what it wrote between checks. Crash consistency needs
//! a separate process: see [`crash_writer`] and [`crash_verify`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{IndexStore, WriteBatch};

type Open<'a> = &'a dyn Fn() -> Arc<dyn IndexStore>;

fn clear(s: &dyn IndexStore) {
    let mut b = WriteBatch::new();
    for k in s.scan_keys(b"").expect("scan") {
        b.delete(k);
    }
    if !b.is_empty() {
        s.write(b).expect("clear");
    }
    assert!(
        s.scan_keys(b"").expect("scan").is_empty(),
        "store not empty after clear"
    );
}

/// Run every check (each starts from an empty store).
pub fn run_all(open: Open<'_>) {
    basics(open);
    ordering_and_prefixes(open);
    batch_semantics(open);
    concurrent_readers_see_whole_batches(open);
    reopen_keeps_everything(open);
}

/// Get, put, overwrite, delete, empty values, a large value, get_many.
pub fn basics(open: Open<'_>) {
    let s = open();
    clear(s.as_ref());
    assert_eq!(s.get(b"missing").unwrap(), None);
    let mut b = WriteBatch::new();
    b.put("a", "1")
        .put("empty", "")
        .put("big", vec![7u8; 1 << 20]);
    s.write(b).unwrap();
    assert_eq!(s.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(
        s.get(b"empty").unwrap().as_deref(),
        Some(&b""[..]),
        "empty value is not missing"
    );
    assert_eq!(s.get(b"big").unwrap().map(|v| v.len()), Some(1 << 20));
    let mut b = WriteBatch::new();
    b.put("a", "2").delete("nope");
    s.write(b).unwrap();
    assert_eq!(s.get(b"a").unwrap().as_deref(), Some(&b"2"[..]));
    let many = s
        .get_many(&[b"a".to_vec(), b"zz".to_vec(), b"empty".to_vec()])
        .unwrap();
    assert_eq!(many, vec![Some(b"2".to_vec()), None, Some(Vec::new())]);
    let mut b = WriteBatch::new();
    b.delete("a");
    s.write(b).unwrap();
    assert_eq!(s.get(b"a").unwrap(), None);
    s.write(WriteBatch::new()).unwrap();
    clear(s.as_ref());
}

/// Unsigned byte order, prefixes of each other, 0x00 and 0xff bytes.
pub fn ordering_and_prefixes(open: Open<'_>) {
    let s = open();
    clear(s.as_ref());
    let keys: Vec<Vec<u8>> = vec![
        vec![0xff],
        vec![0x01, 0xff, 0xff],
        vec![0x01, 0xff],
        vec![0x02],
        vec![0x01],
        vec![0x00],
        vec![0x01, 0x00],
        b"M-index".to_vec(),
        b"M".to_vec(),
        b"L\x00\x01".to_vec(),
    ];
    let mut b = WriteBatch::new();
    for (i, k) in keys.iter().enumerate() {
        b.put(k.clone(), vec![i as u8]);
    }
    s.write(b).unwrap();
    let mut sorted = keys.clone();
    sorted.sort();
    let all = s.scan_prefix(b"").unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        sorted
    );
    for (k, v) in &all {
        let i = keys.iter().position(|x| x == k).unwrap();
        assert_eq!(v, &vec![i as u8]);
    }
    for prefix in [
        &[0x01][..],
        &[0x01, 0xff],
        &[0xff],
        b"M",
        b"L",
        &[0x03],
        b"M-index-x",
    ] {
        let want: Vec<Vec<u8>> = sorted
            .iter()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        let got: Vec<Vec<u8>> = s
            .scan_prefix(prefix)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, want, "scan_prefix({prefix:?})");
        assert_eq!(s.scan_keys(prefix).unwrap(), want, "scan_keys({prefix:?})");
    }
    clear(s.as_ref());
}

/// Operations apply in order within a batch; prefix deletes stop at the prefix's end.
pub fn batch_semantics(open: Open<'_>) {
    let s = open();
    clear(s.as_ref());
    let mut b = WriteBatch::new();
    b.put([1u8, 1], "x")
        .put([1u8, 2], "y")
        .put([1u8, 0xff, 3], "z")
        .put([2u8], "w");
    s.write(b).unwrap();
    let mut b = WriteBatch::new();
    b.delete_prefix([1u8])
        .put([1u8, 2], "again")
        .put([3u8], "new")
        .delete([3u8]);
    s.write(b).unwrap();
    assert_eq!(
        s.scan_prefix(b"").unwrap(),
        vec![(vec![1, 2], b"again".to_vec()), (vec![2], b"w".to_vec())]
    );
    let mut b = WriteBatch::new();
    b.put([1u8, 0xff], "a")
        .put([2u8, 0], "b")
        .delete_prefix([1u8, 0xff]);
    s.write(b).unwrap();
    assert_eq!(s.scan_keys(&[1]).unwrap(), vec![vec![1, 2]]);
    assert_eq!(s.scan_keys(&[2]).unwrap(), vec![vec![2], vec![2, 0]]);
    clear(s.as_ref());
}

/// Writers rewrite a set of keys to one generation per batch; concurrent readers must always
/// see every key of the set at the same generation (a whole batch or none of it).
pub fn concurrent_readers_see_whole_batches(open: Open<'_>) {
    let s = open();
    clear(s.as_ref());
    const KEYS: usize = 16;
    let batch = |gen: u32, who: u8| {
        let mut b = WriteBatch::new();
        for i in 0..KEYS {
            let mut v = gen.to_le_bytes().to_vec();
            v.push(who);
            b.put(format!("set/{i:02}"), v);
        }
        b
    };
    s.write(batch(0, 0)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (s, stop) = (s.clone(), stop.clone());
                scope.spawn(move || {
                    let ids: Vec<Vec<u8>> = (0..KEYS)
                        .map(|i| format!("set/{i:02}").into_bytes())
                        .collect();
                    let mut seen = 0usize;
                    while !stop.load(Ordering::Relaxed) || seen == 0 {
                        let all = s.scan_prefix(b"set/").unwrap();
                        assert_eq!(all.len(), KEYS, "a scan saw part of a batch");
                        let first = &all[0].1;
                        assert!(
                            all.iter().all(|(_, v)| v == first),
                            "a scan mixed two batches"
                        );
                        let got = s.get_many(&ids).unwrap();
                        assert!(got.iter().all(|v| v.is_some()), "get_many lost a key");
                        seen += 1;
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..2u8)
            .map(|w| {
                let s = s.clone();
                scope.spawn(move || {
                    for gen in 1..=60u32 {
                        s.write(batch(gen, w)).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
    });
    let last = s.scan_prefix(b"set/").unwrap();
    assert_eq!(&last[0].1[..4], &60u32.to_le_bytes(), "the last batch wins");
    clear(s.as_ref());
}

/// What a store held survives dropping it and opening it again.
pub fn reopen_keeps_everything(open: Open<'_>) {
    let mut want = BTreeMap::new();
    {
        let s = open();
        clear(s.as_ref());
        let mut b = WriteBatch::new();
        for i in 0..200u32 {
            let k = format!("k/{i:05}").into_bytes();
            let v = i.to_le_bytes().repeat((i % 7) as usize);
            want.insert(k.clone(), v.clone());
            b.put(k, v);
        }
        s.write(b).unwrap();
        let mut b = WriteBatch::new();
        for i in (0..200u32).step_by(3) {
            let k = format!("k/{i:05}").into_bytes();
            want.remove(&k);
            b.delete(k);
        }
        s.write(b).unwrap();
    }
    let s = open();
    let got: BTreeMap<_, _> = s.scan_prefix(b"k/").unwrap().into_iter().collect();
    assert_eq!(got, want, "contents after reopen");
    clear(s.as_ref());
}

/// Crash consistency, part 1 (run in a child process that gets killed): write numbered
/// batches forever (numbered on from `crash/last`), printing `acked N` to stdout after batch
/// `N` returned `Ok`. Each batch
/// puts 8 keys `crash/<N>/<i>` and overwrites `crash/last` with `N`.
pub fn crash_writer(s: &dyn IndexStore) -> ! {
    use std::io::Write;
    let mut out = std::io::stdout();
    let start = s
        .get(b"crash/last")
        .expect("read")
        .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
        .map_or(0, |n| n + 1);
    for n in start.. {
        let mut b = WriteBatch::new();
        for i in 0..8 {
            b.put(
                format!("crash/{n:08}/{i}"),
                vec![i as u8; 100 + (n % 512) as usize],
            );
        }
        b.put("crash/last", n.to_le_bytes().to_vec());
        s.write(b).expect("write");
        writeln!(out, "acked {n}").ok();
        out.flush().ok();
    }
    unreachable!()
}

/// Crash consistency, part 2 (after the child was killed and the store reopened): every batch
/// up to `acked` is whole, any later one is whole or absent, and `crash/last` agrees.
pub fn crash_verify(s: &dyn IndexStore, acked: Option<u64>) {
    let keys = s.scan_keys(b"crash/").unwrap();
    let mut per: BTreeMap<u64, usize> = BTreeMap::new();
    for k in &keys {
        let t = std::str::from_utf8(k).unwrap();
        if t == "crash/last" {
            continue;
        }
        let n: u64 = t.split('/').nth(1).unwrap().parse().unwrap();
        *per.entry(n).or_default() += 1;
    }
    for (n, c) in &per {
        assert_eq!(*c, 8, "batch {n} is partly there ({c} of 8 keys)");
    }
    let max = per.keys().next_back().copied();
    if let Some(a) = acked {
        assert!(
            max.is_some_and(|m| m >= a),
            "acknowledged batch {a} lost (have {max:?})"
        );
        for n in 0..=a {
            assert!(per.contains_key(&n), "acknowledged batch {n} lost");
        }
    }
    let last = s
        .get(b"crash/last")
        .unwrap()
        .map(|v| u64::from_le_bytes(v.try_into().unwrap()));
    assert_eq!(last, max, "crash/last disagrees with the batches present");
}
