"""A real Flask app through nginx and oxwsgi. Every test runs twice: against the app itself
(flask_app.py) and against the same app wrapped in wsgiref.validate with warnings as errors
(flask_validated.py). For both, the oxwsgi log must stay free of tracebacks, validator assertions,
WSGI warnings and unraisable exceptions (the validator checks close() in __del__).
"""

import hashlib
import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, READY_INTERVAL, READY_TRIES, Stack

THREADS = 4
# Log text that means the app, the validator or the server complained.
FORBIDDEN_IN_LOG = (
    "Traceback",
    "AssertionError",
    "WSGIWarning",
    "UNRAISABLE",
    "garbage collected without being closed",
)


@dataclass
class FlaskStack:
    stack: Stack
    validated: bool

    def url(self, path="/"):
        return self.stack.url(path)


def complaints(log):
    return [line for line in log.splitlines() if any(marker in line for marker in FORBIDDEN_IN_LOG)]


@pytest.fixture(scope="module", params=["flask_app.py", "flask_validated.py"])
def flask_stack(request, launcher):
    stack = launcher.start(
        ["--wsgi-file", str(APPS / request.param)], extra_args=["--threads", str(THREADS)]
    )
    yield FlaskStack(stack, validated=request.param == "flask_validated.py")
    stack.stop()
    # After the process exited, so that anything printed late (a __del__ check) is in the log too.
    log = stack.oxwsgi_log()
    assert not complaints(log), f"{request.param}: the oxwsgi log has complaints:\n{log}"


def released_stats(flask_stack):
    """For the validated app: polls until the server released every response iterable it was given (so
    the validator's close() check in __del__ ran), bounded; returns the last counts."""
    for _ in range(READY_TRIES):
        stats = requests.get(flask_stack.url("/_validator/stats"), timeout=HTTP_TIMEOUT).json()
        if stats["released"] == stats["returned"]:
            break
        time.sleep(READY_INTERVAL)
    return stats


@pytest.fixture
def flask(flask_stack):
    """The module's stack; after each test, the log lines the test added must be free of complaints
    (checked again for the whole log when the stack stops), and with the validator every response
    iterable must have been released."""
    before = len(flask_stack.stack.oxwsgi_log())
    yield flask_stack
    if flask_stack.validated:
        stats = released_stats(flask_stack)
        assert stats["returned"] > 0, stats
        assert stats["released"] == stats["returned"], f"response iterables kept alive: {stats}"
    added = flask_stack.stack.oxwsgi_log()[before:]
    assert not complaints(added), f"the oxwsgi log has complaints:\n{added}"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def test_index(flask):
    response = requests.get(flask.url("/"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.text == "flask ok\n"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_unknown_route_is_404(flask):
    response = requests.get(flask.url("/no/such/route"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/html")


def test_query_string_arguments(flask):
    response = requests.get(
        flask.url("/args?a=1&a=2&text=x%20y%26z&empty=&word=caf%C3%A9"), timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"a": ["1", "2"], "text": ["x y&z"], "empty": [""], "word": ["café"]}


def test_form_post(flask):
    form = {"name": "Zoë", "tags": ["red", "green"], "note": "a=b&c"}
    response = requests.post(flask.url("/form"), data=form, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"name": ["Zoë"], "tags": ["red", "green"], "note": ["a=b&c"]}


def test_json_post(flask):
    payload = {"text": "grüße 🚀", "numbers": [1, 2.5, -3], "nested": {"ok": True, "none": None}}
    response = requests.post(flask.url("/json"), json=payload, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"received": payload, "content_type": "application/json"}


def test_multipart_file_upload(flask):
    big = random.Random("multipart").randbytes(300_000)
    small = "line one\nligne deux é\n".encode()
    response = requests.post(
        flask.url("/upload"),
        files={
            "big": ("big.bin", big, "application/octet-stream"),
            "small": ("small.txt", small, "text/plain"),
        },
        data={"comment": "two files"},
        timeout=HTTP_TIMEOUT,
    )
    assert response.status_code == 200
    assert response.json() == {
        "files": {
            "big": {"filename": "big.bin", "size": len(big), "sha256": sha256(big)},
            "small": {"filename": "small.txt", "size": len(small), "sha256": sha256(small)},
        },
        "fields": {"comment": ["two files"]},
    }


def test_5mb_raw_upload(flask):
    body = random.Random("upload").randbytes(5 * 1024 * 1024)
    response = requests.post(
        flask.url("/raw"),
        data=body,
        headers={"Content-Type": "application/octet-stream"},
        timeout=HTTP_TIMEOUT,
    )
    assert response.status_code == 200
    assert response.json() == {
        "length": len(body),
        "sha256": sha256(body),
        "content_length": str(len(body)),
        "input_terminated": False,
    }


def test_chunked_upload_arrives_intact(flask):
    # A generator body makes requests send `Transfer-Encoding: chunked`; nginx de-chunks it and passes
    # CONTENT_LENGTH plus HTTP_TRANSFER_ENCODING. Werkzeug then ignores CONTENT_LENGTH and reads to EOF,
    # which only works because the server sets wsgi.input_terminated and ends the stream itself.
    pieces = [random.Random(f"piece {i}").randbytes(10_000 + i * 997) for i in range(40)]
    body = b"".join(pieces)
    response = requests.post(
        flask.url("/raw"),
        data=iter(pieces),
        headers={"Content-Type": "application/octet-stream"},
        timeout=HTTP_TIMEOUT,
    )
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200
    assert response.json() == {
        "length": len(body),
        "sha256": sha256(body),
        "content_length": str(len(body)),
        "input_terminated": True,
    }


def test_8mb_response(flask):
    size = 8 * 1024 * 1024
    response = requests.get(flask.url(f"/bytes/{size}?seed=download"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Length"] == str(size)
    expected = random.Random("download").randbytes(size)
    assert len(response.content) == size
    assert sha256(response.content) == sha256(expected)


def test_streamed_generator_response(flask):
    count, size = 300, 1000
    with requests.get(
        flask.url(f"/stream/{count}?size={size}"), stream=True, timeout=HTTP_TIMEOUT
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        # The server cannot know a generator's length, so it must not claim one.
        assert "Content-Length" not in response.headers
        body = b"".join(response.iter_content(chunk_size=None))
    lines = body.split(b"\n")
    assert lines.pop() == b""  # the body ends with a newline
    assert len(lines) == count
    for i, line in enumerate(lines):
        assert len(line) == size - 1
        assert line.startswith(f"chunk {i:06d} ".encode())


@pytest.mark.parametrize("path", ["/bytes/8388608", "/stream/300?size=1000"])
def test_head_sends_the_head_only_and_logs_nothing(flask, path):
    # nginx closes the upstream connection right after the head of a HEAD response; oxwsgi must send no
    # body (the app still produces one) and treat the early close as normal: no error or "client gone"
    # line in its log.
    before = len(flask.stack.oxwsgi_log())
    response = requests.head(flask.url(path), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["Content-Type"]
    # The access line is written once oxwsgi is done, which may be just after nginx answered.
    for _ in range(READY_TRIES):
        added = flask.stack.oxwsgi_log()[before:]
        if f"HEAD {path} => 200 (0 bytes)" in added:
            break
        time.sleep(READY_INTERVAL)
    assert f"HEAD {path} => 200 (0 bytes)" in added, added
    assert "client gone" not in added and "ERROR" not in added and "WARN" not in added, added


def test_cookies_round_trip(flask):
    session = requests.Session()
    response = session.get(
        flask.url("/cookies/set?flavour=oatmeal&colour=blue%20green"), timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200
    # Two cookies: two separate Set-Cookie headers must reach the client.
    set_cookies = response.raw.headers.getlist("Set-Cookie")
    assert len(set_cookies) == 2, set_cookies
    assert {cookie.split("=", 1)[0] for cookie in set_cookies} == {"flavour", "colour"}
    response = session.get(flask.url("/cookies"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"flavour": "oatmeal", "colour": "blue green"}


def test_repeated_cookie_headers_are_joined(flask):
    # nginx 1.22 forwards two Cookie header lines as two HTTP_COOKIE records; the app must see both
    # cookies (joined with "; "), not only the last line.
    connection = http.client.HTTPConnection("127.0.0.1", flask.stack.http_port, timeout=HTTP_TIMEOUT)
    try:
        connection.putrequest("GET", "/cookies")
        connection.putheader("Cookie", "first=1")
        connection.putheader("Cookie", "second=2; third=3")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == {"first": "1", "second": "2", "third": "3"}
    finally:
        connection.close()


def test_redirect_is_followed(flask):
    response = requests.get(flask.url("/redirect"), allow_redirects=False, timeout=HTTP_TIMEOUT)
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/redirect/target?via=redirect")

    response = requests.get(flask.url("/redirect"), timeout=HTTP_TIMEOUT)
    assert [r.status_code for r in response.history] == [302]
    assert response.status_code == 200
    assert response.url == flask.url("/redirect/target?via=redirect")
    assert response.json() == {"landed": True, "via": "redirect"}


def test_unicode_path_reaches_its_route(flask):
    response = requests.get(flask.url("/caf%C3%A9/j%C3%BCrgen"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"route": "cafe", "name": "jürgen", "path": "/café/jürgen"}


def test_path_info_is_the_latin1_view_of_the_utf8_bytes(flask):
    response = requests.get(flask.url("/environ/caf%C3%A9%20cr%C3%A8me"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    environ = response.json()
    # nginx percent-decodes the path; PEP 3333 passes the raw bytes as a latin-1 str.
    assert environ["PATH_INFO"] == "/environ/café crème".encode().decode("latin-1")
    assert environ["REQUEST_URI"] == "/environ/caf%C3%A9%20cr%C3%A8me"


def test_environ_through_nginx(flask):
    body = b"x=1&y=2"
    response = requests.post(
        flask.url("/environ?q=1"),
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            # A client claiming https must not change the scheme; nginx talked plain http to it.
            "X-Forwarded-Proto": "https",
            "X-Custom-Header": "custom value",
        },
        timeout=HTTP_TIMEOUT,
    )
    assert response.status_code == 200
    environ = response.json()

    # nginx sends Content-Type/Content-Length twice; only the CGI names may reach the app.
    assert "HTTP_CONTENT_TYPE" not in environ
    assert "HTTP_CONTENT_LENGTH" not in environ
    assert environ["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert environ["CONTENT_LENGTH"] == str(len(body))

    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["QUERY_STRING"] == "q=1"
    assert environ["PATH_INFO"] == "/environ"
    assert environ["SCRIPT_NAME"] == ""
    # The template has no server_name, so nginx sends SERVER_NAME "": the server must fill it in.
    assert environ["SERVER_NAME"] != ""
    assert environ["SERVER_PORT"] == str(flask.stack.http_port)
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "127.0.0.1"

    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"  # passed through as a plain header
    assert environ["HTTP_X_CUSTOM_HEADER"] == "custom value"

    assert environ["wsgi.version"] == [1, 0]
    assert environ["wsgi.multithread"] is True  # --threads 4
    assert environ["wsgi.multiprocess"] is False
    assert environ["wsgi.run_once"] is False
    assert "wsgi.input_terminated" not in environ  # the body was not chunked
    assert environ.get("oxwsgi.version")


def test_threads_serve_requests_at_the_same_time(flask):
    # /sleep?until=N returns once N requests are inside it at once (or after a bound), and /peak reports
    # the most seen at once: with 4 threads, 4 concurrent requests must all be in the app together.
    assert requests.post(flask.url("/peak/reset"), timeout=HTTP_TIMEOUT).json() == {"peak": 0}
    barrier = threading.Barrier(THREADS)

    def sleep_request(_):
        barrier.wait()
        return requests.get(flask.url(f"/sleep?until={THREADS}"), timeout=HTTP_TIMEOUT).status_code

    with ThreadPoolExecutor(THREADS) as pool:
        statuses = list(pool.map(sleep_request, range(THREADS)))
    assert statuses == [200] * THREADS
    peak = requests.get(flask.url("/peak"), timeout=HTTP_TIMEOUT).json()
    assert peak == {"peak": THREADS, "in_flight": 0}
