"""The deployment config we ship, nginx/oxwsgi.conf, really serves an app: its server block is wrapped in
a minimal main config (paths under a temp prefix, a loopback port), with the Unix-socket variant and then
the TCP variant pointed at a running oxwsgi."""

import shutil
from pathlib import Path

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, REPO, Process, find_nginx, free_port

DEPLOY_CONF = REPO / "nginx" / "oxwsgi.conf"
UNIX_PASS = "uwsgi_pass unix:/run/oxwsgi/app.sock;"
TCP_PASS = "# uwsgi_pass 127.0.0.1:3031;"
STATIC_ROOT = "/srv/myproject/static/"


def render(prefix: Path, port: int, upstream: str) -> Path:
    server = DEPLOY_CONF.read_text()
    # The shipped file must keep both variants; the test switches between them the way a reader would.
    for expected in ("listen 80;", UNIX_PASS, TCP_PASS, STATIC_ROOT, "include uwsgi_params;"):
        assert expected in server, f"nginx/oxwsgi.conf no longer contains {expected!r}"
    server = server.replace("listen 80;", f"listen 127.0.0.1:{port};")
    server = server.replace(STATIC_ROOT, f"{prefix}/static/")
    if upstream.startswith("unix:"):
        server = server.replace(UNIX_PASS, f"uwsgi_pass {upstream};")
    else:
        server = server.replace(UNIX_PASS, "").replace(TCP_PASS, f"uwsgi_pass {upstream};")
    (prefix / "static").mkdir()
    (prefix / "static" / "hello.txt").write_text("static from nginx\n")
    return main_config(prefix, server)


def main_config(prefix: Path, server: str) -> Path:
    """A main nginx.conf around a shipped `server` block (and whatever precedes it, e.g. an upstream):
    every path under `prefix`, and the `uwsgi_params` its `include` needs beside it."""
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "uwsgi", "proxy", "fastcgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {prefix}/access.log;\n{temp_paths}{server}\n}}\n"
    )
    # `include uwsgi_params;` is relative to the config's directory, as in /etc/nginx.
    shutil.copy("/etc/nginx/uwsgi_params", prefix / "uwsgi_params")
    return conf


@pytest.mark.parametrize("upstream_kind", ["unix", "tcp"])
def test_shipped_server_block_serves_the_app(upstream_kind, launcher, tmp_path):
    nginx_bin = find_nginx()
    stack = launcher.start_oxwsgi(["--wsgi-file", str(APPS / "hello.py")], tmp_path, upstream=upstream_kind)
    prefix = tmp_path / "deploy"
    prefix.mkdir()
    port = free_port()
    conf = render(prefix, port, stack.upstream)
    nginx = Process("nginx", [nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                    prefix / "nginx.out")
    stack.nginx, stack.http_port = nginx, port
    try:
        nginx.start()
        nginx.wait_listening(("127.0.0.1", port))
        app = requests.get(stack.url("/"), timeout=HTTP_TIMEOUT)
        assert (app.status_code, app.content) == (200, b"Hello, World!\n"), stack.report()
        static = requests.get(stack.url("/static/hello.txt"), timeout=HTTP_TIMEOUT)
        assert (static.status_code, static.text) == (200, "static from nginx\n")
        assert "GET / " in stack.oxwsgi_log() and "/static/" not in stack.oxwsgi_log()
    finally:
        stack.stop()
