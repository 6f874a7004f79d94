//! An accepted connection, non-blocking, and the system calls the thread serving it makes on it directly:
//! read what arrived, write what the socket takes now (vectored, or from a file with `sendfile(2)`), wait
//! for request-body bytes, close or abort.
//!
//! Nothing here waits, except [`Conn::read_body`]: a write the socket cannot take now says so
//! (`WouldBlock`), and the caller hands the connection to the I/O runtime ([`Conn::into_tokio`]), so a
//! slow peer never holds a Python thread. No pyo3 here.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use socket2::Socket;
use tokio::net::{TcpStream, UnixStream};

/// The family of a connection: TCP can be reset on abort, a Unix socket cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Unix,
}

/// Request-body bytes a peer must deliver per `--socket-timeout` of waiting on the serving thread. A
/// timeout per arrival alone lets a body that trickles (a byte now and then, each inside the timeout) hold
/// the thread for as long as the peer likes; this bounds it to one timeout per 64 KiB, a floor of 16 KiB/s
/// at the default 4 s, far below any real upload (and nginx, buffering bodies by default, sends at once).
const BODY_BYTES_PER_TIMEOUT: u64 = 64 * 1024;

/// Why a body read failed when the peer kept sending, but less than [`BODY_BYTES_PER_TIMEOUT`] per timeout:
/// the inner error of that `TimedOut`, so the message reaches the app and the log as it is.
#[derive(Debug, thiserror::Error)]
#[error("{}", BodyTooSlow::MESSAGE)]
pub struct BodyTooSlow;

impl BodyTooSlow {
    pub const MESSAGE: &'static str =
        "the request body came too slowly (less than 64 KiB per --socket-timeout of waiting)";
}

/// One accepted connection from nginx (or from the `--http-socket` gateway). Closed when dropped.
#[derive(Debug)]
pub struct Conn {
    socket: Socket,
    kind: Kind,
    body_wait: BodyWait,
    /// For the gateway's end of a socket pair: set by [`Conn::abort`], since a Unix socket cannot carry a
    /// reset, and the gateway must not end a chunked response as if it were complete.
    aborted: Option<Arc<AtomicBool>>,
}

/// How long the serving thread has waited for request-body bytes since the peer last delivered
/// [`BODY_BYTES_PER_TIMEOUT`] of them. Atomics only so a `Conn` can be shared with the I/O runtime: one
/// thread reads a body at a time.
#[derive(Debug, Default)]
struct BodyWait {
    waited_nanos: AtomicU64,
    received: AtomicU64,
}

impl BodyWait {
    fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_nanos.load(Ordering::Relaxed))
    }

    fn add_wait(&self, waited: Duration) {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.waited_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// `bytes` arrived: enough of them since the last reset gives the peer a full timeout again.
    fn arrived(&self, bytes: usize) {
        let received = self.received.load(Ordering::Relaxed) + bytes as u64;
        if received >= BODY_BYTES_PER_TIMEOUT {
            self.received.store(0, Ordering::Relaxed);
            self.waited_nanos.store(0, Ordering::Relaxed);
        } else {
            self.received.store(received, Ordering::Relaxed);
        }
    }
}

/// The same connection, registered with the I/O runtime.
pub enum TokioStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// `socket` must be a connected, non-blocking stream socket of the family `kind` names.
    pub(super) fn new(socket: Socket, kind: Kind) -> Self {
        Self { socket, kind, body_wait: BodyWait::default(), aborted: None }
    }

    /// The serving side of a socket pair whose other end the `--http-socket` gateway holds: `aborted` is
    /// set if the response is aborted.
    pub(super) fn bridged(socket: Socket, aborted: Arc<AtomicBool>) -> Self {
        Self { aborted: Some(aborted), ..Self::new(socket, Kind::Unix) }
    }

    /// The same connection with `aborted` as its abort flag (one taken back from the I/O runtime, whose
    /// stream types cannot carry it).
    #[must_use]
    pub(super) fn with_abort_flag(self, aborted: Option<Arc<AtomicBool>>) -> Self {
        Self { aborted, ..self }
    }

    /// The flag [`Conn::abort`] sets, for whoever writes the response from the I/O runtime.
    pub(super) fn abort_flag(&self) -> Option<Arc<AtomicBool>> {
        self.aborted.clone()
    }

    /// Reads what has arrived into the spare capacity of `buf`, without waiting: `WouldBlock` if nothing
    /// has, `Ok(0)` at end of stream.
    pub fn try_read(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let spare = buf.spare_capacity_mut();
        let read = self.socket.recv(spare)?;
        // SAFETY: recv initialised the first `read` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + read) };
        Ok(read)
    }

    /// Writes as much of `parts` as the socket takes now; `WouldBlock` if it takes nothing. `MSG_NOSIGNAL`:
    /// a peer that went away is an `EPIPE` error, never a signal.
    pub fn try_write(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        retry_interrupted(|| self.socket.send_vectored_with_flags(parts, libc::MSG_NOSIGNAL))
    }

    /// Sends up to `count` bytes of `file` from `offset` (advanced by what was sent) straight from the page
    /// cache to the socket: no copy through user space. `WouldBlock` if the socket takes nothing now.
    pub fn try_sendfile(&self, file: BorrowedFd<'_>, offset: &mut u64, count: usize) -> io::Result<usize> {
        sendfile(self.socket.as_fd(), file, offset, count)
    }

    /// Reads request-body bytes into `buf`, waiting up to `timeout` for each arrival, and up to `timeout`
    /// in all for each [`BODY_BYTES_PER_TIMEOUT`] of body. `Ok(0)` means the peer closed the connection.
    ///
    /// This is the one place a serving thread waits on its peer: the app asked for more body than came
    /// with the packet, so it cannot go on before the bytes arrive, wherever it waits. Through nginx the
    /// body comes from nginx's own buffer (`uwsgi_request_buffering on`, the default), never from a slow
    /// client; bodies small enough to hold in memory are read by the I/O runtime before the app starts.
    /// `buf` may be uninitialised: the first `Ok(n)` bytes are initialised by the read.
    pub fn read_body(&self, buf: &mut [MaybeUninit<u8>], timeout: Duration) -> io::Result<usize> {
        loop {
            match self.socket.recv(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Ok(read) => {
                    self.body_wait.arrived(read);
                    return Ok(read);
                }
                Err(err) => return Err(err),
            }
            let left = timeout.saturating_sub(self.body_wait.waited());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, BodyTooSlow));
            }
            let started = Instant::now();
            let ready = wait_for(self.socket.as_fd(), libc::POLLIN, left);
            self.body_wait.add_wait(started.elapsed());
            if !ready? {
                // Earlier waits in this 64 KiB used most of the timeout: the peer trickles rather than
                // stalls (a stall after bytes flowing finds nearly all of it left).
                if left <= timeout / 2 {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, BodyTooSlow));
                }
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out waiting for the request body",
                ));
            }
        }
    }

    /// Waits up to `timeout` for the socket to take more bytes; `false` on timeout.
    pub fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        wait_for(self.socket.as_fd(), libc::POLLOUT, timeout)
    }

    /// Makes the close that ends this connection (when every descriptor of it is dropped) an error for
    /// nginx rather than the end of a complete response.
    pub fn abort(&self) {
        if let Some(aborted) = &self.aborted {
            aborted.store(true, Ordering::Release);
        }
        if self.kind == Kind::Tcp {
            // A zero linger makes close() send RST: nginx then reports the upstream error and never passes a
            // truncated body off as complete. A Unix socket has no reset; with a Content-Length, nginx
            // detects the short body, without one it cannot.
            let _ = self.socket.set_linger(Some(Duration::ZERO));
        }
    }

    /// A second descriptor for the same connection, for the I/O runtime while a request body reader on
    /// the serving thread still holds this one.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            socket: self.socket.try_clone()?,
            kind: self.kind,
            body_wait: BodyWait::default(),
            aborted: self.aborted.clone(),
        })
    }

    /// Registers the connection with the current tokio runtime. Must be called inside it.
    pub fn into_tokio(self) -> io::Result<TokioStream> {
        Ok(match self.kind {
            Kind::Tcp => TokioStream::Tcp(TcpStream::from_std(self.socket.into())?),
            Kind::Unix => TokioStream::Unix(UnixStream::from_std(self.socket.into())?),
        })
    }

    /// Takes a connection back from the runtime, for a serving thread.
    pub fn from_tokio(stream: TokioStream) -> io::Result<Self> {
        Ok(match stream {
            TokioStream::Tcp(stream) => Self::new(stream.into_std()?.into(), Kind::Tcp),
            TokioStream::Unix(stream) => Self::new(stream.into_std()?.into(), Kind::Unix),
        })
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// A socket pair for a gateway in the I/O runtime (`--http-socket`, `--ssl-socket`): the serving side as a
/// [`Conn`] whose abort sets `aborted`, and the gateway's side registered with the runtime (so this must
/// be called inside it).
pub(super) fn bridge(aborted: Arc<AtomicBool>) -> io::Result<(Conn, tokio::net::UnixStream)> {
    let (served, gateway) = std::os::unix::net::UnixStream::pair()?;
    served.set_nonblocking(true)?;
    gateway.set_nonblocking(true)?;
    let served = Conn::bridged(Socket::from(std::os::fd::OwnedFd::from(served)), aborted);
    Ok((served, UnixStream::from_std(gateway)?))
}

/// `sendfile(2)` from `file` at `offset` to `socket`, advancing `offset`.
pub fn sendfile(
    socket: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: &mut u64,
    count: usize,
) -> io::Result<usize> {
    let mut position = libc::off_t::try_from(*offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // Linux sends at most this much per call anyway; asking for more only overflows the return type.
    let count = count.min(MAX_SENDFILE_CHUNK);
    loop {
        // SAFETY: both descriptors are open for the duration of the borrow; `position` is a valid off_t the
        // kernel reads and advances.
        let sent = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &raw mut position, count) };
        if sent >= 0 {
            *offset = u64::try_from(position).unwrap_or(*offset);
            return Ok(sent.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `sendfile(2)` moves at most `0x7ffff000` bytes per call on Linux.
const MAX_SENDFILE_CHUNK: usize = 0x7fff_f000;

/// Waits up to `timeout` for `events` on `fd` (or an error or hang-up, which the next call reports);
/// `false` on timeout.
fn wait_for(fd: BorrowedFd<'_>, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so a wait never ends a hair early and spins.
        let millis = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&raw mut pollfd, 1, millis) };
        match ready {
            0 => return Ok(false),
            1.. => return Ok(true),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}
