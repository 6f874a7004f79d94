//! What the master checks every second: workers due for recycling (`--max-worker-lifetime`,
//! `--reload-on-rss`, a retirement whose replacement failed) and full listen queues.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use tracing::warn;

use super::lifecycle::Retirement;
use super::spawn::WorkerPid;
use super::Supervisor;
use crate::metrics::sys::{listen_queue, memory};

/// How often the master checks memory, lifetimes and the listen queues.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A queue that stays full is logged again after this long, not every check.
const LISTEN_QUEUE_WARN_EVERY: Duration = Duration::from_secs(10);

impl Supervisor<'_> {
    /// Warns when a socket's accept queue is full: every worker is busy, and nginx's new connections wait
    /// or are refused (502). uWSGI logs the same condition each cycle; operators grep for it.
    pub(super) fn check_listen_queues(&mut self) {
        for (index, (name, socket)) in self.socket_names.iter().zip(&self.handoff).enumerate() {
            // Read errors are reported by the metrics, which need the number; here only a full queue matters.
            let Ok(depth) = listen_queue(socket.as_fd()) else { continue };
            if depth.max == 0 || depth.queued < depth.max {
                continue;
            }
            if let Some((books, _)) = &mut self.books {
                books.listen_queue_full();
            }
            let warned = &mut self.listen_queue_warned[index];
            if warned.is_none_or(|at| at.elapsed() >= LISTEN_QUEUE_WARN_EVERY) {
                warn!(
                    "listen queue of socket {name} full ({}/{}): every worker is busy; add --processes or \
                     --threads, or find what makes requests slow",
                    depth.queued, depth.max
                );
                *warned = Some(Instant::now());
            }
        }
    }

    pub(super) fn check_limits(&mut self) {
        let recycle = self.config.processes.recycle;
        let due: Vec<(WorkerPid, Retirement)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.phase.replaceable())
            .filter_map(|(&pid, w)| {
                // A retirement whose replacement failed (--max-requests is asked for only once).
                if let Some((reason, _)) = w.pending {
                    return Some((pid, reason));
                }
                if recycle.max_worker_lifetime.is_some_and(|limit| w.started.elapsed() >= limit) {
                    return Some((pid, Retirement::Lifetime));
                }
                let rss = recycle
                    .reload_on_rss
                    .and_then(|limit| memory(pid.get()).map(|m| m.resident).filter(|&rss| rss > limit));
                rss.map(|_| (pid, Retirement::Rss))
            })
            .collect();
        for (pid, reason) in due {
            self.retire(pid, reason);
        }
    }
}
