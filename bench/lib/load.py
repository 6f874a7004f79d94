"""The load generators and the system-call counter, each turned into one `LoadResult`:

- wrk through nginx (throughput with N connections for a fixed time);
- uwsgi_load (bench/uwsgi_load.rs) straight to the server's Unix socket, with no nginx in the way, and
  with idle connections held open beside the real ones;
- a sequential HTTP client in this process, for the 100 MiB uploads and downloads (a few requests, one
  after the other, whose time and memory matter more than their rate);
- strace -c, attached to every thread of a server's process tree while uwsgi_load runs."""

from __future__ import annotations

import http.client
import itertools
import json
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .proc_stats import thread_ids
from .procs import BenchError, Child
from .tools import Tools

# One wrk thread: on a 2-core machine the cores are shared between wrk, nginx and the server, and one
# thread drives 32 connections easily.
WRK_THREADS = 1
# A load generator gets this long past its duration before it is considered hung.
LOAD_OVERRUN_SECONDS = 30
# uwsgi_load: a request not answered within this long counts as a timeout; wrk's default, so that a
# timeout means the same with and without nginx.
REQUEST_TIMEOUT_SECONDS = 2
# uwsgi_load --requests N (the syscall count) must finish within this long, strace slowing it down.
COUNTED_RUN_TIMEOUT_SECONDS = 300
# The sequential client's socket timeout: nginx buffers a 100 MiB upload to disk before it passes it on,
# which takes a few seconds on a slow disk.
SEQUENTIAL_TIMEOUT_SECONDS = 120
# The sequential client sends and receives in pieces of this size (its own cost stays small beside the
# server's; the app reads 64 KiB at a time whatever the client sends).
CLIENT_CHUNK = 1024 * 1024
# strace attaches asynchronously; every thread of the tree must be traced within this long.
STRACE_ATTACH_TIMEOUT_SECONDS = 10
STRACE_POLL_SECONDS = 0.05

ERROR_KINDS = ("connect", "write", "read", "timeout", "malformed")


@dataclass
class IdleStats:
    """uwsgi_load --idle: how many silent connections it tried to hold, how many were open at the least
    and on average, and how many the server closed (and were reopened)."""

    target: int
    open_min: int
    open_avg: float
    replaced: int


@dataclass
class LoadResult:
    """What a load generator saw: responses by outcome, socket errors by kind, latency percentiles."""

    requests: int
    seconds: float
    non_2xx: int
    errors: dict[str, int] = field(default_factory=dict)
    # 2xx answers whose body was wrong (the sequential client checks byte counts).
    wrong: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    bytes_received: int = 0
    idle: IdleStats | None = None

    @property
    def good(self) -> int:
        return self.requests - self.non_2xx - self.wrong

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def good_rps(self) -> float:
        return self.good / self.seconds if self.seconds else 0.0

    @property
    def timeouts(self) -> int:
        return self.errors.get("timeout", 0)

    @property
    def socket_errors(self) -> int:
        """Every error but timeouts."""
        return sum(n for kind, n in self.errors.items() if kind != "timeout")

    def problems(self, errors_are_results: bool = False) -> list[str]:
        """Why this load makes a run invalid; with `errors_are_results` (idle-1500), socket errors and
        timeouts are what is measured and only wrong answers count."""
        problems = []
        if self.non_2xx:
            problems.append(f"{self.non_2xx} non-2xx responses")
        if self.wrong:
            problems.append(f"{self.wrong} responses with a wrong body length or byte count")
        if not errors_are_results:
            errors = {kind: n for kind, n in self.errors.items() if n}
            if errors:
                problems.append("socket errors: " + ", ".join(f"{kind} {n}" for kind, n in errors.items()))
            if self.requests == 0:
                problems.append("no request completed")
        return problems


# --- wrk ------------------------------------------------------------------------------------------------

WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_LATENCY = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
# The mean latency, the first number of the `Latency` line of wrk's thread stats.
WRK_MEAN_LATENCY = re.compile(r"^\s+Latency\s+([\d.]+)(us|ms|s|m)\b", re.M)
WRK_READ = re.compile(r"requests in [\d.]+\w+, ([\d.]+)(B|KB|MB|GB|TB) read")
SECONDS_PER_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
BYTES_PER_UNIT = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_wrk(output: str) -> LoadResult:
    total = WRK_TOTAL.search(output)
    if total is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    non_2xx = WRK_NON_2XX.search(output)
    errors = WRK_SOCKET_ERRORS.search(output)
    read = WRK_READ.search(output)
    latency_ms = {f"p{p}": float(v) * SECONDS_PER_UNIT[u] * 1e3 for p, v, u in WRK_LATENCY.findall(output)}
    if mean := WRK_MEAN_LATENCY.search(output):
        latency_ms["mean"] = float(mean[1]) * SECONDS_PER_UNIT[mean[2]] * 1e3
    return LoadResult(
        requests=int(total[1]),
        seconds=float(total[2]) * SECONDS_PER_UNIT[total[3]],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        errors=dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()))) if errors else {},
        latency_ms=latency_ms,
        bytes_received=int(float(read[1]) * BYTES_PER_UNIT[read[2]]) if read else 0,
    )


def run_wrk(tools: Tools, url: str, connections: int, seconds: int, log_path: Path) -> LoadResult:
    argv = [str(tools.wrk), f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    wrk = Child("wrk", argv, log_path)
    status = wrk.finish(seconds + LOAD_OVERRUN_SECONDS)
    if status != 0:
        raise wrk.failure(f"exited with status {status}")
    return parse_wrk(log_path.read_text(errors="replace"))


# --- uwsgi_load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectLoad:
    """An uwsgi_load invocation: `duration` seconds or exactly `requests`, `idle` silent connections."""

    path: str
    connections: int
    duration: int | None = None
    requests: int | None = None
    idle: int = 0

    def argv(self, binary: Path, sock: Path) -> list[str]:
        argv = [str(binary), "--target", f"unix:{sock}", "--connections", str(self.connections)]
        argv += ["--path", self.path, "--timeout", str(REQUEST_TIMEOUT_SECONDS), "--json"]
        if self.duration is not None:
            argv += ["--duration", str(self.duration)]
        if self.requests is not None:
            argv += ["--requests", str(self.requests)]
        if self.idle:
            argv += ["--idle", str(self.idle)]
        return argv

    @property
    def timeout(self) -> float:
        if self.duration is not None:
            return self.duration + LOAD_OVERRUN_SECONDS
        return COUNTED_RUN_TIMEOUT_SECONDS


def parse_uwsgi_load(text: str) -> LoadResult:
    """uwsgi_load --json prints exactly one object (the interface is in bench/README.md)."""
    doc = json.loads(text)
    idle = doc.get("idle")
    return LoadResult(
        requests=int(doc["requests"]),
        seconds=float(doc["seconds"]),
        non_2xx=int(doc["non_2xx"]),
        errors={kind: int(doc["errors"].get(kind, 0)) for kind in ERROR_KINDS},
        latency_ms={k: float(v) for k, v in doc.get("latency_ms", {}).items()},
        bytes_received=int(doc.get("bytes_received", 0)),
        idle=IdleStats(int(idle["target"]), int(idle["open_min"]), float(idle["open_avg"]), int(idle["replaced"]))
        if idle
        else None,
    )


def run_uwsgi_load(tools: Tools, sock: Path, load: DirectLoad, log_prefix: Path) -> LoadResult:
    """Runs uwsgi_load to completion; its JSON goes to PREFIX.json, its stderr to PREFIX.log."""
    out, log = log_prefix.with_suffix(".json"), log_prefix.with_suffix(".log")
    child = Child("uwsgi_load", load.argv(tools.require("uwsgi_load"), sock), log, stdout_path=out)
    status = child.finish(load.timeout)
    if status != 0:
        raise child.failure(f"exited with status {status}")
    text = out.read_text(errors="replace")
    try:
        return parse_uwsgi_load(text)
    except (ValueError, KeyError, TypeError) as err:
        raise child.failure(f"printed what is not the expected JSON ({err!r}):\n{text[:1000]}") from None


# --- a sequential HTTP client through nginx, for the 100 MiB bodies -------------------------------------


@dataclass(frozen=True)
class SequentialLoad:
    """`count` requests one after the other: a POST of `upload_bytes`, or a GET whose body must be
    `download_bytes` long (read and discarded)."""

    path: str
    count: int
    upload_bytes: int = 0
    download_bytes: int = 0


def sequential_http(base_url: str, load: SequentialLoad, log_path: Path) -> LoadResult:
    """Sends the requests through nginx from this process, one connection each (as wrk does), and checks
    every answer: 2xx, and the byte count the app reports (upload) or the body length (download). A
    failed request is recorded as an error and in the log; the others still run."""
    host, port = base_url.removeprefix("http://").split(":")
    client = Client(host, int(port), memoryview(b"u" * CLIENT_CHUNK), bytearray(CLIENT_CHUNK))
    result = LoadResult(requests=0, seconds=0.0, non_2xx=0, errors={kind: 0 for kind in ERROR_KINDS})
    latencies = []
    with open(log_path, "w") as log:
        start = time.monotonic()
        for i in range(1, load.count + 1):
            began = time.monotonic()
            try:
                status, received, head = client.send(load)
            except TimeoutError as err:
                result.errors["timeout"] += 1
                log.write(f"request {i}: timeout: {err}\n")
                continue
            except (OSError, http.client.HTTPException) as err:
                result.errors["read"] += 1
                log.write(f"request {i}: {type(err).__name__}: {err}\n")
                continue
            latencies.append((time.monotonic() - began) * 1e3)
            log.write(f"request {i}: {status}, {received} bytes, {latencies[-1]:.0f} ms, {head!r}\n")
            result.requests += 1
            result.bytes_received += received
            if status // 100 != 2:
                result.non_2xx += 1
            elif load.upload_bytes and head.strip() != str(load.upload_bytes).encode():
                result.wrong += 1
            elif load.download_bytes and received != load.download_bytes:
                result.wrong += 1
        result.seconds = time.monotonic() - start
    if latencies:
        latencies.sort()
        result.latency_ms = {"p50": latencies[len(latencies) // 2], "max": latencies[-1]}
    return result


# The first bytes of a response body kept for checking and for the log (the upload's byte count).
BODY_HEAD_BYTES = 40


@dataclass
class Client:
    """The sequential client's connection target and its two reusable buffers: the upload's piece (sent
    again and again) and the download's read buffer (overwritten by every read)."""

    host: str
    port: int
    piece: memoryview
    buffer: bytearray

    def send(self, load: SequentialLoad) -> tuple[int, int, bytes]:
        """One request on a new connection: (status, body bytes received, the body's first bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=SEQUENTIAL_TIMEOUT_SECONDS)
        try:
            if load.upload_bytes:
                pieces, rest = divmod(load.upload_bytes, len(self.piece))
                body = itertools.chain(itertools.repeat(self.piece, pieces), [self.piece[:rest]] if rest else [])
                headers = {"Content-Length": str(load.upload_bytes), "Content-Type": "application/octet-stream"}
                conn.request("POST", load.path, body=body, headers=headers)
            else:
                conn.request("GET", load.path)
            response = conn.getresponse()
            received, head = 0, b""
            while n := response.readinto(self.buffer):
                if len(head) < BODY_HEAD_BYTES:
                    head += bytes(self.buffer[: min(n, BODY_HEAD_BYTES - len(head))])
                received += n
            return response.status, received, head
        finally:
            conn.close()


# --- strace ---------------------------------------------------------------------------------------------

# `strace -c` summary lines: % time, seconds, usecs/call, calls, [errors], syscall.
STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """Calls by system call name, from strace -c's table (the `total` line left out)."""
    counts = {}
    for line in text.splitlines():
        match = STRACE_LINE.match(line)
        if match and match[2] != "total":
            counts[match[2]] = int(match[1])
    return counts


class Strace:
    """strace -c -f attached to every process of a tree (-f: and all their threads), counting system calls
    until `stop`, which detaches it and returns the counts."""

    def __init__(self, tools: Tools, pids: list[int], run_dir: Path):
        if tools.strace is None:
            raise BenchError("internal: strace was not looked for")
        self.pids = pids
        self.summary = run_dir / "strace.txt"
        argv = [str(tools.strace), "-c", "-f", "-o", str(self.summary)]
        for pid in pids:
            argv += ["-p", str(pid)]
        self.child = Child("strace", argv, run_dir / "strace.log")

    def wait_attached(self) -> None:
        """Returns once every thread of every process reports strace as its tracer."""
        deadline = time.monotonic() + STRACE_ATTACH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise self.child.failure("exited before it was attached")
            tids = [(pid, tid) for pid in self.pids for tid in thread_ids(pid)]
            if tids and all(tracer_pid(pid, tid) == self.child.pid for pid, tid in tids):
                return
            time.sleep(STRACE_POLL_SECONDS)
        raise self.child.failure(f"did not attach to every thread of {self.pids} in {STRACE_ATTACH_TIMEOUT_SECONDS}s")

    def stop(self) -> dict[str, int]:
        """SIGINT makes strace detach and write its summary."""
        self.child.stop(signal.SIGINT)
        counts = parse_strace_summary(self.summary.read_text(errors="replace")) if self.summary.exists() else {}
        if not counts:
            raise self.child.failure(f"wrote no summary to {self.summary}")
        return counts


def tracer_pid(pid: int, tid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None
