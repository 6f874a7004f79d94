"""A plain WSGI hello world through nginx, over both upstream kinds nginx supports: a Unix socket and a
loopback TCP port."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT

EXPECTED_BODY = b"Hello, World!\n"
SIMULTANEOUS = 64


@pytest.fixture(scope="module", params=["unix", "tcp"])
def hello(request, launcher):
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "hello.py")], upstream=request.param, extra_args=["--threads", "8"]
    )
    yield stack
    stack.stop()


def test_hello_world(hello):
    response = requests.get(hello.url("/"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.content == EXPECTED_BODY
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Content-Length"] == str(len(EXPECTED_BODY))


def test_simultaneous_requests_are_all_answered(hello):
    # Each request is a fresh connection to nginx and a fresh upstream connection to oxwsgi; more
    # requests than threads must queue, not fail.
    def fetch(i):
        response = requests.get(hello.url(f"/?n={i}"), timeout=HTTP_TIMEOUT)
        return response.status_code, response.content

    with ThreadPoolExecutor(SIMULTANEOUS) as pool:
        results = list(pool.map(fetch, range(SIMULTANEOUS)))
    assert results == [(200, EXPECTED_BODY)] * SIMULTANEOUS
