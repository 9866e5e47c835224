//! This process's view of the bucket: where every live value sits, the version of every
//! scope, and how many live bytes each log object still holds (for compaction). Built from
//! the newest snapshot and the log entries after it, always applied in sequence order, so
//! every server that applied the same entries holds the same view.

use std::collections::{BTreeMap, HashMap};

use crate::format::{Entry, Loc, Op, Snapshot};

#[derive(Default)]
pub(crate) struct View {
    /// The last log entry applied.
    pub applied: u64,
    /// The newest snapshot known (written or read).
    pub snapshot: u64,
    pub keys: BTreeMap<Vec<u8>, Loc>,
    pub scopes: HashMap<Vec<u8>, u64>,
    /// Live value bytes per log object.
    pub live: HashMap<u64, u64>,
}

impl View {
    pub(crate) fn from_snapshot(s: Snapshot) -> Self {
        let mut v = View {
            applied: s.seq,
            snapshot: s.seq,
            scopes: s.scopes.into_iter().collect(),
            ..View::default()
        };
        for (k, at) in s.keys {
            v.hold(at);
            v.keys.insert(k, at);
        }
        v
    }

    pub(crate) fn version(&self, scope: &[u8]) -> u64 {
        self.scopes.get(scope).copied().unwrap_or(0)
    }

    fn hold(&mut self, at: Loc) {
        *self.live.entry(at.seq).or_default() += u64::from(at.len);
    }

    fn release(&mut self, at: Loc) {
        if let Some(n) = self.live.get_mut(&at.seq) {
            *n = n.saturating_sub(u64::from(at.len));
        }
    }

    fn set(&mut self, key: Vec<u8>, at: Loc) {
        self.hold(at);
        if let Some(old) = self.keys.insert(key, at) {
            self.release(old);
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(old) = self.keys.remove(key) {
            self.release(old);
        }
    }

    /// Apply the next entry (`e.seq == applied + 1`, checked by the caller).
    pub(crate) fn apply(&mut self, e: Entry) {
        self.live.entry(e.seq).or_default();
        for s in e.scopes {
            self.scopes.insert(s, e.seq);
        }
        for op in e.ops {
            match op {
                Op::Put { key, at } => self.set(key, at),
                Op::Delete { key } => self.remove(&key),
                Op::DeletePrefix { prefix } => {
                    let gone: Vec<Vec<u8>> = self
                        .keys
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in gone {
                        self.remove(&k);
                    }
                }
                Op::Move { key, from, at } => {
                    if self.keys.get(&key) == Some(&from) {
                        self.set(key, at);
                    }
                }
            }
        }
        self.applied = e.seq;
    }

    /// Keys (with their places) starting with `prefix`, ascending.
    pub(crate) fn scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Loc)> {
        self.keys
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, at)| (k.clone(), *at))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, len: u32) -> Loc {
        Loc { seq, off: 0, len }
    }

    #[test]
    fn moves_lose_to_later_writes_and_bytes_are_counted() {
        let mut v = View::default();
        v.apply(Entry {
            seq: 1,
            scopes: vec![b"s".to_vec()],
            ops: vec![
                Op::Put {
                    key: b"a".to_vec(),
                    at: at(1, 10),
                },
                Op::Put {
                    key: b"b".to_vec(),
                    at: at(1, 5),
                },
            ],
        });
        assert_eq!(v.version(b"s"), 1);
        assert_eq!(v.live[&1], 15);
        // A write to `b` lands before a compaction's copy of the old `b`: the copy is void.
        v.apply(Entry {
            seq: 2,
            scopes: vec![],
            ops: vec![Op::Put {
                key: b"b".to_vec(),
                at: at(2, 7),
            }],
        });
        v.apply(Entry {
            seq: 3,
            scopes: vec![],
            ops: vec![
                Op::Move {
                    key: b"a".to_vec(),
                    from: at(1, 10),
                    at: at(3, 10),
                },
                Op::Move {
                    key: b"b".to_vec(),
                    from: at(1, 5),
                    at: at(3, 5),
                },
            ],
        });
        assert_eq!(v.keys[&b"a".to_vec()], at(3, 10));
        assert_eq!(v.keys[&b"b".to_vec()], at(2, 7));
        assert_eq!(v.live[&1], 0, "object 1 is dead");
        assert_eq!(
            v.version(b"s"),
            1,
            "entries without scopes leave versions alone"
        );
        v.apply(Entry {
            seq: 4,
            scopes: vec![],
            ops: vec![Op::DeletePrefix { prefix: vec![] }],
        });
        assert!(v.keys.is_empty());
        assert!(v.live.values().all(|&n| n == 0));
    }
}
