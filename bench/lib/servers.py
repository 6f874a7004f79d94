"""The servers under test and what stands in front of them: their command lines (the same shape and
options for uWSGI and oxwsgi), nginx rendered from bench/nginx.conf.template, and the readiness check that
one request returns the expected body before any load is sent."""

from __future__ import annotations

import os
import signal
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError, Child, free_port, wait_listening
from .tools import Tools

REPO = Path(__file__).resolve().parents[2]
NGINX_TEMPLATE = REPO / "bench" / "nginx.conf.template"

# Both servers get the same listen backlog. uWSGI's default is 100 and oxwsgi's 1024: with 1500 idle
# connections (idle-1500) the backlog decides who is turned away, so it must not differ.
LISTEN_BACKLOG = 1024
# The environment variable through which bench/apps/shapes.py finds the file of `/file`.
SHAPES_FILE_ENV = "BENCH_SHAPES_FILE"
# The first request through nginx or to the socket (the readiness check) gives up after this.
HTTP_TIMEOUT_SECONDS = 30
# Port collisions between picking a free port and nginx binding it are retried this often.
NGINX_START_ATTEMPTS = 3


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration: `kind` is "uwsgi", "oxwsgi", "floor" or "design" (then `binary` names
    the prototype: the key of Tools.designs)."""

    name: str
    kind: str
    binary: str = ""


UWSGI = ServerConfig("uWSGI", "uwsgi")
OXWSGI = ServerConfig("oxwsgi", "oxwsgi")
FLOOR = ServerConfig("floor", "floor")
DESIGN_A = ServerConfig("design-a", "design", "design_runtime_per_thread")
DESIGN_B = ServerConfig("design-b", "design", "design_accept_on_python_thread")
DESIGNS = (DESIGN_A, DESIGN_B)


@dataclass(frozen=True)
class Shape:
    """Worker processes × Python threads per process."""

    processes: int = 1
    threads: int = 1

    def __str__(self) -> str:
        return f"{self.processes}×{self.threads}"


@dataclass(frozen=True)
class Serving:
    """What a run asks of a server: the app file, the shape, whether nginx stands in front, and the request
    (path and a piece of the expected body) that must succeed before any load is sent."""

    app: Path
    shape: Shape
    through_nginx: bool
    ready_path: str
    ready_expect: bytes


# The flags both servers get: a master even with one worker, no access log.
def common_flags(shape: Shape) -> list[str]:
    return ["--master", "--processes", str(shape.processes), "--threads", str(shape.threads), "--disable-logging"]


# uWSGI only: --die-on-term (uWSGI 2.0 reloads on SIGTERM), --need-app (exit if the app fails to load).
UWSGI_FLAGS = ["--die-on-term", "--need-app", "--chmod-socket=666", "--listen", str(LISTEN_BACKLOG)]
OXWSGI_FLAGS = ["--chmod-socket", "666", "--listen", str(LISTEN_BACKLOG)]
# The flags oxwsgi must have for the comparison to mean what it says (checked against `--help`).
OXWSGI_REQUIRED_FLAGS = (
    "--socket",
    "--master",
    "--processes",
    "--threads",
    "--disable-logging",
    "--chmod-socket",
    "--listen",
    "--wsgi-file",
    "--callable",
)


def server_argv(tools: Tools, config: ServerConfig, serving: Serving, sock: Path) -> list[str]:
    """The command line of one configuration. uWSGI and oxwsgi get the same shape and options; the floor
    serves a canned answer and takes only its socket; the prototypes take the shape without a master."""
    app = ["--wsgi-file", str(serving.app), "--callable", "application"]
    if config.kind == "uwsgi":
        return [str(tools.uwsgi), "--socket", str(sock), *common_flags(serving.shape), *UWSGI_FLAGS, *app]
    if config.kind == "oxwsgi":
        return [str(tools.oxwsgi), "--socket", str(sock), *common_flags(serving.shape), *OXWSGI_FLAGS, *app]
    if config.kind == "floor":
        return [str(tools.require("floor")), "--socket", str(sock)]
    shape = ["--threads", str(serving.shape.threads), "--processes", str(serving.shape.processes)]
    return [str(tools.require(config.binary)), "--socket", str(sock), "--wsgi-file", str(serving.app), *shape]


# Environment variables that configure one of the servers (gunicorn reads extra arguments from
# GUNICORN_CMD_ARGS, Granian every option from GRANIAN_*): none reaches a server from the caller.
SERVER_ENV_PREFIXES = ("OXWSGI_", "UWSGI_", "GRANIAN_", "GUNICORN_CMD_ARGS")


def server_env(shapes_file: Path) -> dict[str, str]:
    """The environment of every server: none of the caller's settings of a server (they would change
    one server's configuration), no __pycache__ written into the app directories, and the path of the
    file bench/apps/shapes.py serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_ENV_PREFIXES)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env[SHAPES_FILE_ENV] = str(shapes_file)
    return env


# --- nginx ----------------------------------------------------------------------------------------------


def start_nginx(
    nginx_binary: Path,
    prefix: Path,
    upstream: str,
    template_path: Path = NGINX_TEMPLATE,
    upstream_options: str = "",
) -> tuple[Child, int]:
    """Renders the template with a free port and starts nginx; retries if the port was taken meanwhile.
    The soak passes a template of its own (same placeholders); bench/tls.py passes the `uwsgi_ssl_*`
    directives of its upstream as `upstream_options` (none for every other benchmark)."""
    prefix.mkdir()
    template = template_path.read_text()
    for attempt in range(1, NGINX_START_ATTEMPTS + 1):
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            template.replace("{{PREFIX}}", str(prefix))
            .replace("{{HTTP_PORT}}", str(port))
            .replace("{{UPSTREAM}}", upstream)
            .replace("{{UPSTREAM_OPTIONS}}", upstream_options)
        )
        argv = [str(nginx_binary), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        nginx = Child("nginx", argv, prefix / "nginx.out")
        try:
            wait_listening(nginx, socket.AF_INET, ("127.0.0.1", port))
            return nginx, port
        except BenchError:
            nginx.stop(signal.SIGTERM)
            error_log = (prefix / "error.log").read_text(errors="replace") if (prefix / "error.log").exists() else ""
            if "Address already in use" not in error_log or attempt == NGINX_START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# --- a raw uwsgi request, for the readiness check without nginx -----------------------------------------


def uwsgi_packet(path: str) -> bytes:
    """A GET as nginx would send it: the 4-byte header (modifier1 0, vars size as little-endian u16,
    modifier2 0), then each var as a u16 length and the key, a u16 length and the value."""
    path_info, _, query = path.partition("?")
    params = {
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": path,
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "localhost",
    }
    block = b"".join(
        struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v)) + v.encode() for k, v in params.items()
    )
    return struct.pack("<BHB", 0, len(block), 0) + block


def uwsgi_get(sock: Path, path: str) -> tuple[int, bytes]:
    """(status, body) of one request sent straight to the server's socket; the response ends at close."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(HTTP_TIMEOUT_SECONDS)
        s.connect(str(sock))
        s.sendall(uwsgi_packet(path))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        return 0, head[:200]
    return int(status_line[1]), body


# --- the stack ------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A running server, and nginx in front of it when the scenario goes through nginx."""

    server: Child
    nginx: Child | None
    # The server's Unix socket (None for a server that speaks HTTP itself: bench/http_socket.py).
    sock: Path | None
    # http://127.0.0.1:PORT when through nginx, or of the server's own HTTP socket.
    base_url: str | None


@contextmanager
def stack(tools: Tools, config: ServerConfig, serving: Serving, run_dir: Path, env: dict[str, str]) -> Iterator[Stack]:
    """The server under test and, if asked, nginx in front of it, both stopped (nginx first) on the way
    out; it yields only once one request answered 200 with the expected body."""
    run_dir.mkdir()
    sock = run_dir / "app.sock"
    server = Child(config.name, server_argv(tools, config, serving, sock), run_dir / "server.log", env=env)
    nginx: Child | None = None
    try:
        wait_listening(server, socket.AF_UNIX, str(sock))
        base_url = None
        if serving.through_nginx:
            nginx, port = start_nginx(tools.nginx, run_dir / "nginx", f"unix:{sock}")
            base_url = f"http://127.0.0.1:{port}"
            where = f"{base_url}{serving.ready_path} through nginx"
        else:
            where = f"{serving.ready_path} on {sock}"
        try:
            if base_url is not None:
                status, body = http_get(f"{base_url}{serving.ready_path}")
            else:
                status, body = uwsgi_get(sock, serving.ready_path)
        except OSError as err:
            raise server.failure(f"did not answer the readiness check {where}: {err}") from None
        if status != 200 or serving.ready_expect not in body:
            raise server.failure(f"answered {status} {body[:200]!r} to the readiness check {where}")
        yield Stack(server, nginx, sock, base_url)
    finally:
        if nginx is not None:
            nginx.stop(signal.SIGTERM)
        server.stop(signal.SIGINT)
