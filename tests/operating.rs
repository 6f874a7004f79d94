//! Operating options on the real binary: `--touch-reload` replaces the workers without a failed request,
//! `--env` is in the app's environment at import, `--log-format json` writes lines that parse, and
//! `--logto` moves to a new file on SIGUSR1 in the master and in every worker.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::SystemTime;

use serde_json::Value;
use support::{app_path, run_to_exit, temp_dir, RequestBuilder, Response, Server, POLL_INTERVAL, POLL_TRIES};

/// Slow requests sent at once to reach both workers: more than one single-threaded worker takes.
const CONCURRENT_REQUESTS: usize = 5;

fn workers_app(args: &[&str]) -> Server {
    Server::builder().app(app_path("workers_app.py")).args(args).start()
}

fn pid_in(response: &Response) -> u32 {
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    let text = response.body_text();
    let pid = text.split_whitespace().find_map(|field| field.strip_prefix("pid=")).expect("a pid field");
    pid.parse().expect("a numeric pid")
}

/// The master's children (its workers), from /proc.
fn children(pid: u32) -> BTreeSet<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Polls `done` until it holds; panics with `what` and the log otherwise.
fn poll(what: &str, log: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    for _ in 0..POLL_TRIES * 2 {
        if done() {
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
    panic!("{what} never happened; log:\n{}", log());
}

#[test]
fn touch_reload_replaces_the_workers_without_a_failed_request() {
    let trigger = temp_dir().join("reload.trigger");
    let server = workers_app(&["--processes", "2", "--touch-reload", trigger.to_str().unwrap()]);
    server.wait_log("master ready");
    let first = children(server.pid());
    assert_eq!(first.len(), 2, "{}", server.log());
    let stop = AtomicBool::new(false);
    let served = thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                // Panics (and fails the test) on a request that is not answered 200.
                pid_in(&server.get("/"));
                served += 1;
            }
            served
        });
        // A file that did not exist appears: a reload.
        std::fs::write(&trigger, "").unwrap();
        let log = || server.log();
        poll("the reload", log, || {
            let now = children(server.pid());
            now.len() == 2 && now.is_disjoint(&first) && server.log().matches("retired").count() >= 2
        });
        // Its modification time changes: another one.
        let second = children(server.pid());
        let file = std::fs::File::options().write(true).open(&trigger).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        poll("the second reload", log, || {
            let now = children(server.pid());
            now.len() == 2 && now.is_disjoint(&second) && server.log().matches("retired").count() >= 4
        });
        stop.store(true, Ordering::Relaxed);
        load.join().expect("every request during the reloads was answered")
    });
    assert!(served > 0);
    let log = server.log();
    assert_eq!(log.matches(&format!("--touch-reload {} changed", trigger.display())).count(), 2, "{log}");
    assert!(log.contains("--touch-reload: replacing 2 workers"), "{log}");
}

/// An app that answers with the `--env` values as they were when it was imported.
fn env_app(dir: &Path) {
    std::fs::write(
        dir.join("env_app.py"),
        "import os\nAT_IMPORT = dict(os.environ)\n\ndef application(environ, start_response):\n    \
         start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
         return [repr((AT_IMPORT.get('GREETING'), AT_IMPORT.get('EMPTY'))).encode()]\n",
    )
    .unwrap();
}

#[test]
fn env_is_set_before_the_app_is_imported_with_and_without_a_master() {
    let dir = temp_dir();
    env_app(&dir);
    for extra in [&[][..], &["--processes", "2"][..]] {
        let server = Server::builder()
            .module("env_app")
            .args(&["--chdir", dir.to_str().unwrap(), "--env", "GREETING=hello=world", "--env", "EMPTY="])
            .args(extra)
            .start();
        let response = server.get("/");
        assert_eq!(response.body_text(), "('hello=world', '')", "{extra:?}: {response:?}");
    }
}

#[test]
fn a_malformed_env_is_one_error_line() {
    for bad in ["NOEQUALS", "=value"] {
        let output = run_to_exit(&["--socket", "/tmp/never.sock", "--module", "m", "--env", bad]);
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.trim_end(),
            format!("oxwsgi: error: --env {bad}: expected KEY=VALUE with a non-empty KEY")
        );
    }
}

/// The log's lines, each parsed as JSON (panics on one that is not).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}\n{log}"))
        })
        .collect()
}

fn access_lines(log: &str) -> Vec<Value> {
    json_lines(log).into_iter().filter(|line| line["target"] == "oxwsgi::access").collect()
}

#[test]
fn json_log_lines_parse_and_the_access_lines_carry_the_request() {
    let server = workers_app(&["--master", "--log-format", "json"]);
    server.wait_log("master ready");
    let worker = pid_in(&server.send(&RequestBuilder::get("/?a=1").set("HTTP_X_REQUEST_ID", b"f00d-42")));
    pid_in(&server.send(&RequestBuilder::get("/plain").set("REMOTE_ADDR", b"10.1.2.3")));
    let log = || server.log();
    poll("two access lines", log, || access_lines(&server.log()).len() == 2);
    let log = server.log();
    let lines = access_lines(&log);
    let first = &lines[0];
    assert_eq!(first["method"], "GET", "{first}");
    assert_eq!(first["uri"], "/?a=1", "{first}");
    assert_eq!(first["status"], 200, "{first}");
    assert!(first["bytes"].as_u64().is_some_and(|bytes| bytes > 0), "{first}");
    assert!(first["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{first}");
    assert_eq!(first["remote_addr"], "127.0.0.1", "{first}");
    assert_eq!(first["worker"], 1, "{first}");
    assert_eq!(first["pid"], worker, "{first}");
    assert_eq!(first["request_id"], "f00d-42", "{first}");
    let time = first["timestamp"].as_str().expect("a timestamp");
    assert!(time.ends_with('Z') && time.contains('T'), "RFC 3339 in UTC: {time}");
    let second = &lines[1];
    assert_eq!(second["remote_addr"], "10.1.2.3", "{second}");
    assert!(second.get("request_id").is_none(), "no id when nginx sends none: {second}");
    // Every other line is JSON too (json_lines panics otherwise), with its message.
    let ready = json_lines(&log)
        .into_iter()
        .find(|line| line["message"].as_str().is_some_and(|message| message.starts_with("master ready")));
    assert!(ready.is_some_and(|line| line["level"] == "INFO"), "{log}");
}

/// The pids in the access lines of `log`.
fn access_pids(log: &str) -> BTreeSet<u64> {
    access_lines(log).iter().filter_map(|line| line["pid"].as_u64()).collect()
}

/// Sends slow requests at once, so both workers serve some; returns the pids that answered.
fn busy_both(server: &Server) -> BTreeSet<u32> {
    let connections: Vec<support::Conn> = (0..CONCURRENT_REQUESTS)
        .map(|_| {
            let mut conn = server.connect();
            std::io::Write::write_all(&mut conn, &RequestBuilder::get("/sleep?ms=200").encode()).unwrap();
            conn
        })
        .collect();
    connections
        .into_iter()
        .map(|mut conn| {
            let raw = conn.read_to_end_result().unwrap_or_else(|(err, _)| panic!("request lost: {err}"));
            pid_in(&Response::parse(raw).expect("an HTTP response"))
        })
        .collect()
}

#[test]
fn logto_moves_to_a_new_file_on_sigusr1_in_the_master_and_every_worker() {
    let dir = temp_dir();
    let (logto, rotated) = (dir.join("app.log"), dir.join("app.log.1"));
    let server =
        workers_app(&["--processes", "2", "--log-format", "json", "--logto", logto.to_str().unwrap()]);
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let log = || format!("{}\n--- rotated:\n{}\n--- stderr:\n{}", read(&logto), read(&rotated), server.log());
    poll("master ready in --logto", log, || read(&logto).contains("master ready"));
    assert_eq!(std::fs::metadata(&logto).unwrap().permissions().mode() & 0o007, 0, "others may not read it");
    let mut workers = BTreeSet::new();
    poll("both workers answering", log, || {
        workers.extend(busy_both(&server));
        workers.len() == 2
    });
    std::fs::rename(&logto, &rotated).unwrap();
    server.signal("USR1");
    poll("the master's line in the new file", log, || read(&logto).contains("SIGUSR1 received"));
    // Each worker reopens on its own signal: once both have, both write their access lines to the new file.
    let expected: BTreeSet<u64> = workers.iter().map(|&pid| u64::from(pid)).collect();
    poll("both workers' access lines in the new file", log, || {
        busy_both(&server);
        access_pids(&read(&logto)) == expected
    });
    assert!(!read(&rotated).contains("SIGUSR1 received"), "{}", log());
    assert!(server.log().trim().is_empty(), "nothing left on stderr: {}", server.log());
}
