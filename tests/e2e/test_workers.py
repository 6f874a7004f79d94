"""The master and its workers behind real nginx, under load from a concurrent client: a SIGHUP reload,
--max-requests recycling, a SIGTERM and a SIGKILLed worker cost no request beyond what each promises.

Load comes from LOAD_THREADS client threads, each sending a bounded number of requests. Nothing here
asserts a duration: every wait is a bounded poll."""

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import APPS, HTTP_TIMEOUT, READY_INTERVAL, READY_TRIES

LOAD_THREADS = 8


class Load:
    """LOAD_THREADS threads sending GETs to `url` until each sent `per_thread`, or stop() is called."""

    def __init__(self, url: str, per_thread: int):
        self.url, self.per_thread = url, per_thread
        self.statuses: Counter = Counter()
        self.errors: list[str] = []
        self.bodies: Counter = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(LOAD_THREADS)]

    def run(self):
        with requests.Session() as session:
            for _ in range(self.per_thread):
                if self.stopping.is_set():
                    return
                try:
                    response = session.get(self.url, timeout=HTTP_TIMEOUT)
                    with self.lock:
                        self.statuses[response.status_code] += 1
                        self.bodies[response.text.split()[-1] if response.ok else ""] += 1
                except requests.RequestException as err:
                    with self.lock:
                        self.errors.append(repr(err))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set() if exc[0] else None
        for thread in self.threads:
            thread.join()

    def sent(self) -> int:
        with self.lock:
            return sum(self.statuses.values()) + len(self.errors)

    def wait_sent(self, count: int):
        for _ in range(READY_TRIES * 4):
            if self.sent() >= count:
                return
            time.sleep(READY_INTERVAL)
        pytest.fail(f"the load never reached {count} requests (sent {self.sent()})")


def wait_for(condition, what: str, stack):
    for _ in range(READY_TRIES):
        if condition():
            return
        time.sleep(READY_INTERVAL)
    pytest.fail(f"never happened: {what}\n{stack.report()}")


def versioned_app(directory: Path, version: int) -> Path:
    path = directory / "versioned_app.py"
    path.write_text(
        "import os\n\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        f"    return [b'pid=%d version={version}' % os.getpid()]\n"
    )
    return path


def test_sighup_reload_under_load_loses_nothing_and_loads_the_new_code(launcher, tmp_path):
    app = versioned_app(tmp_path, 1)
    stack = launcher.start(["--wsgi-file", str(app)], extra_args=["--processes", "2", "--threads", "2"])
    try:
        with Load(stack.url("/"), per_thread=400) as load:
            load.wait_sent(600)
            versioned_app(tmp_path, 2)
            stack.oxwsgi.popen.send_signal(signal.SIGHUP)
            wait_for(lambda: "retired" in stack.oxwsgi_log(), "an old worker retired", stack)
        assert load.errors == [], load.errors[:5]
        assert load.statuses == Counter({200: LOAD_THREADS * 400}), (load.statuses, stack.report())
        assert load.bodies["version=1"] > 0 and load.bodies["version=2"] > 0, load.bodies
        wait_for(lambda: stack.oxwsgi_log().count("retired") >= 2, "both old workers retired", stack)
        answers = {requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).text.split()[-1] for _ in range(20)}
        assert answers == {"version=2"}
    finally:
        stack.stop()


def test_max_requests_recycles_under_load_without_failures(launcher):
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "workers_app.py")],
        extra_args=["--processes", "2", "--max-requests", "50", "--max-requests-jitter", "10"],
    )
    try:
        with Load(stack.url("/"), per_thread=250) as load:
            pass
        assert load.errors == [], load.errors[:5]
        assert load.statuses == Counter({200: LOAD_THREADS * 250}), (load.statuses, stack.report())
        log = stack.oxwsgi_log()
        assert log.count("--max-requests reached") >= 5, stack.report()
        assert log.count("retired") >= 5, stack.report()
    finally:
        stack.stop()


def test_sigterm_under_load_completes_accepted_requests(launcher):
    stack = launcher.start(["--wsgi-file", str(APPS / "workers_app.py")], extra_args=["--processes", "2"])
    socket_file = stack.socket_path
    try:
        with Load(stack.url("/sleep?ms=50"), per_thread=60) as load:
            load.wait_sent(40)
            stack.oxwsgi.popen.send_signal(signal.SIGTERM)
            status = stack.oxwsgi.popen.wait(timeout=60)
        assert status == 0, stack.report()
        assert not socket_file.exists(), "the socket file must be removed"
        # Requests after the stop get 502 from nginx (nothing listens); none that oxwsgi accepted may be
        # cut: nginx would log a premature close or a reset for those.
        error_log = (stack.nginx.log_path.parent / "error.log").read_text()
        assert "prematurely closed" not in error_log and "reset by peer" not in error_log, error_log[-3000:]
        served = stack.oxwsgi_log().count("GET /sleep?ms=50 => 200")
        assert load.statuses[200] == served > 0, (load.statuses, served)
    finally:
        stack.stop()


def test_sigkill_of_a_worker_costs_only_its_own_requests(launcher):
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "workers_app.py")], extra_args=["--processes", "2", "--threads", "2"]
    )
    try:
        pids = set()
        wait_for(
            lambda: pids.add(int(requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).text.split()[0][4:]))
            or len(pids) == 2,
            "both workers answered",
            stack,
        )
        victim = min(pids)
        with Load(stack.url("/sleep?ms=20"), per_thread=100) as load:
            load.wait_sent(100)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: "was killed by signal 9" in stack.oxwsgi_log(), "the master saw the kill", stack)
        # What the killed worker had accepted may fail (2 connections per thread, 2 threads); nothing else.
        failed = sum(n for code, n in load.statuses.items() if code != 200) + len(load.errors)
        assert failed <= 4, (load.statuses, load.errors[:5], stack.report())
        answering = set()
        wait_for(
            lambda: answering.add(int(requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).text.split()[0][4:]))
            or len(answering - pids) >= 1,
            "a replacement worker answered",
            stack,
        )
    finally:
        stack.stop()


def test_harakiri_kills_a_stuck_request_logs_where_and_replaces_the_worker(launcher):
    stack = launcher.start(
        ["--wsgi-file", str(APPS / "workers_app.py")],
        extra_args=["--processes", "2", "--harakiri", "2"],
    )
    try:
        stuck = requests.get(stack.url("/sleep?ms=60000"), timeout=HTTP_TIMEOUT)
        assert stuck.status_code == 502, (stuck.status_code, stack.report())
        log = stack.oxwsgi_log()
        assert "HARAKIRI: GET /sleep?ms=60000 has run" in log, stack.report()
        # The stack names the app's sleeping line.
        assert 'workers_app.py", line' in log and "time.sleep(" in log, stack.report()
        wait_for(
            lambda: "retired: it was killed by signal 9" in stack.oxwsgi_log(), "the stuck worker was killed", stack
        )
        # The other worker and the replacement serve on.
        statuses = Counter(requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code for _ in range(20))
        assert statuses == Counter({200: 20}), statuses
        assert stack.oxwsgi_log().count(" ready") >= 3, "no replacement worker became ready"
    finally:
        stack.stop()
