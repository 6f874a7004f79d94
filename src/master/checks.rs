//! What the master checks every second: workers due for recycling (`--max-worker-lifetime`,
//! `--reload-on-rss`, a retirement whose replacement failed), full listen queues, and `--touch-reload`
//! files that changed.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::lifecycle::Retirement;
use super::spawn::WorkerPid;
use super::Supervisor;
use crate::metrics::sys::{listen_queue, memory};

/// How often the master checks memory, lifetimes and the listen queues.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A queue that stays full is logged again after this long, not every check.
const LISTEN_QUEUE_WARN_EVERY: Duration = Duration::from_secs(10);

/// The `--touch-reload` files and the modification time each had when last looked at (`None`: missing).
pub(super) struct TouchReload(Vec<(PathBuf, Option<SystemTime>)>);

impl TouchReload {
    /// Looks at each file now, so that only a change after the master started reloads.
    pub(super) fn new(files: &[PathBuf]) -> Self {
        Self(files.iter().map(|path| (path.clone(), modified(path))).collect())
    }

    /// The first file whose modification time changed since the last look, or that appeared; every file's
    /// time is updated, so one touch reloads once. A file removed changes nothing (deploy scripts that
    /// recreate it then count as a touch when it is back).
    fn changed(&mut self) -> Option<&Path> {
        let mut changed = None;
        for (index, (path, seen)) in self.0.iter_mut().enumerate() {
            let now = modified(path);
            if now.is_some() && now != *seen && changed.is_none() {
                changed = Some(index);
            }
            *seen = now;
        }
        changed.map(|index| self.0[index].0.as_path())
    }
}

/// The file's modification time; `None` if it cannot be read (missing, no permission).
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|meta| meta.modified()).ok()
}

impl Supervisor<'_> {
    /// A `--touch-reload` file changed: reload as SIGHUP does.
    pub(super) fn check_touch_reload(&mut self) {
        let Some(path) = self.touch_reload.changed() else { return };
        info!("--touch-reload {} changed", path.display());
        self.reload("--touch-reload");
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touch_or_a_new_file_counts_once_and_a_removal_not_at_all() {
        let dir = std::env::temp_dir().join(format!("oxwsgi-touch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (existing, later) = (dir.join("existing"), dir.join("later"));
        std::fs::write(&existing, "").unwrap();
        let mut touch = TouchReload::new(&[existing.clone(), later.clone()]);
        assert_eq!(touch.changed(), None);
        std::fs::write(&later, "").unwrap();
        assert_eq!(touch.changed(), Some(later.as_path()), "a file that appears");
        assert_eq!(touch.changed(), None, "once");
        let file = std::fs::File::options().write(true).open(&existing).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(touch.changed(), Some(existing.as_path()), "a changed time, even an earlier one");
        std::fs::remove_file(&existing).unwrap();
        assert_eq!(touch.changed(), None, "a removal");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
