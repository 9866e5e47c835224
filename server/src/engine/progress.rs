//! Training progress: the phase an index's training is in, how far, since when. Shown by
//! `training-status` and logged at INFO every few seconds while a training runs.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The phases of a training, in order, with the share of the whole each is taken to be
/// (for one overall fraction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sampling,
    KMeans,
    Assigning,
    Writing,
    Swapping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Sampling => "sampling",
            Phase::KMeans => "kmeans",
            Phase::Assigning => "assigning",
            Phase::Writing => "writing",
            Phase::Swapping => "swapping",
        }
    }
    /// `(start, width)` of the phase in the overall fraction.
    fn span(self) -> (f64, f64) {
        match self {
            Phase::Sampling => (0.0, 0.05),
            Phase::KMeans => (0.05, 0.55),
            Phase::Assigning => (0.60, 0.15),
            Phase::Writing => (0.75, 0.23),
            Phase::Swapping => (0.98, 0.02),
        }
    }
}

/// A snapshot for `training-status`.
#[derive(Debug, Clone)]
pub struct TrainingProgress {
    pub index: String,
    pub phase: &'static str,
    /// Within the phase: k-means iteration, blocks assigned, batches written, rows sampled.
    pub step: usize,
    pub steps: usize,
    /// Of the whole training, 0 to 1.
    pub fraction: f64,
    pub elapsed_seconds: f64,
}

const LOG_EVERY: Duration = Duration::from_secs(2);

struct State {
    phase: Phase,
    step: usize,
    steps: usize,
    logged: Instant,
}

/// The live progress of one training.
pub struct Progress {
    index: String,
    started: Instant,
    state: Mutex<State>,
}

impl Progress {
    pub fn new(index: &str) -> Self {
        let now = Instant::now();
        Self {
            index: index.to_owned(),
            started: now,
            state: Mutex::new(State {
                phase: Phase::Sampling,
                step: 0,
                steps: 0,
                logged: now,
            }),
        }
    }

    /// Record where the training is; logs at INFO when the last line is old enough.
    pub fn set(&self, phase: Phase, step: usize, steps: usize) {
        let mut s = self.state.lock();
        s.phase = phase;
        s.step = step.min(steps);
        s.steps = steps;
        if s.logged.elapsed() >= LOG_EVERY {
            s.logged = Instant::now();
            let f = fraction(phase, s.step, s.steps);
            drop(s);
            tracing::info!(index = %self.index, phase = phase.as_str(), step, steps, percent = (f * 100.0).round(), elapsed_s = self.started.elapsed().as_secs(), "training in progress");
        }
    }

    /// Advance the step of the current phase by one (for parallel work).
    pub fn step(&self) {
        let (phase, step, steps) = {
            let s = self.state.lock();
            (s.phase, s.step + 1, s.steps)
        };
        self.set(phase, step, steps);
    }

    pub fn snapshot(&self) -> TrainingProgress {
        let s = self.state.lock();
        TrainingProgress {
            index: self.index.clone(),
            phase: s.phase.as_str(),
            step: s.step,
            steps: s.steps,
            fraction: fraction(s.phase, s.step, s.steps),
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

fn fraction(phase: Phase, step: usize, steps: usize) -> f64 {
    let (start, width) = phase.span();
    let within = if steps == 0 {
        0.0
    } else {
        step as f64 / steps as f64
    };
    (start + width * within).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fraction_grows_through_the_phases() {
        let p = Progress::new("i");
        let mut last = -1.0;
        for (phase, step, steps) in [
            (Phase::Sampling, 0, 10),
            (Phase::Sampling, 10, 10),
            (Phase::KMeans, 3, 25),
            (Phase::KMeans, 25, 25),
            (Phase::Assigning, 5, 9),
            (Phase::Writing, 1, 2),
            (Phase::Swapping, 1, 1),
        ] {
            p.set(phase, step, steps);
            let s = p.snapshot();
            assert!(s.fraction >= last, "{s:?}");
            assert_eq!(s.phase, phase.as_str());
            last = s.fraction;
        }
        assert_eq!(last, 1.0);
    }
}
