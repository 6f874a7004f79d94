"""oxwsgi's start-up and shutdown, without nginx: a bad app fails before listening, with one clear error
line and status 1; SIGTERM stops a running server cleanly."""

import signal
import subprocess
import time

import pytest

from conftest import APPS, READY_INTERVAL, READY_TRIES, Process, can_connect

# A start-up failure must end the process on its own; this only bounds a hang.
EXIT_TIMEOUT = 60


def run_oxwsgi(oxwsgi_bin, tmp_path, *app_args):
    """Runs oxwsgi on a Unix socket in tmp_path until it exits; returns (status, output, socket path)."""
    socket_path = tmp_path / "app.sock"
    try:
        done = subprocess.run(
            [str(oxwsgi_bin), "--socket", str(socket_path), *app_args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"oxwsgi {app_args} kept running instead of failing:\n{err.stderr}", pytrace=False)
    return done.returncode, done.stdout + done.stderr, socket_path


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("oxwsgi: error: ")]


def test_missing_module_fails_with_one_error_line(oxwsgi_bin, tmp_path):
    status, output, socket_path = run_oxwsgi(oxwsgi_bin, tmp_path, "--module", "does_not_exist:app")
    assert status == 1, output
    assert len(error_lines(output)) == 1, output
    assert "does_not_exist" in output
    assert not socket_path.exists(), "the socket must not be bound when the app cannot be loaded"


def test_import_error_in_wsgi_file_prints_the_traceback(oxwsgi_bin, tmp_path):
    app = tmp_path / "broken_app.py"
    app.write_text(
        "import helper_module_that_is_not_installed_anywhere\n\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'unreachable']\n"
    )
    status, output, socket_path = run_oxwsgi(oxwsgi_bin, tmp_path, "--wsgi-file", str(app))
    assert status == 1, output
    assert "Traceback (most recent call last)" in output
    assert "ModuleNotFoundError" in output
    assert "helper_module_that_is_not_installed_anywhere" in output
    assert len(error_lines(output)) == 1, output
    assert not socket_path.exists()


def test_missing_callable_fails(oxwsgi_bin, tmp_path):
    status, output, socket_path = run_oxwsgi(
        oxwsgi_bin, tmp_path, "--wsgi-file", str(APPS / "hello.py"), "--callable", "no_such_callable"
    )
    assert status == 1, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert "no_such_callable" in lines[0]
    assert not socket_path.exists()


def test_sigterm_stops_cleanly_and_removes_the_socket(launcher, tmp_path):
    stack = launcher.start_oxwsgi(["--wsgi-file", str(APPS / "hello.py")], tmp_path, upstream="unix")
    try:
        # The socket accepts slightly before the line is written; poll for it (bounded).
        for _ in range(READY_TRIES):
            if "ready" in stack.oxwsgi_log():
                break
            time.sleep(READY_INTERVAL)
        assert "ready" in stack.oxwsgi_log()
        stack.oxwsgi.popen.send_signal(signal.SIGTERM)
        status = stack.oxwsgi.popen.wait(timeout=EXIT_TIMEOUT)
        assert status == 0, stack.oxwsgi_log()
        assert not stack.socket_path.exists(), "the Unix socket file must be removed at exit"
        assert not can_connect(str(stack.socket_path))
    finally:
        stack.stop()


def test_process_helper_reports_a_server_that_dies(tmp_path):
    # The fixtures' readiness wait must fail with the log, not hang, when the process exits early.
    process = Process("false", ["sh", "-c", "echo boom >&2; exit 3"], tmp_path / "log")
    process.start()
    with pytest.raises(pytest.fail.Exception, match="(?s)status 3.*boom"):
        process.wait_listening(str(tmp_path / "never.sock"))
