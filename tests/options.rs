//! The command-line options that shape where the app comes from and where oxwsgi listens, each checked on
//! the real binary: `--chdir`, `--pythonpath`, `--virtualenv`, `--chmod-socket`, repeated `--socket`, and
//! the `[::1]:port` form.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use support::{app_path, free_port, temp_dir, RequestBuilder, Response, Server};

/// A WSGI app answering with `BODY`, a Python expression evaluated per request.
fn write_app(path: &Path, imports: &str, body: &str) {
    let source = format!(
        "{imports}\n\ndef application(environ, start_response):\n    \
         start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [str({body}).encode()]\n"
    );
    std::fs::write(path, source).expect("write the app");
}

fn body(response: &Response) -> String {
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    response.body_text()
}

#[test]
fn chdir_changes_directory_and_makes_it_importable() {
    let project = temp_dir();
    write_app(&project.join("chdir_app.py"), "import os", "os.getcwd()");
    let project = project.canonicalize().unwrap();
    let server = Server::builder().module("chdir_app").args(&["--chdir", project.to_str().unwrap()]).start();
    assert_eq!(body(&server.get("/")), project.display().to_string());
}

#[test]
fn pythonpath_directories_come_first_on_sys_path() {
    let (first, second) = (temp_dir(), temp_dir());
    std::fs::write(second.join("pythonpath_helper.py"), "ANSWER = 'from the second directory'\n").unwrap();
    write_app(&first.join("pythonpath_app.py"), "import pythonpath_helper", "pythonpath_helper.ANSWER");
    let server = Server::builder()
        .module("pythonpath_app")
        .args(&["--pythonpath", first.to_str().unwrap(), "--pythonpath", second.to_str().unwrap()])
        .start();
    assert_eq!(body(&server.get("/")), "from the second directory");
}

#[test]
fn virtualenv_packages_are_importable() {
    let venv = temp_dir().join("venv");
    let made = Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(&venv).status().unwrap();
    assert!(made.success(), "python3 -m venv failed");
    let version = Command::new("python3")
        .args(["-c", "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')"])
        .output()
        .unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    let packages = venv.join("lib").join(version.trim()).join("site-packages");
    std::fs::write(packages.join("only_in_the_venv.py"), "WHERE = 'venv'\n").unwrap();
    let app = temp_dir().join("venv_app.py");
    write_app(&app, "import sys, only_in_the_venv", "only_in_the_venv.WHERE + ' ' + sys.prefix");
    let server = Server::builder().app(app).args(&["--virtualenv", venv.to_str().unwrap()]).start();
    assert_eq!(body(&server.get("/")), format!("venv {}", venv.canonicalize().unwrap().display()));
}

#[test]
fn chmod_socket_sets_the_socket_file_mode() {
    for (args, mode) in [(&["--chmod-socket", "660"][..], 0o660), (&["--chmod-socket"][..], 0o666)] {
        let server = Server::builder().app(app_path("hello.py")).args(args).start();
        let support::Addr::Unix(path) = &server.addr else {
            unreachable!("the builder listens on Unix by default")
        };
        let actual = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(actual, mode, "{args:?}: mode {actual:o}");
        assert_eq!(body(&server.get("/hello")), "Hello, World!\n");
    }
}

/// One request to `stream`, read to EOF.
fn exchange(mut stream: impl Read + Write) -> Response {
    stream.write_all(&RequestBuilder::get("/hello").encode()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    Response::parse(raw).expect("a response")
}

#[test]
fn every_socket_given_is_served() {
    let extra_unix = temp_dir().join("second.sock");
    let (ipv4, ipv6) = (free_port(), free_port());
    let server = Server::builder()
        .app(app_path("hello.py"))
        .args(&[
            "--socket",
            extra_unix.to_str().unwrap(),
            "--socket",
            &format!("127.0.0.1:{ipv4}"),
            "--socket",
            &format!("[::1]:{ipv6}"),
        ])
        .start();
    assert_eq!(body(&server.get("/hello")), "Hello, World!\n");
    assert_eq!(body(&exchange(UnixStream::connect(&extra_unix).unwrap())), "Hello, World!\n");
    assert_eq!(
        body(&exchange(std::net::TcpStream::connect(("127.0.0.1", ipv4)).unwrap())),
        "Hello, World!\n"
    );
    assert_eq!(body(&exchange(std::net::TcpStream::connect(("::1", ipv6)).unwrap())), "Hello, World!\n");
}
