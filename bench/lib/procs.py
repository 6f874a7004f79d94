"""Child processes: each in a session (and process group) of its own, with its output in a log file, and
stopped as a whole; plus waiting for a socket to accept connections. No knowledge of what the children are."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

# Log lines shown when a child fails.
LOG_TAIL_LINES = 30
# How long a child gets to exit after it was told to stop; then its process group is killed.
STOP_GRACE_SECONDS = 10
# Bounded polling for "is it listening yet": loading Flask on a busy machine takes a second or two.
READY_TIMEOUT_SECONDS = 30
READY_INTERVAL_SECONDS = 0.05


class BenchError(Exception):
    """A failure that stops the whole benchmark (missing tool, a server that does not start)."""


class Child:
    """A child process in a session (and process group) of its own, with its output in log files.

    Its own session keeps a Ctrl-C in the terminal away from it: the benchmark decides the order of the
    teardown, and `stop` kills whatever is left of the group, so no worker outlives its master. stdout
    goes to `stdout_path` when one is given (a JSON answer to parse), else into the log with stderr."""

    live: ClassVar[set[Child]] = set()

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        stdout_path: Path | None = None,
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stdout_path = stdout_path
        with open(log_path, "wb") as log, open(stdout_path or os.devnull, "wb") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out if stdout_path else log,
                stderr=log if stdout_path else subprocess.STDOUT,
                env=env,
                cwd=log_path.parent,
                start_new_session=True,
            )
        Child.live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        return tail(self.log_path)

    def failure(self, what: str) -> BenchError:
        return BenchError(f"{self.name} {what}\ncommand: {' '.join(self.argv)}\n--- log ---\n{self.log_tail()}")

    def finish(self, timeout: float) -> int:
        """Waits for the child to exit by itself and returns its status; stops it and raises if it
        takes longer than `timeout` seconds (a load generator that hangs)."""
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.failure(f"did not finish within {timeout:.0f}s") from None
        finally:
            self.stop(signal.SIGTERM)
        return self.popen.returncode

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        """`sig`, a bounded wait, then SIGKILL to the whole process group; also reaps leftovers."""
        timed_out = False
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                timed_out = True
                print(f"!!! {self.name} (pid {self.pid}) did not stop within {STOP_GRACE_SECONDS}s: killing it")
        if kill_group(self.pid) and not timed_out:
            print(f"!!! {self.name} (pid {self.pid}) left processes behind after it exited: killed them")
        self.popen.wait()
        Child.live.discard(self)

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.live):
            child.stop()


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def kill_group(pgid: int) -> bool:
    """SIGKILL to every process still in the group; True if there was any."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def raise_interrupt(signum: int, _frame: object) -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the benchmark through the `finally` that stops everything."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def can_connect(family: socket.AddressFamily, address: str | tuple[str, int]) -> bool:
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


def wait_listening(child: Child, family: socket.AddressFamily, address: str | tuple[str, int]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not child.alive():
            raise child.failure(f"exited with status {child.popen.returncode} before listening on {address}")
        if can_connect(family, address):
            return
        time.sleep(READY_INTERVAL_SECONDS)
    raise child.failure(f"did not listen on {address} within {READY_TIMEOUT_SECONDS}s")


def command_output(argv: list[str]) -> str:
    """stdout and stderr of a short command (nginx prints its version on stderr)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


# Signals that stop a benchmark (as KeyboardInterrupt) — SIGINT explicitly too: a shell starting one in the
# background leaves SIGINT ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_entry_point(name: str, body: Callable[[Path], int]) -> int:
    """What every benchmark's `main` does around `body`, which gets a fresh working directory (short, under
    /tmp: Unix socket paths are limited) and returns the exit status: a stop signal becomes
    KeyboardInterrupt (exit 130), a BenchError one line (exit 2), and however it ended every child is
    stopped and the directory removed, with the stop signals ignored by then so that a second Ctrl-C cannot
    cut the teardown short and leave servers behind."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"oxwsgi-{name}.", dir="/tmp"))
    try:
        return body(workdir)
    except BenchError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted ({err or 'Ctrl-C'}); stopping everything", file=sys.stderr)
        return 130
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        Child.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
