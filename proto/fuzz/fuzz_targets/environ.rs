//! Fuzz target: the vars → WSGI environ mapping (`environ::environ_pairs`, the decisions the server turns
//! into its `dict`) on arbitrary vars: those of a whole uwsgi packet when the input is one (the nginx
//! captures seed that), else a key/value list (`oxwsgi_proto_fuzz::environ_vars`). For a Unix or a TCP
//! listener it must never panic, and the environ must be one PEP 3333 allows and the vars decide:
//!
//! - keys unique and non-empty; never `HTTP_CONTENT_TYPE` / `HTTP_CONTENT_LENGTH`, never one of the server's
//!   own (`wsgi.*`, `oxwsgi.*`);
//! - each var's key in first-arrival order, holding its last value, or for `HTTP_*` all its values joined
//!   (`"; "` for cookies); then `SCRIPT_NAME`, `SERVER_NAME`, `SERVER_PORT` always there, the last two
//!   non-empty; a value nginx sent is replaced only when empty;
//! - `wsgi.url_scheme` decided by `UWSGI_SCHEME`, `HTTPS` and `REQUEST_SCHEME` alone (never a client header);
//! - a `CONTENT_LENGTH` the framing accepts is in the environ as that number, or absent or empty for 0;
//! - `wsgi.input_terminated` only with a chunked `HTTP_TRANSFER_ENCODING`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oxwsgi_proto::body::parse_content_length;
use oxwsgi_proto::environ::{environ_pairs, EnvironPairs, Listener};
use std::collections::{HashMap, HashSet};

use oxwsgi_proto::{parse_decimal, parse_packet, Limits, DEFAULT_MAX_VARS};
use oxwsgi_proto_fuzz::environ_vars;

/// The names the mapping treats apart, one input byte each in the key/value form.
const KNOWN_KEYS: [&[u8]; 16] = [
    b"SCRIPT_NAME",
    b"SERVER_NAME",
    b"SERVER_PORT",
    b"HTTP_HOST",
    b"HTTPS",
    b"REQUEST_SCHEME",
    b"UWSGI_SCHEME",
    b"HTTP_TRANSFER_ENCODING",
    b"CONTENT_LENGTH",
    b"HTTP_CONTENT_LENGTH",
    b"HTTP_CONTENT_TYPE",
    b"HTTP_COOKIE",
    b"HTTP_X_FORWARDED_PROTO",
    b"wsgi.input",
    b"oxwsgi.version",
    b"PATH_INFO",
];

const LISTENERS: [Listener<'static>; 2] = [
    Listener { server_name: b"localhost", server_port: b"" },
    Listener { server_name: b"127.0.0.1", server_port: b"8000" },
];

/// The keys the server adds when the vars lack them, in the order it adds them.
const ADDED: [&[u8]; 3] = [b"SCRIPT_NAME", b"SERVER_NAME", b"SERVER_PORT"];

fuzz_target!(|input: &[u8]| {
    let vars = match parse_packet(input, &Limits::default()) {
        Ok(Some((packet, _))) => packet.vars.iter().collect(),
        _ => {
            // No more than a packet the server accepts can hold.
            let mut vars = environ_vars(input, &KNOWN_KEYS);
            vars.truncate(DEFAULT_MAX_VARS);
            vars
        }
    };
    // Either listener; which one, the input's length decides (checking both would halve the speed).
    check(&vars, &LISTENERS[input.len() % 2]);
});

fn check(vars: &[(&[u8], &[u8])], listener: &Listener<'_>) {
    let environ = environ_pairs(vars.iter().copied(), listener);
    let by_key: HashMap<&[u8], &[u8]> = environ.vars.iter().map(|(k, v)| (*k, &v[..])).collect();
    let get = |key: &[u8]| by_key.get(key).copied();

    // Keys: unique, non-empty, none the environ must not have.
    assert_eq!(by_key.len(), environ.vars.len(), "duplicate keys");
    for (key, _) in &environ.vars {
        assert!(!key.is_empty());
        assert!(key != b"HTTP_CONTENT_TYPE" && key != b"HTTP_CONTENT_LENGTH", "{key:?}");
        assert!(!key.starts_with(b"wsgi.") && !key.starts_with(b"oxwsgi."), "{key:?}");
    }

    // The vars' keys in first-arrival order, then the added ones the vars lacked.
    let mut expected: Vec<&[u8]> = Vec::new();
    let mut values: HashMap<&[u8], Vec<&[u8]>> = HashMap::new();
    for &(key, value) in vars {
        if kept(key) {
            let all = values.entry(key).or_insert_with(|| {
                expected.push(key);
                Vec::new()
            });
            all.push(value);
        }
    }
    let listed: HashSet<&[u8]> = expected.iter().copied().collect();
    expected.extend(ADDED.iter().filter(|key| !listed.contains(*key)));
    let keys: Vec<&[u8]> = environ.vars.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, expected);

    // Values: the last one, or every one joined for a header; the added ones filled in.
    for &key in &expected {
        let values = values.get(key).map_or(&[][..], |values| &values[..]);
        let value = get(key).expect("every expected key is there");
        // What the vars hold for the key (empty for an added key the vars lacked: SCRIPT_NAME is added empty).
        let sent = if key.starts_with(b"HTTP_") {
            let separator: &[u8] = if key == b"HTTP_COOKIE" { b"; " } else { b", " };
            values.join(separator)
        } else {
            values.last().map_or_else(Vec::new, |v| v.to_vec())
        };
        if key == b"SERVER_NAME" || key == b"SERVER_PORT" {
            assert!(!value.is_empty(), "{key:?} must not be empty");
            if !sent.is_empty() {
                assert_eq!(value, sent, "a {key:?} nginx sent is kept");
            }
        } else {
            assert_eq!(value, sent, "{key:?}");
        }
    }

    // The scheme: from the trusted vars alone.
    let trusted: Vec<(&[u8], &[u8])> = vars
        .iter()
        .copied()
        .filter(|(k, _)| [&b"UWSGI_SCHEME"[..], b"HTTPS", b"REQUEST_SCHEME"].contains(k))
        .collect();
    assert_eq!(environ.url_scheme, environ_pairs(trusted, listener).url_scheme);
    assert!(["http", "https"].contains(&environ.url_scheme.as_str()));

    // CONTENT_LENGTH: what the framing reads (the last one) is what the app reads.
    let last_length = vars.iter().rev().find(|(k, _)| *k == b"CONTENT_LENGTH").map(|(_, v)| *v);
    if let Some(declared) = parse_content_length(last_length) {
        match get(b"CONTENT_LENGTH") {
            None | Some(b"") => assert_eq!(declared, 0),
            Some(text) => assert_eq!(parse_decimal(text), Some(declared)),
        }
    }

    check_input_terminated(&environ, vars);
}

/// A var that enters the environ under its own name.
fn kept(key: &[u8]) -> bool {
    key != b"HTTP_CONTENT_TYPE"
        && key != b"HTTP_CONTENT_LENGTH"
        && !key.starts_with(b"wsgi.")
        && !key.starts_with(b"oxwsgi.")
}

fn check_input_terminated(environ: &EnvironPairs<'_>, vars: &[(&[u8], &[u8])]) {
    if environ.input_terminated {
        let chunked = |v: &[u8]| v.to_ascii_lowercase().windows(7).any(|w| w == b"chunked");
        assert!(vars.iter().any(|&(k, v)| k == b"HTTP_TRANSFER_ENCODING" && chunked(v)));
    }
}
