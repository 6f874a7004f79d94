"""oxwsgi against uWSGI, side by side, behind a real nginx: requests per second and server CPU per request.

For every app scenario and every server configuration, one *run* starts the server on a Unix socket and an
nginx in front of it, checks one response, warms up with wrk, then runs `wrk -t1 -c16` through nginx while
the CPU time of the server's whole process tree (master and workers) is read from /proc before and after.
Configurations alternate in rounds (A B C, A B C, ...) so that the machine's noise falls on all of them
alike; the report gives per scenario the median of each configuration and the ratios against uWSGI.

A run with non-2xx responses, socket errors, a server process that died or was replaced, or a /metrics
endpoint that does not answer is invalid: it is reported loudly, left out of the medians, and the script
exits with status 1 at the end. bench/README.md explains the method and how to read the output.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "apps"
NGINX_TEMPLATE = REPO / "bench" / "nginx.conf.template"
RESULTS = REPO / "bench" / "results" / "latest.md"

# Default length of one measured wrk run: long enough that the 10 ms resolution of /proc CPU times
# (one clock tick) is far below 1% of the server's CPU time, short enough for 3 rounds in a few minutes.
DEFAULT_DURATION_SECONDS = 10
# Default number of rounds: the median of three survives one run spoiled by a neighbour's burst.
DEFAULT_ROUNDS = 3
# wrk load before each measured run: fills CPU caches, lets the CPU clock settle and runs Flask's
# first-request paths, none of which belong in the measurement.
WARMUP_SECONDS = 3
# One wrk thread and 16 connections: on a 2-core machine that shares the cores between wrk, nginx and
# the server; 16 in flight keeps the single worker busy without queueing past uWSGI's listen backlog (100).
WRK_THREADS = 1
WRK_CONNECTIONS = 16
# wrk gives up on a run this long after its duration (it only overruns if something hangs).
WRK_OVERRUN_SECONDS = 30
# Bounded polling for "is it listening yet": loading Flask on a busy machine takes a second or two.
READY_TIMEOUT_SECONDS = 30
READY_INTERVAL_SECONDS = 0.05
# The first request through nginx (the readiness check) and the /metrics scrape give up after this.
HTTP_TIMEOUT_SECONDS = 30
# How long a server or nginx gets to exit after it was told to stop; then its process group is killed.
STOP_GRACE_SECONDS = 10
# Log lines shown when a server or nginx fails.
LOG_TAIL_LINES = 30
# Port collisions between picking a free port and nginx binding it are retried this often.
NGINX_START_ATTEMPTS = 3

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
MICROSECONDS = 1_000_000


class BenchError(Exception):
    """A failure that stops the whole benchmark (missing tool, a server that does not start)."""


# --- what is measured -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One app and the request wrk sends it."""

    name: str
    wsgi_file: Path
    path: str
    # A piece of the body the readiness check expects, so a wrong app or route fails before any load.
    expect: bytes


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration; `kind` is "uwsgi" or "oxwsgi"."""

    name: str
    kind: str
    metrics: bool = False


SCENARIOS = (
    Scenario("hello", APPS / "hello.py", "/", b"Hello, World!"),
    Scenario("flask-json", APPS / "flask_app.py", "/args?name=bench&page=1", b'"bench"'),
)
UWSGI = ServerConfig("uWSGI", "uwsgi")
OXWSGI = ServerConfig("oxwsgi", "oxwsgi")
OXWSGI_METRICS = ServerConfig("oxwsgi + metrics", "oxwsgi", metrics=True)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    non_2xx: int
    socket_errors: int


@dataclass
class CpuSeconds:
    """CPU time spent during the measured run, split by who spent it. Only `server` is the measurement;
    the rest tells how busy the machine was around it."""

    server: float = 0.0
    nginx: float = 0.0
    wrk: float = 0.0
    # Every non-idle second of the machine (all cores), and the part the hypervisor gave to other guests.
    machine: float = 0.0
    steal: float = 0.0

    @property
    def others(self) -> float:
        """Processes that are not part of the benchmark (another build, a test suite)."""
        return max(0.0, self.machine - self.server - self.nginx - self.wrk)


@dataclass
class RunResult:
    scenario: Scenario
    config: ServerConfig
    round: int
    wrk: WrkResult | None = None
    cpu: CpuSeconds = field(default_factory=CpuSeconds)
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.wrk is not None and self.wrk.requests > 0 and not self.problems

    def per_request_us(self, seconds: float) -> float:
        assert self.wrk is not None and self.wrk.requests > 0
        return seconds * MICROSECONDS / self.wrk.requests

    @property
    def cpu_us_per_request(self) -> float:
        return self.per_request_us(self.cpu.server)

    @property
    def nginx_us_per_request(self) -> float:
        return self.per_request_us(self.cpu.nginx)


@dataclass(frozen=True)
class Tools:
    """The binaries a run needs, found once at start-up, and the length of a measured run."""

    oxwsgi: Path
    uwsgi: Path
    nginx: Path
    wrk: Path
    duration: int


# --- child processes --------------------------------------------------------------------------------


class Child:
    """A child process in a session (and process group) of its own, with its output in one log file.

    Its own session keeps a Ctrl-C in the terminal away from it: this script decides the order of the
    teardown, and `stop` kills whatever is left of the group, so no worker outlives its master."""

    live: ClassVar[set[Child]] = set()

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log_path.parent,
                start_new_session=True,
            )
        Child.live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"

    def failure(self, what: str) -> BenchError:
        return BenchError(f"{self.name} {what}\ncommand: {' '.join(self.argv)}\n--- log ---\n{self.log_tail()}")

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        """`sig`, a bounded wait, then SIGKILL to the whole process group; also reaps leftovers."""
        timed_out = False
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                timed_out = True
                print(f"!!! {self.name} (pid {self.pid}) did not stop within {STOP_GRACE_SECONDS}s: killing it")
        if kill_group(self.pid) and not timed_out:
            print(f"!!! {self.name} (pid {self.pid}) left processes behind after it exited: killed them")
        self.popen.wait()
        Child.live.discard(self)

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.live):
            child.stop()


def kill_group(pgid: int) -> bool:
    """SIGKILL to every process still in the group; True if there was any."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def raise_interrupt(signum: int, _frame: object) -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the benchmark through the `finally` that stops everything."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


# --- CPU time of a process tree, from /proc ---------------------------------------------------------


def read_proc_stat(pid: str) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks) of one process, or None if it is gone.

    /proc/PID/stat: `pid (comm) state ppid ... utime stime ...`, utime and stime being fields 14 and 15;
    comm may contain spaces and parentheses, so the fields are counted from the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_cpu_ticks(root: int) -> dict[int, int]:
    """utime + stime (clock ticks, all threads) of `root` and each of its descendants, by pid."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := read_proc_stat(p)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = stats[pid][1]
            todo.extend(children.get(pid, []))
    return tree


def machine_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of all cores since boot, from the first line of /proc/stat:
    `cpu user nice system idle iowait irq softirq steal guest guest_nice` (guest is inside user)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal, steal


def children_cpu_seconds() -> float:
    """utime + stime of this script's reaped children: wrk's, once it has been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuSample:
    """Every CPU counter the benchmark reads, at one moment."""

    server: dict[int, int]
    nginx: dict[int, int]
    machine: tuple[int, int]
    children: float

    @classmethod
    def take(cls, server_pid: int, nginx_pid: int) -> CpuSample:
        return cls(tree_cpu_ticks(server_pid), tree_cpu_ticks(nginx_pid), machine_ticks(), children_cpu_seconds())

    def until(self, later: CpuSample) -> CpuSeconds:
        def seconds(ticks: int) -> float:
            return ticks / CLOCK_TICKS_PER_SECOND

        return CpuSeconds(
            server=seconds(sum(later.server.values()) - sum(self.server.values())),
            nginx=seconds(sum(later.nginx.values()) - sum(self.nginx.values())),
            wrk=later.children - self.children,
            machine=seconds(later.machine[0] - self.machine[0]),
            steal=seconds(later.machine[1] - self.machine[1]),
        )


# --- the stack: a server and nginx in front of it ---------------------------------------------------


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def can_connect(family: socket.AddressFamily, address: str | tuple[str, int]) -> bool:
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


def wait_listening(child: Child, family: socket.AddressFamily, address: str | tuple[str, int]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not child.alive():
            raise child.failure(f"exited with status {child.popen.returncode} before listening on {address}")
        if can_connect(family, address):
            return
        time.sleep(READY_INTERVAL_SECONDS)
    raise child.failure(f"did not listen on {address} within {READY_TIMEOUT_SECONDS}s")


def server_env() -> dict[str, str]:
    """The environment of both servers: none of the caller's OXWSGI_*/UWSGI_* settings (OXWSGI_METRICS
    would turn metrics on in the metrics-off configuration), and no __pycache__ written into tests/apps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OXWSGI_", "UWSGI_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def server_argv(tools: Tools, config: ServerConfig, scenario: Scenario, sock: Path, metrics_port: int) -> list[str]:
    """The same shape for both servers: a master and one single-threaded worker, no request log."""
    shape = ["--master", "--processes", "1", "--threads", "1", "--disable-logging"]
    app = ["--wsgi-file", str(scenario.wsgi_file), "--callable", "application"]
    if config.kind == "uwsgi":
        # --die-on-term: uWSGI 2.0 reloads on SIGTERM; --need-app: exit if the app fails to load.
        extra = ["--chmod-socket=666", "--die-on-term", "--need-app"]
        return [str(tools.uwsgi), "--socket", str(sock), *shape, *extra, *app]
    extra = ["--chmod-socket", "666"]
    if config.metrics:
        extra += ["--metrics", f"127.0.0.1:{metrics_port}"]
    return [str(tools.oxwsgi), "--socket", str(sock), *shape, *extra, *app]


def start_nginx(tools: Tools, prefix: Path, upstream: str) -> tuple[Child, int]:
    """Renders the template with a free port and starts nginx; retries if the port was taken meanwhile."""
    prefix.mkdir()
    template = NGINX_TEMPLATE.read_text()
    for attempt in range(1, NGINX_START_ATTEMPTS + 1):
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            template.replace("{{PREFIX}}", str(prefix))
            .replace("{{HTTP_PORT}}", str(port))
            .replace("{{UPSTREAM}}", upstream)
        )
        argv = [str(tools.nginx), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
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


@dataclass
class Stack:
    server: Child
    nginx: Child
    url: str
    metrics_url: str | None


@contextmanager
def stack(tools: Tools, config: ServerConfig, scenario: Scenario, run_dir: Path) -> Iterator[Stack]:
    """The server under test and nginx in front of it, both stopped (nginx first) on the way out."""
    run_dir.mkdir()
    sock = run_dir / "app.sock"
    metrics_port = free_port()
    argv = server_argv(tools, config, scenario, sock, metrics_port)
    server = Child(config.name, argv, run_dir / "server.log", env=server_env())
    nginx: Child | None = None
    try:
        wait_listening(server, socket.AF_UNIX, str(sock))
        nginx, port = start_nginx(tools, run_dir / "nginx", f"unix:{sock}")
        url = f"http://127.0.0.1:{port}{scenario.path}"
        try:
            status, body = http_get(url)
        except OSError as err:
            raise server.failure(f"did not answer the readiness check {url} through nginx: {err}") from None
        if status != 200 or scenario.expect not in body:
            raise server.failure(f"answered {status} {body[:200]!r} to the readiness check {url}")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if config.metrics else None
        yield Stack(server, nginx, url, metrics_url)
    finally:
        if nginx is not None:
            nginx.stop(signal.SIGTERM)
        server.stop(signal.SIGINT)


# --- wrk --------------------------------------------------------------------------------------------

WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
WRK_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
SECONDS_PER_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(output: str) -> WrkResult:
    total, rate = WRK_TOTAL.search(output), WRK_RATE.search(output)
    if total is None or rate is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    non_2xx = WRK_NON_2XX.search(output)
    errors = WRK_SOCKET_ERRORS.search(output)
    return WrkResult(
        requests=int(total[1]),
        seconds=float(total[2]) * SECONDS_PER_UNIT[total[3]],
        requests_per_second=float(rate[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def run_wrk(tools: Tools, url: str, seconds: int, log_path: Path) -> WrkResult:
    argv = [str(tools.wrk), f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", url]
    wrk = Child("wrk", argv, log_path)
    try:
        wrk.popen.wait(timeout=seconds + WRK_OVERRUN_SECONDS)
    except subprocess.TimeoutExpired:
        raise wrk.failure(f"did not finish within {seconds + WRK_OVERRUN_SECONDS}s") from None
    finally:
        wrk.stop(signal.SIGTERM)
    if wrk.popen.returncode != 0:
        raise wrk.failure(f"exited with status {wrk.popen.returncode}")
    return parse_wrk(log_path.read_text(errors="replace"))


# --- one run ----------------------------------------------------------------------------------------


def wrk_problems(result: WrkResult) -> list[str]:
    problems = []
    if result.non_2xx:
        problems.append(f"{result.non_2xx} non-2xx/3xx responses")
    if result.socket_errors:
        problems.append(f"{result.socket_errors} socket errors")
    if result.requests == 0:
        problems.append("no request completed")
    return problems


def metrics_problems(url: str) -> list[str]:
    """The metrics-on configuration counts only if its endpoint really serves (scraped after the
    measurement, so the scrape is not in it)."""
    try:
        status, body = http_get(url)
    except OSError as err:
        return [f"/metrics did not answer: {err}"]
    if status != 200 or not body:
        return [f"/metrics answered {status} with {len(body)} bytes"]
    return []


def measure(tools: Tools, config: ServerConfig, scenario: Scenario, round_no: int, run_dir: Path) -> RunResult:
    result = RunResult(scenario, config, round_no)
    with stack(tools, config, scenario, run_dir) as s:
        warmup = run_wrk(tools, s.url, WARMUP_SECONDS, run_dir / "wrk-warmup.out")
        result.problems += [f"warm-up: {p}" for p in wrk_problems(warmup)]
        before = CpuSample.take(s.server.pid, s.nginx.pid)
        result.wrk = run_wrk(tools, s.url, tools.duration, run_dir / "wrk.out")
        after = CpuSample.take(s.server.pid, s.nginx.pid)
        result.problems += wrk_problems(result.wrk)
        if set(before.server) != set(after.server):
            # A worker that died and was replaced took its CPU time with it.
            result.problems.append(f"server processes changed: {sorted(before.server)} -> {sorted(after.server)}")
        result.cpu = before.until(after)
        if s.metrics_url is not None:
            result.problems += metrics_problems(s.metrics_url)
    return result


def describe(result: RunResult) -> str:
    """One line per run: the measurement, then where the machine's cores went meanwhile (in cores)."""
    head = f"round {result.round} {result.scenario.name:<10} {result.config.name:<17}"
    if result.wrk is None or result.wrk.requests == 0:
        return f"{head} no request completed\n!!! INVALID RUN: " + "; ".join(result.problems)
    cores = {
        "server": result.cpu.server,
        "nginx": result.cpu.nginx,
        "wrk": result.cpu.wrk,
        "others": result.cpu.others,
        "steal": result.cpu.steal,
    }
    line = (
        f"{head} {result.wrk.requests_per_second:9,.0f} req/s {result.cpu_us_per_request:7.1f} µs/req "
        f"(nginx {result.nginx_us_per_request:5.1f})  cores: "
        + " ".join(f"{who} {seconds / result.wrk.seconds:.2f}" for who, seconds in cores.items())
    )
    if result.problems:
        line += "\n!!! INVALID RUN: " + "; ".join(result.problems)
    return line


def invalid_details(run_dir: Path) -> str:
    """wrk's output and the server's log tail, printed under an invalid run."""
    parts = []
    for name in ("wrk.out", "server.log", "nginx/error.log"):
        path = run_dir / name
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- {name} ---\n" + "\n".join(lines))
    return "\n".join(parts)


# --- set-up: tools, configurations, versions --------------------------------------------------------


def require_executable(path: Path | str | None, what: str, hint: str) -> Path:
    if path is None or not os.access(path, os.X_OK) or not Path(path).is_file():
        raise BenchError(f"{what} not found ({path}); {hint}")
    return Path(path)


def find_tools(oxwsgi: Path, duration: int, workdir: Path) -> Tools:
    """Every binary, checked before anything starts. The oxwsgi binary is copied into `workdir`, so a
    rebuild during the benchmark cannot mix two builds in one report."""
    setup_hint = "run bench/run.sh, which installs it"
    original = require_executable(oxwsgi, "the oxwsgi binary", "build it with `bash scripts/setup.sh`")
    snapshot = workdir / "oxwsgi"
    shutil.copy2(original, snapshot)
    # pyuwsgi installs its `uwsgi` console script next to this interpreter's other scripts.
    uwsgi = Path(sysconfig.get_path("scripts")) / "uwsgi"
    return Tools(
        oxwsgi=snapshot,
        uwsgi=require_executable(uwsgi, "uWSGI (pyuwsgi's `uwsgi` script)", setup_hint),
        nginx=require_executable(shutil.which("nginx") or "/usr/sbin/nginx", "nginx", setup_hint),
        wrk=require_executable(shutil.which("wrk"), "wrk", setup_hint),
        duration=duration,
    )


def command_output(argv: list[str]) -> str:
    """stdout and stderr of a short command (nginx prints its version on stderr)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


def has_metrics_flag(oxwsgi: Path) -> bool:
    return "--metrics" in command_output([str(oxwsgi), "--help"])


# What the binary is built from: a file here newer than the binary means it may not match the commit.
SOURCES = ("src", "proto/src", "Cargo.toml", "Cargo.lock", "build.rs")


def newest_source_mtime() -> float:
    paths = [REPO / source for source in SOURCES]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return max((f.stat().st_mtime for f in files), default=0.0)


def oxwsgi_version(original: Path) -> str:
    """The commit, and whether the binary can be trusted to be built from it."""
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", *SOURCES])
    built_at = original.stat().st_mtime
    built = datetime.datetime.fromtimestamp(built_at).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    state = " + uncommitted changes" if dirty else ""
    stale = "; sources changed after this build" if newest_source_mtime() > built_at else ""
    return f"commit {commit}{state} (binary built {built}{stale})"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def environment(tools: Tools, original_oxwsgi: Path) -> list[tuple[str, str]]:
    """What the numbers depend on, for the report's header."""
    return [
        ("Date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("Machine", f"{os.cpu_count()} cores ({cpu_model()}), Linux {platform.release()}, shared"),
        ("Load average at start", " ".join(Path("/proc/loadavg").read_text().split()[:3])),
        ("oxwsgi", f"{command_output([str(tools.oxwsgi), '--version'])}, {oxwsgi_version(original_oxwsgi)}"),
        ("uWSGI", f"{command_output([str(tools.uwsgi), '--version'])} (pyuwsgi {metadata.version('pyuwsgi')})"),
        ("nginx", command_output([str(tools.nginx), "-v"]).removeprefix("nginx version: ")),
        ("Python", f"{platform.python_version()}, Flask {metadata.version('flask')}"),
        ("wrk", command_output([str(tools.wrk), "-v"]).splitlines()[0].split(" [")[0]),
    ]


# --- the report -------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "—"


def with_spread(values: list[float], digits: int) -> str:
    """The median, and half the range of the values as a percentage of it: the noise between rounds,
    against which a ratio is to be read."""
    middle = median(values)
    if middle is None:
        return "—"
    text = f"{middle:,.{digits}f}"
    if len(values) > 1 and middle:
        text += f" ±{(max(values) - min(values)) / 2 / middle:.0%}"
    return text


@dataclass
class Summary:
    """The valid runs of one configuration in one scenario."""

    config: ServerConfig
    runs: list[RunResult]

    @property
    def valid(self) -> list[RunResult]:
        return [r for r in self.runs if r.valid]

    @property
    def rps_values(self) -> list[float]:
        return [r.wrk.requests_per_second for r in self.valid if r.wrk]

    @property
    def cpu_values(self) -> list[float]:
        return [r.cpu_us_per_request for r in self.valid]

    @property
    def rps(self) -> float | None:
        return median(self.rps_values)

    @property
    def cpu(self) -> float | None:
        return median(self.cpu_values)

    @property
    def nginx(self) -> float | None:
        return median([r.nginx_us_per_request for r in self.valid])


def scenario_table(scenario: Scenario, configs: list[ServerConfig], results: list[RunResult]) -> list[str]:
    summaries = [Summary(c, [r for r in results if r.scenario == scenario and r.config == c]) for c in configs]
    base = summaries[0]
    lines = [
        f"### {scenario.name}: `{scenario.wsgi_file.relative_to(REPO)}`, `GET {scenario.path}`",
        "",
        "| Server | req/s | CPU µs/req | req/s ÷ uWSGI | CPU/req ÷ uWSGI | nginx µs/req | valid runs "
        "| req/s, each run | CPU µs/req, each run |",
        "|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for s in summaries:
        each_rps = ", ".join(f"{r.wrk.requests_per_second:,.0f}" if r.wrk else "—" for r in s.runs)
        each_cpu = ", ".join(f"{r.cpu_us_per_request:.1f}" if r.valid else "invalid" for r in s.runs)
        nginx = "—" if s.nginx is None else f"{s.nginx:.1f}"
        lines.append(
            f"| {s.config.name} | {with_spread(s.rps_values, 0)} | {with_spread(s.cpu_values, 1)} "
            f"| {ratio(s.rps, base.rps)} | {ratio(s.cpu, base.cpu)} | {nginx} | {len(s.valid)}/{len(s.runs)} "
            f"| {each_rps} | {each_cpu} |"
        )
    by_name = {s.config.name: s for s in summaries}
    on, off = by_name.get(OXWSGI_METRICS.name), by_name.get(OXWSGI.name)
    if on is not None and off is not None:
        lines += ["", f"Metrics on ÷ off: req/s {ratio(on.rps, off.rps)}, CPU/req {ratio(on.cpu, off.cpu)}."]
    return [*lines, ""]


def render(env: list[tuple[str, str]], plan: Plan, results: list[RunResult]) -> str:
    wrk = f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{plan.duration}s"
    lines = ["## oxwsgi and uWSGI behind nginx", ""]
    lines += [f"- {key}: {value}" for key, value in env]
    lines += [
        f"- Method: {plan.rounds} rounds of {', '.join(c.name for c in plan.configs)} in turn; "
        "each run starts the server (master + 1 worker, 1 thread, no request log) and nginx "
        f"(1 worker, no access log), warms up for {WARMUP_SECONDS}s, then `{wrk}` through nginx. "
        "CPU = utime + stime of the server's process tree from /proc, over the measured run, "
        "divided by the requests wrk completed. Medians over valid runs, ± half their range; ratios of "
        "medians are oxwsgi ÷ uWSGI (req/s: higher is better; CPU/req: lower is better).",
    ]
    lines += [f"- Note: {note}" for note in plan.notes]
    lines.append("")
    for scenario in SCENARIOS:
        lines += scenario_table(scenario, plan.configs, results)
    lines += [
        "Each run in order: req/s, server CPU µs/req (nginx's), and the cores used meanwhile by the server, "
        "nginx, wrk, other processes and the hypervisor's steal:",
        "",
        "```",
        *(describe(r) for r in results),
        "```",
        "",
    ]
    invalid = [r for r in results if not r.valid]
    if invalid:
        lines.append(f"**{len(invalid)} INVALID RUN(S)**, left out of the medians:")
        lines += [f"- round {r.round}, {r.scenario.name}, {r.config.name}: {'; '.join(r.problems)}" for r in invalid]
        lines.append("")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds of all configurations")
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION_SECONDS, help="seconds per measured run")
    parser.add_argument(
        "--oxwsgi",
        type=Path,
        default=Path(os.environ.get("OXWSGI_BIN") or REPO / "target" / "release" / "oxwsgi"),
        help="the oxwsgi binary (default: $OXWSGI_BIN or target/release/oxwsgi)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")
    return args


@dataclass(frozen=True)
class Plan:
    """What the benchmark runs: the configurations in their order, and how many rounds of how long."""

    configs: list[ServerConfig]
    rounds: int
    duration: int
    # Anything the report must say about what was left out.
    notes: list[str]


def make_plan(tools: Tools, rounds: int) -> Plan:
    """uWSGI first (the baseline of the ratios); metrics on only if this oxwsgi build has the flag."""
    if has_metrics_flag(tools.oxwsgi):
        return Plan([UWSGI, OXWSGI, OXWSGI_METRICS], rounds, tools.duration, [])
    note = "this oxwsgi binary has no --metrics flag: the metrics-on configuration was skipped"
    print(f"!!! {note}")
    return Plan([UWSGI, OXWSGI], rounds, tools.duration, [note])


def run_rounds(tools: Tools, plan: Plan, workdir: Path) -> list[RunResult]:
    """ABCABC...: every round runs every scenario under every configuration, in the same order."""
    results = []
    for round_no in range(1, plan.rounds + 1):
        for i, scenario in enumerate(SCENARIOS):
            for j, config in enumerate(plan.configs):
                run_dir = workdir / f"run-{round_no}-{i}-{j}"
                result = measure(tools, config, scenario, round_no, run_dir)
                print(describe(result), flush=True)
                if not result.valid:
                    print(invalid_details(run_dir), flush=True)
                results.append(result)
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGINT explicitly too: a shell starting this in the background leaves SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="oxwsgi-bench.", dir="/tmp"))  # short: Unix socket paths
    try:
        tools = find_tools(args.oxwsgi, args.duration, workdir)
        plan = make_plan(tools, args.rounds)
        env = environment(tools, args.oxwsgi)
        print("\n".join(f"{key}: {value}" for key, value in env), flush=True)
        results = run_rounds(tools, plan, workdir)
        env.insert(3, ("Load average at end", " ".join(Path("/proc/loadavg").read_text().split()[:3])))
        report = render(env, plan, results)
        print("\n" + report)
        RESULTS.write_text(report)
        print(f"written to {RESULTS.relative_to(REPO)}")
        if any(not r.valid for r in results):
            print("!!! some runs were INVALID (see above): exit status 1", file=sys.stderr)
            return 1
        return 0
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"bench: interrupted ({err or 'Ctrl-C'}); stopping everything", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the teardown short and leave servers behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        Child.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
