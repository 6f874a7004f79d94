//! The messages that cross between the tokio side (sockets) and the Python threads (the app): one
//! [`Request`] each way in, one [`Reply`] out, plus the body streams that follow them.
//!
//! Plain Rust on purpose: nothing here knows pyo3, so the server can be driven by any [`Handler`], and the
//! WSGI layer never sees a socket.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::response::INTERNAL_ERROR;

/// One request as the app will see it.
#[derive(Debug)]
pub struct Request {
    /// The validated uwsgi vars block (CGI-style key/value records), shared with the read buffer.
    pub vars: Bytes,
    pub body: Body,
    /// A HEAD request: the app runs, but no body bytes are written.
    pub head_only: bool,
    /// What the listening socket says about itself, for environ keys nginx left empty.
    pub listener: Arc<ListenerInfo>,
    pub accepted_at: Instant,
}

/// `SERVER_NAME` / `SERVER_PORT` fallbacks for the socket a request came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub server_name: String,
    pub server_port: String,
}

/// The request body: `CONTENT_LENGTH` bytes, of which `received` came with the packet and the rest arrive
/// through `rest` as the app reads.
#[derive(Debug)]
pub struct Body {
    pub content_length: u64,
    pub received: Bytes,
    pub rest: Option<mpsc::Receiver<io::Result<Bytes>>>,
}

/// The response, sent once per request by the Python thread.
#[derive(Debug)]
pub enum Reply {
    /// The whole response is known: written with one vectored write.
    Full { status: u16, head: Bytes, body: Vec<Bytes> },
    /// Head and first chunk now, the rest as the app produces it.
    Stream { status: u16, head: Bytes, first: Bytes, rest: mpsc::Receiver<StreamItem> },
}

impl Reply {
    /// The 500 answer for an app that failed before sending anything.
    pub fn internal_error() -> Self {
        Reply::Full { status: 500, head: Bytes::from_static(INTERNAL_ERROR), body: Vec::new() }
    }
}

/// What follows a [`Reply::Stream`].
#[derive(Debug)]
pub enum StreamItem {
    Chunk(Bytes),
    /// The response is complete. A stream that closes without it failed after bytes were sent: the
    /// connection is aborted, never closed as if the response were complete.
    End,
}

/// Something that runs requests: the Python thread pool in production.
pub trait Handler: Send + Sync + 'static {
    /// Queues `request`. `permit` is held until the app is done with it, so the accept loop takes only as
    /// many connections as the threads will soon run (the rest wait in the kernel backlog, where another
    /// worker process can pick them up).
    fn submit(
        &self,
        request: Request,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Reply>, Rejected>;

    /// How many requests can run at once.
    fn capacity(&self) -> usize;
}

/// The handler is shutting down and takes no more work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected;

/// `METHOD /uri` of a request for log lines, read from its vars block only when a line is written.
pub struct RequestLine(pub Bytes);

impl fmt::Display for RequestLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ok(vars) = oxwsgi_proto::parse_vars(&self.0, usize::MAX) else {
            return f.write_str("?");
        };
        let method = vars.get(b"REQUEST_METHOD").unwrap_or_default();
        let uri = vars.get(b"REQUEST_URI").or_else(|| vars.get(b"PATH_INFO")).unwrap_or_default();
        write!(f, "{} {}", String::from_utf8_lossy(method), String::from_utf8_lossy(uri))
    }
}
