"""A minimal single-file Django project (tests/apps/django_app.py) through nginx and oxwsgi."""

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, require_module


@pytest.fixture(scope="module")
def django_stack(launcher):
    require_module("django")
    stack = launcher.start(["--wsgi-file", str(APPS / "django_app.py")], extra_args=["--threads", "2"])
    yield stack
    stack.stop()


def test_get_view(django_stack):
    response = requests.get(django_stack.url("/?q=1&q=2&name=d%C3%A9j%C3%A0"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()
    assert data["framework"] == "django"
    assert data["method"] == "GET"
    assert data["path"] == "/"
    assert data["query"] == {"q": ["1", "2"], "name": ["déjà"]}
    assert data["scheme"] == "http"
    # Debian's uwsgi_params send $host (no port); stock nginx sends the client's Host header.
    assert data["host"] in ("127.0.0.1", f"127.0.0.1:{django_stack.http_port}")


def test_post_form(django_stack):
    form = {"title": "Ça marche", "n": ["1", "2"]}
    response = requests.post(django_stack.url("/echo"), data=form, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200
    data = response.json()
    assert data["method"] == "POST"
    assert data["form"] == {"title": ["Ça marche"], "n": ["1", "2"]}
    assert data["body_length"] == int(response.request.headers["Content-Length"])


def test_unknown_url_is_django_404(django_stack):
    response = requests.get(django_stack.url("/missing"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 404
    assert "Not Found" in response.text
