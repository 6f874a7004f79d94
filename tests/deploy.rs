//! Deployment features on the real binary: `--pidfile`, `--chown-socket`, `--uid`/`--gid`, the
//! `--listen` check against `net.core.somaxconn`, systemd socket activation and `sd_notify`.

mod support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use support::{app_path, temp_dir, RequestBuilder, Response, Server, POLL_INTERVAL, POLL_TRIES};

/// The unprivileged user Debian always has.
const NOBODY: u32 = 65534;

/// Whether a test that changes users or owners can run: that needs root. Without root it says so on the
/// terminal (past the test harness's capture) and does nothing; under CI, which runs the suite as root, it
/// fails instead, so a skip is never counted as a pass there.
fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test} needs root, and CI runs the tests as root");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs root (run the tests as root, as CI does)");
    false
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..POLL_TRIES {
        if condition() {
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
    panic!("never happened: {what}");
}

#[test]
fn pidfile_holds_the_master_pid_and_goes_at_exit() {
    let pidfile = temp_dir().join("oxwsgi.pid");
    let mut server =
        Server::builder().args(&["--processes", "2", "--pidfile", pidfile.to_str().unwrap()]).start();
    let written = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(written.trim(), server.pid().to_string());
    assert!(server.terminate().success());
    assert!(!pidfile.exists(), "the pidfile must be removed at exit");
}

#[test]
fn chown_socket_sets_the_socket_owner() {
    if !root_or_skip("chown_socket_sets_the_socket_owner") {
        return;
    }
    let server = Server::builder().args(&["--chown-socket", "nobody:nogroup"]).start();
    let support::Addr::Unix(path) = &server.addr else { unreachable!("Unix by default") };
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
}

#[test]
fn uid_and_gid_drop_privileges_before_the_app_loads() {
    if !root_or_skip("uid_and_gid_drop_privileges_before_the_app_loads") {
        return;
    }
    let server = Server::builder()
        .app(app_path("deploy_app.py"))
        .args(&["--uid", "nobody", "--gid", "nogroup"])
        .start();
    let response = server.get("/");
    assert_eq!(response.body_text(), format!("uid={NOBODY} gid={NOBODY} loaded_as={NOBODY}"), "{response:?}");
}

#[test]
fn uid_alone_takes_the_users_primary_group() {
    if !root_or_skip("uid_alone_takes_the_users_primary_group") {
        return;
    }
    let server = Server::builder().app(app_path("deploy_app.py")).args(&["--uid", "nobody"]).start();
    let response = server.get("/");
    assert_eq!(response.body_text(), format!("uid={NOBODY} gid={NOBODY} loaded_as={NOBODY}"), "{response:?}");
}

#[test]
fn a_listen_backlog_over_somaxconn_is_warned_about() {
    let somaxconn: u64 =
        std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    let server = Server::start(&["--listen", &(somaxconn + 1).to_string()]);
    server.wait_log("is over net.core.somaxconn");
}

/// The next datagram on `notify`. A signal reaching the test process (tests in this binary run side by side
/// with servers of their own) interrupts the wait; that is no answer, so it waits again.
fn recv_notification(notify: &UnixDatagram, message: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match notify.recv(message) {
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

/// One request over a Unix socket at `path`, read to EOF.
fn get(path: &Path) -> Response {
    let mut stream = UnixStream::connect(path).expect("connect");
    std::io::Write::write_all(&mut stream, &RequestBuilder::get("/hello").encode()).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut raw).unwrap();
    Response::parse(raw).expect("a response")
}

#[test]
fn systemd_socket_activation_and_notify() {
    for extra in [&[][..], &["--processes", "2"][..]] {
        let dir = temp_dir();
        let (socket, notify_path) = (dir.join("activated.sock"), dir.join("notify.sock"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/socket_activate.py");
        let app = app_path("hello.py");
        let mut child = Command::new("python3")
            .arg(&launcher)
            .arg(&socket)
            .arg(env!("CARGO_BIN_EXE_oxwsgi"))
            .args(["--wsgi-file", app.to_str().unwrap()])
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut message = [0u8; 64];
        let n = recv_notification(&notify, &mut message).expect("READY=1 from oxwsgi");
        assert_eq!(&message[..n], b"READY=1", "{extra:?}");
        let response = get(&socket);
        assert_eq!(response.body_text(), "Hello, World!\n", "{extra:?}: {response:?}");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let n = recv_notification(&notify, &mut message).expect("STOPPING=1 from oxwsgi");
        assert_eq!(&message[..n], b"STOPPING=1", "{extra:?}");
        wait_until("oxwsgi exits", || child.try_wait().unwrap().is_some());
        assert!(child.wait().unwrap().success(), "{extra:?}");
        assert!(socket.exists(), "the activated socket belongs to systemd: oxwsgi must not remove it");
    }
}
