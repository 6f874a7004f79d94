//! Listening sockets: binding them (socket2: backlog, address reuse, Unix socket file handling), or taking
//! them from whoever bound them (systemd socket activation, or the master for its workers).
//!
//! Binding happens before anything else starts and yields plain non-blocking sockets, so a master process
//! binds once and hands the same sockets to its workers; the serving threads accept on them
//! ([`super::front`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{ServerConfig, SocketSpec};

/// systemd passes activated sockets from this descriptor on (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: RawFd = 3;

/// What a listening socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// uwsgi packets from nginx (`--socket`): the serving threads accept.
    Uwsgi,
    /// Plain HTTP/1.1 (`--http-socket`): the I/O runtime accepts ([`super::http`]).
    Http,
    /// uwsgi over TLS (`--ssl-socket`): the I/O runtime accepts ([`super::tls`]).
    Tls,
}

impl Protocol {
    /// The name a master passes to its workers, and a systemd socket unit gives (`FileDescriptorName=`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Uwsgi => "uwsgi",
            Self::Http => "http",
            Self::Tls => "tls",
        }
    }

    /// `http` is HTTP, `tls` uwsgi over TLS; any other name (systemd's default is the unit's name) is uwsgi.
    pub fn from_name(name: &str) -> Self {
        match name {
            "http" => Self::Http,
            "tls" => Self::Tls,
            _ => Self::Uwsgi,
        }
    }
}

/// A bound, listening socket, not yet registered with a runtime.
#[derive(Debug)]
pub struct BoundSocket {
    pub spec: SocketSpec,
    pub protocol: Protocol,
    socket: Socket,
}

impl BoundSocket {
    /// A listening socket handed down by the process that bound it (the master, or systemd), listening
    /// where `spec` says.
    pub fn inherited(socket: OwnedFd, spec: SocketSpec) -> io::Result<Self> {
        let socket = Socket::from(socket);
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        if matches!(spec, SocketSpec::Tcp(_)) {
            // As in `bind`: accepted connections inherit it.
            socket.set_tcp_nodelay(true)?;
        }
        Ok(Self { spec, protocol: Protocol::Uwsgi, socket })
    }

    /// The same socket, speaking `protocol`.
    #[must_use]
    pub fn speaking(self, protocol: Protocol) -> Self {
        Self { protocol, ..self }
    }

    /// The file of a Unix socket, to remove at exit.
    pub fn socket_file(&self) -> Option<std::path::PathBuf> {
        match &self.spec {
            SocketSpec::Unix(path) => Some(path.clone()),
            SocketSpec::Tcp(_) => None,
        }
    }

    /// The descriptor to hand to a worker process.
    pub fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub(super) fn into_parts(self) -> (Socket, SocketSpec, Protocol) {
        (self.socket, self.spec, self.protocol)
    }
}

/// Binds `spec`, speaking `protocol`. A Unix socket file left by a dead server is replaced; one that still accepts connections is
/// an error (uWSGI unlinks it blindly and steals the address from the live server).
pub fn bind(spec: &SocketSpec, protocol: Protocol, config: &ServerConfig) -> io::Result<BoundSocket> {
    let backlog = i32::try_from(config.listen_backlog).unwrap_or(i32::MAX);
    let socket = match spec {
        SocketSpec::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            // Accepted connections inherit it, which saves a system call per connection. Responses go out
            // whole or in app-sized chunks; Nagle would only add latency to the last one.
            socket.set_tcp_nodelay(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&(*addr).into())?;
            socket.listen(backlog)?;
            socket
        }
        SocketSpec::Unix(path) => {
            crate::socket_file::remove_stale_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            if let Some(mode) = config.chmod_socket {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            if let Some(owner) = config.chown_socket {
                // So nginx's user can connect.
                std::os::unix::fs::chown(path, owner.uid, owner.gid)?;
            }
            socket.listen(backlog)?;
            socket
        }
    };
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    Ok(BoundSocket { spec: spec.clone(), protocol, socket })
}

/// The sockets systemd passed (`LISTEN_FDS`, for this process per `LISTEN_PID`), if any; one named `http`
/// (`FileDescriptorName=http`) speaks HTTP, the others uwsgi. The variables are removed, so that processes
/// this one starts do not take the sockets for theirs.
pub fn systemd_sockets() -> io::Result<Option<Vec<BoundSocket>>> {
    let for_us =
        std::env::var("LISTEN_PID").ok().and_then(|pid| pid.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<RawFd>().ok());
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: removing variables while no other thread runs (this is called at start-up).
        unsafe { std::env::remove_var(name) };
    }
    let (true, Some(count)) = (for_us, count) else { return Ok(None) };
    let mut names = names.split(':');
    (SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count)
        .map(|fd| {
            let protocol = Protocol::from_name(names.next().unwrap_or_default());
            // SAFETY: systemd hands this process (LISTEN_PID said so) descriptors 3..3+LISTEN_FDS, which
            // nothing else here owns, and each is taken once.
            adopt(unsafe { OwnedFd::from_raw_fd(fd) }).map(|socket| socket.speaking(protocol))
        })
        .collect::<io::Result<_>>()
        .map(Some)
}

/// A listening socket handed to this process, whose address says where it listens.
pub fn adopt(socket: OwnedFd) -> io::Result<BoundSocket> {
    let spec = spec_of(socket.as_fd())?;
    BoundSocket::inherited(socket, spec)
}

fn spec_of(socket: BorrowedFd<'_>) -> io::Result<SocketSpec> {
    let address = socket2::SockRef::from(&socket).local_addr()?;
    if let Some(address) = address.as_socket() {
        return Ok(SocketSpec::Tcp(address));
    }
    match address.as_pathname() {
        Some(path) => Ok(SocketSpec::Unix(path.to_path_buf())),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an activated socket is neither TCP nor a Unix path",
        )),
    }
}
