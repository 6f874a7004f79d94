//! `oxwsgi ping ADDR`: the health check a Docker `HEALTHCHECK` or a Kubernetes exec probe runs. Exit 0 for
//! a pong from a Unix or TCP uwsgi socket; 1 with one line for nothing listening, a peer that never
//! answers, an answer that is not a pong, and a server whose every thread is busy; 2 for a usage error.

mod support;

use std::net::TcpListener;
use std::process::Output;

use support::{free_port, oxwsgi_command, pep3333_app, Addr, Server};

fn ping(args: &[&str]) -> Output {
    oxwsgi_command().args(args).output().expect("run oxwsgi ping")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_live_server_answers_on_unix_and_tcp_sockets() {
    let unix = Server::start(&[]);
    let Addr::Unix(path) = &unix.addr else { unreachable!("the default server listens on a Unix socket") };
    let output = ping(&["ping", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(output.stdout.is_empty() && output.stderr.is_empty(), "quiet when healthy");

    let tcp = Server::builder().tcp().start();
    let Addr::Tcp(addr) = &tcp.addr else { unreachable!("a TCP server") };
    for args in [
        vec!["ping".to_owned(), addr.to_string()],
        vec!["--ping".to_owned(), format!(":{}", addr.port())],
        vec!["ping".to_owned(), addr.to_string(), "--timeout".to_owned(), "5".to_owned()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = ping(&args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    }
}

#[test]
fn every_failure_is_one_line_and_exit_status_1() {
    let dir = support::temp_dir();
    let missing = dir.join("missing.sock");
    let output = ping(&["ping", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with(&format!("oxwsgi ping {}: cannot connect", missing.display())), "{text}");

    // A port that accepts (the kernel does, into the backlog) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let output = ping(&["ping", &addr, "--timeout", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no answer within 1s"), "{}", stderr(&output));

    // Something that answers, but not a pong: oxwsgi's own HTTP socket.
    let http = format!("127.0.0.1:{}", free_port());
    let _server = Server::builder().args(&["--http-socket", &http]).start();
    let output = ping(&["ping", &http]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("not a uwsgi pong"), "{}", stderr(&output));

    let output = ping(&["ping"]);
    assert_eq!(output.status.code(), Some(2), "a usage error: {}", stderr(&output));
    let output = ping(&["ping", "not an address"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("expected host:port"), "{}", stderr(&output));
}

#[test]
fn a_server_whose_every_thread_is_busy_does_not_answer() {
    let server = Server::builder().app(pep3333_app()).args(&["--threads", "1"]).start();
    let Addr::Unix(path) = server.addr.clone() else { unreachable!("a Unix socket") };
    // The only thread sleeps far longer than the ping waits.
    let sleeper = std::thread::spawn({
        let path = path.clone();
        move || {
            let mut conn = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let packet = oxwsgi_proto::encode_packet(
                0,
                0,
                &[(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/sleep"), (b"QUERY_STRING", b"ms=10000")],
            )
            .unwrap();
            std::io::Write::write_all(&mut conn, &packet).unwrap();
            conn
        }
    });
    // Sent and queued before the ping connects: the one thread takes it first.
    let _conn = sleeper.join().unwrap();
    let output = ping(&["ping", path.to_str().unwrap(), "--timeout", "1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("no answer within 1s"), "{}", stderr(&output));
}
