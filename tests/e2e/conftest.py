"""Fixtures for the end-to-end tests: the real oxwsgi binary behind a real nginx, spoken to over HTTP.

A *stack* is one oxwsgi process (serving one app on a Unix socket or a loopback TCP port) plus one nginx
rendered from nginx/test.conf.template that `uwsgi_pass`es to it. Test modules start their stacks with
module-scoped fixtures, so each app is loaded once per module, not once per test.

Without nginx the tests that need it are skipped with a loud reason, except under CI=true (or
OXWSGI_E2E_STRICT=1, which scripts/test.sh sets), where a missing nginx is a failure: scripts/setup.sh
installs it. The binary is never optional: a missing build fails the tests that need it.

Nothing here asserts durations. Every wait is a bounded poll that fails with the server's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "apps"
NGINX_TEMPLATE = REPO / "nginx" / "test.conf.template"

# Bounded polling for "is it listening yet": loading Django or httpbin on a slow machine takes seconds.
READY_TRIES = 600
READY_INTERVAL = 0.05
# How long a stopped process gets to exit after SIGTERM (oxwsgi finishes in-flight requests first).
STOP_GRACE_SECONDS = 35
# Lines of each log attached to a failure report.
LOG_TAIL_LINES = 60
# Every HTTP request of the tests gives up after this long, so a hung server fails instead of hanging.
HTTP_TIMEOUT = 60


def in_ci() -> bool:
    """CI=true, or OXWSGI_E2E_STRICT=1 (scripts/test.sh sets it: it has just installed nginx, so a
    missing one is an error there too)."""
    truthy = ("1", "true", "yes")
    return (
        os.environ.get("CI", "").lower() in truthy
        or os.environ.get("OXWSGI_E2E_STRICT", "").lower() in truthy
    )


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_connect(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


@dataclass
class Process:
    """A child process whose stdout and stderr go to one log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_listening(self, address: str | tuple[str, int]) -> None:
        """Polls a connect to `address` until it succeeds; fails with the log if the process exits first
        or the bound runs out."""
        assert self.popen is not None
        for _ in range(READY_TRIES):
            code = self.popen.poll()
            if code is not None:
                pytest.fail(
                    f"{self.name} exited with status {code} before listening on {address}\n"
                    f"command: {' '.join(self.argv)}\n--- {self.log_path} ---\n{self.log()}",
                    pytrace=False,
                )
            if can_connect(address):
                return
            time.sleep(READY_INTERVAL)
        pytest.fail(
            f"{self.name} did not listen on {address} after {READY_TRIES} tries\n"
            f"--- {self.log_path} ---\n{tail(self.log_path)}",
            pytrace=False,
        )

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL. Returns the exit status (None if it was killed)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                return None
        return self.popen.returncode


@dataclass
class Stack:
    """oxwsgi serving one app, and nginx in front of it on 127.0.0.1:`http_port`."""

    oxwsgi: Process
    nginx: Process | None = None
    http_port: int = 0
    upstream: str = ""
    socket_path: Path | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def oxwsgi_log(self) -> str:
        return self.oxwsgi.log()

    def report(self) -> str:
        """The tails of both logs, for failure reports."""
        parts = [f"--- oxwsgi log ({self.oxwsgi.log_path}) ---\n{tail(self.oxwsgi.log_path)}"]
        if self.nginx is not None:
            error_log = self.nginx.log_path.parent / "error.log"
            parts.append(f"--- nginx error log ({error_log}) ---\n{tail(error_log)}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.oxwsgi.stop()
        if self.socket_path is not None:
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)


class Launcher:
    """Starts stacks, each in a fresh temporary directory; the fixture that starts one stops it."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, oxwsgi_bin: Path):
        self.tmp_path_factory = tmp_path_factory
        self.oxwsgi_bin = oxwsgi_bin

    def oxwsgi_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("OXWSGI_LOG", None)  # the tests read the default (info) log
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in tests/apps
        return env

    def start(self, app_args: list[str], *, upstream: str = "unix", extra_args: Sequence[str] = ()) -> Stack:
        """oxwsgi with `app_args` on a Unix socket ("unix") or a loopback port ("tcp"), then nginx."""
        nginx_bin = find_nginx()  # skips or fails before anything is started
        workdir = self.tmp_path_factory.mktemp("stack")
        stack = self.start_oxwsgi(app_args, workdir, upstream=upstream, extra_args=extra_args)
        try:
            self.start_nginx(stack, nginx_bin, workdir / "nginx")
        except BaseException:
            stack.stop()
            raise
        return stack

    def start_oxwsgi(
        self, app_args: list[str], workdir: Path, *, upstream: str, extra_args: Sequence[str] = ()
    ) -> Stack:
        if upstream == "unix":
            # Unix socket paths are limited to ~107 bytes; pytest's temp dirs can be long, so the
            # socket goes in a short directory of its own.
            socket_dir = Path(tempfile.mkdtemp(prefix="oxwsgi-e2e.", dir="/tmp"))
            socket_path = socket_dir / "app.sock"
            listen, address, nginx_upstream = str(socket_path), str(socket_path), f"unix:{socket_path}"
        elif upstream == "tcp":
            port = free_port()
            socket_path = None
            listen = nginx_upstream = f"127.0.0.1:{port}"
            address = ("127.0.0.1", port)
        else:
            raise ValueError(f"unknown upstream kind {upstream!r}")
        argv = [str(self.oxwsgi_bin), "--socket", listen, *app_args, *extra_args]
        if upstream == "unix":
            # nginx runs as the current user, so the default mode would do; 666 is what the example uses.
            argv += ["--chmod-socket", "666"]
        process = Process("oxwsgi", argv, workdir / "oxwsgi.log", env=self.oxwsgi_env())
        process.start()
        stack = Stack(oxwsgi=process, upstream=nginx_upstream, socket_path=socket_path)
        try:
            process.wait_listening(address)
        except BaseException:
            stack.stop()
            raise
        return stack

    def start_nginx(self, stack: Stack, nginx_bin: str, prefix: Path) -> None:
        """Renders the template with a free port and starts nginx; retries with another port if the one
        picked was taken in between."""
        prefix.mkdir()
        template = NGINX_TEMPLATE.read_text()
        for attempt in range(3):
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(
                template.replace("{{PREFIX}}", str(prefix))
                .replace("{{HTTP_PORT}}", str(port))
                .replace("{{UPSTREAM}}", stack.upstream)
            )
            process = Process(
                "nginx",
                [nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                prefix / "nginx.out",
            )
            stack.nginx, stack.http_port = process, port
            process.start()
            try:
                process.wait_listening(("127.0.0.1", port))
                return
            except pytest.fail.Exception:
                error_log = tail(prefix / "error.log")
                process.stop()
                if "Address already in use" in error_log and attempt < 2:
                    continue
                raise


def find_nginx() -> str:
    """The nginx binary, or a skip (a failure under CI=true) with a loud reason."""
    # NGINX_BIN, when set, is the only candidate (also a way to check this very fallback).
    explicit = os.environ.get("NGINX_BIN")
    candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    reason = (
        f"nginx is not installed (looked for {', '.join(c for c in candidates if c)}), so the "
        "end-to-end tests through nginx cannot run. Install it with `bash scripts/setup.sh` "
        "(or `apt-get install nginx-light`), or set NGINX_BIN."
    )
    if in_ci():
        pytest.fail(f"strict mode (CI=true or OXWSGI_E2E_STRICT=1): {reason}", pytrace=False)
    pytest.skip(f"!!! SKIPPED: {reason}")


@pytest.fixture(scope="session")
def oxwsgi_bin() -> Path:
    path = Path(os.environ.get("OXWSGI_BIN") or REPO / "target" / "release" / "oxwsgi")
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"the oxwsgi binary {path} does not exist; build it with `cargo build --release` "
            "(or `bash scripts/setup.sh`), or point OXWSGI_BIN at one",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def launcher(tmp_path_factory, oxwsgi_bin) -> Launcher:
    return Launcher(tmp_path_factory, oxwsgi_bin)


# --- failure reports carry the logs of the stacks a test used -------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    seen = set()
    for value in getattr(item, "funcargs", {}).values():
        stack = getattr(value, "stack", value)  # fixtures may wrap a Stack
        if isinstance(stack, Stack) and id(stack) not in seen:
            seen.add(id(stack))
            report.sections.append((f"logs of {stack.upstream}", stack.report()))


def require_module(name: str) -> None:
    """Skips (fails under CI=true) when a Python package an app needs is not installed."""
    try:
        __import__(name)
    except ImportError as err:
        reason = f"the Python package {name!r} is not installed ({err}); run `bash scripts/setup.sh`"
        if in_ci():
            pytest.fail(f"strict mode (CI=true or OXWSGI_E2E_STRICT=1): {reason}", pytrace=False)
        pytest.skip(f"!!! SKIPPED: {reason}")
