//! uWSGI ini files on the real binary: a Flask and a Django deployment's files (tests/ini/) serve with the
//! sockets, processes and threads they name; unknown options make one warning; a wrong value is one error
//! line naming the file, the line and the option; the command line and the environment win over the file;
//! `env` and `touch-reload` from a file reach `--env` and `--touch-reload`.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;

use support::{oxwsgi_command, run_to_exit, temp_dir, RequestBuilder, Response, POLL_INTERVAL, POLL_TRIES};

fn ini(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ini").join(name)
}

/// oxwsgi started with `args` and `envs` only (no socket or app of the test's own), stopped on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// Starts oxwsgi and waits until `socket` accepts.
    fn start(args: &[&str], envs: &[(&str, &str)], socket: &Path) -> Self {
        let log = socket.with_extension("log");
        let child = oxwsgi_command()
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn oxwsgi");
        let mut running = Running { child, log };
        for _ in 0..POLL_TRIES * 2 {
            if UnixStream::connect(socket).is_ok() {
                return running;
            }
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("oxwsgi exited ({status}); log:\n{}", running.log());
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!("oxwsgi never accepted on {}; log:\n{}", socket.display(), running.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits in pid_t");
        // SAFETY: the pid is our own child's, not yet waited for, so it names no other process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn get(socket: &Path, request: &RequestBuilder) -> Response {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.write_all(&request.encode()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    Response::parse(raw).expect("an HTTP response")
}

/// Flask's /environ: whether the server said it runs threads and processes.
fn concurrency(socket: &Path) -> (bool, bool) {
    let response = get(socket, &RequestBuilder::get("/environ"));
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    let environ: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    (environ["wsgi.multithread"].as_bool().unwrap(), environ["wsgi.multiprocess"].as_bool().unwrap())
}

fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("options oxwsgi does not know")).collect()
}

#[test]
fn a_flask_deployments_file_serves_as_it_says() {
    let run_dir = temp_dir();
    let socket = run_dir.join("flask.sock");
    let ini = ini("flask.ini");
    let server = Running::start(
        &["--ini", ini.to_str().unwrap()],
        &[("SHOP_RUN_DIR", run_dir.to_str().unwrap())],
        &socket,
    );
    assert_eq!(concurrency(&socket), (true, true), "threads = 4, processes = 2");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o660);
    let log = server.log();
    let expected = format!(
        "{}: options oxwsgi does not know, ignored: auto-procname, procname-prefix-spaced, memory-report",
        ini.display()
    );
    let warnings = warnings(&log);
    assert!(warnings.len() == 1 && warnings[0].ends_with(&expected), "{log}");
}

#[test]
fn a_django_deployments_file_serves_named_as_the_only_argument() {
    let run_dir = temp_dir();
    let socket = run_dir.join("mysite.sock");
    let ini = ini("django.ini");
    // As the positional argument, the way `uwsgi mysite.ini` is typed.
    let server =
        Running::start(&[ini.to_str().unwrap()], &[("SITE_RUN_DIR", run_dir.to_str().unwrap())], &socket);
    let response = get(&socket, &RequestBuilder::get("/").set("HTTP_HOST", b"localhost"));
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}\n{}", server.log());
    assert!(response.body_text().contains("\"framework\": \"django\""), "{response:?}");
    let log = server.log();
    let warnings = warnings(&log);
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("static-map") && warnings[0].contains("log-x-forwarded-for"), "{log}");
    assert!(!warnings[0].contains("vacuum") && !warnings[0].contains("base"), "{log}");
}

#[test]
fn the_command_line_and_the_environment_win_over_the_file() {
    let run_dir = temp_dir();
    let socket = run_dir.join("flask.sock");
    let ini = ini("flask.ini");
    let env = [("SHOP_RUN_DIR", run_dir.to_str().unwrap()), ("OXWSGI_THREADS", "1")];
    let _server = Running::start(&["--ini", ini.to_str().unwrap(), "--processes", "1"], &env, &socket);
    assert_eq!(concurrency(&socket), (false, false), "OXWSGI_THREADS=1 and --processes 1 over the file");

    // A list on the command line replaces the file's: the file's socket is not bound.
    let run_dir = temp_dir();
    let own = run_dir.join("own.sock");
    let env = [("SHOP_RUN_DIR", run_dir.to_str().unwrap())];
    let _server =
        Running::start(&["--ini", ini.to_str().unwrap(), "--socket", own.to_str().unwrap()], &env, &own);
    assert!(!run_dir.join("flask.sock").exists());
    assert_eq!(concurrency(&own), (true, true));
}

#[test]
fn a_wrong_value_is_one_line_with_the_file_the_line_and_the_option() {
    let dir = temp_dir();
    for (line, expected) in [
        ("processes = many", "processes: many: expected a whole number of at least 1"),
        ("buffer-size = 70000", "buffer-size: --buffer-size 70000 is over 65535"),
        ("chmod-socket = rw", "chmod-socket: --chmod-socket rw: expected an octal mode"),
    ] {
        let path = dir.join("bad.ini");
        std::fs::write(
            &path,
            format!("[uwsgi]\nsocket = {}/s.sock\nwsgi-file = x.py\n{line}\n", dir.display()),
        )
        .unwrap();
        let output = run_to_exit(&["--ini", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let want = format!("oxwsgi: error: {}:4: {expected}", path.display());
        assert!(stderr.lines().any(|l| l.starts_with(&want)), "want {want:?} in:\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    let output = run_to_exit(&["--ini", dir.join("missing.ini").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"), "{output:?}");
    assert!(!output.status.success());
}

#[test]
fn env_and_touch_reload_from_the_file() {
    let dir = temp_dir();
    std::fs::write(
        dir.join("stage_app.py"),
        "import os\n\ndef application(environ, start_response):\n    \
         start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
         return [os.environ['SHOP_STAGE'].encode()]\n",
    )
    .unwrap();
    let ini = dir.join("stage.ini");
    std::fs::write(
        &ini,
        "[uwsgi]\nsocket = %d%n.sock\nwsgi-file = %dstage_app.py\nenv = SHOP_STAGE=from the file\n\
         touch-reload = %dreload.trigger\n",
    )
    .unwrap();
    let socket = dir.join("stage.sock");
    let server = Running::start(&["--ini", ini.to_str().unwrap()], &[], &socket);
    assert_eq!(get(&socket, &RequestBuilder::get("/")).body_text(), "from the file");
    std::fs::write(dir.join("reload.trigger"), "").unwrap();
    let trigger = format!("--touch-reload {} changed", dir.join("reload.trigger").display());
    for _ in 0..POLL_TRIES * 2 {
        if server.log().contains(&trigger) {
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
    panic!("no reload for the touched file; log:\n{}", server.log());
}
