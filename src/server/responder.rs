//! Writing a response from the thread that ran the app: straight to the socket. A stream's chunks are
//! written as the app produces them, waiting while the socket is full (the app's iterable holds the thread
//! anyway). The rest of a complete response is written from the thread while the socket takes it within
//! [`WRITE_WAIT_ON_THREAD`]; what is left then goes to the I/O runtime with the connection, so a slow
//! reader does not hold a Python thread.
//!
//! Owns what is counted and logged when a response ends ([`Record`]): once, wherever it ends. No pyo3
//! here.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::conn::Conn;
use super::front::Front;
use super::request::RequestLine;
use crate::config::LogFormat;
use crate::metrics::model::Method;
use crate::metrics::InFlight;
use crate::metrics::RequestDone;

/// How long the thread that ran the app waits, in all, for a full socket to take the rest of a complete
/// response before handing the connection to the I/O runtime. Through nginx, which reads its upstream as
/// fast as it can, a large response (a megabyte, a file) goes out within it and costs no hand-off; a slow
/// reader holds the thread no longer than this.
pub const WRITE_WAIT_ON_THREAD: Duration = Duration::from_millis(10);
/// Parts queued between the thread that ran the app and a handed-off response: after a hand-off only the
/// end marker (and rarely a file) follows.
const HANDED_OFF_PARTS: usize = 4;
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
    /// `head` (what is left of it), then `len` bytes of `file` from `offset`, with `sendfile(2)`.
    File {
        head: Bytes,
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
            Part::File { head, len, .. } => head.len() as u64 + *len,
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
            match front.config.access_log_format {
                LogFormat::Text => {
                    info!(target: "oxwsgi::access", "{line} => {} ({} bytes) in {millis:.1} ms", self.status, self.body_bytes);
                }
                // One field per value, which the JSON formatter writes as it goes (no map is built). The
                // lossy conversions borrow unless the bytes are not UTF-8.
                LogFormat::Json => {
                    let [method, uri] = line.parts();
                    let remote_addr = line.remote_addr().map(String::from_utf8_lossy);
                    let request_id = line.request_id().map(String::from_utf8_lossy);
                    info!(
                        target: "oxwsgi::access",
                        method = &*String::from_utf8_lossy(method),
                        uri = &*String::from_utf8_lossy(uri),
                        status = self.status,
                        bytes = self.body_bytes,
                        duration_ms = millis,
                        remote_addr = remote_addr.as_deref(),
                        worker = front.config.worker_id,
                        pid = std::process::id(),
                        request_id = request_id.as_deref(),
                    );
                }
            }
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

    /// Sends `head` (empty once sent) and `chunk` of a response that goes on (a stream): from this thread,
    /// waiting while the socket is full, each wait up to the socket timeout. The app's iterable holds this
    /// thread anyway; handing the connection to the I/O runtime would only add a wake-up per chunk. Call it
    /// with the interpreter released.
    pub fn send_more(&mut self, head: &[u8], chunk: &[u8]) -> Result<(), ClientGone> {
        let timeout = self.front.config.socket_timeout;
        let (conn, record, failed) = match &mut self.state {
            State::Direct { conn, record, failed } => (conn, record, failed),
            State::HandedOff(_) => {
                let parts = [head, chunk].into_iter().filter(|p| !p.is_empty()).map(Bytes::copy_from_slice);
                return self.forward(Part::Bytes(parts.collect()));
            }
            State::Closed => return Err(ClientGone),
        };
        record.head_bytes += head.len() as u64;
        record.body_bytes += chunk.len() as u64;
        let parts = [head, chunk];
        let written = write_from_thread(conn, &parts, Wait::EachUpTo(timeout));
        match written {
            Ok(written) if written == head.len() + chunk.len() => Ok(()),
            Ok(_) => {
                *failed = Some(io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response"));
                Err(ClientGone)
            }
            Err(err) => {
                *failed = Some(err);
                Err(ClientGone)
            }
        }
    }

    /// Sends `head` and `body`, the whole rest of the response: from this thread while the socket takes it
    /// within [`WRITE_WAIT_ON_THREAD`]; what is left then goes to the I/O runtime with the connection, so a
    /// slow reader does not hold the thread. Call it with the interpreter released.
    ///
    /// The last `inline` bytes of `head` are body (a small body copied after the head, to go out in one
    /// buffer). `body` is only borrowed (cloned if handed off), so the caller drops the app's buffers where
    /// it holds the interpreter.
    pub fn send_last(&mut self, head: &[u8], inline: usize, body: &[Bytes]) -> Result<(), ClientGone> {
        self.send_last_within(head, inline, body, WRITE_WAIT_ON_THREAD)
    }

    /// [`Responder::send_last`] without waiting at all: what the socket does not take at once goes to the
    /// I/O runtime. For a caller that holds the interpreter: a small response to a fresh connection always
    /// fits the socket's buffer, and writing it costs less than handing the interpreter to another thread
    /// and taking it back.
    pub fn send_last_now(&mut self, head: &[u8], inline: usize, body: &[Bytes]) -> Result<(), ClientGone> {
        self.send_last_within(head, inline, body, Duration::ZERO)
    }

    fn send_last_within(
        &mut self,
        head: &[u8],
        inline: usize,
        body: &[Bytes],
        wait: Duration,
    ) -> Result<(), ClientGone> {
        let owned = |head: &[u8], written: usize| {
            let mut rest = Vec::with_capacity(body.len() + 1);
            if written < head.len() {
                rest.push(Bytes::copy_from_slice(&head[written..]));
            }
            rest.extend(body.iter().cloned());
            advance(&mut rest, written.saturating_sub(head.len()));
            rest
        };
        let (conn, record, failed) = match &mut self.state {
            State::Direct { conn, record, failed } => (conn, record, failed),
            State::HandedOff(_) => return self.forward(Part::Bytes(owned(head, 0))),
            State::Closed => return Err(ClientGone),
        };
        let body_len = body.iter().map(Bytes::len).sum::<usize>();
        record.head_bytes += (head.len() - inline) as u64;
        record.body_bytes += (inline + body_len) as u64;
        let written = with_parts(head, body, |parts| {
            write_from_thread(conn, parts, Wait::AllWithin(Instant::now() + wait))
        });
        match written {
            Ok(written) if written == head.len() + body_len => Ok(()),
            Ok(written) => self.hand_off(Part::Bytes(owned(head, written))),
            Err(err) => {
                *failed = Some(err);
                Err(ClientGone)
            }
        }
    }

    /// Sends `head`, then `len` bytes of `file` from `offset` with `sendfile(2)`: from the page cache to the
    /// socket, never through user space. Like [`Responder::send_last`], from this thread for up to
    /// [`WRITE_WAIT_ON_THREAD`], then from the I/O runtime, which gets the file (a descriptor of the
    /// server's own, which the app's `close()` cannot take away mid-send).
    pub fn send_file(
        &mut self,
        head: &[u8],
        file: File,
        mut offset: u64,
        len: u64,
    ) -> Result<(), ClientGone> {
        let deadline = Instant::now() + WRITE_WAIT_ON_THREAD;
        let (conn, record, failed) = match &mut self.state {
            State::Direct { conn, record, failed } => (conn, record, failed),
            State::HandedOff(_) | State::Closed => return Err(ClientGone),
        };
        record.head_bytes += head.len() as u64;
        record.body_bytes += len;
        let written = match write_from_thread(conn, &[head], Wait::AllWithin(deadline)) {
            Ok(written) => written,
            Err(err) => {
                *failed = Some(err);
                return Err(ClientGone);
            }
        };
        if written < head.len() {
            let head = Bytes::copy_from_slice(&head[written..]);
            return self.hand_off(Part::File { head, file, offset, len });
        }
        let end = offset + len;
        while offset < end {
            let count = usize::try_from(end - offset).unwrap_or(usize::MAX);
            let sent = conn.try_sendfile(file.as_fd(), &mut offset, count);
            let waited = match sent {
                Ok(0) => {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being sent"))
                }
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => wait_writable(conn, deadline),
                Err(err) => Err(err),
            };
            match waited {
                Ok(true) => {}
                Ok(false) => {
                    return self.hand_off(Part::File { head: Bytes::new(), file, offset, len: end - offset });
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
                } else if !ended_cleanly {
                    // A write that failed (timed out, most often) left the response short: the close must
                    // not pass it off as complete to a reader that has no length to check.
                    conn.abort();
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
        let State::Direct { conn, mut record, failed: _ } = std::mem::replace(&mut self.state, State::Closed)
        else {
            return Err(ClientGone);
        };
        record.line = record.line.detached();
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
        let (sender, receiver) = mpsc::channel(HANDED_OFF_PARTS);
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

/// How long a write from the app's thread may wait for a full socket.
#[derive(Clone, Copy)]
enum Wait {
    /// Each wait up to this long; past it the write fails (the peer stopped reading).
    EachUpTo(Duration),
    /// All waits together until this instant; past it the write stops short (the caller hands off).
    AllWithin(Instant),
}

/// Writes `parts`, in order, from this thread, waiting while the socket is full as `wait` allows. Returns
/// how many bytes went out: all of them, or fewer when an [`Wait::AllWithin`] deadline passed.
fn write_from_thread(conn: &Conn, parts: &[&[u8]], wait: Wait) -> io::Result<usize> {
    let total = parts.iter().map(|p| p.len()).sum::<usize>();
    let mut written = 0;
    while written < total {
        match with_slices(parts, written, |slices| conn.try_write(slices)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(more) => written += more,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let ready = match wait {
                    Wait::EachUpTo(timeout) => wait_writable(conn, Instant::now() + timeout)?,
                    Wait::AllWithin(deadline) => wait_writable(conn, deadline)?,
                };
                if !ready {
                    return match wait {
                        Wait::EachUpTo(_) => {
                            Err(io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response"))
                        }
                        Wait::AllWithin(_) => Ok(written),
                    };
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(written)
}

/// Waits until the socket takes more or `deadline` passes (`false`).
fn wait_writable(conn: &Conn, deadline: Instant) -> io::Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    conn.wait_writable(left)
}

/// Calls `write` with `head` and `body` as one list of slices, built on the stack when few.
fn with_parts<T>(head: &[u8], body: &[Bytes], write: impl FnOnce(&[&[u8]]) -> T) -> T {
    if body.len() < STACK_IOVECS {
        let mut parts: [&[u8]; STACK_IOVECS] = [&[]; STACK_IOVECS];
        parts[0] = head;
        for (slot, part) in parts[1..].iter_mut().zip(body) {
            *slot = part;
        }
        return write(&parts[..=body.len()]);
    }
    let parts: Vec<&[u8]> = std::iter::once(head).chain(body.iter().map(|b| &b[..])).collect();
    write(&parts)
}

/// Calls `write` with `IoSlice`s over `parts` past their first `skip` bytes (at most [`MAX_IOVECS`] of
/// them), built on the stack when few.
fn with_slices<T>(parts: &[&[u8]], mut skip: usize, write: impl FnOnce(&[IoSlice<'_>]) -> T) -> T {
    let mut slices = parts.iter().filter_map(move |part| {
        let take = skip.min(part.len());
        skip -= take;
        let rest = &part[take..];
        (!rest.is_empty()).then(|| IoSlice::new(rest))
    });
    let mut on_stack = [IoSlice::new(&[]); STACK_IOVECS];
    let mut count = 0;
    for (slot, slice) in on_stack.iter_mut().zip(&mut slices) {
        *slot = slice;
        count += 1;
    }
    if count < STACK_IOVECS {
        return write(&on_stack[..count]);
    }
    let all: Vec<IoSlice<'_>> = on_stack.into_iter().chain(slices).take(MAX_IOVECS).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gathered(parts: &[&[u8]], skip: usize) -> Vec<u8> {
        with_slices(parts, skip, |slices| slices.iter().flat_map(|s| s.iter().copied()).collect())
    }

    #[test]
    fn slices_skip_what_was_written_across_parts() {
        let parts: [&[u8]; 3] = [b"head", b"", b"body"];
        assert_eq!(gathered(&parts, 0), b"headbody");
        assert_eq!(gathered(&parts, 3), b"dbody");
        assert_eq!(gathered(&parts, 4), b"body");
        assert_eq!(gathered(&parts, 6), b"dy");
        assert_eq!(gathered(&parts, 8), b"");
        // More parts than fit on the stack.
        let many: Vec<&[u8]> = (0..40).map(|_| &b"ab"[..]).collect();
        assert_eq!(gathered(&many, 1).len(), 79);
    }

    #[test]
    fn advance_drops_written_bytes_from_the_front() {
        let mut parts = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de"), Bytes::from_static(b"f")];
        advance(&mut parts, 4);
        assert_eq!(parts, [Bytes::from_static(b"e"), Bytes::from_static(b"f")]);
        advance(&mut parts, 2);
        assert!(parts.is_empty());
    }
}
