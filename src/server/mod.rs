//! The tokio side: accept loops over the listening sockets, one task per connection, graceful stop.
//!
//! Knows nothing of Python: requests go to whatever [`Handler`] it is given, so tests can drive it
//! directly. The listeners and the shutdown future are injected.

mod connection;
mod listener;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::ServerConfig;
use crate::exchange::Handler;
use connection::{serve, Context};
pub use listener::{bind, BoundSocket, Connection, Listener};

/// How long a graceful stop waits for in-flight requests (gunicorn's default graceful timeout).
pub const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause after `accept()` fails (EMFILE and friends), so a full fd table does not spin the CPU.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `sockets` until `shutdown` resolves, then stops accepting, waits for in-flight requests (up to
/// [`GRACEFUL_TIMEOUT`]) and removes Unix socket files.
pub async fn run(
    sockets: Vec<BoundSocket>,
    config: ServerConfig,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    // One permit per Python thread: connections beyond that wait in the kernel backlog.
    let permits = Arc::new(Semaphore::new(handler.capacity()));
    let mut accept_loops = Vec::new();
    let mut names = Vec::new();
    for socket in sockets {
        names.push(socket.spec.to_string());
        let (listener, info) = Listener::register(socket)?;
        let context = Arc::new(Context { config, handler: Arc::clone(&handler), listener: info });
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            context,
            Arc::clone(&permits),
            stop.clone(),
            connections.clone(),
        )));
    }
    info!("ready: listening on {}", names.join(", "));
    shutdown.await;
    info!("shutting down: no new connections; finishing in-flight requests");
    stop.cancel();
    for accept_loop in accept_loops {
        if let Ok(Some(path)) = accept_loop.await {
            if let Err(err) = std::fs::remove_file(&path) {
                warn!("cannot remove socket file {}: {err}", path.display());
            }
        }
    }
    connections.close();
    if tokio::time::timeout(GRACEFUL_TIMEOUT, connections.wait()).await.is_err() {
        warn!("{} requests still running after {GRACEFUL_TIMEOUT:?}; stopping anyway", connections.len());
    }
    Ok(())
}

/// Accepts while a Python thread is free; returns the socket file to remove, if any.
async fn accept_loop(
    listener: Listener,
    context: Arc<Context>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    connections: TaskTracker,
) -> Option<std::path::PathBuf> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok(Connection::Tcp(stream)) => {
                connections.spawn(serve(stream, Arc::clone(&context), permit));
            }
            Ok(Connection::Unix(stream)) => {
                connections.spawn(serve(stream, Arc::clone(&context), permit));
            }
            Err(err) => {
                error!("accept failed: {err}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        }
        backoff = Duration::from_millis(5);
    }
    listener.socket_file().map(std::path::Path::to_path_buf)
}
