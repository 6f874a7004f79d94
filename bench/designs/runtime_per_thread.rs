//! Design (a), "a tokio runtime per Python thread": each of the N Python threads runs its own
//! current-thread tokio runtime, with its own accept loop on its own copy (`dup`) of the shared listening
//! socket. A task per connection reads the uwsgi packet with tokio, calls the WSGI app inline on that same
//! thread (blocking the runtime while the app runs), writes head and body with one vectored write and
//! closes. No request ever crosses a thread; what tokio itself costs per connection (registering the
//! socket with the runtime's epoll and deregistering it, accepting until `EAGAIN`) is part of what is
//! measured. A request that has not fully arrived simply waits in its task, on its own thread. Every
//! runtime is woken for every new connection (tokio registers the listener edge-triggered, without
//! `EPOLLEXCLUSIVE`), and one accepts it.
//!
//! A prototype to be benchmarked against design (b), `accept_on_python_thread.rs`; both share
//! `common.rs`. Run it behind nginx (`uwsgi_pass unix:/tmp/a.sock;`) or feed it uwsgi packets directly:
//!
//! ```sh
//! cargo build --release --example design_runtime_per_thread
//! target/release/examples/design_runtime_per_thread --socket /tmp/a.sock --wsgi-file tests/apps/hello.py \
//!     --threads 1 --processes 1
//! ```

#[path = "common.rs"]
mod common;

use std::io::{self, IoSlice};
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::BytesMut;
use pyo3::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::time::timeout;

use common::{BoxError, Cli, Frame, Kind, Listener, Response, Wsgi, ACCEPT_BACKOFF, SOCKET_TIMEOUT};

/// Read buffer of a connection, and how much it grows by: nginx's packets for ordinary requests are
/// 1-3 KiB, so one read usually takes the whole request.
const READ_BUFFER: usize = 8 * 1024;

fn main() -> ExitCode {
    common::main(worker)
}

fn worker(cli: &Cli, listener: &Listener) -> Result<(), BoxError> {
    Python::initialize();
    let app = Python::attach(|py| common::load_app(py, &cli.wsgi_file))?;
    let mut threads = Vec::new();
    for index in 0..cli.threads.get() {
        // Each runtime owns (and would close) the listener it registers, so each gets its own dup.
        let fd = listener.fd.try_clone()?;
        let kind = listener.kind;
        let wsgi = Python::attach(|py| Wsgi::new(py, &app, cli))?;
        let thread = std::thread::Builder::new()
            .name(format!("py-{index}"))
            .spawn(move || python_thread(fd, kind, wsgi))?;
        threads.push(thread);
    }
    for thread in threads {
        thread.join().map_err(|_| "a Python thread panicked")??;
    }
    Ok(())
}

fn python_thread(fd: OwnedFd, kind: Kind, wsgi: Wsgi) -> io::Result<()> {
    // Attached once, so the thread keeps its Python thread state: attaching for each request then only
    // takes the GIL back. The runtime runs detached, so no wait ever holds the GIL.
    Python::attach(|py| {
        py.detach(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
            runtime.block_on(accept_loop(fd, kind, Arc::new(wsgi)))
        })
    })
}

async fn accept_loop(fd: OwnedFd, kind: Kind, wsgi: Arc<Wsgi>) -> io::Result<()> {
    // One loop per socket type, so the connection task is generic over the stream rather than boxed.
    match kind {
        Kind::Unix => {
            let listener = UnixListener::from_std(fd.into())?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => drop(tokio::spawn(serve(stream, Arc::clone(&wsgi)))),
                    Err(err) => accept_failed(&err).await,
                }
            }
        }
        Kind::Tcp => {
            let listener = TcpListener::from_std(fd.into())?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => drop(tokio::spawn(serve(stream, Arc::clone(&wsgi)))),
                    Err(err) => accept_failed(&err).await,
                }
            }
        }
    }
}

async fn accept_failed(err: &io::Error) {
    eprintln!("accept: {err}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// One connection: read the request, run the app right here, write, close (by dropping the stream).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, wsgi: Arc<Wsgi>) {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let response = loop {
        match common::frame(&buf) {
            Frame::Request { vars, body } => break Python::attach(|py| wsgi.call(py, vars, body)),
            Frame::Bad => return,
            Frame::Incomplete => {}
        }
        if buf.len() == buf.capacity() {
            buf.reserve(READ_BUFFER);
        }
        match timeout(SOCKET_TIMEOUT, stream.read_buf(&mut buf)).await {
            Ok(Ok(1..)) => {}
            // Closed before the request was complete, a read error, or silent for too long.
            _ => return,
        }
    };
    // A failed or timed-out write means nginx went away: there is no one left to tell.
    let _ = timeout(SOCKET_TIMEOUT, write_response(&mut stream, &response)).await;
}

async fn write_response<S: AsyncWrite + Unpin>(stream: &mut S, response: &Response) -> io::Result<()> {
    let mut slices = [IoSlice::new(&response.head), IoSlice::new(&response.body)];
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let written = stream.write_vectored(rest).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}
