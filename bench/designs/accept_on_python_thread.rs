//! Design (b), "accept on the Python thread": each of the N Python threads, detached from the
//! interpreter, waits on its own epoll instance, in which the listening socket and a shared eventfd are
//! registered with `EPOLLIN | EPOLLEXCLUSIVE`, so that one new connection (or one queued job) wakes one
//! idle thread, across threads and worker processes. The thread `accept4`s, `recv`s into its own buffer
//! and, when the whole request is there, attaches, runs the app, detaches, writes head and body with one
//! non-blocking `writev` and closes: no other thread involved. After a request it tries `accept4` again
//! before `epoll_wait`, since under load the next connection is usually already waiting.
//!
//! Only what would wait leaves the thread, for one shared current-thread tokio runtime on the I/O thread
//! (this process's main thread): a request not fully arrived is read to its end there and queued back to
//! the Python threads (a `Mutex<VecDeque>` plus a semaphore eventfd; queued jobs run before new accepts);
//! a response the socket cannot take at once is written to its end there and closed. Both hand-offs are
//! counted and printed to stderr every 5 s when they changed, and on SIGINT/SIGTERM.
//!
//! A prototype to be benchmarked against design (a), `runtime_per_thread.rs`; both share `common.rs`.
//! Run it behind nginx (`uwsgi_pass unix:/tmp/b.sock;`) or feed it uwsgi packets directly:
//!
//! ```sh
//! cargo build --release --example design_accept_on_python_thread
//! target/release/examples/design_accept_on_python_thread --socket /tmp/b.sock \
//!     --wsgi-file tests/apps/hello.py --threads 1 --processes 1
//! ```

#[path = "common.rs"]
mod common;

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::timeout;

use common::{BoxError, Cli, Frame, Listener, Response, Wsgi, ACCEPT_BACKOFF, SOCKET_TIMEOUT};

/// Each Python thread's receive buffer, and how much a request read by tokio grows by: nginx's packets for
/// ordinary requests are 1-3 KiB. A bigger request fills it and is finished by tokio.
const RECV_BUFFER: usize = 16 * 1024;
/// How often the hand-off counters are printed, when they changed.
const REPORT_EVERY: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    common::main(worker)
}

fn worker(cli: &Cli, listener: &Listener) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let shared = Arc::new(Shared {
        listener: listener.fd.try_clone()?,
        queue: Mutex::new(VecDeque::new()),
        queued: AtomicUsize::new(0),
        wake: eventfd()?,
        io: runtime.handle().clone(),
        counts: Counts::default(),
    });
    Python::initialize();
    let app = Python::attach(|py| common::load_app(py, &cli.wsgi_file))?;
    for index in 0..cli.threads.get() {
        let thread = PythonThread {
            wsgi: Python::attach(|py| Wsgi::new(py, &app, cli))?,
            epoll: epoll_for(&shared)?,
            buf: Vec::with_capacity(RECV_BUFFER),
            shared: Arc::clone(&shared),
        };
        std::thread::Builder::new().name(format!("py-{index}")).spawn(move || thread.run())?;
    }
    // This thread is the I/O thread: it runs the hand-offs' tasks until a signal ends the process.
    runtime.block_on(report(&shared.counts))
}

/// What the Python threads and the I/O thread share.
struct Shared {
    listener: OwnedFd,
    /// Connections whose request tokio finished reading, waiting for a Python thread.
    queue: Mutex<VecDeque<Job>>,
    /// `queue.len()`, read without the lock: the fast path checks the queue with one atomic load.
    queued: AtomicUsize,
    /// A semaphore eventfd holding one unit per queued job; only the thread that took a unit pops a job.
    wake: OwnedFd,
    io: tokio::runtime::Handle,
    counts: Counts,
}

/// A connection whose whole request is in `request`.
struct Job {
    fd: OwnedFd,
    request: Vec<u8>,
}

impl Shared {
    /// Called by tokio tasks; the eventfd write wakes one idle Python thread.
    fn push(&self, job: Job) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).push_back(job);
        self.queued.fetch_add(1, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: `wake` is an open eventfd and `one` is the 8-byte buffer an eventfd write takes. A
        // semaphore eventfd only refuses a write at u64::MAX - 1 units, far beyond any queue.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// A queued job, if there is one this thread may take.
    fn take(&self) -> Option<Job> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut unit = [0u8; 8];
        // SAFETY: `wake` is an open non-blocking eventfd and `unit` the 8-byte buffer a read fills. It
        // fails with EAGAIN when another thread took the last unit.
        let read = unsafe { libc::read(self.wake.as_raw_fd(), unit.as_mut_ptr().cast(), unit.len()) };
        if read != 8 {
            return None;
        }
        // Every unit was written after its job was queued, so holding a unit means a job is there.
        let job = self.queue.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
        self.queued.fetch_sub(1, Ordering::Release);
        job
    }
}

/// How often the slow path ran, against all requests answered.
#[derive(Default)]
struct Counts {
    served: AtomicU64,
    partial_reads: AtomicU64,
    blocked_writes: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> [u64; 3] {
        [&self.served, &self.partial_reads, &self.blocked_writes].map(|count| count.load(Ordering::Relaxed))
    }
}

/// Prints the counters every [`REPORT_EVERY`] when they changed, and once more on SIGINT or SIGTERM.
async fn report(counts: &Counts) -> Result<(), BoxError> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(REPORT_EVERY);
    let mut printed = [0; 3];
    loop {
        let stop = tokio::select! {
            _ = interrupt.recv() => true,
            _ = terminate.recv() => true,
            _ = tick.tick() => false,
        };
        let now = counts.snapshot();
        if stop || now != printed {
            let [served, partial, blocked] = now;
            let handed = partial + blocked;
            let pid = std::process::id();
            eprintln!(
                "[{pid}] served {served}, handed off {handed} (partial request {partial}, blocked write {blocked})"
            );
            printed = now;
        }
        if stop {
            // Returning ends the process, and with it the Python threads.
            return Ok(());
        }
    }
}

/// One Python thread: its app handle, its epoll instance and its receive buffer.
struct PythonThread {
    wsgi: Wsgi,
    epoll: OwnedFd,
    buf: Vec<u8>,
    shared: Arc<Shared>,
}

impl PythonThread {
    fn run(mut self) {
        // Attached once, so the thread keeps its Python thread state: attaching for each request then only
        // takes the GIL back. Everything but the app runs detached, so no system call holds the GIL.
        Python::attach(|py| py.detach(|| self.serve_forever()));
    }

    fn serve_forever(&mut self) {
        loop {
            if let Some(job) = self.shared.take() {
                self.serve_job(job);
                continue;
            }
            match accept(self.shared.listener.as_fd()) {
                Ok(fd) => self.serve(fd),
                // Nothing waiting (or another thread or process took it): sleep until something is.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.wait(),
                Err(err) if matches!(err.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {}
                Err(err) => {
                    eprintln!("accept4: {err}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn wait(&self) {
        // The event is not looked at: after any wake-up the thread checks the queue, then tries to accept.
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `epoll` is an open epoll instance and `event` has room for the one event asked for. An
        // error (EINTR) is no different from a wake-up: the loop checks everything again.
        unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &raw mut event, 1, -1) };
    }

    fn serve(&mut self, fd: OwnedFd) {
        self.buf.clear();
        match recv(fd.as_fd(), &mut self.buf) {
            Ok(0) => return, // closed without a request: a port probe
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        let response = match common::frame(&self.buf) {
            Frame::Request { vars, body } => Python::attach(|py| self.wsgi.call(py, vars, body)),
            Frame::Incomplete => return self.finish_reading(fd),
            Frame::Bad => return,
        };
        self.respond(fd, &response);
    }

    fn serve_job(&self, job: Job) {
        // tokio queued it only once it framed as a whole request.
        if let Frame::Request { vars, body } = common::frame(&job.request) {
            let response = Python::attach(|py| self.wsgi.call(py, vars, body));
            self.respond(job.fd, &response);
        }
    }

    fn respond(&self, fd: OwnedFd, response: &Response) {
        self.shared.counts.served.fetch_add(1, Ordering::Relaxed);
        let total = response.head.len() + response.body.len();
        let written = match writev(fd.as_fd(), &[IoSlice::new(&response.head), IoSlice::new(&response.body)])
        {
            Ok(written) if written == total => return, // dropping `fd` closes the connection
            Ok(written) => written,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return, // nginx went away
        };
        self.finish_writing(fd, response, written);
    }

    /// Slow path: the request has not fully arrived. tokio reads the rest, then queues the connection back.
    /// This includes the race of a thread woken by nginx's `connect()` before nginx wrote the request.
    fn finish_reading(&self, fd: OwnedFd) {
        self.shared.counts.partial_reads.fetch_add(1, Ordering::Relaxed);
        let mut request = Vec::with_capacity(self.buf.len() + RECV_BUFFER);
        request.extend_from_slice(&self.buf);
        let shared = Arc::clone(&self.shared);
        self.shared.io.spawn(async move {
            if let Some(fd) = read_request(fd, &mut request).await {
                shared.push(Job { fd, request });
            }
        });
    }

    /// Slow path: the socket took `written` bytes of the response. tokio writes the rest, then closes.
    fn finish_writing(&self, fd: OwnedFd, response: &Response, written: usize) {
        self.shared.counts.blocked_writes.fetch_add(1, Ordering::Relaxed);
        let mut rest = [&response.head[..], &response.body[..]].concat();
        rest.drain(..written);
        // A failed or timed-out write means nginx went away: there is no one left to tell.
        self.shared.io.spawn(async move { timeout(SOCKET_TIMEOUT, write_all(fd, rest)).await });
    }
}

/// On the I/O thread: reads until `request` holds a whole request; `None` if the peer closed, erred, sent
/// garbage or stayed silent for [`SOCKET_TIMEOUT`].
async fn read_request(fd: OwnedFd, request: &mut Vec<u8>) -> Option<OwnedFd> {
    let fd = register(fd, Interest::READABLE).ok()?;
    loop {
        match common::frame(request) {
            Frame::Request { .. } => return Some(fd.into_inner()),
            Frame::Bad => return None,
            Frame::Incomplete => {}
        }
        if request.len() == request.capacity() {
            request.reserve(RECV_BUFFER);
        }
        let read = fd.async_io(Interest::READABLE, |fd| recv(fd.as_fd(), request));
        match timeout(SOCKET_TIMEOUT, read).await {
            Ok(Ok(1..)) => {}
            _ => return None,
        }
    }
}

/// On the I/O thread: writes `rest`; the connection is closed when `fd` is dropped.
async fn write_all(fd: OwnedFd, rest: Vec<u8>) -> io::Result<()> {
    let fd = register(fd, Interest::WRITABLE)?;
    let mut rest = &rest[..];
    while !rest.is_empty() {
        let written = fd.async_io(Interest::WRITABLE, |fd| writev(fd.as_fd(), &[IoSlice::new(rest)])).await?;
        rest = &rest[written..];
    }
    Ok(())
}

/// Registers a connection with the I/O thread's runtime (must run on it).
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and always returns the same descriptor, until it is dropped with the
    // AsyncFd or taken back with `into_inner`.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|err| err.into_parts().1)
}

/// A Python thread's epoll instance, with the listener and the queue's eventfd in it.
fn epoll_for(shared: &Shared) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked before it is owned.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `epoll` is a new descriptor that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
    for fd in [&shared.listener, &shared.wake] {
        // Level-triggered: a thread that wakes and finds the connection taken simply waits again.
        // EPOLLEXCLUSIVE: one event wakes one waiting thread, not all of them (in every process).
        let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, u64: 0 };
        // SAFETY: both descriptors are open, and `event` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &raw mut event) }
            < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(epoll)
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked before it is owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pending connection, non-blocking (so `recv` and `writev` never wait), or `WouldBlock`.
fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `listener` is an open socket; null address pointers ask for no peer address.
    let fd =
        unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Appends what the socket holds, up to `buf`'s spare capacity.
fn recv(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: the pointer and length describe `buf`'s spare capacity, which recv may fill.
    let received = unsafe { libc::recv(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), 0) };
    let received = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: recv initialised `received` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + received) };
    Ok(received)
}

fn writev(fd: BorrowedFd<'_>, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // At most two slices are ever passed, far below IOV_MAX.
    let count = libc::c_int::try_from(slices.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix, and the slices outlive the call.
    let written = unsafe { libc::writev(fd.as_raw_fd(), slices.as_ptr().cast(), count) };
    usize::try_from(written).map_err(|_| io::Error::last_os_error())
}
