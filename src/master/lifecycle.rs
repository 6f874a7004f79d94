//! A worker's life as the master sees it: starting, ready, retiring (replaced by a successor that is ready
//! first), exited — and what the master does at each step: replacing on reload, recycling and harakiri,
//! respawning after a crash with back-off, stopping them all.

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
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
            Self::Reload => "reload",
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
    pub(super) phase: Phase,
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
        self.phase.state()
    }
}

/// Where a worker is in its life. Every change goes through one of the pure transitions below, which the
/// supervisor calls on events (a worker's message, its exit, a signal, a check) and which the tests drive
/// without processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Started, not yet accepting. `reload_when_ready`: a SIGHUP came meanwhile (it may have imported the
    /// code before it), so it is replaced as soon as it is ready.
    Starting { reload_when_ready: bool },
    /// Accepting, the one worker of its slot.
    Serving,
    /// Accepting while its successor (`by`) starts; it stops once that one is ready.
    Replaced { by: WorkerPid },
    /// Told to stop, or doomed by harakiri: its exit is expected.
    Retiring,
}

/// What a worker's exit means, from the phase it was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exit {
    /// It was told to stop: counted under its retirement's reason.
    Retired,
    /// It never became ready: the app does not load (fatal for the first generation).
    FailedToStart,
    /// It died while serving; `successor` already starting takes its place, or a new one is started.
    Crashed { successor: Option<WorkerPid> },
}

impl Phase {
    pub(super) const STARTING: Self = Self::Starting { reload_when_ready: false };

    pub(super) fn state(self) -> WorkerState {
        match self {
            Self::Starting { .. } => WorkerState::Starting,
            Self::Serving | Self::Replaced { .. } => WorkerState::Ready,
            Self::Retiring => WorkerState::Retiring,
        }
    }

    /// Taking connections (its slot counts as filled).
    pub(super) fn accepting(self) -> bool {
        matches!(self, Self::Serving | Self::Replaced { .. })
    }

    /// Ready and alone in its slot: the one phase a replacement (reload, recycling) starts from.
    pub(super) fn replaceable(self) -> bool {
        self == Self::Serving
    }

    /// The worker said it is ready. `true`: a reload came while it started, replace it now.
    pub(super) fn on_ready(self) -> (Self, bool) {
        match self {
            Self::Starting { reload_when_ready } => (Self::Serving, reload_when_ready),
            other => (other, false),
        }
    }

    /// SIGHUP: one still starting is replaced once ready (one serving is replaced by the caller now).
    pub(super) fn on_reload(self) -> Self {
        match self {
            Self::Starting { .. } => Self::Starting { reload_when_ready: true },
            other => other,
        }
    }

    /// Its successor `by` was started.
    pub(super) fn on_successor_started(self, by: WorkerPid) -> Self {
        match self {
            Self::Serving => Self::Replaced { by },
            other => other,
        }
    }

    /// Its successor exited before it was ready: it keeps serving.
    pub(super) fn on_successor_failed(self) -> Self {
        match self {
            Self::Replaced { .. } => Self::Serving,
            other => other,
        }
    }

    /// Told to stop (its successor is ready, or the master stops): from any phase.
    #[allow(clippy::unused_self)] // a transition like the others, though every phase leads to the same one
    pub(super) fn on_stop(self) -> Self {
        Self::Retiring
    }

    /// A request outlived `--harakiri`: it is doomed. `true` if it already has a successor (it was on its
    /// way out), so none is started.
    pub(super) fn on_harakiri(self) -> (Self, bool) {
        (Self::Retiring, matches!(self, Self::Retiring | Self::Replaced { .. }))
    }

    /// It exited.
    pub(super) fn on_exit(self) -> Exit {
        match self {
            Self::Retiring => Exit::Retired,
            Self::Starting { .. } => Exit::FailedToStart,
            Self::Serving => Exit::Crashed { successor: None },
            Self::Replaced { by } => Exit::Crashed { successor: Some(by) },
        }
    }
}

impl Supervisor<'_> {
    pub(super) fn on_ready(&mut self, pid: WorkerPid) {
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        let (phase, reload_now) = worker.phase.on_ready();
        worker.phase = phase;
        info!("worker {} (pid {pid}) ready", worker.slot);
        // The replacement accepts: now the worker it replaces stops accepting and finishes its requests.
        let replaced =
            self.workers.iter().find(|(_, w)| w.phase == Phase::Replaced { by: pid }).map(|(&old, _)| old);
        if let Some(old) = replaced {
            self.stop_worker(old);
        }
        if reload_now {
            self.retire(pid, Retirement::Reload);
        }
        let ready_slots: std::collections::HashSet<usize> =
            self.workers.values().filter(|w| w.phase.accepting()).map(|w| w.slot).collect();
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
        if !worker.phase.replaceable() || backing_off {
            return;
        }
        let slot = worker.slot;
        info!("replacing worker {slot} (pid {pid}): {reason}");
        match self.spawn(slot) {
            Ok(new) => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.phase = worker.phase.on_successor_started(new);
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
        let (phase, successor_exists) = worker.phase.on_harakiri();
        worker.phase = phase;
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

    /// Replaces every worker with one that loads the app anew; `cause` (SIGHUP, --touch-reload) is logged.
    pub(super) fn reload(&mut self, cause: &str) {
        let current: Vec<WorkerPid> =
            self.workers.iter().filter(|(_, w)| w.phase.replaceable()).map(|(&pid, _)| pid).collect();
        // Workers still starting (a replacement, a respawn) may have imported the code before this SIGHUP:
        // they are replaced too, as soon as they are ready.
        let mut starting = 0;
        for worker in self.workers.values_mut() {
            if let Phase::Starting { .. } = worker.phase {
                worker.phase = worker.phase.on_reload();
                starting += 1;
            }
        }
        info!("{cause}: replacing {} workers with ones that load the app anew", current.len() + starting);
        for pid in current {
            self.retire(pid, Retirement::Reload);
        }
    }

    pub(super) async fn on_exit(
        &mut self,
        pid: WorkerPid,
        status: &io::Result<ExitStatus>,
    ) -> Result<(), MasterError> {
        let running = self.running_requests(pid);
        let Some(worker) = self.forget(pid) else { return Ok(()) };
        let (slot, how) = (worker.slot, describe_exit(status));
        let successor = match worker.phase.on_exit() {
            Exit::Retired => {
                self.retired(pid, &worker, &how);
                return Ok(());
            }
            Exit::Crashed { successor } => successor,
            Exit::FailedToStart => {
                return self.failed_to_start(pid, &worker, how).await;
            }
        };
        let during = match &running[..] {
            [] => String::new(),
            [line] => format!(" while running {line}"),
            lines => format!(" while running {} requests: {}", lines.len(), lines.join(", ")),
        };
        error!("worker {slot} (pid {pid}) {how}{during}; starting a new one");
        self.count_restart(RestartReason::Crash);
        if let Some(replacement) = successor {
            // Its replacement is already starting: that one takes the place.
            info!("worker {slot}'s replacement (pid {replacement}) takes its place");
            return Ok(());
        }
        self.respawn_later(slot, worker.started.elapsed());
        Ok(())
    }

    /// Worker `pid`, told to stop, exited.
    fn retired(&mut self, pid: WorkerPid, worker: &Worker, how: &str) {
        info!("worker {} (pid {pid}) retired: it {how}", worker.slot);
        if let Some(reason) = worker.retirement {
            self.count_restart(reason);
        }
    }

    /// Worker `pid` exited before it was ready.
    async fn failed_to_start(
        &mut self,
        pid: WorkerPid,
        worker: &Worker,
        how: String,
    ) -> Result<(), MasterError> {
        let slot = worker.slot;
        error!("worker {slot} (pid {pid}) could not start: it {how}");
        let replaced = self.workers.values_mut().find(|w| w.phase == Phase::Replaced { by: pid });
        if let Some(old) = replaced {
            // A broken reload keeps the old code serving; recycling is tried again after the back-off.
            old.phase = old.phase.on_successor_failed();
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
        self.stop_all(Signal::SIGTERM);
        self.wait_all(self.config.server.graceful_timeout).await;
        Err(MasterError::FirstStart { slot, how })
    }

    /// The requests worker `pid` is running (read before its cell is released when it exits).
    fn running_requests(&self, pid: WorkerPid) -> Vec<String> {
        let cell = self.workers.get(&pid).and_then(|worker| worker.cell);
        match (&self.books, cell) {
            (Some((books, _)), Some(cell)) => books.running_requests(cell),
            _ => Vec::new(),
        }
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
            worker.phase = worker.phase.on_stop();
            send_signal(pid, Signal::SIGTERM);
        }
    }

    /// Tells every worker to stop with `signal` (SIGTERM: gracefully; SIGKILL: now): from here each one's
    /// exit is a retirement, never a crash to replace.
    pub(super) fn stop_all(&mut self, signal: Signal) {
        for worker in self.workers.values_mut() {
            worker.phase = worker.phase.on_stop();
        }
        self.signal_all(signal);
    }

    pub(super) fn signal_all(&self, signal: Signal) {
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
                    // Every worker was told to stop (`stop_all`): its exit goes through the lifecycle
                    // like any retirement.
                    if let Some(worker) = self.forget(pid) {
                        debug_assert_eq!(worker.phase.on_exit(), Exit::Retired);
                        self.retired(pid, &worker, &describe_exit(&status));
                    }
                }
                Ok(Some(Event::Kill { pid })) if self.workers.contains_key(&pid) => {
                    send_signal(pid, Signal::SIGKILL);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    warn!("{} workers still running after {limit:?}: killing them", self.workers.len());
                    self.signal_all(Signal::SIGKILL);
                    self.workers.clear();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STARTING: Phase = Phase::STARTING;

    fn successor() -> WorkerPid {
        WorkerPid::fake(4242)
    }

    #[test]
    fn a_worker_starts_then_serves() {
        assert_eq!(STARTING.state(), WorkerState::Starting);
        assert!(!STARTING.accepting() && !STARTING.replaceable());
        let (serving, reload_now) = STARTING.on_ready();
        assert_eq!((serving, reload_now), (Phase::Serving, false));
        assert_eq!(serving.state(), WorkerState::Ready);
        assert!(serving.accepting() && serving.replaceable());
        // Saying it again changes nothing.
        assert_eq!(serving.on_ready(), (Phase::Serving, false));
    }

    #[test]
    fn a_reload_while_starting_replaces_it_once_ready() {
        let doomed = STARTING.on_reload();
        assert_eq!(doomed, Phase::Starting { reload_when_ready: true });
        assert_eq!(doomed.state(), WorkerState::Starting);
        assert_eq!(doomed.on_ready(), (Phase::Serving, true));
        // A reload during a reload: one still starting stays marked once; one serving is the caller's.
        assert_eq!(doomed.on_reload(), doomed);
        assert_eq!(Phase::Serving.on_reload(), Phase::Serving);
    }

    #[test]
    fn a_replacement_pair_hands_over_only_once_the_successor_is_ready() {
        let replaced = Phase::Serving.on_successor_started(successor());
        assert_eq!(replaced, Phase::Replaced { by: successor() });
        assert!(replaced.accepting(), "it keeps serving while its successor starts");
        assert!(!replaced.replaceable(), "no second successor");
        assert_eq!(replaced.state(), WorkerState::Ready);
        // The successor is ready: this one is told to stop; its exit is then a retirement.
        let retiring = replaced.on_stop();
        assert_eq!(retiring.state(), WorkerState::Retiring);
        assert!(!retiring.accepting());
        assert_eq!(retiring.on_exit(), Exit::Retired);
    }

    #[test]
    fn a_successor_that_fails_to_start_leaves_the_old_one_serving() {
        let replaced = Phase::Serving.on_successor_started(successor());
        assert_eq!(replaced.on_successor_failed(), Phase::Serving);
        assert_eq!(STARTING.on_exit(), Exit::FailedToStart, "the successor's own exit");
        // Only a replaced worker goes back to serving.
        assert_eq!(Phase::Retiring.on_successor_failed(), Phase::Retiring);
    }

    #[test]
    fn only_a_serving_worker_gets_a_successor() {
        for phase in [STARTING, Phase::Replaced { by: successor() }, Phase::Retiring] {
            assert_eq!(phase.on_successor_started(successor()), phase, "{phase:?}");
            assert!(!phase.replaceable(), "{phase:?}");
        }
    }

    #[test]
    fn harakiri_needs_a_successor_only_for_a_worker_not_already_leaving() {
        assert_eq!(Phase::Serving.on_harakiri(), (Phase::Retiring, false));
        assert_eq!(Phase::Replaced { by: successor() }.on_harakiri(), (Phase::Retiring, true));
        // Harakiri while retiring: its successor is already there.
        assert_eq!(Phase::Retiring.on_harakiri(), (Phase::Retiring, true));
        assert_eq!(Phase::Serving.on_harakiri().0.on_exit(), Exit::Retired);
    }

    #[test]
    fn an_exit_means_what_the_phase_says() {
        assert_eq!(Phase::Serving.on_exit(), Exit::Crashed { successor: None });
        assert_eq!(
            Phase::Replaced { by: successor() }.on_exit(),
            Exit::Crashed { successor: Some(successor()) },
            "a crash while replaced: the successor takes the place"
        );
        assert_eq!(Phase::Starting { reload_when_ready: true }.on_exit(), Exit::FailedToStart);
        assert_eq!(Phase::Retiring.on_exit(), Exit::Retired);
    }

    #[test]
    fn a_stop_retires_a_worker_in_any_phase() {
        for phase in [STARTING, Phase::Serving, Phase::Replaced { by: successor() }, Phase::Retiring] {
            assert_eq!(phase.on_stop().on_exit(), Exit::Retired, "{phase:?}");
        }
    }
}
