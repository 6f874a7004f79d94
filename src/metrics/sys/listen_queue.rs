//! The accept queue of a listening socket, as the kernel sees it: how many connections wait for
//! `accept()` and how many the backlog admits. It tells an operator that the workers fall behind before
//! nginx's connections start to fail. TCP (v4 and v6) reads it with `getsockopt(TCP_INFO)`; a Unix socket
//! has no socket option for it, so it is read through `NETLINK_SOCK_DIAG` (uWSGI reports 0 there).
//!
//! Linux only, plain system calls through libc and netlink; no tokio, no pyo3. Every call is blocking but
//! short, and opens nothing that outlives it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_ALIGNTO, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::unix::nlas::Nla;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest, UnixResponse};
use netlink_packet_sock_diag::{SockDiagMessage, TCP_LISTEN};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket as NetlinkSocket, SocketAddr as NetlinkAddr};
use socket2::{Domain, SockRef, Type};

/// Room for one netlink datagram of a dump. The kernel sizes dump datagrams by the largest buffer the
/// reader ever offered, capped at 32 KiB (`netlink_recvmsg`), and asks readers for "a buffer as large as
/// 32KiB" (`netlink_dump`); a smaller one could truncate a datagram and lose replies.
const NETLINK_RECV_BUFFER_LEN: usize = 32 * 1024;

/// How long one read of a `sock_diag` reply may wait. The kernel answers at once; this only keeps a scrape
/// from hanging forever should it not.
const NETLINK_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The sequence number of our one request. The netlink socket is ours alone and lives for one call, so
/// any value would do; a non-zero one is easier to spot in `strace`.
const NETLINK_SEQUENCE: u32 = 1;

/// How many connections wait in a listening socket's accept queue, and how many it may hold.
///
/// `max` is the backlog given to `listen()` after the kernel capped it at `net.core.somaxconn`. Linux
/// refuses a connection only once the queue holds *more* than `max`, so `queued` can reach `max + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Connections the kernel has completed that nobody has accepted yet.
    pub queued: u64,
    /// The backlog: how many may wait before the kernel turns new ones away.
    pub max: u64,
}

/// Reads the accept queue of a listening TCP (v4/v6) or Unix stream socket from the kernel.
///
/// Errors: `Unsupported` for any other kind of socket (UDP, Unix datagram, …), `InvalidInput` for a
/// socket that does not listen, `NotFound` if `sock_diag` does not list the Unix socket (it lists only the
/// sockets of the caller's network namespace), and the OS error for a descriptor that is not a socket.
pub fn listen_queue(socket: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let sock = SockRef::from(&socket);
    let domain = sock.domain()?;
    let kind = sock.r#type()?;
    let is_tcp = (domain == Domain::IPV4 || domain == Domain::IPV6) && kind == Type::STREAM;
    // SEQPACKET listeners queue connections exactly like stream ones, and sock_diag reports them alike.
    let is_unix = domain == Domain::UNIX && (kind == Type::STREAM || kind == Type::SEQPACKET);
    if !is_tcp && !is_unix {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the listen queue is known only for TCP and Unix stream sockets",
        ));
    }
    // Outside LISTEN the kernel's numbers mean something else (unacknowledged segments, bytes queued).
    if !sock.is_listener()? {
        return Err(not_listening());
    }
    if is_tcp {
        tcp_queue(socket)
    } else {
        unix_queue(socket)
    }
}

fn not_listening() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "the socket does not listen")
}

fn invalid_data(what: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// For a socket in LISTEN, `tcp_get_info()` puts the accept-queue length (`sk_ack_backlog`) in
/// `tcpi_unacked` and the backlog (`sk_max_ack_backlog`) in `tcpi_sacked`.
fn tcp_queue(socket: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    // SAFETY: `tcp_info` is a C struct of integers only, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    #[expect(clippy::cast_possible_truncation, reason = "tcp_info is a few hundred bytes")]
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the borrow; `info` is writable for `len` bytes, and the kernel
    // writes at most `len` bytes and stores the count it wrote back into `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // A kernel older than our `tcp_info` fills only a prefix; the fields we read must be inside it.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_sacked) + std::mem::size_of::<u32>();
    if (len as usize) < needed {
        return Err(invalid_data("the kernel's tcp_info is too short to hold the listen queue"));
    }
    // The socket may have been closed or shut down since `is_listener()`; only LISTEN gives these meanings.
    if info.tcpi_state != TCP_LISTEN {
        return Err(not_listening());
    }
    Ok(QueueDepth { queued: info.tcpi_unacked.into(), max: info.tcpi_sacked.into() })
}

/// Dumps the listening Unix sockets with `UDIAG_SHOW_RQLEN` and picks ours by inode. For a listener,
/// `UNIX_DIAG_RQLEN` holds the receive-queue length (each pending connection is one skb there) and the
/// backlog (`sk_max_ack_backlog`).
fn unix_queue(socket: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let inode = inode_of(socket)?;
    // A fresh socket per call (created with SOCK_CLOEXEC by netlink-sys): scrapes are rare, and nothing
    // from an earlier, abandoned dump can then be mistaken for this one's replies.
    let netlink = NetlinkSocket::new(NETLINK_SOCK_DIAG)?;
    SockRef::from(&netlink).set_read_timeout(Some(NETLINK_REPLY_TIMEOUT))?;
    // Port 0 is the kernel; connect() also binds us to a port of our own.
    netlink.connect(&NetlinkAddr::new(0, 0))?;
    send_unix_dump_request(&netlink)?;

    let mut buf = vec![0u8; NETLINK_RECV_BUFFER_LEN];
    loop {
        let datagram = recv_datagram(&netlink, &mut buf)?;
        if let Some(found) = scan_datagram(datagram, inode)? {
            // Dropping the socket discards the rest of the dump.
            return Ok(found);
        }
    }
}

/// The inode `sock_diag` names a socket by is the one `fstat` reports for its descriptor.
fn inode_of(socket: BorrowedFd<'_>) -> io::Result<u64> {
    // A duplicate (close-on-exec) descriptor lends us std's `fstat` without an unsafe block of our own.
    Ok(std::fs::File::from(socket.try_clone_to_owned()?).metadata()?.ino())
}

fn send_unix_dump_request(netlink: &NetlinkSocket) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = NETLINK_SEQUENCE;
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::LISTEN,
        // The inode and cookie select one socket only in a non-dump request; a dump ignores them.
        inode: 0,
        show_flags: ShowFlags::RQLEN,
        cookie: [0; 8],
    });
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(request));
    packet.finalize();
    // `serialize` panics on a short buffer; `buffer_len` is the exact size it needs.
    let mut bytes = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut bytes);
    let sent = netlink.send(&bytes, 0)?;
    if sent != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "the sock_diag request was sent in part"));
    }
    Ok(())
}

/// Reads one datagram of the dump into `buf` and returns it, whole or not at all.
fn recv_datagram<'b>(netlink: &NetlinkSocket, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
    loop {
        let mut window: &mut [u8] = &mut *buf;
        // With MSG_TRUNC a netlink socket returns the datagram's full length even when it did not fit,
        // so a truncated datagram is seen instead of silently losing the replies at its end.
        match netlink.recv(&mut window, libc::MSG_TRUNC) {
            Ok(len) => {
                return buf.get(..len).ok_or_else(|| invalid_data("a sock_diag reply overflowed the buffer"));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the kernel did not answer sock_diag"));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Walks the netlink messages packed in one datagram: `Some` when ours is among them, `None` when the dump
/// goes on in the next datagram, an error when the dump ended without it or the kernel reported one.
fn scan_datagram(mut rest: &[u8], inode: u64) -> io::Result<Option<QueueDepth>> {
    while !rest.is_empty() {
        // `new_checked` bounds the message's own length by what we hold and by the header size, so every
        // step below moves forward and stays inside the datagram.
        let len = NetlinkBuffer::new_checked(rest).map_err(invalid_data)?.length() as usize;
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest).map_err(invalid_data)?;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(reply))
                if u64::from(reply.header.inode) == inode =>
            {
                return depth_of(&reply).map(Some);
            }
            NetlinkPayload::Done(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "sock_diag does not list the socket among the listening Unix sockets",
                ));
            }
            NetlinkPayload::Error(error) => {
                return Err(match error.code {
                    Some(_) => error.to_io(),
                    // We asked for no acknowledgement; one would end the exchange like NLMSG_DONE.
                    None => invalid_data("sock_diag acknowledged instead of dumping"),
                });
            }
            NetlinkPayload::Overrun(_) => return Err(invalid_data("sock_diag reported an overrun")),
            // Other listening sockets, and no-ops.
            _ => {}
        }
        // Messages in a datagram start on NLMSG_ALIGNTO boundaries; the last one may lack its padding.
        let next = len.next_multiple_of(usize::from(NLMSG_ALIGNTO));
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(None)
}

fn depth_of(reply: &UnixResponse) -> io::Result<QueueDepth> {
    // We asked for listeners only, but the pair means (queued, backlog) only for one.
    if reply.header.state != TCP_LISTEN {
        return Err(not_listening());
    }
    reply
        .nlas
        .iter()
        .find_map(|nla| match nla {
            Nla::ReceiveQueueLength(queued, max) => {
                Some(QueueDepth { queued: u64::from(*queued), max: u64::from(*max) })
            }
            _ => None,
        })
        .ok_or_else(|| invalid_data("sock_diag sent no UNIX_DIAG_RQLEN for the socket"))
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_sock_diag::unix::UnixResponseHeader;
    use socket2::{Protocol, SockAddr, Socket};

    use super::*;

    /// The backlog the tests listen with: small, and below any `somaxconn`, so the kernel keeps it as is.
    const BACKLOG: i32 = 7;
    /// Connections complete in the kernel soon after `connect()` returns, but not necessarily before; this
    /// bounds the wait for the count to settle (a slow machine only makes the test slower, never wrong).
    const SETTLE_LIMIT: Duration = Duration::from_secs(2);
    /// How often the count is read while it settles.
    const SETTLE_STEP: Duration = Duration::from_millis(10);

    /// Reads the queue until it holds `want` connections, or `SETTLE_LIMIT` passed; returns the last reading.
    fn settled(socket: &Socket, want: u64) -> QueueDepth {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let depth = listen_queue(socket.as_fd()).expect("reading the listen queue");
            if depth.queued == want || Instant::now() >= deadline {
                return depth;
            }
            std::thread::sleep(SETTLE_STEP);
        }
    }

    /// Listens with `BACKLOG`, queues three clients, accepts one, and checks the count at each step.
    fn check_queue<C>(listener: &Socket, connect: impl Fn() -> C) {
        listener.listen(BACKLOG).expect("listen");
        let max = u64::try_from(BACKLOG).expect("the backlog is positive");
        assert_eq!(listen_queue(listener.as_fd()).expect("empty queue"), QueueDepth { queued: 0, max });

        let clients: Vec<C> = (0..3).map(|_| connect()).collect();
        assert_eq!(settled(listener, 3), QueueDepth { queued: 3, max });

        let (_accepted, _) = listener.accept().expect("accept");
        assert_eq!(settled(listener, 2), QueueDepth { queued: 2, max });
        drop(clients);
    }

    fn tcp_listener(addr: SocketAddr) -> io::Result<Socket> {
        let listener = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        listener.bind(&addr.into())?;
        Ok(listener)
    }

    #[test]
    fn tcp_v4_queue() {
        let listener = tcp_listener("127.0.0.1:0".parse().expect("literal")).expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local_addr").as_socket().expect("an inet address");
        check_queue(&listener, || TcpStream::connect(addr).expect("connect"));
    }

    #[test]
    fn tcp_v6_queue() {
        let Ok(listener) = tcp_listener("[::1]:0".parse().expect("literal")) else {
            eprintln!("SKIPPED tcp_v6_queue: cannot bind [::1] (no IPv6 loopback here)");
            return;
        };
        let addr = listener.local_addr().expect("local_addr").as_socket().expect("an inet address");
        check_queue(&listener, || TcpStream::connect(addr).expect("connect"));
    }

    /// A directory of its own under the temp dir, removed with everything in it when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "oxwsgi-listen-queue-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::create_dir(&path).expect("creating the temp dir");
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn unix_stream_queue() {
        let dir = TempDir::new();
        let path = dir.0.join("listen.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).expect("unix socket");
        listener.bind(&SockAddr::unix(&path).expect("socket path")).expect("bind");
        check_queue(&listener, || UnixStream::connect(&path).expect("connect"));
    }

    #[test]
    fn other_sockets_and_files_are_errors() {
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("udp socket");
        udp.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("literal").into()).expect("bind");
        let err = listen_queue(udp.as_fd()).expect_err("UDP has no listen queue");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);

        let datagram = Socket::new(Domain::UNIX, Type::DGRAM, None).expect("unix datagram socket");
        let err = listen_queue(datagram.as_fd()).expect_err("a Unix datagram socket has no listen queue");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);

        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let err = listen_queue(file.as_fd()).expect_err("a file is not a socket");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }

    #[test]
    fn sockets_that_do_not_listen_are_errors() {
        let tcp = tcp_listener("127.0.0.1:0".parse().expect("literal")).expect("bind 127.0.0.1");
        let err = listen_queue(tcp.as_fd()).expect_err("bound but not listening");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        let unix = Socket::new(Domain::UNIX, Type::STREAM, None).expect("unix socket");
        let err = listen_queue(unix.as_fd()).expect_err("not listening");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// Listeners enough that the dump cannot fit one datagram: each reply takes 44 bytes, and the kernel
    /// fills a fresh socket's first dump datagram to one page, at most 8 KiB (`NLMSG_GOODSIZE`).
    const MANY_LISTENERS: usize = 300;

    #[test]
    fn unix_queue_found_past_the_first_datagram() {
        let dir = TempDir::new();
        let listeners: Vec<Socket> = (0..MANY_LISTENERS)
            .map(|i| {
                let listener = Socket::new(Domain::UNIX, Type::STREAM, None).expect("unix socket");
                let path = dir.0.join(format!("{i}.sock"));
                listener.bind(&SockAddr::unix(path).expect("socket path")).expect("bind");
                listener.listen(BACKLOG).expect("listen");
                listener
            })
            .collect();
        let max = u64::try_from(BACKLOG).expect("the backlog is positive");
        // The dump's order is the kernel's hash order, so some of these sit in a later datagram.
        for listener in &listeners {
            assert_eq!(listen_queue(listener.as_fd()).expect("reading"), QueueDepth { queued: 0, max });
        }
    }

    /// The bytes of one netlink message carrying `payload`, as the kernel would send it.
    fn message(payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = NETLINK_SEQUENCE;
        let mut packet = NetlinkMessage::new(header, payload);
        packet.finalize();
        let mut bytes = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut bytes);
        bytes
    }

    fn listener_reply(inode: u32, queued: u32, max: u32) -> Vec<u8> {
        message(NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(Box::new(UnixResponse {
            header: UnixResponseHeader { kind: 1, state: TCP_LISTEN, inode, cookie: [0; 8] },
            nlas: vec![Nla::ReceiveQueueLength(queued, max)].into(),
        }))))
    }

    #[test]
    fn scan_finds_the_inode_among_several_replies() {
        let datagram =
            [listener_reply(10, 1, 5), listener_reply(11, 2, 7), message(NetlinkPayload::Noop)].concat();
        assert_eq!(scan_datagram(&datagram, 11).expect("scan"), Some(QueueDepth { queued: 2, max: 7 }));
        assert_eq!(scan_datagram(&datagram, 12).expect("scan"), None, "the dump goes on");
    }

    #[test]
    fn scan_ends_at_done_and_reports_kernel_errors() {
        let done = message(NetlinkPayload::Done(DoneMessage::default()));
        let datagram = [listener_reply(10, 1, 5), done].concat();
        let err = scan_datagram(&datagram, 12).expect_err("the dump ended without it");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);

        let mut nack = ErrorMessage::default();
        nack.code = std::num::NonZeroI32::new(-libc::EPERM);
        let err = scan_datagram(&message(NetlinkPayload::Error(nack)), 12).expect_err("a NACK");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn scan_survives_a_datagram_cut_anywhere() {
        let datagram = [listener_reply(10, 1, 5), listener_reply(11, 2, 7)].concat();
        for cut in 0..datagram.len() {
            // Any outcome but a panic is fine; a cut inside our own reply must not produce a reading.
            if let Ok(Some(depth)) = scan_datagram(&datagram[..cut], 11) {
                panic!("read {depth:?} from a reply cut at {cut}");
            }
        }
    }
}
