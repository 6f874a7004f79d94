//! The tokio side: accept loops over the listening sockets, one task per connection, graceful stop.
//!
//! Knows nothing of Python: requests go to whatever [`Handler`] it is given, so tests can drive it
//! directly. The listeners and the shutdown future are injected.

mod connection;
mod listener;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::ServerConfig;
use crate::exchange::Handler;
use crate::metrics::Recorder;
use connection::{serve, Context};
pub use listener::{bind, BoundSocket, Connection, Listener};

/// Connections taken per Python thread: the one it runs and the next, already read, so a thread finishing a
/// request finds its next job queued instead of sleeping while the I/O side accepts and reads (measured on a
/// hello-world app behind nginx: about 14k requests/s with one per thread, 22k with two).
const CONNECTIONS_PER_THREAD: usize = 2;
/// First pause after `accept()` fails.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause after `accept()` fails (EMFILE and friends), so a full fd table does not spin the CPU.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `sockets` until `shutdown` resolves, then stops accepting, waits for in-flight requests (up to
/// the graceful timeout) and, with `vacuum`, removes Unix socket files. `ready` is called once every socket
/// accepts; `retire` once `max_requests` connections were accepted (the process keeps serving until told to
/// stop). Every connection is counted in `metrics`.
pub async fn run(
    sockets: Vec<BoundSocket>,
    config: ServerConfig,
    handler: Arc<dyn Handler>,
    metrics: Recorder,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
    retire: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut listeners = Vec::new();
    let mut names = Vec::new();
    for socket in sockets {
        names.push(socket.spec.to_string());
        let (listener, info) = Listener::register(socket)?;
        listeners.push((
            listener,
            Arc::new(Context { config, handler: Arc::clone(&handler), listener: info, metrics }),
        ));
    }
    let socket_files: Vec<PathBuf> =
        listeners.iter().filter_map(|(listener, _)| listener.socket_file().map(Path::to_path_buf)).collect();
    let limits = AcceptLimits { capacity: handler.capacity(), max_requests: config.max_requests };
    let mut accepting =
        tokio::spawn(accept_loop(listeners, limits, retire, stop.clone(), connections.clone()));
    info!("ready: listening on {}", names.join(", "));
    ready();
    shutdown.await;
    info!("shutting down: no new connections; finishing queued and in-flight requests");
    // The socket file goes first, so no new connection can queue while the queue is drained: every
    // connection nginx managed to make is served, none is reset when the socket closes.
    if config.vacuum {
        remove_socket_files(&socket_files);
    }
    stop.cancel();
    // One deadline for both: taking what is queued (which waits for free threads) and finishing it.
    let grace = config.graceful_timeout;
    let drained = tokio::time::timeout(grace, async {
        let _ = (&mut accepting).await;
        connections.close();
        connections.wait().await;
    })
    .await;
    if drained.is_err() {
        accepting.abort();
        warn!("{} requests still running after {grace:?}; stopping anyway", connections.len());
    }
    Ok(())
}

/// Removes Unix socket files at exit (uWSGI's `--vacuum`), so nginx gets "no such file" rather than
/// "connection refused" and a restart finds a clean path.
pub fn remove_socket_files(paths: &[PathBuf]) {
    for path in paths {
        match std::fs::remove_file(path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                warn!("cannot remove socket file {}: {err}", path.display());
            }
            _ => {}
        }
    }
}

struct AcceptLimits {
    capacity: usize,
    max_requests: Option<u64>,
}

/// Accepts from every listener while a Python thread is free, until `stop`; then takes what is already
/// queued (without waiting for more) and returns.
///
/// One loop for all listeners, because the permit is taken before accepting: a loop per listener would let
/// one socket hold the last permit while connections on the others wait. Listeners are polled in turn,
/// starting after the last one that produced a connection, so none is starved.
async fn accept_loop(
    listeners: Vec<(Listener, Arc<Context>)>,
    limits: AcceptLimits,
    retire: impl FnOnce() + Send + 'static,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    // Connections beyond the permits wait in the kernel backlog, where another worker process can take them.
    let permits = Arc::new(Semaphore::new(limits.capacity * CONNECTIONS_PER_THREAD));
    let mut retire = Some(retire);
    let mut accepted_total: u64 = 0;
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let mut next = 0;
    loop {
        // Once stopping, permits are still awaited (queued connections wait their turn in the backlog, which
        // stays open until this loop ends), but no new connection is.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled(), if !stop.is_cancelled() => continue,
        };
        let stopping = stop.is_cancelled();
        let accept_any = std::future::poll_fn(|cx| {
            for turn in 0..listeners.len() {
                let index = (next + turn) % listeners.len();
                if let Poll::Ready(accepted) = listeners[index].0.poll_accept(cx) {
                    return Poll::Ready(Some((index, accepted)));
                }
            }
            if stopping {
                return Poll::Ready(None); // the queues are empty
            }
            Poll::Pending
        });
        let accepted = tokio::select! {
            accepted = accept_any => accepted,
            () = stop.cancelled(), if !stopping => continue,
        };
        let Some((index, accepted)) = accepted else { break };
        next = (index + 1) % listeners.len();
        accepted_total += 1;
        if limits.max_requests.is_some_and(|max| accepted_total >= max) {
            if let Some(retire) = retire.take() {
                info!("{accepted_total} requests accepted: asking to be replaced (--max-requests)");
                retire();
            }
        }
        let context = Arc::clone(&listeners[index].1);
        match accepted {
            Ok(Connection::Tcp(stream)) => {
                connections.spawn(serve(stream, context, permit));
            }
            Ok(Connection::Unix(stream)) => {
                connections.spawn(serve(stream, context, permit));
            }
            Err(err) => {
                error!("accept failed: {err}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        }
        backoff = MIN_ACCEPT_BACKOFF;
    }
}
