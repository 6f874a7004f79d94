//! Listening sockets: binding them (socket2: backlog, address reuse, Unix socket file handling) and
//! accepting connections from them.
//!
//! Binding happens before the runtime starts and yields plain std listeners, so a later master process can
//! bind once and hand the same sockets to its workers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::{ServerConfig, SocketSpec};
use crate::exchange::ListenerInfo;

/// A bound, listening socket, not yet registered with a runtime.
#[derive(Debug)]
pub struct BoundSocket {
    pub spec: SocketSpec,
    socket: Socket,
}

impl BoundSocket {
    /// A listening socket handed down by the process that bound it (the master), at file descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open listening socket of the kind `spec` names, owned by no one else in this process.
    pub unsafe fn inherited(fd: RawFd, spec: SocketSpec) -> io::Result<Self> {
        // SAFETY: the caller guarantees `fd` is an open socket that nothing else owns.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
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
}

/// Binds `spec`. A Unix socket file left by a dead server is replaced; one that still accepts connections is
/// an error (uWSGI unlinks it blindly and steals the address from the live server).
pub fn bind(spec: &SocketSpec, config: &ServerConfig) -> io::Result<BoundSocket> {
    let backlog = i32::try_from(config.listen_backlog).unwrap_or(i32::MAX);
    let socket = match spec {
        SocketSpec::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
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

fn remove_stale_socket(path: &Path) -> io::Result<()> {
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

/// A listener registered with the runtime.
pub enum Listener {
    Tcp(TcpListener),
    Unix { listener: UnixListener, path: PathBuf },
}

/// An accepted connection.
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// Must be called inside the runtime.
    pub fn register(bound: BoundSocket) -> io::Result<(Self, Arc<ListenerInfo>)> {
        match bound.spec {
            SocketSpec::Tcp(addr) => {
                let listener = TcpListener::from_std(std::net::TcpListener::from(bound.socket))?;
                let local = listener.local_addr().unwrap_or(addr);
                let info = ListenerInfo {
                    server_name: local.ip().to_string(),
                    server_port: local.port().to_string(),
                };
                Ok((Listener::Tcp(listener), Arc::new(info)))
            }
            SocketSpec::Unix(path) => {
                let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(bound.socket))?;
                let info = ListenerInfo { server_name: "localhost".into(), server_port: String::new() };
                Ok((Listener::Unix { listener, path }, Arc::new(info)))
            }
        }
    }

    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Connection>> {
        match self {
            Listener::Tcp(listener) => listener.poll_accept(cx).map(|accepted| {
                let (stream, _) = accepted?;
                // Responses are written whole or in app-sized chunks; Nagle would only add latency.
                stream.set_nodelay(true)?;
                Ok(Connection::Tcp(stream))
            }),
            Listener::Unix { listener, .. } => {
                listener.poll_accept(cx).map_ok(|(stream, _)| Connection::Unix(stream))
            }
        }
    }

    /// The socket file to remove at exit, for Unix sockets.
    pub fn socket_file(&self) -> Option<&Path> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix { path, .. } => Some(path),
        }
    }
}
