//! The master's two read-only endpoints: `/metrics` over HTTP for Prometheus (`--metrics`), and the uWSGI
//! stats socket (`--stats`), which writes one JSON document to whoever connects and closes.
//!
//! The documents are made by the supervisor, which owns the state they describe: each connection sends it a
//! [`Query`] and writes the answer. Nothing here blocks the supervisor, and a slow or silent client holds
//! only its own task.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::exposition::CONTENT_TYPE;
use crate::config::{MetricsConfig, SocketSpec};
use crate::socket_file::remove_stale_socket;

/// A scraper gets this long to send its request head and to read the answer; a stuck one must not keep a
/// task and a descriptor for ever.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads larger than this are refused: Prometheus sends a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a connection waits for the supervisor's answer (it is busy only while starting or stopping).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients one endpoint serves at once; more wait in its listen queue. Prometheus and uwsgitop ask one at
/// a time: the cap keeps a flood of connections from costing the master a task and a descriptor each.
const MAX_CLIENTS: usize = 16;

/// What an endpoint asks the supervisor for.
pub enum Query {
    /// The Prometheus text document; `None` if it could not be made (logged by the supervisor).
    Metrics(oneshot::Sender<Option<String>>),
    /// The uWSGI stats JSON document.
    Stats(oneshot::Sender<String>),
}

/// An endpoint that cannot listen: which option, on what address, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {option} {address}: {source}")]
pub struct BindFailed {
    pub option: &'static str,
    pub address: String,
    pub source: io::Error,
}

/// Binds `--metrics` and `--stats` as `config` asks and serves each on a task of the current runtime,
/// asking `queries` for the documents.
pub fn start(config: &MetricsConfig, queries: &mpsc::Sender<Query>) -> Result<(), BindFailed> {
    if let Some(addr) = config.prometheus {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(|source| BindFailed { option: "--metrics", address: addr.to_string(), source })?;
        info!("metrics at http://{addr}/metrics");
        tokio::spawn(serve_metrics(listener, queries.clone()));
    }
    if let Some(spec) = &config.stats {
        let listener = StatsListener::bind(spec).map_err(|source| BindFailed {
            option: "--stats",
            address: spec.to_string(),
            source,
        })?;
        info!("uWSGI stats on {spec}");
        tokio::spawn(serve_stats(listener, config.stats_http, queries.clone()));
    }
    Ok(())
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, queries: mpsc::Sender<Query>) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let admitted = admit(&clients).await;
        match listener.accept().await {
            Ok((stream, _)) => {
                let queries = queries.clone();
                tokio::spawn(async move {
                    let _admitted = admitted;
                    if let Err(err) = answer_http(stream, &queries).await {
                        debug!("metrics client: {err}");
                    }
                });
            }
            Err(err) => accept_failed(&err).await,
        }
    }
}

/// The stats endpoint's socket.
pub enum StatsListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl StatsListener {
    /// Binds `spec`. As for the serving sockets, a stale Unix socket file is replaced, and a live one (a
    /// running server's) is an error, never stolen.
    pub fn bind(spec: &SocketSpec) -> io::Result<Self> {
        match spec {
            SocketSpec::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(listener)?))
            }
            SocketSpec::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Self::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }
}

impl Drop for StatsListener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes the stats document to each client that connects; with `http`, after an HTTP/1.0 head (uWSGI's
/// `--stats-http`), so a browser or `curl` can read it.
pub async fn serve_stats(listener: StatsListener, http: bool, queries: mpsc::Sender<Query>) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let admitted = admit(&clients).await;
        let accepted = match &listener {
            StatsListener::Tcp(tcp) => tcp.accept().await.map(|(s, _)| Client::Tcp(s)),
            StatsListener::Unix(unix, _) => unix.accept().await.map(|(s, _)| Client::Unix(s)),
        };
        match accepted {
            Ok(client) => {
                let queries = queries.clone();
                tokio::spawn(async move {
                    let _admitted = admitted;
                    let written = match client {
                        Client::Tcp(stream) => write_stats(stream, http, &queries).await,
                        Client::Unix(stream) => write_stats(stream, http, &queries).await,
                    };
                    if let Err(err) = written {
                        debug!("stats client: {err}");
                    }
                });
            }
            Err(err) => accept_failed(&err).await,
        }
    }
}

enum Client {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Waits until fewer than [`MAX_CLIENTS`] are being served; the permit goes with the client's task.
async fn admit(clients: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    Arc::clone(clients).acquire_owned().await.expect("the semaphore is never closed")
}

async fn accept_failed(err: &io::Error) {
    warn!("metrics endpoint: accept failed: {err}");
    // EMFILE and friends: let descriptors free up rather than spin.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// `None` if the supervisor did not answer (it is stopping).
async fn ask<T>(queries: &mpsc::Sender<Query>, query: fn(oneshot::Sender<T>) -> Query) -> Option<T> {
    let (answer, answered) = oneshot::channel();
    queries.send(query(answer)).await.ok()?;
    timeout(ANSWER_TIMEOUT, answered).await.ok()?.ok()
}

async fn write_stats<S: AsyncWrite + Unpin>(
    mut stream: S,
    http: bool,
    queries: &mpsc::Sender<Query>,
) -> io::Result<()> {
    let document = ask(queries, Query::Stats).await.ok_or(io::ErrorKind::Interrupted)?;
    let head = if http {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            document.len()
        )
    } else {
        String::new()
    };
    timeout(CLIENT_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(document.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::ErrorKind::TimedOut)?
}

/// One HTTP/1.x exchange, then close.
async fn answer_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    queries: &mpsc::Sender<Query>,
) -> io::Result<()> {
    let head =
        timeout(CLIENT_TIMEOUT, read_head(&mut stream)).await.map_err(|_| io::ErrorKind::TimedOut)??;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match ask(queries, Query::Metrics).await {
            Some(Some(document)) => ("200 OK", CONTENT_TYPE, document),
            Some(None) => ("500 Internal Server Error", "text/plain", "see the master's log\n".to_owned()),
            None => ("503 Service Unavailable", "text/plain", "the master is stopping\n".to_owned()),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "metrics are at /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET and HEAD\n".to_owned()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    timeout(CLIENT_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::ErrorKind::TimedOut)?
}

/// Reads up to the blank line that ends an HTTP request head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(request: &[u8]) -> String {
        let (queries, mut asked) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(query) = asked.recv().await {
                if let Query::Metrics(answer) = query {
                    let _ = answer.send(Some("oxwsgi_up 1\n".to_owned()));
                }
            }
        });
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move { answer_http(server, &queries).await });
        client.write_all(request).await.unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        serving.await.unwrap().unwrap();
        response
    }

    #[tokio::test]
    async fn answers_get_metrics() {
        let response = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("Content-Type: text/plain; version=0.0.4"), "{response}");
        assert!(response.ends_with("\r\n\r\noxwsgi_up 1\n"), "{response}");
    }

    #[tokio::test]
    async fn head_has_no_body_and_other_paths_are_404() {
        let response = exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n") && response.ends_with("\r\n\r\n"), "{response}");
        let response = exchange(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
        let response = exchange(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
    }
}
