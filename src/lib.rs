//! oxwsgi runs Python WSGI applications (PEP 3333) behind nginx, speaking the uwsgi protocol
//! (`uwsgi_pass`).
//!
//! # Layout
//! - [`config`]: command-line options, validated once into typed config.
//! - [`deploy`]: systemd socket activation and notification, pidfile, socket owner, privilege drop.
//! - [`master`]: the master process — binds once, starts and replaces worker processes, stops them.
//! - [`metrics`]: what workers count in shared memory, and the master's `/metrics` and `--stats`.
//! - [`server`]: tokio — listeners, connections, the uwsgi packet in and the HTTP response out. No pyo3.
//! - [`wsgi`]: the embedded interpreter, the app and the pool of Python threads. The only pyo3 user.
//! - [`exchange`]: the request and reply messages between the two.
//! - [`response`]: validating and encoding the response head (pure).
//! - The wire format itself lives in the `oxwsgi-proto` crate (pure, no I/O).

pub mod config;
pub mod deploy;
pub mod exchange;
pub mod master;
pub mod metrics;
pub mod response;
pub mod server;
pub mod wsgi;
