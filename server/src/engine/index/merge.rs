//! Position-run merges off the write path.
//!
//! Every write batch adds one small run (see `runs`), and every [`runs::FANOUT`] runs of a
//! level are merged into one of the next. On a store of its own the index merges in the
//! background: a write that leaves a merge due starts the merger of that merge's [`Lane`]
//! (one thread per lane per index, while there is work) and returns. The merger reads and
//! seals without the writer lock and takes it only to store each batch (`compact_runs`).
//!
//! Backpressure: before a write, a level that holds more runs than its lane's backlog makes
//! the writer wait for that lane's merger, or merge in its own thread if none runs (so a merge
//! that keeps failing fails the writes, rather than letting runs pile up without bound).
//!
//! On a shared store (several servers on one bucket) a merge's batches are guarded like any
//! write and may meet a conflict, which the write that ran it retries: there the merge stays
//! in line, under the writer lock, as part of the write. So it does with
//! `EngineConfig::background_merges` off.
//!
//! A merger holds the index (`Arc`), so the open-index table never drops an index while it
//! merges; it stops at its next batch once the engine shuts down or the index is deleted.

use super::runs::{crowded, pick, Lane};
use super::*;

/// The two lanes' mergers: whether each runs, and a signal when one stops.
#[derive(Default)]
pub(crate) struct Mergers {
    running: Mutex<[bool; 2]>,
    stopped: parking_lot::Condvar,
}

impl Index {
    /// Before a write: wait for (or do) the merges a crowded lane owes.
    pub(super) fn merge_backpressure(&self) -> Result<(), EngineError> {
        if !self.merge_behind {
            return Ok(());
        }
        for lane in Lane::BOTH {
            loop {
                if !crowded(&self.data.read().runs, lane) {
                    break;
                }
                let mut running = self.mergers.running.lock();
                if running[lane as usize] {
                    self.mergers.stopped.wait(&mut running);
                    continue;
                }
                running[lane as usize] = true;
                drop(running);
                let r = self.compact_runs(Some(lane), false);
                self.lane_stopped(lane);
                r?;
                break;
            }
        }
        Ok(())
    }

    /// After a write is installed, under its writer lock: merge what is due. In line (a shared store, or background merges off) that happens here; otherwise
    /// it starts the lanes' mergers and returns.
    pub(super) fn merge_due(&self) -> Result<(), EngineError> {
        if !self.merge_behind {
            return self.compact_runs(None, true);
        }
        for lane in Lane::BOTH {
            if pick(&self.data.read().runs, Some(lane)).is_none() {
                continue;
            }
            let Some(me) = self.me.upgrade() else {
                return Ok(());
            };
            {
                let mut running = self.mergers.running.lock();
                if running[lane as usize] {
                    continue; // it looks again before it stops
                }
                running[lane as usize] = true;
            }
            let spawned = std::thread::Builder::new()
                .name("sealdb-merge".into())
                .spawn(move || me.merger(lane));
            if let Err(e) = spawned {
                // No thread: the next write's backpressure merges in line.
                self.lane_stopped(lane);
                tracing::warn!(index = %self.name, error = %e, "cannot start a position-run merger");
            }
        }
        Ok(())
    }

    /// A lane's merger: merge until nothing is due, then stop (looking once more after
    /// saying so, for a write that found it running just before it stopped).
    fn merger(self: Arc<Self>, lane: Lane) {
        loop {
            if let Err(e) = self.compact_runs(Some(lane), false) {
                tracing::warn!(index = %self.name, error = %e, "position-run merge failed; the next write retries it");
                self.lane_stopped(lane);
                return;
            }
            self.lane_stopped(lane);
            let again = !self.shutdown.load(Ordering::Acquire)
                && !self.deleted.load(Ordering::Acquire)
                && pick(&self.data.read().runs, Some(lane)).is_some();
            if !again {
                return;
            }
            let mut running = self.mergers.running.lock();
            if running[lane as usize] {
                return; // another merger took over
            }
            running[lane as usize] = true;
        }
    }

    fn lane_stopped(&self, lane: Lane) {
        self.mergers.running.lock()[lane as usize] = false;
        self.mergers.stopped.notify_all();
    }

    /// Wait until no merger of this index runs (tests, shutdown). Merges started by writes
    /// that land meanwhile are waited for too.
    pub fn settle_merges(&self) {
        let mut running = self.mergers.running.lock();
        while running.iter().any(|&r| r) {
            self.mergers.stopped.wait(&mut running);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{cfg, create, engine_with};
    use crate::engine::NewItem;

    /// A merge whose index was deleted while it read stores nothing and changes nothing,
    /// and the same merge on a live index goes through.
    #[test]
    fn a_merge_the_index_moved_past_is_dropped() {
        let store: Arc<dyn IndexStore> = Arc::new(sealdb_store_memory::MemoryStore::new());
        let e = engine_with(store.clone(), None, true);
        let kek = Kek::random();
        create(&e, "m", &kek, cfg(Metric::Euclidean, Precision::F32, 2));
        let ix = e.open("m", Some(&kek)).unwrap();
        // Stand in for a running small-lane merger, so that the writes leave the merge due.
        ix.mergers.running.lock()[Lane::Small as usize] = true;
        for b in 0..8 {
            let items = (0..10)
                .map(|i| NewItem {
                    id: format!("{b}-{i}"),
                    vector: vec![b as f32, i as f32],
                    metadata: None,
                    contents: None,
                })
                .collect();
            ix.upsert(items).unwrap();
        }
        assert_eq!(ix.run_levels(), vec![0; 8]);
        let runs = || {
            store
                .scan_keys(&fmt::scoped_prefix(fmt::kind::RUN, &ix.id))
                .unwrap()
        };
        let before = runs();
        let w = ix.writer.lock();
        std::thread::scope(|sc| {
            let merge = sc.spawn(|| ix.compact_runs(Some(Lane::Small), false));
            // Wherever the merge is when this lands, it checks under the writer lock.
            ix.deleted.store(true, Ordering::Release);
            drop(w);
            merge.join().unwrap().unwrap();
        });
        assert_eq!(ix.run_levels(), vec![0; 8]);
        assert_eq!(runs(), before, "the dropped merge stored nothing");
        ix.deleted.store(false, Ordering::Release);
        ix.compact_runs(Some(Lane::Small), false).unwrap();
        assert_eq!(ix.run_levels(), vec![1]);
        assert_eq!(runs().len(), 2, "one page and one header");
        let ids: Vec<String> = (0..8).map(|b| format!("{b}-3")).collect();
        assert_eq!(
            ix.get(&ids, crate::engine::Include::STORED).unwrap().len(),
            8
        );
    }
}
