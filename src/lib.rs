//! oxwsgi runs Python WSGI applications (PEP 3333) behind nginx, speaking the uwsgi protocol
//! (`uwsgi_pass`).
//!
//! # Layout
//! - [`cli`]: the command itself — options to config, sockets, then the master or one serving process.
//! - [`config`]: command-line options, validated once into typed config (users and groups resolved in
//!   [`config::owner`]; uWSGI ini files turned into options in [`config::ini`]).
//! - [`deploy`]: what running under an init system needs at run time: systemd notification, pidfile,
//!   privilege drop, limits.
//! - [`logging`]: stderr or the `--logto` file (reopened on SIGUSR1), lines as text or JSON.
//! - [`master`]: the master process — binds once, starts and replaces worker processes, stops them: the
//!   master↔worker contract, spawning, each worker's lifecycle (a tested state machine), periodic checks.
//! - [`metrics`]: what workers count in shared memory (label model, word layout, the unsafe word views in
//!   one module), and the master's `/metrics` and `--stats`.
//! - [`ping`]: `oxwsgi ping ADDR`, the health check: a uwsgi ping and its pong.
//! - [`server`]: sockets — binding or adopting them (systemd, the master), the serving threads' accept and
//!   read, the response out, and the tokio runtime for connections that wait. No pyo3.
//! - [`socket_file`]: Unix socket files — a stale one replaced, a live one never stolen, removal at exit.
//! - [`wsgi`]: the embedded interpreter, the app and the pool of Python threads that serve requests
//!   through [`server`]; and the extension module `oxwsgi._oxwsgi` through which the pip-installed
//!   package runs [`cli`]. The only pyo3 user.
//! - The wire format itself — the uwsgi packet in, the HTTP response head out — lives in the
//!   `oxwsgi-proto` crate (pure, no I/O).

pub mod cli;
pub mod config;
pub mod deploy;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod ping;
pub mod server;
pub mod socket_file;
pub mod wsgi;
