"""For tests/e2e/test_slow_peers.py: the routes a slow or stalled peer is pointed at.

- `/` answers at once with the pid, so a test can find the process that serves it;
- `/sleep?ms=N` sleeps N ms first (the overload test's 10 ms request);
- `/read` reads all of wsgi.input in 64 KiB pieces and answers how many bytes came, or, when a read
  fails, the error's type (the answer may find nobody to read it: what matters is that the thread is
  given back);
- `/stream?chunks=N` streams N chunks of 1 MiB, unbuffered by nginx (`X-Accel-Buffering: no`), so a
  client that stops reading stops the writes to oxwsgi's socket too.
"""

import os
import time
from urllib.parse import parse_qs

CHUNK = b"s" * (1024 * 1024)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ["QUERY_STRING"])
    if path == "/sleep":
        time.sleep(int(query.get("ms", ["10"])[0]) / 1000)
    elif path == "/read":
        return read_body(environ, start_response)
    elif path == "/stream":
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("X-Accel-Buffering", "no")])
        return (CHUNK for _ in range(int(query.get("chunks", ["1024"])[0])))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"pid={os.getpid()}".encode()]


def read_body(environ, start_response):
    received = 0
    try:
        while piece := environ["wsgi.input"].read(64 * 1024):
            received += len(piece)
        body = f"read {received} bytes"
    except Exception as err:  # noqa: BLE001 - the test wants whatever the server raised, by name
        body = f"read failed after {received} bytes: {type(err).__name__}: {err}"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
