//! What the WSGI environ (PEP 3333) makes of a request's vars, decided without an interpreter: which vars
//! are left out, what a repeated key becomes, and the entries a server adds (`SCRIPT_NAME`, `SERVER_NAME`
//! and `SERVER_PORT` when nginx left them empty, `wsgi.url_scheme`, `wsgi.input_terminated`).
//!
//! A server walks the vars once with [`map_vars`] and turns what it is told into its own objects (oxwsgi
//! into a Python `dict`); nothing here allocates. [`environ_pairs`] applies the same decisions to a plain
//! list, for tests and fuzzing. Values are raw bytes: the environ holds them as latin-1 `str`s, which every
//! byte is, so no decision depends on their encoding.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;

/// Vars nginx sends twice: once from `uwsgi_params` as `CONTENT_TYPE` / `CONTENT_LENGTH`, and again, like
/// every client header, as `HTTP_CONTENT_TYPE` / `HTTP_CONTENT_LENGTH`. PEP 3333 wants only the first pair
/// (`wsgiref.validate` refuses the second), so the `HTTP_` copies are left out.
pub const DROPPED_VARS: [&[u8]; 2] = [b"HTTP_CONTENT_TYPE", b"HTTP_CONTENT_LENGTH"];

/// Prefixes of the keys a server puts in the environ itself (`wsgi.input`, `wsgi.errors`, ...; oxwsgi's own
/// `oxwsgi.version`). A var with such a name is left out: it could only come from an odd `uwsgi_param` or a
/// client speaking uwsgi to the socket directly, and must never replace the server's stream or flag.
pub const SERVER_KEY_PREFIXES: [&[u8]; 2] = [b"wsgi.", b"oxwsgi."];

/// `wsgi.url_scheme`: only ever `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// What the socket a request came in on gives for `SERVER_NAME` / `SERVER_PORT` when neither nginx nor the
/// `Host` header does (an empty port: none, e.g. a Unix socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener<'a> {
    pub server_name: &'a [u8],
    pub server_port: &'a [u8],
}

/// What a var does to an environ that already holds its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// The value is appended after this separator. A repeated `HTTP_*` key is one client header sent twice,
    /// which nginx < 1.23 passes as two records and nginx >= 1.23 joins itself: `"; "` for cookies, `", "`
    /// otherwise.
    Join(&'static str),
    /// The value replaces the earlier one: the last wins, as in uWSGI.
    Replace,
}

/// How the var called `name` enters the environ: `None` if it is left out ([`DROPPED_VARS`],
/// [`SERVER_KEY_PREFIXES`]), else what it does when its key is already there.
pub fn var_entry(name: &[u8]) -> Option<Repeat> {
    if DROPPED_VARS.contains(&name) || SERVER_KEY_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) {
        return None;
    }
    if !name.starts_with(b"HTTP_") {
        return Some(Repeat::Replace);
    }
    Some(Repeat::Join(if name == b"HTTP_COOKIE" { "; " } else { ", " }))
}

/// The entries a server adds once the vars are in, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added<'a> {
    /// No `SCRIPT_NAME` var came (nginx sends none unless configured to): add it, empty. Apps expect the key,
    /// and an empty one means "mounted at the root".
    pub script_name: bool,
    /// `SERVER_NAME` came empty (nginx sends `""` for a `server` block without `server_name`) or not at all,
    /// which PEP 3333 forbids: set it to this, the host part of `HTTP_HOST`, else the listener's name.
    pub server_name: Option<&'a [u8]>,
    /// `SERVER_PORT` came empty or not at all: set it to this, the port of `HTTP_HOST`, else the listener's,
    /// else the scheme's default.
    pub server_port: Option<&'a [u8]>,
    pub url_scheme: Scheme,
    /// Set `wsgi.input_terminated` (true): see [`Seen::dechunked`].
    pub input_terminated: bool,
}

/// Walks `vars` (in wire order, duplicates included) once: each var that enters the environ goes to `put`
/// with what it does to a key already there; the entries to add after them are returned. `put` may fail
/// (a server's own allocation); its error ends the walk.
///
/// # Errors
/// The first error `put` returns.
pub fn map_vars<'a, E>(
    vars: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    listener: &Listener<'a>,
    mut put: impl FnMut(&'a [u8], &'a [u8], Repeat) -> Result<(), E>,
) -> Result<Added<'a>, E> {
    let mut seen = Seen::default();
    for (name, value) in vars {
        let Some(repeat) = var_entry(name) else { continue };
        seen.note(name, value);
        put(name, value, repeat)?;
    }
    Ok(seen.added(listener))
}

/// The vars that decide the added entries: the last value of each (as the environ holds it, for the
/// non-`HTTP_` ones), whether `SCRIPT_NAME` came at all.
#[derive(Debug, Default)]
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

    fn added(&self, listener: &Listener<'a>) -> Added<'a> {
        let url_scheme = self.scheme();
        let server_name = self
            .server_name
            .is_none_or(<[u8]>::is_empty)
            .then(|| host_part(self.http_host).unwrap_or(listener.server_name));
        let server_port = self.server_port.is_none_or(<[u8]>::is_empty).then(|| {
            let default: &'static [u8] = match url_scheme {
                Scheme::Https => b"443",
                Scheme::Http => b"80",
            };
            port_part(self.http_host)
                .or_else(|| (!listener.server_port.is_empty()).then_some(listener.server_port))
                .unwrap_or(default)
        });
        Added {
            script_name: !self.script_name,
            server_name,
            server_port,
            url_scheme,
            input_terminated: self.dechunked(),
        }
    }

    /// `wsgi.url_scheme` comes only from what nginx itself sets — `UWSGI_SCHEME`, `HTTPS`, `REQUEST_SCHEME`, in
    /// that order — never from a client header such as `X-Forwarded-Proto` (which uWSGI trusts verbatim).
    fn scheme(&self) -> Scheme {
        let named = |v: &[u8]| match v {
            v if v.eq_ignore_ascii_case(b"https") => Some(Scheme::Https),
            v if v.eq_ignore_ascii_case(b"http") => Some(Scheme::Http),
            _ => None,
        };
        if let Some(scheme) = self.uwsgi_scheme.and_then(named) {
            return scheme;
        }
        if let Some(flag) = self.https.filter(|v| !v.is_empty()) {
            let on = flag.eq_ignore_ascii_case(b"on") || flag == b"1";
            return if on { Scheme::Https } else { Scheme::Http };
        }
        self.request_scheme.and_then(named).unwrap_or(Scheme::Http)
    }

    /// The client sent a chunked body, which nginx de-chunked and framed with `CONTENT_LENGTH`. The
    /// `HTTP_TRANSFER_ENCODING: chunked` it still passes on makes Werkzeug and others ignore
    /// `CONTENT_LENGTH` and see an empty body (pallets/werkzeug#2346) — unless `wsgi.input_terminated` says
    /// the stream ends by itself, which a server's does, at `CONTENT_LENGTH`. Only then is it set: with it,
    /// Werkzeug reads the raw stream with `read()` and no size, which `wsgiref.validate` forbids, while
    /// without it Werkzeug wraps the stream and reads with sizes as PEP 3333 expects.
    fn dechunked(&self) -> bool {
        self.transfer_encoding.is_some_and(|te| te.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked")))
    }
}

/// `example.com` from `example.com:8080`, `[::1]` from `[::1]:8080`; `None` for an empty host.
fn host_part(host: Option<&[u8]>) -> Option<&[u8]> {
    let host = host.filter(|h| !h.is_empty())?;
    let end = if host.starts_with(b"[") {
        host.iter().position(|&b| b == b']').map_or(host.len(), |i| i + 1)
    } else {
        host.iter().position(|&b| b == b':').unwrap_or(host.len())
    };
    Some(&host[..end]).filter(|h| !h.is_empty())
}

/// `8080` from `example.com:8080` or `[::1]:8080`; `None` unless the port is there and all digits.
fn port_part(host: Option<&[u8]>) -> Option<&[u8]> {
    let host = host?;
    let name_len = host_part(Some(host))?.len();
    let port = host[name_len..].strip_prefix(b":")?;
    (!port.is_empty() && port.iter().all(u8::is_ascii_digit)).then_some(port)
}

/// The CGI part of an environ as `(key, value)` pairs, in the order a `dict` filled by [`map_vars`]'s caller
/// holds them (a value is copied only when a repeat is joined to it), with `wsgi.url_scheme` and whether
/// `wsgi.input_terminated` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironPairs<'a> {
    pub vars: Vec<(&'a [u8], Cow<'a, [u8]>)>,
    pub url_scheme: Scheme,
    pub input_terminated: bool,
}

/// [`map_vars`] applied to a list the way a server applies it to its `dict`: a new key goes last, a repeated
/// one is joined or replaced in place, then the added entries. For tests and fuzzing (it allocates); a server
/// fills its own map from [`map_vars`].
pub fn environ_pairs<'a>(
    vars: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    listener: &Listener<'a>,
) -> EnvironPairs<'a> {
    /// A list with an index of where each key is, as a dict keeps its order.
    #[derive(Default)]
    struct Ordered<'k> {
        pairs: Vec<(&'k [u8], Cow<'k, [u8]>)>,
        at: HashMap<&'k [u8], usize>,
    }
    impl<'k> Ordered<'k> {
        fn put(&mut self, key: &'k [u8], value: &'k [u8], repeat: Repeat) {
            match self.at.get(key) {
                None => {
                    self.at.insert(key, self.pairs.len());
                    self.pairs.push((key, Cow::Borrowed(value)));
                }
                Some(&i) => match repeat {
                    Repeat::Join(separator) => {
                        let joined = self.pairs[i].1.to_mut();
                        joined.extend_from_slice(separator.as_bytes());
                        joined.extend_from_slice(value);
                    }
                    Repeat::Replace => self.pairs[i].1 = Cow::Borrowed(value),
                },
            }
        }
    }
    let mut environ = Ordered::default();
    let Ok(added) = map_vars(vars, listener, |key, value, repeat| {
        environ.put(key, value, repeat);
        Ok::<(), Infallible>(())
    });
    if added.script_name {
        environ.put(b"SCRIPT_NAME", b"", Repeat::Replace);
    }
    if let Some(name) = added.server_name {
        environ.put(b"SERVER_NAME", name, Repeat::Replace);
    }
    if let Some(port) = added.server_port {
        environ.put(b"SERVER_PORT", port, Repeat::Replace);
    }
    EnvironPairs {
        vars: environ.pairs,
        url_scheme: added.url_scheme,
        input_terminated: added.input_terminated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIX: Listener<'static> = Listener { server_name: b"localhost", server_port: b"" };
    const TCP: Listener<'static> = Listener { server_name: b"127.0.0.1", server_port: b"8000" };

    type Vars<'a> = [(&'a [u8], &'a [u8])];

    fn environ<'a>(vars: &Vars<'a>) -> EnvironPairs<'a> {
        environ_pairs(vars.iter().copied(), &UNIX)
    }

    fn get<'e>(environ: &'e EnvironPairs<'_>, key: &str) -> Option<&'e [u8]> {
        environ.vars.iter().find(|(k, _)| *k == key.as_bytes()).map(|(_, v)| &v[..])
    }

    fn scheme(vars: &Vars<'_>) -> Scheme {
        environ(vars).url_scheme
    }

    #[test]
    fn every_var_enters_in_wire_order_except_the_dropped_ones() {
        let env = environ(&[
            (b"REQUEST_METHOD", b"GET"),
            (b"HTTP_CONTENT_TYPE", b"text/plain"),
            (b"CONTENT_TYPE", b"text/plain"),
            (b"HTTP_CONTENT_LENGTH", b"0"),
            (b"HTTP_X_BIN", b"\xff\x00"),
            (b"wsgi.errors", b"a str in place of the stream"),
            (b"oxwsgi.version", b"0"),
            (b"wsgi", b"not a server key"),
        ]);
        let keys: Vec<&[u8]> = env.vars.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                &b"REQUEST_METHOD"[..],
                b"CONTENT_TYPE",
                b"HTTP_X_BIN",
                b"wsgi",
                b"SCRIPT_NAME",
                b"SERVER_NAME",
                b"SERVER_PORT"
            ]
        );
        assert_eq!(get(&env, "HTTP_X_BIN"), Some(&b"\xff\x00"[..]));
    }

    #[test]
    fn repeated_headers_are_joined_and_other_repeats_replaced() {
        let env = environ(&[
            (b"HTTP_COOKIE", b"a=1"),
            (b"HTTP_X_DUP", b"one"),
            (b"NGINX_PARAM", b"first"),
            (b"HTTP_COOKIE", b"a=1"),
            (b"HTTP_X_DUP", b""),
            (b"NGINX_PARAM", b"last"),
        ]);
        assert_eq!(get(&env, "HTTP_COOKIE"), Some(&b"a=1; a=1"[..]));
        assert_eq!(get(&env, "HTTP_X_DUP"), Some(&b"one, "[..]));
        assert_eq!(get(&env, "NGINX_PARAM"), Some(&b"last"[..]));
        assert_eq!(var_entry(b"HTTP_"), Some(Repeat::Join(", ")));
        assert_eq!(var_entry(b"HTTP_COOKIES"), Some(Repeat::Join(", ")));
    }

    #[test]
    fn scheme_comes_only_from_trusted_vars() {
        assert_eq!(scheme(&[]), Scheme::Http);
        assert_eq!(scheme(&[(b"HTTP_X_FORWARDED_PROTO", b"https")]), Scheme::Http);
        assert_eq!(scheme(&[(b"HTTP_HTTPS", b"on")]), Scheme::Http);
        assert_eq!(scheme(&[(b"HTTPS", b"on")]), Scheme::Https);
        assert_eq!(scheme(&[(b"HTTPS", b"ON")]), Scheme::Https);
        assert_eq!(scheme(&[(b"HTTPS", b"1")]), Scheme::Https);
        assert_eq!(scheme(&[(b"HTTPS", b"off")]), Scheme::Http);
        assert_eq!(scheme(&[(b"HTTPS", b"off"), (b"REQUEST_SCHEME", b"https")]), Scheme::Http);
        assert_eq!(scheme(&[(b"REQUEST_SCHEME", b"https")]), Scheme::Https);
        assert_eq!(scheme(&[(b"REQUEST_SCHEME", b"http"), (b"HTTPS", b"")]), Scheme::Http);
        assert_eq!(scheme(&[(b"HTTPS", b""), (b"REQUEST_SCHEME", b"HTTPS")]), Scheme::Https);
        assert_eq!(scheme(&[(b"UWSGI_SCHEME", b"https"), (b"REQUEST_SCHEME", b"http")]), Scheme::Https);
        assert_eq!(scheme(&[(b"UWSGI_SCHEME", b"http"), (b"HTTPS", b"on")]), Scheme::Http);
        assert_eq!(scheme(&[(b"UWSGI_SCHEME", b"javascript")]), Scheme::Http);
        assert_eq!(Scheme::Https.as_str(), "https");
    }

    #[test]
    fn input_terminated_only_for_dechunked_bodies() {
        assert!(!environ(&[(b"CONTENT_LENGTH", b"10")]).input_terminated);
        assert!(environ(&[(b"HTTP_TRANSFER_ENCODING", b"chunked")]).input_terminated);
        assert!(environ(&[(b"HTTP_TRANSFER_ENCODING", b"gzip, Chunked")]).input_terminated);
        assert!(!environ(&[(b"HTTP_TRANSFER_ENCODING", b"gzip")]).input_terminated);
    }

    #[test]
    fn script_name_is_added_only_when_missing() {
        assert_eq!(get(&environ(&[]), "SCRIPT_NAME"), Some(&b""[..]));
        let mounted = environ(&[(b"SCRIPT_NAME", b"/app"), (b"PATH_INFO", b"/x")]);
        assert_eq!(get(&mounted, "SCRIPT_NAME"), Some(&b"/app"[..]));
        assert_eq!(get(&mounted, "PATH_INFO"), Some(&b"/x"[..]));
        assert_eq!(get(&environ(&[]), "PATH_INFO"), None, "PATH_INFO is nginx's to send");
    }

    #[test]
    fn server_name_and_port_fall_back_to_host_then_listener() {
        let env =
            environ(&[(b"SERVER_NAME", b""), (b"HTTP_HOST", b"example.org:8080"), (b"SERVER_PORT", b"80")]);
        assert_eq!(get(&env, "SERVER_NAME"), Some(&b"example.org"[..]));
        assert_eq!(get(&env, "SERVER_PORT"), Some(&b"80"[..]), "nginx's port is kept");
        let env = environ(&[(b"HTTP_HOST", b"[::1]:8443")]);
        assert_eq!(get(&env, "SERVER_NAME"), Some(&b"[::1]"[..]));
        assert_eq!(get(&env, "SERVER_PORT"), Some(&b"8443"[..]));
        let env = environ(&[(b"SERVER_NAME", b"named")]);
        assert_eq!(get(&env, "SERVER_NAME"), Some(&b"named"[..]));
        assert_eq!(get(&env, "SERVER_PORT"), Some(&b"80"[..]), "no port anywhere: the scheme's");
        let env = environ(&[(b"HTTPS", b"on"), (b"HTTP_HOST", b"example.org:x")]);
        assert_eq!(get(&env, "SERVER_NAME"), Some(&b"example.org"[..]));
        assert_eq!(get(&env, "SERVER_PORT"), Some(&b"443"[..]));
        let env = environ_pairs([], &TCP);
        assert_eq!(get(&env, "SERVER_NAME"), Some(&b"127.0.0.1"[..]));
        assert_eq!(get(&env, "SERVER_PORT"), Some(&b"8000"[..]));
        let env = environ(&[(b"HTTP_HOST", b":80")]);
        assert_eq!(get(&env, "SERVER_NAME"), Some(&b"localhost"[..]), "a host without a name");
    }

    #[test]
    fn host_and_port_parts() {
        assert_eq!(host_part(Some(b"example.com:8080")), Some(&b"example.com"[..]));
        assert_eq!(port_part(Some(b"example.com:8080")), Some(&b"8080"[..]));
        assert_eq!(host_part(Some(b"[::1]:8080")), Some(&b"[::1]"[..]));
        assert_eq!(port_part(Some(b"[::1]:8080")), Some(&b"8080"[..]));
        assert_eq!(host_part(Some(b"[::1")), Some(&b"[::1"[..]), "an unclosed bracket is all name");
        assert_eq!(host_part(Some(b"example.com")), Some(&b"example.com"[..]));
        assert_eq!(port_part(Some(b"example.com")), None);
        assert_eq!(host_part(Some(b"")), None);
        assert_eq!(host_part(Some(b":80")), None);
        assert_eq!(port_part(Some(b"example.com:x")), None);
        assert_eq!(port_part(Some(b"example.com:")), None);
    }

    #[test]
    fn map_vars_stops_at_the_first_error() {
        let vars: [(&[u8], &[u8]); 3] = [(b"A", b"1"), (b"B", b"2"), (b"C", b"3")];
        let mut seen = Vec::new();
        let result = map_vars(vars, &UNIX, |key, _, _| {
            seen.push(key);
            if key == b"B" {
                Err("full")
            } else {
                Ok(())
            }
        });
        assert_eq!(result, Err("full"));
        assert_eq!(seen, [&b"A"[..], b"B"]);
    }
}
