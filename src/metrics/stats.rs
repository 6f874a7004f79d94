//! The `--stats` document: uWSGI's stats-server JSON, with the keys in uWSGI's order, so the tools built for
//! it (uwsgitop, `uwsgi_exporter`, Telegraf, Netdata) read oxwsgi unchanged. Pure: no I/O here.
//!
//! What oxwsgi has no equivalent for is present with uWSGI's neutral value (0, empty), never left out:
//! those tools index the keys directly.

use serde_json::{json, Value};

use super::exposition::SocketQueue;
use super::layout::{WorkerCell, TRACKED_THREADS};

/// The master's view, at the moment of the request.
pub struct StatsView<'a> {
    pub version: &'a str,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cwd: String,
    /// Connections in flight over all workers (uWSGI's `load`).
    pub load: u64,
    /// Times the master found an accept queue full.
    pub listen_queue_errors: u64,
    pub sockets: &'a [SocketQueue],
    pub workers: Vec<WorkerView>,
}

/// One worker process.
pub struct WorkerView {
    /// Its number, 1..=N, stable across replacements (uWSGI's worker id).
    pub id: usize,
    pub pid: u32,
    pub accepting: bool,
    pub rss: u64,
    pub vsz: u64,
    /// When it was started, in seconds since the Unix epoch.
    pub last_spawn: u64,
    /// How many processes held this number before it.
    pub respawn_count: u64,
    pub harakiri_count: u64,
    /// Its cell, read now; `None` if it serves uncounted.
    pub cell: Option<Box<WorkerCell<u64>>>,
}

/// The stats document.
pub fn render(view: &StatsView<'_>) -> Value {
    let sockets: Vec<Value> = view
        .sockets
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "proto": "uwsgi",
                "queue": s.queued.unwrap_or(0),
                "max_queue": s.max.unwrap_or(0),
                "shared": 0,
                "can_offload": 0,
            })
        })
        .collect();
    json!({
        "version": view.version,
        "listen_queue": view.sockets.iter().filter_map(|s| s.queued).sum::<u64>(),
        "listen_queue_errors": view.listen_queue_errors,
        "signal_queue": 0,
        "load": view.load,
        "pid": view.pid,
        "uid": view.uid,
        "gid": view.gid,
        "cwd": view.cwd,
        "locks": [],
        "sockets": sockets,
        "workers": view.workers.iter().map(worker).collect::<Vec<_>>(),
    })
}

fn worker(worker: &WorkerView) -> Value {
    let empty;
    let cell = if let Some(cell) = &worker.cell {
        cell
    } else {
        empty = super::words::zeroed::<WorkerCell<u64>>();
        &empty
    };
    let counters = &cell.counters;
    let requests = counters.total_requests();
    let duration = &counters.request_duration;
    let running_time = duration.sum_nanos / 1000;
    // uWSGI's avg_rt is a running blend of the last requests; the plain mean is what readers take it for.
    let avg_rt = running_time.checked_div(duration.count()).unwrap_or(0);
    let busy = cell.gauges.busy_threads > 0;
    let threads = usize::try_from(cell.gauges.threads).unwrap_or(usize::MAX).min(TRACKED_THREADS);
    let cores: Vec<Value> = cell.gauges.thread_cells[..threads]
        .iter()
        .enumerate()
        .map(|(id, thread)| {
            json!({
                "id": id,
                "requests": thread.requests,
                "static_requests": 0,
                "routed_requests": 0,
                "offloaded_requests": 0,
                "write_errors": 0,
                "read_errors": 0,
                "in_request": thread.busy,
                "vars": [],
                "req_info": {},
            })
        })
        .collect();
    json!({
        "id": worker.id,
        "pid": worker.pid,
        "accepting": u8::from(worker.accepting),
        "requests": requests,
        "delta_requests": requests,
        "exceptions": counters.app_exceptions,
        "harakiri_count": worker.harakiri_count,
        "signals": 0,
        "signal_queue": 0,
        "status": if busy { "busy" } else { "idle" },
        "rss": worker.rss,
        "vsz": worker.vsz,
        "uss": 0,
        "pss": 0,
        "running_time": running_time,
        "last_spawn": worker.last_spawn,
        "respawn_count": worker.respawn_count,
        "tx": counters.response_bytes,
        "avg_rt": avg_rt,
        "apps": [{
            "id": 0,
            "modifier1": 0,
            "mountpoint": "",
            "startup_time": 0,
            "requests": requests,
            "exceptions": counters.app_exceptions,
            "chdir": "",
        }],
        "cores": cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::layout::FIRST_STATUS;
    use crate::metrics::model::Method;
    use crate::metrics::words;

    #[test]
    fn has_uwsgis_keys_in_uwsgis_order() {
        let mut cell = words::zeroed::<WorkerCell<u64>>();
        cell.counters.requests[Method::Get as usize][usize::from(200 - FIRST_STATUS)] = 4;
        cell.counters.request_duration.buckets[0] = 4;
        cell.counters.request_duration.sum_nanos = 8_000_000;
        cell.counters.response_bytes = 400;
        cell.gauges.threads = 2;
        cell.gauges.busy_threads = 1;
        cell.gauges.thread_cells[1].busy = 1;
        cell.gauges.thread_cells[1].requests = 4;
        let sockets = [SocketQueue { name: "127.0.0.1:3031".into(), queued: Some(2), max: Some(100) }];
        let view = StatsView {
            version: "0.1.0",
            pid: 10,
            uid: 0,
            gid: 0,
            cwd: "/srv".into(),
            load: 1,
            listen_queue_errors: 0,
            sockets: &sockets,
            workers: vec![WorkerView {
                id: 1,
                pid: 11,
                accepting: true,
                rss: 1 << 20,
                vsz: 1 << 22,
                last_spawn: 1_700_000_000,
                respawn_count: 0,
                harakiri_count: 0,
                cell: Some(cell),
            }],
        };
        let doc = render(&view);
        let keys: Vec<&str> = doc.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "version",
                "listen_queue",
                "listen_queue_errors",
                "signal_queue",
                "load",
                "pid",
                "uid",
                "gid",
                "cwd",
                "locks",
                "sockets",
                "workers"
            ]
        );
        assert_eq!(doc["listen_queue"], 2);
        let worker = &doc["workers"][0];
        assert_eq!(worker["requests"], 4);
        assert_eq!(worker["status"], "busy");
        assert_eq!(worker["avg_rt"], 2000, "microseconds");
        assert_eq!(worker["running_time"], 8000);
        assert_eq!(worker["tx"], 400);
        assert_eq!(worker["cores"].as_array().unwrap().len(), 2);
        assert_eq!(worker["cores"][1]["in_request"], 1);
    }

    #[test]
    fn an_uncounted_worker_still_has_every_key() {
        let worker = WorkerView {
            id: 2,
            pid: 12,
            accepting: false,
            rss: 0,
            vsz: 0,
            last_spawn: 0,
            respawn_count: 3,
            harakiri_count: 1,
            cell: None,
        };
        let doc = super::worker(&worker);
        for key in ["requests", "exceptions", "status", "avg_rt", "tx", "cores", "apps", "running_time"] {
            assert!(doc.get(key).is_some(), "{key}");
        }
        assert_eq!(doc["status"], "idle");
        assert_eq!(doc["respawn_count"], 3);
    }
}
