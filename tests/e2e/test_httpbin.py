"""httpbin (a Flask app from PyPI, loaded with --module) through nginx and oxwsgi."""

import pytest
import requests

from conftest import HTTP_TIMEOUT, require_module


@pytest.fixture(scope="module")
def httpbin(launcher):
    require_module("httpbin")
    stack = launcher.start(["--module", "httpbin:app"], upstream="tcp", extra_args=["--threads", "2"])
    yield stack
    stack.stop()


def test_get(httpbin):
    response = requests.get(
        httpbin.url("/get?x=1&y=two%20words"), headers={"X-Oxwsgi-Test": "yes"}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()
    assert data["args"] == {"x": "1", "y": "two words"}
    assert data["headers"]["X-Oxwsgi-Test"] == "yes"
    assert data["url"].startswith("http://127.0.0.1")
    assert data["url"].endswith("/get?x=1&y=two%20words")


def test_post_json(httpbin):
    payload = {"name": "oxwsgi", "list": [1, 2, 3], "unicode": "ünïcödé"}
    response = requests.post(httpbin.url("/post"), json=payload, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    data = response.json()
    assert data["json"] == payload
    assert data["headers"]["Content-Type"] == "application/json"


def test_post_form(httpbin):
    response = requests.post(
        httpbin.url("/post"), data={"field": "value", "other": "ü"}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200
    assert response.json()["form"] == {"field": "value", "other": "ü"}


def test_status_code_route(httpbin):
    response = requests.get(httpbin.url("/status/418"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 418
