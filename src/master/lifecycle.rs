//! A worker's life as the master sees it: starting, ready, retiring (replaced by a successor that is ready
//! first), exited — and what the master does at each step: replacing on reload, recycling and harakiri,
//! respawning after a crash with back-off, stopping them all.

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use super::spawn::{send_signal, WorkerPid};
use super::{describe_exit, Event, MasterError, Supervisor};
use crate::metrics::exposition::{RestartReason, WorkerState};

/// First delay before replacing a worker that died soon after starting; doubles up to the maximum, so a
/// worker crashing at every request does not spin the machine.
pub(super) const RESPAWN_BACKOFF_MIN: Duration = Duration::from_millis(100);

pub(super) const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A worker that served this long was healthy: the next one that dies is replaced at once.
pub(super) const HEALTHY_LIFETIME: Duration = Duration::from_secs(10);

/// Between a worker's harakiri report and its SIGKILL: the worker logs the stuck request's stack meanwhile.
pub(super) const HARAKIRI_GRACE: Duration = Duration::from_millis(500);

/// After the graceful timeout, workers get this long for their own clean-up before SIGKILL.
pub(super) const KILL_AFTER_GRACE: Duration = Duration::from_secs(15);

/// Why a healthy worker is replaced (its replacement accepts before it stops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retirement {
    Reload,
    MaxRequests,
    Rss,
    Lifetime,
}

impl From<Retirement> for RestartReason {
    fn from(retirement: Retirement) -> Self {
        match retirement {
            Retirement::Reload => Self::Reload,
            Retirement::MaxRequests => Self::MaxRequests,
            Retirement::Rss => Self::Rss,
            Retirement::Lifetime => Self::Lifetime,
        }
    }
}

impl fmt::Display for Retirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reload => "reload (SIGHUP)",
            Self::MaxRequests => "--max-requests reached",
            Self::Rss => "--reload-on-rss exceeded",
            Self::Lifetime => "--max-worker-lifetime reached",
        })
    }
}

/// One worker process, by pid.
pub(super) struct Worker {
    /// Which of the `--processes` places it fills (1..=N), also its `OXWSGI_WORKER_ID`.
    pub(super) slot: usize,
    pub(super) started: Instant,
    /// The same moment on the wall clock, for the stats' `last_spawn`.
    pub(super) spawned_at: SystemTime,
    pub(super) ready: bool,
    /// A replacement is starting (its pid): this one stops once that one is ready.
    pub(super) replaced_by: Option<WorkerPid>,
    /// Told to stop: its exit is expected.
    pub(super) retiring: bool,
    /// Due for replacement (for this reason) but its last replacement failed to start: tried again, from
    /// `retry_at` on, with the back-off, so a broken app on disk is not re-imported every second.
    pub(super) pending: Option<(Retirement, Instant)>,
    /// Why it is being replaced, counted once it exits.
    pub(super) retirement: Option<RestartReason>,
    /// Its metrics cell.
    pub(super) cell: Option<usize>,
}

impl Worker {
    pub(super) fn state(&self) -> WorkerState {
        if self.retiring {
            WorkerState::Retiring
        } else if self.ready {
            WorkerState::Ready
        } else {
            WorkerState::Starting
        }
    }
}

impl Supervisor<'_> {
    pub(super) fn on_ready(&mut self, pid: WorkerPid) {
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        worker.ready = true;
        info!("worker {} (pid {pid}) ready", worker.slot);
        // The replacement accepts: now the worker it replaces stops accepting and finishes its requests.
        let replaced = self.workers.iter().find(|(_, w)| w.replaced_by == Some(pid)).map(|(&old, _)| old);
        if let Some(old) = replaced {
            self.stop_worker(old);
        }
        if self.reload_when_ready.remove(&pid) {
            self.retire(pid, Retirement::Reload);
        }
        let ready_slots: std::collections::HashSet<usize> =
            self.workers.values().filter(|w| w.ready && !w.retiring).map(|w| w.slot).collect();
        if !self.started && ready_slots.len() == self.config.processes.workers.get() {
            self.started = true;
            info!("master ready: {} workers", self.config.processes.workers);
        }
    }

    /// Starts a replacement for `pid`; `pid` stops once the replacement accepts (never before, so no
    /// request finds nobody accepting).
    pub(super) fn retire(&mut self, pid: WorkerPid, reason: Retirement) {
        let Some(worker) = self.workers.get(&pid) else { return };
        let backing_off = worker.pending.is_some_and(|(_, retry_at)| Instant::now() < retry_at);
        if worker.retiring || worker.replaced_by.is_some() || !worker.ready || backing_off {
            return;
        }
        let slot = worker.slot;
        info!("replacing worker {slot} (pid {pid}): {reason}");
        match self.spawn(slot) {
            Ok(new) => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.replaced_by = Some(new);
                    worker.retirement = Some(reason.into());
                    // A failed reload is not retried on its own: the operator fixes the code and sends
                    // SIGHUP again. Recycling is retried.
                    worker.pending = (reason != Retirement::Reload).then(|| (reason, Instant::now()));
                }
            }
            Err(err) => error!("{err}; worker {slot} (pid {pid}) keeps running"),
        }
    }

    /// A request outlived `--harakiri` in worker `pid`: it is killed after [`HARAKIRI_GRACE`], and its
    /// replacement starts now (the stuck worker serves nothing meanwhile).
    pub(super) fn harakiri(&mut self, pid: WorkerPid) {
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        self.harakiri_count += 1;
        let slot = worker.slot;
        worker.retirement = Some(RestartReason::Harakiri);
        if let Some((books, _)) = &mut self.books {
            books.harakiri(slot);
        }
        // A worker already on its way out (reload, recycling) has its successor: none is needed.
        let successor_exists = worker.retiring || worker.replaced_by.is_some();
        worker.retiring = true;
        worker.replaced_by = None;
        error!(
            "harakiri #{} on worker {slot} (pid {pid}): killing it in {HARAKIRI_GRACE:?}",
            self.harakiri_count
        );
        // Through the supervisor, which kills it only if it has not been reaped (its pid could be reused).
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HARAKIRI_GRACE).await;
            let _ = events.send(Event::Kill { pid }).await;
        });
        if !successor_exists {
            self.spawn_or_retry(slot);
        }
    }

    pub(super) fn reload(&mut self) {
        let current: Vec<WorkerPid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && !w.retiring && w.replaced_by.is_none())
            .map(|(&pid, _)| pid)
            .collect();
        // Workers still starting (a replacement, a respawn) may have imported the code before this SIGHUP:
        // they are replaced too, as soon as they are ready.
        let starting: Vec<WorkerPid> =
            self.workers.iter().filter(|(_, w)| !w.ready).map(|(&pid, _)| pid).collect();
        info!(
            "SIGHUP received: replacing {} workers with ones that load the app anew",
            current.len() + starting.len()
        );
        self.reload_when_ready.extend(starting);
        for pid in current {
            self.retire(pid, Retirement::Reload);
        }
    }

    pub(super) async fn on_exit(
        &mut self,
        pid: WorkerPid,
        status: &io::Result<ExitStatus>,
    ) -> Result<(), MasterError> {
        self.reload_when_ready.remove(&pid);
        let Some(worker) = self.forget(pid) else { return Ok(()) };
        let (slot, how) = (worker.slot, describe_exit(status));
        if worker.retiring {
            info!("worker {slot} (pid {pid}) retired: it {how}");
            if let Some(reason) = worker.retirement {
                self.count_restart(reason);
            }
            return Ok(());
        }
        if !worker.ready {
            error!("worker {slot} (pid {pid}) could not start: it {how}");
            let replaced = self.workers.values_mut().find(|w| w.replaced_by == Some(pid));
            if let Some(old) = replaced {
                // A broken reload keeps the old code serving; recycling is tried again after the back-off.
                old.replaced_by = None;
                let retry_at = Instant::now() + self.backoff;
                old.pending = old.pending.map(|(reason, _)| (reason, retry_at));
                self.backoff = (self.backoff * 2).min(RESPAWN_BACKOFF_MAX);
                warn!("worker {slot} keeps running the code it loaded before");
                return Ok(());
            }
            if self.started {
                self.count_restart(RestartReason::Crash);
                self.respawn_later(slot, worker.started.elapsed());
                return Ok(());
            }
            self.signal_all(libc::SIGTERM);
            self.wait_all(self.config.server.graceful_timeout).await;
            return Err(MasterError::FirstStart { slot, how });
        }
        warn!("worker {slot} (pid {pid}) {how}; starting a new one");
        self.count_restart(RestartReason::Crash);
        if let Some(replacement) = worker.replaced_by {
            // Its replacement is already starting: that one takes the place.
            info!("worker {slot}'s replacement (pid {replacement}) takes its place");
            return Ok(());
        }
        self.respawn_later(slot, worker.started.elapsed());
        Ok(())
    }

    /// Removes an exited worker; its metrics cell joins the totals.
    pub(super) fn forget(&mut self, pid: WorkerPid) -> Option<Worker> {
        let worker = self.workers.remove(&pid)?;
        if let Some((books, _)) = &mut self.books {
            books.exited(worker.cell);
        }
        Some(worker)
    }

    pub(super) fn count_restart(&mut self, reason: RestartReason) {
        if let Some((books, _)) = &mut self.books {
            books.restarted(reason);
        }
    }

    pub(super) fn stop_worker(&mut self, pid: WorkerPid) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.retiring = true;
            worker.replaced_by = None;
            send_signal(pid, libc::SIGTERM);
        }
    }

    pub(super) fn signal_all(&self, signal: libc::c_int) {
        for &pid in self.workers.keys() {
            send_signal(pid, signal);
        }
    }

    /// Waits until every worker exited, or `limit` passed (then SIGKILLs the rest).
    pub(super) async fn wait_all(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Event::Exited { pid, status })) => {
                    if let Some(worker) = self.forget(pid) {
                        info!("worker {} (pid {pid}) {}", worker.slot, describe_exit(&status));
                    }
                }
                Ok(Some(Event::Kill { pid })) if self.workers.contains_key(&pid) => {
                    send_signal(pid, libc::SIGKILL);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    warn!("{} workers still running after {limit:?}: killing them", self.workers.len());
                    self.signal_all(libc::SIGKILL);
                    self.workers.clear();
                    return;
                }
            }
        }
    }
}
