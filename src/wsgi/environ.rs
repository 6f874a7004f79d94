//! The WSGI environ: a fresh `dict` per request, built from the uwsgi vars nginx sent and the server's own
//! `wsgi.*` entries (PEP 3333).
//!
//! Keys nginx sends on nearly every request are interned once; values are latin-1 `str`s. Decisions that
//! need no interpreter (scheme, host fallbacks) are plain functions, tested without Python.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyType};

use super::streams::{ErrorStream, FileWrapper, Input};
use crate::server::RequestHead;

/// The names nginx's `uwsgi_params` sends on every request plus the headers most browsers and proxies send:
/// interning them saves allocating the same key strings on every request.
const COMMON_KEYS: &[&str] = &[
    "QUERY_STRING",
    "REQUEST_METHOD",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "REQUEST_URI",
    "PATH_INFO",
    "DOCUMENT_ROOT",
    "SERVER_PROTOCOL",
    "REQUEST_SCHEME",
    "HTTPS",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "SERVER_PORT",
    "SERVER_NAME",
    "SCRIPT_NAME",
    "UWSGI_SCHEME",
    "HTTP_HOST",
    "HTTP_USER_AGENT",
    "HTTP_ACCEPT",
    "HTTP_ACCEPT_ENCODING",
    "HTTP_ACCEPT_LANGUAGE",
    "HTTP_CONNECTION",
    "HTTP_COOKIE",
    "HTTP_REFERER",
    "HTTP_CACHE_CONTROL",
    "HTTP_PRAGMA",
    "HTTP_ORIGIN",
    "HTTP_AUTHORIZATION",
    "HTTP_IF_MODIFIED_SINCE",
    "HTTP_IF_NONE_MATCH",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_REAL_IP",
    "HTTP_X_REQUESTED_WITH",
    "HTTP_UPGRADE_INSECURE_REQUESTS",
    "HTTP_DNT",
    "HTTP_SEC_FETCH_DEST",
    "HTTP_SEC_FETCH_MODE",
    "HTTP_SEC_FETCH_SITE",
    "HTTP_SEC_FETCH_USER",
    "HTTP_SEC_CH_UA",
    "HTTP_SEC_CH_UA_MOBILE",
    "HTTP_SEC_CH_UA_PLATFORM",
    "HTTP_TRANSFER_ENCODING",
    "HTTP_EXPECT",
    "HTTP_CONTENT_TYPE",
    "HTTP_CONTENT_LENGTH",
];

/// Room in every environ for the vars and the server's own entries: nginx's `uwsgi_params` and a
/// browser's headers come to 25-35 entries. A dict made with this room never grows while it is filled
/// (one built from empty would be rebuilt three times). An environ with more simply grows.
const ENVIRON_ROOM: usize = 48;

/// Hashes the interned keys' table cheaply: a multiply-rotate per 8 bytes instead of std's `SipHash`, which cost
/// more than the lookup it served. The table is fixed (the keys above); a client choosing header names can
/// only make a lookup probe a few more slots of it, never grow it.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The first and last 8 bytes (overlapping when shorter than 16) and the length set apart every key
        // nginx sends: `HTTP_` prefixes are shared, endings are not.
        let (head, tail) =
            if let (Some(head), Some(tail)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) {
                (u64::from_le_bytes(*head), u64::from_le_bytes(*tail))
            } else {
                let short = bytes.iter().fold(0u64, |word, &byte| word << 8 | u64::from(byte));
                (short, short)
            };
        self.0 = (self.0 ^ head ^ tail.rotate_left(32)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_usize(&mut self, len: usize) {
        self.0 = (self.0 ^ len as u64).rotate_left(7);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Values longer than this are not kept for the next request (a long cookie is rarely sent twice in a row
/// to one thread, and would be held for the thread's life).
const MAX_REMEMBERED_VALUE: usize = 256;

/// An interned key and the last value it had, as bytes and as the `str` given for them.
struct KnownKey {
    key: Py<PyString>,
    last: Option<(Vec<u8>, Py<PyString>)>,
}

/// What is the same for every request, built once per thread.
///
/// Values that repeat from one request to the next (the protocol, the scheme, the host, the port, the
/// client's address and browser, an empty `CONTENT_LENGTH`) are given as the same `str` object again — it
/// is immutable — instead of being decoded and freed on every request.
pub(super) struct EnvironTemplate {
    keys: HashMap<&'static [u8], KnownKey, BuildHasherDefault<KeyHasher>>,
    /// `wsgi.version`, `wsgi.errors`, `wsgi.multithread`, ...: every environ starts as a copy of this dict,
    /// which Python makes with one copy of its table (and keeps its room for the vars).
    constants: Py<PyDict>,
    script_name: Py<PyString>,
    server_name: Py<PyString>,
    server_port: Py<PyString>,
    url_scheme: Py<PyString>,
    input: Py<PyString>,
    input_terminated: Py<PyString>,
    http: Py<PyString>,
    https: Py<PyString>,
    empty: Py<PyString>,
}

impl EnvironTemplate {
    pub(super) fn new(py: Python<'_>, multithread: bool, multiprocess: bool) -> PyResult<Self> {
        let keys = COMMON_KEYS
            .iter()
            .map(|k| (k.as_bytes(), KnownKey { key: PyString::intern(py, k).unbind(), last: None }))
            .collect();
        let intern = |s: &str| PyString::intern(py, s).unbind();
        let constants = empty_dict_with_room(py)?;
        constants.set_item(intern("wsgi.version"), (1, 0))?;
        constants.set_item(intern("wsgi.errors"), Py::new(py, ErrorStream::new())?)?;
        constants.set_item(intern("wsgi.multithread"), multithread)?;
        constants.set_item(intern("wsgi.multiprocess"), multiprocess)?;
        constants.set_item(intern("wsgi.run_once"), false)?;
        constants.set_item(intern("wsgi.file_wrapper"), PyType::new::<FileWrapper>(py))?;
        constants.set_item(intern("oxwsgi.version"), env!("CARGO_PKG_VERSION"))?;
        Ok(Self {
            keys,
            constants: constants.unbind(),
            script_name: intern("SCRIPT_NAME"),
            server_name: intern("SERVER_NAME"),
            server_port: intern("SERVER_PORT"),
            url_scheme: intern("wsgi.url_scheme"),
            input: intern("wsgi.input"),
            input_terminated: intern("wsgi.input_terminated"),
            http: intern("http"),
            https: intern("https"),
            empty: intern(""),
        })
    }

    /// A fresh environ for `request`, with `input` as `wsgi.input`.
    pub(super) fn build<'py>(
        &mut self,
        py: Python<'py>,
        request: &RequestHead,
        input: &Bound<'py, Input>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let environ = self.constants.bind(py).copy()?;
        let mut seen = Seen::default();
        for (name, value) in request.vars() {
            if name == b"HTTP_CONTENT_TYPE" || name == b"HTTP_CONTENT_LENGTH" {
                continue; // nginx sends these twice; PEP 3333 (and wsgiref.validate) want only CONTENT_*
            }
            seen.note(name, value);
            let (key, value) = match self.keys.get_mut(name) {
                Some(known) => (known.key.bind(py).clone(), known.value(py, value)?),
                None => (latin1(py, name)?, latin1(py, value)?),
            };
            insert(&environ, &key, &value, name)?;
        }
        if !seen.script_name {
            environ.set_item(self.script_name.bind(py), self.empty.bind(py))?;
        }
        if seen.server_name.is_none_or(<[u8]>::is_empty) {
            let name = host_part(seen.http_host).unwrap_or(request.listener.server_name.as_bytes());
            environ.set_item(self.server_name.bind(py), latin1(py, name)?)?;
        }
        let https = is_https(&seen);
        if seen.server_port.is_none_or(<[u8]>::is_empty) {
            let default = if https { "443" } else { "80" };
            let port = port_part(seen.http_host)
                .or_else(|| {
                    (!request.listener.server_port.is_empty())
                        .then_some(request.listener.server_port.as_bytes())
                })
                .unwrap_or(default.as_bytes());
            environ.set_item(self.server_port.bind(py), latin1(py, port)?)?;
        }
        let scheme = if https { &self.https } else { &self.http };
        environ.set_item(self.url_scheme.bind(py), scheme.bind(py))?;
        environ.set_item(self.input.bind(py), input)?;
        if seen.dechunked() {
            environ.set_item(self.input_terminated.bind(py), true)?;
        }
        Ok(environ)
    }
}

impl KnownKey {
    /// `value` as a `str`: the one given last time if the bytes are the same.
    fn value<'py>(&mut self, py: Python<'py>, value: &[u8]) -> PyResult<Bound<'py, PyString>> {
        if let Some((bytes, text)) = &self.last {
            if bytes.as_slice() == value {
                return Ok(text.bind(py).clone());
            }
        }
        let text = latin1(py, value)?;
        if value.len() <= MAX_REMEMBERED_VALUE {
            let mut bytes = self.last.take().map(|(bytes, _)| bytes).unwrap_or_default();
            bytes.clear();
            bytes.extend_from_slice(value);
            self.last = Some((bytes, text.clone().unbind()));
        }
        Ok(text)
    }
}

/// Inserts one var. A repeated `HTTP_*` key is one header sent twice (nginx < 1.23 does not join them):
/// join the values as nginx >= 1.23 does, `"; "` for cookies and `", "` otherwise. Other repeats: last wins.
fn insert(
    environ: &Bound<'_, PyDict>,
    key: &Bound<'_, PyString>,
    value: &Bound<'_, PyString>,
    name: &[u8],
) -> PyResult<()> {
    let before = environ.len();
    // SAFETY: all three pointers are live objects held by the caller; PyDict_SetDefault returns a borrowed
    // reference (or NULL with an exception set), which is turned into an owned one before any other call.
    let existing = unsafe {
        let existing = ffi::PyDict_SetDefault(environ.as_ptr(), key.as_ptr(), value.as_ptr());
        Bound::from_borrowed_ptr_or_err(environ.py(), existing)?
    };
    // Inserted: the dict grew. Not `existing.is(value)`: a repeat can be the very same str object (Python
    // shares one-character and empty strs, and a common header's value is reused), and must still be joined.
    if environ.len() > before {
        return Ok(());
    }
    if name.starts_with(b"HTTP_") {
        let separator = if name == b"HTTP_COOKIE" { "; " } else { ", " };
        environ.set_item(key, existing.add(separator)?.add(value)?)
    } else {
        environ.set_item(key, value)
    }
}

/// An empty dict with room for [`ENVIRON_ROOM`] entries; copies of it keep the room.
fn empty_dict_with_room(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    extern "C" {
        // CPython's own presized constructor (its bytecode uses it for dict displays); exported by every
        // CPython 3 release, though not part of the limited API. Called once per thread, at start.
        fn _PyDict_NewPresized(minused: ffi::Py_ssize_t) -> *mut ffi::PyObject;
    }
    let room = ffi::Py_ssize_t::try_from(ENVIRON_ROOM).unwrap_or(ffi::Py_ssize_t::MAX);
    // SAFETY: returns a new reference to an empty dict, or NULL with an exception set.
    unsafe { Ok(Bound::from_owned_ptr_or_err(py, _PyDict_NewPresized(room))?.cast_into_unchecked()) }
}

/// A `str` with the code points of `bytes` (latin-1), as PEP 3333 wants for CGI values.
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyString>> {
    // Vars are bounded by the u16 datasize, so the length always fits a Py_ssize_t.
    let len = ffi::Py_ssize_t::try_from(bytes.len()).unwrap_or(ffi::Py_ssize_t::MAX);
    // SAFETY: the pointer and length describe `bytes`; the result is a new reference or NULL with an
    // exception set, and PyUnicode_DecodeLatin1 always returns a str.
    unsafe {
        let text = ffi::PyUnicode_DecodeLatin1(bytes.as_ptr().cast(), len, std::ptr::null());
        Ok(Bound::from_owned_ptr_or_err(py, text)?.cast_into_unchecked())
    }
}

/// The vars that decide the server's own environ entries.
#[derive(Default)]
struct Seen<'a> {
    script_name: bool,
    server_name: Option<&'a [u8]>,
    server_port: Option<&'a [u8]>,
    http_host: Option<&'a [u8]>,
    https: Option<&'a [u8]>,
    request_scheme: Option<&'a [u8]>,
    uwsgi_scheme: Option<&'a [u8]>,
    transfer_encoding: Option<&'a [u8]>,
}

impl<'a> Seen<'a> {
    fn note(&mut self, name: &[u8], value: &'a [u8]) {
        match name {
            b"SCRIPT_NAME" => self.script_name = true,
            b"SERVER_NAME" => self.server_name = Some(value),
            b"SERVER_PORT" => self.server_port = Some(value),
            b"HTTP_HOST" => self.http_host = Some(value),
            b"HTTPS" => self.https = Some(value),
            b"REQUEST_SCHEME" => self.request_scheme = Some(value),
            b"UWSGI_SCHEME" => self.uwsgi_scheme = Some(value),
            b"HTTP_TRANSFER_ENCODING" => self.transfer_encoding = Some(value),
            _ => {}
        }
    }
}

impl Seen<'_> {
    /// The client sent a chunked body, which nginx de-chunked and framed with `CONTENT_LENGTH`. The
    /// `HTTP_TRANSFER_ENCODING: chunked` it still passes on makes Werkzeug and others ignore
    /// `CONTENT_LENGTH` and see an empty body (pallets/werkzeug#2346) — unless `wsgi.input_terminated` says
    /// the stream ends by itself, which ours does, at `CONTENT_LENGTH`. Only then is it set: with it, Werkzeug
    /// reads the raw stream with `read()` and no size, which `wsgiref.validate` forbids, while without it
    /// Werkzeug wraps the stream and reads with sizes as PEP 3333 expects.
    fn dechunked(&self) -> bool {
        self.transfer_encoding.is_some_and(|te| te.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked")))
    }
}

/// `wsgi.url_scheme` comes only from what nginx itself sets — `UWSGI_SCHEME`, `HTTPS`, `REQUEST_SCHEME`, in
/// that order — never from a client header such as `X-Forwarded-Proto` (which uWSGI trusts verbatim).
fn is_https(seen: &Seen<'_>) -> bool {
    let scheme = |v: &[u8]| match v {
        v if v.eq_ignore_ascii_case(b"https") => Some(true),
        v if v.eq_ignore_ascii_case(b"http") => Some(false),
        _ => None,
    };
    if let Some(https) = seen.uwsgi_scheme.and_then(scheme) {
        return https;
    }
    if let Some(flag) = seen.https.filter(|v| !v.is_empty()) {
        return flag.eq_ignore_ascii_case(b"on") || flag == b"1";
    }
    seen.request_scheme.and_then(scheme).unwrap_or(false)
}

/// `example.com` from `example.com:8080`, `[::1]` from `[::1]:8080`.
fn host_part(host: Option<&[u8]>) -> Option<&[u8]> {
    let host = host.filter(|h| !h.is_empty())?;
    let end = if host.starts_with(b"[") {
        host.iter().position(|&b| b == b']').map_or(host.len(), |i| i + 1)
    } else {
        host.iter().position(|&b| b == b':').unwrap_or(host.len())
    };
    Some(&host[..end]).filter(|h| !h.is_empty())
}

fn port_part(host: Option<&[u8]>) -> Option<&[u8]> {
    let host = host?;
    let name_len = host_part(Some(host))?.len();
    let port = host[name_len..].strip_prefix(b":")?;
    (!port.is_empty() && port.iter().all(u8::is_ascii_digit)).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(pairs: &[(&[u8], &'a [u8])]) -> Seen<'a> {
        let mut seen = Seen::default();
        for (name, value) in pairs {
            seen.note(name, value);
        }
        seen
    }

    #[test]
    fn scheme_comes_only_from_trusted_vars() {
        assert!(!is_https(&seen(&[])));
        assert!(!is_https(&seen(&[(b"HTTP_X_FORWARDED_PROTO", b"https")])));
        assert!(is_https(&seen(&[(b"HTTPS", b"on")])));
        assert!(is_https(&seen(&[(b"HTTPS", b"1")])));
        assert!(!is_https(&seen(&[(b"HTTPS", b"off")])));
        assert!(is_https(&seen(&[(b"REQUEST_SCHEME", b"https")])));
        assert!(!is_https(&seen(&[(b"REQUEST_SCHEME", b"http"), (b"HTTPS", b"")])));
        assert!(is_https(&seen(&[(b"UWSGI_SCHEME", b"https"), (b"REQUEST_SCHEME", b"http")])));
        assert!(!is_https(&seen(&[(b"UWSGI_SCHEME", b"javascript")])));
    }

    #[test]
    fn input_terminated_only_for_dechunked_bodies() {
        assert!(!seen(&[(b"CONTENT_LENGTH", b"10")]).dechunked());
        assert!(seen(&[(b"HTTP_TRANSFER_ENCODING", b"chunked")]).dechunked());
        assert!(seen(&[(b"HTTP_TRANSFER_ENCODING", b"gzip, Chunked")]).dechunked());
        assert!(!seen(&[(b"HTTP_TRANSFER_ENCODING", b"gzip")]).dechunked());
    }

    #[test]
    fn host_and_port_fallbacks() {
        assert_eq!(host_part(Some(b"example.com:8080")), Some(&b"example.com"[..]));
        assert_eq!(port_part(Some(b"example.com:8080")), Some(&b"8080"[..]));
        assert_eq!(host_part(Some(b"[::1]:8080")), Some(&b"[::1]"[..]));
        assert_eq!(port_part(Some(b"[::1]:8080")), Some(&b"8080"[..]));
        assert_eq!(host_part(Some(b"example.com")), Some(&b"example.com"[..]));
        assert_eq!(port_part(Some(b"example.com")), None);
        assert_eq!(host_part(Some(b"")), None);
        assert_eq!(host_part(Some(b":80")), None);
        assert_eq!(port_part(Some(b"example.com:x")), None);
    }
}
