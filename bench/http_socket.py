#!/usr/bin/env python3
"""oxwsgi's `--http-socket` beside the servers a Python developer would otherwise run plain HTTP with:
uWSGI's own `--http-socket` (and its HTTP router with keep-alive), gunicorn (sync and gthread workers) and
Granian (its WSGI interface). Side by side in the same run, on the same app, each with one worker process
and one Python thread, under wrk straight to the server's TCP port (no nginx), it reports requests/s, the
server's CPU time per request (utime + stime of every process of its tree, from /proc) and p99 latency,
with each server's ratio to oxwsgi. There is no target: the numbers are reported, not judged. oxwsgi's
HTTP socket is a gateway for development and health probes (production traffic comes from nginx over
the uwsgi protocol): by design it hands every request to a Python thread through a socket pair, a thread
hand-off and a copy that the others do not all pay.

Runs go in rounds (every server in turn, each run on fresh processes: start, one checked request,
warm-up, measured window), and the report takes medians over the valid runs. A run is invalid on a non-2xx
answer, a socket error, a server process that died or was replaced, responses of another size than the
checked one, or connections wrk kept open that were never answered (see `STARVED_FRACTION`). Exit status:
0 when every run was valid, 1 when some run was invalid, 2 when the benchmark could not run, 130 when
interrupted. bench/README.md ("HTTP socket") gives the method and the last results.

Run:  bash bench/run.sh --http-socket [--quick]   (installs what is missing, then runs this script)
"""

from __future__ import annotations

import argparse
import functools
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lib import windows
from lib.procs import BenchError, Child, free_port, run_entry_point, wait_listening
from lib.report import Cell, describe, every_run_section, invalid_details, ratio, with_spread
from lib.results import CPU_US, LATENCY_P99, REQUESTS_PER_SECOND, Metric, RunResult
from lib.scenarios import HELLO, HELLO_BODY, KIND_WRK, ONE_BY_ONE, TEST_APPS, Scenario, Settings, measure
from lib.servers import (
    HTTP_TIMEOUT_SECONDS,
    LISTEN_BACKLOG,
    OXWSGI,
    ServerConfig,
    Serving,
    Stack,
    common_flags,
    server_env,
)
from lib.tools import (
    REPO,
    SETUP_HINT,
    Tools,
    check_flags,
    console_script,
    environment,
    find_tools,
    load_average,
    require_executable,
)

RESULTS = REPO / "bench" / "results" / "http-socket-latest.md"
# No Rust example runs here; the main benchmark's helpers that find binaries and name versions take their
# directory all the same.
EXAMPLES_DIR = REPO / "target" / "release" / "examples"

# Every server binds here, on a port that was free a moment before it started.
HOST = "127.0.0.1"
# The callable every server is pointed at (both apps export `application`).
CALLABLE = "application"
# wrk keeps 16 connections open (the main benchmark's hello-direct keeps 16 requests in flight too):
# enough to keep one Python thread busy with a queue behind it, and to show what a server does with more
# connections than threads (a keep-alive server must switch between them; a closing one reconnects).
CONNECTIONS = 16
# wrk counts only the requests that complete: a connection the server never answers (a keep-alive worker
# that serves one connection until it closes, as uWSGI's --http11-socket does with one thread) simply
# drops out, and the run looks fast. By Little's law, req/s × mean latency is the number of connections
# that were waiting on an answer on average: about CONNECTIONS when every connection is served (15.7 to 63
# for the keep-alive servers here: wrk's mean overshoots when the machine is busy; 7.8 to 17 for uWSGI's
# closing socket, whose reconnects fall outside wrk's latency), 1 to 2 when one connection has the thread
# to itself. Below this share of CONNECTIONS the run is invalid.
STARVED_FRACTION = 0.25
# The bytes wrk read per response, against the size of the response checked before the load (head and
# body): Date headers and a "Connection:" header differ by a few bytes; an error page or a cut body
# differs by far more.
RESPONSE_SIZE_TOLERANCE = 0.25


# --- the servers ----------------------------------------------------------------------------------------

UWSGI_HTTP = ServerConfig("uWSGI", "uwsgi-http-socket")
UWSGI_ROUTER = ServerConfig("uWSGI router", "uwsgi-http-router")
GUNICORN_SYNC = ServerConfig("gunicorn sync", "gunicorn-sync")
GUNICORN_GTHREAD = ServerConfig("gunicorn gthread", "gunicorn-gthread")
GRANIAN = ServerConfig("Granian", "granian")
SERVERS = (OXWSGI, UWSGI_HTTP, UWSGI_ROUTER, GUNICORN_SYNC, GUNICORN_GTHREAD, GRANIAN)
SERVER_KEYS = {"oxwsgi": OXWSGI, **{c.kind: c for c in SERVERS[1:]}}
# What each server does with a connection after a response: the main difference in what a request costs.
CONNECTIONS_KEPT = {
    OXWSGI: "kept (HTTP/1.1)",
    UWSGI_HTTP: "closed (`Connection: close` added)",
    UWSGI_ROUTER: "kept (`--http-keepalive`)",
    GUNICORN_SYNC: "closed (sync worker)",
    GUNICORN_GTHREAD: "kept (2 s idle)",
    GRANIAN: "kept (HTTP/1.1)",
}
# The options each server must have for its command line below to mean what the README says.
REQUIRED_FLAGS = {
    "oxwsgi": ("--http-socket", "--master", "--processes", "--threads", "--disable-logging", "--listen", "--wsgi-file"),
    "uwsgi": ("--http-socket", "--add-header", "--http-keepalive", "--die-on-term", "--need-app"),
    "gunicorn": ("--worker-class", "--threads", "--backlog", "--chdir"),
    "granian": ("--interface", "--blocking-threads", "--runtime-threads", "--no-access-log", "--working-dir"),
}


@dataclass(frozen=True)
class Binaries:
    """The servers besides those the main benchmark finds (Tools: oxwsgi, uWSGI, wrk)."""

    tools: Tools
    gunicorn: Path
    granian: Path


def server_argv(binaries: Binaries, config: ServerConfig, serving: Serving, port: int | str) -> list[str]:
    """One server's command line: `serving.shape` worker processes × Python threads (1×1 here), no request
    log, the same listen backlog, the app file and its callable; the rest is each server's default."""
    app, shape, address = serving.app, serving.shape, f"{HOST}:{port}"
    backlog = str(LISTEN_BACKLOG)
    if config == OXWSGI:
        app_flags = ["--wsgi-file", str(app), "--callable", CALLABLE]
        listen = ["--http-socket", address, "--listen", backlog]
        return [str(binaries.tools.oxwsgi), *listen, *common_flags(shape), *app_flags]
    if config in (UWSGI_HTTP, UWSGI_ROUTER):
        # As in bench.py: --die-on-term (uWSGI 2.0 reloads on SIGTERM), --need-app (exit if the app fails).
        rest = [*common_flags(shape), "--die-on-term", "--need-app", "--listen", backlog]
        rest += ["--wsgi-file", str(app), "--callable", CALLABLE]
        if config == UWSGI_HTTP:
            # uWSGI's --http-socket answers HTTP/1.1 without keep-alive and without saying so: it closes
            # after each response, and wrk, expecting another, counts every close as a read error. The
            # header tells wrk (and any client) to reconnect; the keep-alive variant, --http11-socket, holds
            # a thread per connection (see bench/README.md).
            return [str(binaries.tools.uwsgi), "--http-socket", address, "--add-header", "Connection: close", *rest]
        # --http starts uWSGI's HTTP router: a process of its own (one by default) that keeps the clients'
        # connections (--http-keepalive) and passes each request to the worker over the uwsgi protocol.
        return [str(binaries.tools.uwsgi), "--http", address, "--http-keepalive", *rest]
    module = f"{app.stem}:{CALLABLE}"
    if config in (GUNICORN_SYNC, GUNICORN_GTHREAD):
        if config == GUNICORN_SYNC and shape.threads != 1:
            # gunicorn quietly turns a sync worker with more threads into a gthread one.
            raise BenchError("gunicorn's sync worker has one thread")
        worker = "sync" if config == GUNICORN_SYNC else "gthread"
        shape_flags = ["--workers", str(shape.processes), "--threads", str(shape.threads), "--worker-class", worker]
        where = ["--bind", address, "--backlog", backlog, "--chdir", str(app.parent)]
        return [str(binaries.gunicorn), *where, *shape_flags, module]
    if config == GRANIAN:
        # --blocking-threads are the Python threads of a WSGI worker (default: half the backpressure, 512
        # with one worker); --runtime-threads the Rust I/O threads (default 1, given to make it visible).
        shape_flags = ["--workers", str(shape.processes), "--blocking-threads", str(shape.threads)]
        shape_flags += ["--runtime-threads", "1"]
        where = ["--host", HOST, "--port", str(port), "--backlog", backlog, "--working-dir", str(app.parent)]
        return [str(binaries.granian), "--interface", "wsgi", *where, *shape_flags, "--no-access-log", module]
    raise BenchError(f"internal: no command line for {config}")


def first_response(port: int, path: str) -> bytes:
    """One answer, head and body, to the request wrk sends (`GET PATH HTTP/1.1` with a Host header): the
    size of what wrk should read per response. Read by its Content-Length, which both apps send (without
    one, to the close: a server that keeps the connection fails the readiness check at the timeout)."""
    with socket.create_connection((HOST, port), timeout=HTTP_TIMEOUT_SECONDS) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
        lengths = [value for name, *value in fields if name.strip().lower() == b"content-length" and value]
        wanted = int(lengths[0][0]) if lengths else None
        while (wanted is None or len(body) < wanted) and (chunk := conn.recv(65536)):
            body += chunk
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    parts = response.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@contextmanager
def http_stack(
    binaries: Binaries, tools: Tools, config: ServerConfig, serving: Serving, run_dir: Path, env: dict[str, str]
) -> Iterator[Stack]:
    """The server on a free port, yielded once one request answered 200 with the expected body (the
    answer is kept in ready.http: its size is what every response of the load should have)."""
    run_dir.mkdir()
    port = free_port()
    server = Child(config.name, server_argv(binaries, config, serving, port), run_dir / "server.log", env=env)
    try:
        wait_listening(server, socket.AF_INET, (HOST, port))
        try:
            response = first_response(port, serving.ready_path)
        except OSError as err:
            raise server.failure(f"did not answer the readiness check {serving.ready_path}: {err}") from None
        (run_dir / "ready.http").write_bytes(response)
        if status_of(response) != 200 or serving.ready_expect not in response.partition(b"\r\n\r\n")[2]:
            raise server.failure(f"answered {response[:300]!r} to the readiness check {serving.ready_path}")
        yield Stack(server, None, None, f"http://{HOST}:{port}")
    finally:
        server.stop(signal.SIGINT)


# --- what is measured -----------------------------------------------------------------------------------


def _busy_connections(run: RunResult) -> float | None:
    if run.load is None or "mean" not in run.load.latency_ms:
        return None
    return run.load.rps * run.load.latency_ms["mean"] / 1000


def _bytes_per_response(run: RunResult) -> float | None:
    if run.load is None or not run.load.requests:
        return None
    return run.load.bytes_received / run.load.requests


# Shown in the run lines (the checks below read them); the report's table shows the first three metrics.
BUSY_CONNECTIONS = Metric("conns in flight", _busy_connections, 1, True, summary=False)
BYTES_PER_RESPONSE = Metric("bytes/response", _bytes_per_response, 0, False, summary=False)
TABLE_METRICS = (REQUESTS_PER_SECOND, CPU_US, LATENCY_P99)
METRICS = (*TABLE_METRICS, BUSY_CONNECTIONS, BYTES_PER_RESPONSE)

FLASK_PATH = "/args?name=bench&page=1"
APPS = {
    "hello": Scenario(
        "hello",
        f"`tests/apps/hello.py`, `GET /` (14-byte body), 1×1, wrk -t1 -c{CONNECTIONS} to the server's HTTP port",
        Serving(HELLO, ONE_BY_ONE, False, "/", HELLO_BODY),
        KIND_WRK,
        "/",
        SERVERS,
        METRICS,
        connections=CONNECTIONS,
    ),
    "flask-json": Scenario(
        "flask-json",
        f"`tests/apps/flask_app.py`, `GET {FLASK_PATH}` (Flask `jsonify`), 1×1, wrk -t1 -c{CONNECTIONS} to "
        "the server's HTTP port",
        Serving(TEST_APPS / "flask_app.py", ONE_BY_ONE, False, FLASK_PATH, b'"bench"'),
        KIND_WRK,
        FLASK_PATH,
        SERVERS,
        METRICS,
        connections=CONNECTIONS,
    ),
}


def check_run(result: RunResult, run_dir: Path) -> None:
    """What wrk does not check: that its connections were all being answered, and that the responses had
    the checked response's size."""
    busy = BUSY_CONNECTIONS.get(result) if result.load is not None else None
    if busy is not None and busy < CONNECTIONS * STARVED_FRACTION:
        result.problems.append(
            f"only {busy:.1f} of {CONNECTIONS} connections were being answered on average (req/s × mean "
            "latency): the others waited without an answer, and wrk does not count them"
        )
    per_response = BYTES_PER_RESPONSE.get(result) if result.load is not None else None
    ready = run_dir / "ready.http"
    if per_response is not None and ready.exists():
        expected = ready.stat().st_size
        if abs(per_response - expected) > expected * RESPONSE_SIZE_TOLERANCE:
            result.problems.append(f"{per_response:.0f} bytes read per response; the checked response had {expected}")


# --- the report -----------------------------------------------------------------------------------------


def scenario_table(scenario: Scenario, configs: tuple[ServerConfig, ...], runs: list[RunResult]) -> list[str]:
    """Per server: the median (± half the range) of each metric and its ratio to oxwsgi's median."""
    cells = {c: Cell(c, [r for r in runs if r.scenario == scenario and r.config == c]) for c in configs}
    base = cells.get(OXWSGI)
    columns = " | ".join(f"{m.title} | ÷ oxwsgi" for m in TABLE_METRICS)
    header = f"| Server | connections | {columns} | valid runs |"
    lines = [header, "|---|---|" + "--:|--:|" * len(TABLE_METRICS) + "--:|"]
    for config, cell in cells.items():
        row = [config.name, CONNECTIONS_KEPT[config]]
        for metric in TABLE_METRICS:
            row.append(with_spread(cell.values(metric), metric.digits))
            row.append(ratio(cell.median(metric), base.median(metric) if base else None))
        row.append(f"{len(cell.valid)}/{len(cell.runs)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(env: list[tuple[str, str]], commands: list[str], args: argparse.Namespace, runs: list[RunResult]) -> str:
    lines = ["## oxwsgi's `--http-socket` beside uWSGI, gunicorn and Granian", ""]
    lines += [f"- {key}: {value}" for key, value in env]
    lines += [
        f"- Method: {args.rounds} round(s); in each, every app runs every server in turn, each run on fresh "
        f"processes: start, one checked request, {args.warmup} s of warm-up, {args.duration} s measured "
        f"with wrk -t1 -c{CONNECTIONS} straight to the server's port. CPU/req = utime + stime of the "
        "server's whole process tree over the window ÷ requests completed. Medians over valid runs, ± half "
        "their range; ÷ oxwsgi = the server's median ÷ oxwsgi's (↑: higher is better, ↓: lower is better). "
        "No target: see bench/README.md.",
        "- Commands (DIR/APP.py and PORT filled in per run):",
        "",
        *(f"  - `{command}`" for command in commands),
        "",
    ]
    configs = args.servers
    for scenario in args.apps:
        lines += [f"### {scenario.name}: {scenario.title}", "", *scenario_table(scenario, configs, runs), ""]
    lines += every_run_section(
        runs, "the server, nginx (none here), wrk, other processes and the hypervisor's steal"
    )
    return "\n".join(lines)


def command_templates(binaries: Binaries, configs: tuple[ServerConfig, ...]) -> list[str]:
    """Each server's command line with placeholders, for the report."""
    serving = Serving(Path("DIR/APP.py"), ONE_BY_ONE, False, "/", b"")
    commands = []
    for config in configs:
        argv = server_argv(binaries, config, serving, "PORT")
        argv[0] = Path(argv[0]).name
        commands.append(" ".join(f'"{a}"' if " " in a else a for a in argv))
    return commands


# --- the run --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    windows.add_arguments(parser, "servers", ", hello only (--rounds, --duration and --apps still win)")
    parser.add_argument("--apps", help=f"comma-separated, of {','.join(APPS)} (default: all; --quick: hello)")
    parser.add_argument(
        "--servers", default=",".join(SERVER_KEYS), help="comma-separated (default: all, in this order)"
    )
    args = parser.parse_args(argv)
    windows.resolve(parser, args)
    apps = [a.strip() for a in (args.apps or ("hello" if args.quick else ",".join(APPS))).split(",") if a.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not apps or any(a not in APPS for a in apps):
        parser.error(f"--apps: known apps are {', '.join(APPS)}")
    if not servers or any(s not in SERVER_KEYS for s in servers):
        parser.error(f"--servers: known servers are {', '.join(SERVER_KEYS)}")
    args.apps = tuple(APPS[a] for a in APPS if a in apps)
    args.servers = tuple(SERVER_KEYS[s] for s in SERVER_KEYS if s in servers)
    return args


def find_binaries(args: argparse.Namespace, workdir: Path) -> Binaries:
    """The main benchmark's tools (oxwsgi snapshotted into the working directory), gunicorn and Granian,
    each checked for the options its command line uses."""
    tools = find_tools(args.oxwsgi, EXAMPLES_DIR, [], False, workdir)
    binaries = Binaries(
        tools,
        gunicorn=require_executable(console_script("gunicorn"), "gunicorn", SETUP_HINT),
        granian=require_executable(console_script("granian"), "Granian", SETUP_HINT),
    )
    why = "the command lines in bench/README.md would not apply"
    checked = {"oxwsgi": tools.oxwsgi, "uwsgi": tools.uwsgi, "gunicorn": binaries.gunicorn, "granian": binaries.granian}
    for name, binary in checked.items():
        check_flags(binary, REQUIRED_FLAGS[name], why)
    return binaries


def versions(binaries: Binaries, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The main benchmark's environment, less nginx (not used here), plus gunicorn and Granian."""
    env = [(k, v) for k, v in environment(binaries.tools, args.oxwsgi, EXAMPLES_DIR) if k != "nginx"]
    at = next(i for i, (k, _) in enumerate(env) if k == "uWSGI") + 1
    env[at:at] = [("gunicorn", metadata.version("gunicorn")), ("Granian", metadata.version("granian"))]
    return env


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_entry_point("http-socket", lambda workdir: run(args, workdir))


def run(args: argparse.Namespace, workdir: Path) -> int:
    binaries = find_binaries(args, workdir)
    env = versions(binaries, args)
    print("\n".join(f"{key}: {value}" for key, value in env), flush=True)
    settings = Settings(args.duration, args.warmup, server_env(workdir / "file"))
    start = functools.partial(http_stack, binaries)
    runs = []
    # A B C, A B C: the machine's drift falls on every server alike.
    for round_no in range(1, args.rounds + 1):
        for i, scenario in enumerate(args.apps):
            for j, config in enumerate(args.servers):
                run_dir = workdir / f"run-{round_no}-{i}-{j}"
                result = measure(binaries.tools, settings, scenario, config, round_no, run_dir, start)
                check_run(result, run_dir)
                print(describe(result), flush=True)
                if not result.valid:
                    print(invalid_details(run_dir), flush=True)
                runs.append(result)
    env.insert(3, ("Load average at end", load_average()))
    report = render(env, command_templates(binaries, args.servers), args, runs)
    return windows.publish(report, RESULTS, "runs" if any(not r.valid for r in runs) else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
