//! The WSGI environ: a fresh `dict` per request, built from the uwsgi vars nginx sent and the server's own
//! `wsgi.*` entries (PEP 3333).
//!
//! What goes in it is decided by `oxwsgi_proto::environ` (which vars, how repeats combine, the scheme and
//! the host fallbacks), without Python; this module only makes the objects. Keys nginx sends on nearly every
//! request are interned once; values are latin-1 `str`s.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyType};

use oxwsgi_proto::environ::{self, Listener, Repeat, Scheme};

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

    /// A fresh environ for `request`, with `input` as `wsgi.input`: what [`environ::map_vars`] decides, as
    /// Python objects.
    pub(super) fn build<'py>(
        &mut self,
        py: Python<'py>,
        request: &RequestHead,
        input: &Bound<'py, Input>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let environ = self.constants.bind(py).copy()?;
        let listener = Listener {
            server_name: request.listener.server_name.as_bytes(),
            server_port: request.listener.server_port.as_bytes(),
        };
        let keys = &mut self.keys;
        let added = environ::map_vars(request.vars(), &listener, |name, value, repeat| {
            let (key, value) = match keys.get_mut(name) {
                Some(known) => (known.key.bind(py).clone(), known.value(py, value)?),
                None => (latin1(py, name)?, latin1(py, value)?),
            };
            insert(&environ, &key, &value, repeat)
        })?;
        if added.script_name {
            environ.set_item(self.script_name.bind(py), self.empty.bind(py))?;
        }
        if let Some(name) = added.server_name {
            environ.set_item(self.server_name.bind(py), latin1(py, name)?)?;
        }
        if let Some(port) = added.server_port {
            environ.set_item(self.server_port.bind(py), latin1(py, port)?)?;
        }
        let scheme = match added.url_scheme {
            Scheme::Https => &self.https,
            Scheme::Http => &self.http,
        };
        environ.set_item(self.url_scheme.bind(py), scheme.bind(py))?;
        environ.set_item(self.input.bind(py), input)?;
        if added.input_terminated {
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

/// Inserts one var; a key already there is joined or replaced as `repeat` says.
fn insert(
    environ: &Bound<'_, PyDict>,
    key: &Bound<'_, PyString>,
    value: &Bound<'_, PyString>,
    repeat: Repeat,
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
    match repeat {
        Repeat::Join(separator) => environ.set_item(key, existing.add(separator)?.add(value)?),
        Repeat::Replace => environ.set_item(key, value),
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
