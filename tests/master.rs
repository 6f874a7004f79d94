//! The master and its worker processes, on the real binary: several workers share the sockets, a killed
//! worker is replaced, SIGTERM lets in-flight requests finish, and an app that cannot load stops the
//! master instead of being restarted for ever.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::thread;

use support::{app_path, run_to_exit, temp_dir, Server, POLL_INTERVAL, POLL_TRIES};

/// Requests sent while looking for an eventual condition (a replacement).
const SEARCH_REQUESTS: usize = 400;
/// Slow requests sent at once to find both workers: more than the two connections one single-threaded
/// worker takes.
const CONCURRENT_REQUESTS: usize = 5;
/// Rounds of them before giving up (one is enough unless a worker is still starting).
const SEARCH_ROUNDS: usize = 20;

fn start(args: &[&str]) -> Server {
    Server::builder().app(app_path("workers_app.py")).args(args).start()
}

/// The pid in the app's answer to `path`.
fn served_by(server: &Server, path: &str) -> u32 {
    pid_in(&server.get(path))
}

fn pid_in(response: &support::Response) -> u32 {
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    let text = response.body_text();
    let pid = text.split_whitespace().find_map(|field| field.strip_prefix("pid=")).expect("a pid field");
    pid.parse().expect("a numeric pid")
}

/// Sends `/sleep?ms=MILLISECONDS` and returns its connection once the request is inside the app.
fn sleeping_request(server: &Server, milliseconds: u64) -> support::Conn {
    let started = temp_dir().join("started");
    let path = format!("/sleep?ms={milliseconds}&started={}", started.display());
    let mut conn = server.connect();
    std::io::Write::write_all(&mut conn, &support::RequestBuilder::get(&path).encode()).unwrap();
    for _ in 0..POLL_TRIES {
        if started.exists() {
            return conn;
        }
        thread::sleep(POLL_INTERVAL);
    }
    panic!("the request never reached the app; log:\n{}", server.log());
}

/// The pids of the two workers. Sequential requests may all go to the same worker (whichever the kernel
/// wakes first can win every time), so slow requests go at once, more than one worker takes: each worker
/// holds two connections per thread, and the rest wait in the backlog for the other worker.
fn two_workers(server: &Server) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for _ in 0..SEARCH_ROUNDS {
        let connections: Vec<support::Conn> = (0..CONCURRENT_REQUESTS)
            .map(|_| {
                let mut conn = server.connect();
                std::io::Write::write_all(&mut conn, &support::RequestBuilder::get("/sleep?ms=200").encode())
                    .unwrap();
                conn
            })
            .collect();
        for mut conn in connections {
            let raw = conn.read_to_end_result().unwrap_or_else(|(err, _)| panic!("request lost: {err}"));
            let response = support::Response::parse(raw).expect("an HTTP response");
            pids.insert(pid_in(&response));
        }
        if pids.len() == 2 {
            return pids;
        }
    }
    panic!("only {pids:?} answered; log:\n{}", server.log());
}

fn is_running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
}

#[test]
fn several_workers_share_the_sockets() {
    let server = start(&["--processes", "2"]);
    let response = server.get("/");
    assert!(response.body_text().ends_with("multiprocess=True"), "{response:?}");
    let pids = two_workers(&server);
    assert!(!pids.contains(&server.pid()), "the master must not serve requests itself");
}

#[test]
fn a_killed_worker_is_replaced() {
    let server = start(&["--master"]);
    let first = served_by(&server, "/");
    kill(first, "KILL");
    let mut replacement = None;
    for _ in 0..POLL_TRIES {
        // Requests may fail while no worker runs; what matters is that a new one answers.
        if let Ok(pid) = std::panic::catch_unwind(|| served_by(&server, "/")) {
            if pid != first {
                replacement = Some(pid);
                break;
            }
        }
        thread::sleep(POLL_INTERVAL);
    }
    let replacement = replacement.unwrap_or_else(|| panic!("no replacement worker; log:\n{}", server.log()));
    assert!(is_running(replacement));
    let log = server.wait_log("was killed by signal 9");
    assert!(log.contains(&format!("worker 1 (pid {first}) was killed by signal 9")), "{log}");
}

#[test]
fn sigterm_finishes_in_flight_requests_and_stops_every_worker() {
    let mut server = start(&["--processes", "2"]);
    let support::Addr::Unix(socket_file) = server.addr.clone() else { unreachable!("Unix by default") };
    let workers = two_workers(&server);
    let mut in_flight = sleeping_request(&server, 1500);
    let status = server.terminate();
    assert!(status.success(), "{status}; log:\n{}", server.log());
    let answer =
        in_flight.read_to_end_result().unwrap_or_else(|(err, _)| panic!("in-flight request lost: {err}"));
    assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&answer));
    assert!(!socket_file.exists(), "the socket file must be removed at exit");
    for pid in workers {
        assert!(!is_running(pid), "worker {pid} still running after the master exited");
    }
}

#[test]
fn an_app_that_cannot_load_stops_the_master() {
    let socket = temp_dir().join("s.sock");
    let app = app_path("raw_import_error.py");
    let output = run_to_exit(&[
        "--socket",
        socket.to_str().unwrap(),
        "--wsgi-file",
        app.to_str().unwrap(),
        "--processes",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Traceback (most recent call last)"), "{stderr}");
    assert!(stderr.contains("could not start"), "{stderr}");
    assert!(stderr.lines().last().is_some_and(|l| l.starts_with("oxwsgi: error: worker")), "{stderr}");
    assert!(stderr.matches(" started (pid ").count() <= 2, "workers were restarted:\n{stderr}");
    assert!(!socket.exists());
}

/// Polls requests until one is served by a pid other than `first`.
fn wait_for_replacement(server: &Server, first: u32) -> u32 {
    for _ in 0..SEARCH_REQUESTS {
        let pid = served_by(server, "/");
        if pid != first {
            return pid;
        }
        thread::sleep(POLL_INTERVAL);
    }
    panic!("worker {first} was never replaced; log:\n{}", server.log());
}

#[test]
fn a_worker_past_its_lifetime_is_replaced_gracefully() {
    let server = start(&["--max-worker-lifetime", "1"]);
    let first = served_by(&server, "/");
    let second = wait_for_replacement(&server, first);
    assert!(is_running(second));
    let log = server.wait_log("retired");
    assert!(log.contains("--max-worker-lifetime reached"), "{log}");
    assert!(log.contains(&format!("(pid {first}) retired: it exited with status 0")), "{log}");
}

#[test]
fn a_worker_over_its_memory_limit_is_replaced() {
    // 1 MB: any Python process is over it, so the worker is replaced as soon as it is ready.
    let server = start(&["--reload-on-rss", "1"]);
    let first = served_by(&server, "/");
    wait_for_replacement(&server, first);
    assert!(server.wait_log("--reload-on-rss exceeded").contains("replacing worker 1"));
}

#[test]
fn sigquit_stops_the_workers_at_once() {
    let mut server = start(&["--processes", "2"]);
    let mut in_flight = sleeping_request(&server, 30000);
    server.signal("QUIT");
    let status = server.wait_exit(POLL_TRIES);
    assert!(status.success(), "{status}");
    // The in-flight request was not waited for: the connection ends without a response.
    let answer = in_flight.read_to_end_result().unwrap_or_else(|(_, got)| got);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}

#[test]
fn no_vacuum_leaves_the_socket_file() {
    let mut server = start(&["--processes", "2", "--no-vacuum"]);
    let support::Addr::Unix(socket_file) = server.addr.clone() else { unreachable!("Unix by default") };
    assert!(server.terminate().success());
    assert!(socket_file.exists(), "--no-vacuum must leave the socket file");
}

/// The master's children (its workers), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_harakiri_during_a_reload_does_not_add_a_worker() {
    let server = start(&["--harakiri", "2", "--graceful-timeout", "20"]);
    let _in_flight = sleeping_request(&server, 8000); // kept open while the worker is stuck
                                                      // The reload retires the busy worker; its request then outlives --harakiri while it retires.
    server.signal("HUP");
    server.wait_log("harakiri #1");
    server.wait_log("retired: it was killed by signal 9");
    assert_eq!(children(server.pid()).len(), 1, "one slot, one worker; log:\n{}", server.log());
    // The first worker and the reload's replacement: harakiri started no third one.
    assert_eq!(server.log().matches("worker 1 started (pid").count(), 2, "{}", server.log());
}

#[test]
fn a_second_sighup_during_a_reload_replaces_the_workers_still_starting() {
    let server = Server::builder()
        .app(app_path("workers_app.py"))
        .env("WORKERS_APP_IMPORT_SECONDS", "1")
        .args(&["--master"])
        .start();
    server.wait_log("master ready");
    server.signal("HUP");
    server.wait_log("replacing worker 1");
    // The replacement is still importing: a second SIGHUP must not leave it running the code it imported
    // before this signal.
    server.signal("HUP");
    for _ in 0..POLL_TRIES * 2 {
        if server.log().matches("retired").count() >= 2 {
            break;
        }
        thread::sleep(POLL_INTERVAL);
    }
    let log = server.log();
    assert_eq!(log.matches("worker 1 started (pid").count(), 3, "{log}");
    assert!(log.matches("retired").count() >= 2, "{log}");
    assert_eq!(children(server.pid()).len(), 1, "{log}");
}

#[test]
fn sigterm_during_a_reload_stops_old_and_new_workers_and_finishes_the_request() {
    // The replacement takes a second to import, so SIGTERM lands while the reload is under way: the old
    // worker (serving a request) and its replacement (still starting) must both stop, the request finish.
    let mut server = Server::builder()
        .app(app_path("workers_app.py"))
        .env("WORKERS_APP_IMPORT_SECONDS", "1")
        .args(&["--master"])
        .start();
    server.wait_log("master ready");
    let mut in_flight = sleeping_request(&server, 1500);
    server.signal("HUP");
    server.wait_log("replacing worker 1");
    // The replacement is forked just after that line.
    let mut workers = children(server.pid());
    for _ in 0..POLL_TRIES {
        if workers.len() == 2 {
            break;
        }
        thread::sleep(POLL_INTERVAL);
        workers = children(server.pid());
    }
    assert_eq!(workers.len(), 2, "the old worker and its replacement; log:\n{}", server.log());
    let status = server.terminate();
    assert!(status.success(), "{status}; log:\n{}", server.log());
    let answer =
        in_flight.read_to_end_result().unwrap_or_else(|(err, _)| panic!("in-flight request lost: {err}"));
    assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&answer));
    for pid in workers {
        assert!(!is_running(pid), "worker {pid} still running after the master exited");
    }
}

#[test]
fn worker_variables_meant_for_another_process_are_refused() {
    // The variables a master sets for its worker, but naming a process that is not this one's parent: the
    // descriptors they name belong to someone else and must not be taken.
    let dir = temp_dir();
    let output = support::oxwsgi_command()
        .args(["--socket", &dir.join("s.sock").display().to_string()])
        .args(["--wsgi-file", &app_path("hello.py").display().to_string()])
        .env("OXWSGI_MASTER_PID", "1")
        .env("OXWSGI_WORKER_ID", "1")
        .env("OXWSGI_LISTEN_FDS", "1")
        .env("OXWSGI_READY_FD", "4")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run oxwsgi");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("oxwsgi: error: OXWSGI_LISTEN_FDS"), "{stderr}");
    assert!(!dir.join("s.sock").exists(), "nothing was bound");
    let _ = std::fs::remove_dir_all(dir);
}
