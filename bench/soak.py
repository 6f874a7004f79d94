"""A soak: N minutes (default 10) of steady mixed traffic through real nginx against oxwsgi with 2 worker
processes × 4 Python threads under a master, to see whether anything builds up over time: worker memory,
open file descriptors, errors the traffic did not ask for, latency.

Several client threads in this process each run the same fixed, weighted mix of request kinds (hello,
a Flask JSON endpoint, 1 MiB uploads, streamed responses, an endpoint that raises, HEAD, 404, and clients
that disconnect mid-response and mid-upload), paced to a modest total rate: the machine has 2 cores
shared with other work, and the aim is a steady load, not the most requests per second. Every kind has a
known outcome (200, 500, 404, or aborted by us); anything else is an error of that kind.

After the first minute the traffic pauses until nothing is in flight, and each worker's VmRSS and open
file descriptors are read (the baseline); at the end they are read again the same way. Goals: each
worker's RSS grows by less than 5% after the baseline, its open descriptors are the same, the workers are
the ones of the baseline, and no request had an outcome it did not ask for. Exit status 0 when every goal
holds, 1 when one fails, 2 when the soak could not run, 130 when interrupted. bench/README.md ("Soak")
gives the method and the last results.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lib.proc_stats import CpuSample, status_kib, worker_pids
from lib.procs import Child, command_output, free_port, run_entry_point, tail, wait_listening
from lib.servers import http_get, start_nginx
from lib.tools import REPO, load_average, oxwsgi_version, require_executable

APP = REPO / "bench" / "apps" / "soak.py"
NGINX_TEMPLATE = REPO / "bench" / "soak-nginx.conf.template"
DEFAULT_OXWSGI = REPO / "target" / "release" / "oxwsgi"
DEFAULT_JSON = REPO / "bench" / "results" / "soak-latest.json"

# The shape under test: the one the reliability issue asks about.
PROCESSES = 2
THREADS = 4
DEFAULT_MINUTES = 10.0
# The baseline is read after this long (or half the run, if shorter): by then Flask's first-request paths
# have run, every thread has served, and the allocator's arenas have reached their working size.
BASELINE_SECONDS = 60.0
# Latency and counts are reported per bucket of this length (a minute), or of QUICK_BUCKET_SECONDS in --quick.
BUCKET_SECONDS = 60.0
# --quick: a check that everything works end to end, not a soak to quote.
QUICK_MINUTES = 1.0
QUICK_BUCKET_SECONDS = 15.0
# Several clients so that requests overlap (the server has 8 threads), paced to this many requests per
# second in total: a few percent of what this machine serves, so the load stays steady while other work
# shares the two cores.
DEFAULT_CLIENTS = 6
DEFAULT_RATE = 150.0
# A request not answered within this long is a timeout (the slowest kind, a 1 MiB upload, takes a few ms).
REQUEST_TIMEOUT_SECONDS = 10.0
# Memory, descriptors and threads of the workers are read this often while the traffic runs.
SAMPLE_SECONDS = 10.0
# At a quiet point (baseline, end), how long to wait for requests in flight to finish, and then for the
# server to finish with them (closing sockets after a client abort, the generator's close()).
DRAIN_TIMEOUT_SECONDS = 30.0
SETTLE_SECONDS = 2.0
# After start-up: how long the master gets to have all its workers running.
WORKERS_TIMEOUT_SECONDS = 30.0

# The goals of the reliability issue.
MAX_RSS_GROWTH_PERCENT = 5.0

# What the kinds send.
UPLOAD_BYTES = 1024 * 1024
ABORTED_UPLOAD_SENT_BYTES = 256 * 1024
# How long the aborting client waits between sending part of its upload and closing: long enough for the
# app to have read what was sent and to be waiting for the rest.
ABORT_UPLOAD_WAIT_SECONDS = 0.05
HELLO_BODY = b"Hello, soak!\n"
STREAM_QUERY = "chunks=8&size=8192"
STREAM_BYTES = 8 * 8192
# The stream the client walks away from: 100 chunks of 64 KiB, 10 ms apart (at least 1 s), so the server
# is still writing when the client goes.
SLOW_STREAM_QUERY = "chunks=100&size=65536&delay=0.01"
UPLOAD_PIECE = memoryview(b"u" * 65536)


# --- the request kinds ----------------------------------------------------------------------------------


class Unexpected(Exception):
    """A request that completed with an outcome its kind did not ask for; the message is the error's
    category in the report (e.g. `status 502`, `wrong body`)."""


@dataclass(frozen=True)
class Kind:
    """One kind of request: its share of the mix (weight, out of the weights' sum), what it expects (for
    the report), and how one is sent and checked. `send` returns normally when the outcome was the
    expected one and raises Unexpected or an OSError otherwise. Aborted kinds have no latency."""

    name: str
    weight: int
    expect: str
    send: Callable[[int, int], None]
    aborts: bool = False


def request(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection (nginx's connection to the server is per request anyway)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def expect_status(status: int, wanted: int) -> None:
    if status != wanted:
        raise Unexpected(f"status {status}")


def send_hello(port: int, seq: int) -> None:
    status, _, body = request(port, "GET", "/hello")
    expect_status(status, 200)
    if body != HELLO_BODY:
        raise Unexpected("wrong body")


def send_flask_json(port: int, seq: int) -> None:
    page = seq % 1000
    status, _, body = request(port, "GET", f"/flask/json?name=soak&page={page}")
    expect_status(status, 200)
    try:
        answer = json.loads(body)
    except ValueError:
        raise Unexpected("wrong body") from None
    if answer != {"name": "soak", "page": page, "keys": ["name", "page"]}:
        raise Unexpected("wrong body")


def send_upload(port: int, seq: int) -> None:
    pieces = itertools.repeat(UPLOAD_PIECE, UPLOAD_BYTES // len(UPLOAD_PIECE))
    headers = {"Content-Length": str(UPLOAD_BYTES), "Content-Type": "application/octet-stream"}
    status, _, body = request(port, "POST", "/upload", body=pieces, headers=headers)
    expect_status(status, 200)
    if body.strip() != str(UPLOAD_BYTES).encode():
        raise Unexpected("wrong body")


def send_stream(port: int, seq: int) -> None:
    status, _, body = request(port, "GET", f"/stream?{STREAM_QUERY}")
    expect_status(status, 200)
    if len(body) != STREAM_BYTES:
        raise Unexpected("wrong body")


def send_raise(port: int, seq: int) -> None:
    status, _, _ = request(port, "GET", "/raise")
    expect_status(status, 500)


def send_head(port: int, seq: int) -> None:
    status, headers, body = request(port, "HEAD", "/hello")
    expect_status(status, 200)
    if body or headers.get("content-length") != str(len(HELLO_BODY)):
        raise Unexpected("wrong head")


def send_not_found(port: int, seq: int) -> None:
    status, _, _ = request(port, "GET", f"/flask/missing/{seq % 100}")
    expect_status(status, 404)


def raw_connection(port: int) -> socket.socket:
    """A plain socket to nginx, for the kinds that stop half-way (http.client would finish the request)."""
    return socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_SECONDS)


def send_abort_response(port: int, seq: int) -> None:
    """Asks for the slow stream, reads its head and the first body bytes, and disconnects."""
    with raw_connection(port) as sock:
        sock.sendall(f"GET /stream?{SLOW_STREAM_QUERY} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise Unexpected("closed before the body")
            received += chunk
        status_line = received.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or status_line[1] != b"200":
            raise Unexpected(f"status {status_line[1].decode(errors='replace') if len(status_line) > 1 else '?'}")


def send_abort_upload(port: int, seq: int) -> None:
    """Announces a 1 MiB upload where nginx passes the body on as it comes, sends a quarter, and
    disconnects while the app waits for the rest."""
    with raw_connection(port) as sock:
        sock.sendall(
            (
                "POST /unbuffered/upload HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n"
            ).encode()
        )
        for _ in range(ABORTED_UPLOAD_SENT_BYTES // len(UPLOAD_PIECE)):
            sock.sendall(UPLOAD_PIECE)
        time.sleep(ABORT_UPLOAD_WAIT_SECONDS)
        # Nothing should have come back yet: the body is not complete.
        sock.setblocking(False)
        try:
            early = sock.recv(4096)
        except BlockingIOError:
            early = None
        if early is not None:
            raise Unexpected("answered before the body was complete" if early else "closed before the body was sent")


# The mix, weights out of 100. Most requests are small (hello, Flask, HEAD, 404), as on a real site; the
# heavier kinds are frequent enough to happen thousands of times in ten minutes.
KINDS = (
    Kind("hello", 28, "200, hello body", send_hello),
    Kind("flask-json", 20, "200, JSON echo", send_flask_json),
    Kind("upload-1mib", 6, "200, byte count", send_upload),
    Kind("stream", 10, "200, 8 × 8 KiB", send_stream),
    Kind("app-raises", 6, "500", send_raise),
    Kind("head", 8, "200, no body", send_head),
    Kind("not-found", 10, "404 (Flask)", send_not_found),
    Kind("abort-response", 6, "aborted by us mid-stream", send_abort_response, aborts=True),
    Kind("abort-upload", 6, "aborted by us mid-upload", send_abort_upload, aborts=True),
)


def classify(err: BaseException) -> str:
    """An error's category in the report."""
    if isinstance(err, Unexpected):
        return str(err)
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    if isinstance(err, BrokenPipeError):
        return "broken pipe"
    if isinstance(err, http.client.RemoteDisconnected):
        return "closed without a response"
    if isinstance(err, http.client.IncompleteRead):
        return "incomplete body"
    if isinstance(err, (OSError, http.client.HTTPException)):
        return f"{type(err).__name__}"
    raise err


# --- the traffic ----------------------------------------------------------------------------------------


@dataclass
class KindStats:
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


@dataclass
class Record:
    """One finished request: when it finished (seconds since the traffic started), its kind, its latency
    (None for aborted kinds) and its error category (None when it went as expected)."""

    at: float
    kind: str
    latency_ms: float | None
    error: str | None


class Traffic:
    """The client threads, a gate that pauses them (for the quiet points), and every request's record."""

    def __init__(self, port: int, clients: int, rate: float):
        self.port = port
        self.interval = clients / rate
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.started = 0.0
        self.threads = [
            threading.Thread(target=self.client, args=(i,), name=f"client-{i}", daemon=True) for i in range(clients)
        ]
        self.first_error: dict[str, str] = {}

    def start(self) -> None:
        self.started = time.monotonic()
        self.running.set()
        for thread in self.threads:
            thread.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def client(self, index: int) -> None:
        """Runs the mix in a shuffled order of its own (the same on every soak), paced to its share of the
        rate. Each client starts at a random point of its interval, so that the clients do not send in step
        (bursts of 6 requests, then nothing); after a pause it starts afresh the same way, instead of
        catching up."""
        rng = random.Random(index)
        deck = [kind for kind in KINDS for _ in range(kind.weight)]
        seq = index
        next_due = time.monotonic() + rng.random() * self.interval
        while not self.stopping.is_set():
            rng.shuffle(deck)
            for kind in deck:
                if not self.running.is_set():
                    self.running.wait()
                    next_due = time.monotonic() + rng.random() * self.interval
                if self.stopping.is_set():
                    return
                delay = next_due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_due = max(next_due + self.interval, time.monotonic() - self.interval)
                self.one(kind, seq)
                seq += len(self.threads)

    def one(self, kind: Kind, seq: int) -> None:
        with self.lock:
            self.in_flight += 1
        began = time.monotonic()
        error = None
        try:
            kind.send(self.port, seq)
        except Exception as err:  # noqa: BLE001 - classify() re-raises what is not a request's failure
            error = classify(err)
            self.first_error.setdefault(f"{kind.name}: {error}", repr(err))
        done = time.monotonic()
        latency = None if kind.aborts or error else (done - began) * 1e3
        with self.lock:
            self.records.append(Record(done - self.started, kind.name, latency, error))
            self.in_flight -= 1

    def pause(self) -> bool:
        """Stops sending and waits until nothing is in flight; False if requests are still out after
        DRAIN_TIMEOUT_SECONDS."""
        self.running.clear()
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if self.in_flight == 0:
                    return True
            time.sleep(0.01)
        return False

    def resume(self) -> None:
        self.running.set()

    def stop(self) -> bool:
        drained = self.pause()
        self.stopping.set()
        self.running.set()
        for thread in self.threads:
            thread.join(timeout=DRAIN_TIMEOUT_SECONDS)
        return drained

    def snapshot(self) -> list[Record]:
        with self.lock:
            return list(self.records)


# --- the server's processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSample:
    """One process at one moment: VmRSS (KiB), open descriptors (with what each points to), threads."""

    pid: int
    rss_kib: int
    fds: dict[str, str]
    threads: int

    @property
    def fd_count(self) -> int:
        return len(self.fds)


def open_fds(pid: int) -> dict[str, str]:
    """Descriptor number → what it points to (`socket:[inode]`, a path, `anon_inode:[eventpoll]`)."""
    fds = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        return {}
    return fds


def sample(pid: int) -> ProcessSample | None:
    rss = status_kib(pid, "VmRSS")
    if rss is None:
        return None
    threads = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (FileNotFoundError, StopIteration):
        pass
    return ProcessSample(pid, rss, open_fds(pid), threads)


def sample_workers(master: int) -> dict[int, ProcessSample]:
    return {pid: s for pid in worker_pids(master) if pid != master and (s := sample(pid)) is not None}


def fd_kind(target: str) -> str:
    """What a descriptor is, without its inode: `socket`, `anon_inode:[eventpoll]`, `pipe`, a path."""
    return re.sub(r":\[\d+\]$", "", target) if target.startswith(("socket:", "pipe:")) else target


def fd_difference(before: ProcessSample, after: ProcessSample) -> str:
    """The descriptors opened and closed between two samples, by kind."""
    opened = Counter(fd_kind(after.fds[fd]) for fd in after.fds if before.fds.get(fd) != after.fds[fd])
    closed = Counter(fd_kind(before.fds[fd]) for fd in before.fds if after.fds.get(fd) != before.fds[fd])
    parts = [f"+{n} {kind}" for kind, n in sorted(opened.items())]
    parts += [f"-{n} {kind}" for kind, n in sorted(closed.items())]
    return ", ".join(parts) or "the same descriptors"


def wait_for_workers(server: Child, count: int) -> list[int]:
    deadline = time.monotonic() + WORKERS_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not server.alive():
            raise server.failure(f"exited with status {server.popen.returncode}")
        pids = [p for p in worker_pids(server.pid) if p != server.pid]
        if len(pids) == count:
            return pids
        time.sleep(0.1)
    raise server.failure(f"did not have {count} workers within {WORKERS_TIMEOUT_SECONDS:.0f}s")


def scrape_metrics(port: int) -> dict[str, float]:
    """The master's Prometheus counters this soak cross-checks, summed over their labels by name and the
    labels that matter (status, reason, kind)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=REQUEST_TIMEOUT_SECONDS) as r:
            text = r.read().decode()
    except OSError as err:
        return {"scrape failed": 0.0, str(err): 0.0}
    wanted = (
        "oxwsgi_requests_total",
        "oxwsgi_app_exceptions_total",
        "oxwsgi_write_errors_total",
        "oxwsgi_protocol_errors_total",
        "oxwsgi_worker_restarts_total",
        "oxwsgi_harakiri_total",
    )
    found: Counter = Counter()
    for line in text.splitlines():
        match = re.match(r"^(oxwsgi_\w+)(\{[^}]*\})?\s+(\S+)$", line)
        if not match or match.group(1) not in wanted:
            continue
        name, labels, value = match.groups()
        keep = re.findall(r'(status|reason|kind)="([^"]*)"', labels or "")
        key = name + ("{" + ",".join(f"{k}={v}" for k, v in keep) + "}" if keep else "")
        found[key] += float(value)
    return dict(sorted(found.items()))


# --- what the logs say ----------------------------------------------------------------------------------


def log_summary(path: Path, keep: Callable[[str], str | None]) -> dict[str, int]:
    """Lines of a log grouped by what `keep` makes of them (None: not counted)."""
    counts: Counter = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        if (key := keep(line)) is not None:
            counts[key] += 1
    return dict(counts.most_common())


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def server_line(line: str) -> str | None:
    """A server log line's level and message, without timestamps, pids, numbers; tracebacks by their last
    line (the exception)."""
    line = ANSI.sub("", line).rstrip()
    # A traceback's frames are indented; its first line says nothing the last does not.
    if not line or line[0].isspace() or line.startswith("Traceback"):
        return None
    level = re.search(r"\b(TRACE|DEBUG|INFO|WARN|ERROR)\b", line)
    if level is None:
        return re.sub(r"\d+", "N", line)[:160] if "Error" in line or "panicked" in line else None
    message = line[level.end() :].strip()
    return f"{level.group(1)} {re.sub(r'[0-9]+', 'N', message)[:160]}"


def nginx_line(line: str) -> str | None:
    """An nginx error-log line's level and message, without the time, pids, connection numbers, the
    client's address and the request line."""
    match = re.match(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (?:\*\d+ )?(.*)$", line)
    if match is None:
        return None
    level, message = match.groups()
    message = message.split(", client:")[0]
    return f"{level} {re.sub(r'[0-9]+', 'N', message)}"


# --- the report -----------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, int(-(-p * len(sorted_values) // 100)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def buckets(records: list[Record], bucket: float, total: float) -> list[dict]:
    """Per bucket (a minute): requests, errors, p50 and p99 of the requests that expect an answer."""
    count = max(1, int(-(-total // bucket)))
    rows = []
    for i in range(count):
        inside = [r for r in records if i * bucket <= r.at < (i + 1) * bucket or (i == count - 1 and r.at >= total)]
        latencies = sorted(r.latency_ms for r in inside if r.latency_ms is not None)
        rows.append(
            {
                "from_s": i * bucket,
                "to_s": min((i + 1) * bucket, total),
                "requests": len(inside),
                "errors": sum(1 for r in inside if r.error),
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
            }
        )
    return rows


def kind_stats(records: list[Record]) -> dict[str, KindStats]:
    stats = {kind.name: KindStats() for kind in KINDS}
    for r in records:
        s = stats[r.kind]
        s.requests += 1
        if r.error:
            s.errors[r.error] += 1
        if r.latency_ms is not None:
            s.latencies_ms.append(r.latency_ms)
    for s in stats.values():
        s.latencies_ms.sort()
    return stats


@dataclass
class Outcome:
    """Everything the summary, the goals and the JSON read."""

    settings: dict
    environment: dict
    baseline: dict[int, ProcessSample]
    end: dict[int, ProcessSample]
    master_baseline: ProcessSample | None
    master_end: ProcessSample | None
    live: list[dict]
    records: list[Record]
    bucket_seconds: float
    duration: float
    drained: bool
    cpu: dict[str, float]
    metrics: dict[str, float]
    server_log: dict[str, int]
    nginx_log: dict[str, int]
    first_errors: dict[str, str]
    server_exit: int | None


def goals(o: Outcome) -> list[tuple[str, bool, str]]:
    """(goal, held, the figures behind it)."""
    results = []
    same_workers = set(o.baseline) == set(o.end) and len(o.end) == PROCESSES
    results.append(
        (
            "the same workers from the baseline to the end",
            same_workers,
            f"baseline {sorted(o.baseline)}, end {sorted(o.end)}",
        )
    )
    growth = {pid: growth_percent(o.baseline[pid], o.end[pid]) for pid in o.baseline if pid in o.end}
    worst = max(growth.values(), default=float("nan"))
    results.append(
        (
            f"worker RSS growth after the baseline < {MAX_RSS_GROWTH_PERCENT:.0f}%",
            bool(growth) and worst < MAX_RSS_GROWTH_PERCENT,
            ", ".join(f"pid {pid} {g:+.1f}%" for pid, g in growth.items()) or "no worker to compare",
        )
    )
    fds = {pid: (o.baseline[pid], o.end[pid]) for pid in o.baseline if pid in o.end}
    fds_same = bool(fds) and all(b.fd_count == e.fd_count for b, e in fds.values())
    results.append(
        (
            "worker open descriptors unchanged",
            fds_same,
            "; ".join(f"pid {pid} {b.fd_count} → {e.fd_count} ({fd_difference(b, e)})" for pid, (b, e) in fds.items())
            or "no worker to compare",
        )
    )
    errors = sum(1 for r in o.records if r.error)
    results.append(
        (
            "no outcome the traffic did not ask for",
            errors == 0 and o.drained,
            f"{errors} of {len(o.records)} requests" + ("" if o.drained else "; requests still in flight at the end"),
        )
    )
    unexpected = unexpected_lines(o)
    results.append(
        (
            "no warning or error in the server's or nginx's log that the traffic did not ask for",
            not unexpected,
            fmt_counts(unexpected) if unexpected else "none",
        )
    )
    return results


# The log lines the traffic asks for: /raise is an app exception (an aborted upload is an INFO line: the
# client left); nginx warns about every 1 MiB upload it buffers to a file. Anything else at warning level
# or worse, or a panic, is not what the soak sent.
EXPECTED_SERVER_LINES = ("ERROR oxwsgi::wsgi::pool: app raised an exception",)
EXPECTED_NGINX_LINES = ("warn a client request body is buffered to a temporary file",)


def unexpected_lines(o: Outcome) -> dict[str, int]:
    found = {}
    for what, n in o.server_log.items():
        if "panicked" in what or (what.startswith(("WARN", "ERROR")) and not what.startswith(EXPECTED_SERVER_LINES)):
            found[f"server: {what}"] = n
    for what, n in o.nginx_log.items():
        if not what.startswith(EXPECTED_NGINX_LINES):
            found[f"nginx: {what}"] = n
    return found


def growth_percent(before: ProcessSample, after: ProcessSample) -> float:
    return (after.rss_kib - before.rss_kib) / before.rss_kib * 100


def summary(o: Outcome) -> str:
    lines = []
    env = o.environment
    lines.append(f"## oxwsgi soak: {o.duration / 60:.1f} minutes, {PROCESSES} workers × {THREADS} threads")
    lines.append("")
    for key, value in env.items():
        lines.append(f"- {key}: {value}")
    lines.append(
        f"- Traffic: {o.settings['clients']} clients paced to {o.settings['rate']:.0f} requests/s in total; "
        f"{len(o.records)} requests ({len(o.records) / o.duration:.0f}/s)"
    )
    lines.append("- Cores used during the traffic: " + ", ".join(f"{k} {v:.2f}" for k, v in o.cpu.items()))
    lines.append("")
    lines.append("### Workers (read with no request in flight)")
    lines.append("")
    lines.append("| Process | RSS at baseline (MiB) | at end (MiB) | Growth | Open fds at baseline | at end | Threads |")
    lines.append("|---|--:|--:|--:|--:|--:|--:|")
    for i, pid in enumerate(sorted(o.baseline), 1):
        b, e = o.baseline[pid], o.end.get(pid)
        if e is None:
            lines.append(f"| worker {i} (pid {pid}) | {mib(b.rss_kib)} | gone | | {b.fd_count} | gone | {b.threads} |")
            continue
        lines.append(
            f"| worker {i} (pid {pid}) | {mib(b.rss_kib)} | {mib(e.rss_kib)} | {growth_percent(b, e):+.1f}% "
            f"| {b.fd_count} | {e.fd_count} | {b.threads} → {e.threads} |"
        )
    if o.master_baseline and o.master_end:
        b, e = o.master_baseline, o.master_end
        lines.append(
            f"| master (pid {b.pid}) | {mib(b.rss_kib)} | {mib(e.rss_kib)} | {growth_percent(b, e):+.1f}% "
            f"| {b.fd_count} | {e.fd_count} | {b.threads} → {e.threads} |"
        )
    lines.append("")
    lines.append(f"### Latency and errors per {'minute' if o.bucket_seconds == 60 else f'{o.bucket_seconds:.0f} s'}")
    lines.append("")
    lines.append("(p50 and p99 over the requests that expect an answer; aborted kinds are left out)")
    lines.append("")
    lines.append("| Interval | Requests | p50 (ms) | p99 (ms) | Errors | Worker RSS (MiB) |")
    lines.append("|---|--:|--:|--:|--:|---|")
    for row in buckets(o.records, o.bucket_seconds, o.duration):
        rss = next((s["workers_rss_kib"] for s in o.live if s["at"] >= row["to_s"] - SAMPLE_SECONDS / 2), None)
        if rss is None and o.end:
            rss = [o.end[pid].rss_kib for pid in sorted(o.end)]
        rss_text = " / ".join(mib(v) for v in rss) if rss else ""
        lines.append(
            f"| {fmt_time(row['from_s'])}–{fmt_time(row['to_s'])} | {row['requests']} | {ms(row['p50_ms'])} "
            f"| {ms(row['p99_ms'])} | {row['errors']} | {rss_text} |"
        )
    lines.append("")
    lines.append("### Requests by kind")
    lines.append("")
    lines.append("| Kind | Expected | Requests | Unexpected outcomes | p50 (ms) | p99 (ms) |")
    lines.append("|---|---|--:|---|--:|--:|")
    kinds = {k.name: k for k in KINDS}
    for name, s in kind_stats(o.records).items():
        errors = ", ".join(f"{n} {what}" for what, n in s.errors.most_common()) or "0"
        lines.append(
            f"| {name} | {kinds[name].expect} | {s.requests} | {errors} "
            f"| {ms(percentile(s.latencies_ms, 50))} | {ms(percentile(s.latencies_ms, 99))} |"
        )
    lines.append("")
    lines.append("### What the server and nginx counted")
    lines.append("")
    lines.append(
        "- oxwsgi's metrics (counters that are not zero): "
        + ("; ".join(f"{key.removeprefix('oxwsgi_')} {n:.0f}" for key, n in o.metrics.items() if n) or "none")
    )
    lines.append(f"- server log: {fmt_counts(o.server_log)}")
    lines.append(f"- nginx error log: {fmt_counts(o.nginx_log)}")
    lines.append(f"- server exit status: {o.server_exit}")
    if o.first_errors:
        lines.append("- first error of each category:")
        lines.extend(f"  - {what}: {err}" for what, err in o.first_errors.items())
    lines.append("")
    lines.append("### Goals")
    lines.append("")
    for goal, held, figures in goals(o):
        lines.append(f"- {'held' if held else 'FAILED'}: {goal} ({figures})")
    return "\n".join(lines)


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def fmt_counts(counts: dict[str, int]) -> str:
    return "; ".join(f"{n} × {what}" for what, n in counts.items()) or "nothing"


def to_json(o: Outcome) -> dict:
    def proc(s: ProcessSample | None) -> dict | None:
        if s is None:
            return None
        return {"pid": s.pid, "rss_kib": s.rss_kib, "fd_count": s.fd_count, "fds": s.fds, "threads": s.threads}

    stats = kind_stats(o.records)
    return {
        "settings": o.settings,
        "environment": o.environment,
        "duration_s": o.duration,
        "workers": {
            str(pid): {"baseline": proc(o.baseline[pid]), "end": proc(o.end.get(pid))} for pid in sorted(o.baseline)
        },
        "master": {"baseline": proc(o.master_baseline), "end": proc(o.master_end)},
        "live_samples": o.live,
        "buckets": buckets(o.records, o.bucket_seconds, o.duration),
        "kinds": {
            name: {
                "requests": s.requests,
                "errors": dict(s.errors),
                "p50_ms": percentile(s.latencies_ms, 50),
                "p99_ms": percentile(s.latencies_ms, 99),
            }
            for name, s in stats.items()
        },
        "cores": o.cpu,
        "metrics": o.metrics,
        "server_log": o.server_log,
        "nginx_log": o.nginx_log,
        "first_errors": o.first_errors,
        "server_exit": o.server_exit,
        "goals": [{"goal": g, "held": h, "figures": f} for g, h, f in goals(o)],
    }


# --- the run --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, help=f"length of the traffic (default {DEFAULT_MINUTES:g})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a check that it all works: {QUICK_MINUTES:g} minute, {QUICK_BUCKET_SECONDS:g} s buckets",
    )
    parser.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, help=f"client threads (default {DEFAULT_CLIENTS})"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"requests per second, all clients together (default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--oxwsgi",
        type=Path,
        default=Path(os.environ.get("OXWSGI_BIN") or DEFAULT_OXWSGI),
        help="the oxwsgi binary (default: $OXWSGI_BIN or target/release/oxwsgi)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results as JSON")
    parser.add_argument("--no-json", action="store_true", help="write no JSON")
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = QUICK_MINUTES if args.quick else DEFAULT_MINUTES
    args.bucket = QUICK_BUCKET_SECONDS if args.quick else BUCKET_SECONDS
    if args.minutes <= 0 or args.clients < 1 or args.rate <= 0:
        parser.error("--minutes, --clients and --rate must be positive")
    return args


def server_argv(binary: Path, sock: Path, metrics_port: int) -> list[str]:
    """bench.py's oxwsgi command line (a master, no access log, socket mode 666, backlog 1024) in the
    soak's shape, with the metrics endpoint for the cross-check at the end."""
    shape = ["--master", "--processes", str(PROCESSES), "--threads", str(THREADS), "--disable-logging"]
    socket_options = ["--chmod-socket", "666", "--listen", "1024"]
    app = ["--wsgi-file", str(APP), "--callable", "application"]
    return [str(binary), "--socket", str(sock), *shape, *socket_options, "--metrics", f"127.0.0.1:{metrics_port}", *app]


def quiet_point(
    traffic: Traffic, master: int, what: str
) -> tuple[bool, dict[int, ProcessSample], ProcessSample | None]:
    """Pauses the traffic, waits for the server to settle, and reads the workers and the master."""
    drained = traffic.pause()
    time.sleep(SETTLE_SECONDS)
    workers = sample_workers(master)
    print(
        f"[{fmt_time(traffic.elapsed())}] {what}: "
        + "; ".join(
            f"worker pid {pid} RSS {mib(s.rss_kib)} MiB, {s.fd_count} fds, {s.threads} threads"
            for pid, s in sorted(workers.items())
        )
        + ("" if drained else " (requests still in flight!)"),
        flush=True,
    )
    return drained, workers, sample(master)


def soak(args: argparse.Namespace, workdir: Path) -> Outcome:
    original = require_executable(args.oxwsgi, "the oxwsgi binary", "build it with `cargo build --release`")
    # A copy: others may rebuild target/release/oxwsgi during the soak, and the master starts workers from
    # its own executable.
    binary = workdir / "oxwsgi"
    shutil.copy2(original, binary)
    nginx_binary = require_executable(shutil.which("nginx") or "/usr/sbin/nginx", "nginx", "install nginx-light")
    environment = {
        "Date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "oxwsgi": f"{command_output([str(binary), '--version'])}, {oxwsgi_version(original)}",
        "nginx": command_output([str(nginx_binary), "-v"]).removeprefix("nginx version: "),
        "Machine": f"{os.cpu_count()} cores, shared; load average at start {load_average()}",
    }
    print("\n".join(f"{k}: {v}" for k, v in environment.items()), flush=True)

    sock = workdir / "app.sock"
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXWSGI_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    server = Child("oxwsgi", server_argv(binary, sock, metrics_port), workdir / "server.log", env=env)
    wait_listening(server, socket.AF_UNIX, str(sock))
    nginx, port = start_nginx(nginx_binary, workdir / "nginx", f"unix:{sock}", NGINX_TEMPLATE)
    for path, expect in (("/hello", HELLO_BODY), ("/flask/json?name=ready", b'"ready"')):
        status, body = http_get(f"http://127.0.0.1:{port}{path}")
        if status != 200 or expect not in body:
            raise server.failure(f"answered {status} {body[:200]!r} to {path} through nginx")
    workers = wait_for_workers(server, PROCESSES)
    print(f"oxwsgi master pid {server.pid}, workers {workers}; nginx on port {port}", flush=True)

    total = args.minutes * 60
    baseline_at: float | None = min(BASELINE_SECONDS, total / 2)
    traffic = Traffic(port, args.clients, args.rate)
    live: list[dict] = []
    cpu_before = CpuSample.take(server.pid, nginx.pid)
    traffic.start()
    baseline: dict[int, ProcessSample] = {}
    master_baseline = None
    next_sample = SAMPLE_SECONDS
    next_report = args.bucket
    reported = 0
    while (now := traffic.elapsed()) < total:
        if not server.alive() or not nginx.alive():
            raise (server if not server.alive() else nginx).failure("exited during the soak")
        if now >= next_sample:
            workers_now = sample_workers(server.pid)
            live.append(
                {
                    "at": round(now, 1),
                    "pids": sorted(workers_now),
                    "workers_rss_kib": [workers_now[p].rss_kib for p in sorted(workers_now)],
                    "workers_fds": [workers_now[p].fd_count for p in sorted(workers_now)],
                    "workers_threads": [workers_now[p].threads for p in sorted(workers_now)],
                }
            )
            next_sample += SAMPLE_SECONDS
        if now >= next_report:
            records = traffic.snapshot()
            row = buckets(records, args.bucket, next_report)[-1]
            new = records[reported:]
            reported = len(records)
            errors = Counter(f"{r.kind}: {r.error}" for r in new if r.error)
            print(
                f"[{fmt_time(now)}] {row['requests']} requests, "
                f"p50 {ms(row['p50_ms'])} ms, p99 {ms(row['p99_ms'])} ms, "
                f"RSS {' / '.join(mib(v) for v in live[-1]['workers_rss_kib']) if live else '?'} MiB"
                + (f"; errors: {dict(errors)}" if errors else ""),
                flush=True,
            )
            next_report += args.bucket
        if baseline_at is not None and now >= baseline_at:
            _, baseline, master_baseline = quiet_point(traffic, server.pid, "baseline")
            baseline_at = None
            traffic.resume()
        time.sleep(0.2)
    cpu_after = CpuSample.take(server.pid, nginx.pid)
    drained, end, master_end = quiet_point(traffic, server.pid, "end")
    traffic.stop()
    duration = min(traffic.elapsed(), total)
    metrics = scrape_metrics(metrics_port)
    cpu = cpu_before.until(cpu_after)
    wall = duration
    cores = {
        "oxwsgi": cpu.server / wall,
        "nginx": cpu.nginx / wall,
        "clients": cpu.load / wall,
        "others": cpu.others / wall,
        "steal": cpu.steal / wall,
    }
    nginx.stop(signal.SIGTERM)
    server.stop(signal.SIGINT)
    environment["Machine"] += f", at end {load_average()}"
    return Outcome(
        settings={
            "minutes": args.minutes,
            "clients": args.clients,
            "rate": args.rate,
            "processes": PROCESSES,
            "threads": THREADS,
        },
        environment=environment,
        baseline=baseline,
        end=end,
        master_baseline=master_baseline,
        master_end=master_end,
        live=live,
        records=traffic.snapshot(),
        bucket_seconds=args.bucket,
        duration=duration,
        drained=drained,
        cpu=cores,
        metrics=metrics,
        server_log=log_summary(workdir / "server.log", server_line),
        nginx_log=log_summary(workdir / "nginx" / "error.log", nginx_line),
        first_errors=traffic.first_error,
        server_exit=server.popen.returncode,
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_entry_point("soak", lambda workdir: run(args, workdir))


def run(args: argparse.Namespace, workdir: Path) -> int:
    outcome = soak(args, workdir)
    print("\n" + summary(outcome))
    if not args.no_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(outcome), indent=1) + "\n")
        print(f"\nwritten to {args.json}")
    failed = [goal for goal, held, _ in goals(outcome) if not held]
    if failed:
        print(f"!!! goals failed: {'; '.join(failed)}: exit status 1", file=sys.stderr)
        print(f"--- server log ---\n{tail(workdir / 'server.log')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
