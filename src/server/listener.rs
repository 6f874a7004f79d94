//! Listening sockets: binding them (socket2: backlog, address reuse, Unix socket file handling).
//!
//! Binding happens before anything else starts and yields plain non-blocking sockets, so a master process
//! binds once and hands the same sockets to its workers; the serving threads accept on them
//! ([`super::front`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{ServerConfig, SocketSpec};

/// A bound, listening socket, not yet registered with a runtime.
#[derive(Debug)]
pub struct BoundSocket {
    pub spec: SocketSpec,
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
        Ok(Self { spec, socket })
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

    pub(super) fn into_parts(self) -> (Socket, SocketSpec) {
        (self.socket, self.spec)
    }
}

/// Binds `spec`. A Unix socket file left by a dead server is replaced; one that still accepts connections is
/// an error (uWSGI unlinks it blindly and steals the address from the live server).
pub fn bind(spec: &SocketSpec, config: &ServerConfig) -> io::Result<BoundSocket> {
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
            remove_stale_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            if let Some(mode) = config.chmod_socket {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            if let Some(owner) = config.chown_socket {
                crate::deploy::chown(path, owner)?;
            }
            socket.listen(backlog)?;
            socket
        }
    };
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    Ok(BoundSocket { spec: spec.clone(), socket })
}

/// Makes way for a Unix socket at `path`: a socket file nobody accepts on (left by a dead process) is
/// removed; a live one, or a path that is not a socket, is an error.
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket"));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening on this socket"));
    }
    std::fs::remove_file(path)
}
