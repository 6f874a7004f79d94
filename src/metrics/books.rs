//! The master's books: the cells of its workers, and what only the master knows — restarts by reason,
//! harakiri kills, processes per worker number, the listening sockets' queues, each worker's memory. Turns
//! them into the `/metrics` and `--stats` documents when asked.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, warn};

use super::exposition::{self, RestartReason, Scrape, SocketQueue, WorkerState};
use super::layout::ThreadCell;
use super::region::{Cells, Region};
use super::stats::{self, StatsView, WorkerView};
use super::sys::{listen_queue, memory};

/// The oxwsgi version in `build_info` and the stats document.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Python oxwsgi was built against (the master itself never starts Python).
const PYTHON_VERSION: &str = env!("OXWSGI_PYTHON_VERSION");

/// A live worker process, as the supervisor describes it to the books.
pub struct WorkerInfo {
    /// Its number, 1..=N.
    pub id: usize,
    pub pid: u32,
    pub state: WorkerState,
    pub spawned_at: SystemTime,
    pub cell: Option<usize>,
}

/// A listening socket, by the name it was given.
pub struct SocketInfo<'a> {
    pub name: String,
    pub fd: BorrowedFd<'a>,
}

pub struct Books {
    cells: Cells,
    restarts: HashMap<RestartReason, u64>,
    harakiri_by_worker: HashMap<usize, u64>,
    spawns_by_worker: HashMap<usize, u64>,
    /// Sockets whose queue the kernel would not tell: warned about once.
    unreadable_sockets: Vec<String>,
    /// Checks (one a second per socket) that found an accept queue full: uWSGI's `listen_queue_errors`.
    listen_queue_full: u64,
}

impl Books {
    pub fn new(region: Region) -> Self {
        Self {
            cells: Cells::new(region),
            restarts: HashMap::new(),
            harakiri_by_worker: HashMap::new(),
            spawns_by_worker: HashMap::new(),
            unreadable_sockets: Vec::new(),
            listen_queue_full: 0,
        }
    }

    pub fn region(&self) -> &Region {
        self.cells.region()
    }

    /// A worker with number `id` is being started: its cell, if one is free.
    pub fn spawned(&mut self, id: usize) -> Option<usize> {
        *self.spawns_by_worker.entry(id).or_default() += 1;
        let cell = self.cells.assign();
        if cell.is_none() {
            warn!("no free metrics cell for worker {id}: its requests go uncounted until it is replaced");
        }
        cell
    }

    /// The requests the worker on `cell` was running (or is: read before [`Books::exited`]), as
    /// `METHOD URI` lines.
    pub fn running_requests(&self, cell: usize) -> Vec<String> {
        let Some(snapshot) = self.cells.snapshot(cell) else { return Vec::new() };
        let threads = usize::try_from(snapshot.gauges.threads).unwrap_or(usize::MAX);
        snapshot.gauges.thread_cells.iter().take(threads).filter_map(ThreadCell::running).collect()
    }

    /// A worker process exited: its counts join the totals.
    pub fn exited(&mut self, cell: Option<usize>) {
        if let Some(cell) = cell {
            self.cells.release(cell);
        }
    }

    pub fn restarted(&mut self, reason: RestartReason) {
        *self.restarts.entry(reason).or_default() += 1;
    }

    /// The master found a socket's accept queue full.
    pub fn listen_queue_full(&mut self) {
        self.listen_queue_full += 1;
    }

    pub fn harakiri(&mut self, id: usize) {
        *self.harakiri_by_worker.entry(id).or_default() += 1;
    }

    /// The Prometheus document.
    pub fn metrics(
        &mut self,
        workers: &[WorkerInfo],
        sockets: &[SocketInfo<'_>],
    ) -> Result<String, prometheus::Error> {
        let counters = self.cells.counters();
        let (in_flight, threads, busy_threads) = self.cells.gauges();
        let sockets = self.socket_queues(sockets);
        let mut by_state = [0; WorkerState::ALL.len()];
        for worker in workers {
            by_state[WorkerState::ALL.iter().position(|&s| s == worker.state).unwrap_or_default()] += 1;
        }
        let rss: Vec<(usize, u64)> =
            newest_per_id(workers).iter().filter_map(|w| Some((w.id, memory(w.pid)?.resident))).collect();
        exposition::render(&Scrape {
            counters: &counters,
            in_flight,
            threads,
            busy_threads,
            sockets: &sockets,
            workers: by_state,
            restarts: RestartReason::ALL.map(|reason| self.restarts.get(&reason).copied().unwrap_or(0)),
            harakiri: self.harakiri_by_worker.values().sum(),
            rss: &rss,
            version: VERSION,
            python_version: PYTHON_VERSION,
        })
    }

    /// The uWSGI stats document: one entry per worker number (its newest process).
    pub fn stats(&mut self, workers: &[WorkerInfo], sockets: &[SocketInfo<'_>]) -> String {
        let sockets = self.socket_queues(sockets);
        let (load, _, _) = self.cells.gauges();
        let workers = newest_per_id(workers)
            .into_iter()
            .map(|w| {
                let memory = memory(w.pid).unwrap_or_default();
                WorkerView {
                    id: w.id,
                    pid: w.pid,
                    accepting: w.state == WorkerState::Ready,
                    rss: memory.resident,
                    vsz: memory.size,
                    last_spawn: w.spawned_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    respawn_count: self.spawns_by_worker.get(&w.id).map_or(0, |n| n.saturating_sub(1)),
                    harakiri_count: self.harakiri_by_worker.get(&w.id).copied().unwrap_or(0),
                    cell: w.cell.and_then(|cell| self.cells.snapshot(cell)),
                }
            })
            .collect();
        let view = StatsView {
            version: VERSION,
            pid: std::process::id(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            cwd: std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            load,
            listen_queue_errors: self.listen_queue_full,
            sockets: &sockets,
            workers,
        };
        stats::render(&view).to_string()
    }

    fn socket_queues(&mut self, sockets: &[SocketInfo<'_>]) -> Vec<SocketQueue> {
        sockets
            .iter()
            .map(|socket| match listen_queue(socket.fd) {
                Ok(depth) => SocketQueue {
                    name: socket.name.clone(),
                    queued: Some(depth.queued),
                    max: Some(depth.max),
                },
                Err(err) => {
                    if self.unreadable_sockets.contains(&socket.name) {
                        debug!("cannot read the listen queue of {}: {err}", socket.name);
                    } else {
                        warn!("cannot read the listen queue of {} from the kernel: {err}", socket.name);
                        self.unreadable_sockets.push(socket.name.clone());
                    }
                    SocketQueue { name: socket.name.clone(), queued: None, max: None }
                }
            })
            .collect()
    }
}

/// Per worker number, the process that took it last (a replacement overlaps the worker it replaces).
fn newest_per_id(workers: &[WorkerInfo]) -> Vec<&WorkerInfo> {
    let mut newest: Vec<&WorkerInfo> = Vec::new();
    for worker in workers {
        match newest.iter_mut().find(|w| w.id == worker.id) {
            Some(known) if known.spawned_at < worker.spawned_at => *known = worker,
            Some(_) => {}
            None => newest.push(worker),
        }
    }
    newest.sort_by_key(|w| w.id);
    newest
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_newest_process_speaks_for_its_number() {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let worker = |id, pid, secs| WorkerInfo {
            id,
            pid,
            state: WorkerState::Ready,
            spawned_at: at(secs),
            cell: None,
        };
        let workers = [worker(2, 20, 5), worker(1, 10, 1), worker(1, 11, 9), worker(2, 21, 3)];
        let pids: Vec<u32> = newest_per_id(&workers).iter().map(|w| w.pid).collect();
        assert_eq!(pids, [11, 20]);
    }

    #[test]
    fn reads_this_processs_memory() {
        let mine = memory(std::process::id()).unwrap();
        assert!(mine.resident > 0 && mine.size >= mine.resident, "{mine:?}");
    }
}
