"""The metrics endpoints as their consumers see them: a real Prometheus scrapes `--metrics` of a loaded
oxwsgi (3 workers behind real nginx), and every query of the Grafana dashboard (grafana/oxwsgi.json) must
return data; promtool lints /metrics; the real uwsgitop draws the `--stats` document.

Prometheus and promtool come from Debian's `prometheus` package, uwsgitop from PyPI; scripts/setup.sh
installs them. Without them these tests skip loudly, except under CI=true or OXWSGI_E2E_STRICT=1, where that
is a failure (as for nginx). Nothing here asserts a duration: every wait is a bounded poll that fails with
the logs of oxwsgi and Prometheus.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, REPO, Process, Stack, free_port, in_ci, tail
from test_workers import Load

DASHBOARD = REPO / "grafana" / "oxwsgi.json"
SCRAPE_CONFIG_EXAMPLE = REPO / "nginx" / "prometheus.yml"

# Prometheus scrapes every second; a query over a range needs two samples, so data shows within seconds.
# These bound the polls; each fails with the logs when it runs out.
PROMETHEUS_POLL_TRIES = 240
PROMETHEUS_POLL_INTERVAL = 0.25
# uwsgitop under a pseudo-terminal: how long (in reads) it may take to draw every worker, and to exit on `q`.
TERMINAL_POLL_TRIES = 300
TERMINAL_POLL_INTERVAL = 0.1
# Wide enough for uwsgitop's header line and its 16-column worker rows (it drops a row that does not fit).
TERMINAL_ROWS, TERMINAL_COLUMNS = 60, 300

# What the dashboard's template variables stand for when its queries are run here: every instance, and a
# range of 4 scrape intervals of a 15 s default (Grafana's $__rate_interval), which holds many 1 s samples.
VARIABLES = {
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}

# The families the dashboard reads, with the types its functions assume (rate/increase on counters,
# histogram_quantile on histograms, plain values of gauges).
FAMILY_TYPES = {
    "oxwsgi_requests_total": "counter",
    "oxwsgi_request_duration_seconds": "histogram",
    "oxwsgi_request_queue_seconds": "histogram",
    "oxwsgi_app_duration_seconds": "histogram",
    "oxwsgi_requests_in_flight": "gauge",
    "oxwsgi_request_body_bytes_total": "counter",
    "oxwsgi_response_bytes_total": "counter",
    "oxwsgi_python_threads": "gauge",
    "oxwsgi_listen_queue_length": "gauge",
    "oxwsgi_listen_queue_max": "gauge",
    "oxwsgi_workers": "gauge",
    "oxwsgi_worker_restarts_total": "counter",
    "oxwsgi_harakiri_total": "counter",
    "oxwsgi_app_exceptions_total": "counter",
    "oxwsgi_protocol_errors_total": "counter",
    "oxwsgi_worker_rss_bytes": "gauge",
    "oxwsgi_build_info": "gauge",
}
# Label sets that are fixed, so every value is exported (at 0) from the first scrape.
FIXED_LABELS = {
    "oxwsgi_python_threads": ("state", {"busy", "idle"}),
    "oxwsgi_workers": ("state", {"starting", "ready", "retiring"}),
    "oxwsgi_worker_restarts_total": (
        "reason",
        {"crash", "max_requests", "rss", "lifetime", "harakiri", "reload"},
    ),
}
PROCESSES, THREADS = 3, 2


# --- the dashboard ---------------------------------------------------------------------------------


@dataclass
class Query:
    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"panel {self.panel!r}, query {self.ref_id}: {self.expr}"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def walk_panels(panels: list[dict]):
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries() -> list[Query]:
    queries = [
        Query(panel.get("title", "?"), target.get("refId", "?"), target["expr"])
        for panel in walk_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert queries, f"{DASHBOARD} has no Prometheus queries"
    return queries


def substitute(expr: str) -> str:
    """The query as Grafana would send it, with VARIABLES for `$name` / `${name}`; an unknown variable is
    a bug in the dashboard."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            pytest.fail(f"unknown dashboard variable ${name} in {expr}", pytrace=False)
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def instance_variable() -> dict:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    return variables["instance"]


def test_dashboard_is_importable_and_every_query_is_templated():
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    assert instance["definition"] == "label_values(oxwsgi_build_info, instance)"
    assert instance["datasource"]["uid"] == "${datasource}"

    panels = [p for p in walk_panels(board["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in walk_panels(board["panels"])]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    problems = []
    for panel in panels:
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel {panel['title']!r}: datasource is {panel.get('datasource')}")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"panel {panel['title']!r}: target datasource is {target.get('datasource')}")
    for query in dashboard_queries():
        # Every selector of an oxwsgi metric filters by the instance variable ...
        for selector in re.finditer(r"\b(oxwsgi_\w+)(\{[^}]*\})?", query.expr):
            if 'instance=~"$instance"' not in (selector.group(2) or ""):
                problems.append(f"{query}: {selector.group(1)} is not filtered by instance=~\"$instance\"")
        # ... and every range is Grafana's $__rate_interval.
        for window in re.findall(r"\[([^\]]*)\]", query.expr):
            if window != "$__rate_interval":
                problems.append(f"{query}: range [{window}] instead of [$__rate_interval]")
        substitute(query.expr)
    assert not problems, "\n".join(problems)


def test_scrape_config_example_is_valid():
    promtool = find_tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "config", str(SCRAPE_CONFIG_EXAMPLE)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "127.0.0.1:9191" in SCRAPE_CONFIG_EXAMPLE.read_text()


# --- Prometheus scraping a loaded oxwsgi ----------------------------------------------------------------


def missing_tool(reason: str):
    if in_ci():
        pytest.fail(f"strict mode (CI=true or OXWSGI_E2E_STRICT=1): {reason}", pytrace=False)
    pytest.skip(f"!!! SKIPPED: {reason}")


def find_tool(name: str) -> str:
    """`prometheus` or `promtool`: $PROMETHEUS_BIN / $PROMTOOL_BIN, else PATH, else /usr/bin; or a skip (a
    failure under CI=true) with a loud reason."""
    variable = f"{name.upper()}_BIN"
    explicit = os.environ.get(variable)
    return first_executable(
        name,
        [explicit] if explicit else [shutil.which(name), f"/usr/bin/{name}"],
        "so the metrics cannot be checked with a real Prometheus. Install it with `bash scripts/setup.sh` "
        f"(or `apt-get install --no-install-recommends prometheus`), or set {variable}.",
    )


def first_executable(name: str, candidates: list[str | None], hint: str) -> str:
    """The first executable of `candidates`, or a skip (a failure under CI=true) naming where we looked."""
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    missing_tool(f"{name} is not installed (looked for {', '.join(c for c in candidates if c)}), {hint}")


@dataclass
class Scraped:
    """oxwsgi (behind nginx) with --metrics, and a Prometheus scraping it every second."""

    stack: Stack
    prometheus: Process
    promtool: str
    metrics_port: int
    api_port: int

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def report(self) -> str:
        return (
            f"{self.stack.report()}\n"
            f"--- Prometheus log ({self.prometheus.log_path}) ---\n{tail(self.prometheus.log_path)}"
        )

    def api(self, path: str, **params) -> dict:
        """A Prometheus HTTP API call; its JSON (status "success" or "error")."""
        url = f"http://127.0.0.1:{self.api_port}{path}"
        response = requests.get(url, params=params, timeout=HTTP_TIMEOUT)
        try:
            return response.json()
        except ValueError:
            pytest.fail(f"Prometheus answered {path} with {response.status_code}: {response.text[:500]}")

    def query(self, expr: str) -> dict:
        return self.api("/api/v1/query", query=expr)


def poll(condition, what: str, report, tries: int = PROMETHEUS_POLL_TRIES, interval=PROMETHEUS_POLL_INTERVAL):
    for _ in range(tries):
        if condition():
            return
        time.sleep(interval)
    pytest.fail(f"never happened: {what}\n{report()}", pytrace=False)


def labels_of(series: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', series))


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of `name` (exactly) in a Prometheus text document, as (labels, value)."""
    found = []
    for line in text.splitlines():
        match = re.match(r"(\w+)(\{.*\})?\s+(\S+)", line)
        if match and match.group(1) == name:
            found.append((labels_of(match.group(2) or ""), float(match.group(3))))
    return found


def start_prometheus(workdir: Path, prometheus_bin: str, target: str) -> tuple[Process, int]:
    """Prometheus with a private TSDB in `workdir`, scraping `target` every second, once it is ready.
    Retries with another port if the one picked was taken in between."""
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: oxwsgi\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    for attempt in range(3):
        port = free_port()
        process = Process(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / f'data{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            workdir / f"prometheus{attempt}.log",
        )
        process.start()
        try:
            process.wait_listening(("127.0.0.1", port))
            break
        except pytest.fail.Exception:
            process.stop()
            if "address already in use" in process.log().lower() and attempt < 2:
                continue
            raise

    # Its API answers 503 until the TSDB is open; /-/ready says when it is.
    def ready() -> bool:
        try:
            response = requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=HTTP_TIMEOUT)
        except requests.ConnectionError:
            return False
        return response.status_code == 200

    try:
        poll(ready, "Prometheus is ready", lambda: f"--- {process.log_path} ---\n{tail(process.log_path)}")
    except BaseException:
        process.stop()
        raise
    return process, port


@pytest.fixture(scope="module")
def scraped(launcher, tmp_path_factory):
    prometheus_bin, promtool = find_tool("prometheus"), find_tool("promtool")
    metrics_port = free_port()
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "workers_app.py")],
        extra_args=[
            *("--processes", str(PROCESSES), "--threads", str(THREADS)),
            *("--metrics", f"127.0.0.1:{metrics_port}"),
            # No access log: the tail attached to a failure then shows the workers' lives.
            "--disable-logging",
        ],
    )
    prometheus = None
    try:
        stack.oxwsgi.wait_listening(("127.0.0.1", metrics_port))
        prometheus, api_port = start_prometheus(
            tmp_path_factory.mktemp("prometheus"), prometheus_bin, f"127.0.0.1:{metrics_port}"
        )
        result = Scraped(stack, prometheus, promtool, metrics_port, api_port)

        def all_workers_ready():
            text = requests.get(result.metrics_url(), timeout=HTTP_TIMEOUT).text
            states = {labels.get("state"): value for labels, value in samples(text, "oxwsgi_workers")}
            return states.get("ready") == PROCESSES

        poll(all_workers_ready, f'oxwsgi_workers{{state="ready"}} == {PROCESSES} on /metrics', result.report)

        def target_up():
            targets = result.api("/api/v1/targets").get("data", {}).get("activeTargets", [])
            return [t["health"] for t in targets] == ["up"]

        poll(target_up, "Prometheus reports its oxwsgi target up", result.report)
        # Load through nginx: more client threads (8) than Python threads (3 x 2), so some requests wait
        # for a thread; a few POSTs with bodies.
        with Load(stack.url("/sleep?ms=2"), per_thread=40) as load:
            pass
        for _ in range(10):
            requests.post(stack.url("/"), data=b"x" * 1000, timeout=HTTP_TIMEOUT)
        assert load.errors == [] and set(load.statuses) == {200}, (
            load.statuses,
            load.errors[:5],
            result.report(),
        )
        yield result
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()


def test_every_dashboard_query_returns_data_from_a_loaded_server(scraped):
    queries = dashboard_queries()
    empty: list[Query] = []

    def all_have_data() -> bool:
        empty.clear()
        for query in queries:
            answer = scraped.query(substitute(query.expr))
            if answer.get("status") != "success":
                pytest.fail(
                    f"Prometheus rejects the dashboard's {query}\n"
                    f"as sent: {substitute(query.expr)}\n{answer.get('errorType')}: {answer.get('error')}",
                    pytrace=False,
                )
            if not answer["data"]["result"]:
                empty.append(query)
        return not empty

    # The server stays loaded while the queries run, so rates and quantiles are of live traffic.
    with Load(scraped.stack.url("/sleep?ms=2"), per_thread=1_000_000) as load:
        try:
            for _ in range(PROMETHEUS_POLL_TRIES):
                if all_have_data():
                    break
                time.sleep(PROMETHEUS_POLL_INTERVAL)
        finally:
            load.stopping.set()
    assert not empty, (
        f"{len(empty)} of the dashboard's {len(queries)} queries never returned data:\n"
        + "\n".join(f"  {q}\n    as sent: {substitute(q.expr)}" for q in empty)
        + f"\n{scraped.report()}"
    )
    assert load.errors == [], load.errors[:5]

    # The instance variable lists exactly the scraped oxwsgi.
    metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", instance_variable()["definition"]).groups()
    values = scraped.api(f"/api/v1/label/{label}/values", **{"match[]": metric})
    assert values.get("data") == [f"127.0.0.1:{scraped.metrics_port}"], (values, scraped.report())


def test_metrics_endpoint_passes_promtool_and_exports_every_family(scraped):
    response = requests.get(scraped.metrics_url(), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4"), response.headers
    text = response.text

    lint = subprocess.run(
        [scraped.promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), (
        f"promtool check metrics: exit {lint.returncode}\n{lint.stdout}{lint.stderr}"
    )

    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.MULTILINE))
    wrong = {name: types.get(name) for name, kind in FAMILY_TYPES.items() if types.get(name) != kind}
    assert not wrong, f"families missing or of another type (expected {FAMILY_TYPES}): {wrong}\n{text}"
    for name, (label, values) in FIXED_LABELS.items():
        exported = {labels.get(label) for labels, _ in samples(text, name)}
        assert exported == values, f"{name}: {label} values {exported}, expected {values}\n{text}"
    workers = {labels.get("worker") for labels, _ in samples(text, "oxwsgi_worker_rss_bytes")}
    assert workers == {str(n) for n in range(1, PROCESSES + 1)}, text
    threads = sum(value for _, value in samples(text, "oxwsgi_python_threads"))
    assert threads == PROCESSES * THREADS, text
    methods = {labels.get("method") for labels, _ in samples(text, "oxwsgi_requests_total")}
    assert {"GET", "POST"} <= methods, text
    (build,) = samples(text, "oxwsgi_build_info")
    assert build[1] == 1 and build[0]["python_version"] == "{}.{}".format(*sys.version_info[:2]), build

    # The listen queue is labelled with the socket's address as given to --socket.
    given = scraped.stack.upstream.removeprefix("unix:")
    for name in ("oxwsgi_listen_queue_length", "oxwsgi_listen_queue_max"):
        sockets = [labels.get("socket") for labels, _ in samples(text, name)]
        assert sockets == [given], f"{name}: socket labels {sockets}, expected [{given!r}] (as given)"
    (backlog,) = [value for _, value in samples(text, "oxwsgi_listen_queue_max")]
    assert backlog > 0, text


# --- --stats and uwsgitop -------------------------------------------------------------------------------


def find_uwsgitop() -> str:
    """uwsgitop as installed by pip into this Python (a script, not a module), or a skip/failure."""
    return first_executable(
        "uwsgitop",
        [str(Path(sysconfig.get_path("scripts")) / "uwsgitop"), shutil.which("uwsgitop")],
        "install it with `bash scripts/setup.sh` (or `python3 -m pip install -r tests/requirements.txt`)",
    )


def read_stats(address: tuple[str, int]) -> dict:
    """The stats document: connect, read to EOF, parse (what uwsgitop does)."""
    chunks = []
    with socket.create_connection(address, timeout=HTTP_TIMEOUT) as conn:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def screen_text(output: bytes) -> bytes:
    """The terminal output with xterm's "repeat the last character" (REP) spelled out, so that numbers
    curses drew with it can be searched for."""
    return re.sub(rb"(.)\x1b\[(\d+)b", lambda m: m.group(1) * (int(m.group(2)) + 1), output)


def run_uwsgitop(uwsgitop: str, address: str, expected: list[bytes]) -> tuple[int | None, bytes]:
    """Runs uwsgitop on a pseudo-terminal of a fixed size until its screen shows every string in `expected`
    (bounded), then types `q` and waits (bounded) for it to exit. Returns (exit status, all output); the
    status is None if it had to be killed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", TERMINAL_ROWS, TERMINAL_COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("LINES", "COLUMNS")}
    env["TERM"] = "xterm"
    process = subprocess.Popen(
        [sys.executable, uwsgitop, "--frequency", "1", address],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        start_new_session=True,
    )
    os.close(terminal)
    output = bytearray()

    def drain() -> None:
        ready, _, _ = select.select([controller], [], [], TERMINAL_POLL_INTERVAL)
        if ready:
            try:
                output.extend(os.read(controller, 65536))
            except OSError:  # EIO: the program exited and the terminal closed
                time.sleep(TERMINAL_POLL_INTERVAL)

    try:
        for _ in range(TERMINAL_POLL_TRIES):
            if all(e in screen_text(bytes(output)) for e in expected) or process.poll() is not None:
                break
            drain()
        if process.poll() is None:
            os.write(controller, b"q")
        for _ in range(TERMINAL_POLL_TRIES):
            if process.poll() is not None:
                break
            drain()
        for _ in range(3):  # what it wrote last
            drain()
        return process.poll(), bytes(output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)


def test_stats_socket_serves_uwsgi_json_that_uwsgitop_draws(launcher):
    uwsgitop = find_uwsgitop()
    stats_port = free_port()
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "workers_app.py")],
        extra_args=["--processes", "2", "--stats", f"127.0.0.1:{stats_port}"],
    )
    address = ("127.0.0.1", stats_port)
    try:
        stack.oxwsgi.wait_listening(address)
        sent = 20
        for _ in range(sent):
            response = requests.get(stack.url("/"), timeout=HTTP_TIMEOUT)
            assert response.status_code == 200, (response.status_code, stack.report())

        stats = {}

        def counted():
            stats.update(read_stats(address))
            return sum(w.get("requests", 0) for w in stats.get("workers", [])) >= sent

        poll(counted, f"the stats document counts the {sent} requests", lambda: f"{stats}\n{stack.report()}")
        workers = stats["workers"]
        assert len(workers) == 2, stats
        for worker in workers:
            assert {"pid", "requests", "status"} <= set(worker), worker
            assert isinstance(worker["pid"], int) and isinstance(worker["requests"], int), worker
            assert isinstance(worker["status"], str), worker
            assert parent_pid(worker["pid"]) == stack.oxwsgi.popen.pid, (worker, "is not the master's child")
        assert stats["pid"] == stack.oxwsgi.popen.pid, stats
        assert isinstance(stats.get("sockets"), list) and len(stats["sockets"]) == 1, stats

        pids = [str(w["pid"]).encode() for w in workers]
        status, output = run_uwsgitop(uwsgitop, f"127.0.0.1:{stats_port}", pids)
        shown = output.decode(errors="replace")
        assert b"Traceback" not in output, f"uwsgitop failed:\n{shown}"
        assert status == 0, f"uwsgitop exited with {status} after `q`:\n{shown}"
        screen = screen_text(output)
        missing = [p.decode() for p in pids if p not in screen]
        assert not missing, f"uwsgitop never showed workers {missing}:\n{shown}\n{stack.report()}"

        # Sockets are named as given to --socket, as uWSGI names them (and as the metrics label them).
        given = stack.upstream.removeprefix("unix:")
        assert [s.get("name") for s in stats["sockets"]] == [given], stats["sockets"]
    finally:
        stack.stop()
