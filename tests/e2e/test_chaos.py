"""Faults injected under real load through nginx: workers killed at random, an app that crashes its
process, a master killed outright, a worker out of file descriptors. The promise tested: a fault costs at
most the requests it touches, the server recovers by itself, and the log says what happened.

Every wait is a bounded poll; nothing asserts a duration."""

import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, READY_INTERVAL, READY_TRIES, Process
from test_workers import Load, wait_for

WORKERS_APP = ["--wsgi-file", str(APPS / "workers_app.py")]

# The random-kill test: a SIGKILL to a random worker this often, for this long.
KILL_EVERY_SECONDS = 0.5
KILL_FOR_SECONDS = 10
# Connections a worker can lose when killed, per Python thread: the request the thread runs and one it
# accepted ahead of time (a thread takes the next connection before it sleeps, when one is waiting).
LOST_PER_THREAD = 2
# The descriptor limit a worker is lowered to, and how many idle connections are opened to exhaust it.
NOFILE_LIMIT = 64
IDLE_CONNECTIONS = 300
# How long the exhausted worker is watched, and the most accept-failure lines that may be logged meanwhile
# (one a second, plus one for the second the window starts in).
EXHAUSTED_SECONDS = 4


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def serving_workers(stack, count: int) -> set[int]:
    """Waits until the master has `count` workers that all said they are ready; returns their pids."""
    master = stack.oxwsgi.popen.pid

    def ready() -> bool:
        pids = children(master)
        log = stack.oxwsgi_log()
        return len(pids) == count and all(f"(pid {pid}) ready" in log for pid in pids)

    wait_for(ready, f"{count} workers serving", stack)
    return children(master)


def test_random_sigkills_cost_only_the_killed_workers_requests(launcher):
    threads = 2
    stack = launcher.start(WORKERS_APP, extra_args=["--processes", "4", "--threads", str(threads)])
    try:
        serving_workers(stack, 4)
        killed = []
        with Load(stack.url("/sleep?ms=5"), per_thread=100_000) as load:
            load.wait_sent(50)
            deadline = time.monotonic() + KILL_FOR_SECONDS
            while time.monotonic() < deadline:
                victims = sorted(pid for pid in children(stack.oxwsgi.popen.pid) - set(killed) if alive(pid))
                if victims:
                    victim = random.choice(victims)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                time.sleep(KILL_EVERY_SECONDS)
            load.stopping.set()
        failed = sum(n for code, n in load.statuses.items() if code != 200) + len(load.errors)
        assert load.statuses[200] > 0, (load.statuses, stack.report())
        assert failed <= len(killed) * threads * LOST_PER_THREAD, (
            f"{failed} failed for {len(killed)} kills",
            load.statuses,
            load.errors[:5],
            stack.report(),
        )
        # Every killed worker was seen with its signal, and replaced: four serve again.
        # (A worker killed before it was ready "could not start: it was killed ...".)
        for pid in killed:
            wait_for(
                lambda: any(
                    f"(pid {pid})" in line and "killed by signal 9 (SIGKILL)" in line
                    for line in stack.oxwsgi_log().splitlines()
                ),
                f"the master logged the kill of {pid}",
                stack,
            )
        replacements = serving_workers(stack, 4)
        assert not replacements & set(killed)
        statuses = [requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code for _ in range(20)]
        assert statuses == [200] * 20, statuses
    finally:
        stack.stop()


@pytest.mark.parametrize(
    ("path", "how"),
    [("/segfault", "was killed by signal 11 (SIGSEGV)"), ("/exit", "exited with status 3")],
)
def test_an_app_that_kills_its_worker_costs_one_request_and_is_named(launcher, tmp_path, path, how):
    # One thread per worker: the slow request keeps one worker's only thread busy, so the fatal request
    # is taken by the other worker.
    stack = launcher.start(WORKERS_APP, extra_args=["--processes", "2", "--threads", "1"])
    try:
        serving_workers(stack, 2)
        started = tmp_path / "started"
        slow = {}
        slow_thread = threading.Thread(
            target=lambda: slow.update(
                response=requests.get(stack.url(f"/sleep?ms=2000&started={started}"), timeout=HTTP_TIMEOUT)
            )
        )
        slow_thread.start()
        wait_for(started.exists, "the slow request is inside the app", stack)
        fatal = requests.get(stack.url(path), timeout=HTTP_TIMEOUT)
        assert fatal.status_code == 502, (fatal.status_code, stack.report())
        slow_thread.join()
        # The request running on the other worker is unaffected.
        assert slow["response"].status_code == 200, (slow["response"].status_code, stack.report())
        line = f"{how} while running GET {path}; starting a new one"
        wait_for(lambda: line in stack.oxwsgi_log(), f"the master logged {line!r}", stack)
        serving_workers(stack, 2)
        statuses = [requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code for _ in range(20)]
        assert statuses == [200] * 20, statuses
    finally:
        stack.stop()


def test_workers_of_a_killed_master_exit_and_the_next_start_takes_the_socket(launcher):
    stack = launcher.start(WORKERS_APP, extra_args=["--processes", "2"])
    try:
        workers = serving_workers(stack, 2)
        stack.oxwsgi.popen.send_signal(signal.SIGKILL)
        stack.oxwsgi.popen.wait()
        # No orphan keeps serving: each worker is told (parent-death signal) and exits by itself.
        wait_for(lambda: not any(alive(pid) for pid in workers), "every orphaned worker exited", stack)
        assert stack.socket_path is not None and stack.socket_path.exists(), "the socket file is left behind"
        # The next start on the same path takes over the stale socket file, and nginx reaches it.
        old = stack.oxwsgi
        stack.oxwsgi = Process("oxwsgi", old.argv, old.log_path.with_name("oxwsgi-restarted.log"), env=old.env)
        stack.oxwsgi.start()
        stack.oxwsgi.wait_listening(str(stack.socket_path))
        serving_workers(stack, 2)
        statuses = [requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code for _ in range(20)]
        assert statuses == [200] * 20, (statuses, stack.report())
    finally:
        stack.stop()


def test_exhausted_descriptors_are_logged_once_a_second_and_serving_resumes(launcher):
    # Four threads, each failing to accept on its own: without the shared limit, four lines a second.
    stack = launcher.start(WORKERS_APP, extra_args=["--threads", "4"])
    try:
        assert requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code == 200
        # oxwsgi raises its soft limit to the hard one at start; lowering both afterwards is what a
        # too-small LimitNOFILE would have given it.
        pid = stack.oxwsgi.popen.pid
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={NOFILE_LIMIT}:{NOFILE_LIMIT}"], check=True)
        idle = []
        try:
            for _ in range(IDLE_CONNECTIONS):
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(str(stack.socket_path))
                idle.append(conn)
            wait_for(lambda: "accept failed" in stack.oxwsgi_log(), "an accept failure was logged", stack)
            before = stack.oxwsgi_log().count("accept failed")
            time.sleep(EXHAUSTED_SECONDS)
            logged = stack.oxwsgi_log().count("accept failed") - before
            # At most one line a second (plus one for the partial second at each end), not one per failure.
            assert logged <= EXHAUSTED_SECONDS + 2, (logged, stack.report())
            log = stack.oxwsgi_log()
            assert "Too many open files" in log and "LimitNOFILE" in log, stack.report()
            assert alive(pid)
        finally:
            for conn in idle:
                conn.close()
        # Once the idle peers are gone, their descriptors come back and requests are served again.
        wait_for(
            lambda: requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code == 200,
            "a request served after the descriptors came back",
            stack,
        )
        statuses = [requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code for _ in range(20)]
        assert statuses == [200] * 20, statuses
    finally:
        stack.stop()
