"""The app of the soak (bench/soak.py): every kind of request a long run mixes, behind one WSGI callable that
dispatches on PATH_INFO. Plain WSGI for what tests the server itself, a small Flask app under /flask/ for
what a framework does on every request (routing, request and response objects, JSON, its own 404):

- `/hello`: a fixed small body with its Content-Length (also asked for with HEAD).
- `/flask/json?name=..&page=..`: Flask's `jsonify` of the query string.
- `/flask/...` anything else: Flask's own 404 page.
- `/upload`: reads `wsgi.input` in 64 KiB reads up to CONTENT_LENGTH and answers the byte count. The soak
  posts 1 MiB here, and also aborts uploads half-way under `/unbuffered/upload` (the same handler; nginx
  passes that location's bodies on as they arrive, so the app is mid-read when the client goes).
- `/stream?chunks=N&size=B&delay=S`: a generator yielding N chunks of B bytes, sleeping S seconds before
  each but the first, with no Content-Length. Fast by default; the soak asks for a slow one and
  disconnects after the first chunk, so the server is mid-response when the client goes.
- `/raise`: raises, so the server answers 500 (and logs the traceback).

The chunks and the hello body are built once per size, so that what grows over a soak is the server's
memory (or Python's), not the app's caches: the cache is bounded by the few sizes the soak uses.
"""

import time
from urllib.parse import parse_qs

from flask import Flask, jsonify, request

KIB = 1024

HELLO_BODY = b"Hello, soak!\n"
TEXT = ("Content-Type", "text/plain; charset=utf-8")
OCTETS = ("Content-Type", "application/octet-stream")

# Uploads are read in pieces of this size, as an app copying a body would.
READ_SIZE = 64 * KIB
# /stream's defaults: 8 chunks of 8 KiB, no delay.
STREAM_CHUNKS = 8
STREAM_CHUNK_SIZE = 8 * KIB
# Bounds on what the query string may ask of /stream, so a typo cannot make the app hold gigabytes.
MAX_STREAM_CHUNKS = 10_000
MAX_STREAM_CHUNK_SIZE = 1024 * KIB
MAX_STREAM_DELAY_SECONDS = 1.0
# One chunk object per size asked for; the soak asks for two sizes.
_chunks = {}


class SoakError(RuntimeError):
    """What /raise raises: an app bug, as far as the server can tell."""


flask_app = Flask(__name__)


@flask_app.get("/flask/json")
def flask_json():
    args = request.args
    return jsonify(name=args.get("name", ""), page=args.get("page", 0, type=int), keys=sorted(args))


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/hello":
        return respond(start_response, HELLO_BODY)
    if path.startswith("/flask/"):
        return flask_app(environ, start_response)
    if path in ("/upload", "/unbuffered/upload"):
        return respond(start_response, b"%d\n" % read_body(environ))
    if path == "/stream":
        chunks, size, delay = stream_params(environ.get("QUERY_STRING", ""))
        start_response("200 OK", [OCTETS])
        return stream(chunks, size, delay)
    if path == "/raise":
        raise SoakError("raised on purpose by /raise")
    return respond(start_response, b"not found\n", status="404 Not Found")


def respond(start_response, body, status="200 OK"):
    start_response(status, [TEXT, ("Content-Length", str(len(body)))])
    return [body]


def read_body(environ):
    """Reads the request body in READ_SIZE reads, never past CONTENT_LENGTH, and returns its length (less
    than CONTENT_LENGTH when the client went away)."""
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"]
    total = 0
    while remaining > 0:
        chunk = body.read(min(READ_SIZE, remaining))
        if not chunk:
            break
        total += len(chunk)
        remaining -= len(chunk)
    return total


def stream_params(query):
    """(chunks, size, delay) from the query string, bounded; the defaults for whatever is missing."""
    args = parse_qs(query)

    def number(key, kind, default, bound):
        try:
            return min(max(kind(args[key][0]), 0), bound)
        except (KeyError, ValueError):
            return default

    return (
        number("chunks", int, STREAM_CHUNKS, MAX_STREAM_CHUNKS),
        number("size", int, STREAM_CHUNK_SIZE, MAX_STREAM_CHUNK_SIZE),
        number("delay", float, 0.0, MAX_STREAM_DELAY_SECONDS),
    )


def stream(chunks, size, delay):
    chunk = _chunks.get(size)
    if chunk is None:
        chunk = _chunks.setdefault(size, b"s" * size)
    for i in range(chunks):
        if delay and i:
            time.sleep(delay)
        yield chunk
