"""One plain WSGI app (no framework) with a small behaviour per PATH_INFO, for tests/server.rs.

Every answer the tests parse is a "report": one `key: value` line per entry, sorted by key, where the
value is `ascii(python_value)` (so bytes, str and non-ASCII text compare as exact, ASCII-only strings).

Behaviours that end without a readable response (an aborted stream, a client that went away) record
what they saw in RESULTS under the query's `key`; the test then reads it back from /last-result?key=K.
"""

import atexit
import io
import os
import sys
import tempfile
import threading
import time
from urllib.parse import parse_qs

RESULTS = {}
LOCK = threading.Lock()
CONCURRENCY = {"active": 0, "peak": 0}
PREVIOUS = {"environ": None}
# Objects a route keeps alive after its request, as some apps do by accident (a global cache, a closure).
KEPT = []

TEXT = [("Content-Type", "text/plain")]


def _write_atexit_marker(path):
    with open(path, "w") as handle:
        handle.write("atexit ran\n")


# Set by a test to see that the server runs the app's atexit handlers at shutdown.
if os.environ.get("PEP3333_ATEXIT_MARKER"):
    atexit.register(_write_atexit_marker, os.environ["PEP3333_ATEXIT_MARKER"])


def report(start_response, values, status="200 OK"):
    body = "".join(f"{key}: {ascii(values[key])}\n" for key in sorted(values)).encode("ascii")
    start_response(status, list(TEXT))
    return [body]


def record(key, **values):
    with LOCK:
        RESULTS.setdefault(key, {}).update(values)


def describe(value):
    if value is None or isinstance(value, (str, bytes, bool, int, tuple)):
        return value
    return f"<{type(value).__name__}>"


# --- environ ---------------------------------------------------------------------------------------


def environ_dump(environ, start_response, query):
    values = {key: describe(value) for key, value in environ.items()}
    values["_non_str"] = sorted(
        key for key, value in environ.items() if not key.startswith("wsgi.") and not isinstance(value, str)
    )
    values["_key_types"] = sorted({type(key).__name__ for key in environ})
    return report(start_response, values)


def environ_fresh(environ, start_response, query):
    previous = PREVIOUS["environ"]
    seen = {
        "same_object": previous is environ,
        "marker_seen": "test.marker" in environ,
        "path_info": environ.get("PATH_INFO"),
    }
    environ["test.marker"] = "set by an earlier request"
    environ["PATH_INFO"] = "/mutated"
    PREVIOUS["environ"] = environ  # keeps it alive, so `is` above is meaningful
    return report(start_response, seen)


def errors(environ, start_response, query):
    stream = environ["wsgi.errors"]
    stream.write("errors-write-marker\n")
    stream.writelines(["errors-writelines-", "marker\n"])
    stream.write("errors-flush-marker")
    stream.flush()
    return report(start_response, {"ok": True})


# --- wsgi.input ------------------------------------------------------------------------------------


def echo(environ, start_response, query):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


def read_sized(environ, start_response, query):
    stream = environ["wsgi.input"]
    zero = stream.read(0)
    pieces = []
    while True:
        piece = stream.read(3)
        if not piece:
            break
        pieces.append(piece)
    return report(start_response, {"zero": zero, "pieces": pieces, "after": stream.read()})


def readline(environ, start_response, query):
    stream = environ["wsgi.input"]
    values = {}
    values["1_readline"] = stream.readline()
    values["2_readline_4"] = stream.readline(4)
    values["3_readline"] = stream.readline()
    values["4_readlines_hint_1"] = stream.readlines(1)
    values["5_iteration"] = list(stream)
    values["6_readline_at_end"] = stream.readline()
    values["7_readlines_at_end"] = stream.readlines()
    return report(start_response, values)


def long_lines(environ, start_response, query):
    """A body whose first line is longer than the server's line limit, read by lines three ways."""
    stream = environ["wsgi.input"]
    first = stream.readline()
    second = stream.readline(-1)
    rest = list(stream)
    values = {
        "first": len(first),
        "second": len(second),
        "rest": [len(line) for line in rest],
        "joined": len(first + second + b"".join(rest)),
        "last": rest[-1] if rest else b"",
    }
    return report(start_response, values)


def long_error_line(environ, start_response, query):
    stream = environ["wsgi.errors"]
    for _ in range(100):
        stream.write("Q" * 1024)
    stream.write("long-error-tail-marker\n")
    return report(start_response, {"ok": True})


def read_past(environ, start_response, query):
    stream = environ["wsgi.input"]
    first = stream.read(int(query.get("n", "100")))
    return report(start_response, {"first": first, "second": stream.read(10), "third": stream.read()})


def read_chunks(environ, start_response, query):
    """Reads the body in `size`-byte reads, keeping nothing, and reports how much came."""
    stream, size, total = environ["wsgi.input"], int(query.get("size", "65536")), 0
    while True:
        piece = stream.read(size)
        if not piece:
            break
        total += len(piece)
    return report(start_response, {"total": total})


def stream_bytes(environ, start_response, query):
    """Yields `total` bytes as the same `chunk`-byte object again and again (no Content-Length)."""
    total, size = int(query["total"]), int(query.get("chunk", "65536"))
    chunk = b"s" * size
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return (chunk for _ in range(total // size))


def ignore_body(environ, start_response, query):
    return report(start_response, {"content_length": environ.get("CONTENT_LENGTH")})


def ignore_body_keep_environ(environ, start_response, query):
    KEPT.append(environ)  # wsgi.input stays alive, unread, after the response
    return report(start_response, {"content_length": environ.get("CONTENT_LENGTH")})


def sleep_then_read(environ, start_response, query):
    """Reads the body only after `ms`: a slow consumer, slower than the socket timeout."""
    time.sleep(int(query.get("ms", "100")) / 1000)
    body = environ["wsgi.input"].read()
    return report(start_response, {"length": len(body)})


def read_content_length(environ, start_response, query):
    body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
    return report(start_response, {"length": len(body)})


# --- start_response and the response ---------------------------------------------------------------


def lazy_start(environ, start_response, query):
    def body():
        start_response("201 Created", [("Content-Type", "text/plain"), ("X-Lazy", "yes")])
        yield b"lazy "
        yield b"body"

    return body()


def write_only(environ, start_response, query):
    write = start_response("200 OK", list(TEXT))
    write(b"one ")
    write(b"two")
    return []


def write_then_iter(environ, start_response, query):
    write = start_response("200 OK", list(TEXT))
    write(b"first,")

    def rest():
        yield b"second,"
        yield b"third"

    return rest()


def exc_info_before(environ, start_response, query):
    start_response("200 OK", [("X-First", "1")])
    try:
        raise ValueError("replaced before the head was sent")
    except ValueError:
        start_response("500 Oops", [("Content-Type", "text/plain"), ("X-Second", "1")], sys.exc_info())
    return [b"replaced"]


def exc_info_after(environ, start_response, query):
    key = query.get("key", "exc_info_after")

    def body():
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        yield b"chunk1"
        try:
            raise ValueError("original")
        except ValueError as err:
            original = err
            try:
                start_response("500 Too Late", list(TEXT), sys.exc_info())
            except BaseException as raised:  # noqa: BLE001 - the point is to see what was raised
                record(key, same=raised is original, type=type(raised).__name__)
                raise
            record(key, same=False, type="nothing raised")
        yield b"never"

    return body()


def twice(environ, start_response, query):
    start_response("200 OK", list(TEXT))
    try:
        start_response("201 Created", list(TEXT))
    except Exception as err:
        record(query.get("key", "twice"), type=type(err).__name__)
        raise
    return [b"second start_response accepted"]


def raise_before(environ, start_response, query):
    raise ValueError("raise-before-marker")


def raise_in_iter_before_body(environ, start_response, query):
    def body():
        start_response("200 OK", list(TEXT))
        yield b""
        raise ValueError("raise-in-iter-marker")

    return body()


def raise_after_body(environ, start_response, query):
    headers = list(TEXT)
    if "cl" in query:
        headers.append(("Content-Length", query["cl"]))

    def body():
        start_response("200 OK", headers)
        yield b"partial"
        raise ValueError("raise-after-body-marker")

    return body()


def big_stream_then_raise(environ, start_response, query):
    chunk = b"y" * int(query.get("size", str(128 * 1024)))
    count = int(query.get("n", "60"))

    def body():
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for _ in range(count):
            yield chunk
        raise ValueError("big-stream-failure")

    return body()


def str_chunk(environ, start_response, query):
    start_response("200 OK", list(TEXT))
    return ["text, not bytes"]


BAD_STATUSES = [
    "20x OK",
    "200 OK\r\nX-Injected: yes",
    "100 Continue",
    "200OK",
    b"200 OK",
    "200 \u2603",
]

BAD_HEADERS = [
    [("X-Bad", "a\r\nX-Injected: yes")],
    [("X Bad", "value")],
    [("Upgrade", "websocket")],
    [("Transfer-Encoding", "chunked")],
    [("X-Snowman", "\u2603")],
    [("X-Nul", "a\x00b")],
    [("Status", "404 Not Found")],
    [("X-Bytes", b"value")],
    (("X-Tuple", "headers must be a list"),),
    [("X-Triple", "a", "b")],
    [("Content-Length", "-1")],
    [("Trailer", "Expires")],
    [("TE", "trailers")],
    [("Proxy-Authenticate", "Basic")],
]

# What uWSGI and gunicorn serve and oxwsgi corrects (with a warning) rather than refuses.
CORRECTED = {
    "connection": ("200 OK", [("Connection", "close"), ("Keep-Alive", "timeout=5"), ("X-Kept", "yes")]),
    "reason": ("404", [("X-Kept", "yes")]),
}


def bad_status(environ, start_response, query):
    start_response(BAD_STATUSES[int(query["case"])], list(TEXT))
    return [b"must not be sent"]


def bad_header(environ, start_response, query):
    start_response("200 OK", BAD_HEADERS[int(query["case"])])
    return [b"must not be sent"]


def corrected(environ, start_response, query):
    status, headers = CORRECTED[query["case"]]
    start_response(status, list(headers))
    return [b"served"]


def content_length_over(environ, start_response, query):
    key = query.get("key", "content_length_over")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    if query.get("kind") == "list":
        return [b"01234", b"56789"]

    def body():
        try:
            yield b"0123456789"
            record(key, resumed=True)
            yield b"more"
        finally:
            record(key, closed=True)

    return body()


def content_length_short_list(environ, start_response, query):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"abc"]


def content_length_short_kept(environ, start_response, query):
    KEPT.append(start_response)  # the Sink stays alive after the request
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"hello"]


def big_list(environ, start_response, query):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [b"z" * int(query["bytes"])]


class Tracked:
    """An iterable with close(), recording what happened to it under `key`."""

    def __init__(self, key, chunks, fail_at=None, delay=0.0):
        self.key = key
        self.chunks = chunks
        self.fail_at = fail_at
        self.delay = delay
        record(key, closed=False, close_calls=0, produced=0, finished=False)

    def __iter__(self):
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise ValueError("tracked-iterable-failure")
            if self.delay:
                time.sleep(self.delay)
            record(self.key, produced=index + 1)
            yield chunk
        record(self.key, finished=True)

    def close(self):
        with LOCK:
            entry = RESULTS[self.key]
            entry["closed"] = True
            entry["close_calls"] += 1


def close_tracking(environ, start_response, query):
    key = query["key"]
    mode = query.get("mode", "ok")
    start_response("200 OK", list(TEXT))
    if mode == "ok":
        return Tracked(key, [b"a", b"b", b"c"])
    if mode == "raise-first":
        return Tracked(key, [b"a", b"b"], fail_at=0)
    if mode == "raise-later":
        return Tracked(key, [b"a", b"b"], fail_at=1)
    if mode == "slow":
        return Tracked(key, [b"x" * 1024] * 1000, delay=0.01)
    raise ValueError(f"unknown mode {mode}")


def file_wrapper(environ, start_response, query):
    key = query.get("key", "file_wrapper")
    handle = tempfile.TemporaryFile()
    handle.write(b"0123456789abcdefghij")
    handle.seek(5)
    record(key, file=handle)
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", "8")])
    wrapper = environ["wsgi.file_wrapper"](handle, 4)
    record(key, wrapper_type=type(wrapper).__name__)
    return wrapper


class NoReadFile(io.FileIO):
    """A real file whose read() fails: served whole, it proves the body never passed through Python."""

    def read(self, *args):
        raise AssertionError("the server read the file through Python")

    readinto = read


def file_send(environ, start_response, query):
    """wsgi.file_wrapper over a file of `size` pattern bytes, after reading `skip` bytes through a buffered
    file object (its OS position is then further on than tell()); `kind` picks the file-like."""
    key = query.get("key", "file_send")
    size = int(query.get("size", "100"))
    data = bytes(i % 251 for i in range(size))
    kind = query.get("kind", "buffered")
    if kind == "bytesio":
        handle = io.BytesIO(data)
    else:
        path = os.path.join(tempfile.mkdtemp(), "body")
        with open(path, "wb") as out:
            out.write(data)
        handle = NoReadFile(path) if kind == "no-read" else open(path, "rb")
    skip = int(query.get("skip", "0"))
    if skip:
        record(key, skipped=handle.read(skip))
    record(key, file=handle)
    headers = [("Content-Type", "application/octet-stream")]
    if "cl" in query:
        headers.append(("Content-Length", query["cl"]))
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](handle, int(query.get("blksize", "8192")))


def head(environ, start_response, query):
    key = query.get("key", "head")
    start_response("200 OK", list(TEXT))
    if query.get("kind") == "stream":
        return Tracked(key, [b"stream", b" body"])
    record(key, method=environ["REQUEST_METHOD"])
    return [b"list body"]


def head_like_flask(environ, start_response, query):
    """Answers HEAD with an empty iterable and no Content-Length, as Werkzeug does for a streamed body."""
    start_response("200 OK", list(TEXT))
    if environ["REQUEST_METHOD"] == "HEAD":
        return [] if query.get("kind") == "list" else nothing()
    return (piece for piece in [b"streamed ", b"body"])


def nothing():
    """A generator that yields no chunk."""
    return
    yield  # noqa: unreachable - makes this a generator


class SlowClose:
    """A body whose close() takes a while and then writes a marker file, like a framework teardown hook."""

    def __init__(self, marker, seconds):
        self.marker = marker
        self.seconds = seconds

    def __iter__(self):
        yield b"body before a slow close"

    def close(self):
        time.sleep(self.seconds)
        with open(self.marker, "w") as handle:
            handle.write("close finished\n")


def slow_close(environ, start_response, query):
    start_response("200 OK", list(TEXT))
    return SlowClose(query["marker"], int(query.get("ms", "500")) / 1000)


def no_content(environ, start_response, query):
    key = query.get("key", "no_content")
    start_response(query.get("status", "204 No Content"), [("X-Kind", query.get("kind", "list"))])
    if query.get("kind") == "stream":
        return Tracked(key, [b"must", b"not", b"be", b"sent"])
    return [b"must not be sent"]


# --- concurrency -----------------------------------------------------------------------------------


def sleep(environ, start_response, query):
    """Waits until `until` requests are inside at once (or `ms` passed), so overlap is not a timing bet."""
    until = int(query.get("until", "0"))
    deadline = time.monotonic() + int(query.get("ms", "100")) / 1000
    with LOCK:
        CONCURRENCY["active"] += 1
        CONCURRENCY["peak"] = max(CONCURRENCY["peak"], CONCURRENCY["active"])
    try:
        while time.monotonic() < deadline:
            with LOCK:
                if until and CONCURRENCY["peak"] >= until:
                    break
            time.sleep(0.005)
    finally:
        with LOCK:
            CONCURRENCY["active"] -= 1
    return report(start_response, {"thread": threading.current_thread().name})


def peak(environ, start_response, query):
    with LOCK:
        return report(start_response, dict(CONCURRENCY))


def last_result(environ, start_response, query):
    with LOCK:
        entry = dict(RESULTS.get(query["key"], {}))
    if "file" in entry:
        entry["file_closed"] = entry.pop("file").closed
    return report(start_response, entry)


ROUTES = {
    "/environ": environ_dump,
    "/environ-fresh": environ_fresh,
    "/errors": errors,
    "/echo": echo,
    "/read-sized": read_sized,
    "/readline": readline,
    "/long-lines": long_lines,
    "/long-error-line": long_error_line,
    "/read-past": read_past,
    "/read-chunks": read_chunks,
    "/stream-bytes": stream_bytes,
    "/ignore-body": ignore_body,
    "/ignore-body-keep-environ": ignore_body_keep_environ,
    "/read-content-length": read_content_length,
    "/sleep-then-read": sleep_then_read,
    "/lazy-start": lazy_start,
    "/write": write_only,
    "/write-then-iter": write_then_iter,
    "/exc-info-before": exc_info_before,
    "/exc-info-after": exc_info_after,
    "/twice": twice,
    "/raise-before": raise_before,
    "/raise-in-iter-before-body": raise_in_iter_before_body,
    "/raise-after-body": raise_after_body,
    "/big-stream-then-raise": big_stream_then_raise,
    "/str-chunk": str_chunk,
    "/bad-status": bad_status,
    "/bad-header": bad_header,
    "/corrected": corrected,
    "/content-length-over": content_length_over,
    "/content-length-short-list": content_length_short_list,
    "/content-length-short-kept": content_length_short_kept,
    "/big-list": big_list,
    "/close-tracking": close_tracking,
    "/file-wrapper": file_wrapper,
    "/file-send": file_send,
    "/head": head,
    "/head-like-flask": head_like_flask,
    "/slow-close": slow_close,
    "/no-content": no_content,
    "/sleep": sleep,
    "/peak": peak,
    "/last-result": last_result,
}


def application(environ, start_response):
    query = {key: values[-1] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ.get("PATH_INFO", "")
    handler = ROUTES.get(path)
    if handler is None and path.startswith("/environ/"):
        handler = environ_dump  # any sub-path, for tests of how PATH_INFO bytes are decoded
    if handler is None:
        start_response("404 Not Found", list(TEXT))
        return [b"no such test route\n"]
    return handler(environ, start_response, query)
