//! `oxwsgi ping ADDR` (or `oxwsgi --ping ADDR`, as `uwsgi --ping`): a health check for Docker's
//! `HEALTHCHECK` and Kubernetes exec probes. It sends a uwsgi ping packet (modifier1 100, no vars) to a
//! Unix or TCP socket, or over TLS to an `--ssl-socket` (`--tls-ca`, and a client certificate where the
//! socket asks for one), and exits 0 when the server answers with a pong within the timeout; otherwise it
//! prints one line saying why and exits 1.
//!
//! The answer comes from a worker that accepted the connection: a server whose every thread is busy
//! answers only once one is free, so a ping that times out says "no worker could take a request in time",
//! which is what a liveness probe asks. No tokio, no pyo3: one blocking exchange (rustls's own blocking
//! stream for TLS).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use clap::Parser;
use oxwsgi_proto::{parse_header, pong, Header, HEADER_LEN, MODIFIER_PING};
use rustls::pki_types::ServerName;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{self, SocketSpec};

/// uWSGI's `--ping-timeout` default: probes that switch keep their timing.
const DEFAULT_TIMEOUT_SECS: u64 = 3;

/// `oxwsgi ping`'s own options.
#[derive(Debug, Parser)]
#[command(
    name = "oxwsgi ping",
    about = "Send a uwsgi ping to ADDR; exit 0 when it answers within the timeout, 1 (with one line) otherwise"
)]
struct PingArgs {
    /// The uwsgi socket: `host:port`, `[::1]:port`, `:port` (127.0.0.1 here) or a Unix socket path.
    #[arg(value_name = "ADDR")]
    addr: String,

    /// Seconds to wait for the answer, connecting included.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,

    /// Speak TLS (to an `--ssl-socket`): the server's certificate must chain to this CA (PEM).
    #[arg(long = "tls-ca", value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// The client certificate to present (PEM), for a socket with a client CA; with --tls-key.
    #[arg(long = "tls-cert", value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,

    /// The client certificate's key (PEM).
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// The name the server's certificate must carry (default: ADDR's address).
    #[arg(long = "tls-name", value_name = "NAME", requires = "tls_ca")]
    tls_name: Option<String>,
}

/// Whether `args` (program name first) ask for a ping rather than a server: `ping` or `--ping` first.
pub fn asked(args: &[std::ffi::OsString]) -> bool {
    args.get(1).is_some_and(|first| first == "ping" || first == "--ping")
}

/// Runs `oxwsgi ping ...` (`args` as given to the command, program name first).
pub fn run(args: &[std::ffi::OsString]) -> ExitCode {
    let rest = args.iter().skip(2).cloned();
    let parsed = match PingArgs::try_parse_from(std::iter::once("oxwsgi ping".into()).chain(rest)) {
        Ok(parsed) => parsed,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match ping(&parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("oxwsgi ping {}: {why}", parsed.addr);
            ExitCode::FAILURE
        }
    }
}

/// Why a ping failed, in the words of its one line.
#[derive(Debug, thiserror::Error)]
enum PingError {
    #[error("{0}")]
    Address(#[from] config::ConfigError),
    #[error("{0}")]
    Tls(#[from] crate::server::tls::TlsError),
    #[error("--tls-name {0}: not a DNS name or an IP address")]
    TlsName(String),
    #[error("TLS: {0}")]
    Handshake(io::Error),
    #[error("TLS needs a TCP ADDR")]
    TlsOverUnix,
    #[error(
        "the socket speaks TLS: give --tls-ca (and --tls-cert/--tls-key if it asks for a client certificate)"
    )]
    SpeaksTls,
    #[error("timeout must be at least 1 second")]
    ZeroTimeout,
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("the listen queue is full: every worker is busy and the backlog (--listen) is taken")]
    QueueFull,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed without an answer")]
    Closed,
    #[error("{0}")]
    Io(io::Error),
    #[error("the answer is not a uwsgi pong (first bytes {0:02x?}): is ADDR an oxwsgi or uWSGI socket?")]
    NotPong(Vec<u8>),
}

fn ping(args: &PingArgs) -> Result<(), PingError> {
    if args.timeout == 0 {
        return Err(PingError::ZeroTimeout);
    }
    let timeout = Duration::from_secs(args.timeout);
    let deadline = Instant::now() + timeout;
    let spec = config::parse_socket(&args.addr)?;
    let mut stream: Box<dyn Stream> = match (&spec, &args.tls_ca) {
        (SocketSpec::Tcp(addr), tls_ca) => {
            // `:port` means every interface to a server; to a client, this machine.
            let addr = if addr.ip().is_unspecified() {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            } else {
                *addr
            };
            let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(PingError::Connect)?;
            match tls_ca {
                None => Box::new(tcp),
                Some(ca) => Box::new(tls_stream(args, ca, addr, tcp)?),
            }
        }
        (SocketSpec::Unix(_), Some(_)) => return Err(PingError::TlsOverUnix),
        (SocketSpec::Unix(path), None) => Box::new(connect_unix(path)?),
    };
    let request = Header { modifier1: MODIFIER_PING, datasize: 0, modifier2: 0 }.encode();
    stream.set_timeouts(left(deadline, timeout)?).map_err(PingError::Io)?;
    stream.write_all(&request).map_err(|err| timed_out(err, timeout))?;
    let mut answer = Vec::with_capacity(HEADER_LEN);
    let mut buf = [0u8; HEADER_LEN];
    while answer.len() < HEADER_LEN {
        stream.set_timeouts(left(deadline, timeout)?).map_err(PingError::Io)?;
        match stream.read(&mut buf[..HEADER_LEN - answer.len()]) {
            Ok(0) if answer.is_empty() => return Err(PingError::Closed),
            Ok(0) => return Err(PingError::NotPong(answer)),
            Ok(read) => answer.extend_from_slice(&buf[..read]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(timed_out(err, timeout)),
        }
    }
    match parse_header(&answer) {
        Ok(Some(_)) if answer[..] == pong() => Ok(()),
        // A TLS record (an alert or a handshake) in answer to plain bytes: an `--ssl-socket`.
        _ if args.tls_ca.is_none() && matches!(answer[..], [0x15 | 0x16, 0x03, ..]) => {
            Err(PingError::SpeaksTls)
        }
        _ => Err(PingError::NotPong(answer)),
    }
}

/// The TLS client over `tcp`, its handshake done on the first write.
fn tls_stream(
    args: &PingArgs,
    ca: &std::path::Path,
    addr: std::net::SocketAddr,
    tcp: TcpStream,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, PingError> {
    let client = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
    let config = crate::server::tls::client_config(ca, client)?;
    let name = match &args.tls_name {
        Some(name) => ServerName::try_from(name.clone()).map_err(|_| PingError::TlsName(name.clone()))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let connection = rustls::ClientConnection::new(config, name)
        .map_err(|err| PingError::Handshake(io::Error::other(err)))?;
    Ok(rustls::StreamOwned::new(connection, tcp))
}

/// Connects without waiting: a Unix socket whose listen queue is full would block `connect` itself, for
/// as long as the server takes to accept, which the timeout could not bound.
fn connect_unix(path: &std::path::Path) -> Result<UnixStream, PingError> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(PingError::Connect)?;
    socket.set_nonblocking(true).map_err(PingError::Connect)?;
    match SockAddr::unix(path).and_then(|addr| socket.connect(&addr)) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => return Err(PingError::QueueFull),
        Err(err) => return Err(PingError::Connect(err)),
    }
    socket.set_nonblocking(false).map_err(PingError::Connect)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// What is left of the timeout, or the error saying it ran out.
fn left(deadline: Instant, timeout: Duration) -> Result<Duration, PingError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(PingError::Timeout(timeout))
    } else {
        Ok(left)
    }
}

/// A read or write that hit its timeout is the ping's timeout; anything else is said as it is.
fn timed_out(err: io::Error, timeout: Duration) -> PingError {
    if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        PingError::Timeout(timeout)
    } else {
        PingError::Io(err)
    }
}

/// A connected stream with read and write timeouts.
trait Stream: Read + Write {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.sock.set_timeouts(timeout)
    }
}

impl Stream for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_is_asked_by_its_first_argument_only() {
        let args = |list: &[&str]| list.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(asked(&args(&["oxwsgi", "ping", "/run/app.sock"])));
        assert!(asked(&args(&["oxwsgi", "--ping", ":3031"])));
        assert!(!asked(&args(&["oxwsgi", "--socket", ":3031", "--module", "ping"])));
        assert!(!asked(&args(&["oxwsgi"])));
    }
}
