//! `--ssl-socket` refuses to start, in one line and with a non-zero status, on what it cannot use: files that
//! are missing or not PEM, and an address that is not TCP. (nginx speaking `suwsgi://` to it, client
//! certificates and certificate reloads: `tests/e2e/test_tls.py`.)

mod support;

use support::{pep3333_app, run_to_exit};

#[test]
fn unusable_tls_settings_are_one_line_and_a_failed_start() {
    let dir = support::temp_dir();
    let not_pem = dir.join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let app = pep3333_app().display().to_string();
    let cases = [
        (format!("127.0.0.1:1,{0}/missing.crt,{0}/missing.key", dir.display()), "cannot read certificate"),
        (format!("127.0.0.1:1,{0},{0}", not_pem.display()), "no certificate in"),
        ("/tmp/app.sock,a.crt,a.key".to_owned(), "with a TCP ADDR"),
        ("127.0.0.1:1,only-a-cert.crt".to_owned(), "expected ADDR,CERT,KEY[,CA]"),
    ];
    for (value, expected) in cases {
        let output = run_to_exit(&["--ssl-socket", &value, "--wsgi-file", &app]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{value}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{value}: {stderr}");
        assert!(
            lines[0].starts_with("oxwsgi: error: --ssl-socket") && lines[0].contains(expected),
            "{stderr}"
        );
    }
}

/// `socket_activate.py` (a stand-in for systemd) runs `oxwsgi ARGS` on an activated Unix socket named
/// `name`; returns oxwsgi's exit status and stderr.
fn activated(name: Option<&str>, args: &[&str]) -> (Option<i32>, String) {
    let dir = support::temp_dir();
    let launcher = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/socket_activate.py");
    let mut command = std::process::Command::new("python3");
    command
        .arg(&launcher)
        .arg(dir.join("activated.sock"))
        .arg(env!("CARGO_BIN_EXE_oxwsgi"))
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null());
    if let Some(name) = name {
        command.env("SOCKET_ACTIVATE_NAME", name);
    }
    let output = command.output().expect("run the launcher");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn under_socket_activation_tls_settings_and_sockets_must_match() {
    let app = pep3333_app().display().to_string();
    // A socket the unit names "tls", but no certificate for it: it must not serve plain uwsgi.
    let (status, stderr) = activated(Some("tls"), &["--wsgi-file", &app]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("no --ssl-socket gives that address its certificate"), "{stderr}");

    // A certificate for an address systemd did not pass.
    let dir = support::temp_dir();
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=t", "-keyout", "t.key", "-out", "t.crt"])
        .current_dir(&dir)
        .output()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let ssl = format!("127.0.0.1:1,{0}/t.crt,{0}/t.key", dir.display());
    let (status, stderr) = activated(None, &["--ssl-socket", &ssl, "--wsgi-file", &app]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("is not among the sockets systemd passed"), "{stderr}");
}
