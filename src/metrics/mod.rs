//! Metrics across processes: workers count into cells of a shared-memory region, the master sums the cells
//! when scraped and serves them as Prometheus metrics (`--metrics`) and as uWSGI's stats document
//! (`--stats`). No pyo3 and no per-request I/O here.
//!
//! - [`model`]: the label sets (method, protocol error kind).
//! - [`layout`]: what a worker counts, as plain words (the cell).
//! - [`words`]: viewing those structs as words (the only unsafe views), and the compile-time check that
//!   they are nothing else.
//! - [`region`]: the shared memory itself and the master's [`Cells`].
//! - [`recorder`]: the worker's [`Recorder`], what the request path counts through.
//! - [`exposition`]: the Prometheus text document (pure).
//! - [`stats`]: the uWSGI stats JSON document (pure).
//! - [`sys`]: what the kernel says: a process's memory, a listening socket's accept queue.
//! - [`books`]: the master's side: the cells plus what only the master knows, into those documents.
//! - [`endpoint`]: the master's `/metrics` HTTP endpoint and stats socket.

pub mod books;
pub mod endpoint;
pub mod exposition;
pub mod layout;
pub mod model;
pub mod recorder;
pub mod region;
pub mod stats;
pub mod sys;
pub mod words;

pub use recorder::{InFlight, Recorder, RequestDone};
pub use region::{Cells, Region};
