#!/usr/bin/env python3
"""What a server costs while it has no file descriptor left: uWSGI and oxwsgi side by side, each with one
worker of four threads whose RLIMIT_NOFILE is lowered to 64 while it runs (what a too-small LimitNOFILE
gives), then 300 idle connections opened to its socket. For a window it reports the server's CPU (all its
processes, % of one core), the lines it logged about failing accepts, and whether it answers again once the
connections close.

Run after bench/run.sh has installed the servers:  python3 bench/exhaustion.py [--seconds 10]

A server that spins on a failing accept() shows as ~100% of a core; one that backs off, near 0%. This is
a measurement, not a test: the tests check that oxwsgi logs the failure once a second and recovers
(tests/e2e/test_chaos.py)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.proc_stats import tree_cpu_ticks, worker_pids  # noqa: E402
from lib.procs import Child, wait_listening  # noqa: E402
from lib.servers import OXWSGI, UWSGI, Serving, Shape, server_argv, server_env, uwsgi_get  # noqa: E402
from lib.tools import REPO, find_tools  # noqa: E402

# The descriptor limit each worker is lowered to, and the idle connections that exhaust it.
NOFILE_LIMIT = 64
IDLE_CONNECTIONS = 300
# After the connections close, this many tries (one a second) for the server to answer again.
RECOVERY_TRIES = 30
# After opening the connections, this long for the server to run into the limit before measuring.
SETTLE_SECONDS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def accept_lines(log: Path) -> list[str]:
    """The log lines about failing accepts (both servers say "accept")."""
    return [line for line in log.read_text(errors="replace").splitlines() if "accept" in line.lower()]


def measure(tools, config, workdir: Path, seconds: float) -> dict:
    sock = workdir / f"{config.kind}.sock"
    serving = Serving(REPO / "bench" / "apps" / "shapes.py", Shape(1, 4), False, "/bytes", b"")
    argv = server_argv(tools, config, serving, sock)
    argv.remove("--disable-logging")  # the point is what it logs
    log = workdir / f"{config.kind}.log"
    server = Child(config.name, argv, log, env=server_env(workdir / "file"))
    try:
        wait_listening(server, socket.AF_UNIX, str(sock))
        assert uwsgi_get(sock, "/bytes")[0] == 200
        for pid in worker_pids(server.popen.pid):
            subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={NOFILE_LIMIT}:{NOFILE_LIMIT}"], check=True)
        idle = []
        for _ in range(IDLE_CONNECTIONS):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(sock))
            idle.append(conn)
        time.sleep(SETTLE_SECONDS)
        lines_before = len(accept_lines(log))
        ticks_before = sum(tree_cpu_ticks(server.popen.pid).values())
        time.sleep(seconds)
        ticks = sum(tree_cpu_ticks(server.popen.pid).values()) - ticks_before
        lines = len(accept_lines(log)) - lines_before
        last_line = accept_lines(log)[-1] if lines else ""
        for conn in idle:
            conn.close()
        recovered_after = None
        for attempt in range(RECOVERY_TRIES):
            try:
                if uwsgi_get(sock, "/bytes")[0] == 200:
                    recovered_after = attempt
                    break
            except OSError:
                pass
            time.sleep(1)
        return {
            "cpu_percent": 100 * ticks / CLOCK_TICKS / seconds,
            "lines_per_second": lines / seconds,
            "last_line": last_line[:160],
            "recovered_after_tries": recovered_after,
        }
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the measured window")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oxwsgi-exhaustion.") as tmp:
        workdir = Path(tmp)
        (workdir / "file").write_bytes(b"x")
        tools = find_tools(REPO / "target" / "release" / "oxwsgi", REPO / "target" / "release" / "examples", [], False, workdir)
        print(f"{NOFILE_LIMIT} descriptors per worker, {IDLE_CONNECTIONS} idle connections, {args.seconds:.0f} s window")
        print(f"{'server':8} {'CPU % of a core':>16} {'accept lines/s':>14} {'answers again':>14}  last log line")
        for config in (UWSGI, OXWSGI):
            result = measure(tools, config, workdir, args.seconds)
            recovered = result["recovered_after_tries"]
            again = "no" if recovered is None else f"after {recovered} s"
            print(
                f"{config.name:8} {result['cpu_percent']:16.1f} {result['lines_per_second']:14.1f} {again:>14}"
                f"  {result['last_line']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
