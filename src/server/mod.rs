//! Serving: the listening sockets, the serving threads' way in ([`Front`], [`Acceptor`]) and out
//! ([`Responder`]), and the I/O runtime for everything that waits.
//!
//! The common request crosses no thread: the thread that runs the app accepts the connection, reads the
//! packet, and writes the response (see [`front`]). tokio runs only what would make that thread wait on a
//! peer ([`waiting`]). Knows nothing of Python: whatever runs the app calls [`Acceptor::next_job`] and answers
//! through the [`Responder`]. The listeners and the shutdown future are injected.

mod accept_errors;
mod conn;
mod front;
mod http;
mod listener;
mod log_budget;
mod request;
mod responder;
pub mod tls;
mod waiting;

use std::future::Future;
use std::io;
use std::sync::Arc;

use tracing::{info, warn};

pub use conn::Kind;
pub use front::{Acceptor, Front, Job, Request};
pub use listener::{adopt, bind, systemd_sockets, BoundSocket, Protocol};
pub use request::{Body, ListenerInfo, RequestHead, RequestLine};
pub use responder::{ClientGone, Responder};

/// Serves until `shutdown` resolves, then stops accepting, waits for queued and in-flight requests (up to
/// the graceful timeout) and, with `vacuum`, removes Unix socket files. `ready` is called once the serving
/// threads accept. The serving threads themselves are started by the caller, each calling
/// [`Front::acceptor`].
pub async fn run(
    front: &Arc<Front>,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
) -> io::Result<()> {
    front.serve_in_runtime();
    info!("ready: listening on {}", front.names());
    ready();
    shutdown.await;
    info!("shutting down: no new connections; finishing queued and in-flight requests");
    // The socket file goes first, so no new connection can queue while the queue is drained: every
    // connection nginx managed to make is served, none is reset when the socket closes.
    if front.config.vacuum {
        crate::socket_file::remove_socket_files(&front.socket_files());
    }
    front.stop_accepting();
    // One deadline for both: taking what is queued (which waits for free threads) and finishing it.
    let grace = front.config.graceful_timeout;
    if tokio::time::timeout(grace, front.drained()).await.is_err() {
        warn!("{} requests still running after {grace:?}; stopping anyway", front.in_progress());
    }
    Ok(())
}
