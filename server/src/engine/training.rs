//! The background training worker: a FIFO queue of indexes, one trained at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::index::{Index, TrainParams};
use super::EngineError;

/// What `training-status` reports.
#[derive(Debug, Clone, Default)]
pub struct TrainingStatus {
    pub currently_training: Option<String>,
    pub queued: Vec<String>,
    /// Indexes trained right now by explicit `train` calls.
    pub explicit: Vec<String>,
    pub worker_running: bool,
}

#[derive(Default)]
struct State {
    stopped: bool,
    queue: VecDeque<Arc<Index>>,
    current: Option<String>,
    explicit: HashMap<String, usize>,
}

/// The worker and its queue.
pub struct Trainer {
    state: Mutex<State>,
    wake: Condvar,
    time_limit: Option<std::time::Duration>,
    coarse_min_bytes: Option<u64>,
}

/// Keeps an index listed as training while an explicit `train` call runs.
pub struct ExplicitMark<'a> {
    trainer: &'a Trainer,
    name: String,
}

impl Drop for ExplicitMark<'_> {
    fn drop(&mut self) {
        let mut st = self.trainer.state.lock();
        if let Some(n) = st.explicit.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                st.explicit.remove(&self.name);
            }
        }
    }
}

impl Trainer {
    /// Start the worker thread.
    pub fn start(
        time_limit: Option<std::time::Duration>,
        coarse_min_bytes: Option<u64>,
    ) -> Arc<Self> {
        let t = Arc::new(Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            time_limit,
            coarse_min_bytes,
        });
        let worker = t.clone();
        std::thread::Builder::new()
            .name("sealdb-trainer".into())
            .spawn(move || worker.run())
            .expect("spawning the training thread");
        t
    }

    fn run(&self) {
        loop {
            let ix = {
                let mut st = self.state.lock();
                while st.queue.is_empty() && !st.stopped {
                    self.wake.wait(&mut st);
                }
                if st.stopped {
                    st.queue.clear();
                    return;
                }
                let ix = st.queue.pop_front().expect("non-empty");
                st.current = Some(ix.name.clone());
                ix
            };
            let started = std::time::Instant::now();
            // A panic in one training must not end background training for good.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ix.train_background(&TrainParams {
                    time_limit: self.time_limit,
                    coarse_min_bytes: self.coarse_min_bytes,
                    ..TrainParams::default()
                })
            }));
            let secs = started.elapsed().as_secs_f64();
            match result {
                Ok(Ok(k)) => {
                    crate::metrics::training(&ix.name, true, true, secs);
                    tracing::info!(index = %ix.name, n_lists = k, secs, "background training finished")
                }
                Ok(Err(EngineError::Cancelled(r))) => {
                    crate::metrics::training(&ix.name, true, false, secs);
                    tracing::info!(index = %ix.name, reason = %r, "background training stopped")
                }
                Ok(Err(e)) => {
                    crate::metrics::training(&ix.name, true, false, secs);
                    tracing::warn!(index = %ix.name, error = %e, "background training failed")
                }
                Err(_) => {
                    crate::metrics::training(&ix.name, true, false, secs);
                    tracing::error!(index = %ix.name, "background training panicked; the worker goes on")
                }
            }
            self.state.lock().current = None;
        }
    }

    /// Stop the worker: the queue is dropped; a running training stops on its own (the
    /// engine's shutdown flag) and the worker then exits.
    pub fn stop(&self) {
        let mut st = self.state.lock();
        st.stopped = true;
        st.queue.clear();
        self.wake.notify_all();
    }

    /// Queue `ix` unless it is already queued or training. Returns whether it was queued.
    pub fn enqueue(&self, ix: Arc<Index>) -> bool {
        let mut st = self.state.lock();
        if st.stopped
            || st.current.as_deref() == Some(ix.name.as_str())
            || st.queue.iter().any(|q| q.name == ix.name)
        {
            return false;
        }
        st.queue.push_back(ix);
        self.wake.notify_one();
        true
    }

    /// Drop a deleted index from the queue.
    pub fn forget(&self, name: &str) {
        self.state.lock().queue.retain(|q| q.name != name);
    }

    pub fn mark_explicit(&self, name: &str) -> ExplicitMark<'_> {
        *self
            .state
            .lock()
            .explicit
            .entry(name.to_owned())
            .or_default() += 1;
        ExplicitMark {
            trainer: self,
            name: name.to_owned(),
        }
    }

    pub fn status(&self) -> TrainingStatus {
        let st = self.state.lock();
        let mut explicit: Vec<String> = st.explicit.keys().cloned().collect();
        explicit.sort();
        TrainingStatus {
            currently_training: st.current.clone().or_else(|| explicit.first().cloned()),
            queued: st.queue.iter().map(|q| q.name.clone()).collect(),
            explicit,
            worker_running: true,
        }
    }
}
