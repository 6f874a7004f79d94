//! The floor: the least a uwsgi server can do per request, with no Python, no runtime and no
//! threads. One thread accepts a connection, reads until the 4-byte uwsgi header and its `datasize`
//! bytes of vars are in, writes the bytes `tests/apps/hello.py` produces under oxwsgi in one write,
//! and closes. Every benchmark report shows how far each real server is from this; a server cannot
//! get below it without changing the protocol or the kernel.
//!
//! It ignores any request body (the benchmarks send `GET`), and it serves one connection at a time
//! with no timeout (a timeout would cost a system call per connection, which the floor must not pay), so
//! a client that connects and stays silent stalls it: it is not meant for runs with idle connections.
//!
//! Run: `cargo build --release --example floor`, then
//! `target/release/examples/floor --socket /tmp/floor.sock` (or `--socket 127.0.0.1:3031`).

use std::fs::{self, Permissions};
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;

use clap::Parser;
use socket2::{Domain, SockAddr, Socket, Type};

/// Exactly what oxwsgi writes for `tests/apps/hello.py`, so the client sees the same bytes from both.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 14\r\n\r\nHello, World!\n";
/// oxwsgi's default `--listen`: the same queue, so a burst of connects fails the same way.
const BACKLOG: i32 = 1024;
/// One buffer for every connection. The vars block is counted, not kept, so it need not fit whole.
const READ_BUFFER: usize = 64 * 1024;
/// Length of the uwsgi packet header: modifier1, datasize (u16, little-endian), modifier2.
const HEADER_LEN: usize = 4;
/// nginx's Unix-socket connections come from its worker user (`www-data`), not ours.
const SOCKET_MODE: u32 = 0o666;

/// The floor: a canned uwsgi response, no Python.
#[derive(Parser)]
#[command(name = "floor")]
struct Cli {
    /// A Unix socket path (containing '/', or `unix:PATH`) or HOST:PORT.
    #[arg(long)]
    socket: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let listener = match bind(&cli.socket) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("floor: error: cannot listen on {}: {e}", cli.socket);
            return ExitCode::FAILURE;
        }
    };
    eprintln!("floor: listening on {}", cli.socket);
    let mut buf = vec![0; READ_BUFFER];
    loop {
        // A failed accept (the client gave up while queued) concerns that client only.
        let Ok((conn, _)) = listener.accept() else { continue };
        // Closed early, garbage or too slow: dropping the connection is the whole answer.
        let _ = serve(&conn, &mut buf);
    }
}

/// Binds a Unix socket (replacing a stale file) or a TCP socket, and listens.
fn bind(addr: &str) -> io::Result<Socket> {
    if let Some(path) = addr.strip_prefix("unix:").or(addr.contains('/').then_some(addr)) {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        socket.bind(&SockAddr::unix(path)?)?;
        socket.listen(BACKLOG)?;
        fs::set_permissions(path, Permissions::from_mode(SOCKET_MODE))?;
        return Ok(socket);
    }
    let Some(addr) = addr.to_socket_addrs()?.next() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing"));
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restart must not wait for the last run's connections to leave TIME_WAIT.
    socket.set_reuse_address(true)?;
    // Accepted connections inherit it, so it costs no system call per connection: a Nagle delay on the
    // response would be measured as the server's time.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

// packet = modifier1:u8 datasize:u16le modifier2:u8 vars[datasize] body
/// Reads one packet's header and vars, then writes [`RESPONSE`]. Anything but a WSGI request
/// (modifier1 0) is an error, so an HTTP request sent here by mistake is dropped, not waited on.
fn serve(mut conn: &Socket, buf: &mut [u8]) -> io::Result<()> {
    let mut received = 0;
    while received < HEADER_LEN {
        match conn.read(&mut buf[received..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => received += n,
        }
    }
    if buf[0] != 0 {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let packet_len = HEADER_LEN + usize::from(u16::from_le_bytes([buf[1], buf[2]]));
    // The header is decoded, so the rest of the vars may overwrite it.
    while received < packet_len {
        match conn.read(buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => received += n,
        }
    }
    conn.write_all(RESPONSE)
}
