"""`--http-socket` with real clients: the Flask app answers through nginx (uwsgi) and straight over HTTP with
the same environ; `requests` keeps one connection for many requests, uploads chunked and multipart, streams a
response it cannot know the length of; curl does the same from the command line, and gets a clear 400 for a
request it should not have sent. (tests/http_socket.rs checks every framing rule byte by byte.)"""

import hashlib
import json
import shutil
import subprocess

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, free_port, in_ci

# What differs between the two ways in by nature, not by a rule of the server: nginx passes its own port and
# DOCUMENT_ROOT, and each connection has its own client port.
DIFFER_BY_NATURE = {"SERVER_PORT", "REMOTE_PORT", "DOCUMENT_ROOT"}
HEADERS = {"Host": "example.test", "X-Custom": "v1", "Cookie": "a=1; b=2", "Accept": "*/*"}


@pytest.fixture(scope="module")
def both(launcher):
    port = free_port()
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "flask_app.py")],
        extra_args=["--threads", "2", "--http-socket", f"127.0.0.1:{port}"],
    )
    stack.oxwsgi.wait_listening(("127.0.0.1", port))
    yield stack, f"http://127.0.0.1:{port}"
    stack.stop()
    assert "Traceback" not in stack.oxwsgi_log(), stack.oxwsgi_log()


def curl():
    path = shutil.which("curl")
    if path is None:
        message = "curl is not installed (scripts/setup.sh installs it)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def test_the_app_sees_the_same_environ_through_either_socket(both):
    stack, direct = both
    path = "/environ/caf%C3%A9/./x?q=1&q=2&e=%20"
    through_nginx = requests.get(stack.url(path), headers=HEADERS, timeout=HTTP_TIMEOUT).json()
    over_http = requests.get(direct + path, headers=HEADERS, timeout=HTTP_TIMEOUT).json()
    same = {key: value for key, value in through_nginx.items() if key not in DIFFER_BY_NATURE}
    assert {key: over_http.get(key) for key in same} == same
    extra = set(over_http) - set(through_nginx)
    assert not extra, f"only over HTTP: {extra}"
    assert over_http["PATH_INFO"] == "/environ/caf\u00c3\u00a9/x", "percent-decoded, latin-1, as nginx"
    assert over_http["SERVER_PORT"] == direct.rsplit(":", 1)[1]

    # A chunked upload: nginx de-chunks it and passes the length; so does the HTTP socket.
    body = b"".join(bytes([i % 256]) * 1000 for i in range(300))

    def pieces():
        for at in range(0, len(body), 7000):
            yield body[at : at + 7000]

    answers = [
        requests.post(url + "/raw", data=pieces(), timeout=HTTP_TIMEOUT).json()
        for url in (stack.url(""), direct)
    ]
    expected = {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "content_length": str(len(body)),
        "input_terminated": True,
    }
    assert answers == [expected, expected]


def test_requests_keeps_one_connection_for_many_requests(both):
    _, direct = both
    with requests.Session() as session:
        ports = {
            session.get(direct + "/environ", timeout=HTTP_TIMEOUT).json()["REMOTE_PORT"] for _ in range(20)
        }
        assert len(ports) == 1, f"a new connection per request: {ports}"
        set_cookies = session.get(direct + "/cookies/set?theme=dark&lang=fr", timeout=HTTP_TIMEOUT)
        assert set_cookies.json() == {"set": ["lang", "theme"]}
        assert session.get(direct + "/cookies", timeout=HTTP_TIMEOUT).json() == {"theme": "dark", "lang": "fr"}
        echoed = session.post(direct + "/json", json={"a": [1, 2]}, timeout=HTTP_TIMEOUT).json()
        assert echoed == {"received": {"a": [1, 2]}, "content_type": "application/json"}
        redirected = session.get(direct + "/redirect", timeout=HTTP_TIMEOUT)
        assert redirected.json() == {"landed": True, "via": "redirect"} and redirected.history
        # A streamed response the server cannot know the length of: chunked, read as it comes.
        with session.get(direct + "/stream/200?size=1000", stream=True, timeout=HTTP_TIMEOUT) as streamed:
            assert streamed.headers["Transfer-Encoding"] == "chunked"
            assert sum(len(piece) for piece in streamed.iter_content(4096)) == 200 * 1000
        big = session.get(direct + "/bytes/3000000?seed=7", timeout=HTTP_TIMEOUT)
        assert len(big.content) == 3_000_000 and big.headers["Content-Length"] == "3000000"
        # Still the same connection after all of that.
        assert session.get(direct + "/environ", timeout=HTTP_TIMEOUT).json()["REMOTE_PORT"] in ports


def test_requests_uploads_multipart_files(both):
    _, direct = both
    payload = bytes(range(256)) * 8192  # 2 MiB
    files = {"file": ("data.bin", payload, "application/octet-stream")}
    answer = requests.post(direct + "/upload", files=files, data={"note": "hi"}, timeout=HTTP_TIMEOUT).json()
    assert answer == {
        "files": {
            "file": {"filename": "data.bin", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        },
        "fields": {"note": ["hi"]},
    }


def test_curl_reuses_the_connection_uploads_chunked_and_gets_clear_errors(both, tmp_path):
    stack, direct = both
    binary = curl()
    # Two URLs in one curl: the second goes over the first's connection.
    out = subprocess.run(
        [binary, "-sS", "--fail", "-w", "|%{num_connects}\n", direct + "/", direct + "/args?name=curl"],
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT,
        check=True,
    ).stdout
    # Each body is followed by `|<connections opened for it>`.
    first, second, rest = out.split("|")
    assert (first, second.split("\n", 1)[0]) == ("flask ok\n", "1")
    assert (json.loads(second.split("\n", 1)[1]), rest) == ({"name": ["curl"]}, "0\n")

    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(256)) * 4000)
    chunked = subprocess.run(
        [binary, "-sS", "--fail", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", direct + "/raw"],
        capture_output=True,
        timeout=HTTP_TIMEOUT,
        check=True,
    ).stdout
    assert json.loads(chunked)["sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()

    head = subprocess.run(
        [binary, "-sS", "-I", direct + "/"], capture_output=True, text=True, timeout=HTTP_TIMEOUT, check=True
    ).stdout
    assert head.startswith("HTTP/1.1 200 OK") and "content-length: 9" in head.lower()

    refused = subprocess.run(
        [binary, "-sS", "-w", "%{http_code}", "--path-as-is", direct + "/../etc/passwd"],
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT,
    ).stdout
    assert refused.endswith("400") and "above the root" in refused, refused
    assert "refused a connection: HTTP: bad request target" in stack.oxwsgi_log()
    # Serving goes on.
    assert requests.get(direct + "/", timeout=HTTP_TIMEOUT).text == "flask ok\n"
