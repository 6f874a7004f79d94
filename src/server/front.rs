//! The serving threads' front door: the listening sockets, and what a thread waits on between requests.
//!
//! The thread that runs a request also accepts it, reads it and answers it: the common request crosses no
//! thread (accept, read, app, write, close). Each serving thread sleeps in an epoll set of its own, with
//! the listening sockets registered `EPOLLEXCLUSIVE`, so a connection wakes one idle thread (in this
//! process or another worker's) and a busy thread takes none: the listen queue balances load between
//! workers. What would wait — a request not fully arrived, a response the socket does not take at once, an
//! unread body — goes to the I/O runtime ([`super::waiting`]); a request it finishes reading comes back
//! through the [`JobQueue`], whose eventfd is in the same epoll sets. No pyo3 here.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use oxwsgi_proto::{HEADER_LEN, MODIFIER_WSGI};
use socket2::Socket;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::accept_errors::AcceptErrors;
use super::conn::{Conn, Kind};
use super::listener::{BoundSocket, Protocol};
use super::log_budget::{left_out, LogBudget};
use super::request::{frame, Body, Framing, ListenerInfo, RequestHead, BUFFERED_BODY_MAX};
use super::responder::{Record, Responder};
use crate::config::{ServerConfig, SocketSpec, TlsFiles};
use crate::metrics::model::ProtocolErrorKind;
use crate::metrics::InFlight;
use crate::metrics::Recorder;

/// A serving thread's read buffer: the largest vars block nginx sends plus a body up to
/// [`BUFFERED_BODY_MAX`], so whatever arrived with a connection is taken in one read. It is reused from one
/// request to the next (the request's bytes are split off it and the space reclaimed once they are
/// dropped), so it costs one allocation per thread, not per request.
const READ_BUFFER_SIZE: usize = 2 * 64 * 1024;
/// After this many connections taken straight from the same listener without sleeping, a serving thread
/// goes through epoll once, so a busy socket cannot starve another one the thread also listens on.
const HOT_LISTENER_STREAK: u32 = 64;
/// Events one `epoll_wait` returns: listeners plus the queue and shutdown eventfds.
const EPOLL_EVENTS: usize = 16;
/// Refused connections logged per second, at most: enough to see every kind in a burst of them; the
/// rest are counted (`oxwsgi_protocol_errors_total`) and their number goes into the next line.
const REFUSALS_LOGGED_PER_SECOND: u64 = 10;
/// First pause after `accept()` fails with anything but "nothing to accept".
pub(super) const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause after `accept()` fails (EMFILE and friends), so a full fd table does not spin the CPU
/// (each serving thread backs off on its own; the log says it once a second for all of them).
pub(super) const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How long a serving thread keeps a connection whose request has not arrived yet before the I/O runtime
/// takes it: nginx writes its request right after connecting, so one that is silent this long is an idle
/// or slow peer (it then has the rest of `--socket-timeout`).
const PARK_TIMEOUT: Duration = Duration::from_millis(10);
/// Connections one serving thread keeps that way at most; more go to the I/O runtime at once.
const PARKED_MAX: usize = 32;
/// A thread moves to the back of the wake-up order after waking for this many connections: often enough
/// that a quiet server's requests go round its threads and workers, seldom enough that the two system calls
/// it takes cost next to nothing per request.
const ROTATE_AFTER_WAKES: u32 = 8;
/// An extra `accept4` that found nothing is tried again once in this many chances, so a server that
/// becomes busy starts taking connections without `epoll_wait` again (and measuring queue time, for
/// accepting ahead) whatever the timing says; on a quiet server it costs an eighth of a failed call a request.
const RETRY_EXTRA_ACCEPT_EVERY: u32 = 8;
/// An `epoll_wait` that returned this soon found work waiting: the server is busy.
const BUSY_WAKE: Duration = Duration::from_micros(20);
/// After a request that kept its thread this long, the extra `accept4`s are tried whatever they found last
/// time: one that fails costs a microsecond, nothing next to such a request, and a server of slow requests
/// that saturates must show its queue time from the first request that waits.
const LONG_REQUEST: Duration = Duration::from_millis(1);

/// epoll tokens past the listeners' indices: parked connections are `PARKED_TOKEN + fd` (a descriptor is
/// below 2^31), and the eventfds take the top values.
const PARKED_TOKEN: u64 = 1 << 62;
const QUEUE_TOKEN: u64 = u64::MAX;
const STOP_TOKEN: u64 = u64::MAX - 1;
const CLOSED_TOKEN: u64 = u64::MAX - 2;

/// A request ready to run: its parsed head, its body, and where to answer.
pub struct Request {
    pub head: RequestHead,
    pub body: Body,
    pub responder: Responder,
}

/// What [`Acceptor::accept`] found.
enum Accept {
    Connection(Arrival),
    /// Nothing queued on the listener.
    Empty,
    /// An error other than "nothing queued" (logged, and paused after where it matters): try again.
    Failed,
}

/// What waits in the [`JobQueue`].
#[allow(clippy::large_enum_variant)] // moved once per queued request, like `Job`
enum Queued {
    Job(Job),
    /// A connection accepted while its thread was busy, not yet read: the first free thread starts it.
    Accepted(Arrival),
}

/// What a serving thread gets from [`Acceptor::next_job`].
#[allow(clippy::large_enum_variant)] // moved once per request; boxing would allocate once per request
pub enum Job {
    Request(Request),
    /// Objects the I/O runtime released need a thread that holds the interpreter to free them (see
    /// [`Front::collect_soon`]); nothing else to do.
    Collect,
}

/// A connection just accepted, with what is known of it.
pub(super) struct Arrival<C = Conn> {
    pub conn: C,
    /// Index of the listener it came in on.
    pub listener: usize,
    pub accepted_at: Instant,
    pub in_flight: InFlight,
}

pub(super) struct Listening {
    pub socket: Socket,
    pub kind: Kind,
    pub protocol: Protocol,
    /// The TLS settings of a [`Protocol::Tls`] listener, read when this process started.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub spec: SocketSpec,
    pub info: Arc<ListenerInfo>,
}

/// Everything the serving threads and the I/O runtime share.
pub struct Front {
    listeners: Vec<Listening>,
    pub(super) config: ServerConfig,
    pub(super) metrics: Recorder,
    runtime: Handle,
    tasks: TaskTracker,
    queue: JobQueue,
    stop: EventFd,
    stopping: AtomicBool,
    accepted: AtomicU64,
    retire: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Serving threads in their loop, and those still accepting.
    serving: AtomicUsize,
    accepting: AtomicUsize,
    /// Connections in the I/O runtime that may yet come back as requests.
    arrivals: AtomicUsize,
    /// Connections in the queue that no serving thread has started yet.
    queued_connections: AtomicUsize,
    /// Any of the three counts above went down.
    changed: Notify,
    pub(super) accept_errors: AcceptErrors,
    refusals: LogBudget,
    http_stop: CancellationToken,
}

impl Front {
    /// Takes the listening sockets. `runtime` is the I/O runtime (its thread must run it), `retire` is
    /// called once `max_requests` connections were accepted.
    pub fn new(
        sockets: Vec<BoundSocket>,
        config: ServerConfig,
        tls: &[TlsFiles],
        metrics: Recorder,
        runtime: Handle,
        retire: Box<dyn FnOnce() + Send>,
    ) -> io::Result<Arc<Self>> {
        let mut tls_files = tls.iter();
        let listeners = sockets
            .into_iter()
            .map(|bound| {
                let (socket, spec, protocol) = bound.into_parts();
                let tls = match protocol {
                    Protocol::Tls => {
                        let files = tls_files.next().ok_or_else(|| {
                            io::Error::other(format!(
                                "{spec} speaks TLS, but no --ssl-socket names its files"
                            ))
                        })?;
                        Some(super::tls::load(files).map_err(io::Error::other)?)
                    }
                    Protocol::Uwsgi | Protocol::Http => None,
                };
                let (kind, info) = match &spec {
                    SocketSpec::Tcp(addr) => {
                        let local = socket.local_addr()?.as_socket().unwrap_or(*addr);
                        let info = ListenerInfo {
                            server_name: local.ip().to_string(),
                            server_port: local.port().to_string(),
                        };
                        (Kind::Tcp, info)
                    }
                    SocketSpec::Unix(_) => (
                        Kind::Unix,
                        ListenerInfo { server_name: "localhost".into(), server_port: String::new() },
                    ),
                };
                Ok(Listening { socket, kind, protocol, tls, spec, info: Arc::new(info) })
            })
            .collect::<io::Result<Vec<_>>>()?;
        if tls_files.next().is_some() {
            return Err(io::Error::other("more --ssl-socket settings than TLS sockets: one names no socket"));
        }
        Ok(Arc::new(Self {
            listeners,
            config,
            metrics,
            runtime,
            tasks: TaskTracker::new(),
            queue: JobQueue::new()?,
            stop: EventFd::new()?,
            stopping: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            retire: Mutex::new(Some(retire)),
            serving: AtomicUsize::new(0),
            accepting: AtomicUsize::new(0),
            arrivals: AtomicUsize::new(0),
            queued_connections: AtomicUsize::new(0),
            changed: Notify::new(),
            accept_errors: AcceptErrors::new(),
            refusals: LogBudget::new(REFUSALS_LOGGED_PER_SECOND),
            http_stop: CancellationToken::new(),
        }))
    }

    /// `unix:/path, 127.0.0.1:3031`, for the log.
    pub fn names(&self) -> String {
        let name = |l: &Listening| match l.protocol {
            Protocol::Uwsgi => l.spec.to_string(),
            Protocol::Http => match &l.spec {
                SocketSpec::Tcp(addr) => format!("http://{addr}/"),
                SocketSpec::Unix(_) => format!("{} (HTTP)", l.spec),
            },
            Protocol::Tls => format!("{} (uwsgi over TLS)", l.spec),
        };
        self.listeners.iter().map(name).collect::<Vec<_>>().join(", ")
    }

    /// The Unix socket files, to remove at exit.
    pub fn socket_files(&self) -> Vec<PathBuf> {
        self.listeners
            .iter()
            .filter_map(|l| match &l.spec {
                SocketSpec::Unix(path) => Some(path.clone()),
                SocketSpec::Tcp(_) => None,
            })
            .collect()
    }

    /// The listeners the serving threads accept on, with their indices; the I/O runtime accepts on the
    /// HTTP ones ([`Front::serve_http`]).
    fn uwsgi_listeners(&self) -> impl Iterator<Item = (usize, &Listening)> {
        self.listeners.iter().enumerate().filter(|(_, listener)| listener.protocol == Protocol::Uwsgi)
    }

    /// Starts accepting on the `--http-socket` and `--ssl-socket` listeners, in the I/O runtime, until the
    /// graceful stop.
    pub fn serve_in_runtime(self: &Arc<Self>) {
        for (index, listener) in self.listeners.iter().enumerate() {
            match (&listener.protocol, &listener.tls) {
                (Protocol::Http, _) => self.spawn(super::http::accept(Arc::clone(self), index)),
                (Protocol::Tls, Some(tls)) => {
                    self.spawn(super::tls::accept(Arc::clone(self), index, Arc::clone(tls)));
                }
                _ => {}
            }
        }
    }

    pub(super) fn listener(&self, index: usize) -> &Listening {
        &self.listeners[index]
    }

    /// Resolves when the graceful stop begins: the HTTP side stops accepting and closes idle connections.
    pub(super) async fn stop_requested(&self) {
        self.http_stop.cancelled().await;
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// A connection whose request the I/O runtime reads, which the graceful stop must wait for (see
    /// [`Front::arrival_done`]). Also counted for `--max-requests`.
    pub(super) fn arrival_started(&self) {
        self.arrivals.fetch_add(1, Ordering::AcqRel);
    }

    /// A request the I/O runtime accepted on its own (`--http-socket`): counted for `--max-requests`.
    pub(super) fn request_started(&self) {
        self.count_accept();
    }

    /// A connection accepted and not yet read, for the first free serving thread. Counted until a thread
    /// has started it (and maybe handed it to the I/O runtime, which counts it again): the graceful stop
    /// must not close the queue under it.
    pub(super) fn queue_connection(&self, arrival: Arrival) {
        self.queued_connections.fetch_add(1, Ordering::AcqRel);
        self.queue.push(Queued::Accepted(arrival));
    }

    /// A serving thread has started a queued connection ([`Front::queue_connection`]).
    fn queued_connection_started(&self) {
        self.queued_connections.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// A serving thread's handle: its epoll set over every listener and the queue.
    pub fn acceptor(self: &Arc<Self>) -> io::Result<Acceptor> {
        let epoll = Epoll::new()?;
        for (index, listener) in self.uwsgi_listeners() {
            epoll.add(listener.socket.as_raw_fd(), index as u64, Watch::Exclusive)?;
        }
        epoll.add(self.queue.ready.fd(), QUEUE_TOKEN, Watch::Exclusive)?;
        epoll.add(self.stop.fd(), STOP_TOKEN, Watch::Shared)?;
        epoll.add(self.queue.closed.fd(), CLOSED_TOKEN, Watch::Shared)?;
        self.serving.fetch_add(1, Ordering::AcqRel);
        self.accepting.fetch_add(1, Ordering::AcqRel);
        Ok(Acceptor {
            front: Arc::clone(self),
            epoll,
            buf: BytesMut::new(),
            accepting: true,
            hot: None,
            streak: 0,
            came_free: false,
            woken_for: 0,
            load: LoadHints {
                accept_before_sleep: true,
                accept_ahead: true,
                after_long_request: false,
                skipped_before_sleep: 0,
            },
            handed_out_at: None,
            parked: Vec::new(),
            unparked: Vec::new(),
            backoff: MIN_ACCEPT_BACKOFF,
        })
    }

    /// Counts a connection refused for `kind` of protocol error and logs why, within the refusals' budget:
    /// a peer opening thousands of bad or idle connections must not write thousands of lines a second.
    pub(super) fn refused(&self, kind: ProtocolErrorKind, why: &dyn fmt::Display) {
        self.metrics.protocol_error(kind);
        if let Some(unlogged) = self.refusals.admit() {
            warn!("refused a connection: {why}{}", left_out(unlogged, "refusals"));
        }
    }

    /// Runs `task` on the I/O runtime; shutdown waits for it.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn_on(task, &self.runtime);
    }

    /// Asks a serving thread to take the interpreter once, soon: Python objects released by the I/O runtime
    /// (large response chunks written from there) are freed then, not at the next request.
    pub fn collect_soon(&self) {
        self.queue.push_collect();
    }

    /// Builds the request framed at the start of `buf` for `arrival`, with the body `body` makes of the
    /// bytes received past the packet, the count still unread, and the connection.
    pub(super) fn request(
        self: &Arc<Self>,
        arrival: Arrival,
        buf: &mut BytesMut,
        framing: Framing,
        body: impl FnOnce(Bytes, u64, &Arc<Conn>) -> Body,
    ) -> Request {
        let listener = Arc::clone(&self.listeners[arrival.listener].info);
        let content_length = framing.content_length;
        let head = RequestHead::take(buf, framing, listener, arrival.accepted_at);
        let in_buffer = usize::try_from(content_length).unwrap_or(usize::MAX).min(buf.len());
        let received = buf.split_to(in_buffer).freeze();
        let unread = content_length - received.len() as u64;
        let conn = Arc::new(arrival.conn);
        let body = body(received, unread, &conn);
        let record = Record {
            method: head.method,
            line: head.line.clone(),
            accepted_at: arrival.accepted_at,
            head_only: head.head_only(),
            request_body_bytes: content_length,
            status: 0,
            head_bytes: 0,
            body_bytes: 0,
            in_flight: arrival.in_flight,
        };
        Request { head, body, responder: Responder::new(Arc::clone(self), conn, record) }
    }

    /// A request the I/O runtime finished reading, for the serving threads.
    pub(super) fn queue_request(&self, request: Request) {
        self.queue.push(Queued::Job(Job::Request(request)));
    }

    /// A connection handed to the I/O runtime by [`Front::hand_over`] is done there.
    pub(super) fn arrival_done(&self) {
        self.arrivals.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// The I/O runtime waits for the rest of this connection's request; `read` is what came so far (copied:
    /// a waiting connection must not keep the serving thread's buffer).
    fn hand_over(self: &Arc<Self>, arrival: Arrival, read: &[u8]) {
        super::waiting::arriving(read.len());
        self.arrivals.fetch_add(1, Ordering::AcqRel);
        self.spawn(super::waiting::read_then_queue(arrival, BytesMut::from(read), Arc::clone(self)));
    }

    /// One more connection accepted: past `max_requests`, ask (once) to be replaced.
    fn count_accept(&self) {
        let accepted = self.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        if self.config.max_requests.is_some_and(|max| accepted >= max) {
            let retire = self.retire.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(retire) = retire {
                info!("{accepted} requests accepted: asking to be replaced (--max-requests)");
                retire();
            }
        }
    }

    /// Graceful stop, first step: the serving threads take what is queued on the listening sockets, without
    /// waiting for more, then stop accepting.
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.signal();
        self.http_stop.cancel();
    }

    /// Resolves once every request accepted before [`Front::stop_accepting`] is answered: the threads have
    /// stopped accepting, the runtime holds no request still arriving, the queue is empty and closed, the
    /// serving threads left their loops, and every response the runtime writes is written.
    pub async fn drained(&self) {
        self.wait_until(|| {
            self.accepting.load(Ordering::Acquire) == 0
                && self.arrivals.load(Ordering::Acquire) == 0
                && self.queued_connections.load(Ordering::Acquire) == 0
        })
        .await;
        self.queue.close();
        self.wait_until(|| self.serving.load(Ordering::Acquire) == 0).await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Connections not answered yet, for the log when the graceful timeout runs out.
    pub fn in_progress(&self) -> usize {
        self.tasks.len() + self.serving.load(Ordering::Acquire)
    }

    async fn wait_until(&self, done: impl Fn() -> bool) {
        loop {
            // A count changing between the check and the wait leaves a permit, so nothing is missed.
            let changed = self.changed.notified();
            if done() {
                return;
            }
            changed.await;
        }
    }
}

/// A connection accepted before its request arrived, waiting in the epoll set of the thread that took it.
struct Parked {
    arrival: Arrival,
    deadline: Instant,
}

/// What the last tries said about the load: each extra `accept4` is tried only while it finds connections,
/// since on a quiet server it would only fail, a wasted system call per request.
struct LoadHints {
    /// Trying `accept4` before sleeping found a connection last time, or epoll just returned at once.
    accept_before_sleep: bool,
    /// Taking the next connection ahead found one last time.
    accept_ahead: bool,
    /// The request just served took at least [`LONG_REQUEST`].
    after_long_request: bool,
    /// Chances to accept before sleeping skipped since the last try.
    skipped_before_sleep: u32,
}

impl LoadHints {
    /// Whether a thread that came free tries `accept4` before sleeping.
    fn try_accept_before_sleep(&mut self) -> bool {
        if self.accept_before_sleep || self.after_long_request {
            return true;
        }
        self.skipped_before_sleep += 1;
        self.skipped_before_sleep % RETRY_EXTRA_ACCEPT_EVERY == 0
    }

    /// Whether a thread that came free and found a connection waiting takes the next one too; `streak` counts
    /// the connections it took without sleeping.
    fn try_accept_ahead(&self, streak: u32) -> bool {
        self.accept_ahead || self.after_long_request || streak % RETRY_EXTRA_ACCEPT_EVERY == 0
    }
}

/// One serving thread's way in: call [`Acceptor::next_job`] for each request.
pub struct Acceptor {
    front: Arc<Front>,
    epoll: Epoll,
    buf: BytesMut,
    accepting: bool,
    /// The listener that gave the last connection: tried again before sleeping, since under load the next
    /// connection is usually already queued there (one `accept4` instead of `epoll_wait` + `accept4`).
    hot: Option<usize>,
    streak: u32,
    /// The thread finished a request and has not slept since, or only for an instant ([`BUSY_WAKE`]): a
    /// connection it finds queued waited for a thread (one that woke from a real sleep found it as it came).
    came_free: bool,
    /// Connections this thread woke for, to move to the back of the wake-up order now and then.
    woken_for: u32,
    load: LoadHints,
    /// When the last job was handed out, to tell how long it kept the thread.
    handed_out_at: Option<Instant>,
    /// Connections whose request has not arrived yet, in this thread's epoll set ([`Acceptor::park`]).
    parked: Vec<Parked>,
    /// Parked connections whose request arrived, to start next.
    unparked: Vec<Arrival>,
    backoff: Duration,
}

impl Acceptor {
    /// The next request to run, or [`Job::Collect`]; waits for one (call it with the interpreter released).
    /// `None` once the server stopped and every request was handed out.
    pub fn next_job(&mut self) -> Option<Job> {
        self.load.after_long_request = self.handed_out_at.is_some_and(|at| at.elapsed() >= LONG_REQUEST);
        let job = self.find_job();
        self.handed_out_at = Some(Instant::now());
        job
    }

    fn find_job(&mut self) -> Option<Job> {
        self.came_free = true;
        loop {
            match self.front.queue.try_pop() {
                Some(Queued::Job(job)) => {
                    self.release_held();
                    return Some(job);
                }
                Some(Queued::Accepted(arrival)) => {
                    let started = self.start(arrival);
                    self.front.queued_connection_started();
                    if let Some(request) = started {
                        return Some(Job::Request(request));
                    }
                    continue;
                }
                None => {}
            }
            // Connections whose request arrived while parked here.
            if let Some(arrival) = self.unparked.pop() {
                if let Some(request) = self.start(arrival) {
                    return Some(Job::Request(request));
                }
                continue;
            }
            if !self.accepting {
                if self.front.queue.is_closed() {
                    return None;
                }
            } else if self.front.stopping.load(Ordering::Acquire) {
                if let Some(request) = self.take_queued() {
                    return Some(Job::Request(request));
                }
                continue;
            } else if let Some(index) = self.hot.filter(|_| {
                self.streak < HOT_LISTENER_STREAK && (!self.came_free || self.load.try_accept_before_sleep())
            }) {
                let accepted = self.accept(index);
                if self.came_free {
                    // Tried before sleeping: keep doing so only while it finds connections waiting.
                    self.load.accept_before_sleep = matches!(accepted, Accept::Connection(_));
                }
                if let Accept::Connection(arrival) = accepted {
                    self.streak += 1;
                    if !self.came_free {
                        self.woken_for += 1;
                        if self.woken_for % ROTATE_AFTER_WAKES == 0 {
                            self.to_back_of_queue(index);
                        }
                    } else if self.front.queue.sleepers() == 0 && self.load.try_accept_ahead(self.streak) {
                        // A connection was waiting when this thread came free, and no thread is idle. The
                        // next one is taken too, if it is there, into the queue any thread takes from
                        // (this one, once free, or another that is sooner): how long it waits for a
                        // thread is then measured (`request_queue_seconds`), which the listen queue
                        // cannot say. Tried only while it finds one (now and then, and after a long
                        // request), or it would cost a failed accept4 per request.
                        let next = self.accept(index);
                        self.load.accept_ahead = matches!(next, Accept::Connection(_));
                        if let Accept::Connection(next) = next {
                            self.front.queue_connection(next);
                        }
                    }
                    if let Some(request) = self.start(arrival) {
                        return Some(Job::Request(request));
                    }
                    continue;
                }
            }
            // A wake for the queue, a parked connection or a shutdown step keeps the listener to try first.
            let slept_from = Instant::now();
            let woken_by = self.wait();
            // Back at once: what woke it was already waiting when this thread came free, as a connection
            // found by trying accept before sleeping would have been; so trying that pays again.
            let at_once = slept_from.elapsed() < BUSY_WAKE;
            if let Some(index) = woken_by {
                self.hot = Some(index);
                self.load.accept_before_sleep |= at_once;
            }
            self.came_free &= at_once;
            self.streak = 0;
        }
    }

    /// Sleeps until a listener (returned), a parked connection, the queue or a shutdown step needs this
    /// thread, or a parked connection's time is up.
    fn wait(&mut self) -> Option<usize> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS];
        let deadline = self.parked.iter().map(|parked| parked.deadline).min();
        let Some(sleeping) = self.front.queue.going_to_sleep() else {
            return None; // something was queued meanwhile
        };
        let ready = self.epoll.wait(&mut events, deadline);
        drop(sleeping);
        let ready = match ready {
            Ok(ready) => ready,
            Err(err) => {
                error!("epoll_wait failed: {err}");
                std::thread::sleep(MIN_ACCEPT_BACKOFF);
                return None;
            }
        };
        let mut listener = None;
        for token in ready.iter().map(|event| event.u64) {
            match token.checked_sub(PARKED_TOKEN).and_then(|fd| RawFd::try_from(fd).ok()) {
                Some(fd) => self.unpark(fd),
                None if token < self.front.listeners.len() as u64 => {
                    listener.get_or_insert(usize::try_from(token).unwrap_or_default());
                }
                None => {} // the queue or a shutdown step: the caller looks at both
            }
        }
        let now = Instant::now();
        while let Some(at) = self.parked.iter().position(|parked| parked.deadline <= now) {
            let parked = self.parked.swap_remove(at);
            self.epoll.remove(parked.arrival.conn.as_raw_fd());
            self.front.hand_over(parked.arrival, &[]);
        }
        if let Some(index) = listener.filter(|_| !self.unparked.is_empty() || self.front.queue.has_items()) {
            // The kernel woke this thread alone for a new connection, but it has other work first: the
            // connection goes to the queue, which wakes an idle thread for it.
            if let Accept::Connection(arrival) = self.accept(index) {
                self.front.queue_connection(arrival);
            }
            return None;
        }
        listener
    }

    /// This thread woke for connections on listener `index` [`ROTATE_AFTER_WAKES`] times: it registers
    /// again, so the next connections wake another idle thread. The kernel wakes the first exclusive waiter
    /// it finds, always in the same order: without this, one thread of one worker would take every request
    /// of a quiet server, and the others would sit cold. (Busy threads are not waiting, so under load this
    /// changes nothing.)
    fn to_back_of_queue(&self, index: usize) {
        let fd = self.front.listeners[index].socket.as_raw_fd();
        self.epoll.remove(fd);
        if let Err(err) = self.epoll.add(fd, index as u64, Watch::Exclusive) {
            error!("cannot listen on {} again in this thread: {err}", self.front.listeners[index].spec);
        }
    }

    /// Keeps a connection whose request has not arrived yet in this thread's epoll set for a moment: nginx
    /// writes right after connecting, and a thread woken by the connection usually gets there first. Past
    /// [`PARK_TIMEOUT`] (or [`PARKED_MAX`]), the I/O runtime waits for it instead.
    fn park(&mut self, arrival: Arrival) {
        let fd = arrival.conn.as_raw_fd();
        let token = PARKED_TOKEN + u64::try_from(fd).unwrap_or(0);
        if !self.accepting
            || self.parked.len() >= PARKED_MAX
            || self.epoll.add(fd, token, Watch::Once).is_err()
        {
            self.front.hand_over(arrival, &[]);
            return;
        }
        self.parked.push(Parked { arrival, deadline: Instant::now() + PARK_TIMEOUT });
    }

    /// The request of parked connection `fd` arrived: it is started next. Its one-shot registration is now
    /// disarmed, and goes when the connection is closed: no system call to remove it.
    fn unpark(&mut self, fd: RawFd) {
        if let Some(at) = self.parked.iter().position(|parked| parked.arrival.conn.as_raw_fd() == fd) {
            let parked = self.parked.swap_remove(at);
            self.unparked.push(parked.arrival);
        }
    }

    /// This thread is about to run a request: the connections it holds would wait behind it. Those whose
    /// request arrived go to the queue, for whichever thread is free first; the I/O runtime waits for the
    /// others.
    fn release_held(&mut self) {
        for parked in self.parked.drain(..) {
            self.epoll.remove(parked.arrival.conn.as_raw_fd());
            self.front.hand_over(parked.arrival, &[]);
        }
        for arrival in self.unparked.drain(..) {
            self.front.queue_connection(arrival);
        }
    }

    /// During a graceful stop: a request from what is already queued on the listeners, until they are
    /// empty; then this thread accepts no more.
    fn take_queued(&mut self) -> Option<Request> {
        let mut index = 0;
        while index < self.front.listeners.len() {
            if self.front.listeners[index].protocol != Protocol::Uwsgi {
                index += 1;
                continue;
            }
            match self.accept(index) {
                Accept::Connection(arrival) => {
                    if let Some(request) = self.start(arrival) {
                        return Some(request);
                    }
                }
                // Not empty yet: an aborted connection, or a full descriptor table (after a pause).
                Accept::Failed => {}
                Accept::Empty => index += 1,
            }
        }
        self.stop_accepting();
        None
    }

    fn stop_accepting(&mut self) {
        if !std::mem::replace(&mut self.accepting, false) {
            return;
        }
        self.release_held();
        for (_, listener) in self.front.uwsgi_listeners() {
            self.epoll.remove(listener.socket.as_raw_fd());
        }
        self.epoll.remove(self.front.stop.fd());
        self.front.accepting.fetch_sub(1, Ordering::AcqRel);
        self.front.changed.notify_one();
    }

    /// `accept4` on listener `index`, without waiting. Errors other than "nothing queued" are logged and
    /// back off (a full descriptor table must not spin the CPU).
    fn accept(&mut self, index: usize) -> Accept {
        let listener = &self.front.listeners[index];
        loop {
            // SAFETY: accept4 on a listening socket we own; no address is asked for.
            let fd = unsafe {
                libc::accept4(
                    listener.socket.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                self.backoff = MIN_ACCEPT_BACKOFF;
                self.front.count_accept();
                // SAFETY: a fresh descriptor from accept4, owned by nothing else.
                let socket = unsafe { Socket::from_raw_fd(fd) };
                return Accept::Connection(Arrival {
                    conn: Conn::new(socket, listener.kind),
                    listener: index,
                    accepted_at: Instant::now(),
                    in_flight: self.front.metrics.in_flight(),
                });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => return Accept::Empty,
                Some(libc::ECONNABORTED) => return Accept::Failed,
                Some(libc::EINTR) => {}
                _ => {
                    self.front.accept_errors.report(&err, self.backoff);
                    std::thread::sleep(self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    return Accept::Failed;
                }
            }
        }
    }

    /// Reads what came with a new connection. A whole WSGI request (with its body, or with a body too large
    /// to hold that the app will read as it goes) is returned to run now; anything else goes to the I/O
    /// runtime, which waits for the rest or turns the connection away.
    fn start(&mut self, arrival: Arrival) -> Option<Request> {
        let front = &self.front;
        // Whatever a previous connection sent past its body is not this one's.
        self.buf.clear();
        self.buf.reserve(READ_BUFFER_SIZE);
        match arrival.conn.try_read(&mut self.buf) {
            Ok(0) if self.buf.is_empty() => return None, // a port probe: connected, closed, sent nothing
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if self.buf.is_empty() {
                    self.park(arrival);
                } else {
                    front.hand_over(arrival, &self.buf);
                }
                return None;
            }
            Err(err) => {
                front.refused(ProtocolErrorKind::ReadError, &format_args!("read error: {err}"));
                return None;
            }
        }
        let framing = match self.buf.first() {
            Some(&MODIFIER_WSGI) if self.buf.len() >= HEADER_LEN => {
                frame(&self.buf, &front.config.limits, front.config.limit_post).ok().flatten()
            }
            _ => None,
        };
        let Some(framing) = framing else {
            // Not all there, or not a request the app can take (ping, malformed, plain HTTP, too large).
            front.hand_over(arrival, &self.buf);
            return None;
        };
        let in_buffer = (self.buf.len() - framing.packet_len) as u64;
        let unread = framing.content_length.saturating_sub(in_buffer);
        if unread > 0 && unread <= BUFFERED_BODY_MAX {
            front.hand_over(arrival, &self.buf);
            return None;
        }
        let timeout = front.config.socket_timeout;
        let request = self.front.request(arrival, &mut self.buf, framing, |received, unread, conn| {
            if unread == 0 {
                Body::complete(received)
            } else {
                Body::streaming(received, unread, Arc::clone(conn), timeout)
            }
        });
        self.release_held();
        Some(request)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop_accepting();
        self.front.serving.fetch_sub(1, Ordering::AcqRel);
        self.front.changed.notify_one();
    }
}

/// Requests the I/O runtime finished reading and connections accepted ahead, waiting for a serving thread.
///
/// Its eventfd sits in every serving thread's epoll set (exclusive: one push wakes one sleeper). A push
/// signals it only when a thread sleeps; a thread about to sleep counts itself as a sleeper first, then
/// looks at the queue once more (both sides write, then read, sequentially consistent), so a push is never
/// missed and a busy server writes no eventfd per push.
struct JobQueue {
    items: Mutex<QueueItems>,
    /// A lock-free hint of the length, so an empty queue costs no lock on the hot path.
    len: AtomicUsize,
    /// Serving threads asleep in epoll, or about to be.
    sleepers: AtomicUsize,
    ready: EventFd,
    collect_pending: AtomicBool,
    closed: EventFd,
    is_closed: AtomicBool,
}

struct QueueItems {
    queue: VecDeque<Queued>,
    /// The eventfd was written since it was last reset.
    signalled: bool,
}

/// A serving thread counted as asleep until this drops.
struct Sleeping<'a>(&'a AtomicUsize);

impl Drop for Sleeping<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl JobQueue {
    fn new() -> io::Result<Self> {
        Ok(Self {
            items: Mutex::new(QueueItems { queue: VecDeque::new(), signalled: false }),
            len: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            ready: EventFd::new()?,
            collect_pending: AtomicBool::new(false),
            closed: EventFd::new()?,
            is_closed: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueItems> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, item: Queued) {
        let mut items = self.lock();
        items.queue.push_back(item);
        self.len.store(items.queue.len(), Ordering::SeqCst);
        // Every push while threads sleep, not only the first: each write wakes one more of them.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            items.signalled = true;
            self.ready.signal();
        }
    }

    fn push_collect(&self) {
        if !self.collect_pending.swap(true, Ordering::AcqRel) {
            self.push(Queued::Job(Job::Collect));
        }
    }

    fn try_pop(&self) -> Option<Queued> {
        if !self.has_items() {
            return None;
        }
        let mut items = self.lock();
        let item = items.queue.pop_front();
        self.len.store(items.queue.len(), Ordering::SeqCst);
        if items.queue.is_empty() && std::mem::take(&mut items.signalled) {
            self.ready.reset();
        }
        if matches!(item, Some(Queued::Job(Job::Collect))) {
            self.collect_pending.store(false, Ordering::Release);
        }
        item
    }

    fn has_items(&self) -> bool {
        self.len.load(Ordering::SeqCst) > 0
    }

    /// Threads asleep in epoll: none means every thread is busy.
    fn sleepers(&self) -> usize {
        self.sleepers.load(Ordering::SeqCst)
    }

    /// Counts this thread as a sleeper, unless something is queued (`None`: take it instead).
    fn going_to_sleep(&self) -> Option<Sleeping<'_>> {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let sleeping = Sleeping(&self.sleepers);
        (!self.has_items()).then_some(sleeping)
    }

    fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.closed.signal();
    }

    /// Closed, and nothing left in it.
    fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Acquire) && !self.has_items()
    }
}

/// An eventfd: level-triggered "something is there" for an epoll set.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd creation; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes it readable (until reset).
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. Only fails if the counter would overflow,
        // which needs 2^64 - 1 signals without a reset: it is readable then anyway.
        unsafe { libc::write(self.fd(), (&raw const one).cast(), size_of::<u64>()) };
    }

    /// Makes it not readable.
    fn reset(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd; EAGAIN if already zero.
        unsafe { libc::read(self.fd(), (&raw mut count).cast(), size_of::<u64>()) };
    }
}

/// How an epoll set watches a descriptor for input.
#[derive(Clone, Copy)]
enum Watch {
    /// Every set watching it wakes (shutdown steps).
    Shared,
    /// One readiness wakes one of the sets waiting on it (`EPOLLEXCLUSIVE`): listeners, the queue.
    Exclusive,
    /// Reported once, then disarmed until removed (`EPOLLONESHOT`): parked connections.
    Once,
}

/// An epoll instance.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: plain epoll creation; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for input, level-triggered.
    fn add(&self, fd: RawFd, token: u64, watch: Watch) -> io::Result<()> {
        let flags = match watch {
            Watch::Shared => libc::EPOLLIN,
            Watch::Exclusive => libc::EPOLLIN | libc::EPOLLEXCLUSIVE,
            Watch::Once => libc::EPOLLIN | libc::EPOLLONESHOT,
        };
        // Both flags are positive bit masks, so the absolute value is the same bits.
        let mut event = libc::epoll_event { events: flags.unsigned_abs(), u64: token };
        // SAFETY: valid epoll and target descriptors, and a valid event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &raw mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: valid descriptors; a descriptor not in the set is an error we do not care about.
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Waits for events, until `deadline` if given; an interrupted wait returns none.
    fn wait<'a>(
        &self,
        events: &'a mut [libc::epoll_event],
        deadline: Option<Instant>,
    ) -> io::Result<&'a [libc::epoll_event]> {
        let capacity = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // Rounded up, so a wait never ends a hair before the deadline and spins.
        let timeout = deadline.map_or(-1, |deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
        });
        // SAFETY: `events` is valid for `capacity` entries.
        let ready = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), capacity, timeout) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted { Ok(&[]) } else { Err(err) };
        }
        Ok(&events[..ready.unsigned_abs() as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the queue's eventfd would wake an epoll waiter now.
    fn readable(queue: &JobQueue) -> bool {
        let mut pollfd = libc::pollfd { fd: queue.ready.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&raw mut pollfd, 1, 0) == 1 }
    }

    #[test]
    fn a_push_wakes_only_while_a_thread_sleeps_and_an_empty_queue_stops_waking() {
        let queue = JobQueue::new().unwrap();
        // Nobody sleeps: no system call, and a thread about to sleep sees the job instead.
        queue.push(Queued::Job(Job::Collect));
        assert!(!readable(&queue));
        assert!(queue.going_to_sleep().is_none(), "a queued job is taken, not slept on");
        assert!(matches!(queue.try_pop(), Some(Queued::Job(Job::Collect))));
        // A sleeper: every push wakes.
        let sleeping = queue.going_to_sleep().expect("nothing queued");
        queue.push(Queued::Job(Job::Collect));
        assert!(readable(&queue));
        drop(sleeping);
        assert!(queue.try_pop().is_some());
        assert!(!readable(&queue), "emptied: no more wake-ups");
        assert!(queue.try_pop().is_none());
    }

    #[test]
    fn a_closed_queue_ends_only_once_empty() {
        let queue = JobQueue::new().unwrap();
        queue.push(Queued::Job(Job::Collect));
        queue.close();
        assert!(!queue.is_closed(), "a job is still queued");
        assert!(queue.try_pop().is_some());
        assert!(queue.is_closed());
    }
}
