//! `--ssl-socket`: the uwsgi protocol over TLS (nginx's `uwsgi_pass suwsgi://`), for backends on other
//! hosts. The I/O runtime accepts, runs the handshake (rustls; with a client CA, a peer without a
//! certificate that chains to it is refused there), then hands the serving threads one end of a socket
//! pair as if nginx had connected in the clear, and copies bytes between the two: the request takes the
//! path of any other, and what decides `wsgi.url_scheme` is still what nginx sends, not this hop.
//!
//! The certificate files are read by each process when it starts ([`load`]), so the reload that replaces
//! workers (SIGHUP) picks up renewed certificates. No pyo3 here.

use std::fs::File;
use std::io::{self, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use socket2::Socket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use super::conn::bridge;
use super::front::{Arrival, Front, MAX_ACCEPT_BACKOFF, MIN_ACCEPT_BACKOFF};
use super::http::{BUSY_LOGGED_PER_SECOND, MAX_CONNECTIONS};
use super::log_budget::{left_out, LogBudget};
use crate::config::TlsFiles;
use crate::metrics::model::ProtocolErrorKind;

/// The first read after the handshake: nginx's packets for ordinary requests are 1-3 KiB, so the packet is
/// usually in the pair before the request is queued (the serving thread then reads it at once).
const FIRST_READ: usize = 16 * 1024;
/// Size of each read of the response from the serving side.
const DOWNLOAD_READ_SIZE: usize = 64 * 1024;

/// Why TLS settings cannot be used: one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read { what: &'static str, path: std::path::PathBuf, source: io::Error },
    #[error("no {what} in {} (expected PEM)", path.display())]
    Missing { what: &'static str, path: std::path::PathBuf },
    #[error("{context}: {source}")]
    Rustls { context: String, source: rustls::Error },
    #[error("client CA {}: {source}", path.display())]
    ClientCa { path: std::path::PathBuf, source: rustls::server::VerifierBuilderError },
}

/// Reads `files` into the TLS settings of one listener: TLS 1.2 and 1.3 with rustls's safe suites, the
/// certificate chain and key, and with a client CA, client certificates required.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&files.cert, "certificate")?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { context: "protocol versions".into(), source })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path, "client CA")? {
                roots.add(cert).map_err(|source| TlsError::Rustls {
                    context: format!("client CA {}", path.display()),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientCa { path: path.clone(), source })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let context = format!("certificate {} with key {}", files.cert.display(), files.key.display());
    // No session tickets: TLS 1.2 sessions then resume by id from this process's cache, which nginx's one
    // saved session hits on every connection, skipping the key exchange (measured: 100% resumed, a third
    // of the CPU of a TLS 1.3 resumption, which always does one; with tickets, 1.2 resumed 45%). TLS 1.3's
    // cached tickets are single-use, so 1.3 resumes little under load: bench/README.md "TLS".
    let config =
        builder.with_single_cert(chain, key).map_err(|source| TlsError::Rustls { context, source })?;
    Ok(Arc::new(config))
}

/// The TLS settings of `oxwsgi ping` to a `--ssl-socket`: the server's certificate must chain to `ca`;
/// with `client`, a certificate and key are presented (a socket with a client CA refuses a ping without).
pub fn client_config(
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca, "CA")? {
        roots
            .add(cert)
            .map_err(|source| TlsError::Rustls { context: format!("CA {}", ca.display()), source })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { context: "protocol versions".into(), source })?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let context = format!("certificate {} with key {}", cert.display(), key.display());
            builder
                .with_client_auth_cert(read_certs(cert, "certificate")?, read_key(key)?)
                .map_err(|source| TlsError::Rustls { context, source })?
        }
    };
    Ok(Arc::new(config))
}

fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_reader(open(path, "key")?)
        .map_err(|_| TlsError::Missing { what: "private key", path: path.to_path_buf() })
}

fn open(path: &std::path::Path, what: &'static str) -> Result<BufReader<File>, TlsError> {
    File::open(path).map(BufReader::new).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &std::path::Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_reader_iter(open(path, what)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Missing { what, path: path.to_path_buf() })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

/// Accepts on TLS listener `index` until the graceful stop, each connection handled by a task of its own.
pub(super) async fn accept(front: Arc<Front>, index: usize, config: Arc<ServerConfig>) {
    let listener = match front
        .listener(index)
        .socket
        .try_clone()
        .and_then(|s: Socket| TcpListener::from_std(s.into()))
    {
        Ok(listener) => listener,
        Err(err) => return warn!("cannot accept on {}: {err}", front.listener(index).spec),
    };
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let busy = LogBudget::new(BUSY_LOGGED_PER_SECOND);
    let mut backoff = MIN_ACCEPT_BACKOFF;
    // The loop itself counts as an arrival until it ends, so the graceful stop waits for the connections it
    // takes from the kernel's queue on the way out.
    let _accepting = Accepting::new(&front);
    let mut stopping = false;
    loop {
        let Some(accepted) = next_accepted(&front, &mut stopping, || listener.accept()).await else { return };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_ACCEPT_BACKOFF;
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    if let Some(unlogged) = busy.admit() {
                        let spec = &front.listener(index).spec;
                        warn!("TLS: {MAX_CONNECTIONS} connections already open on {spec}: closed one from {peer}{}", left_out(unlogged, "more"));
                    }
                    continue;
                };
                // Counted from the accept: a graceful stop waits for the request it brings.
                front.arrival_started();
                front.spawn(serve(stream, acceptor.clone(), Arc::clone(&front), index, permit));
            }
            Err(_) if stopping => return,
            Err(err) => {
                front.accept_errors.report(&err, backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// The next connection for an accept loop in the runtime, or `None` once it should end: until the graceful
/// stop, whatever comes; from then on (`stopping`), only what the kernel already queued (nginx connected,
/// and would otherwise get a reset), then no more.
pub(super) async fn next_accepted<T, F>(
    front: &Front,
    stopping: &mut bool,
    accept: impl Fn() -> F,
) -> Option<io::Result<T>>
where
    F: std::future::Future<Output = io::Result<T>>,
{
    if !*stopping {
        tokio::select! {
            biased;
            () = front.stop_requested() => *stopping = true,
            accepted = accept() => return Some(accepted),
        }
    }
    // A zero timeout still polls the accept once: it yields a connection only if one is already queued.
    timeout(Duration::ZERO, accept()).await.ok()
}

/// An accept loop, counted as an arrival (see [`Front::arrival_started`]) while it runs.
pub(super) struct Accepting<'a>(&'a Front);

impl<'a> Accepting<'a> {
    pub(super) fn new(front: &'a Front) -> Self {
        front.arrival_started();
        Self(front)
    }
}

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        self.0.arrival_done();
    }
}

/// One connection: the handshake, then the request's bytes in and the response's out, through a socket
/// pair whose other end a serving thread takes as an ordinary uwsgi connection.
async fn serve(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    front: Arc<Front>,
    index: usize,
    _permit: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr().map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
    let wait = front.config.socket_timeout;
    // Connected and closed without a byte: a port probe (a load balancer's, a readiness check), not a
    // failed handshake worth a log line.
    if let Ok(Ok(0)) = timeout(wait, stream.peek(&mut [0u8; 1])).await {
        front.arrival_done();
        return;
    }
    let tcp = socket2::SockRef::from(&stream).try_clone().ok();
    let mut tls = match timeout(wait, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            front.arrival_done();
            let why = format_args!("TLS handshake failed ({peer}): {err}");
            return front.refused(ProtocolErrorKind::TlsHandshake, &why);
        }
        Err(_) => {
            front.arrival_done();
            let why =
                format_args!("TLS handshake failed ({peer}): not done within --socket-timeout ({wait:?})");
            return front.refused(ProtocolErrorKind::TlsHandshake, &why);
        }
    };
    front.request_started();
    // The packet's first bytes go into the pair before the request is queued, as from nginx in the clear.
    let mut first = vec![0u8; FIRST_READ];
    let read = match timeout(wait, tls.read(&mut first)).await {
        Ok(Ok(read)) => read,
        Ok(Err(err)) => {
            front.arrival_done();
            return front
                .refused(ProtocolErrorKind::ReadError, &format_args!("TLS: read error from {peer}: {err}"));
        }
        Err(_) => {
            front.arrival_done();
            let why = format_args!("TLS: nothing from {peer} within --socket-timeout after the handshake");
            return front.refused(ProtocolErrorKind::Timeout, &why);
        }
    };
    if read == 0 {
        // Shook hands and left (a health check of the TLS layer alone): nothing to serve.
        front.arrival_done();
        return;
    }
    first.truncate(read);
    let aborted = Arc::new(AtomicBool::new(false));
    let (served, mut gateway) = match bridge(Arc::clone(&aborted)) {
        Ok(pair) => pair,
        Err(err) => {
            front.arrival_done();
            return warn!("TLS: cannot hand a request to the serving threads: {err}");
        }
    };
    if gateway.write_all(&first).await.is_err() {
        front.arrival_done();
        return;
    }
    drop(first);
    front.queue_connection(Arrival {
        conn: served,
        listener: index,
        accepted_at: std::time::Instant::now(),
        in_flight: front.metrics.in_flight(),
    });
    front.arrival_done();

    let (mut tls_in, mut tls_out) = tokio::io::split(tls);
    let (mut from_app, mut to_app) = gateway.split();
    // nginx never ends its side of a uwsgi connection: the exchange is over when the response is, and
    // what the request still sends (its body) is copied meanwhile.
    let downloaded = {
        let upload = async {
            let _ = tokio::io::copy(&mut tls_in, &mut to_app).await;
            // nginx closed or failed mid-body: the app sees the body end now, not after a timeout.
            let _ = to_app.shutdown().await;
        };
        let download = download(&mut from_app, &mut tls_out, wait);
        tokio::pin!(upload, download);
        let mut uploading = true;
        loop {
            tokio::select! {
                done = &mut download => break done,
                () = &mut upload, if uploading => uploading = false,
            }
        }
    };
    if downloaded.is_err() || aborted.load(Ordering::Acquire) {
        // The app failed after bytes were sent, or the peer is gone: nginx must see an error, never a
        // response cut short passed off as complete, so no close_notify, and a reset.
        if let Some(tcp) = tcp {
            let _ = tcp.set_linger(Some(Duration::ZERO));
        }
        return;
    }
    let _ = timeout(wait, tls_out.shutdown()).await;
}

/// Copies the response from the serving side to nginx until it ends: reads at the app's pace, each write
/// within `wait` (a peer that stops reading, or a network that stops carrying, does not hold the task).
async fn download<R, W>(from_app: &mut R, to_nginx: &mut W, wait: Duration) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response");
    let mut buf = vec![0u8; DOWNLOAD_READ_SIZE];
    loop {
        let read = from_app.read(&mut buf).await?;
        if read == 0 {
            return timeout(wait, to_nginx.flush()).await.map_err(|_| timed_out())?;
        }
        timeout(wait, to_nginx.write_all(&buf[..read])).await.map_err(|_| timed_out())??;
    }
}
