"""The apps of the benchmark's traffic shapes beyond hello world, in one plain WSGI file (no framework, so
that what is measured is the server moving bytes, not a framework's routing). bench/bench.py serves this
file with both servers under the same options and picks the shape by PATH_INFO:

- `/sleep`: waits 10 ms (`time.sleep`, which releases the GIL), then answers a small body. With 8 threads
  per process this is an app that waits on a database or another service: it measures how a server
  overlaps waiting requests, not how fast it computes.
- `/bytes`: one 1 MiB `bytes` object, built once at import: a large response that is already in memory,
  so the server's way of writing it (copies, chunks, system calls) is all that differs.
- `/file`: `wsgi.file_wrapper` over an 8 MiB file whose path the benchmark puts in `BENCH_SHAPES_FILE`
  (it creates the file once in its temporary directory): the PEP 3333 way to serve a file, which a
  server may turn into `sendfile(2)`.
- `/upload`: reads `wsgi.input` in 64 KiB reads, up to CONTENT_LENGTH as PEP 3333 asks, and answers the
  byte count: a large request body, whose cost and memory depend on whether the server streams it.
- `/stream`: a generator yielding 100 MiB in 64 KiB chunks, one chunk object built at import and yielded
  again and again, with no Content-Length (a generated download, an export): a long response that a
  server must stream without holding it in memory.

Every body is built before the first request so that the app's own allocations are not part of a
server's memory growth or CPU time.
"""

import os
import time

KIB = 1024
MIB = 1024 * KIB

# /sleep: a short wait, as an app's call to a database or an API; 10 ms is long against the server's own
# cost per request (microseconds), so 8 threads bound one process to about 800 requests per second.
SLEEP_SECONDS = 0.010
SLEEP_BODY = b"slept 10 ms\n"

# /bytes: built once here; every response returns the same object.
BYTES_BODY = b"x" * MIB

# /file: the path of the file, created by the benchmark before it starts the server.
FILE_ENV = "BENCH_SHAPES_FILE"
# The block size asked of wsgi.file_wrapper, for servers that iterate the file instead of sendfile(2).
FILE_BLOCK_SIZE = 64 * KIB

# /upload and /stream: the read and chunk size of 64 KiB, a typical size for an app copying a body.
CHUNK_SIZE = 64 * KIB
# /stream: 100 MiB, 1600 chunks of the one object below.
STREAM_BYTES = 100 * MIB
STREAM_CHUNK = b"s" * CHUNK_SIZE

TEXT = ("Content-Type", "text/plain; charset=utf-8")
OCTETS = ("Content-Type", "application/octet-stream")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/sleep":
        time.sleep(SLEEP_SECONDS)
        return respond(start_response, SLEEP_BODY)
    if path == "/bytes":
        return respond(start_response, BYTES_BODY, OCTETS)
    if path == "/file":
        return send_file(environ, start_response)
    if path == "/upload":
        return respond(start_response, b"%d\n" % read_body(environ))
    if path == "/stream":
        start_response("200 OK", [OCTETS])
        return stream(STREAM_BYTES)
    return respond(start_response, b"not found\n", status="404 Not Found")


def respond(start_response, body, content_type=TEXT, status="200 OK"):
    """A whole body in one list, with its Content-Length."""
    start_response(status, [content_type, ("Content-Length", str(len(body)))])
    return [body]


def send_file(environ, start_response):
    """The file through the server's wsgi.file_wrapper, with its Content-Length."""
    path = os.environ.get(FILE_ENV)
    if not path:
        return respond(start_response, b"%s is not set\n" % FILE_ENV.encode(), status="500 Internal Server Error")
    size = os.stat(path).st_size
    start_response("200 OK", [OCTETS, ("Content-Length", str(size))])
    return environ["wsgi.file_wrapper"](open(path, "rb"), FILE_BLOCK_SIZE)


def read_body(environ):
    """Reads the request body in CHUNK_SIZE reads, never past CONTENT_LENGTH, and returns its length."""
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"]
    total = 0
    while remaining > 0:
        chunk = body.read(min(CHUNK_SIZE, remaining))
        if not chunk:
            break
        total += len(chunk)
        remaining -= len(chunk)
    return total


def stream(size):
    """`size` bytes as the same chunk object yielded again and again (size is a multiple of the chunk)."""
    for _ in range(size // CHUNK_SIZE):
        yield STREAM_CHUNK
