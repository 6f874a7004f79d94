//! The fuzz targets' seed corpora (`fuzz/seeds/<target>/`), built here from the packets nginx sent
//! (`fixtures/`) and the kinds of request and response the other tests use, each written in the shape its
//! target reads (`fuzz/src/lib.rs`, included below, is the fuzz crate's own decoder).
//!
//! The test fails when the committed seeds differ from what it builds; `OXWSGI_WRITE_SEEDS=1 cargo test -p
//! oxwsgi-proto --test fuzz_seeds` rewrites them (and removes stale ones).

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)] // the decoders are the targets'; the seeds need only the encoders and the round trip
mod fuzz_input;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use fuzz_input::{encode_environ_vars, encode_split_point, BodyInput, HeadInput};
use oxwsgi_proto::{encode_packet, parse_packet, Limits};

/// Every target and its seeds, by file name.
type Seeds = BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>;

/// The vars nginx's stock `uwsgi_params` sends for `GET /` (as `tests/support` builds them).
const NGINX_GET: [(&[u8], &[u8]); 14] = [
    (b"QUERY_STRING", b""),
    (b"REQUEST_METHOD", b"GET"),
    (b"CONTENT_TYPE", b""),
    (b"CONTENT_LENGTH", b""),
    (b"REQUEST_URI", b"/"),
    (b"PATH_INFO", b"/"),
    (b"DOCUMENT_ROOT", b"/usr/share/nginx/html"),
    (b"SERVER_PROTOCOL", b"HTTP/1.1"),
    (b"REQUEST_SCHEME", b"http"),
    (b"REMOTE_ADDR", b"127.0.0.1"),
    (b"REMOTE_PORT", b"54321"),
    (b"SERVER_PORT", b"80"),
    (b"SERVER_NAME", b"test.example"),
    (b"HTTP_HOST", b"test.example"),
];

/// A request's vars, in wire order.
type Vars = Vec<(&'static [u8], &'static [u8])>;

/// `NGINX_GET` with some vars replaced (in place) or added (at the end).
fn request(changes: &[(&'static [u8], &'static [u8])]) -> Vars {
    let mut vars = NGINX_GET.to_vec();
    for &(key, value) in changes {
        match vars.iter_mut().find(|(k, _)| *k == key) {
            Some(var) => var.1 = value,
            None => vars.push((key, value)),
        }
    }
    vars
}

/// Requests as the server and environ tests send them: each one a var the mapping treats apart.
fn requests() -> Vec<(&'static str, Vars)> {
    vec![
        ("get", request(&[])),
        ("post", request(&[(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"5")])),
        ("https", request(&[(b"HTTPS", b"on"), (b"REQUEST_SCHEME", b"https")])),
        ("uwsgi_scheme", request(&[(b"UWSGI_SCHEME", b"https"), (b"HTTP_X_FORWARDED_PROTO", b"javascript")])),
        ("script_name", request(&[(b"SCRIPT_NAME", b"/mount"), (b"PATH_INFO", b"/mount/x")])),
        (
            "no_server_name",
            request(&[(b"SERVER_NAME", b""), (b"SERVER_PORT", b""), (b"HTTP_HOST", b"[::1]:8080")]),
        ),
        (
            "repeated_headers",
            request(&[(b"HTTP_COOKIE", b"a=1"), (b"HTTP_X_DUP", b"one"), (b"NGINX_PARAM", b"first")])
                .into_iter()
                .chain([
                    (&b"HTTP_COOKIE"[..], &b"a=1"[..]),
                    (b"HTTP_X_DUP", b"two"),
                    (b"NGINX_PARAM", b"last"),
                ])
                .collect(),
        ),
        (
            "dechunked",
            request(&[
                (b"REQUEST_METHOD", b"POST"),
                (b"CONTENT_LENGTH", b"3"),
                (b"HTTP_TRANSFER_ENCODING", b"chunked"),
                (b"HTTP_CONTENT_LENGTH", b"3"),
                (b"HTTP_CONTENT_TYPE", b"text/plain"),
            ]),
        ),
        (
            "latin1",
            request(&[(b"PATH_INFO", b"/caf\xc3\xa9"), (b"HTTP_X_BINARY", b"\xff\xfe\x01 tab\there")]),
        ),
        ("server_keys", request(&[(b"wsgi.errors", b"not a stream"), (b"oxwsgi.version", b"0")])),
    ]
}

/// The packets nginx sent, whole (header, vars and body), by file name.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut found: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .expect("proto/fixtures")
        .map(|entry| entry.expect("a fixture").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .map(|path| {
            let name = path.file_stem().expect("a name").to_string_lossy().into_owned();
            (name, fs::read(&path).expect("readable"))
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no fixtures in {}", dir.display());
    found
}

/// Packets the parsers must refuse or answer apart, as the protocol tests build them.
fn odd_packets() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ping", vec![100, 0, 0, 0]),
        ("empty_packet", vec![0, 0, 0, 0]),
        ("truncated_record", vec![0, 3, 0, 0, 5, 0, b'K']),
        ("empty_key", vec![0, 4, 0, 0, 0, 0, 0, 0]),
        ("plain_http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ]
}

/// Response heads as the response tests and the test apps give them: plain, corrected, refused.
fn heads() -> Vec<(&'static str, HeadInput<'static>)> {
    let head = |status: &'static [u8], headers: &[(&'static [u8], &'static [u8])], body_len| HeadInput {
        status,
        body_len,
        headers: headers.to_vec(),
    };
    vec![
        ("ok", head(b"200 OK", &[(b"Content-Type", b"text/plain")], Some(5))),
        ("bare_status", head(b"404", &[(b"Content-Type", b"text/html; charset=utf-8")], None)),
        ("no_content", head(b"204 No Content", &[(b"Content-Length", b"0")], Some(0))),
        (
            "connection_headers",
            head(b"200 OK", &[(b"Connection", b"close"), (b"Keep-Alive", b"timeout=5")], Some(2)),
        ),
        ("chunked", head(b"200 OK", &[(b"Transfer-Encoding", b"chunked")], None)),
        ("injection", head(b"200 OK", &[(b"X-Bad", b"a\r\nInjected: 1")], None)),
        ("status_header", head(b"200 OK", &[(b"Status", b"404 Not Found")], None)),
        ("two_lengths", head(b"200 OK", &[(b"Content-Length", b"5"), (b"content-length", b"5")], Some(5))),
        (
            "cookies",
            head(
                b"302 Found",
                &[(b"Location", b"/x"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
                Some(0),
            ),
        ),
        ("latin1", head(b"200 OK", &[(b"X-Caf\xe9", b"caf\xe9")], Some(u64::MAX))),
        ("informational", head(b"100 Continue", &[], None)),
    ]
}

/// Bodies against their declared length: whole, in pieces, short, with excess.
fn bodies() -> Vec<(String, BodyInput<'static>)> {
    let body = |declared, pieces: &[&'static [u8]]| BodyInput { declared, pieces: pieces.to_vec() };
    [
        ("pieces", body(5, &[b"he", b"llo"])),
        ("excess", body(5, &[b"hel", b"lo world"])),
        ("short", body(10, &[b"abc"])),
        ("none_declared", body(0, &[b"x"])),
        ("empty_pieces", body(3, &[b"", b"abc", b""])),
        ("larger_than_buffered", body(64 * 1024 + 1, &[b"a", b"b"])),
    ]
    .into_iter()
    .map(|(name, input)| (name.to_owned(), input))
    .collect()
}

fn build() -> Seeds {
    let mut seeds = Seeds::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        seeds.entry(target).or_default().insert(name.to_owned(), bytes);
    };
    let mut packets: Vec<(String, Vec<u8>)> = fixtures();
    for (name, vars) in requests() {
        let mut packet = encode_packet(0, 0, &vars).expect("a small packet");
        if name == "post" {
            packet.extend_from_slice(b"hello");
        }
        packets.push((name.to_owned(), packet));
    }
    for (name, packet) in &packets {
        add("parse_packet", name, packet.clone());
        add("environ", name, packet.clone());
        let cut = u16::try_from(packet.len() / 2).unwrap_or(u16::MAX);
        add("parse_split", name, encode_split_point(cut, packet));
        // A body the packet declares: as it came, then cut in two.
        if let Ok(Some((parsed, consumed))) = parse_packet(packet, &Limits::default()) {
            let declared = parsed.vars.get(b"CONTENT_LENGTH").and_then(oxwsgi_proto::parse_decimal);
            let rest = &packet[consumed..];
            if let Some(declared) = declared.filter(|&d| d > 0) {
                let (first, second) = rest.split_at(rest.len() / 2);
                add("body_framing", name, BodyInput { declared, pieces: vec![first, second] }.encode());
            }
        }
    }
    for (name, packet) in odd_packets() {
        add("parse_packet", name, packet.clone());
        add("parse_split", name, encode_split_point(2, &packet));
    }
    for (name, vars) in requests() {
        add("environ", &format!("{name}.vars"), encode_environ_vars(&vars));
    }
    for (name, head) in heads() {
        add("response_head", name, head.encode());
    }
    for (name, body) in bodies() {
        add("body_framing", &name, body.encode());
    }
    for (name, raw) in http_requests() {
        add("http_request", name, raw.to_vec());
    }
    seeds
}

/// What HTTP clients send to `--http-socket`: the target reads the bytes as they are.
fn http_requests() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("get", b"GET /a%20b/./c//d?x=1 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"),
        ("http10", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        ("absolute", b"GET http://example.test/p?q HTTP/1.1\r\nHost: example.test\r\n\r\n"),
        ("post", b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"),
        (
            "chunked",
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nGET / HTTP/1.1\r\n",
        ),
        ("dots", b"GET /a/../b/%2e%2e/c/. HTTP/1.1\r\nHost: h\r\nX_Under: 1\r\n\r\n"),
    ]
}

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("seeds")
}

/// The files under `dir`, by name.
fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .map(|entry| entry.expect("a seed").path())
        .map(|path| {
            (
                path.file_name().expect("a name").to_string_lossy().into_owned(),
                fs::read(&path).expect("readable"),
            )
        })
        .collect()
}

#[test]
fn committed_seeds_are_the_ones_built_here() {
    let seeds = build();
    assert_eq!(
        seeds.keys().copied().collect::<Vec<_>>(),
        ["body_framing", "environ", "http_request", "parse_packet", "parse_split", "response_head"]
    );
    let write = std::env::var_os("OXWSGI_WRITE_SEEDS").is_some();
    for (target, files) in &seeds {
        let dir = seeds_dir().join(target);
        if write {
            if dir.exists() {
                fs::remove_dir_all(&dir).expect("remove the old seeds");
            }
            fs::create_dir_all(&dir).expect("create the seeds directory");
            for (name, bytes) in files {
                fs::write(dir.join(name), bytes).expect("write a seed");
            }
        }
        let committed = read_dir(&dir);
        let names = |files: &BTreeMap<String, Vec<u8>>| files.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&committed), names(files), "{target}: rebuild with OXWSGI_WRITE_SEEDS=1");
        for (name, bytes) in files {
            assert!(committed[name] == *bytes, "{target}/{name} is stale: rebuild with OXWSGI_WRITE_SEEDS=1");
        }
    }
}

#[test]
fn seeds_read_back_as_built() {
    for (_, head) in heads() {
        assert_eq!(HeadInput::decode(&head.encode()), head);
    }
    for (_, body) in bodies() {
        assert_eq!(BodyInput::decode(&body.encode()), body);
    }
    for (_, vars) in requests() {
        assert_eq!(fuzz_input::environ_vars(&encode_environ_vars(&vars), &[]), vars);
    }
}
