"""`pip install` end to end: the wheel `pip wheel .` builds (maturin, from pyproject.toml) is installed with
Flask into a fresh virtualenv, and that virtualenv's `oxwsgi` serves a Flask app through real nginx with a
master and two workers — which must run the virtualenv's interpreter with its packages — through a
harakiri, a SIGHUP reload, metrics, socket activation, SIGINT and SIGTERM.

The build compiles the crate in release mode (minutes the first time; cargo keeps its work in
target/wheel, apart from target/release, so later runs rebuild only what changed). Building needs cargo
and PyPI (maturin for the build, Flask for the virtualenv): without them the tests fail under CI=true or
OXWSGI_E2E_STRICT=1, and are skipped loudly otherwise.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import (
    APPS,
    HTTP_TIMEOUT,
    READY_INTERVAL,
    READY_TRIES,
    REPO,
    Launcher,
    Process,
    Stack,
    find_nginx,
    free_port,
    in_ci,
    tail,
)

APP = APPS / "venv_flask_app.py"
# cargo's build directory for the wheel: an extension module is built with other settings than the
# standalone binary, so sharing target/release would rebuild both in turn.
WHEEL_TARGET_DIR = REPO / "target" / "wheel"
# A release build of the whole crate, with the build dependencies fetched.
BUILD_TIMEOUT_SECONDS = 30 * 60
INSTALL_TIMEOUT_SECONDS = 10 * 60
HARAKIRI_SECONDS = 2
# What a master hands a worker in its environment, besides OXWSGI_WORKER_ID (src/master/contract.rs).
HANDOFF_VARIABLES = {
    "OXWSGI_MASTER_PID",
    "OXWSGI_CONFIG",
    "OXWSGI_LISTEN_FDS",
    "OXWSGI_READY_FD",
    "OXWSGI_METRICS_FD",
    "OXWSGI_METRICS_CELL",
}


def missing(reason: str):
    if in_ci():
        pytest.fail(f"strict mode (CI=true or OXWSGI_E2E_STRICT=1): {reason}", pytrace=False)
    pytest.skip(f"!!! SKIPPED: {reason}")


def run_logged(argv: list[str], log: Path, timeout: int, **kwargs) -> None:
    """Runs `argv` with its output in `log`; a failure fails the test with the log's tail."""
    with open(log, "wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kwargs).returncode
    if code != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited with status {code}\n--- {log} ---\n{tail(log)}", pytrace=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("cargo") is None:
        missing("cargo is not installed, so the wheel cannot be built; install Rust (https://rustup.rs)")
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, CARGO_TARGET_DIR=str(WHEEL_TARGET_DIR))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", out, REPO]
    run_logged(command, out / "build.log", BUILD_TIMEOUT_SECONDS, env=env, cwd=REPO)
    wheels = list(out.glob("oxwsgi-*.whl"))
    assert len(wheels) == 1, (wheels, tail(out / "build.log"))
    return wheels[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh virtualenv with the wheel and Flask (pinned as in tests/requirements.txt) installed."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", root], check=True, timeout=INSTALL_TIMEOUT_SECONDS)
    flask = next(line for line in (REPO / "tests" / "requirements.txt").read_text().splitlines() if line.startswith("Flask"))
    pip = [root / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", wheel, flask]
    run_logged(pip, root.parent / "install.log", INSTALL_TIMEOUT_SECONDS)
    assert (root / "bin" / "oxwsgi").is_file(), "the wheel installed no oxwsgi command"
    return root


def venv_env() -> dict[str, str]:
    """The tests' environment without what would point Python at other packages than the virtualenv's."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for name in ("OXWSGI_LOG", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


class VenvLauncher(Launcher):
    def oxwsgi_env(self) -> dict[str, str]:
        return venv_env()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, venv, metrics_port):
    launcher = VenvLauncher(tmp_path_factory, venv / "bin" / "oxwsgi")
    extra = ["--processes", "2", "--harakiri", str(HARAKIRI_SECONDS), "--metrics", f"127.0.0.1:{metrics_port}"]
    stack = launcher.start(["--wsgi-file", str(APP)], extra_args=extra)
    # The master listens from the start; the tests count on both workers.
    wait_for(lambda: "master ready: 2 workers" in stack.oxwsgi_log(), "both workers became ready", stack)
    yield stack
    stack.stop()


def children(pid: int) -> set[int]:
    """The live processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def wait_for(condition, what: str, stack: Stack):
    for _ in range(READY_TRIES):
        if condition():
            return
        time.sleep(READY_INTERVAL)
    pytest.fail(f"never happened: {what}\n{stack.report()}")


def master_pid(stack: Stack) -> int:
    assert stack.oxwsgi.popen is not None
    return stack.oxwsgi.popen.pid


def assert_runs_in(venv: Path, answer: dict) -> None:
    prefix = Path(answer["prefix"]).resolve()
    assert prefix == venv.resolve(), answer
    assert Path(answer["base_prefix"]).resolve() != prefix, answer
    assert Path(answer["executable"]).parent == venv / "bin", answer
    assert Path(answer["flask_file"]).resolve().is_relative_to(venv.resolve() / "lib"), answer
    # The variables the master handed the worker are gone from os.environ, as from the environment.
    assert "OXWSGI_WORKER_ID" in answer["oxwsgi_environ"], answer
    assert not set(answer["oxwsgi_environ"]) & HANDOFF_VARIABLES, answer


def test_the_wheel_is_an_extension_module_without_libpython(wheel, venv):
    modules = list((venv / "lib").glob("python3*/site-packages/oxwsgi/_oxwsgi*.so"))
    assert len(modules) == 1, modules
    needed = subprocess.run(["ldd", modules[0]], capture_output=True, text=True, check=True).stdout
    assert "libpython" not in needed, needed
    version = subprocess.run(
        [venv / "bin" / "python", "-m", "oxwsgi", "--version"], capture_output=True, text=True, env=venv_env()
    )
    assert version.returncode == 0 and version.stdout.startswith("oxwsgi "), version


def test_serves_flask_through_nginx_with_the_venvs_interpreter_and_packages(stack, venv):
    response = requests.get(stack.url("/"), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200 and response.text == "flask ok\n", stack.report()
    answer = requests.get(stack.url("/interpreter"), timeout=HTTP_TIMEOUT).json()
    assert_runs_in(venv, answer)
    master = master_pid(stack)
    # The console script: the virtualenv's python running bin/oxwsgi.
    assert cmdline(master)[1] == str(venv / "bin" / "oxwsgi"), cmdline(master)
    workers = children(master)
    assert answer["pid"] in workers and len(workers) == 2, (answer, workers)
    for pid in workers:
        argv = cmdline(pid)
        assert Path(argv[0]).parent == venv / "bin" and argv[1:3] == ["-m", "oxwsgi"], argv


def test_metrics_are_served_by_the_master(stack, metrics_port):
    requests.get(stack.url("/"), timeout=HTTP_TIMEOUT)
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=HTTP_TIMEOUT).text
    assert 'oxwsgi_requests_total{method="GET",status="200"}' in text, text[:2000]
    assert 'oxwsgi_workers{state="ready"} 2' in text, [line for line in text.splitlines() if "workers{" in line]


def test_harakiri_kills_a_stuck_worker_and_replaces_it(stack):
    before = children(master_pid(stack))
    stuck = requests.get(stack.url(f"/sleep?seconds={HARAKIRI_SECONDS * 30}"), timeout=HTTP_TIMEOUT)
    assert stuck.status_code == 502, (stuck.status_code, stack.report())
    log = stack.oxwsgi_log()
    assert "HARAKIRI: GET /sleep" in log and 'venv_flask_app.py", line' in log, stack.report()
    wait_for(lambda: "retired: it was killed by signal 9" in stack.oxwsgi_log(), "the stuck worker was killed", stack)
    wait_for(lambda: len(children(master_pid(stack)) - before) == 1, "a replacement worker started", stack)
    assert all(requests.get(stack.url("/"), timeout=HTTP_TIMEOUT).status_code == 200 for _ in range(10))


def test_sighup_replaces_every_worker_with_one_from_the_venv(stack, venv):
    master = master_pid(stack)
    before = children(master)
    assert len(before) == 2, before
    os.kill(master, signal.SIGHUP)
    wait_for(
        lambda: len(children(master)) == 2 and not children(master) & before,
        "both workers were replaced",
        stack,
    )
    answer = requests.get(stack.url("/interpreter"), timeout=HTTP_TIMEOUT).json()
    assert answer["pid"] in children(master), (answer, children(master))
    assert_runs_in(venv, answer)


def test_sigterm_stops_master_and_workers_gracefully(stack):
    master = master_pid(stack)
    workers = children(master)
    assert stack.nginx is not None
    stack.nginx.stop()
    assert stack.oxwsgi.stop() == 0, stack.report()
    log = stack.oxwsgi_log()
    # Each worker ran the app's atexit handler, as Python code, with no KeyboardInterrupt in its way.
    for pid in workers:
        assert f"venv_flask_app: atexit in pid {pid}" in log, stack.report()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, stack.report()


def test_sigint_stops_python_dash_m_oxwsgi_gracefully(tmp_path, venv):
    """One process, no master: SIGINT reaches the server, not Python's own handler."""
    port = free_port()
    argv = [str(venv / "bin" / "python"), "-m", "oxwsgi", "--socket", f"127.0.0.1:{port}", "--wsgi-file", str(APP)]
    process = Process("oxwsgi", argv, tmp_path / "oxwsgi.log", env=venv_env())
    process.start()
    try:
        process.wait_listening(("127.0.0.1", port))
        # The socket is bound before the app is imported; the stop signals are handled once it serves.
        stack = Stack(oxwsgi=process)
        wait_for(lambda: "ready: listening" in process.log(), "the server became ready", stack)
        assert process.popen is not None
        process.popen.send_signal(signal.SIGINT)
        status = process.popen.wait(timeout=HTTP_TIMEOUT)
    finally:
        process.stop()
    log = process.log()
    assert status == 0, log
    assert "SIGINT received" in log and f"venv_flask_app: atexit in pid {process.popen.pid}" in log, log
    assert "KeyboardInterrupt" not in log and "Traceback" not in log, log


def test_socket_activation_with_the_installed_command(tmp_path_factory, venv):
    socket_dir = Path(tempfile.mkdtemp(prefix="oxwsgi-e2e.", dir="/tmp"))
    path = socket_dir / "app.sock"
    workdir = tmp_path_factory.mktemp("activated")
    activate = REPO / "tests" / "support" / "socket_activate.py"
    argv = [sys.executable, str(activate), str(path), str(venv / "bin" / "oxwsgi")]
    argv += ["--processes", "2", "--wsgi-file", str(APP)]
    process = Process("oxwsgi", argv, workdir / "oxwsgi.log", env=venv_env())
    stack = Stack(oxwsgi=process, upstream=f"unix:{path}", socket_path=path)
    process.start()
    try:
        wait_for(lambda: "master ready: 2 workers" in process.log(), "the workers became ready", stack)
        Launcher(tmp_path_factory, venv / "bin" / "oxwsgi").start_nginx(stack, find_nginx(), workdir / "nginx")
        answer = requests.get(stack.url("/interpreter"), timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, stack.report()
        assert_runs_in(venv, answer.json())
        assert "using 1 sockets passed by systemd" in process.log(), stack.report()
    finally:
        stack.stop()
    assert process.popen is not None and process.popen.returncode == 0, stack.report()



class IniLauncher(VenvLauncher):
    """The installed command with what tests/ini/flask.ini reads from the environment (SHOP_RUN_DIR)."""

    def __init__(self, tmp_path_factory, oxwsgi_bin: Path, run_dir: Path):
        super().__init__(tmp_path_factory, oxwsgi_bin)
        self.run_dir = run_dir

    def oxwsgi_env(self) -> dict[str, str]:
        return dict(venv_env(), SHOP_RUN_DIR=str(self.run_dir))


def test_an_existing_uwsgi_ini_is_served_by_the_venvs_oxwsgi(tmp_path_factory, venv):
    """The issue's whole path for someone leaving uWSGI: the wheel in a fresh virtualenv, the uwsgi.ini they
    already have, their nginx: only the socket comes from the command line (which wins over the file)."""
    run_dir = tmp_path_factory.mktemp("run")
    launcher = IniLauncher(tmp_path_factory, venv / "bin" / "oxwsgi", run_dir)
    stack = launcher.start(["--ini", str(REPO / "tests" / "ini" / "flask.ini")])
    try:
        # master = true, processes = 2 from the file.
        wait_for(lambda: "master ready: 2 workers" in stack.oxwsgi_log(), "the file's two workers", stack)
        response = requests.get(stack.url("/args?name=ini"), timeout=HTTP_TIMEOUT)
        assert response.status_code == 200 and response.json() == {"name": ["ini"]}, stack.report()
        workers = children(master_pid(stack))
        assert len(workers) == 2, workers
        for pid in workers:
            argv = cmdline(pid)
            assert Path(argv[0]).parent == venv / "bin" and argv[1:3] == ["-m", "oxwsgi"], argv
        # What uWSGI does and oxwsgi does not is said once; what means nothing here is not said at all.
        log = stack.oxwsgi_log()
        assert log.count("options oxwsgi does not know") == 1 and "auto-procname" in log, stack.report()
        assert "enable-threads" not in log and "thunder-lock" not in log, stack.report()
    finally:
        stack.stop()
