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
