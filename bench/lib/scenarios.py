"""The traffic shapes (scenarios) and how one run of each is measured.

Every run starts fresh processes (`servers.stack`), warms up, and measures one window: the CPU time of the
server's whole process tree (and nginx's, and the load generator's) is read before and after it, and the
run is invalid if the set of server processes changed meanwhile (a worker died and took its CPU time
with it) or the load generator saw wrong answers. What differs between scenarios is the load inside the
window (`KIND_*` below) and what else is read around it (memory, peak RSS, system calls)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .load import DirectLoad, LoadResult, SequentialLoad, Strace, run_uwsgi_load, run_wrk, sequential_http
from .proc_stats import CpuSample, reset_peak_rss, status_kib, tree_memory, tree_pids, worker_pids
from .procs import BenchError
from .results import (
    CPU_MS,
    CPU_US,
    GOOD_RPS,
    IDLE_OPEN,
    IDLE_REPLACED,
    LATENCY_P99,
    MASTER_RSS,
    NGINX_MS,
    NGINX_US,
    REQUESTS_PER_SECOND,
    RSS_GROWTH,
    RSS_RETAINED,
    SECONDS_PER_REQUEST,
    SOCKET_ERRORS,
    SYSCALLS,
    TIMEOUTS,
    TREE_PSS,
    WORKER_RSS,
    Metric,
    RssGrowth,
    RunResult,
)
from .servers import FLOOR, OXWSGI, UWSGI, ServerConfig, Serving, Shape, Stack, stack
from .tools import Tools

REPO = Path(__file__).resolve().parents[2]
TEST_APPS = REPO / "tests" / "apps"
SHAPES_APP = REPO / "bench" / "apps" / "shapes.py"

MIB = 1024 * 1024
# Through nginx, wrk keeps 32 requests in flight: enough to keep 8 threads (sleep-10ms) or 2 processes
# busy and a queue in front of them, well inside the 1024 backlog. Large responses use 8, so that 8 MiB
# each stays a moderate amount of data in flight on a 2-core machine.
WRK_CONNECTIONS = 32
WRK_CONNECTIONS_LARGE = 8
# Straight to the socket, uwsgi_load keeps 16 in flight (the previous benchmark's wrk -c16).
DIRECT_CONNECTIONS = 16
# idle-1500: silent connections held open beside the real ones: more than the listen backlog (1024), so
# a server that leaves them in the backlog turns real requests away, one that accepts them does not.
IDLE_CONNECTIONS = 1500
# syscalls: a fixed number of requests under strace, over few connections (ptrace slows every call).
SYSCALL_REQUESTS = 2000
SYSCALL_CONNECTIONS = 4
# upload-100mb and stream-100mb: 100 MiB (1600 chunks of 64 KiB, as bench/apps/shapes.py's STREAM_BYTES),
# in requests one after the other. Each takes 0.1-0.3 s here; /proc counts CPU time in 10 ms ticks, and a
# server may spend under 10 ms on a whole 100 MiB stream (sendfile-like paths), so 20 requests keep that
# rounding to a few percent of the window's CPU time while a run stays a few seconds long.
BIG_BODY_BYTES = 100 * MIB
SEQUENTIAL_REQUESTS = 20
# The file served by file-8mib, created once per benchmark in its temporary directory.
FILE_BYTES = 8 * MIB
FILE_CONTENT_BYTE = b"f"

# How a scenario loads the server: wrk through nginx; uwsgi_load to the socket; the same beside idle
# connections; sequential big requests through nginx; uwsgi_load under strace.
KIND_WRK = "wrk"
KIND_DIRECT = "direct"
KIND_IDLE = "idle"
KIND_SEQUENTIAL = "sequential"
KIND_SYSCALLS = "syscalls"


@dataclass(frozen=True)
class Scenario:
    """One traffic shape: the app and request, how it is served, the load, the servers it compares and
    the metrics it reports."""

    name: str
    # The app and request, for the report's headings.
    title: str
    serving: Serving
    kind: str
    path: str
    configs: tuple[ServerConfig, ...]
    metrics: tuple[Metric, ...]
    connections: int = 0
    sequential: SequentialLoad | None = None
    # The prototypes join this scenario when --designs is given.
    designs: bool = False
    # Memory of every process is read after the window (the "memory" section of the report).
    memory: bool = False


@dataclass(frozen=True)
class Settings:
    """What every run shares: the measured window's length, the warm-up's, the servers' environment."""

    duration: int
    warmup: int
    env: dict[str, str]


def through_nginx(app: Path, shape: Shape, ready: str, expect: bytes) -> Serving:
    return Serving(app, shape, True, ready, expect)


HELLO = TEST_APPS / "hello.py"
HELLO_BODY = b"Hello, World!"
ONE_BY_ONE = Shape(1, 1)
WITH_FLOOR = (UWSGI, OXWSGI, FLOOR)
BOTH = (UWSGI, OXWSGI)
WRK_METRICS = (REQUESTS_PER_SECOND, CPU_US, NGINX_US, LATENCY_P99)
DIRECT_METRICS = (REQUESTS_PER_SECOND, CPU_US, LATENCY_P99)
SEQUENTIAL_METRICS = (CPU_MS, NGINX_MS, RSS_GROWTH, RSS_RETAINED, SECONDS_PER_REQUEST)
# Memory is read in the hello runs; the report shows it as a scenario of its own.
MEMORY_METRICS = (WORKER_RSS, MASTER_RSS, TREE_PSS)
MEMORY = "memory"

SCENARIOS = (
    Scenario(
        "hello",
        "`tests/apps/hello.py`, `GET /`, 1×1, wrk -c32 through nginx",
        through_nginx(HELLO, ONE_BY_ONE, "/", HELLO_BODY),
        KIND_WRK,
        "/",
        WITH_FLOOR,
        WRK_METRICS,
        connections=WRK_CONNECTIONS,
        designs=True,
        memory=True,
    ),
    Scenario(
        "hello-direct",
        f"`tests/apps/hello.py`, `GET /`, 1×1, uwsgi_load --connections {DIRECT_CONNECTIONS} to the socket, no nginx",
        Serving(HELLO, ONE_BY_ONE, False, "/", HELLO_BODY),
        KIND_DIRECT,
        "/",
        WITH_FLOOR,
        DIRECT_METRICS,
        connections=DIRECT_CONNECTIONS,
        designs=True,
    ),
    Scenario(
        "hello-2x4",
        "`tests/apps/hello.py`, `GET /`, 2 processes × 4 threads, wrk -c32 through nginx",
        through_nginx(HELLO, Shape(2, 4), "/", HELLO_BODY),
        KIND_WRK,
        "/",
        BOTH,
        WRK_METRICS,
        connections=WRK_CONNECTIONS,
    ),
    Scenario(
        "flask-json",
        "`tests/apps/flask_app.py`, `GET /args?name=bench&page=1`, 1×1, wrk -c32 through nginx",
        through_nginx(TEST_APPS / "flask_app.py", ONE_BY_ONE, "/args?name=bench&page=1", b'"bench"'),
        KIND_WRK,
        "/args?name=bench&page=1",
        BOTH,
        WRK_METRICS,
        connections=WRK_CONNECTIONS,
    ),
    Scenario(
        "sleep-10ms",
        "`bench/apps/shapes.py`, `GET /sleep` (sleeps 10 ms), 1 process × 8 threads, wrk -c32 through nginx",
        through_nginx(SHAPES_APP, Shape(1, 8), "/sleep", b"slept"),
        KIND_WRK,
        "/sleep",
        BOTH,
        WRK_METRICS,
        connections=WRK_CONNECTIONS,
    ),
    Scenario(
        "bytes-1mib",
        "`bench/apps/shapes.py`, `GET /bytes` (one 1 MiB bytes object), 1×1, wrk -c8 through nginx",
        through_nginx(SHAPES_APP, ONE_BY_ONE, "/bytes", b"xxxxxxxx"),
        KIND_WRK,
        "/bytes",
        BOTH,
        WRK_METRICS,
        connections=WRK_CONNECTIONS_LARGE,
    ),
    Scenario(
        "file-8mib",
        "`bench/apps/shapes.py`, `GET /file` (wsgi.file_wrapper, 8 MiB file), 1×1, wrk -c8 through nginx",
        through_nginx(SHAPES_APP, ONE_BY_ONE, "/file", FILE_CONTENT_BYTE * 8),
        KIND_WRK,
        "/file",
        BOTH,
        WRK_METRICS,
        connections=WRK_CONNECTIONS_LARGE,
    ),
    Scenario(
        "upload-100mb",
        f"`bench/apps/shapes.py`, `POST /upload` of 100 MiB read in 64 KiB reads, 1×1, "
        f"{SEQUENTIAL_REQUESTS} sequential requests through nginx",
        through_nginx(SHAPES_APP, ONE_BY_ONE, "/sleep", b"slept"),
        KIND_SEQUENTIAL,
        "/upload",
        BOTH,
        SEQUENTIAL_METRICS,
        sequential=SequentialLoad("/upload", SEQUENTIAL_REQUESTS, upload_bytes=BIG_BODY_BYTES),
    ),
    Scenario(
        "stream-100mb",
        f"`bench/apps/shapes.py`, `GET /stream`: a generator of 100 MiB in 64 KiB chunks, 1×1, "
        f"{SEQUENTIAL_REQUESTS} sequential requests through nginx",
        through_nginx(SHAPES_APP, ONE_BY_ONE, "/sleep", b"slept"),
        KIND_SEQUENTIAL,
        "/stream",
        BOTH,
        SEQUENTIAL_METRICS,
        sequential=SequentialLoad("/stream", SEQUENTIAL_REQUESTS, download_bytes=BIG_BODY_BYTES),
    ),
    Scenario(
        "idle-1500",
        f"`tests/apps/hello.py`, `GET /`, 1×1, uwsgi_load --connections {DIRECT_CONNECTIONS} "
        f"--idle {IDLE_CONNECTIONS} to the socket, no nginx",
        Serving(HELLO, ONE_BY_ONE, False, "/", HELLO_BODY),
        KIND_IDLE,
        "/",
        BOTH,
        (GOOD_RPS, TIMEOUTS, SOCKET_ERRORS, IDLE_OPEN, IDLE_REPLACED),
        connections=DIRECT_CONNECTIONS,
    ),
    Scenario(
        "syscalls",
        f"`tests/apps/hello.py`, `GET /`, 1×1, strace -c -f of every process while uwsgi_load "
        f"--requests {SYSCALL_REQUESTS} --connections {SYSCALL_CONNECTIONS} runs to the socket",
        Serving(HELLO, ONE_BY_ONE, False, "/", HELLO_BODY),
        KIND_SYSCALLS,
        "/",
        WITH_FLOOR,
        (SYSCALLS,),
        connections=SYSCALL_CONNECTIONS,
        designs=True,
    ),
)
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


def create_shapes_file(path: Path) -> None:
    """The 8 MiB file of file-8mib, written once per benchmark."""
    path.write_bytes(FILE_CONTENT_BYTE * FILE_BYTES)


# --- one run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run in progress: what it measures, the stack it measures, where its result and logs go."""

    tools: Tools
    settings: Settings
    scenario: Scenario
    stack: Stack
    result: RunResult
    dir: Path


# What starts a run's processes and yields them once they answer (`servers.stack`, or another server
# family's: bench/http_socket.py): tools, configuration, serving, the run's directory, the environment.
StackStarter = Callable[[Tools, ServerConfig, Serving, Path, dict[str, str]], AbstractContextManager[Stack]]


def measure(
    tools: Tools,
    settings: Settings,
    scenario: Scenario,
    config: ServerConfig,
    round_no: int,
    run_dir: Path,
    start: StackStarter = stack,
) -> RunResult:
    """One run on fresh processes. A load generator or strace that fails makes the run invalid (its error
    goes to failure.txt); a server that does not start stops the benchmark (BenchError from `start`)."""
    result = RunResult(scenario, config, round_no)
    with start(tools, config, scenario.serving, run_dir, settings.env) as s:
        try:
            MEASURES[scenario.kind](Run(tools, settings, scenario, s, result, run_dir))
        except BenchError as err:
            result.problems.append(str(err).splitlines()[0])
            (run_dir / "failure.txt").write_text(str(err))
        if not s.server.alive():
            result.problems.append(f"the server exited with status {s.server.popen.returncode}")
    return result


@contextmanager
def window(run: Run) -> Iterator[None]:
    """The measured window: CPU counters before and after, and the server's processes unchanged."""
    server, nginx = run.stack.server.pid, run.stack.nginx.pid if run.stack.nginx else None
    before = CpuSample.take(server, nginx)
    yield
    after = CpuSample.take(server, nginx)
    run.result.cpu = before.until(after)
    same_processes(set(before.server), set(after.server), run.result)


def same_processes(before: set[int], after: set[int], result: RunResult) -> None:
    if before != after:
        result.problems.append(f"server processes changed: {sorted(before)} -> {sorted(after)}")


def measure_wrk(run: Run) -> None:
    assert run.stack.base_url is not None
    url, connections = run.stack.base_url + run.scenario.path, run.scenario.connections
    warmup = run_wrk(run.tools, url, connections, run.settings.warmup, run.dir / "wrk-warmup.out")
    run.result.problems += [f"warm-up: {p}" for p in warmup.problems()]
    with window(run):
        load = run_wrk(run.tools, url, connections, run.settings.duration, run.dir / "wrk.out")
        run.result.load = load
    run.result.problems += load.problems()
    if run.scenario.memory:
        run.result.memory = tree_memory(run.stack.server.pid)


def direct(run: Run, name: str, duration: int | None = None, requests: int | None = None, idle: int = 0) -> LoadResult:
    """uwsgi_load straight to the server's socket with the scenario's request and connections; its output
    goes to NAME.json and NAME.log in the run's directory."""
    assert run.stack.sock is not None
    load = DirectLoad(run.scenario.path, run.scenario.connections, duration, requests, idle)
    return run_uwsgi_load(run.tools, run.stack.sock, load, run.dir / name)


def direct_warmup(run: Run) -> None:
    """A warm-up straight to the socket, outside the measured window (so not with uwsgi_load --warmup,
    whose requests would fall inside it)."""
    warmup = direct(run, "load-warmup", duration=run.settings.warmup)
    run.result.problems += [f"warm-up: {p}" for p in warmup.problems()]


def measure_direct(run: Run) -> None:
    direct_warmup(run)
    with window(run):
        load = run.result.load = direct(run, "load", duration=run.settings.duration)
    run.result.problems += load.problems()


def measure_idle(run: Run) -> None:
    """Timeouts and errors are this scenario's result, not a reason to discard the run."""
    direct_warmup(run)
    with window(run):
        load = run.result.load = direct(run, "load", duration=run.settings.duration, idle=IDLE_CONNECTIONS)
    run.result.problems += load.problems(errors_are_results=True)


def measure_sequential(run: Run) -> None:
    """No warm-up: the workers' resident memory is read just before the first big request (with the peak
    restarted there), so that growth = peak during the requests − resident before them."""
    assert run.stack.base_url is not None and run.scenario.sequential is not None
    workers = worker_pids(run.stack.server.pid)
    for pid in workers:
        if not reset_peak_rss(pid):
            print(f"!!! could not restart the peak RSS of pid {pid}: growth includes its start-up peak")
    before = {pid: status_kib(pid, "VmRSS") or 0 for pid in workers}
    with window(run):
        client_log = run.dir / "client.log"
        load = run.result.load = sequential_http(run.stack.base_url, run.scenario.sequential, client_log)
    peak = {pid: status_kib(pid, "VmHWM") or 0 for pid in workers}
    after = {pid: status_kib(pid, "VmRSS") or 0 for pid in workers}
    grew = max(workers, key=lambda pid: peak[pid] - before[pid])
    run.result.rss = RssGrowth(before[grew], peak[grew], after[grew])
    run.result.problems += load.problems()


def measure_syscalls(run: Run) -> None:
    """strace is attached after the warm-up and before the counted requests, and detached after them; no
    CPU time is read (ptrace multiplies it)."""
    direct_warmup(run)
    pids = tree_pids(run.stack.server.pid)
    strace = Strace(run.tools, pids, run.dir)
    try:
        strace.wait_attached()
        load = run.result.load = direct(run, "load", requests=SYSCALL_REQUESTS)
    finally:
        run.result.syscalls = strace.stop()
    same_processes(set(pids), set(tree_pids(run.stack.server.pid)), run.result)
    run.result.problems += load.problems()


MEASURES = {
    KIND_WRK: measure_wrk,
    KIND_DIRECT: measure_direct,
    KIND_IDLE: measure_idle,
    KIND_SEQUENTIAL: measure_sequential,
    KIND_SYSCALLS: measure_syscalls,
}
