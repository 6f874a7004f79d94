//! Writing a response from the thread that ran the app: straight to the socket, as much as it takes now;
//! what it does not take is handed to the I/O runtime with the connection, and later parts follow through
//! a bounded channel, so a slow reader holds no Python thread for longer than that channel takes to fill.
//!
//! Owns what is counted and logged when a response ends ([`Record`]): once, wherever it ends. No pyo3
//! here.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::conn::Conn;
use super::front::Front;
use super::request::RequestLine;
use crate::metrics::layout::Method;
use crate::metrics::region::InFlight;
use crate::metrics::RequestDone;

/// Parts queued between the Python thread and a connection the I/O runtime writes: enough to keep the socket
/// busy while the app produces the next chunk, small enough that a slow client back-pressures a streaming
/// app instead of buffering its whole output in memory.
pub const STREAM_CHANNEL_PARTS: usize = 8;
/// `writev` accepts at most `IOV_MAX` (1024 on Linux) buffers per call.
pub const MAX_IOVECS: usize = 1024;
/// Buffers handed to one `writev` from the stack; more than this (rare) go in a `Vec`.
const STACK_IOVECS: usize = 16;
/// Unread request body drained after the response, so closing does not reset the connection and make nginx
/// lose the response (flask-jwt-extended#253). Past this, closing with a reset is the cheaper evil.
pub const MAX_DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// Size of each read that discards an unread request body.
pub const DRAIN_READ_SIZE: usize = 64 * 1024;

/// What the I/O runtime writes for a handed-off response, in order.
#[derive(Debug)]
pub enum Part {
    Bytes(Vec<Bytes>),
    /// `len` bytes of `file` from `offset`, with `sendfile(2)`.
    File {
        file: File,
        offset: u64,
        len: u64,
    },
    /// The response is complete: drain `unread` request-body bytes, then close. A channel that closes
    /// without it means the app failed after bytes were sent: the connection is aborted.
    End {
        unread: u64,
    },
}

/// nginx closed the connection (client gone, timeout): nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

/// How a response ended, for the record.
#[derive(Debug)]
pub enum End {
    Complete,
    /// The app failed after bytes were sent.
    Aborted,
    WriteFailed(io::Error),
}

/// One response: counted (`/metrics`) and logged (access log, write errors) once, when it ends.
pub struct Record {
    pub method: Method,
    pub line: RequestLine,
    pub accepted_at: Instant,
    pub head_only: bool,
    pub request_body_bytes: u64,
    pub status: u16,
    /// Written, or attempted.
    pub head_bytes: u64,
    pub body_bytes: u64,
    /// Counts the connection in flight until the record is done.
    #[expect(dead_code, reason = "held for its Drop")]
    pub in_flight: InFlight,
}

impl Record {
    /// Counts a part the I/O runtime received after the hand-off.
    pub fn count(&mut self, part: &Part) {
        self.body_bytes += match part {
            Part::Bytes(parts) => parts.iter().map(|b| b.len() as u64).sum(),
            Part::File { len, .. } => *len,
            Part::End { .. } => 0,
        };
    }

    pub fn done(self, front: &Front, end: &End) {
        if front.metrics.is_enabled() {
            front.metrics.request_done(&RequestDone {
                method: self.method,
                status: self.status,
                duration: self.accepted_at.elapsed(),
                body_bytes: self.request_body_bytes,
                response_bytes: self.head_bytes + self.body_bytes,
                write_failed: matches!(end, End::WriteFailed(_)),
            });
        }
        let line = &self.line;
        match end {
            End::Complete => {}
            End::Aborted => {
                warn!(request = %line, status = self.status, "response aborted after {} body bytes", self.body_bytes);
            }
            End::WriteFailed(err) if self.head_only || matches!(self.status, 204 | 304) => {
                debug!(request = %line, "nginx closed the connection after the head: {err}");
            }
            End::WriteFailed(err) => info!(request = %line, "client gone while writing the response: {err}"),
        }
        if front.config.access_log {
            let millis = self.accepted_at.elapsed().as_secs_f64() * 1000.0;
            info!(target: "oxwsgi::access", "{line} => {} ({} bytes) in {millis:.1} ms", self.status, self.body_bytes);
        }
    }
}

/// The write side of one request, owned by the thread running the app.
pub struct Responder {
    front: Arc<Front>,
    state: State,
}

enum State {
    /// This thread writes to the socket.
    Direct { conn: Arc<Conn>, record: Record, failed: Option<io::Error> },
    /// The I/O runtime writes; parts go through the channel.
    HandedOff(mpsc::Sender<Part>),
    /// Nothing more goes out (a write to the I/O runtime failed: the client is gone).
    Closed,
}

impl Responder {
    pub(super) fn new(front: Arc<Front>, conn: Arc<Conn>, record: Record) -> Self {
        Self { front, state: State::Direct { conn, record, failed: None } }
    }

    /// The response status, for the record (set with the head).
    pub fn set_status(&mut self, status: u16) {
        if let State::Direct { record, .. } = &mut self.state {
            record.status = status;
        }
    }

    /// Sends `head` (empty once sent) and `body`. Waits only when the I/O runtime already holds
    /// [`STREAM_CHANNEL_PARTS`] parts of this response (call it with the interpreter released).
    pub fn send(&mut self, head: &[u8], body: Vec<Bytes>) -> Result<(), ClientGone> {
        let (conn, record, failed) = match &mut self.state {
            State::Direct { conn, record, failed } => (conn, record, failed),
            State::HandedOff(_) => {
                let mut parts = body;
                if !head.is_empty() {
                    parts.insert(0, Bytes::copy_from_slice(head));
                }
                return self.forward(Part::Bytes(parts));
            }
            State::Closed => return Err(ClientGone),
        };
        record.head_bytes += head.len() as u64;
        record.body_bytes += body.iter().map(|b| b.len() as u64).sum::<u64>();
        match write_now(conn, head, body) {
            Ok(None) => Ok(()),
            Ok(Some(rest)) => self.hand_off(Part::Bytes(rest)),
            Err(err) => {
                *failed = Some(err);
                Err(ClientGone)
            }
        }
    }

    /// Sends `head`, then `len` bytes of `file` from `offset` with `sendfile(2)`: from the page cache to the
    /// socket, never through user space.
    pub fn send_file(
        &mut self,
        head: &[u8],
        file: BorrowedFd<'_>,
        mut offset: u64,
        len: u64,
    ) -> Result<(), ClientGone> {
        self.send(head, Vec::new())?;
        let (conn, record, failed) = match &mut self.state {
            State::Direct { conn, record, failed } => (conn, record, failed),
            State::HandedOff(_) => {
                let file = own(file)?;
                return self.forward(Part::File { file, offset, len });
            }
            State::Closed => return Err(ClientGone),
        };
        record.body_bytes += len;
        let end = offset + len;
        while offset < end {
            let count = usize::try_from(end - offset).unwrap_or(usize::MAX);
            match conn.try_sendfile(file, &mut offset, count) {
                Ok(0) => {
                    // The file is shorter than it was when its length was taken: the response cannot be
                    // completed.
                    *failed = Some(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while being sent",
                    ));
                    return Err(ClientGone);
                }
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    let file = own(file)?;
                    return self.hand_off(Part::File { file, offset, len: end - offset });
                }
                Err(err) => {
                    *failed = Some(err);
                    return Err(ClientGone);
                }
            }
        }
        Ok(())
    }

    /// The response is complete. `unread` request-body bytes are discarded first (closing with unread
    /// bytes would reset the connection and could lose the response), then the connection is closed — here
    /// if that needs no waiting, else by the I/O runtime. Counted and logged once done.
    pub fn finish(self, unread: u64) {
        match self.state {
            State::Direct { conn, record, failed } => {
                let end = failed.map_or(End::Complete, End::WriteFailed);
                let ended_cleanly = matches!(end, End::Complete);
                record.done(&self.front, &end);
                if ended_cleanly && unread > 0 {
                    drain_or_hand_off(&self.front, conn, unread);
                }
            }
            State::HandedOff(channel) => {
                // A closed channel means the runtime already gave up on the connection (and said why).
                let _ = channel.blocking_send(Part::End { unread });
            }
            State::Closed => {}
        }
    }

    /// The app failed after bytes were sent: nginx must see an error, never a short response passed off as
    /// complete.
    pub fn abort(self) {
        match self.state {
            State::Direct { conn, record, failed } => {
                let end = failed.map_or(End::Aborted, End::WriteFailed);
                record.done(&self.front, &end);
                conn.abort();
            }
            // Dropping the channel without its end marker aborts the connection.
            State::HandedOff(_) | State::Closed => {}
        }
    }

    /// From now on the I/O runtime writes: `first` now, later parts through the channel.
    fn hand_off(&mut self, first: Part) -> Result<(), ClientGone> {
        let State::Direct { conn, record, failed: _ } = std::mem::replace(&mut self.state, State::Closed)
        else {
            return Err(ClientGone);
        };
        // The request body reader may still hold the connection; the runtime then gets a descriptor of its
        // own, and the connection closes once both are done with it.
        let conn = match Arc::try_unwrap(conn) {
            Ok(conn) => conn,
            Err(shared) => match shared.try_clone() {
                Ok(conn) => conn,
                Err(err) => {
                    record.done(&self.front, &End::WriteFailed(err));
                    return Err(ClientGone);
                }
            },
        };
        let (sender, receiver) = mpsc::channel(STREAM_CHANNEL_PARTS);
        self.front.spawn(super::waiting::write_rest(conn, first, receiver, record, Arc::clone(&self.front)));
        self.state = State::HandedOff(sender);
        Ok(())
    }

    fn forward(&mut self, part: Part) -> Result<(), ClientGone> {
        let State::HandedOff(channel) = &self.state else { return Err(ClientGone) };
        let sent = match channel.try_send(part) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(part)) => channel.blocking_send(part).map_err(drop),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        sent.map_err(|()| {
            self.state = State::Closed;
            ClientGone
        })
    }
}

/// A descriptor of the I/O runtime's own for `file`, which stays the app's to close.
fn own(file: BorrowedFd<'_>) -> Result<File, ClientGone> {
    file.try_clone_to_owned().map(File::from).map_err(|err| {
        warn!("cannot hand a file response to the I/O runtime: {err}");
        ClientGone
    })
}

/// Writes `head`, then `body`, while the socket takes them: `Ok(None)` when all went out, `Ok(Some(rest))`
/// with what is left when the socket is full.
fn write_now(conn: &Conn, head: &[u8], body: Vec<Bytes>) -> io::Result<Option<Vec<Bytes>>> {
    let total = head.len() + body.iter().map(Bytes::len).sum::<usize>();
    // The common case, one write of everything, builds nothing on the heap.
    let written = match with_slices(head, &body, |slices| conn.try_write(slices)) {
        Ok(written) if written == total => return Ok(None),
        Ok(written) => written,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
        Err(err) => return Err(err),
    };
    let mut parts = Vec::with_capacity(body.len() + 1);
    parts.push(Bytes::copy_from_slice(head));
    parts.extend(body);
    parts.retain(|p| !p.is_empty());
    advance(&mut parts, written);
    while !parts.is_empty() {
        match with_slices(&[], &parts, |slices| conn.try_write(slices)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => advance(&mut parts, written),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Some(parts)),
            Err(err) => return Err(err),
        }
    }
    Ok(None)
}

/// Calls `write` with `IoSlice`s over `first` (if not empty) and (the first [`MAX_IOVECS`] of) `rest`, built
/// on the stack when few.
fn with_slices<T>(first: &[u8], rest: &[Bytes], write: impl FnOnce(&[IoSlice<'_>]) -> T) -> T {
    let first = (!first.is_empty()).then(|| IoSlice::new(first));
    let rest = rest.iter().filter(|part| !part.is_empty()).map(|part| IoSlice::new(part));
    let mut slices = first.into_iter().chain(rest).take(MAX_IOVECS);
    let mut on_stack = [IoSlice::new(&[]); STACK_IOVECS];
    let mut count = 0;
    for (slot, slice) in on_stack.iter_mut().zip(&mut slices) {
        *slot = slice;
        count += 1;
    }
    if count < STACK_IOVECS {
        return write(&on_stack[..count]);
    }
    let all: Vec<IoSlice<'_>> = on_stack.into_iter().chain(slices).collect();
    write(&all)
}

/// Drops `written` bytes from the front of `parts`.
pub fn advance(parts: &mut Vec<Bytes>, mut written: usize) {
    let mut done = 0;
    for part in parts.iter_mut() {
        if written < part.len() {
            part.advance(written);
            break;
        }
        written -= part.len();
        done += 1;
    }
    parts.drain(..done);
}

/// Reads and discards `unread` body bytes while they are there; the rest (a body still arriving) is left to
/// the I/O runtime, bounded by [`MAX_DRAIN_BYTES`] and the socket timeout. Then the connection closes.
fn drain_or_hand_off(front: &Arc<Front>, conn: Arc<Conn>, unread: u64) {
    let Ok(conn) = Arc::try_unwrap(conn) else {
        // The body reader still holds it: it is closed when that lets go, undrained.
        return;
    };
    let mut left = unread.min(MAX_DRAIN_BYTES);
    let mut scratch = bytes::BytesMut::with_capacity(DRAIN_READ_SIZE);
    while left > 0 {
        scratch.clear();
        match conn.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(read) => left = left.saturating_sub(read as u64),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                front.spawn(super::waiting::drain_then_close(conn, left, front.config.socket_timeout));
                return;
            }
            Err(_) => return,
        }
    }
}
