"""A Flask app covering what real apps do through nginx: query strings, forms, JSON, multipart uploads,
large request and response bodies, streamed responses, cookies, redirects, non-ASCII paths, and
concurrency across the server's Python threads. tests/e2e/test_flask.py drives it, directly and wrapped
in wsgiref.validate (flask_validated.py).
"""

import hashlib
import random
import threading
import time

from flask import Flask, Response, jsonify, redirect, request, url_for

app = Flask(__name__)

# Request bodies are read in pieces of this size, always with an explicit size: wsgiref.validate forbids
# read() without an argument.
READ_SIZE = 64 * 1024


def digest_stream(stream):
    """Length and sha256 of everything left in a binary stream."""
    sha = hashlib.sha256()
    length = 0
    while True:
        chunk = stream.read(READ_SIZE)
        if not chunk:
            break
        sha.update(chunk)
        length += len(chunk)
    return length, sha.hexdigest()


def pseudo_random_bytes(size, seed):
    """Deterministic, non-repeating bytes: a response corrupted by reordering or dropping blocks fails
    the sha256 check the test makes with the same function."""
    return random.Random(seed).randbytes(size)


@app.get("/")
def index():
    return "flask ok\n", {"Content-Type": "text/plain; charset=utf-8"}


@app.get("/args")
def args():
    # Every value of every key, so repeated keys are visible.
    return jsonify({key: request.args.getlist(key) for key in request.args})


@app.post("/form")
def form():
    return jsonify({key: request.form.getlist(key) for key in request.form})


@app.post("/json")
def json_echo():
    return jsonify(received=request.get_json(), content_type=request.content_type)


@app.post("/upload")
def upload():
    files = {}
    for field, storage in request.files.items(multi=True):
        length, sha = digest_stream(storage.stream)
        files[field] = {"filename": storage.filename, "size": length, "sha256": sha}
    fields = {key: request.form.getlist(key) for key in request.form}
    return jsonify(files=files, fields=fields)


@app.post("/raw")
def raw():
    """Hashes the raw request body as it streams in: a plain upload, or a chunked one that nginx
    de-chunked."""
    length, sha = digest_stream(request.stream)
    return jsonify(
        length=length,
        sha256=sha,
        content_length=request.environ.get("CONTENT_LENGTH"),
        input_terminated=request.environ.get("wsgi.input_terminated", False),
    )


@app.get("/bytes/<int:size>")
def pseudo_random(size):
    seed = request.args.get("seed", "0")
    return Response(pseudo_random_bytes(size, seed), mimetype="application/octet-stream")


@app.get("/stream/<int:count>")
def stream(count):
    """A generator response: the server cannot know the length, so the body streams chunk by chunk."""
    size = request.args.get("size", 1000, type=int)

    def generate():
        for i in range(count):
            line = f"chunk {i:06d} ".encode()
            yield (line * (size // len(line) + 1))[: size - 1] + b"\n"

    return Response(generate(), mimetype="text/plain")


@app.get("/cookies")
def cookies():
    return jsonify(request.cookies.to_dict(flat=True))


@app.get("/cookies/set")
def set_cookies():
    """Sets one cookie per query argument, each as its own Set-Cookie header."""
    response = jsonify(set=sorted(request.args))
    for name, value in request.args.items():
        response.set_cookie(name, value, httponly=True, samesite="Lax")
    return response


@app.get("/redirect")
def redirect_once():
    return redirect(url_for("redirect_target", via="redirect"))


@app.get("/redirect/target")
def redirect_target():
    return jsonify(landed=True, via=request.args.get("via"))


@app.get("/café/<name>")
def cafe(name):
    return jsonify(route="cafe", name=name, path=request.path)


@app.route("/environ", methods=["GET", "POST"])
@app.route("/environ/<path:rest>", methods=["GET", "POST"])
def environ_dump(rest=None):
    """The environ as the server built it: str values verbatim, plus the flags and the version."""
    environ = request.environ
    dump = {key: value for key, value in environ.items() if isinstance(value, str)}
    for key in ("wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once", "wsgi.input_terminated"):
        if key in environ:
            dump[key] = environ[key]
    dump["wsgi.version"] = list(environ["wsgi.version"])
    # Consume a POST body so the response does not depend on the server draining it.
    digest_stream(request.stream)
    return jsonify(dump)


# Requests currently inside /sleep, and the most seen at once since the last reset.
_in_flight = 0
_peak = 0
_counter = threading.Condition()
# /sleep?until=N never waits longer than this for the others to arrive.
UNTIL_BOUND_SECONDS = 10.0


@app.get("/sleep")
def sleep():
    """Stays in flight for `seconds` (default 0.5).

    With `until=N` it instead waits until N requests have been in flight together since the last
    /peak/reset (bounded), so an overlap test does not depend on how fast requests arrive: if the server
    ran requests one at a time, the first would wait out the bound alone and /peak would show 1."""
    global _in_flight, _peak
    seconds = request.args.get("seconds", 0.5, type=float)
    until = request.args.get("until", 0, type=int)
    with _counter:
        _in_flight += 1
        _peak = max(_peak, _in_flight)
        _counter.notify_all()
    try:
        if until:
            with _counter:
                # The peak, not the current count: the first request to see N together returns and
                # leaves, and the others must not then miss the moment and wait out the bound.
                _counter.wait_for(lambda: _peak >= until, timeout=UNTIL_BOUND_SECONDS)
        else:
            time.sleep(seconds)
    finally:
        with _counter:
            _in_flight -= 1
    return jsonify(slept=True)


@app.get("/peak")
def peak():
    with _counter:
        return jsonify(peak=_peak, in_flight=_in_flight)


@app.post("/peak/reset")
def peak_reset():
    global _peak
    with _counter:
        _peak = _in_flight
    return jsonify(peak=_peak)


application = app
