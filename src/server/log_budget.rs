//! A budget of log lines per second for events a peer (or an exhausted machine) can cause at any rate:
//! refused connections, failing accepts. Past the budget the events are counted, and the next line that
//! goes out says how many were left out, so a flood costs a few lines a second and still shows its size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The budget is renewed this often.
const INTERVAL: Duration = Duration::from_secs(1);

/// Shared by every thread of a worker that logs one kind of event.
pub(super) struct LogBudget {
    epoch: Instant,
    lines_per_interval: u64,
    /// Milliseconds since `epoch` when the current interval started.
    interval_start: AtomicU64,
    /// Lines logged in the current interval.
    used: AtomicU64,
    /// Events not logged since the last line that went out.
    unlogged: AtomicU64,
}

impl LogBudget {
    pub(super) fn new(lines_per_interval: u64) -> Self {
        Self {
            epoch: Instant::now(),
            lines_per_interval,
            interval_start: AtomicU64::new(0),
            used: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Whether this event may be logged. `Some(n)`: log it, and say that `n` others were not; `None`: it
    /// was counted instead.
    pub(super) fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let start = self.interval_start.load(Ordering::Relaxed);
        let interval = u64::try_from(INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(start) >= interval
            && self.interval_start.compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.lines_per_interval {
            Some(self.unlogged.swap(0, Ordering::Relaxed))
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// ` (N more not logged)` when some were left out, else nothing: to append to the line that goes out.
pub(super) fn left_out(unlogged: u64, what: &str) -> String {
    if unlogged == 0 {
        String::new()
    } else {
        format!(" ({unlogged} more {what} not logged since the last such line)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_the_budget_is_counted_and_reported_with_the_next_line() {
        let budget = LogBudget::new(3);
        let admitted: Vec<_> = (0..10).map(|_| budget.admit()).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none), "{admitted:?}");
        // A new interval: the budget is back, and the first line says how many were left out.
        budget.interval_start.store(0, Ordering::Relaxed);
        let epoch_back = Instant::now().checked_sub(INTERVAL * 2).expect("the clock is past 2 s");
        let budget = LogBudget { epoch: epoch_back, ..budget };
        assert_eq!(budget.admit(), Some(7));
        assert_eq!(budget.admit(), Some(0));
    }

    #[test]
    fn left_out_says_nothing_when_nothing_was() {
        assert_eq!(left_out(0, "refusals"), "");
        assert_eq!(left_out(4, "refusals"), " (4 more refusals not logged since the last such line)");
    }
}
