"""For tests/master.rs and tests/metrics.rs: answers with the pid of the worker process that served the
request, after an optional sleep (`/sleep?ms=N&started=FILE`, creating FILE once inside the app), so tests
can tell workers apart and keep a request in flight; `/raise` raises, for the exception count; `/segfault`
and `/exit` end the worker process the way a broken C extension or an app calling `os._exit(3)` does."""

import ctypes
import os
import time
from urllib.parse import parse_qs

# A slow import, so a test can send a signal while a worker is still starting.
time.sleep(float(os.environ.get("WORKERS_APP_IMPORT_SECONDS", "0")))


def application(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    if environ["PATH_INFO"] == "/raise":
        raise RuntimeError("raised on purpose by the test app")
    if environ["PATH_INFO"] == "/segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if environ["PATH_INFO"] == "/exit":
        os._exit(3)
    if environ["PATH_INFO"] == "/sleep":
        if "started" in query:
            # Tells the test the request is inside the app.
            open(query["started"][0], "w").close()
        time.sleep(int(query.get("ms", ["1000"])[0]) / 1000)
    body = f"pid={os.getpid()} worker={os.environ.get('OXWSGI_WORKER_ID')} "
    body += f"multiprocess={environ['wsgi.multiprocess']}"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
