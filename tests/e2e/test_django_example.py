"""The Django example (examples/django_site) deployed as its README says: static files collected, oxwsgi
started from the example's own oxwsgi.ini (only the socket overridden on the command line, which wins over
the file), and nginx running the example's own server block, rewritten only for this machine's paths and
port. Pages come from Django through oxwsgi; /static/ comes from nginx, from disk."""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import HTTP_TIMEOUT, READY_INTERVAL, READY_TRIES, REPO, Process, find_nginx, free_port, require_module

EXAMPLE = REPO / "examples" / "django_site"
# The example's production paths, replaced by this test's own.
SOCKET = "/run/mysite/app.sock"
STATIC_ROOT = "/srv/mysite/staticfiles/"
LISTEN = "listen 80;"


def nginx_conf(prefix: Path, port: int, socket: Path, static_root: Path) -> str:
    """The example's server block, with this test's socket, static directory and port, in an nginx main
    configuration that runs as the current user with every file under `prefix`."""
    site = (EXAMPLE / "nginx-site.conf").read_text()
    for shipped in (SOCKET, STATIC_ROOT, LISTEN, "include uwsgi_params;"):
        assert shipped in site, f"the example's nginx-site.conf no longer has {shipped!r}"
    site = (
        site.replace(SOCKET, str(socket))
        .replace(STATIC_ROOT, f"{static_root}/")
        .replace(LISTEN, f"listen 127.0.0.1:{port};")
        .replace("include uwsgi_params;", "include /etc/nginx/uwsgi_params;")
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {prefix}/access.log;\n{temp_paths}\n{site}\n}}\n"
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory, oxwsgi_bin):
    require_module("django")
    nginx_bin = find_nginx()
    workdir = tmp_path_factory.mktemp("django-example")
    static_root = workdir / "static"
    env = dict(os.environ, DJANGO_STATIC_ROOT=str(static_root), PYTHONDONTWRITEBYTECODE="1")
    env.pop("OXWSGI_LOG", None)
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"], cwd=EXAMPLE, env=env, check=True
    )
    socket_dir = Path(tempfile.mkdtemp(prefix="oxwsgi-django.", dir="/tmp"))
    socket = socket_dir / "app.sock"
    # The ini file as shipped; the socket (and a mode nginx, running as this user, can use) from the command
    # line, which wins over the file.
    oxwsgi = Process(
        "oxwsgi",
        [str(oxwsgi_bin), "--ini", str(EXAMPLE / "oxwsgi.ini"), "--socket", str(socket), "--chmod-socket", "666"],
        workdir / "oxwsgi.log",
        env=env,
    )
    oxwsgi.start()
    nginx = None
    try:
        oxwsgi.wait_listening(str(socket))
        prefix = workdir / "nginx"
        prefix.mkdir()
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, port, socket, static_root))
        argv = [nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        nginx = Process("nginx", argv, prefix / "nginx.out")
        nginx.start()
        nginx.wait_listening(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}", oxwsgi
    finally:
        if nginx is not None:
            nginx.stop()
        oxwsgi.stop()


def test_pages_come_from_django_and_static_files_from_nginx(site):
    base, oxwsgi = site
    page = requests.get(base + "/", headers={"Host": "localhost"}, timeout=HTTP_TIMEOUT)
    assert page.status_code == 200, (page.status_code, page.text[:500], oxwsgi.log()[-3000:])
    assert "Django on oxwsgi" in page.text
    stylesheet = re.search(r'href="(/static/[^"]+\.css)"', page.text).group(1)
    css = requests.get(base + stylesheet, headers={"Host": "localhost"}, timeout=HTTP_TIMEOUT)
    assert css.status_code == 200 and "font-family" in css.text
    # nginx served it from disk: oxwsgi's access log never saw the request.
    assert stylesheet not in oxwsgi.log(), oxwsgi.log()[-3000:]
    api = requests.get(base + "/api/server", headers={"Host": "localhost"}, timeout=HTTP_TIMEOUT).json()
    # The ini file's master = true and processes = 4: a worker of the master answered.
    assert api["worker"] in {"1", "2", "3", "4"}, api
    assert api["secure"] is False and api["host"] == "localhost"


def test_the_ini_file_configured_the_server(site):
    base, oxwsgi = site
    # processes = 4 from the file (the socket answers once the first worker is ready; the others follow).
    for _ in range(READY_TRIES):
        if oxwsgi.log().count(") ready") >= 4:
            break
        time.sleep(READY_INTERVAL)
    log = oxwsgi.log()
    assert log.count(") ready") == 4, log[-3000:]
    # enable-threads and die-on-term are accepted without a word: no option of the file is unknown.
    assert "does not know" not in log, log[-3000:]
